"""``avloc view``: watch a running pipeline from a web page (overlay, confidence, notices, latency).

A small aiohttp server (HTTP page + one WebSocket per browser, in one asyncio loop) that subscribes to the
frame and heatmap streams exactly like a third-party subscriber (``protocol.make_socket`` SUB sockets,
``protocol.drain_latest``; docs/protocol.md) and serves one page (``avloc/assets/viewer.*``). See
docs/viewer.md.

- An ingest thread receives, pairs each heatmap with the frame it was computed on (by ``seq``, as the
  OpenCV display does), JPEG-encodes that frame once and hands one binary message per update to the loop.
  Colour-mapping and blending happen in the browser, so alpha and colormap are switchable on the page.
- Every browser holds at most one pending message per stream: a newer one replaces it and is counted as a
  drop for that browser (shown on its page). Nothing ever waits for a browser, so a slow or stuck one cannot
  slow the ingest, and the ingest cannot slow the pipeline (its SUB sockets drop at their HWM like any
  subscriber's).
- Binds loopback by default. A non-loopback bind requires a token (``--token`` or ``AVLOC_VIEW_TOKEN``),
  accepted as ``?token=``, ``X-Avloc-Token`` or ``Authorization: Bearer``; a request without it gets 403
  and one log line.

Run: ``avloc view --frames EP --heatmaps EP [--http 127.0.0.1:8080] [--token T]``, or under the launcher
as ``python -m avloc.stream.clients.view`` (then with ``--heartbeat``, see :func:`avloc.stream.run.pipeline.view_spec`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq
from aiohttp import WSMsgType, web

from avloc.core.errors import UserError
from avloc.core.media import checked_map_box
from avloc.stream.clients.display import (
    COLORMAPS,
    FRAME_BUFFER,
    MAX_STREAMS,
    STALE_HEATMAP_S,
    heatmap_to_unit,
    notice_text,
)
from avloc.stream.runtime.worker import (
    USER_ERROR_EXIT,
    Heartbeat,
    add_common_arguments,
    install_stop_handlers,
    setup_logging,
)
from avloc.stream.wire import protocol, security
from avloc.stream.wire.security import check_endpoint, is_loopback

log = logging.getLogger(__name__)

DEFAULT_HTTP = "127.0.0.1:8080"
TOKEN_ENV = "AVLOC_VIEW_TOKEN"
TOKEN_HEADER = "X-Avloc-Token"
STALL_S = 1.0  # the page shows "stalled" after this long without a frame of a stream
LATENCY_WINDOW_S = 30.0  # the latency plot's span, in 1 s buckets
STATS_INTERVAL_S = 0.5
JPEG_QUALITY = 80
# Per-browser socket buffering: small, so a slow browser is shown recent frames (and counted drops) rather
# than a queue of stale ones seconds long.
SEND_BUFFER_BYTES = 64 * 1024
WS_WRITER_LIMIT = 64 * 1024


# --- arguments ---------------------------------------------------------------------------------------------
def parse_http(value: str, option: str = "--http") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) -> (host, port); port 0 picks a free one."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UserError(f"{option} {value!r}: expected HOST:PORT, e.g. {DEFAULT_HTTP}")
    return host, int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--frames",
        action="append",
        default=None,
        metavar="ENDPOINT",
        help=f"frame publisher(s) (repeatable; default {protocol.DEFAULT_ENDPOINTS['frames']})",
    )
    parser.add_argument("--heatmaps", default=protocol.DEFAULT_ENDPOINTS["heatmaps"], metavar="ENDPOINT")
    parser.add_argument(
        "--http",
        default=DEFAULT_HTTP,
        metavar="HOST:PORT",
        help="where to serve the page (loopback by default; other addresses need --token)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"file holding the token required on every request as ?token=, {TOKEN_HEADER} or 'Authorization: "
        f"Bearer' (default: ${TOKEN_ENV}; never on the command line, which `ps` shows to every local user)",
    )
    parser.add_argument("--token", default=None, help=argparse.SUPPRESS)  # refused with a hint: see read_token
    parser.add_argument(
        "--keys",
        type=Path,
        default=None,
        metavar="DIR",
        help="CURVE keys of the pipeline: RUN_DIR/keys of an `avloc run/replay` (secure by default), or the "
        "--keys DIR it was started with (default: $AVLOC_KEYS; none for an --insecure pipeline)",
    )
    parser.add_argument("--alpha", type=float, default=0.45, help="initial heatmap opacity on the page (0..1)")
    parser.add_argument("--colormap", default="jet", choices=sorted(COLORMAPS), help="initial colormap")
    parser.add_argument("--max-clients", type=int, default=64, help="browsers served at once (more get 503)")
    add_common_arguments(parser, role="view")


# --- ingest: ZeroMQ -> one binary message per update -------------------------------------------------------
def encode_update(header: dict[str, Any], jpeg: bytes, heat: bytes) -> bytes:
    """``uint32 LE header length | header JSON | JPEG | heatmap uint8 (h*w)``: what the page decodes."""
    head = json.dumps({**header, "jpeg": len(jpeg)}, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + jpeg + heat


def stage_latencies(ts: dict[str, float], received: float) -> dict[str, float]:
    """Milliseconds between consecutive timestamps of a heatmap, ending with its arrival here.

    The order is the header's own (the inference worker writes ``ts`` in pipeline order; JSON keeps it), so a
    stage is named by its two ends whatever names a pipeline adds.
    """
    marks = [*ts.items(), ("view", received)]
    return {f"{a}→{b}": (tb - ta) * 1000.0 for (a, ta), (b, tb) in zip(marks, marks[1:])}


class StreamState:
    """What the ingest thread knows about one stream (read by the loop under ``Ingest.lock``)."""

    def __init__(self) -> None:
        self.frames: deque[protocol.Message] = deque(maxlen=FRAME_BUFFER)
        self.frames_received = 0
        self.heatmaps_received = 0
        self.unmatched = 0  # heatmaps whose frame this subscriber never got (its SUB queue dropped it)
        self.last_frame_t = -np.inf
        self.last_update_t = -np.inf  # last heatmap update sent to the browsers
        self.sent_frame_seq = -1
        self.last_heard = -np.inf
        # (arrival time, e2e ms, {stage: ms}) of the last LATENCY_WINDOW_S
        self.latency: deque[tuple[float, float, dict[str, float]]] = deque()


class Ingest(threading.Thread):
    """Subscribes, pairs heatmaps with frames, encodes updates; ``publish(stream, bytes)`` is thread-safe."""

    def __init__(self, frames: list[str], heatmaps: str, publish: Callable[[str, bytes], None]) -> None:
        super().__init__(name="ingest", daemon=True)
        self._ctx = zmq.Context()
        # Created here so a bad endpoint fails at start-up; used only by the thread from then on.
        self._frames = protocol.make_socket(self._ctx, zmq.SUB, frames, bind=False, hwm=32)
        self._heatmaps = protocol.make_socket(self._ctx, zmq.SUB, heatmaps, bind=False, hwm=64)
        self._publish = publish
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.streams: dict[str, StreamState] = {}
        self.streams_evicted = 0
        self.rejects = protocol.RejectCounter("view", logger=log)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._frames, zmq.POLLIN)
        poller.register(self._heatmaps, zmq.POLLIN)
        try:
            while not self.stop.is_set():
                events = dict(poller.poll(50))
                if self._frames in events:
                    for msg in protocol.drain_latest(self._frames, rejects=self.rejects):
                        self._guarded(self._on_frame, msg)
                if self._heatmaps in events:
                    messages, received = protocol.drain_stamped(self._heatmaps, rejects=self.rejects)
                    newest: dict[str, protocol.Message] = {}
                    for msg in messages:
                        if self._guarded(self._on_heatmap, msg, received):
                            newest[msg.stream] = msg
                    for msg in newest.values():  # older ones of the same drain are superseded: not encoded
                        self._guarded(self._send_heatmap, msg)
                self._send_stale()
        finally:
            self.close()

    def close(self) -> None:
        self._frames.close(0)
        self._heatmaps.close(0)
        self._ctx.term()

    def _guarded(self, handler: Callable[..., Any], msg: protocol.Message, *args: Any) -> Any:
        """A well-formed message with unusable content is counted (``bad_content``), never fatal."""
        try:
            return handler(msg, *args)
        except (TypeError, ValueError, KeyError, OverflowError, cv2.error) as err:
            self.rejects.reject(protocol.ProtocolError("bad_content", f"{msg.kind} {msg.stream}: {err}"[:160]))
            return None

    def _state(self, stream: str) -> StreamState:
        with self.lock:
            state = self.streams.get(stream)
            if state is None:
                # bounded like the display's streams: a sender making up ids evicts the least recently heard one,
                # never grows what every browser is sent
                while len(self.streams) >= MAX_STREAMS:
                    oldest = min(self.streams, key=lambda s: self.streams[s].last_heard)
                    del self.streams[oldest]
                    self.streams_evicted += 1
                state = self.streams[stream] = StreamState()
            state.last_heard = protocol.now()
            return state

    def _on_frame(self, msg: protocol.Message) -> None:
        if msg.kind != "frame" or "frame" not in msg.arrays:
            return  # control messages ("end", notices) travel on the frames socket too
        frame = msg.arrays["frame"]
        if frame.ndim != 3 or frame.shape[2] != 3 or min(frame.shape[:2]) < 2 or frame.dtype != np.uint8:
            raise ValueError(f"frame {frame.dtype} {frame.shape}, expected uint8 HxWx3")
        state = self._state(msg.stream)
        if state.frames and msg.seq < state.frames[-1].seq:  # a looping or restarted source starts over
            state.frames.clear()
            state.sent_frame_seq = -1
        state.frames.append(msg)
        with self.lock:
            state.frames_received += 1
            state.last_frame_t = protocol.now()

    def _on_heatmap(self, msg: protocol.Message, received: float) -> bool:
        if msg.kind != "heatmap":
            return False
        state = self._state(msg.stream)
        with self.lock:
            state.heatmaps_received += 1
            capture = msg.ts.get("capture")
            if capture is not None:
                state.latency.append(((received), (received - capture) * 1000.0, stage_latencies(msg.ts, received)))
            while state.latency and state.latency[0][0] < received - LATENCY_WINDOW_S:
                state.latency.popleft()
        return True

    def _send_heatmap(self, msg: protocol.Message) -> None:
        state = self._state(msg.stream)
        frame = next((f for f in reversed(state.frames) if f.seq == msg.seq), None)
        if frame is None:
            state.unmatched += 1
            return
        peak = msg.meta.get("peak")
        if peak is not None:
            x, y = (float(v) for v in peak)
            if not (np.isfinite(x) and np.isfinite(y)):
                raise ValueError(f"peak {peak!r}")
            peak = [x, y]
        map_box = msg.meta.get("map_box")  # a crop / letterbox engine: the frame rectangle the map covers
        if map_box is not None:  # the page draws it: a string's characters or a huge box are refused
            map_box = list(checked_map_box(map_box))
        notice = msg.meta.get("notice")
        audio_real = msg.meta.get("audio_real")
        if not isinstance(audio_real, int | float) or isinstance(audio_real, bool) or not np.isfinite(audio_real):
            audio_real = None  # JSON to the browser: never NaN/inf
        arr = msg.arrays.get("heatmap")
        if arr is not None and not protocol.all_finite(arr):
            raise ValueError(f"heatmap {arr.dtype} {arr.shape} has non-finite values")
        heat = b""
        shape = None
        if arr is not None and arr.ndim == 2 and arr.size:
            heat = np.round(heatmap_to_unit(arr) * 255.0).astype(np.uint8).tobytes()
            shape = list(arr.shape)
        header = {
            "stream": msg.stream,
            "seq": msg.seq,
            "hm": shape,
            "peak": peak,
            "map_box": map_box,
            "confidence": float(msg.meta.get("confidence") or 0.0),
            "notice": notice if isinstance(notice, str) else None,
            # the display's wording ("WARMING UP 40%"), so page and window say the same thing
            "notice_text": notice_text(notice if isinstance(notice, str) else None, audio_real),
            "audio_real": audio_real,
            "gate": msg.meta.get("gate") if isinstance(msg.meta.get("gate"), int | float) else None,
            "pipeline_drops": msg.meta.get("drops") if isinstance(msg.meta.get("drops"), int) else None,
        }
        self._emit(state, frame, header, heat)
        state.last_update_t = protocol.now()

    def _send_stale(self) -> None:
        """No heatmap for a while (inference loading or restarting): keep the page moving with plain frames."""
        t = protocol.now()
        for state in list(self.streams.values()):
            if not state.frames or t - state.last_update_t <= STALE_HEATMAP_S:
                continue
            frame = state.frames[-1]
            if frame.seq == state.sent_frame_seq:
                continue
            self._guarded(self._send_plain, frame, state)

    def _send_plain(self, frame: protocol.Message, state: StreamState) -> None:
        notice = frame.meta.get("notice")
        header = {
            "stream": frame.stream,
            "seq": frame.seq,
            "hm": None,
            "peak": None,
            "confidence": None,
            "notice": notice if isinstance(notice, str) else None,
            "notice_text": notice_text(notice if isinstance(notice, str) else None),
            "gate": None,
        }
        self._emit(state, frame, header, b"")

    def _emit(self, state: StreamState, frame: protocol.Message, header: dict[str, Any], heat: bytes) -> None:
        ok, jpeg = cv2.imencode(".jpg", frame.arrays["frame"], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise ValueError("JPEG encoding failed")
        with self.lock:
            header |= {"frames": state.frames_received, "heatmaps": state.heatmaps_received}
        state.sent_frame_seq = frame.seq
        self._publish(header["stream"], encode_update(header, jpeg.tobytes(), heat))

    def snapshot(self) -> dict[str, Any]:
        """Per-stream counters and the latency buckets of the last 30 s (1 s each; t relative to now)."""
        t = protocol.now()
        out: dict[str, Any] = {}
        with self.lock:
            items = [(s, st, list(st.latency)) for s, st in self.streams.items()]
        for stream, state, latency in items:
            buckets = []
            for k in range(int(LATENCY_WINDOW_S)):
                lo = t - LATENCY_WINDOW_S + k
                chunk = [r for r in latency if lo <= r[0] < lo + 1.0]
                if not chunk:
                    continue
                e2e = np.array([r[1] for r in chunk])
                stages: dict[str, list[float]] = {}
                for _, _, per_stage in chunk:
                    for name, ms in per_stage.items():
                        stages.setdefault(name, []).append(ms)
                buckets.append(
                    {
                        "t": round(lo + 1.0 - t, 2),
                        "n": len(chunk),
                        "p50": round(float(np.percentile(e2e, 50)), 2),
                        "p99": round(float(np.percentile(e2e, 99)), 2),
                        "stages": {name: round(float(np.median(v)), 2) for name, v in stages.items()},
                    }
                )
            e2e_all = np.array([r[1] for r in latency]) if latency else None
            out[stream] = {
                "frames": state.frames_received,
                "heatmaps": state.heatmaps_received,
                "heatmap_fps": round(sum(1 for r in latency if r[0] >= t - 5.0) / 5.0, 2),
                "unmatched": state.unmatched,
                "age_s": round(max(0.0, t - state.last_frame_t), 3) if np.isfinite(state.last_frame_t) else None,
                "p50": None if e2e_all is None else round(float(np.percentile(e2e_all, 50)), 2),
                "p99": None if e2e_all is None else round(float(np.percentile(e2e_all, 99)), 2),
                "buckets": buckets,
            }
        return out


# --- browsers ----------------------------------------------------------------------------------------------
class Client:
    """One browser: the newest pending message per stream, sent by one task, drops counted."""

    def __init__(self, ws: web.WebSocketResponse, peer: str) -> None:
        self.ws = ws
        self.peer = peer
        self.pending: dict[str, bytes | str] = {}
        self.wake = asyncio.Event()
        self.sent = 0
        self.dropped = 0
        self.started = protocol.now()

    def offer(self, key: str, data: bytes | str, *, count: bool = True) -> None:
        if count and key in self.pending:
            self.dropped += 1  # the browser has not taken the previous one yet: the newest wins
        self.pending[key] = data
        self.wake.set()

    async def send_loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.pending = self.pending, {}
            try:
                for data in batch.values():
                    if isinstance(data, bytes):
                        await self.ws.send_bytes(data)
                    else:
                        await self.ws.send_str(data)
                    self.sent += 1
            except ConnectionError:
                with contextlib.suppress(Exception):  # ends the receiving side too
                    await self.ws.close()
                raise


STATS_KEY = ""  # pending key of the stats message (stream ids are non-empty... or at least never this)


class Viewer:
    """The aiohttp application: page, WebSocket, token and origin checks, periodic stats."""

    def __init__(self, args: argparse.Namespace, token: str | None, host: str) -> None:
        self.args = args
        self.token = token
        self.loopback = is_loopback(host)
        self.clients: set[Client] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ingest: Ingest | None = None
        self.page = self._page()
        self.forbidden = 0

    def _page(self) -> bytes:
        assets = resources.files("avloc") / "assets"
        luts = {}
        for name, code in COLORMAPS.items():
            bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(256, 1), code).reshape(256, 3)
            luts[name] = bgr[:, ::-1].tolist()  # the page draws RGB
        config = {
            "alpha": self.args.alpha,
            "colormap": self.args.colormap,
            "colormaps": luts,
            "stall_s": STALL_S,
            "window_s": LATENCY_WINDOW_S,
        }
        html = (assets / "viewer.html").read_text(encoding="utf-8")
        script = (assets / "viewer.js").read_text(encoding="utf-8")
        # one response (the token need not be passed to sub-requests); '</' cannot end the script early
        html = html.replace("__CONFIG__", json.dumps(config).replace("</", "<\\/"))
        return html.replace("__SCRIPT__", script).encode("utf-8")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._index)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/favicon.ico", lambda _: web.Response(status=204))
        return app

    def _given_token(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        return request.query.get("token") or request.headers.get(TOKEN_HEADER) or bearer

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        if request.path == "/favicon.ico":  # browsers fetch it without the page's query string
            return await handler(request)
        try:
            host = request.url.host or ""
            given = self._given_token(request) if self.token is not None else None
            given_bytes = None if given is None else given.encode("utf-8")
        except (UnicodeError, ValueError) as err:  # a Host or token header that is not text: the client's error
            return self._deny(request, 400, f"bad request header ({type(err).__name__})")
        if self.loopback and not is_loopback(host):
            # a loopback server addressed by another name: DNS rebinding from some web page. Any loopback address
            # (127.0.0.2 too, what it may be bound to) and "localhost" are fine; names are not.
            return self._deny(request, 403, f"Host {request.host!r} is not a loopback name")
        if self.token is not None:
            if given_bytes is None or not hmac.compare_digest(given_bytes, self.token.encode()):
                return self._deny(request, 403, "missing token" if given is None else "wrong token")
        origin = request.headers.get("Origin")
        if request.path == "/ws" and origin is not None and origin.split("://", 1)[-1] != request.host:
            # another site's page in the user's browser must not read the streams
            return self._deny(request, 403, f"cross-origin WebSocket from {origin!r}")
        return await handler(request)

    def _deny(self, request: web.Request, status: int, why: str) -> web.Response:
        self.forbidden += 1
        log.warning("%d %s %s from %s: %s", status, request.method, request.path, request.remote, why)
        return web.Response(status=status, text=f"avloc view: {why}\n")

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.page,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if len(self.clients) >= self.args.max_clients:
            return self._deny(request, 503, f"already serving {len(self.clients)} browsers (--max-clients)")
        ws = web.WebSocketResponse(
            heartbeat=10.0, max_msg_size=4096, writer_limit=WS_WRITER_LIMIT, compress=False
        )  # JPEG does not compress; deflate would only cost CPU
        await ws.prepare(request)
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        client = Client(ws, str(request.remote))
        self.clients.add(client)
        sender = asyncio.create_task(client.send_loop())
        reason = "closed by the browser"
        try:
            while True:  # the page sends nothing; receiving keeps pings and the close handshake going
                msg = await ws.receive()
                if msg.type == WSMsgType.CLOSE:
                    break
                if msg.type in (WSMsgType.CLOSED, WSMsgType.CLOSING):
                    reason = "went away mid-stream (no close handshake)"
                    break
                if msg.type == WSMsgType.ERROR:
                    reason = f"went away mid-stream ({ws.exception() or msg.data})"
                    break
        finally:
            self.clients.discard(client)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await sender
                except (ConnectionError, RuntimeError) as err:  # the browser went away mid-send
                    reason = f"went away mid-stream ({type(err).__name__})"
            if self.loop is not None and self.ingest is not None and self.ingest.stop.is_set():
                reason = "server stopping"
            await ws.close()
            log.info(
                "browser %s %s after %.1f s: %d messages sent, %d dropped (newest only)",
                client.peer,
                reason,
                protocol.now() - client.started,
                client.sent,
                client.dropped,
            )
        return ws

    # called from the ingest thread
    def publish(self, stream: str, data: bytes) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._offer, stream, data)

    def _offer(self, stream: str, data: bytes) -> None:
        for client in self.clients:
            client.offer(stream, data)

    def broadcast_stats(self) -> dict[str, Any]:
        streams = self.ingest.snapshot() if self.ingest is not None else {}
        for client in self.clients:
            text = json.dumps({"type": "stats", "dropped": client.dropped, "streams": streams})
            client.offer(STATS_KEY, text, count=False)
        return streams

    def stats(self, streams: dict[str, Any]) -> dict[str, Any]:
        return {
            "clients": len(self.clients),
            "frames": sum(s["frames"] for s in streams.values()),
            "heatmaps": sum(s["heatmaps"] for s in streams.values()),
            "forbidden": self.forbidden,
            "rejects": self.ingest.rejects.as_dict() if self.ingest is not None else {},
            "streams_evicted": self.ingest.streams_evicted if self.ingest is not None else 0,
        }

    async def serve(self, host: str, port: int, stop: threading.Event, heartbeat: Heartbeat) -> None:
        self.loop = asyncio.get_running_loop()
        self.ingest = Ingest(self.args.frames, self.args.heatmaps, self.publish)
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            try:
                await site.start()
            except OSError as err:
                raise UserError(f"--http {self.args.http}: cannot listen there ({err.strerror or err})") from None
            self.ingest.start()
            bound = [a for a in runner.addresses if isinstance(a, tuple)]
            url_host = f"[{host}]" if ":" in host else host
            actual_port = bound[0][1] if bound else port
            log.info(
                "serving http://%s:%d/ (frames %s, heatmaps %s)%s",
                url_host,
                actual_port,
                ", ".join(self.args.frames),
                self.args.heatmaps,
                f"; token required (?token=..., {TOKEN_HEADER} or Authorization: Bearer)"
                if self.token
                else "; loopback only, no token",
            )
            next_stats = 0.0
            while not stop.is_set():
                if not self.ingest.is_alive():  # exit non-zero: the launcher restarts a dead viewer
                    raise RuntimeError("the ingest thread stopped (its traceback is above)")
                t = protocol.now()
                if t >= next_stats:
                    next_stats = t + STATS_INTERVAL_S
                    streams = self.broadcast_stats()
                    heartbeat.maybe_send(self.stats(streams))
                await asyncio.sleep(0.05)
        finally:
            self.ingest.stop.set()
            for client in list(self.clients):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.ws.close(code=1001, message=b"server stopping"), 1.0)
            await runner.cleanup()
            if self.ingest.is_alive():
                self.ingest.join(timeout=2.0)
            elif self.ingest.ident is None:  # never started (the HTTP bind failed): its sockets are ours to close
                self.ingest.close()


def check_arguments(args: argparse.Namespace) -> tuple[str, int, str | None]:
    """Validate what can be checked before serving; returns (host, port, token)."""
    args.frames = args.frames or [protocol.DEFAULT_ENDPOINTS["frames"]]
    for ep in args.frames:
        check_endpoint(ep, "--frames")
    check_endpoint(args.heatmaps, "--heatmaps")
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha {args.alpha}: expected a value between 0 and 1")
    if args.max_clients < 1:
        raise UserError(f"--max-clients {args.max_clients}: expected at least 1")
    return check_http(args.http, read_token(args.token_file, args.token))


def read_token(token_file: Path | None, argv_token: str | None = None, option: str = "--token") -> str | None:
    """The viewer token: from ``token_file`` (its first line), else ``$AVLOC_VIEW_TOKEN``; None when neither.

    A token on the command line is refused: every local user can read it in ``ps`` / ``/proc/PID/cmdline``.
    """
    if argv_token is not None:
        raise UserError(
            f"{option}: a token on the command line is visible to every local user (`ps`); "
            f"put it in ${TOKEN_ENV} or in a file only you can read ({option}-file FILE)"
        )
    if token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        text = token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{option}-file {token_file}: cannot read it ({err})") from None
    if not text:
        raise UserError(f"{option}-file {token_file}: empty; expected the token on its first line")
    if token_file.stat().st_mode & 0o077:
        log.warning("%s-file %s: other users can read it (chmod 600)", option, token_file)
    return text.splitlines()[0].strip()


def check_http(http: str, token: str | None, option: str = "--http") -> tuple[str, int, str | None]:
    """``HOST:PORT`` and the token rule (also for ``avloc run/replay --view``, before any process starts)."""
    host, port = parse_http(http, option)
    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and token is None:
        raise UserError(
            f"{option} {http}: binding a non-loopback address needs a token (--token or ${TOKEN_ENV}); "
            "anyone who can reach it would see the streams"
        )
    return host, port, token


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """``avloc view`` (given parsed arguments) or ``python -m avloc.stream.clients.view`` (argv)."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="python -m avloc.stream.clients.view", description=__doc__.split("\n")[0])
        add_arguments(parser)
        args = parser.parse_args(args)
    setup_logging("view", args.log_file, args.verbose)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)  # one line per event is ours to write
    stop = install_stop_handlers()
    heartbeat: Heartbeat | None = None
    try:
        host, port, token = check_arguments(args)
        if getattr(args, "keys", None) is not None:  # every socket of this process then uses them (a folder name)
            security.load_keys(args.keys)  # one line now if they are not there
            os.environ[security.KEYS_ENV] = str(args.keys.resolve())
        heartbeat = Heartbeat(zmq.Context.instance(), args.heartbeat, role="view", stream="view")
        asyncio.run(Viewer(args, token, host).serve(host, port, stop, heartbeat))
    except UserError as err:
        log.error("%s", err)
        return USER_ERROR_EXIT
    finally:
        if heartbeat is not None:
            heartbeat.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
