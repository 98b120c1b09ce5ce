"""Network namespaces as stand-in hosts: a test gets N "hosts" on one private subnet, removed at the end.

Each host is an ``ip netns`` namespace with its loopback up and one veth whose peer sits on a bridge in a
"switch" namespace, so every host reaches every other one (10.211.0.1, .2, ...) and nothing else: the root
namespace (and the machine's network) is not on the bridge. Names carry this process's pid and a random
tag so parallel test runs never collide; everything is deleted in ``finally`` (deleting a namespace destroys its
veth end and the peer with it). Needs root and iproute2; ``skip_reason()`` says why not, for ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

SUBNET = "10.211.0"
IP = shutil.which("ip") or ("/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else None)


def skip_reason() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "network namespaces need root"
    if IP is None:
        return "iproute2 (ip) is not installed"
    return None


@dataclass(frozen=True)
class Host:
    name: str  # the namespace
    address: str  # its address on the shared subnet
    interface: str  # its veth (e.g. for GLOO_SOCKET_IFNAME)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace (``ip netns exec`` execs it: the pid is the command's)."""
        assert IP is not None
        return [IP, "netns", "exec", self.name, *argv]


def _ip(*args: str) -> None:
    assert IP is not None
    subprocess.run([IP, *args], check=True, capture_output=True, text=True, timeout=30)


def _kill_all(namespace: str) -> None:
    assert IP is not None
    pids = subprocess.run([IP, "netns", "pids", namespace], capture_output=True, text=True, timeout=30).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    """``count`` namespaces on one bridge, addresses ``10.211.0.1`` .. ``10.211.0.count``."""
    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
    switch = f"avsw{tag}"
    made: list[str] = []
    links: list[str] = []  # veth ends while in the root namespace (if a step fails before they are moved)
    try:
        _ip("netns", "add", switch)
        made.append(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        out = []
        for i in range(1, count + 1):
            name = f"avh{i}{tag}"
            _ip("netns", "add", name)
            made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
            # interface names are at most 15 characters; created in the root namespace, moved out at once
            host_end, switch_end = f"avh{i}{tag}"[:15], f"avs{i}{tag}"[:15]
            links += [host_end, switch_end]
            _ip("link", "add", host_end, "type", "veth", "peer", "name", switch_end)
            _ip("link", "set", host_end, "netns", name)
            _ip("link", "set", switch_end, "netns", switch)
            _ip("-n", switch, "link", "set", switch_end, "master", "br0")
            _ip("-n", switch, "link", "set", switch_end, "up")
            _ip("-n", name, "addr", "add", f"{SUBNET}.{i}/24", "dev", host_end)
            _ip("-n", name, "link", "set", host_end, "up")
            out.append(Host(name, f"{SUBNET}.{i}", host_end))
        yield out
    finally:
        for name in reversed(made):
            _kill_all(name)
            with contextlib.suppress(subprocess.SubprocessError):
                _ip("netns", "del", name)
        for link in links:  # normally gone with their namespace already
            with contextlib.suppress(subprocess.SubprocessError):
                _ip("link", "del", link)


def netns_exists(name: str) -> bool:
    assert IP is not None
    listing = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return any(line.split()[0] == name for line in listing.splitlines() if line.strip())
