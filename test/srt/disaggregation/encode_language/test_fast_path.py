"""Issue 9, the transport's fast path: event-driven control threads,
``take()`` handing out the tensors each round was copied into (one copy, no concatenation),
and block checksums only in rounds a late write can reach."""

from __future__ import annotations

import math

import pytest
from conftest import RESERVE, H, new_room, transfer, wait_final
from el_helpers import (
    FakePeer,
    assert_same,
    make_payload,
    record_checksummed_rounds,
    record_deadlines,
    wait_until,
)

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.connection import TransferError
from sglang.srt.disaggregation.encode_language.manifest import ProtocolError
from sglang.srt.disaggregation.encode_language.receiver import Phase


def test_control_thread_sleeps_until_a_deadline_and_wakes_for_local_commands(make_lang):
    """No fixed tick: an idle manager's control thread has no timer to wait for (it blocks
    until a message or a wake-up); freed blocks and a new request wake it at once, and the
    request's own timers become its next deadline."""
    lang = make_lang()
    deadlines = record_deadlines(lang)
    lang.wake()
    assert wait_until(lambda: deadlines and deadlines[-1] == math.inf, 5)
    passes = len(deadlines)
    lang.allocator.alloc(1, owner="test").free()
    assert wait_until(lambda: len(deadlines) > passes, 5)
    assert deadlines[-1] == math.inf

    fake = FakePeer()  # registers nothing back: the request waits in REGISTER
    try:
        rx = lang.create_receiver(fake.addr, new_room())
        assert rx.phase == Phase.REGISTER
        cfg = lang.config
        # its bootstrap timeout, or the first heartbeat to the new peer, whichever comes first
        assert wait_until(
            lambda: deadlines[-1]
            <= min(
                rx.phase_since + cfg.bootstrap_timeout_s,
                rx.phase_since + cfg.heartbeat_interval_s + 1.0,
            ),
            5,
        )
        passes = len(deadlines)
        rx.abort()
        assert wait_until(lambda: len(deadlines) > passes, 5)
        assert wait_final(lang, rx) == KVPoll.Failed
    finally:
        fake.close()


def test_take_returns_the_tensors_the_rounds_were_copied_into(peers, make_lang):
    """A request of several rounds is copied round by round into tensors allocated at its
    first round; take() hands out exactly those (same storage: no concatenation, no copy),
    with embeddings and deepstack as column views of one [M, (1+K)*H] rows tensor."""
    peer, lang = peers(), make_lang()
    total, mm, seed = 4 * RESERVE + 3, 3 * RESERVE, 5
    rx = transfer(peer, lang, seed, total, mm)
    held = rx.data
    ptrs = [t.data_ptr() for t in (held.fill_ids, held.mrope_positions, held.mm_mask)]
    got = rx.take()
    assert [
        t.data_ptr() for t in (got.fill_ids, got.mrope_positions, got.mm_mask)
    ] == ptrs
    assert got.rows is held.rows and tuple(got.rows.shape) == (mm, 4 * H)
    item = got.rows.element_size()
    assert got.embeddings.data_ptr() == got.rows.data_ptr()
    assert got.deepstack.data_ptr() == got.rows.data_ptr() + H * item
    assert_same(got, make_payload(seed, total, mm, H, 3))
    with pytest.raises(TransferError, match="already taken"):
        rx.take()


def test_checksums_only_where_a_late_write_can_land(peers, make_lang):
    """Healthy rounds (every earlier owner of the blocks ended with a RoundDone, an AbortAck
    or no write in flight) skip the checksum pass on both sides: the blocks' stamps carry 0.
    (The other half, rounds on blocks released by a fence timeout, is test_fences.py's
    stalled-encoder test, which fails with wrong bytes if exposed blocks are not
    checksummed.)"""
    peer = peers()
    lang = make_lang()
    checksummed = record_checksummed_rounds(lang)
    total, mm, seed = 3 * RESERVE + 5, 2 * RESERVE, 4
    rx = transfer(peer, lang, seed, total, mm)
    assert_same(rx.take(), make_payload(seed, total, mm, H, 3))
    assert checksummed == [False] * 4
    assert not lang.exposures.blocks
    checksums = []
    for block in range(lang.buffers.num_blocks):
        try:
            stamp = lang.buffers.read_manifest(block)[1]
        except ProtocolError:  # never written
            continue
        if stamp.room == rx.room:
            checksums.append(stamp.checksum)
    assert checksums and not any(checksums), checksums
