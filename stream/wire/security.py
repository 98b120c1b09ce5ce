"""Who may talk to whom: the per-run control token (HMAC tags) and CURVE keys (ZeroMQ ironhouse).

Two independent layers (docs/protocol.md, "Security"):

- **Run token.** The launcher draws a random token per run and hands it to its children in the environment
  (``AVLOC_RUN_TOKEN``; never on the command line, which every local user can read in ``/proc``). Heartbeats
  and ``control`` messages carry ``meta.auth``: an HMAC-SHA256 tag, under the token, of the message's kind,
  stream, seq, timestamps and meta. The token itself never goes on the wire, so a subscriber that reads a tagged
  ``end`` cannot tag a message of its own; the launcher (and the inference worker, for control messages on
  the frame sockets) counts and ignores a message whose tag is missing or wrong.
- **CURVE.** With ``--keys DIR`` (made by ``avloc keys --out DIR``) every socket encrypts and authenticates:
  binding sockets are CURVE servers with the server keypair, connecting sockets CURVE clients with the
  client keypair, and each binding process runs a ZAP authenticator (pyzmq's ``ThreadAuthenticator``) that
  admits only the client public keys in ``DIR/authorized``. A process without the client secret key gets
  no connection at all: it can neither read nor inject.

This module imports only zmq and the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_TOKEN_ENV = "AVLOC_RUN_TOKEN"
KEYS_ENV = "AVLOC_KEYS"
AUTH_FIELD = "auth"  # meta key of the HMAC tag
SENDER_FIELD = "sender"  # meta key: which process signed (a random id per process), for per-sender order
# A tagged message is fresh when its ts.send is within TAG_WINDOW_S of the receiver's clock (one host: one
# monotonic clock); a receiver remembers every tag it accepted for twice that, so a captured message sent
# again is refused as "replayed" while it is fresh and as "stale" after.
TAG_WINDOW_S = 30.0
MAX_REMEMBERED_TAGS = 100_000  # bounded memory whatever the senders do (valid tags only reach it)
_SENDER = secrets.token_hex(8)  # default sender id: this process


def new_run_token() -> str:
    """A fresh random token for one run (hex, 256 bits)."""
    return secrets.token_hex(32)


def run_token() -> str | None:
    """The token this process was started with (None: started by hand, messages go untagged)."""
    return os.environ.get(RUN_TOKEN_ENV) or None


def _canonical(kind: str, stream: str, seq: int, ts: dict[str, float], meta: dict[str, Any]) -> bytes:
    # JSON with sorted keys and no spaces: the receiver rebuilds the same bytes from the decoded header
    # (Python's float repr round-trips exactly through JSON).
    body = {k: v for k, v in meta.items() if k != AUTH_FIELD}
    return json.dumps([kind, stream, seq, ts, body], sort_keys=True, separators=(",", ":"), allow_nan=False).encode(
        "utf-8"
    )


def sign(token: str, kind: str, stream: str, seq: int, ts: dict[str, float], meta: dict[str, Any]) -> str:
    """The HMAC-SHA256 tag (hex) of one message under ``token``."""
    return hmac.new(token.encode("utf-8"), _canonical(kind, stream, seq, ts, meta), hashlib.sha256).hexdigest()


def new_sender_id() -> str:
    """An id for one sequence of tagged messages (one ``seq`` counter): receivers keep its order."""
    return secrets.token_hex(8)


def signed_meta(
    token: str | None,
    kind: str,
    stream: str,
    seq: int,
    ts: dict[str, float],
    meta: dict[str, Any],
    sender: str | None = None,
) -> dict[str, Any]:
    """``meta`` plus its sender id and tag (unchanged when there is no token).

    ``sender`` names the ``seq`` counter the message belongs to (``new_sender_id``; default: one per process). Two
    counters of one process (the inference worker's start-up heartbeats, then its own) must not share one: a
    receiver refuses a message older than the last of its sender.
    """
    if not token:
        return meta
    ts = {str(k): float(v) for k, v in ts.items()}  # as protocol.encode puts them on the wire
    meta = {**meta, SENDER_FIELD: sender or _SENDER}
    return {**meta, AUTH_FIELD: sign(token, kind, stream, seq, ts, meta)}


def verify(token: str, message: Any) -> bool:
    """Whether a decoded ``protocol.Message`` carries a valid tag under ``token``."""
    tag = message.meta.get(AUTH_FIELD)
    if not isinstance(tag, str):
        return False
    try:
        expected = sign(token, message.kind, message.stream, message.seq, message.ts, message.meta)
    except (TypeError, ValueError):  # meta that cannot be serialized again: not ours
        return False
    return hmac.compare_digest(tag, expected)


class Verifier:
    """Checks tags like ``verify`` and also refuses a message that was already accepted, one older than the
    last accepted from its sender (``meta.sender``, ``seq``), and one whose ``ts.send`` is not within
    ``window_s`` of ``clock()``: a captured heartbeat, ``end`` or assignment table cannot be sent again.

    ``check`` returns None for a message to act on, else the reason to count (``unauthenticated``,
    ``replayed``, ``stale``).
    """

    def __init__(self, token: str, *, window_s: float = TAG_WINDOW_S, clock: Any = None) -> None:
        from avloc.stream.wire import protocol  # why: this module imports only zmq and the standard library

        self.token = token
        self.window_s = window_s
        self._clock = clock or protocol.now
        self._seen: dict[str, float] = {}  # accepted tag -> when (insertion order = time order)
        self._last_seq: dict[tuple[str, str], int] = {}  # (stream, sender) -> newest accepted seq

    def check(self, message: Any) -> str | None:
        if not verify(self.token, message):
            return "unauthenticated"
        now = self._clock()
        sent = message.ts.get("send")
        if not isinstance(sent, float) or abs(now - sent) > self.window_s:
            return "stale"
        tag = message.meta[AUTH_FIELD]
        sender = message.meta.get(SENDER_FIELD)
        key = (message.stream, sender if isinstance(sender, str) else "")
        if tag in self._seen or message.seq < self._last_seq.get(key, -1):
            return "replayed"
        self._seen[tag] = now
        self._last_seq[key] = message.seq
        self._forget(now)
        return None

    def _forget(self, now: float) -> None:
        # tags older than two windows can only come back as "stale"; the senders' seqs stay (a few per process)
        while self._seen:
            tag, when = next(iter(self._seen.items()))
            if now - when <= 2 * self.window_s and len(self._seen) <= MAX_REMEMBERED_TAGS:
                break
            del self._seen[tag]
        while len(self._last_seq) > MAX_REMEMBERED_TAGS // 100:
            del self._last_seq[next(iter(self._last_seq))]


# ---------------------------------------------------------------------------------------------- CURVE

INSECURE_ENV = "AVLOC_INSECURE"  # "1": allow binding a non-loopback endpoint without keys (--insecure)


@dataclass(frozen=True)
class CurveKeys:
    """The keypairs of an authenticated pipeline (``avloc keys --out DIR``)."""

    directory: Path
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @property
    def authorized(self) -> Path:
        return self.directory / "authorized"


def load_keys(directory: str | Path) -> CurveKeys:
    """Read ``DIR/server.key_secret``, ``DIR/client.key_secret`` (and ``DIR/authorized``); UserError if not there."""
    import zmq.auth  # why: zmq's certificate helpers, only with CURVE keys

    from avloc.core.errors import UserError  # why: this module imports only zmq and the standard library

    directory = Path(directory)
    pairs = []
    for name in ("server", "client"):
        path = directory / f"{name}.key_secret"
        if not path.is_file():
            raise UserError(f"--keys {directory}: no {path.name} (make the keys with `avloc keys --out {directory}`)")
        _check_own(path)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:  # a secret other local users can read is no secret: they could join the pipeline
            raise UserError(f"{path}: mode {mode:04o} lets other users read this secret key; `chmod 600 {path}`")
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: not a CURVE secret key file ({err})") from None
        if secret is None:
            raise UserError(f"{path}: holds no secret key")
        pairs.append((public, secret))
    if not (directory / "authorized").is_dir():
        raise UserError(f"--keys {directory}: no authorized/ folder of client public keys")
    _check_own(directory)
    _check_own(directory / "authorized")  # whoever can write there admits their own client key
    return CurveKeys(directory, pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1])


def _check_own(path: Path) -> None:
    """UserError unless ``path`` belongs to this user. The mode check alone does not do: another user's 0600 key
    (moved in where ours were, e.g. in a run folder they made) passes it, and root reads it anyway."""
    from avloc.core.errors import UserError  # why: this module imports only zmq and the standard library

    owner = path.stat().st_uid
    if owner != os.geteuid():
        raise UserError(
            f"{path}: belongs to uid {owner}, not to this user (uid {os.geteuid()}); keys must be your own "
            f"(another user could know the secret keys or admit their own), `chown` them or make new ones"
        )


def configured_keys() -> CurveKeys | None:
    """The keys this process was told to use (``AVLOC_KEYS``, set by the launcher for ``--keys``)."""
    directory = os.environ.get(KEYS_ENV)
    return load_keys(directory) if directory else None


_authenticators: dict[int, Any] = {}  # id(context) -> its ThreadAuthenticator (one per context)


def secure_socket(sock: Any, *, bind: bool, keys: CurveKeys | None = None) -> None:
    """Make ``sock`` a CURVE server (binding) or client (connecting) when keys are configured.

    A binding socket's context gets a ZAP authenticator (started once) admitting only the client public keys in
    ``DIR/authorized``: ironhouse, every connection is encrypted and both ends are authenticated.
    """
    keys = keys or configured_keys()
    if keys is None:
        return
    if bind:
        _ensure_authenticator(sock.context, keys)
        sock.curve_secretkey = keys.server_secret
        sock.curve_publickey = keys.server_public
        sock.curve_server = True
    else:
        sock.curve_secretkey = keys.client_secret
        sock.curve_publickey = keys.client_public
        sock.curve_serverkey = keys.server_public


def _ensure_authenticator(ctx: Any, keys: CurveKeys) -> None:
    from zmq.auth.thread import ThreadAuthenticator  # why: starts a thread per context, only with CURVE keys

    if id(ctx) in _authenticators:
        return
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized))
    _authenticators[id(ctx)] = auth


def stop_authenticators() -> None:
    """Stop the ZAP threads (before a context is terminated)."""
    while _authenticators:
        _, auth = _authenticators.popitem()
        auth.stop()


def parse_tcp(endpoint: str) -> tuple[str, str]:
    """``tcp://HOST:PORT`` -> (host, port) with the brackets of an IPv6 host removed; UserError for anything
    else, including libzmq's ``tcp://SOURCE;HOST:PORT`` form (the part after ``;`` is what gets bound, so a check
    of the text before it would pass ``tcp://127.0.0.1:0;0.0.0.0:5599``)."""
    from avloc.core.errors import UserError  # why: this module imports only zmq and the standard library

    rest = endpoint[len("tcp://") :] if endpoint.startswith("tcp://") else None
    if rest is None or ";" in rest or "/" in rest or any(c.isspace() for c in rest):
        raise UserError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT (no source address, no spaces)")
    host, sep, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port == "*" or (port.isdigit() and int(port) <= 65535)):
        raise UserError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT with PORT 0-65535 or *")
    return host, port


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (any of 127.0.0.0/8, ::1); a name or ``*`` may be any interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(value: str, what: str) -> str:
    """``value`` if it is a ZeroMQ endpoint this pipeline can use (tcp, ipc, inproc), else UserError naming ``what``."""
    from avloc.core.errors import UserError  # why: this module imports only zmq and the standard library

    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise UserError(f"{what} endpoint {value!r}: expected tcp://HOST:PORT or ipc:///path")
    return value


