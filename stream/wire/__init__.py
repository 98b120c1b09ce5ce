"""The wire: what travels between the pipeline's processes and how it is protected, no process of its own.

``protocol`` (message formats, sockets, the public protocol of docs/protocol.md), ``security`` (run tokens, HMAC
tags, CURVE encryption, private ipc folders, endpoint checks), ``keys`` (CURVE keypairs, ``avloc keys``), ``clock``
(the reference clock between hosts) and ``flow`` (credit-based flow control from the inference worker to the
captures). Imports only ``avloc.core`` besides the standard library, zmq and numpy: a third-party client can use it
without the rest of the pipeline.
"""
