"""The one wire protocol between avloc processes (see docs/protocol.md).

A message is a ZeroMQ multipart ``[header_json_utf8, payload_0, payload_1, ...]``. The header is a small JSON
object (version, kind, stream id, sequence number, monotonic timestamps, one ``{"name","dtype","shape"}``
entry per payload frame, free ``meta``); each payload is the raw little-endian buffer of one numpy array,
sent zero-copy and rebuilt with ``np.frombuffer``. Nothing is ever unpickled: every received message is
validated against the header before any array is built, and anything malformed raises ``ProtocolError``
with a short ``reason`` that callers count in a ``RejectCounter`` (a bad message never kills a process).

This module imports only zmq, numpy and the standard library, so a third party can vendor it.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from avloc.core.errors import UserError

PROTOCOL_VERSION = 1
KINDS = ("frame", "audio", "heatmap", "heartbeat", "control")
# Little-endian on the wire on any host; plain numeric dtypes only (no object/void: nothing to unpickle).
ALLOWED_DTYPES = frozenset(
    {"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16", "float32", "float64"}
)
MAX_HEADER_BYTES = 64 * 1024
MAX_ARRAYS = 16
MAX_NDIM = 8
MAX_DIM = 2**31  # per axis; the byte-size check below catches the rest
MAX_STREAM_ID_CHARS = 128
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
# What a publisher receives is subscriptions (avloc subscribers send one empty topic) and, with CURVE, handshake
# commands of a few hundred bytes (MAXMSGSIZE applies to them too; 256 is too small for INITIATE): a bigger
# message drops the peer's connection instead of being stored. libzmq keeps every distinct subscription in a trie
# of ~50 bytes per topic byte: 2,000 distinct 4 kB topics grew a publisher by 374 MB under the old 4 KiB limit,
# 500-byte ones by 47 MB under this one (scripts/subscription_rss.py); only CURVE (the default) keeps strangers
# from subscribing at all.
MAX_SUBSCRIPTION_BYTES = 512
# Sockets that carry only headers (heartbeats, control, assignment tables, clock requests): libzmq refuses a
# bigger frame before storing it, so a peer cannot make such a socket hold data-sized messages (60 parts of
# 30 MiB each would pass the 32 MiB per-frame limit of a data socket).
MAX_CONTROL_BYTES = MAX_HEADER_BYTES
DEFAULT_HWM = 4  # real-time streams: a few messages of slack, then drop rather than queue stale data

# Default endpoints (loopback only). Publishers bind, consumers connect; every one is configurable and
# ipc:// endpoints work too. See docs/protocol.md for who publishes what.
DEFAULT_ENDPOINTS = {
    "frames": "tcp://127.0.0.1:5550",  # PUB by the camera / replay worker: kind "frame" (+ "control")
    "audio": "tcp://127.0.0.1:5551",  # PUB by the microphone / replay worker: kind "audio"
    "heatmaps": "tcp://127.0.0.1:5552",  # PUB by the inference worker: kind "heatmap"
    "heartbeats": "tcp://127.0.0.1:5553",  # SUB bound by the launcher; workers connect a PUB to it
}

# Control commands carried in meta["command"] of kind "control".
CONTROL_END = "end"  # a finite source (replay) reached its end
CONTROL_NOTICE = "notice"  # meta["notice"], e.g. "no_audio"
NOTICE_NO_AUDIO = "no_audio"
# heatmap computed (array and peak published) but its confidence is below the engine's gate threshold:
# the sound's source is probably not in view (silent or off-screen); see docs/protocol.md
NOTICE_NOT_VISIBLE = "not_visible"
# the engine's map had NaN/inf values: published without array and peak, never as a valid heatmap
NOTICE_NON_FINITE = "non_finite"
# heatmap computed, but its audio window is still mostly the start-up silence (less than the worker's
# WARMING_UP_SHARE of captured audio): the first seconds of a stream, not to be trusted yet
NOTICE_WARMING_UP = "warming_up"

log = logging.getLogger(__name__)


class EndpointError(UserError, OSError):
    """An endpoint cannot be bound or connected (port in use, bad address): a user error, not a crash."""


class ProtocolError(ValueError):
    """A received message broke the protocol. ``reason`` is a short stable key used for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class Message:
    """A validated message. Arrays are read-only views on the received buffers (zero-copy)."""

    kind: str
    stream: str
    seq: int
    ts: dict[str, float]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0  # total payload bytes on the wire, header included


