"""Wire protocol: round trips over real loopback sockets, zero-copy, validation of malformed messages, and the
third-party subscriber example of docs/protocol.md run as-is in its own process."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from avloc.stream.wire import protocol, security

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


@pytest.fixture()
def ctx():
    context = zmq.Context()
    yield context
    security.stop_authenticators()  # a test that bound a CURVE socket started one on this context
    context.destroy(linger=0)


def _pair(ctx: zmq.Context, kind: int = zmq.PUSH, peer: int = zmq.PULL) -> tuple[zmq.Socket, zmq.Socket]:
    """A bound receiver on a free loopback port and a connected sender."""
    receiver = protocol.make_socket(ctx, peer, "tcp://127.0.0.1:*", bind=True, hwm=64)
    endpoint = receiver.getsockopt_string(zmq.LAST_ENDPOINT)
    sender = protocol.make_socket(ctx, kind, endpoint, bind=False, hwm=64)
    return sender, receiver


def test_round_trip_every_dtype(ctx):
    sender, receiver = _pair(ctx)
    rng = np.random.default_rng(0)
    arrays = {}
    for name in sorted(protocol.ALLOWED_DTYPES):
        dtype = np.dtype(name)
        if dtype.kind == "f":
            arrays[name] = rng.standard_normal((3, 5, 2)).astype(dtype)
        elif dtype.kind == "b":
            arrays[name] = rng.random((4, 3)) > 0.5
        else:
            info = np.iinfo(dtype)
            arrays[name] = rng.integers(info.min, info.max, size=(2, 7), dtype=dtype, endpoint=True)
    arrays["scalar"] = np.float32(2.5)
    arrays["empty"] = np.zeros((0, 4), np.int16)
    arrays["strided"] = np.arange(60, dtype=np.float32).reshape(6, 10)[:, ::3]  # not contiguous
    arrays["big_endian"] = np.arange(6, dtype=">i4")
    ts = {"capture": protocol.now(), "send": protocol.now()}
    assert protocol.send(sender, "frame", stream="cam7", seq=42, ts=ts, arrays=arrays, meta={"note": "é"})
    msg = protocol.recv(receiver, timeout_ms=5000)
    assert msg is not None
    assert (msg.kind, msg.stream, msg.seq, msg.ts, msg.meta) == ("frame", "cam7", 42, ts, {"note": "é"})
    assert list(msg.arrays) == list(arrays)
    for name, sent in arrays.items():
        got = msg.arrays[name]
        assert got.shape == np.shape(sent), name
        assert got.dtype.newbyteorder("=") == np.asarray(sent).dtype.newbyteorder("="), name
        np.testing.assert_array_equal(got, sent, err_msg=name)


def test_zero_copy_send_and_receive(ctx):
    image = np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    frames = protocol.encode("frame", stream="cam0", seq=0, ts={"capture": 1.0}, arrays={"frame": image})
    assert frames[1] is image  # handed to libzmq as is: no copy on the sending side

    sender, receiver = _pair(ctx)
    sender.send_multipart(frames, copy=False)
    assert receiver.poll(5000)
    parts = receiver.recv_multipart(copy=False)
    msg = protocol.decode(parts)
    got = msg.arrays["frame"]
    # the array is a view on the received zmq frame, not a copy
    assert np.shares_memory(got, np.frombuffer(parts[1].buffer, np.uint8))
    np.testing.assert_array_equal(got, image)
    assert msg.nbytes == image.nbytes + len(frames[0])


def _valid_frames(**overrides) -> list[bytes]:
    header = {
        "v": 1,
        "kind": "audio",
        "stream": "mic0",
        "seq": 3,
        "ts": {"window_end": 1.5},
        "arrays": [{"name": "spec", "dtype": "float32", "shape": [1, 4, 5]}],
        "meta": {},
    }
    header.update(overrides)
    return [json.dumps(header).encode(), np.zeros((1, 4, 5), np.float32).tobytes()]


def _spec(dtype: str, shape: list[int]) -> dict:
    return {"name": "spec", "dtype": dtype, "shape": shape}


MALFORMED = {
    "random_bytes": ([b"\x8f\x00\xffgarbage", b"xx"], "bad_json"),
    "bad_json": ([b'{"v": 1, "kind": ', b""], "bad_json"),
    "not_an_object": ([b"[1, 2, 3]"], "bad_header"),
    "nan_in_header": ([b'{"v": 1, "kind": "frame", "ts": {"a": NaN}}'], "bad_json"),
    "wrong_version": (_valid_frames(v=2), "bad_version"),
    "unknown_kind": (_valid_frames(kind="pickle"), "bad_kind"),
    "negative_seq": (_valid_frames(seq=-1), "bad_header"),
    "bad_ts": (_valid_frames(ts={"capture": "yesterday"}), "bad_header"),
    "object_dtype": (_valid_frames(arrays=[_spec("object", [1, 4, 5])]), "bad_dtype"),
    "negative_shape": (_valid_frames(arrays=[_spec("float32", [-1, 20])]), "bad_shape"),
    "shape_vs_payload": (_valid_frames(arrays=[_spec("float32", [1, 4, 6])]), "size_mismatch"),
    "dtype_vs_payload": (_valid_frames(arrays=[_spec("float64", [1, 4, 5])]), "size_mismatch"),
    "duplicate_names": ([_valid_frames(arrays=[_spec("uint8", [2])] * 2)[0], b"ab", b"cd"], "bad_array"),
    "missing_payload": (_valid_frames()[:1], "frame_count"),
    "extra_payload": ([*_valid_frames(), b"1234"], "frame_count"),
    "too_many_frames": ([_valid_frames()[0]] + [b""] * (protocol.MAX_ARRAYS + 1), "too_many_frames"),
    "huge_header": ([b" " * (protocol.MAX_HEADER_BYTES + 1)], "header_too_large"),
    "oversized": ([_valid_frames()[0]] + [b"\0" * (1 << 20)] * 3, "too_large"),
    "huge_int_ts": (_valid_frames(ts={"capture": 10**400}), "bad_header"),
    "overflowing_float": (
        [_valid_frames()[0].replace(b'"meta": {}', b'"meta": {"pts": 1e999}')] + _valid_frames()[1:],
        "bad_json",
    ),
    "deeply_nested_meta": (
        [_valid_frames()[0].replace(b'"meta": {}', b'"meta": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}")]
        + _valid_frames()[1:],
        "bad_json",
    ),
    "huge_dimension": (_valid_frames(arrays=[_spec("float32", [0, 2**70])]), "bad_shape"),
}


def test_malformed_messages_are_rejected_counted_and_receiver_keeps_serving(ctx, caplog):
    # The malformed messages come from another process, through a real socket.
    sender_code = """
