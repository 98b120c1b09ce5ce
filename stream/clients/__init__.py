"""Consumers of heatmaps: what a person (or a check) sees at the end of the pipeline.

``display`` (the OpenCV window and the per-frame latency log), ``recording`` (the display's MP4 recorder and the
join of its segments), ``view`` (the browser viewer over HTTP/WebSocket) and ``tap`` (reports what arrives from
publishers: rates, bytes/s, age). Imports none of ``capture``, ``serve`` or ``run``.
"""
