"""avloc view: a real replay pipeline (tiny engine, looping synth clip) with the browser viewer under the launcher,
watched by headless Chromium (DevTools protocol) and abused by bad WebSocket clients, while an independent
subscriber measures the pipeline's heatmap rate."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import cv2
import numpy as np
import pytest
import zmq
from proc_helpers import orphans

from avloc.core.errors import UserError
from avloc.stream.clients.view import Client, check_arguments, parse_http
from avloc.stream.run import launcher as L
from avloc.stream.run import pipeline as P
from avloc.stream.run.pipeline import view_spec
from avloc.stream.wire import protocol

TOKEN = "s3cret-token"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    return int(L.free_tcp_endpoint().rsplit(":", 1)[1])


class HeatmapTap(threading.Thread):
    """An independent subscriber of the heatmap stream: (arrival time, stream, seq, peak) of each heatmap."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.records: list[tuple[float, str, int, list[float] | None]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        ctx = zmq.Context()
        sock = protocol.make_socket(ctx, zmq.SUB, self.endpoint, bind=False, hwm=1000)
        try:
            while not self.stop.is_set():
                msg = protocol.recv(sock, 100)
                if msg is not None and msg.kind == "heatmap":
                    self.records.append((protocol.now(), msg.stream, msg.seq, msg.meta.get("peak")))
        finally:
            sock.close(0)
            ctx.term()

    def rate(self, seconds: float) -> float:
        """Heatmaps per second over the next ``seconds``."""
        start = len(self.records)
        time.sleep(seconds)
        return (len(self.records) - start) / seconds


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, engine_and_video):
    """replay --loop -> inference -> view (token set), supervised by the launcher in a thread."""
    root = tmp_path_factory.mktemp("view")
    engine, clip = engine_and_video  # conftest's: built once per session, read-only here
    # a busy 2-core machine can take tens of seconds to import torch and load the engine
    config = L.StreamConfig(heartbeat_timeout_s=60.0, startup_grace_s=300.0)
    endpoints = P.Endpoints.auto(1)
    port = _free_port()
    specs = [
        *P.replay_specs(clip, engine, endpoints, config, loop=True),
        P.inference_spec(engine, "onnxruntime", endpoints, config, threads=1),
        view_spec(endpoints, f"127.0.0.1:{port}", TOKEN),
    ]
    launcher = L.Launcher(specs, root / "run", config=config, heartbeat_endpoint=endpoints.heartbeats)
    tap = HeatmapTap(endpoints.heatmaps)
    tap.start()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(launcher.run(timeout_s=600)), daemon=True)
    thread.start()

    def stop() -> None:
        launcher.stop_event.set()
        thread.join(timeout=60)
        tap.stop.set()
        tap.join(timeout=5)

    deadline = time.monotonic() + 300  # engine load + torch imports: minutes on a busy 2-core machine
    while not tap.records and time.monotonic() < deadline:
        time.sleep(0.2)
    if not tap.records:
        stop()  # a failed setup must not leave the pipeline running into the next tests
        pytest.fail(f"no heatmaps within 300 s; logs in {root / 'run'}")
    info = {
        "url": f"http://127.0.0.1:{port}",
        "port": port,
        "tap": tap,
        "launcher": launcher,
        "log": root / "run" / "view.log",
        "root": root,
    }
    yield info
    stop()
    assert result.get("reason") == "stopped", result.get("reason")
    assert not orphans(), "orphan processes"


def _log_lines(path: Path, start: int) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()[start:]


def _decode_update(data: bytes) -> tuple[dict, np.ndarray, np.ndarray | None]:
    n = int.from_bytes(data[:4], "little")
    header = json.loads(data[4 : 4 + n])
    jpeg = np.frombuffer(data[4 + n : 4 + n + header["jpeg"]], np.uint8)
    image = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
    heat = None
    if header["hm"]:
        h, w = header["hm"]
        heat = np.frombuffer(data[4 + n + header["jpeg"] :], np.uint8).reshape(h, w)
    return header, image, heat


