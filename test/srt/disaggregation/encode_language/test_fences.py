"""Blocks a peer may still write: fenced (quarantined) until its abort_ack or the fence timeout,
late writes detected by the next owner, every transfer-engine write bounded in time."""

from __future__ import annotations

import logging
import os
import signal
import threading

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
    ok_transfer,
    wait_final,
)
from el_helpers import (
    accounting_ok,
    assert_same,
    make_payload,
    record_checksummed_rounds,
    wait_done,
    wait_until,
)

import sglang.srt.disaggregation.encode_language.sender as sender_module
from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.connection import (
    ConnectionConfig,
    mooncake_timeout_s,
)
from sglang.srt.disaggregation.encode_language.manifest import RequestShape
from sglang.srt.disaggregation.encode_language.receiver import Phase
from sglang.srt.disaggregation.encode_language.sender import EncodeManager


def create_sender(enc, room, payload):
    """An in-process encoder's request for ``payload`` (its shape is announced)."""
    return enc.create_sender(
        room, RequestShape(payload.total_tokens, payload.mm_tokens, payload.items)
    )


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize(
    "late_write", ["before_b_is_written", "before_b_is_copied_out"]
)
def test_stalled_encoder_late_write_never_passes_wrong_bytes(
    mp_ctx, peers, make_lang, caplog, late_write
):
    """issue 7 item 10: an encoder process stopped (SIGSTOP) mid-write past the heartbeat budget
    is declared dead; issue 16 item 2: its blocks are freed at once, exposed (not quarantined
    until the fence timeout, 120 s here), and a second request from another encoder reuses them
    with its round checksummed. The stalled encoder resumes
    (SIGCONT) and the rest of its write lands in the second request's blocks, either before that
    request's own write (which overwrites it: byte-exact) or after it and before its copy-out
    (the test holds the language manager's lock to order that): the generation/checksum check
    fails the request with a clear error. Never wrong bytes; free + quarantined + in use == total
    at every check."""
    caplog.set_level(logging.WARNING)
    victim = EncodePeer(mp_ctx, buffer_config(), conn_config(heartbeat_interval_s=30))
    # The second encoder must not give up on us while we hold our lock.
    healthy = peers(heartbeat_interval_s=30)
    # the pool is one reservation
    lang = make_lang(num_blocks=2, fence_timeout_s=120.0)
    payload_b = (2, 2 * B, 2 * B - 5)  # seed, tokens, multimodal tokens
    try:
        room_a, room_b = new_room(), new_room()
        rx_a = lang.create_receiver(victim.addr, room_a)
        victim.call("create", room_a, 2 * B, 2 * B - 3)
        assert wait_until(lambda: rx_a.phase == Phase.RESERVED, 10)
        a_blocks = rx_a.handle.blocks
        victim.call("stall_next_write", "sigstop_mid")
        # Answered after SIGCONT: the process may stop before it replies.
        victim.conn.send(("send", (room_a, 1, 2 * B, 2 * B - 3)))
        assert wait_until(lambda: process_state(victim.pid) == "T", 20)  # mid-write
        assert wait_until(lambda: lang.peer_is_dead(victim.addr), 10)
        assert rx_a.poll() == KVPoll.Failed and "unreachable" in rx_a.reason
        counts = accounting_ok(lang.allocator)
        # freed at once (no AbortAck can come from a dead encoder), exposed
        assert counts == dict(free=2, quarantined=0, used=0, total=2)
        assert lang.exposures.blocks == set(a_blocks) and not lang.fences
        rx_b = lang.create_receiver(healthy.addr, room_b)
        healthy.call("create", room_b, *payload_b[1:])
        assert wait_until(lambda: rx_b.phase == Phase.RESERVED, 10)
        assert rx_b.handle.blocks == a_blocks
        # Released without the victim's abort_ack: exposed, so B's round is checksummed.
        assert lang.exposures.blocks == set(a_blocks) and rx_b.checksum
        counts = accounting_ok(lang.allocator)
        assert counts == dict(free=0, quarantined=0, used=2, total=2)

        pa, pb = make_payload(1, 2 * B, 2 * B - 3, H, 3), make_payload(*payload_b, H, 3)
        # first block's embedding rows, live view
        rows = lang.buffers.embeddings[a_blocks[0]]

        def resume_victim():
            """SIGCONT; wait until A's late rows are visible in the blocks (the engine may
            report the write done before the peer's memory has it)."""
            os.kill(victim.pid, signal.SIGCONT)
            assert victim._reply(30) is None  # the send command's answer
            victim.call("wait", room_a, 20)  # A's late write has returned
            assert victim.call("stalled_writes") == [(0, 0)]  # both parts written
            landed = wait_until(lambda: torch.equal(rows, pa.embeddings[:B]), 10)
            accounting_ok(lang.allocator)
            return landed

        if late_write == "before_b_is_written":
            assert resume_victim()
            healthy.call("send", room_b, *payload_b)
            assert healthy.call("wait", room_b, 20) == (KVPoll.Success, "")
        else:
            with lang.lock:  # the language side is slow to copy out
                healthy.call("send", room_b, *payload_b)
                assert healthy.call("wait", room_b, 20) == (KVPoll.Success, "")
                assert torch.equal(rows, pb.embeddings[:B])  # B's own write is in
                assert resume_victim()  # and A's late rows over it
        status = wait_final(lang, rx_b)
        accounting_ok(lang.allocator)
        if status == KVPoll.Success:
            assert_same(rx_b.take(), pb)
        else:
            assert "late write" in rx_b.reason, rx_b.reason
        # The ordering is known: the late rows were overwritten by B, or are in B's blocks.
        expected = (
            KVPoll.Success if late_write == "before_b_is_written" else KVPoll.Failed
        )
        assert status == expected, rx_b.reason
        checksummed = record_checksummed_rounds(lang)
        ok_transfer(healthy, lang)
        # revived by a pong (until then a request for it fails at once)
        assert wait_until(lambda: not lang.peer_is_dead(victim.addr), 10)
        ok_transfer(victim, lang)
        # Rounds on the exposed blocks stay checksummed (the pool is those two blocks).
        assert any(checksummed)
        victim.assert_idle()
        healthy.assert_idle()
    finally:
        os.kill(victim.pid, signal.SIGCONT)
        victim.close()


