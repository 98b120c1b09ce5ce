"""What every pipeline process runs on: ``worker`` (heartbeats to the launcher, logging, stop signals, publisher
sockets, the flags every worker takes, the audio front-end option).

Sits between the wire (which it imports) and the processes in ``capture``, ``serve`` and ``clients`` (which import
it), so the processes share one implementation of these without importing each other or the launcher.
"""