def check_bind(endpoint: str, keys: CurveKeys | None = None, insecure: bool | None = None) -> None:
    """Refuse to bind a tcp endpoint other hosts can reach (not loopback) unless CURVE keys are configured or
    ``AVLOC_INSECURE=1``, and an ipc:// endpoint outside a folder only this user can enter (``check_ipc``)."""
    from avloc.core.errors import UserError  # why: this module imports only zmq and the standard library

    insecure = os.environ.get(INSECURE_ENV) == "1" if insecure is None else insecure
    if endpoint.startswith("ipc://"):
        check_ipc(endpoint, insecure)
        return
    if not endpoint.startswith("tcp://"):
        return  # inproc://: inside this process
    host, _ = parse_tcp(endpoint)  # also with keys: the source;bind form is never what a user meant
    if (keys or configured_keys()) is not None or insecure:
        return
    if not is_loopback(host):
        raise UserError(
            f"endpoint {endpoint}: binding a non-loopback address without keys exposes the pipeline "
            "to the network; make keys (`avloc keys --out DIR`, then --keys DIR) or pass --insecure"
        )


def check_ipc(endpoint: str, insecure: bool | None = None) -> None:
    """Refuse an ipc:// endpoint (bound or connected) whose folder is not this user's alone.

    A unix socket is guarded by its folder: in one that others can write to (``/tmp``), another user can put a
    socket of their own at the path before the pipeline binds it, and every process connecting then talks to
    them (CURVE keys or not). Abstract sockets (``ipc://@name``) have no permissions at all. ``--insecure``
    (``AVLOC_INSECURE=1``) allows them anyway.
    """
    from avloc.core.errors import UserError  # why: this module imports only zmq and the standard library

    insecure = os.environ.get(INSECURE_ENV) == "1" if insecure is None else insecure
    if insecure or not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://") :]
    hint = "use a folder of mode 0700 (`mkdir -m 700 DIR`; avloc makes one with security.ipc_run_dir()) or --insecure"
    if path.startswith("@"):
        raise UserError(
            f"endpoint {endpoint}: an abstract unix socket has no permissions, any local user can use it; {hint}"
        )
    folder = Path(os.path.abspath(path)).parent
    try:
        st = folder.stat()
    except OSError as err:
        raise UserError(f"endpoint {endpoint}: folder {folder} cannot be used ({err.strerror}); {hint}") from None
    if st.st_uid != os.geteuid():
        raise UserError(f"endpoint {endpoint}: folder {folder} belongs to uid {st.st_uid}, not to this user; {hint}")
    if st.st_mode & 0o077:
        raise UserError(
            f"endpoint {endpoint}: folder {folder} (mode {stat.S_IMODE(st.st_mode):04o}) is open to other users; {hint}"
        )
    # Every folder above it too: in a parent other users can write to (and without the sticky bit, which keeps
    # them from renaming what is not theirs), another user can move this folder away and put their own in its
    # place. With every ancestor this user's or root's, the path stays ours, also for libzmq's own reconnects.
    for ancestor in folder.parents:
        try:
            a = ancestor.lstat()
        except OSError as err:
            raise UserError(f"endpoint {endpoint}: folder {ancestor} cannot be used ({err.strerror}); {hint}") from None
        if stat.S_ISLNK(a.st_mode) or a.st_uid not in (0, os.geteuid()):
            raise UserError(
                f"endpoint {endpoint}: folder {ancestor} above it belongs to uid {a.st_uid} (or is a link), "
                f"who could replace {folder}; {hint}"
            )
        if a.st_mode & 0o022 and not a.st_mode & stat.S_ISVTX:
            raise UserError(
                f"endpoint {endpoint}: folder {ancestor} above it (mode {stat.S_IMODE(a.st_mode):04o}) lets other "
                f"users rename {folder} away and put their own there; {hint}"
            )