@pytest.mark.parametrize("returns", ["complete", "failed"])
def test_hung_write_is_bounded_and_its_blocks_fenced(mp_ctx, make_lang, returns):
    """issue 7 item 11: a transfer-engine write that does not return by its deadline
    (Mooncake's own timeout + data_write_timeout_s) fails the room on both sides (the language
    side is told a write may still land and fences the blocks), does not hold the worker
    (another request completes meanwhile), and when the write finally returns complete the
    encoder acknowledges and both sides' quarantined blocks come back. issue: blockers item 4:
    when it returns failed (-1: parts may still be in flight) nothing is acknowledged (the
    encoder's staging is freed then: only the write's source); issue 16 item 2: the language
    side frees the fence's blocks as soon as the encoder reports the failed write, exposed,
    instead of at its fence_timeout_s (120 s here)."""
    victim = EncodePeer(
        mp_ctx,
        buffer_config(),
        conn_config(data_write_timeout_s=0.5, fence_timeout_s=1.0),
    )
    lang = make_lang(fence_timeout_s=120.0)
    try:
        room = new_room()
        rx = lang.create_receiver(victim.addr, room)
        victim.call("create", room, 2 * B, 9)
        assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
        blocks = rx.handle.blocks
        victim.call(
            "stall_next_write", "hang" if returns == "complete" else "hang_fail"
        )
        victim.call("send", room, 1, 2 * B, 9)
        # The deadline: Mooncake's own timeout for the round's bytes (MC_TRANSFER_TIMEOUT=5 s,
        # el_helpers, plus 1 ns per byte) + data_write_timeout_s (0.5 s).
        reason = (
            f"data write to {lang.manager_id} timed out after 5.5s (it may still land)"
        )
        assert victim.call("wait", room, 20) == (KVPoll.Failed, reason)
        assert (
            wait_final(lang, rx) == KVPoll.Failed
            and rx.reason == f"encoder {victim.addr} aborted: {reason}"
        )
        # fenced: the write may land
        assert accounting_ok(lang.allocator)["quarantined"] == 2
        st = victim.state()
        assert (st["quarantined"], st["pending_writes"]) == (2, 1)  # staging blocks too
        ok_transfer(victim, lang)  # the worker is not held by the hung write
        victim.call("release_write")
        key = (victim.addr, room)
        if returns == "complete":  # AbortAck once the write returned
            assert wait_until(lambda: not lang.fences, 10)
            assert not lang.exposures.blocks
        else:  # no AbortAck: the encoder's Abort(write_failed) frees them, exposed
            assert wait_until(lambda: key not in lang.fences, 10)
            assert lang.exposures.blocks == set(blocks)
        assert accounting_ok(lang.allocator)["quarantined"] == 0
        victim.assert_idle()
    finally:
        victim.call("release_write")
        victim.close()


