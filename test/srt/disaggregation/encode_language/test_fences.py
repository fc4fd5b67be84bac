"""Blocks a peer may still write: fenced (quarantined) until its abort_ack or the fence timeout,
late writes detected by the next owner, every transfer-engine write bounded in time."""

from __future__ import annotations

import logging
import os
import signal

import pytest
import torch
from conftest import (
    B,
    EncodePeer,
    H,
    buffer_config,
    conn_config,
    new_room,
    ok_transfer,
    wait_final,
)
from el_helpers import accounting_ok, assert_same, make_payload, wait_until

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.receiver import Phase


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
    is declared dead; its blocks are quarantined (not free, not in use) until the fence timeout
    (logged), then a second request from another encoder reuses them. The stalled encoder resumes
    (SIGCONT) and the rest of its write lands in the second request's blocks, either before that
    request's own write (which overwrites it: byte-exact) or after it and before its copy-out
    (the test holds the language manager's lock to order that): the generation/checksum check
    fails the request with a clear error. Never wrong bytes; free + quarantined + in use == total
    at every check."""
    caplog.set_level(logging.WARNING)
    victim = EncodePeer(mp_ctx, buffer_config(), conn_config(heartbeat_interval_s=30))
    # The second encoder must not give up on us while we hold our lock.
    healthy = peers(heartbeat_interval_s=30)
    lang = make_lang(num_blocks=2, fence_timeout_s=1.0)  # the pool is one reservation
    payload_b = (2, 2 * B, 2 * B - 5)  # seed, tokens, multimodal tokens
    try:
        room_a, room_b = new_room(), new_room()
        rx_a = lang.create_receiver(victim.addr, room_a)
        assert wait_until(lambda: rx_a.phase == Phase.RESERVED, 10)
        a_blocks = rx_a.handle.blocks
        victim.call("stall_next_write", "sigstop_mid")
        # Answered after SIGCONT: the process may stop before it replies.
        victim.conn.send(("send", (room_a, 1, 2 * B, 2 * B - 3)))
        assert wait_until(lambda: process_state(victim.pid) == "T", 20)  # mid-write
        assert wait_until(lambda: lang.peer_is_dead(victim.addr), 10)
        assert rx_a.poll() == KVPoll.Failed and "unreachable" in rx_a.reason
        counts = accounting_ok(lang.allocator)
        assert counts == dict(free=0, quarantined=2, used=0, total=2)
        rx_b = lang.create_receiver(healthy.addr, room_b)
        assert rx_b.phase == Phase.ALLOC  # fenced blocks are not handed out
        assert wait_until(lambda: rx_b.phase == Phase.RESERVED, 10)  # fence timeout
        assert "fence timeout: releasing 2 blocks of room" in caplog.text
        assert rx_b.handle.blocks == a_blocks
        # Released without the victim's abort_ack: exposed, so B's round is checksummed.
        assert lang.exposed_blocks == set(a_blocks) and rx_b.checksum
        counts = accounting_ok(lang.allocator)
        assert counts == dict(free=0, quarantined=0, used=2, total=2)

        pa, pb = make_payload(1, 2 * B, 2 * B - 3, H, 3), make_payload(*payload_b, H, 3)
        rows = lang.buffers.embeddings[
            a_blocks[0]
        ]  # first block's embedding rows, live view

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
        checksummed = lang.rounds_checksummed
        ok_transfer(healthy, lang)
        ok_transfer(victim, lang)
        # Rounds on the exposed blocks stay checksummed (the pool is those two blocks).
        assert lang.rounds_checksummed > checksummed
        victim.assert_idle()
        healthy.assert_idle()
    finally:
        os.kill(victim.pid, signal.SIGCONT)
        victim.close()


def test_hung_write_is_bounded_and_its_blocks_fenced(mp_ctx, make_lang):
    """issue 7 item 11: a transfer-engine write that does not return within
    data_write_timeout_s fails the room on both sides (the language side is told a write may
    still land and fences the blocks), does not hold the worker (another request completes
    meanwhile), and when the write finally returns the encoder acknowledges and both sides'
    quarantined blocks come back."""
    victim = EncodePeer(mp_ctx, buffer_config(), conn_config(data_write_timeout_s=0.5))
    lang = make_lang()
    try:
        room = new_room()
        rx = lang.create_receiver(victim.addr, room)
        assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
        victim.call("stall_next_write", "hang")
        victim.call("send", room, 1, 2 * B, 9)
        reason = (
            f"data write to {lang.manager_id} timed out after 0.5s (it may still land)"
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
        # AbortAck once the write returned
        assert wait_until(lambda: not lang.fences, 10)
        assert accounting_ok(lang.allocator)["quarantined"] == 0
        victim.assert_idle()
    finally:
        victim.call("release_write")
        victim.close()
