"""Fixtures for the encode_language transport tests.

The encode side runs in real separate processes (``el_peer.peer_main``) started from a
multiprocessing *forkserver* that preloads the package once: importing ``sglang`` costs ~15 s per
process on the CPU test machine, so each peer is forked from that preloaded server instead of
being spawned from scratch. Peers talk to the in-test language managers over Mooncake TCP on
loopback; the tests drive them over a pipe.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import el_helpers  # noqa: E402,F401
from el_helpers import (  # noqa: E402
    accounting_ok,
    assert_same,
    make_payload,
    wait_until,
)

from sglang.srt.disaggregation.base.conn import KVPoll  # noqa: E402
from sglang.srt.disaggregation.encode_language.buffers import (  # noqa: E402
    MultimodalBufferConfig,
)
from sglang.srt.disaggregation.encode_language.connection import (  # noqa: E402
    ConnectionConfig,
)
from sglang.srt.disaggregation.encode_language.receiver import (  # noqa: E402
    LanguageManager,
)

H = 32  # hidden size used by the transfer tests
B = 8  # block size
RESERVE = 16  # default reservation (2 blocks)

_rooms = itertools.count(1000)


def new_room() -> int:
    return next(_rooms)


def buffer_config(
    k: int = 3, num_blocks: int = 32, hidden: int = H, dtype: str = "bfloat16"
) -> MultimodalBufferConfig:
    return MultimodalBufferConfig(
        hidden_size=hidden,
        deepstack_count=k,
        block_size=B,
        num_blocks=num_blocks,
        embed_dtype=dtype,
    )


def conn_config(**kw) -> ConnectionConfig:
    base = dict(
        default_reserve_tokens=RESERVE,
        bootstrap_timeout_s=10.0,
        waiting_timeout_s=20.0,
        transfer_timeout_s=20.0,
        resume_timeout_s=20.0,
        abort_ack_timeout_s=2.0,
        heartbeat_interval_s=0.3,
        heartbeat_max_failures=3,
    )
    base.update(kw)
    return ConnectionConfig(**base)


class PeerError(RuntimeError):
    def __init__(self, kind, msg, tb):
        super().__init__(f"{kind}: {msg}")
        self.kind, self.msg, self.tb = kind, msg, tb


class EncodePeer:
    """An EncodeManager in another process. ``target``: another ``el_peer`` entry point
    with the same pipe protocol (the language peer), or wrapped by ``netns.run_in``."""

    def __init__(
        self, ctx, bc: MultimodalBufferConfig, cc: ConnectionConfig, target=None
    ):
        from el_peer import peer_main

        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=target or peer_main, args=(child, bc, cc), daemon=True
        )
        self.proc.start()
        child.close()
        self.addr, self.pid = self._reply(60)

    def _reply(self, timeout):
        if not self.conn.poll(timeout):
            raise TimeoutError("encode peer did not answer")
        status, out = self.conn.recv()
        if status == "err":
            raise PeerError(*out)
        return out

    def call(self, cmd, *args, timeout=30):
        self.conn.send((cmd, args))
        return self._reply(timeout)

    def state(self):
        return self.call("state")

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self):
        if self.proc.is_alive():
            try:
                self.call("exit", timeout=10)
            except Exception:
                pass
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)

    def assert_idle(self):
        """Every encode block free, no room or payload left, threads alive (bounded wait for
        in-flight ends)."""
        idle = lambda st: st["rooms"] == 0 and st["free"] == st["total"]  # noqa: E731
        assert wait_until(
            lambda: idle(self.state()), 10, 0.02
        ), f"encode side not idle: {self.state()}"
        st = self.state()
        assert st["inflight_payload_bytes"] == 0 and st["pending_writes"] == 0, st
        assert (
            st["workers_alive"] and st["control_alive"] and st["thread_errors"] == 0
        ), st


@pytest.fixture(scope="session")
def mp_ctx():
    # Python 3.11's forkserver ignores the sys.path it is given: pass this directory by
    # environment, and preload the package by name as well.
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH")) if p
    )
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(
        [
            "sglang.srt.disaggregation.encode_language.sender",
            "sglang.srt.disaggregation.encode_language.receiver",
            "el_helpers",
            "el_peer",
        ]
    )
    return ctx


@pytest.fixture(scope="session")
def peers(mp_ctx):
    """Encode peers keyed by (K, num_blocks, hidden, extra config); started once per session."""
    started = {}

    def get(k=3, num_blocks=32, hidden=H, **cc):
        key = (k, num_blocks, hidden, tuple(sorted(cc.items())))
        p = started.get(key)
        if p is None or not p.proc.is_alive():
            p = started[key] = EncodePeer(
                mp_ctx, buffer_config(k, num_blocks, hidden), conn_config(**cc)
            )
        return p

    yield get
    for p in started.values():
        p.close()


def transfer(peer, lang, seed, total, mm):
    """One request from ``peer`` to ``lang``, both sides Success; the (finished) receiver."""
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    peer.call("send", room, seed, total, mm)
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx) == KVPoll.Success, rx.reason
    return rx


def ok_transfer(peer, lang, seed=1, total=3 * RESERVE, mm=20, k=3):
    """The side that survived a fault still serves a normal multi-round request."""
    rx = transfer(peer, lang, seed, total, mm)
    assert_same(rx.take(), make_payload(seed, total, mm, H, k))


def wait_final(mgr, rx, timeout=20.0):
    """Bounded wait until a receiver is Success or Failed and its blocks are released."""
    ok = wait_until(
        lambda: rx.poll() in (KVPoll.Success, KVPoll.Failed) and rx.finished, timeout
    )
    assert ok, f"receiver of room {rx.room} stuck: status={rx.poll()} phase={rx.phase}"
    return rx.poll()


@pytest.fixture
def make_lang():
    """Language managers in the test process; after the test every block must be free."""
    made = []

    def make(k=3, num_blocks=32, hidden=H, prefix_match=False, **cc):
        m = LanguageManager(
            buffer_config(k, num_blocks, hidden),
            conn_config(**cc),
            prefix_match=prefix_match,
        )
        made.append(m)
        return m

    yield make
    try:
        for m in made:
            assert wait_until(
                lambda: m.num_active_rooms() == 0 and not m.fences, 15
            ), f"language rooms left: {list(m.rooms)}; fences: {list(m.fences)}"
            accounting_ok(m.allocator)
            m.allocator.assert_all_free()
            assert m.thread_errors == 0
    finally:
        for m in made:
            m.close()
