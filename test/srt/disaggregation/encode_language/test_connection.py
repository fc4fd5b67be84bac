"""Two real processes, real Mooncake TCP transfers: encode peer process -> language managers here."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import torch
from conftest import (
    RESERVE,
    B,
    EncodePeer,
    H,
    buffer_config,
    conn_config,
    new_room,
    wait_final,
)
from el_helpers import assert_same, make_payload, wait_until
from el_peer import language_peer_main

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.connection import (
    ControlChannel,
    RoomInUseError,
    mooncake_timeout_s,
    write_segments,
)
from sglang.srt.disaggregation.encode_language.manifest import Ping, make
from sglang.srt.disaggregation.encode_language.receiver import Phase


def transfer(peer, lang, total, mm, k, seed, **rx_kw):
    room = new_room()
    rx = lang.create_receiver(peer.addr, room, **rx_kw)
    peer.call("send", room, seed, total, mm)
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx) == KVPoll.Success, rx.reason
    got = rx.take()
    assert_same(got, make_payload(seed, total, mm, H, k))
    return rx, got


# (total tokens, multimodal tokens, expected rounds with a 16-token reservation and 8-token blocks)
SIZES = [
    (1, 1, 1),  # one token
    (1, 0, 1),  # one text token
    (B, B, 1),  # exactly one block
    (2 * B, 5, 1),  # block multiple == reservation
    (B + 1, 4, 1),  # just over a block
    (RESERVE + 1, RESERVE + 1, 2),  # reservation + 1: two rounds
    (5 * RESERVE, 3 * RESERVE + 3, 5),  # five rounds
]


@pytest.mark.parametrize("k", [0, 2, 3])
@pytest.mark.parametrize("total,mm,rounds", SIZES)
def test_every_slot_byte_exact(peers, make_lang, k, total, mm, rounds):
    peer = peers(k=k)
    lang = make_lang(k=k)
    rx, got = transfer(peer, lang, total, mm, k, seed=total * 31 + mm + k)
    assert rx.round + 1 == rounds
    if k == 0:
        assert got.deepstack is None
        assert len(lang.buffers.slots()) == 4
    peer.assert_idle()


def test_resume_with_bigger_resume_rounds(peers, make_lang):
    """resume_tokens larger than the first reservation: later rounds allocate more blocks."""
    peer = peers()
    lang = make_lang(resume_tokens=4 * RESERVE)
    rx, _ = transfer(peer, lang, 9 * RESERVE + 1, 50, 3, seed=7)
    assert rx.round + 1 == 4  # rounds of 16, 64, 64 and 1 tokens
    peer.assert_idle()


def test_64_concurrent_mixed_sizes_small_pool(peers, make_lang):
    """Pools too small for all requests at once: all complete, all data exact, no deadlock."""
    peer = peers(num_blocks=12)
    lang = make_lang(num_blocks=10)  # 5 reservations of 2 blocks at a time
    rnd = random.Random(64)
    reqs = []
    for i in range(64):
        total = rnd.choice([1, 3, B, B + 1, 2 * B, 3 * B + 2, 7 * B])
        mm = rnd.randint(0, total)
        room = new_room()
        reqs.append((room, i, total, mm, lang.create_receiver(peer.addr, room)))
    order = list(range(64))
    rnd.shuffle(order)
    for j in order:
        room, seed, total, mm, _ = reqs[j]
        peer.call("send", room, seed, total, mm)
    for room, seed, total, mm, rx in reqs:
        assert peer.call("wait", room, 60) == (KVPoll.Success, "")
        assert wait_final(lang, rx, 60) == KVPoll.Success, rx.reason
        assert_same(rx.take(), make_payload(seed, total, mm, H, 3))
    peer.assert_idle()


def test_next_round_waits_for_the_destinations_reservation(peers, make_lang):
    """A round starts only once the language side reserved blocks for it: a receiver slow to
    get its resume blocks holds the next round back (nothing sent, nothing in flight); once
    the blocks come, the rest arrives exact."""
    peer = peers()
    lang = make_lang(num_blocks=4, resume_tokens=2 * RESERVE)
    room, seed, total, mm = new_room(), 11, 3 * RESERVE, 20
    # A blocker holds 2 of the 4 blocks: round 0 gets the other 2, the 4-block resume waits.
    blocker = lang.allocator.alloc(2, owner="blocker")
    rx = lang.create_receiver(peer.addr, room)
    peer.call("send", room, seed, total, mm)
    assert wait_until(lambda: rx.phase == Phase.RESUME_ALLOC, 10)
    st = peer.call("room_state", room)
    assert (st["round"], st["token_sent"], st["ready"], st["in_flight"]) == (
        1,
        RESERVE,
        False,
        False,
    )
    blocker.free()
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx) == KVPoll.Success
    assert_same(rx.take(), make_payload(seed, total, mm, H, 3))
    peer.assert_idle()


def test_reused_room_is_a_clear_error_both_sides(peers, make_lang):
    peer = peers()
    lang = make_lang()
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    with pytest.raises(
        RoomInUseError, match=f"bootstrap room {room} is already in use"
    ):
        lang.create_receiver(peer.addr, room)
    peer.call("create", room, 20, 5)
    with pytest.raises(Exception, match=f"bootstrap room {room} is already in use"):
        peer.call("create", room, 20, 5)
    # A second language instance (another manager) claiming the same room is refused.
    other = make_lang()
    rx2 = other.create_receiver(peer.addr, room)
    assert wait_final(other, rx2) == KVPoll.Failed
    assert "already in use" in rx2.reason
    peer.call("send", room, 3, 20, 5)
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx) == KVPoll.Success
    assert_same(rx.take(), make_payload(3, 20, 5, H, 3))
    # After success the tables are clear: the room can be used again for a new request.
    rx3 = lang.create_receiver(peer.addr, room)
    peer.call("send", room, 4, 9, 9)
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx3) == KVPoll.Success
    assert_same(rx3.take(), make_payload(4, 9, 9, H, 3))
    peer.assert_idle()


def _stopped_for(pid: int, seconds: float, fn):
    """``fn()`` while process ``pid`` is stopped (SIGSTOP, SIGCONT after ``seconds``): its
    result, and the CPU and wall seconds this thread spent in it."""
    os.kill(pid, signal.SIGSTOP)
    resume = threading.Timer(seconds, os.kill, (pid, signal.SIGCONT))
    resume.start()
    try:
        cpu, wall = time.thread_time(), time.monotonic()
        out = fn()
        return out, time.thread_time() - cpu, time.monotonic() - wall
    finally:
        resume.join()
        os.kill(pid, signal.SIGCONT)


def test_write_segments_lands_fails_and_waits_without_a_core(mp_ctx, make_lang):
    """The encoder's one write (``connection.write_segments``) into a real language manager in
    another process, with the contract of upstream's ``batch_transfer_sync``:

    * segments land byte for byte (0);
    * a segment Mooncake rejects (outside the peer's registered region), first or after a good
      one, and a peer nobody listens at (nothing can be submitted) answer -1 at once, long
      before Mooncake's timeout (5 s here, ``MC_TRANSFER_TIMEOUT``);
    * a peer stopped for 1 s: the write answers 0 once it resumes, and meanwhile the writer
      holds no core (Mooncake's own call spins on the batch's status: measured, 0.997 s of CPU
      in a 1.001 s wait; here under a quarter of the wait);
    * a peer stopped past the timeout: -1 at the timeout (``mooncake_timeout_s``), and the
      write lands when the peer resumes, which is why the language side fences such blocks.
    """
    peer = EncodePeer(mp_ctx, buffer_config(), conn_config(), target=language_peer_main)
    try:
        local = make_lang()  # this process's engine, and a registered source region
        session, base, size = peer.call("region")
        src = local.buffers.region.view(-1)
        src.copy_(torch.randint(0, 256, (src.numel(),), dtype=torch.uint8))
        n = min(size, src.numel()) // 4
        ptr = src.data_ptr()

        def landed(start: int, length: int) -> bytes:
            return peer.call("region_bytes", start, length)

        assert (
            write_segments(
                local.engine, session, [ptr, ptr + 3 * n], [base, base + n], [n, 100]
            )
            == 0
        )
        assert (
            landed(0, n + 100)
            == src[:n].numpy().tobytes() + src[3 * n : 3 * n + 100].numpy().tobytes()
        )

        outside = base + size
        for label, sid, segs in (
            ("rejected", session, ([ptr], [outside], [64])),
            (
                "rejected after a good one",
                session,
                ([ptr, ptr], [base, outside], [64, 64]),
            ),
            ("no peer", "127.0.0.1:1", ([ptr], [base], [64])),
        ):
            wall = time.monotonic()
            assert write_segments(local.engine, sid, *segs) == -1, label
            assert time.monotonic() - wall < 2.0, label

        src[:n] = 255 - src[:n]
        ret, cpu, wall = _stopped_for(
            peer.pid,
            1.0,
            lambda: write_segments(local.engine, session, [ptr], [base], [n]),
        )
        assert ret == 0 and wall >= 0.9, (ret, wall)
        assert cpu < 0.25 * wall, f"the writer used {cpu:.3f} s of CPU in {wall:.3f} s"
        assert landed(0, n) == src[:n].numpy().tobytes()

        src[:n] = 255 - src[:n]
        timeout = mooncake_timeout_s(n)
        ret, cpu, wall = _stopped_for(
            peer.pid,
            timeout + 1.0,
            lambda: write_segments(local.engine, session, [ptr], [base], [n]),
        )
        assert ret == -1 and timeout <= wall < timeout + 1.0, (ret, wall, timeout)
        assert wait_until(lambda: landed(0, n) == src[:n].numpy().tobytes(), 10)
    finally:
        peer.close()


def test_a_send_to_no_endpoint_raises_and_keeps_no_socket():
    """A destination that is not ``host:port`` raises, and the PUSH socket made for it is
    closed: the channel's context still terminates (an open socket blocks ``term``)."""
    ch = ControlChannel("127.0.0.1", 0, "127.0.0.1")
    with pytest.raises(ValueError, match="Missing port"):
        ch.send("garbage", make(Ping, manager_id=ch.endpoint, nonce=1))
    ch.close()
    term = threading.Thread(target=ch.ctx.term, daemon=True)
    term.start()
    term.join(10)
    assert not term.is_alive(), "a socket of the channel was left open"
