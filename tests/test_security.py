"""CURVE (ironhouse) on every socket when keys are configured; non-loopback binds refused without keys."""

from __future__ import annotations

import stat
import time

import pytest
import zmq

from avloc.core.errors import UserError
from avloc.stream.run.launcher import Launcher, ProcessSpec, free_tcp_endpoint
from avloc.stream.wire import protocol, security
from avloc.stream.wire.security import make_keys


@pytest.fixture()
def keys(tmp_path, monkeypatch):
    make_keys(tmp_path / "keys")
    monkeypatch.setenv(security.KEYS_ENV, str(tmp_path / "keys"))
    ctx = zmq.Context()
    yield ctx
    security.stop_authenticators()
    ctx.destroy(linger=0)


def _receive_all(sock: zmq.Socket, seconds: float) -> list[protocol.Message]:
    got, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        msg = protocol.recv(sock, 100)
        if msg is not None:
            got.append(msg)
    return got


def _publish(pub: zmq.Socket, n: int = 20) -> None:
    for i in range(n):
        protocol.send(pub, "heartbeat", stream="s", seq=i, ts={"send": protocol.now()})
        time.sleep(0.02)


def test_keys_command_writes_private_files(tmp_path):
    from avloc.cli import main

    assert main(["keys", "--out", str(tmp_path / "k")]) == 0
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "k" / "client.key_secret").stat().st_mode) == 0o600
    loaded = security.load_keys(tmp_path / "k")
    assert (tmp_path / "k" / "authorized" / "client.key").is_file() and loaded.server_public != loaded.client_public
    with pytest.raises(UserError, match="already holds keys"):
        make_keys(tmp_path / "k")
    with pytest.raises(UserError, match="no server.key_secret"):
        security.load_keys(tmp_path)


def test_client_without_the_right_key_receives_nothing(keys, tmp_path):
    ctx, endpoint = keys, free_tcp_endpoint()
    pub = protocol.make_socket(ctx, zmq.PUB, endpoint, bind=True, hwm=100)
    good = protocol.make_socket(ctx, zmq.SUB, endpoint, bind=False, hwm=100)
    plain = ctx.socket(zmq.SUB)  # no CURVE at all
    plain.setsockopt(zmq.SUBSCRIBE, b"")
    plain.connect(endpoint)
    make_keys(tmp_path / "other")  # right server key, but a client key the server never authorized
    other = security.load_keys(tmp_path / "other")
    stranger = ctx.socket(zmq.SUB)
    stranger.setsockopt(zmq.SUBSCRIBE, b"")
    stranger.curve_secretkey, stranger.curve_publickey = other.client_secret, other.client_public
    stranger.curve_serverkey = security.load_keys(tmp_path / "keys").server_public
    stranger.connect(endpoint)
    time.sleep(0.5)
    _publish(pub)
    assert len(_receive_all(good, 1.0)) >= 10
    for sock in (plain, stranger):
        assert not sock.poll(500), "a client without the right key received data"
        sock.close(0)
    good.close(0)
    pub.close(0)


def test_client_without_the_right_key_cannot_inject(keys, tmp_path):
    ctx, endpoint = keys, free_tcp_endpoint()
    sub = protocol.make_socket(ctx, zmq.SUB, endpoint, bind=True, hwm=100)  # like the launcher's heartbeats
    intruder = ctx.socket(zmq.PUB)
    intruder.connect(endpoint)
    friend = protocol.make_socket(ctx, zmq.PUB, endpoint, bind=False, hwm=100)
    time.sleep(0.5)
    _publish(intruder)
    assert _receive_all(sub, 1.0) == []
    _publish(friend)
    assert len(_receive_all(sub, 1.0)) >= 10
    for sock in (intruder, friend, sub):
        sock.close(0)


