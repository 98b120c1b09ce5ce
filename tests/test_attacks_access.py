"""The attack suite of issue 22, item 10 and the review of the default mode: who may bind where, private run and
ipc folders, keys, tokens and the viewer's headers (the message-level attacks, items 1-9, are tests/test_attacks.py).

Local processes and loopback only, every loop bounded in count and time. Each test failed on the code before the
fix it names (the message of each ``assert`` says what the attack did then).
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import zmq
from test_attacks import ctx  # noqa: F401 (a fixture: one zmq context per test)
from test_launcher import FAST

from avloc.core.errors import UserError
from avloc.stream.run.launcher import Launcher, free_tcp_endpoint
from avloc.stream.wire import protocol, security

# ------------------------------------------------------------------ 10. binds, ipc folders, tokens, headers, keys


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:0;0.0.0.0:5599",
        "tcp://0.0.0.0:5599",
        "tcp://127.evil.example:5599",
        "tcp://*:5599",
        "tcp://eth0:5599",
        "tcp://127.0.0.1",
    ],
)
def test_10_bind_checks_parse_the_address(endpoint):
    with pytest.raises(UserError):
        security.check_bind(endpoint, insecure=False)


def test_10_loopback_binds_pass_and_the_source_syntax_is_refused_even_with_keys(tmp_path):
    for ok in ("tcp://127.0.0.1:5599", "tcp://127.0.0.2:5599", "tcp://localhost:0", "tcp://[::1]:5599"):
        security.check_bind(ok, insecure=False)
    keys = security.make_run_keys(tmp_path / "run")
    with pytest.raises(UserError, match="source"):
        security.check_bind("tcp://127.0.0.1:0;0.0.0.0:5599", security.load_keys(keys), insecure=False)


def test_10_ipc_folder_is_checked_at_every_ancestor(tmp_path):
    """A 0700 folder inside a folder other users can write to (no sticky bit) can be renamed away by them."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    mine = security.private_dir(shared / "run")
    with pytest.raises(UserError, match="rename"):
        security.check_ipc(f"ipc://{mine}/heatmaps.sock", insecure=False)
    shared.chmod(0o1777)  # sticky, like /tmp: others cannot rename what is not theirs
    security.check_ipc(f"ipc://{mine}/heatmaps.sock", insecure=False)
    shared.chmod(0o755)
    security.check_ipc(f"ipc://{mine}/heatmaps.sock", insecure=False)


def test_10_keys_force_drops_old_authorized_keys_and_readable_secrets_are_refused(tmp_path):
    from avloc.stream.wire.security import make_keys

    out = tmp_path / "keys"
    make_keys(out)
    (out / "authorized" / "third_party.key").write_text((out / "client.key").read_text())
    make_keys(out, force=True)
    assert sorted(p.name for p in (out / "authorized").iterdir()) == ["client.key"]
    (out / "client.key_secret").chmod(0o644)
    with pytest.raises(UserError, match="chmod 600"):
        security.load_keys(out)
    (out / "client.key_secret").chmod(0o600)
    security.load_keys(out)
    assert stat.S_IMODE((out / "server.key_secret").stat().st_mode) == 0o600