def test_exposure_after_a_fence_timeout_lasts_until_the_encoder_says_the_write_ended(
    mp_ctx, make_lang
):
    """Review of issue 16, finding 2: a fence times out only when the encoder abandoned a write
    at its own deadline, a write Mooncake is not timing, so the blocks released then stay
    exposed (every round on them checksummed) past the write-deadline bound that ends other
    exposures, until the encoder reports the write ended: here it returns complete, the
    encoder's AbortAck ends the exposure. Before, the exposure ended after that bound and a
    write landing later would have gone unchecked."""
    victim = EncodePeer(mp_ctx, buffer_config(), conn_config(data_write_timeout_s=0.5))
    lang = make_lang(fence_timeout_s=1.0, data_write_timeout_s=0.5)
    try:
        room = new_room()
        rx = lang.create_receiver(victim.addr, room)
        victim.call("create", room, 2 * B, 9)
        assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
        blocks = set(rx.handle.blocks)
        victim.call("stall_next_write", "hang")
        victim.call("send", room, 1, 2 * B, 9)
        assert victim.call("wait", room, 20)[0] == KVPoll.Failed  # abandoned at 5.5 s
        assert wait_final(lang, rx) == KVPoll.Failed
        assert wait_until(lambda: not lang.fences, 10)  # the fence timed out (1 s)
        assert lang.exposures.blocks == blocks
        bound = lang.config.write_deadline_s(
            len(blocks), sum(lang.layout.slot_block_bytes)
        )
        # past the bound of an exposure Mooncake times: still exposed
        assert not wait_until(lambda: lang.exposures.blocks != blocks, bound + 1.0)
        victim.call("release_write")  # the write returns complete: AbortAck
        assert wait_until(lambda: not lang.exposures.blocks, 10)
        assert accounting_ok(lang.allocator)["quarantined"] == 0
        victim.assert_idle()
    finally:
        victim.call("release_write")
        victim.close()


@pytest.mark.parametrize("mode", ["fail_in_flight", "raise_in_flight"])
def test_failed_write_that_lands_later_never_passes_wrong_bytes(
    mp_ctx, peers, make_lang, mode
):
    """issue: blockers item 4: Mooncake returns -1 while part of the batch is still in flight
    (a fake engine call stands in for that, see ``el_peer.stall_next_write``: loopback TCP
    cannot provoke it); the rest (the multimodal rows, no aux segment) lands later, after the
    next owner of the blocks (another encoder) wrote them and before its copy-out. The next
    request is correct (checksummed and verified) or refused, never Success with the failed
    request's rows: the failed room ends with Abort(write_failed), the language side frees
    the blocks at once as exposed (issue 16 item 2; before, fenced until fence_timeout_s) and
    checksums every round on them, and the encoder frees its staging blocks at once too
    (review of issue 16: quarantining them for fence_timeout_s let a dead language server's
    failing writes take the whole staging pool from healthy ones). Before the fix the room
    ended with Abort(writes_pending=False), the blocks were freed unfenced, and the next
    request reported Success carrying the previous request's embeddings. ``raise_in_flight``
    (review of issue 15, finding 2): the engine call raises instead of returning -1, after
    part of the batch was written; handled the same way (before the fix the exception skipped
    the failed-write path and the room ended with Abort(writes_pending=False) again)."""
    victim = EncodePeer(mp_ctx, buffer_config(), conn_config(fence_timeout_s=3.0))
    # must not give up on us while we hold our lock
    healthy = peers(heartbeat_interval_s=30)
    # the pool is one reservation
    lang = make_lang(num_blocks=2, fence_timeout_s=120.0)
    payload_a, payload_b = (1, 2 * B, 2 * B - 3), (2, 2 * B, 2 * B - 5)
    pa, pb = make_payload(*payload_a, H, 3), make_payload(*payload_b, H, 3)
    what = (
        "ret=-1"
        if mode == "fail_in_flight"
        else "raised RuntimeError: transfer engine error"
    )
    reason = f"Mooncake write to {lang.manager_id} failed ({what}; parts of it may still land)"
    try:
        room_a, room_b = new_room(), new_room()
        rx_a = lang.create_receiver(victim.addr, room_a)
        victim.call("create", room_a, *payload_a[1:])
        assert wait_until(lambda: rx_a.phase == Phase.RESERVED, 10)
        a_blocks = rx_a.handle.blocks
        victim.call("stall_next_write", mode)
        victim.call("send", room_a, *payload_a)
        # Observed now, asserted after the next request's outcome (the point of the test).
        outcome_a = victim.call("wait", room_a, 20)
        assert wait_final(lang, rx_a) == KVPoll.Failed
        after_failure = (accounting_ok(lang.allocator), victim.state()["quarantined"])

        rx_b = lang.create_receiver(healthy.addr, room_b)
        healthy.call("create", room_b, *payload_b[1:])
        assert wait_until(lambda: rx_b.phase == Phase.RESERVED, 10)
        assert rx_b.handle.blocks == a_blocks
        rows = lang.buffers.embeddings[a_blocks[0]]  # first block's rows, live view
        with lang.lock:  # the language side is slow to copy out
            healthy.call("send", room_b, *payload_b)
            assert healthy.call("wait", room_b, 20) == (KVPoll.Success, "")
            assert torch.equal(rows, pb.embeddings[:B])  # B's own write is in
            assert victim.call("land_straggler") == 0  # and A's rows over it
            assert wait_until(lambda: torch.equal(rows, pa.embeddings[:B]), 10)
        status = wait_final(lang, rx_b)
        # never wrong bytes: the late rows are in B's blocks, so B is refused
        assert status == KVPoll.Failed and "late write" in rx_b.reason, (
            status,
            rx_b.reason,
        )
        assert outcome_a == (KVPoll.Failed, reason)
        assert rx_a.reason == f"encoder {victim.addr} aborted: {reason}"
        # Freed (exposed) on the language side, and the staging on the encoder too.
        assert after_failure == (dict(free=2, quarantined=0, used=0, total=2), 0)
        assert lang.exposures.blocks == set(a_blocks) and rx_b.checksum
        ok_transfer(healthy, lang)
        ok_transfer(victim, lang)
        victim.assert_idle()
        healthy.assert_idle()
    finally:
        victim.close()