# --- the one clock -------------------------------------------------------------------------------------
# Every timestamp is ``now()``: CLOCK_MONOTONIC (shared by all processes of a host) plus this process's offset to
# the pipeline's reference clock (the inference host's, see stream/wire/clock.py). On one host the offset is 0; a
# worker on another host measures it at start (and again periodically) so that the timestamps of all hosts are
# on one clock. AVLOC_CLOCK_SKEW_S shifts this process's local clock by that many seconds: a test hook that
# makes one host's clock wrong on purpose, to show that the measured offset corrects it.
CLOCK_SKEW_ENV = "AVLOC_CLOCK_SKEW_S"


def _env_skew() -> float:
    text = os.environ.get(CLOCK_SKEW_ENV, "").strip()
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{CLOCK_SKEW_ENV}={text!r}: expected a number of seconds") from None
    if not math.isfinite(value):
        raise UserError(f"{CLOCK_SKEW_ENV}={text!r}: expected a finite number of seconds")
    return value


_SKEW_S = _env_skew()
_offset_s = 0.0  # local clock -> reference clock; set by set_clock_offset (a float store is atomic)
_now_base = _SKEW_S  # _SKEW_S + _offset_s, precomputed: now() is called for every message
_clock_info: dict[str, Any] = {"offset_s": 0.0, "uncertainty_s": 0.0, "synced": False}


def local_clock() -> float:
    """This host's own clock (CLOCK_MONOTONIC, plus the injected skew): what clock sync measures."""
    return time.monotonic() + _SKEW_S


def now() -> float:
    """The clock every timestamp uses: this host's monotonic clock on the pipeline's reference clock."""
    return time.monotonic() + _now_base


def set_clock_offset(offset_s: float, uncertainty_s: float, **info: Any) -> None:
    """Put ``now()`` on the reference clock: ``now() = local_clock() + offset_s`` (stream/wire/clock.py measures it).

    ``info`` (e.g. the reference endpoint, the round-trip time) is reported with the offset by ``clock_stats``.
    """
    global _offset_s, _now_base
    if not (math.isfinite(offset_s) and math.isfinite(uncertainty_s)):
        raise ValueError(f"clock offset {offset_s} ± {uncertainty_s}: not finite")
    _offset_s = float(offset_s)
    _now_base = _SKEW_S + _offset_s
    _clock_info.clear()
    _clock_info.update(offset_s=_offset_s, uncertainty_s=float(uncertainty_s), synced=True, **info)


def clock_stats() -> dict[str, Any]:
    """The offset applied to this process's timestamps and its uncertainty (for heartbeats and summaries)."""
    return dict(_clock_info)


def _finite_json(value: str) -> Any:
    raise ValueError(f"non-finite number {value} in header")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e999" parses to inf
        raise ValueError(f"non-finite number {text[:20]} in header")
    return value


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 1e300


def encode(
    kind: str,
    *,
    stream: str,
    seq: int,
    ts: dict[str, float],
    arrays: dict[str, np.ndarray] | None = None,
    meta: dict[str, Any] | None = None,
) -> list[Any]:
    """Build the multipart frames of one message: header bytes followed by one buffer per array."""
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}; expected one of {KINDS}")
    descriptors = []
    buffers: list[Any] = []
    for name, array in (arrays or {}).items():
        array = np.asarray(array)
        if array.dtype.name not in ALLOWED_DTYPES:
            raise ValueError(f"array {name!r} has dtype {array.dtype}; allowed: {sorted(ALLOWED_DTYPES)}")
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        shape = list(array.shape)
        # A C-contiguous array is sent from its own memory; anything else is copied once here.
        descriptors.append({"name": name, "dtype": array.dtype.name, "shape": shape})
        buffers.append(np.ascontiguousarray(array))
    header = {
        "v": PROTOCOL_VERSION,
        "kind": kind,
        "stream": str(stream),
        "seq": int(seq),
        "ts": {str(k): float(v) for k, v in ts.items()},
        "arrays": descriptors,
        "meta": meta or {},
    }
    encoded = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(encoded) > MAX_HEADER_BYTES:
        raise ValueError(f"header is {len(encoded)} bytes; at most {MAX_HEADER_BYTES} (keep meta small)")
    return [encoded, *buffers]