def make_keys(out: Path, force: bool = False) -> dict[str, Path]:
    """Create the server and client keypairs in ``out``; returns their secret-key paths."""
    import zmq.auth  # why: zmq's certificate helpers, only when keys are made

    from avloc.core.errors import UserError  # why: this module imports only zmq and the standard library

    if (out / "server.key_secret").exists() and not force:
        raise UserError(f"--out {out}: already holds keys (pass --force to replace them)")
    private_dir(out)
    authorized = private_dir(out / "authorized")
    # new keys replace the old ones everywhere: a client key authorized before (a third party's too) would
    # otherwise still be admitted by every pipeline using this folder
    for old in authorized.iterdir():
        if old.is_file() or old.is_symlink():
            old.unlink()
    paths = {}
    for name in ("server", "client"):
        public, secret = zmq.auth.create_certificates(out, name)
        Path(secret).chmod(0o600)
        paths[name] = Path(secret)
        if name == "client":
            shutil.copy(public, authorized / "client.key")
    load_keys(out)  # what the pipeline will read back
    return paths


def make_run_keys(run_dir: str | Path) -> Path:
    """Fresh keys for one run in ``RUN_DIR/keys`` (the run folder made 0700 first: its logs name the sources):
    what ``avloc run/replay/demo`` use unless ``--keys`` or ``--insecure`` is given. Returns the keys folder."""
    run_dir = private_dir(run_dir)
    folder = run_dir / "keys"
    make_keys(folder, force=True)
    return folder


