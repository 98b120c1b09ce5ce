"""The inference worker: frames and audio in, heatmaps out.

``inference`` (the process: command line, engine loading), ``inference_worker`` (receive, run an engine from
``avloc.engines``, publish heatmaps), ``batching`` (per-stream pending frames, audio windows and the fair scheduler
that picks each batch) and ``sharding`` (several inference workers: the assignment table, the heatmap proxy the
launcher runs). Imports none of ``capture``, ``clients`` or ``run``: the worker knows the wire, not who is on the
other end.
"""