# --- units ---------------------------------------------------------------------------------------------------
def test_arguments_and_newest_only_queue():
    assert parse_http("[::1]:8080") == ("::1", 8080)
    with pytest.raises(UserError, match="HOST:PORT"):
        parse_http("8080")

    def args(http: str, token_file: Path | None = None, token: str | None = None):
        import argparse

        return argparse.Namespace(
            frames=None,
            heatmaps="tcp://127.0.0.1:5552",
            http=http,
            token_file=token_file,
            token=token,
            alpha=0.5,
            max_clients=4,
        )

    os.environ.pop("AVLOC_VIEW_TOKEN", None)
    with pytest.raises(UserError, match="needs a token"):
        check_arguments(args("0.0.0.0:8080"))
    with tempfile.TemporaryDirectory() as folder:
        token_file = Path(folder) / "token"
        token_file.write_text("t\n")
        token_file.chmod(0o600)
        assert check_arguments(args("0.0.0.0:8080", token_file))[2] == "t"
    with pytest.raises(UserError, match="visible to every local user"):  # `ps` shows a command line
        check_arguments(args("0.0.0.0:8080", token="t"))
    assert check_arguments(args("localhost:0"))[2] is None

    async def offers() -> Client:
        client = Client(None, "test")  # type: ignore[arg-type]
        client.offer("cam0", b"1")
        client.offer("cam1", b"a")
        client.offer("cam0", b"2")  # replaces b"1": one drop
        client.offer("", "stats", count=False)
        client.offer("", "stats2", count=False)  # stats replace each other without counting
        return client

    client = asyncio.run(offers())
    assert client.pending == {"cam0": b"2", "cam1": b"a", "": "stats2"} and client.dropped == 1