def ipc_run_dir(prefix: str = "avloc-") -> Path:
    """A fresh folder of mode 0700 for one run's ipc:// sockets, in ``$XDG_RUNTIME_DIR`` (per user, itself 0700)
    when it is set and this user's, else in the system's temporary folder."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        try:
            st = os.stat(base)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077 or not os.access(base, os.W_OK):
                base = None
        except OSError:
            base = None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))  # mkdtemp makes it 0700


def ipc_endpoint(folder: str | Path, name: str) -> str:
    """``ipc://FOLDER/NAME.sock`` (FOLDER from ``ipc_run_dir``)."""
    return f"ipc://{Path(folder) / name}.sock"


def private_dir(path: str | Path) -> Path:
    """A folder only this user can enter (0700), for run folders, keys and ipc:// endpoints.

    Made 0700 in one step (``os.mkdir``'s mode can only lose bits to the umask: under ``umask 000`` a plain mkdir
    then chmod leaves it open to everyone in between). A folder already there must be this user's and not a link:
    another user who made it first (a run folder's name is predictable) keeps the right to chmod it back, and to
    move our keys away and put theirs in their place, or to plant links where our logs will be written.
    UserError (one line) otherwise.
    """
    from avloc.core.errors import UserError  # why: this module imports only zmq and the standard library

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:  # O_NOFOLLOW + fstat/fchmod: what is checked is what gets chmodded (no swap in between)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as err:
        raise UserError(f"{path}: cannot be a private folder (a link, or not a folder? {err.strerror})") from None
    try:
        owner = os.fstat(fd).st_uid
        if owner != os.geteuid():
            raise UserError(
                f"{path}: belongs to uid {owner}, not to this user (uid {os.geteuid()}), who could replace what "
                "avloc writes there (keys, logs); use a folder of your own"
            )
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the block only (the launcher's own sockets, without leaking the
    settings into whatever else runs in its process)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
