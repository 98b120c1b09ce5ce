"""Streaming pipeline: capture workers -> ZeroMQ -> inference worker -> display, under a launcher."""