def test_non_loopback_bind_needs_a_token_and_says_so(tmp_path):
    env = {**os.environ, "AVLOC_VIEW_TOKEN": ""}
    cmd = [
        sys.executable,
        "-m",
        "avloc.stream.clients.view",
        "--frames",
        L.free_tcp_endpoint(),
        "--heatmaps",
        L.free_tcp_endpoint(),
    ]
    refused = subprocess.run(
        [*cmd, "--http", f"0.0.0.0:{_free_port()}"], capture_output=True, text=True, env=env, timeout=120
    )
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "needs a token" in refused.stderr, refused.stderr
    on_argv = subprocess.run(
        [*cmd, "--http", f"0.0.0.0:{_free_port()}", "--token", "x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert on_argv.returncode == 2 and "visible to every local user" in on_argv.stderr, on_argv.stderr
    proc = subprocess.Popen(
        [*cmd, "--http", f"0.0.0.0:{_free_port()}"],
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "AVLOC_VIEW_TOKEN": "x"},
    )
    try:
        line = proc.stderr.readline()
        assert "serving http://0.0.0.0:" in line and "token required" in line, line
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


# --- bad clients ---------------------------------------------------------------------------------------------
def _raw_ws_client(port: int) -> socket.socket:
    """A bare TCP WebSocket handshake (no client library buffering) with a small receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def _abuse(port: int, url: str, tap: HeatmapTap) -> dict:
    """20 browsers at once (half reading, half stuck), one vanishing mid-stream, three bad tokens."""
    out: dict = {"forbidden": []}
    async with aiohttp.ClientSession() as session:
        for request in (
            session.get(f"{url}/?token=wrong"),
            session.get(f"{url}/"),
            session.ws_connect(f"{url}/ws", headers={"X-Avloc-Token": "wrong"}),
        ):
            try:
                async with request as response:
                    out["forbidden"].append(response.status)
            except aiohttp.WSServerHandshakeError as err:
                out["forbidden"].append(err.status)
        readers = [await session.ws_connect(f"{url}/ws", headers={"X-Avloc-Token": TOKEN}) for _ in range(10)]
        loop = asyncio.get_running_loop()
        stuck = [await loop.run_in_executor(None, _raw_ws_client, port) for _ in range(10)]
        vanishing = await loop.run_in_executor(None, _raw_ws_client, port)
        received: list[list] = [[] for _ in readers]

        async def read(i: int, ws: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in ws:
                received[i].append(msg.data)

        tasks = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(readers)]
        await loop.run_in_executor(None, vanishing.recv, 20000)  # part of a frame, then gone: RST
        vanishing.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        vanishing.close()
        out["rate"] = await loop.run_in_executor(None, tap.rate, 6.0)
        # a stuck browser that starts reading again was sent newest-only updates and told its drop count
        stuck[0].setblocking(False)
        data = b""
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            try:
                data += stuck[0].recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.05)
        out["stuck_bytes"] = len(data)
        out["stuck_dropped"] = max((int(m) for m in _dropped_counts(data)), default=0)
        for s in stuck:
            s.close()
        for ws in readers:
            await ws.close()
        await asyncio.gather(*tasks)
        out["received"] = received
    return out


def _dropped_counts(data: bytes) -> list[str]:
    """'"dropped": N' values of the stats messages in raw WebSocket bytes (text frames are plain JSON)."""
    import re

    return re.findall(rb'"dropped": (\d+)', data)


def test_bad_clients_do_not_slow_the_pipeline(pipeline):
    tap, log_path = pipeline["tap"], pipeline["log"]
    start = len(log_path.read_text(encoding="utf-8").splitlines())
    base = tap.rate(6.0)
    assert base > 2.0, f"pipeline too slow to measure: {base:.1f} heatmaps/s"
    out = asyncio.run(_abuse(pipeline["port"], pipeline["url"], tap))
    print(f"heatmaps/s seen by an independent subscriber: {base:.2f} before, {out['rate']:.2f} with the bad clients")
    # the pipeline's heatmap rate, seen by an independent subscriber, is unchanged within noise
    assert out["rate"] >= 0.7 * base, (out["rate"], base)
    assert out["forbidden"] == [403, 403, 403]
    for messages in out["received"]:
        binary = [m for m in messages if isinstance(m, bytes)]
        stats = [json.loads(m) for m in messages if isinstance(m, str)]
        assert len(binary) >= 5 and stats, (len(binary), len(stats))
        header, image, heat = _decode_update(binary[-1])
        assert header["stream"] == "cam0" and image.shape == (120, 160, 3) and image.std() > 5
        assert "cam0" in stats[-1]["streams"] and stats[-1]["streams"]["cam0"]["p50"] > 0
    assert any(_decode_update(m)[2] is not None for m in out["received"][0] if isinstance(m, bytes))
    assert out["stuck_bytes"] > 0 and out["stuck_dropped"] > 0, out["stuck_dropped"]
    time.sleep(1.0)  # the server logs a browser when its connection is gone
    lines = _log_lines(log_path, start)
    assert sum(" 403 GET " in line for line in lines) == 3, lines
    closed = [line for line in lines if " browser " in line]
    assert len(closed) == 21, closed
    assert sum("went away" in line or "error" in line for line in closed) >= 1, closed


# --- the page in a real browser ------------------------------------------------------------------------------
class DevTools:
    """Just enough of the Chrome DevTools protocol: call a method, evaluate JavaScript."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        async for msg in self.ws:
            data = json.loads(msg.data)
            if data.get("id") == self.next_id:
                assert "error" not in data, data
                return data["result"]
        raise RuntimeError("DevTools connection closed")

    async def eval(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")


TILE_STATE = """JSON.stringify([...document.querySelectorAll('.tile')].map(t => {
  const c = t.querySelector('canvas.frame'), p = t.querySelector('.peak');
  let std = 0;
  if (c.width > 1) {
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let s = 0, s2 = 0, n = 0;
    for (let i = 0; i < d.length; i += 4) { const v = d[i] + d[i + 1] + d[i + 2]; s += v; s2 += v * v; n++; }
    std = Math.sqrt(s2 / n - (s / n) ** 2);
  }
  return {stream: t.dataset.stream, frames: +t.dataset.frames || 0, heatmaps: +t.dataset.heatmaps || 0,
          seq: +t.dataset.seq, peak: t.dataset.peak ? t.dataset.peak.split(',').map(Number) : null,
          marker: p.style.display === 'block' ? [parseFloat(p.style.left), parseFloat(p.style.top)] : null,
          stalled: t.dataset.stalled, colormap: t.dataset.colormap, std, at: performance.now()};
}))"""


async def _drive_chromium(url: str, shot: Path, tap: HeatmapTap, launcher: L.Launcher) -> dict:
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="avloc-chromium-")
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--mute-audio",
            f"--user-data-dir={profile}",
            f"--remote-debugging-port={port}",
            "--window-size=900,760",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out: dict = {"samples": []}
    try:
        async with aiohttp.ClientSession() as session:
            target = None
            deadline = time.monotonic() + 60
            while target is None and time.monotonic() < deadline:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                        target = next((t for t in await response.json() if t["type"] == "page"), None)
                except aiohttp.ClientError:
                    await asyncio.sleep(0.3)
            assert target is not None, "chromium did not start"
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                cdp = DevTools(ws)
                await cdp.call("Page.navigate", url=f"{url}/?token={TOKEN}")
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    tiles = json.loads(await cdp.eval(TILE_STATE) or "[]")
                    if tiles and tiles[0]["heatmaps"] >= 3:
                        break
                    await asyncio.sleep(0.3)
                for _ in range(12):  # ~4 s of the page
                    out["samples"].append(json.loads(await cdp.eval(TILE_STATE))[0])
                    out["samples"][-1]["tap"] = list(tap.records)
                    await asyncio.sleep(0.33)
                rect = json.loads(
                    await cdp.eval("JSON.stringify(document.querySelector('.lat').getBoundingClientRect())")
                )
                await cdp.call(
                    "Input.dispatchMouseEvent",
                    type="mouseMoved",
                    x=rect["x"] + rect["width"] - 6,
                    y=rect["y"] + rect["height"] / 2,
                )
                out["tip"] = await cdp.eval("document.querySelector('.tip').textContent")
                await cdp.eval(
                    "const s = document.getElementById('colormap'); s.value = 'inferno';"
                    "s.dispatchEvent(new Event('change')); 1"
                )
                out["after_switch"] = json.loads(await cdp.eval(TILE_STATE))[0]
                png = base64.b64decode((await cdp.call("Page.captureScreenshot", format="png"))["data"])
                shot.write_bytes(png)
                # the source dies: the page says "stalled" within ~1 s (the launcher restarts it later)
                replay = launcher.children["replay"].popen
                os.kill(replay.pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                killed = time.monotonic()
                while time.monotonic() < deadline:
                    state = json.loads(await cdp.eval(TILE_STATE))[0]
                    if state["stalled"] == "1":
                        out["stalled_after"] = time.monotonic() - killed
                        break
                    await asyncio.sleep(0.1)
                out["stalled_text"] = await cdp.eval("document.querySelector('.state').textContent")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    return out


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/setup.sh installs it)")
def test_page_in_headless_chromium(pipeline, tmp_path):
    """Frames and heatmaps reach the page, the peak marker is the pipeline's peak, stalls are shown.

    ``AVLOC_VIEWER_SCREENSHOT=docs/img/viewer.png`` also keeps the screenshot (how docs/img/viewer.png is made).
    """
    shot = Path(os.environ.get("AVLOC_VIEWER_SCREENSHOT") or tmp_path / "viewer.png")
    out = asyncio.run(_drive_chromium(pipeline["url"], shot, pipeline["tap"], pipeline["launcher"]))
    samples = out["samples"]
    assert samples[0]["stream"] == "cam0" and samples[0]["heatmaps"] >= 3, samples[0]
    assert samples[-1]["frames"] > samples[0]["frames"], "frame counter did not increase"
    assert all(s["std"] > 5 for s in samples), [s["std"] for s in samples]  # the canvas is not blank
    for s in samples:
        assert s["peak"] is not None and s["marker"] is not None
        assert np.allclose(s["marker"], np.array(s["peak"]) * 100, atol=0.01)  # the marker sits at the peak
        # ... which is the peak the pipeline published for that frame (seq), seen by an independent subscriber
        published = [r[3] for r in s["tap"] if r[1] == "cam0" and r[2] == s["seq"] and r[3] is not None]
        assert any(np.allclose(p, s["peak"], atol=1e-6) for p in published), (s["seq"], s["peak"], published[-3:])
    # the marker moves when the pipeline's peaks move
    tap_peaks = {tuple(r[3]) for r in samples[-1]["tap"][-60:] if r[3] is not None}
    if len(tap_peaks) > 3:
        assert len({tuple(s["peak"]) for s in samples}) > 1, tap_peaks
    assert "e2e p50" in out["tip"] and "-> infer_end" in out["tip"] and "publish -> view" in out["tip"], out["tip"]
    assert out["after_switch"]["colormap"] == "inferno"
    image = cv2.imread(str(shot))
    assert image is not None and image.std() > 10
    assert out.get("stalled_after") is not None and out["stalled_after"] < 5.0, out
    assert out["stalled_text"].startswith("stalled")


def test_warming_up_and_non_finite_reach_the_page_json():
    """The JSON header each browser gets says what the display says: "WARMING UP 40%" with the map and its
    peak (computed, not trusted yet), "NO MAP (NON-FINITE)" without one; a NaN audio_real is never sent."""
    from avloc.stream.clients.view import Ingest

    sent: list[bytes] = []
    ingest = Ingest([L.free_tcp_endpoint()], L.free_tcp_endpoint(), lambda stream, data: sent.append(data))
    try:

        def msg(kind, arrays=None, **meta):
            frames = protocol.encode(kind, stream="cam0", seq=7, ts={"capture": 1.0}, arrays=arrays, meta=meta)
            return protocol.decode([bytes(np.asarray(f).data) if isinstance(f, np.ndarray) else f for f in frames])

        ingest._on_frame(msg("frame", {"frame": np.full((24, 32, 3), 100, np.uint8)}))
        heat = {"heatmap": np.eye(4, dtype=np.float16)}
        ingest._send_heatmap(msg("heatmap", heat, peak=[0.5, 0.5], notice="warming_up", audio_real=0.4))
        ingest._send_heatmap(msg("heatmap", None, peak=None, notice="non_finite"))
        nan = msg("heatmap", heat, peak=[0.5, 0.5], notice="warming_up", audio_real=0.4)
        nan.meta["audio_real"] = float("nan")  # a foreign sender's JSON may hold NaN; protocol.encode cannot
        ingest._send_heatmap(nan)
        ingest._send_heatmap(msg("heatmap", heat, peak=[0.5, 0.5], notice=None, audio_real=1.0))
        # a peer's map_box the page would draw: a string's characters, a gigapixel box -> bad content, not sent
        for box in ("1234", [0, 0, 1e9, 1e9]):
            bad = msg("heatmap", heat, peak=[0.5, 0.5], notice=None, audio_real=1.0, map_box=box)
            ingest._guarded(ingest._send_heatmap, bad)
    finally:
        ingest.close()
    (warming, w_heat), (broken, b_heat), (nan, _), (settled, _) = [
        (h, heat) for h, _, heat in map(_decode_update, sent)
    ]
    assert warming["notice"] == "warming_up" and warming["notice_text"] == "WARMING UP 40%"
    assert warming["audio_real"] == 0.4 and warming["peak"] == [0.5, 0.5] and w_heat is not None
    assert broken["notice_text"] == "NO MAP (NON-FINITE)" and broken["hm"] is None and b_heat is None
    assert nan["audio_real"] is None and nan["notice_text"] == "WARMING UP"
    assert settled["notice_text"] is None and settled["audio_real"] == 1.0