def test_non_loopback_bind_is_refused_without_keys(tmp_path, monkeypatch):
    monkeypatch.delenv(security.KEYS_ENV, raising=False)
    monkeypatch.delenv(security.INSECURE_ENV, raising=False)
    with pytest.raises(UserError, match="non-loopback .*--insecure"):
        security.check_bind("tcp://0.0.0.0:5550")
    security.check_bind("tcp://127.0.0.1:5550")
    security.check_bind("tcp://0.0.0.0:5550", insecure=True)
    spec = ProcessSpec("camera", "avloc.stream.capture.camera", ["--endpoint", "tcp://0.0.0.0:5550"])
    with pytest.raises(UserError, match="tcp://0.0.0.0:5550"):
        Launcher([spec], tmp_path / "run", heartbeat_endpoint=free_tcp_endpoint())
    Launcher([spec], tmp_path / "run", heartbeat_endpoint=free_tcp_endpoint(), insecure=True)
    ctx = zmq.Context()
    try:
        with pytest.raises(UserError, match="non-loopback"):
            protocol.make_socket(ctx, zmq.PUB, "tcp://0.0.0.0:5550", bind=True)
    finally:
        ctx.destroy(linger=0)
    assert stat.S_IMODE(security.private_dir(tmp_path / "sock").stat().st_mode) == 0o700


def test_ipc_endpoints_need_a_folder_only_this_user_can_enter(tmp_path, monkeypatch):
    """ipc:// sockets live in a 0700 run folder (under $XDG_RUNTIME_DIR when usable); one in a folder others can
    enter, or that someone else owns, is refused with one line, when binding and when connecting."""
    import os

    monkeypatch.delenv(security.INSECURE_ENV, raising=False)
    runtime = security.private_dir(tmp_path / "xdg")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    folder = security.ipc_run_dir()
    assert folder.parent == runtime and stat.S_IMODE(folder.stat().st_mode) == 0o700
    runtime.chmod(0o755)  # a runtime folder open to others is not used: the system temp folder instead
    other = security.ipc_run_dir()
    assert other.parent != runtime and stat.S_IMODE(other.stat().st_mode) == 0o700
    other.rmdir()

    ctx = zmq.Context()
    try:
        endpoint = security.ipc_endpoint(folder, "frames")
        pub = protocol.make_socket(ctx, zmq.PUB, endpoint, bind=True, hwm=10)
        sub = protocol.make_socket(ctx, zmq.SUB, endpoint, bind=False, hwm=10)
        time.sleep(0.3)
        protocol.send(pub, "frame", stream="cam0", seq=0, ts={"capture": 1.0})
        assert protocol.recv(sub, timeout_ms=5000) is not None  # the private folder works end to end
        for s in (pub, sub):
            s.close(0)

        shared = tmp_path / "shared"
        shared.mkdir(mode=0o700)
        for mode in (0o770, 0o707, 0o1777):
            shared.chmod(mode)
            for bind in (True, False):
                with pytest.raises(UserError, match=f"{shared}.*open to other users") as err:
                    protocol.make_socket(ctx, zmq.PUB if bind else zmq.SUB, f"ipc://{shared}/x.sock", bind=bind)
                assert "\n" not in str(err.value)
        with pytest.raises(UserError, match="abstract unix socket"):
            security.check_bind("ipc://@avloc-frames")
        with pytest.raises(UserError, match="cannot be used"):
            security.check_bind(f"ipc://{tmp_path}/missing/x.sock")
        if os.geteuid() == 0:  # root can hand a folder to another uid and check the owner test
            theirs = tmp_path / "theirs"
            theirs.mkdir(mode=0o700)
            os.chown(theirs, 12345, 12345)
            with pytest.raises(UserError, match="belongs to uid 12345"):
                security.check_bind(f"ipc://{theirs}/x.sock")
        # --insecure lets a shared folder through, as it does a non-loopback address
        security.check_bind(f"ipc://{shared}/x.sock", insecure=True)
        monkeypatch.setenv(security.INSECURE_ENV, "1")
        protocol.make_socket(ctx, zmq.PUB, f"ipc://{shared}/x.sock", bind=True).close(0)
    finally:
        ctx.destroy(linger=0)
