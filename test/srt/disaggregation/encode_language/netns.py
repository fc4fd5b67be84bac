"""Two "nodes" on one machine: network namespaces joined by a veth pair (needs root and iproute2).

Each namespace has only its veth address (10.77.0.1 / 10.77.0.2), loopback and a default route
over the veth, so upstream's local-IP discovery finds the veth address there, and nothing in one
namespace can reach the other through loopback. Peer processes join a namespace with ``run_in``
(``setns`` in the freshly forked child, before it opens any socket or thread), which keeps the
preloaded forkserver instead of a fresh ``ip netns exec python`` per peer.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import secrets
import subprocess
from typing import Iterator, Tuple

CLONE_NEWNET = 0x40000000
PREFIX = "el-"


@dataclasses.dataclass(frozen=True)
class Node:
    netns: str  # namespace name
    address: str  # its only routable address


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


def _prune_stale() -> None:
    """Delete namespaces a killed earlier run left behind (named after its dead pid)."""
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=30
    ).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX) :].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["ip", "netns", "delete", name], timeout=30)


@contextlib.contextmanager
def node_pair(subnet: str = "10.77.0") -> Iterator[Tuple[Node, Node]]:
    """Two namespaces named uniquely for this run (``el-<pid>-<hex>-a|b``), deleted on exit
    (their veth ends go with them)."""
    if os.geteuid() != 0:
        raise PermissionError("cross-node tests create network namespaces: run as root")
    _prune_stale()
    tag = f"{os.getpid()}-{secrets.token_hex(2)}"
    nodes = (
        Node(f"{PREFIX}{tag}-a", f"{subnet}.1"),
        Node(f"{PREFIX}{tag}-b", f"{subnet}.2"),
    )
    created = []
    try:
        for n in nodes:
            _ip("netns", "add", n.netns)
            created.append(n.netns)
        # Interface names live inside each namespace: they need not be unique on the host.
        a, b = nodes
        _ip(
            "link",
            "add",
            "el0",
            "netns",
            a.netns,
            "type",
            "veth",
            "peer",
            "name",
            "el0",
            "netns",
            b.netns,
        )
        for n in nodes:
            _ip("-n", n.netns, "addr", "add", f"{n.address}/24", "dev", "el0")
            _ip("-n", n.netns, "link", "set", "el0", "up")
            _ip("-n", n.netns, "link", "set", "lo", "up")
            _ip("-n", n.netns, "route", "add", "default", "dev", "el0")
        yield nodes
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "delete", name], timeout=30)


def add_address(node: Node, address: str) -> None:
    """Give ``node`` a further address on its veth, next to the one discovery finds (the primary
    one): a server bound to an address other than the one it advertises."""
    _ip("-n", node.netns, "addr", "add", f"{address}/24", "dev", "el0")


def enter(netns: str) -> None:
    """Move the calling thread (the only one of a freshly forked child) into ``netns``."""
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in(netns: str, target, *args) -> None:
    """Process entry point: join ``netns``, then run ``target(*args)``."""
    enter(netns)
    target(*args)