def test_language_side_hears_the_encoders_verdict_on_a_hung_write(mp_ctx, make_lang):
    """issue: blockers item 4 (one coherent deadline rule; review of issue 15, finding 5): a
    later round's write hangs; the encoder's verdict (its write deadline: Mooncake's 5 s,
    MC_TRANSFER_TIMEOUT in el_helpers, + data_write_timeout_s 0.5 s) reaches the language
    side before the language side's own timeout for the round, which follows from the same
    rule (``round_timeout_s``). Before the fix the language side's fixed transfer_timeout_s
    (1 s here, 60 s against the encoder's 60 s + bytes by default) fired first: it failed the
    room itself with "transfer timeout: round 1 did not arrive within 1.0s"."""
    cc = dict(transfer_timeout_s=1.0, data_write_timeout_s=0.5, heartbeat_interval_s=30)
    victim = EncodePeer(mp_ctx, buffer_config(), conn_config(**cc))
    lang = make_lang(**cc)
    try:
        room = new_room()
        rx = lang.create_receiver(victim.addr, room)
        victim.call("create", room, 4 * RESERVE, 10)
        assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
        # Round 0 lands; round 1 waits for blocks a blocker holds, then its write hangs.
        blocker = lang.allocator.alloc(lang.allocator.num_free(), owner="blocker")
        lang.config.resume_tokens = 2 * RESERVE  # more blocks than the request holds
        victim.call("send", room, 9, 4 * RESERVE, 10)
        assert wait_until(lambda: rx.phase == Phase.RESUME_ALLOC, 10)
        victim.call("stall_next_write", "hang")
        blocker.free()
        assert wait_final(lang, rx) == KVPoll.Failed
        assert rx.reason == (
            f"encoder {victim.addr} aborted: data write to {lang.manager_id} timed out "
            "after 5.5s (it may still land)"
        )
        # the write returns complete: AbortAck, blocks back
        victim.call("release_write")
        assert wait_until(lambda: not lang.fences, 10)
        victim.assert_idle()
    finally:
        victim.call("release_write")
        victim.close()


def test_round_deadlines_follow_one_rule(monkeypatch):
    """issue: blockers item 4 (one coherent deadline rule; review of issue 15, finding 5):
    the encoder's write deadline for a round of 4 blocks of 1 MB is Mooncake's own timeout for
    each batch it writes plus data_write_timeout_s; the language side waits for that round
    the encoder's whole bound for it (transfer_timeout_s for staging blocks, then that
    deadline) plus transfer_grace_s, so the encoder's verdict always comes first."""
    monkeypatch.setenv("MC_TRANSFER_TIMEOUT", "5")
    cfg = ConnectionConfig(
        transfer_timeout_s=2.0,
        data_write_timeout_s=0.5,
        transfer_grace_s=1.0,
    )
    # one batch: Mooncake's 5 s + 1 ns per byte, + data_write_timeout_s
    write_deadline = 5.504
    assert cfg.write_deadline_s(4, 1_000_000) == pytest.approx(write_deadline)
    assert cfg.round_timeout_s(4, 1_000_000) == pytest.approx(write_deadline + 3.0)


