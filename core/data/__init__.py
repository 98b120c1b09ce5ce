"""Benchmark generators and dataset tools (not model code): stamps / synth scenes and clips, scan, prepare."""