import sys, json, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.PUSH)
sock.setsockopt(zmq.LINGER, 2000)
sock.connect(sys.argv[1])
for frames in json.loads(sys.stdin.read()):
    sock.send_multipart([bytes.fromhex(f) for f in frames])
sock.close()
ctx.term()
"""
    receiver = protocol.make_socket(ctx, zmq.PULL, "tcp://127.0.0.1:*", bind=True, hwm=1000, max_message_bytes=8 << 20)
    endpoint = receiver.getsockopt_string(zmq.LAST_ENDPOINT)
    good = protocol.encode(
        "audio", stream="mic0", seq=0, ts={"window_end": 1.0}, arrays={"spec": np.ones((1, 4, 5), np.float32)}
    )
    good = [bytes(np.asarray(f).data) if isinstance(f, np.ndarray) else f for f in good]
    sequence = []
    for frames, _ in MALFORMED.values():
        sequence += [frames, good]
    payload = json.dumps([[f.hex() for f in frames] for frames in sequence])
    proc = subprocess.run([sys.executable, "-c", sender_code, endpoint], input=payload, text=True, timeout=60)
    assert proc.returncode == 0

    rejects = protocol.RejectCounter("test-pull", interval_s=60.0)
    good_seen = 0
    with caplog.at_level(logging.WARNING, logger="avloc.stream.wire.protocol"):
        for _ in sequence:
            msg = protocol.recv(receiver, timeout_ms=10000, max_message_bytes=2 << 20, rejects=rejects)
            if msg is not None:
                good_seen += 1
                np.testing.assert_array_equal(msg.arrays["spec"], 1.0)
    expected: dict[str, int] = {}
    for _, reason in MALFORMED.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert good_seen == len(MALFORMED)
    assert rejects.as_dict() == expected
    assert rejects.total == len(MALFORMED)
    # rate-limited: one line for the whole burst (interval 60 s), naming the reason and the totals
    lines = [r for r in caplog.records if "test-pull" in r.getMessage()]
    assert len(lines) == 1


def test_recv_raises_without_counter_and_times_out(ctx):
    sender, receiver = _pair(ctx)
    sender.send_multipart(_valid_frames(v=99))
    assert receiver.poll(5000)
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.recv(receiver, timeout_ms=1000)
    assert err.value.reason == "bad_version"
    started = time.monotonic()
    assert protocol.recv(receiver, timeout_ms=100) is None
    assert time.monotonic() - started < 2.0


def test_drain_stamped_never_receives_before_send(ctx):
    # a sender keeps publishing while the receiver drains, so messages arrive during a drain; a receive
    # stamp taken before draining would predate their send stamps (seen as a flaky end-to-end ordering check)
    sender, receiver = _pair(ctx)
    stop = threading.Event()

    def publish() -> None:
        seq = 0
        payload = np.zeros((64, 64, 3), np.uint8)
        while not stop.is_set():
            ts = {"send": protocol.now()}
            protocol.send(sender, "frame", stream="cam0", seq=seq, ts=ts, arrays={"frame": payload})
            seq += 1

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    drained = 0
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if not receiver.poll(100):
                continue
            messages, received = protocol.drain_stamped(receiver)
            late = [m.ts["send"] - received for m in messages if m.ts["send"] > received]
            assert not late, f"{len(late)} of {len(messages)} messages received before they were sent"
            drained += len(messages)
    finally:
        stop.set()
        thread.join(5)
    assert drained > 100  # the check above ran on real traffic


def test_reject_counter_logs_at_most_once_per_interval(caplog):
    counter = protocol.RejectCounter("rl", interval_s=0.2)
    with caplog.at_level(logging.WARNING, logger="avloc.stream.wire.protocol"):
        for _ in range(50):
            counter.reject(protocol.ProtocolError("bad_json", "x"))
        time.sleep(0.25)
        counter.reject(protocol.ProtocolError("bad_kind", "y"))
    assert counter.as_dict() == {"bad_json": 50, "bad_kind": 1}
    assert len([r for r in caplog.records if r.getMessage().startswith("rl:")]) == 2


def test_sender_refuses_what_receivers_would_reject():
    with pytest.raises(ValueError):
        protocol.encode("video", stream="s", seq=0, ts={})
    with pytest.raises(ValueError):
        protocol.encode("frame", stream="s", seq=0, ts={}, arrays={"x": np.array(["a"], dtype=object)})
    with pytest.raises(ValueError):
        protocol.encode("frame", stream="s", seq=0, ts={}, meta={"blob": "x" * protocol.MAX_HEADER_BYTES})


def test_make_socket_options_and_bind_errors(ctx, tmp_path):
    sub = protocol.make_socket(ctx, zmq.SUB, "tcp://127.0.0.1:*", bind=True, hwm=3, max_message_bytes=1234)
    assert sub.getsockopt(zmq.LINGER) == 0
    assert sub.getsockopt(zmq.RCVHWM) == 3
    assert sub.getsockopt(zmq.MAXMSGSIZE) == 1234
    taken = sub.getsockopt_string(zmq.LAST_ENDPOINT)
    with pytest.raises(OSError, match="cannot bind"):
        protocol.make_socket(ctx, zmq.PUB, taken, bind=True)
    ipc = security.ipc_endpoint(security.private_dir(tmp_path / "ipc"), "test")  # ipc needs a 0700 folder
    ipc_pub = protocol.make_socket(ctx, zmq.PUB, ipc, bind=True)
    ipc_pub.close()


def _doc_example() -> str:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"<!-- subscriber-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/protocol.md lost its subscriber example"
    return match.group(1)


@pytest.mark.parametrize("with_keys", [True, False], ids=["run-keys", "insecure"])
def test_doc_subscriber_example_receives_heatmaps(ctx, tmp_path, with_keys):
    """The example works against a pipeline secured by default (the run's keys folder as its 3rd argument, the
    publisher a CURVE server as every avloc socket then is) and against an --insecure one."""
    code = _doc_example()
    assert "avloc" not in code and "pickle" not in code
    assert len(code.strip().splitlines()) <= 40
    script = tmp_path / "subscriber.py"
    script.write_text(code, encoding="utf-8")
    keys = security.make_run_keys(tmp_path / "run") if with_keys else None
    with security.environment({security.KEYS_ENV: str(keys)} if keys else {}):
        pub = protocol.make_socket(ctx, zmq.PUB, "tcp://127.0.0.1:*", bind=True, hwm=100)
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    count = 6
    proc = subprocess.Popen(
        [sys.executable, str(script), endpoint, str(count), *([str(keys)] if keys else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        rng = np.random.default_rng(3)
        seq = 0
        deadline = time.monotonic() + 60
        sent = []
        while proc.poll() is None and time.monotonic() < deadline:
            capture = protocol.now()
            if seq % 3 == 2:  # a suppressed heatmap: no array, a notice
                protocol.send(
                    pub,
                    "heatmap",
                    stream="cam0",
                    seq=seq,
                    ts={"capture": capture, "publish": capture},
                    meta={"peak": None, "confidence": 0.0, "notice": "no_audio"},
                )
            else:
                heat = rng.random((7, 7)).astype(np.float16)
                dtype_heat = heat if seq % 2 else (heat.astype(np.float32) * 255).round().astype(np.uint8)
                peak = [float(np.argmax(heat) % 7) / 6, float(np.argmax(heat) // 7) / 6]
                protocol.send(
                    pub,
                    "heatmap",
                    stream="cam0",
                    seq=seq,
                    ts={
                        "capture": capture,
                        "received": capture,
                        "infer_start": capture,
                        "infer_end": capture,
                        "publish": capture + 0.0123,
                    },
                    arrays={"heatmap": dtype_heat},
                    meta={"peak": peak, "confidence": 0.5},
                )
            # other kinds on the same socket must be skipped by the example
            protocol.send(pub, "heartbeat", stream="cam0", seq=seq, ts={"send": capture})
            sent.append(seq)
            seq += 1
            time.sleep(0.05)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == count
    for line in lines:
        seq = int(re.search(r"seq=(\d+)", line).group(1))
        if seq % 3 == 2:
            assert "notice=no_audio" in line
        else:
            assert "latency=12.3ms" in line and "conf=0.500" in line
            max_value = float(re.search(r"max=([\d.]+)", line).group(1))
            assert 0.0 < max_value <= 1.0


def test_decode_accepts_the_frames_encode_builds():
    """Loopback without a socket: what encode() hands to libzmq decodes to the same message."""
    arrays = {"spec": np.linspace(-1, 1, 24, dtype=np.float32).reshape(1, 4, 6), "eye": np.eye(3, dtype=bool)}
    msg = protocol.decode(protocol.encode("audio", stream="m", seq=5, ts={"window_end": 2.0}, arrays=arrays))
    for name, value in arrays.items():
        np.testing.assert_array_equal(msg.arrays[name], value)