@pytest.mark.parametrize(
    "env,nbytes,expected",
    [
        (None, 0, 30.0),  # Mooncake's default
        (None, 2_000_000_000, 32.0),  # + 1 ns per byte
        ("45", 500_000_000, 45.5),
        ("2", 0, 5.0),  # Mooncake's minimum
        ("7s", 0, 7.0),  # read as C's atoi reads it
        ("soon", 0, 5.0),
    ],
)
def test_write_deadline_follows_mooncakes_own(monkeypatch, env, nbytes, expected):
    """issue: blockers item 4: the encoder's write deadline is built on Mooncake's own
    (MC_TRANSFER_TIMEOUT whole seconds, at least 5, default 30, plus 1 ns per byte), read as
    Mooncake reads it, so Mooncake's -1 always comes first for a write it is timing."""
    if env is None:
        monkeypatch.delenv("MC_TRANSFER_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("MC_TRANSFER_TIMEOUT", env)
    assert mooncake_timeout_s(nbytes) == pytest.approx(expected)


def test_hung_writes_do_not_starve_later_writes(make_lang):
    """issue 16 item 2 (the workers refilled when a hung write is abandoned): writes hang
    past their deadline (Mooncake's 5 s per batch, MC_TRANSFER_TIMEOUT in el_helpers, +
    data_write_timeout_s 0.5 s) until no worker that makes writes is left (2 workers, 3 hung
    writes); each is abandoned (its room fails, its blocks fenced) and the worker it holds gets
    a replacement, so a normal request afterwards succeeds byte for byte, and once the writes
    return their threads end. In-process: the encoder shares this process's Mooncake engine;
    the hung writes are a fake engine call that blocks (a hung Mooncake write cannot be
    produced on loopback), then makes the real write."""
    lang = make_lang()
    enc = EncodeManager(buffer_config(), conn_config(data_write_timeout_s=0.5))
    workers = enc.config.num_transfer_workers
    hung = workers + 1
    real = sender_module.write_segments
    release, entered = threading.Event(), []

    def hanging(engine, session_id, *segs):
        entered.append(session_id)  # atomic
        if len(entered) <= hung:
            release.wait(60)
        return real(engine, session_id, *segs)

    sender_module.write_segments = hanging

    def held_threads():  # workers an abandoned write holds
        return sum(t.is_alive() for t in enc._workers) - workers

    try:

        def start(seed, total, mm):
            room = new_room()
            payload = make_payload(seed, total, mm, H, 3)
            sender = create_sender(enc, room, payload)
            rx = lang.create_receiver(enc.bootstrap_addr, room)
            assert wait_until(lambda: sender.poll() == KVPoll.WaitingForInput, 10)
            sender.send(payload)
            return sender, rx, payload

        stuck = [start(seed, RESERVE, 5) for seed in range(hung)]  # 2 blocks each
        deadline = enc.config.write_deadline_s(2, sum(enc.layout.slot_block_bytes))
        reason = (
            f"data write to {lang.manager_id} timed out after {deadline:.1f}s (it may "
            "still land)"
        )
        for sender, rx, _ in stuck:
            assert (wait_done(sender, 30), sender.reason) == (KVPoll.Failed, reason)
            assert wait_final(lang, rx) == KVPoll.Failed
        assert len(entered) == hung and held_threads() == hung
        sender, rx, payload = start(7, 3 * RESERVE, 20)  # three rounds
        assert (wait_done(sender, 30), sender.reason) == (KVPoll.Success, "")
        assert wait_final(lang, rx) == KVPoll.Success
        assert_same(rx.take(), payload)
        release.set()  # the hung writes return complete: AbortAck, fences end
        assert wait_until(lambda: held_threads() == 0, 10)
        assert wait_until(lambda: not lang.fences, 10)
        assert wait_until(lambda: enc.allocator.num_free() == enc.layout.num_blocks, 10)
        assert not enc._pending_writes and enc.num_active_rooms() == 0
    finally:
        release.set()
        sender_module.write_segments = real
        enc.close()