def send(
    socket: zmq.Socket,
    kind: str,
    *,
    stream: str,
    seq: int,
    ts: dict[str, float],
    arrays: dict[str, np.ndarray] | None = None,
    meta: dict[str, Any] | None = None,
    copy: bool = False,
    block: bool = False,
) -> bool:
    """Send one message; returns False when it was dropped because the peer's queue is full.

    ``copy=False`` hands the array memory to libzmq without copying (pyzmq still copies buffers below its
    ``copy_threshold``, where that is cheaper). The caller must not modify an array until it is sent; the
    workers always publish a fresh array per message. PUB sockets never block; PUSH sockets block only
    when ``block`` is set (and then up to the socket's SNDTIMEO).
    """
    frames = encode(kind, stream=stream, seq=seq, ts=ts, arrays=arrays, meta=meta)
    try:
        socket.send_multipart(frames, flags=0 if block else zmq.NOBLOCK, copy=copy)
    except zmq.Again:
        return False
    return True


def _check_header(header: Any) -> None:
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "header is not a JSON object")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"version {header.get('v')!r}, expected {PROTOCOL_VERSION}")
    if header.get("kind") not in KINDS:
        raise ProtocolError("bad_kind", f"kind {header.get('kind')!r}")
    stream = header.get("stream")
    if not isinstance(stream, str) or len(stream) > MAX_STREAM_ID_CHARS:
        raise ProtocolError("bad_header", "stream must be a string of at most 128 characters")
    seq = header.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ProtocolError("bad_header", f"seq {seq!r} is not a non-negative integer")
    ts = header.get("ts")
    if not isinstance(ts, dict) or not all(_finite_number(v) for v in ts.values()):
        raise ProtocolError("bad_header", "ts must map names to finite numbers")
    if not isinstance(header.get("meta", {}), dict):
        raise ProtocolError("bad_header", "meta must be an object")
    arrays = header.get("arrays")
    if not isinstance(arrays, list):
        raise ProtocolError("bad_header", "arrays must be a list")
    if len(arrays) > MAX_ARRAYS:
        raise ProtocolError("too_many_frames", f"{len(arrays)} arrays, at most {MAX_ARRAYS}")


