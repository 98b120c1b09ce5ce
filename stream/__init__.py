"""Streaming pipeline: capture workers -> ZeroMQ -> inference worker -> display, under a launcher.

The modules live in rooms named by role, each importing only the rooms below it (docs/architecture.md; the
contracts in pyproject.toml ``[tool.importlinter]``, checked by tests/test_architecture.py), top first:
``tools`` (benchmarks, soak, fuzz, demo) -> ``run`` (launcher, pipeline specs, the ``run`` / ``replay`` /
``worker`` command lines) -> ``capture`` | ``serve`` | ``clients`` (the pipeline's processes, independent of each
other) -> ``runtime`` (what every process is built on) -> ``wire`` (messages, security, clock).
"""