def _http(port: int, host: bytes, target: bytes = b"/", extra: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.2", port), timeout=20) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_10_viewer_on_127_0_0_2_serves_its_own_address_and_bad_headers_are_400(tmp_path):
    """A 127.0.0.2 bind refused every request (its Host was not a 'loopback name'); non-UTF-8 Host or token
    headers gave a 500 with a traceback; a token on the command line was in `ps`."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "AVLOC_VIEW_TOKEN"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "avloc.stream.clients.view",
            "--frames",
            free_tcp_endpoint(),
            "--heatmaps",
            free_tcp_endpoint(),
            "--http",
            f"127.0.0.2:{port}",
            "--token-file",
            str(token_file),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stderr.readline()
        assert "serving" in line, line
        assert "s3cret" not in " ".join(psutil.Process(proc.pid).cmdline())
        ok = _http(port, f"127.0.0.2:{port}".encode(), b"/?token=s3cret")
        assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
        assert _http(port, b"evil.example", b"/?token=s3cret").startswith(b"HTTP/1.1 403")
        bad_host = _http(port, b"\xff\xfe127.0.0.2", b"/?token=s3cret")
        assert bad_host.startswith(b"HTTP/1.1 400"), bad_host[:200]
        bad_token = _http(port, f"127.0.0.2:{port}".encode(), b"/", b"X-Avloc-Token: \xff\xfe\r\n")
        assert bad_token.startswith(b"HTTP/1.1 400"), bad_token[:200]
        wrong = _http(port, f"127.0.0.2:{port}".encode(), b"/?token=%ff%fe")
        assert wrong.startswith(b"HTTP/1.1 403"), wrong[:200]
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        err = proc.stderr.read()
    assert "Traceback" not in err and " 500 " not in err, err[-2000:]


def test_10_secure_by_default_run_keys_are_private(tmp_path):
    run = tmp_path / "run"
    keys = security.make_run_keys(run)
    assert stat.S_IMODE(run.stat().st_mode) == 0o700 and stat.S_IMODE(keys.stat().st_mode) == 0o700
    for name in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600
    launcher = Launcher([], run, config=FAST, heartbeat_endpoint=free_tcp_endpoint(), run_keys=True)
    assert launcher._security_env[security.KEYS_ENV] == str(keys.resolve())
    insecure = Launcher(
        [], tmp_path / "r2", config=FAST, heartbeat_endpoint=free_tcp_endpoint(), run_keys=True, insecure=True
    )
    assert security.KEYS_ENV not in insecure._security_env and not (tmp_path / "r2" / "keys").exists()


def test_10_a_plain_subscriber_gets_nothing_from_a_run_with_default_keys(tmp_path, ctx):  # noqa: F811 (fixture)
    """Before: any local user could watch frames, spectrograms and file paths of a default (loopback) run."""
    keys = security.make_run_keys(tmp_path / "run")
    endpoint = free_tcp_endpoint()
    with security.environment({security.KEYS_ENV: str(keys)}):
        pub = protocol.make_socket(ctx, zmq.PUB, endpoint, bind=True, hwm=100)
        member = protocol.make_socket(ctx, zmq.SUB, endpoint, bind=False, hwm=100)
    stranger = ctx.socket(zmq.SUB)
    stranger.setsockopt(zmq.SUBSCRIBE, b"")
    stranger.connect(endpoint)
    try:
        got_member = False
        end = time.monotonic() + 5
        while time.monotonic() < end and not got_member:
            protocol.send(pub, "frame", stream="cam0", seq=0, ts={}, arrays={"frame": np.zeros((4, 4, 3), np.uint8)})
            got_member = protocol.recv(member, 50) is not None
        assert got_member
        assert not stranger.poll(500)
    finally:
        for sock in (pub, member, stranger):
            sock.close(0)


# ------------------------------------------------- review of the default mode (notes/sec-review.md)


def _as_another_user(monkeypatch) -> None:
    """What this user made looks like another user's: the ownership checks see a foreign uid (any test user)."""
    real = os.geteuid()
    monkeypatch.setattr(security.os, "geteuid", lambda: real + 1)


def test_10_a_run_folder_another_user_made_first_is_refused(tmp_path, monkeypatch):
    """Before: a run folder another user had made (run names are predictable: runs/replay-<time>) was chmodded
    and used (as root it worked), so they could move the keys away, put theirs in, or plant links for the logs."""
    theirs = tmp_path / "replay-20261207-105200"
    theirs.mkdir(mode=0o777)
    _as_another_user(monkeypatch)
    with pytest.raises(UserError, match=r"belongs to uid \d+, not to this user"):
        security.make_run_keys(theirs)
    assert not (theirs / "keys").exists()


def test_10_a_link_at_the_run_folder_path_is_refused(tmp_path):
    """Before: a link at the run folder's path was followed (keys and logs written wherever it pointed)."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "run").symlink_to(target)
    with pytest.raises(UserError, match="a link, or not a folder"):
        security.private_dir(tmp_path / "run")
    assert not (target / "keys").exists()


def test_10_run_folder_is_private_from_the_start_under_umask_000(tmp_path, monkeypatch):
    """Before: mkdir then chmod: under umask 000 the run folder was 0777 until the chmod, long enough for another
    user to create files (or links) in it. ``os.mkdir`` itself is recorded here: its mode must be 0700."""
    modes = []
    real_mkdir = os.mkdir

    def spy(path, mode=0o777, *args, **kwargs):
        modes.append((str(path), mode))
        return real_mkdir(path, mode, *args, **kwargs)

    old = os.umask(0)
    try:
        monkeypatch.setattr(security.os, "mkdir", spy)
        run = security.private_dir(tmp_path / "run")
    finally:
        os.umask(old)
    assert [m for p, m in modes if p == str(run)] == [0o700] and stat.S_IMODE(run.stat().st_mode) == 0o700


def test_10_keys_another_user_owns_are_refused(tmp_path, monkeypatch):
    """Before: only the mode was checked, so another user's 0600 keys moved in where ours were passed (and root
    reads them): they would know every secret key of the run."""
    from avloc.stream.wire.security import make_keys

    make_keys(tmp_path / "keys")
    security.load_keys(tmp_path / "keys")
    _as_another_user(monkeypatch)
    with pytest.raises(UserError, match=r"belongs to uid \d+, not to this user"):
        security.load_keys(tmp_path / "keys")


def test_10_insecure_says_so(tmp_path, caplog):
    """Before: --insecure started a readable, injectable pipeline without a word."""
    with caplog.at_level("WARNING", logger="avloc.stream.run.launcher"):
        Launcher([], tmp_path / "r", config=FAST, heartbeat_endpoint=free_tcp_endpoint(), run_keys=True, insecure=True)
    assert any("--insecure" in r.getMessage() and "any local process" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="avloc.stream.run.launcher"):
        Launcher([], tmp_path / "s", config=FAST, heartbeat_endpoint=free_tcp_endpoint(), run_keys=True)
    assert not any("--insecure" in r.getMessage() for r in caplog.records)


def test_10_a_runs_own_viewer_needs_a_token_unless_insecure(tmp_path, monkeypatch, capsys):
    """Before: `avloc replay/run --view` (loopback, no token) served the frames and heatmaps of a keyed run to
    any local user over HTTP (measured: 78 WebSocket messages, 212 kB in 5 s), around the run's keys."""
    from avloc.stream.clients.view import TOKEN_ENV, check_http
    from avloc.stream.run.args import run_view_token

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    run = security.private_dir(tmp_path / "run")
    token = run_view_token(run, "127.0.0.1:8080", None, insecure=False)
    assert token and len(token) >= 24
    saved = run / "view-token"
    assert saved.read_text().strip() == token and stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert f"http://127.0.0.1:8080/?token={token}" in capsys.readouterr().out
    assert check_http("127.0.0.1:8080", token)[2] == token  # what the viewer then requires on every request
    assert run_view_token(run, "[::1]:8080", None, insecure=True) is None  # --insecure: as before
    assert run_view_token(run, "127.0.0.1:8080", "mine", insecure=False) == "mine"  # --view-token-file
    monkeypatch.setenv(TOKEN_ENV, "env")
    assert run_view_token(run, "127.0.0.1:8080", None, insecure=False) == "env"
