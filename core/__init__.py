"""Library core: models, audio front-end, data formats, evaluation protocol.

Imports nothing from ``avloc.train``, ``avloc.engines`` or ``avloc.stream``.
"""
