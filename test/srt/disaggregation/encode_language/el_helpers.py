"""Helpers shared by the encode_language tests and their peer processes (importable by name, so
forkserver children can unpickle the peer entry point)."""

from __future__ import annotations

import os
import time
from typing import Callable, Union

os.environ.setdefault("MC_FORCE_TCP", "1")
os.environ.setdefault("MOONCAKE_PROTOCOL", "tcp")
# Mooncake's own write timeout (its minimum, 5 s): the encoder's write deadline is built on it
# (ConnectionConfig.write_deadline_s), and a hung-write test waits that long.
os.environ.setdefault("MC_TRANSFER_TIMEOUT", "5")

import torch
import zmq

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.payload import MultimodalPayload
from sglang.srt.disaggregation.encode_language.manifest import encode_message

DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def make_payload(
    seed: int, total: int, mm: int, hidden: int, k: int, dtype: str = "bfloat16"
) -> MultimodalPayload:
    """Deterministic random request: ``mm`` multimodal tokens at random positions among ``total``."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(total, dtype=torch.bool)
    if mm:
        mask[torch.randperm(total, generator=g)[:mm]] = True
    dt = DTYPES[dtype]
    emb = torch.randn(mm, hidden, generator=g).to(dt)
    ds = torch.randn(mm, k * hidden, generator=g).to(dt) if k else None
    return MultimodalPayload(
        fill_ids=torch.randint(0, 150_000, (total,), generator=g, dtype=torch.int32),
        mrope_positions=torch.randint(
            0, 1 << 20, (3, total), generator=g, dtype=torch.int32
        ),
        mm_mask=mask,
        embeddings=emb,
        deepstack=ds,
        mrope_delta=int(torch.randint(-5000, 5000, (1,), generator=g)),
    )


def assert_same(received, payload) -> None:
    """Byte-for-byte equality of every slot the receiver took out."""
    m = received.manifest
    assert (m.total_tokens, m.mm_tokens, m.mrope_delta) == (
        payload.total_tokens,
        payload.mm_tokens,
        payload.mrope_delta,
    )
    assert torch.equal(received.fill_ids, payload.fill_ids.to(received.fill_ids.dtype))
    assert torch.equal(
        received.mrope_positions,
        payload.mrope_positions.to(received.mrope_positions.dtype),
    )
    assert torch.equal(received.mm_mask, payload.mm_mask)
    assert received.embeddings.dtype == payload.embeddings.dtype
    assert torch.equal(
        received.embeddings.view(torch.uint8), payload.embeddings.view(torch.uint8)
    )
    if payload.deepstack is None:
        assert received.deepstack is None
    else:
        assert torch.equal(
            received.deepstack.view(torch.uint8), payload.deepstack.view(torch.uint8)
        )


def wait_until(
    pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.01
) -> bool:
    """Bounded wait for ``pred``; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval_s)
    return bool(pred())


def wait_done(transfer, timeout_s: float) -> int:
    """Bounded wait until a sender or receiver is Success or Failed; its status."""
    wait_until(lambda: transfer.poll() in (KVPoll.Success, KVPoll.Failed), timeout_s)
    return transfer.poll()


def record_checksummed_rounds(mgr) -> list:
    """Test hook on one language manager: the returned list gets, for every round it reads out
    of its blocks, whether the round carried block checksums (``read_round``'s ``verify``).
    """
    seen = []
    read_round = mgr.buffers.read_round

    def recording(*args, verify=True, **kwargs):
        seen.append(verify)
        return read_round(*args, verify=verify, **kwargs)

    mgr.buffers.read_round = recording
    return seen


def record_deadlines(mgr) -> list:
    """Test hook on one manager: the returned list gets every deadline its control thread's
    timers return (``_tick``), i.e. when the thread next wakes by itself; ``math.inf``: only a
    message or a ``wake()`` wakes it. One entry per pass of the control loop."""
    seen = []
    tick = mgr._tick

    def recording(now):
        seen.append(tick(now))
        return seen[-1]

    mgr._tick = recording
    return seen


def send_control(endpoint: str, msg: Union[bytes, object]) -> None:
    """Deliver one control message (or raw bytes, for garbage tests) to a manager's endpoint
    from a socket of its own, as a foreign or misbehaving peer would."""
    data = msg if isinstance(msg, bytes) else encode_message(msg)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(f"tcp://{endpoint}")
    sock.send(data)
    sock.close()


def accounting_ok(allocator) -> dict:
    """The pool's accounting snapshot, asserted consistent: free + quarantined + used == total."""
    a = allocator.accounting()
    assert a["free"] + a["quarantined"] + a["used"] == a["total"], a
    return a


def free_raw(allocator, blocks, owner) -> None:
    """Free raw block ids as a caller that only kept ids would (double-free tests)."""
    from sglang.srt.disaggregation.encode_language.allocator import BlockHandle

    BlockHandle(allocator, blocks, owner).free()


class FakePeer:
    """A control endpoint the test speaks for, as a misbehaving or foreign peer would: it
    receives what a manager sends it and sends what the test wants, in order, on one socket.
    """

    def __init__(self):
        from sglang.srt.disaggregation.encode_language.manifest import decode_message

        self._decode = decode_message
        ctx = zmq.Context.instance()
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        port = self.pull.bind_to_random_port("tcp://127.0.0.1")
        self.addr = f"127.0.0.1:{port}"
        self._push = {}

    def send(self, endpoint: str, msg) -> None:
        sock = self._push.get(endpoint)
        if sock is None:
            sock = self._push[endpoint] = zmq.Context.instance().socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{endpoint}")
        sock.send(encode_message(msg))

    def expect(self, cls, timeout_s: float = 10.0):
        """The next message of type ``cls`` (others are skipped); bounded."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.pull.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
                msg = self._decode(self.pull.recv())
                if isinstance(msg, cls):
                    return msg
        raise TimeoutError(f"no {cls.__name__} within {timeout_s}s")

    def close(self) -> None:
        for s in self._push.values():
            s.close()
        self.pull.close()


def declare_dead(mgr, endpoint: str) -> None:
    """Force the heartbeat's verdict "peer dead" on a manager (the peer may well be alive)."""
    mgr._declare_dead(endpoint, "declared dead by the test")


def push_endpoints(channel) -> list:
    """The peers a ControlChannel holds an open PUSH socket to."""
    with channel._lock:
        return sorted(channel._push)


def run_two_ranks(worker) -> tuple:
    """``worker(rank, port, results)`` in two spawned processes (a gloo group of 2 on a free
    port); returns what each rank stored in ``results[rank]``."""
    import torch.multiprocessing as mp
    from epd_testbed.servers import free_port

    with mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            worker, args=(free_port(), results), nprocs=2, start_method="spawn"
        )
        return results[0], results[1]