def _array_spec(
    entry: Any, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not isinstance(entry, dict):
        raise ProtocolError("bad_array", "array descriptor is not an object")
    name, dtype_name, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
    if not isinstance(name, str) or not name:
        raise ProtocolError("bad_array", "array name must be a non-empty string")
    if dtype_name not in ALLOWED_DTYPES:
        raise ProtocolError("bad_dtype", f"array {name!r}: dtype {dtype_name!r} not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in shape)
    ):
        raise ProtocolError("bad_shape", f"array {name!r}: shape {shape!r}")
    # A zero-size axis makes prod(shape) 0 whatever the others say ([0, 2**31-1, 2**31-1, 3] with an empty
    # payload): numpy would still refuse such a shape ("array is too big"). The product of the non-zero axes
    # must itself fit in a message.
    dtype = np.dtype(dtype_name).newbyteorder("<")
    if math.prod(d for d in shape if d) * dtype.itemsize > max_message_bytes:
        raise ProtocolError("bad_shape", f"array {name!r}: shape {shape!r} is larger than a message")
    return name, dtype, tuple(shape)


def all_finite(array: np.ndarray) -> bool:
    """No NaN or inf in ``array`` (integer and bool arrays always): what receivers check before using a float
    array (audio windows, heatmaps) and the inference worker before publishing a map as valid."""
    return array.dtype.kind not in "fc" or bool(np.isfinite(array).all())


def _byte_view(frame: Any) -> memoryview:
    view = memoryview(frame.buffer if isinstance(frame, zmq.Frame) else frame)
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


def _decode(frames: list[Any], max_message_bytes: int) -> Message:
    if not frames:
        raise ProtocolError("empty", "no frames")
    if len(frames) > MAX_ARRAYS + 1:
        raise ProtocolError("too_many_frames", f"{len(frames)} frames, at most {MAX_ARRAYS + 1}")
    views = [_byte_view(f) for f in frames]
    total = sum(v.nbytes for v in views)
    if total > max_message_bytes:
        raise ProtocolError("too_large", f"{total} bytes, at most {max_message_bytes}")
    if views[0].nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("header_too_large", f"{views[0].nbytes} bytes, at most {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(views[0]).decode("utf-8"), parse_constant=_finite_json, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # RecursionError: deeply nested JSON
        raise ProtocolError("bad_json", str(err)[:120]) from None
    _check_header(header)
    specs = [_array_spec(entry, max_message_bytes) for entry in header["arrays"]]
    if len(specs) != len(views) - 1:
        raise ProtocolError("frame_count", f"header has {len(specs)} arrays, message has {len(views) - 1}")
    arrays: dict[str, np.ndarray] = {}
    for (name, dtype, shape), view in zip(specs, views[1:]):
        if name in arrays:
            raise ProtocolError("bad_array", f"duplicate array name {name!r}")
        expected = math.prod(shape) * dtype.itemsize
        if expected != view.nbytes:
            raise ProtocolError(
                "size_mismatch", f"{name!r}: {shape} {dtype.name} = {expected} bytes, got {view.nbytes}"
            )
        # frombuffer keeps the zmq frame alive through the view (zero-copy); callers must not write to it.
        arrays[name] = np.frombuffer(view, dtype=dtype).reshape(shape)
    return Message(
        kind=header["kind"],
        stream=header["stream"],
        seq=header["seq"],
        ts={k: float(v) for k, v in header["ts"].items()},
        arrays=arrays,
        meta=header.get("meta", {}),
        nbytes=total,
    )


def decode(frames: list[Any], *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Validate and rebuild a message from received frames (bytes, memoryviews or zmq.Frame).

    Raises only ``ProtocolError``: whatever a peer sends, a receive loop can count it and go on. The checks
    above are meant to reject everything first; this is the guarantee for what they miss (numpy's own limits,
    an exotic buffer), counted as ``bad_message``.
    """
    try:
        return _decode(frames, max_message_bytes)
    except ProtocolError:
        raise
    except Exception as err:  # noqa: BLE001 - the one place every malformed message must end up counted
        raise ProtocolError("bad_message", f"{type(err).__name__}: {err}"[:160]) from None


def recv(
    socket: zmq.Socket,
    timeout_ms: int,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    rejects: RejectCounter | None = None,
) -> Message | None:
    """Receive and validate one message; None when nothing arrived within ``timeout_ms``.

    A malformed message raises ``ProtocolError``, or, when ``rejects`` is given, is counted there and
    None is returned, so a receive loop keeps serving. The whole multipart message is always consumed.
    """
    if not socket.poll(timeout_ms, zmq.POLLIN):
        return None
    frames = socket.recv_multipart(copy=False)
    try:
        return decode(frames, max_message_bytes=max_message_bytes)
    except ProtocolError as err:
        if rejects is None:
            raise
        rejects.reject(err)
        return None


def drain_latest(
    socket: zmq.Socket,
    *,
    rejects: RejectCounter | None = None,
    max_messages: int = 1000,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[Message]:
    """The messages already queued on ``socket`` (non-blocking), oldest first; for 'newest wins' loops.

    At most ``max_messages`` are taken off the socket per call, rejected ones included: a peer flooding the
    socket with garbage cannot keep the caller's loop here (what is left waits for the next call).
    """
    out: list[Message] = []
    for _ in range(max_messages):
        try:
            frames = socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            break
        try:
            out.append(decode(frames, max_message_bytes=max_message_bytes))
        except ProtocolError as err:
            if rejects is None:
                raise
            rejects.reject(err)
    return out


def drain_stamped(
    socket: zmq.Socket,
    *,
    rejects: RejectCounter | None = None,
    max_messages: int = 1000,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> tuple[list[Message], float]:
    """``drain_latest`` plus the receive time, taken after the drain.

    A stamp taken before draining can predate the send stamp of a message that arrived during the drain;
    stamped after, every drained message's ``send`` <= ``received`` on the shared clock.
    """
    messages = drain_latest(socket, rejects=rejects, max_messages=max_messages, max_message_bytes=max_message_bytes)
    return messages, now()


class RejectCounter:
    """Counts rejected messages by reason and logs at most one line per ``interval_s`` per counter."""

    def __init__(self, name: str, interval_s: float = 1.0, logger: logging.Logger | None = None) -> None:
        self.name = name
        self.interval_s = interval_s
        self.counts: Counter[str] = Counter()
        self._logger = logger or log
        self._last_log = -math.inf
        self._since_log = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reject(self, err: ProtocolError) -> None:
        self.counts[err.reason] += 1
        self._since_log += 1
        t = time.monotonic()
        if t - self._last_log >= self.interval_s:
            self._logger.warning(
                "%s: rejected %d message(s) since last report (latest: %s); totals %s",
                self.name,
                self._since_log,
                err,
                dict(self.counts),
            )
            self._last_log = t
            self._since_log = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


def _secure(sock: zmq.Socket, bind: bool, endpoints: list[str]) -> None:
    """CURVE keys and the non-loopback check (avloc.stream.wire.security) when this runs inside avloc; a vendored
    copy of this module without it has plain sockets."""
    try:
        from avloc.stream.wire import security  # why: optional, a vendored copy of this module runs without it
    except ImportError:
        return
    for ep in endpoints:
        if bind:
            security.check_bind(ep)
        else:  # connecting to an ipc socket in a shared folder may reach one another user put there
            security.check_ipc(ep)
    security.secure_socket(sock, bind=bind)


# DEALER/ROUTER: the clock service's request/reply (stream/wire/clock.py); small messages, like subscriptions.
_SOCKET_NAMES = {
    zmq.PUB: "PUB",
    zmq.SUB: "SUB",
    zmq.PUSH: "PUSH",
    zmq.PULL: "PULL",
    zmq.DEALER: "DEALER",
    zmq.ROUTER: "ROUTER",
}


BIND_RETRY_ENV = "AVLOC_BIND_RETRY_S"  # set by the launcher for a restarted worker (see bind_retrying)


def bind_retrying(sock: zmq.Socket, endpoint: str) -> None:
    """``sock.bind(endpoint)``; while the address is in use, retried with back-off for up to ``$AVLOC_BIND_RETRY_S``
    seconds (0 when unset: fail at once).

    A worker restarted after a crash may find its port still taken (the old process's socket, or another process
    that grabbed it): waiting for it costs no restart of the budget, where failing at once would start the
    restart loop over. A port still taken after that is an ``EndpointError`` (exit 2: reported, not retried).
    """
    try:
        budget = float(os.environ.get(BIND_RETRY_ENV) or 0.0)
    except ValueError:
        budget = 0.0
    deadline = time.monotonic() + budget
    delay = 0.1
    while True:
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as err:
            if err.errno != errno.EADDRINUSE or time.monotonic() + delay > deadline:
                raise
            if delay == 0.1:
                log.warning("%s is in use; retrying for up to %.0f s", endpoint, budget)
            time.sleep(delay)
            delay = min(2 * delay, 2.0)


def make_socket(
    ctx: zmq.Context,
    socket_type: int,
    endpoint: str | list[str],
    *,
    bind: bool,
    hwm: int = DEFAULT_HWM,
    linger: int = 0,
    send_timeout_ms: int = 1000,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> zmq.Socket:
    """A socket with explicit high-water marks, linger and timeouts (nothing can block forever).

    SUB sockets subscribe to everything (streams are filtered on the header, not on topic prefixes).
    Receiving sockets also get ZMQ_MAXMSGSIZE, so libzmq drops a peer sending an oversized frame before
    allocating it (publishers: ``MAX_SUBSCRIPTION_BYTES`` for the subscriptions they receive);
    ``recv``/``decode`` check the total size of a message again and count it.
    """
    if socket_type not in _SOCKET_NAMES:
        raise ValueError(f"socket type {socket_type} not supported; use one of {sorted(_SOCKET_NAMES.values())}")
    sock = ctx.socket(socket_type)
    sock.setsockopt(zmq.LINGER, linger)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
    if socket_type in (zmq.SUB, zmq.PULL):
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    else:  # a PUB still receives subscriptions, a PUSH nothing, DEALER/ROUTER small clock messages
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
    if socket_type == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    if socket_type == zmq.PUB:
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for peers that are not connected yet
    endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
    try:
        _secure(sock, bind, endpoints)
        for ep in endpoints:
            if bind:
                bind_retrying(sock, ep)
            else:
                sock.connect(ep)
    except UserError:  # refused by the security checks
        sock.close(0)
        raise
    except zmq.ZMQError as err:
        sock.close(0)
        raise EndpointError(
            f"cannot {'bind' if bind else 'connect'} {_SOCKET_NAMES[socket_type]} socket to "
            f"{', '.join(endpoints)}: {err} (another pipeline running? choose other ports, e.g. --auto-ports)"
        ) from err
    return sock
