"""Tools that drive whole pipelines to measure or test them: nothing in a pipeline imports them.

``bench`` (``avloc bench pipeline``: per-stage latency against an eager baseline, the streams sweep), ``soak``
(``avloc bench soak``: a long run under a fault schedule) with ``soak_plan`` (its inputs and fault plan) and
``soak_report``, ``fuzz`` (malformed and flooding messages) and ``demo`` (``avloc demo``: data, training, export
and a replay on an embedded default).
"""
