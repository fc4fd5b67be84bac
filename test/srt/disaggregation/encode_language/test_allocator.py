from __future__ import annotations

import threading

import pytest
from el_helpers import free_raw

from sglang.srt.disaggregation.encode_language.allocator import (
    BlockAllocator,
    DoubleFreeError,
    OversizeError,
    Priority,
)


def test_alloc_free_idempotent_and_accounting():
    a = BlockAllocator(8)
    h = a.alloc(3, owner="r1")
    assert h.blocks == [0, 1, 2] and (a.num_free(), a.num_used(), a.num_total()) == (
        5,
        3,
        8,
    )
    h.free()
    h.free()  # idempotent
    assert a.num_free() == 8 and h.freed
    a.assert_all_free()


def test_double_free_raises_and_never_corrupts():
    a = BlockAllocator(4)
    h = a.alloc(2, owner="r1")
    h.free()
    with pytest.raises(DoubleFreeError, match="block 0 .* is not allocated"):
        free_raw(a, [0, 1], owner="r1")
    h2 = a.alloc(2, owner="r2")
    with pytest.raises(DoubleFreeError, match="belongs to 'r2'"):
        free_raw(a, h2.blocks, owner="r1")
    with pytest.raises(DoubleFreeError):
        free_raw(a, [3], owner="r2")  # 3 is free: nothing changes
    assert a.num_free() == 2 and sorted(a.owners()) == sorted(h2.blocks)
    h3 = a.alloc(2, owner="r3")
    assert set(h3.blocks).isdisjoint(h2.blocks)
    h2.free()
    h3.free()
    a.assert_all_free()


def test_exhaustion_and_oversize():
    a = BlockAllocator(4)
    h = a.alloc(4, owner=1)
    assert a.alloc(1, owner=2) is None
    with pytest.raises(
        OversizeError, match="request needs 5 blocks but the whole pool has 4"
    ):
        a.alloc(5, owner=3)
    h.free()
    a.assert_all_free()


def test_resume_priority_blocks_new_admissions():
    a = BlockAllocator(4)
    r = a.alloc(2, owner="resumer")
    other = a.alloc(2, owner="other")
    assert a.realloc(r, 3, Priority.RESUME) is None  # needs one more than it holds
    assert a.pending_resume_blocks() == 1
    other.free()
    # 2 blocks free but 1 is promised to the resume: a new admission of 2 must wait
    assert a.alloc(2, owner="new") is None
    r2 = a.realloc(r, 3, Priority.RESUME)
    assert (
        r2 is not None and r.freed and len(r2) == 3 and a.pending_resume_blocks() == 0
    )
    new = a.alloc(1, owner="new")
    assert new is not None
    r2.free()
    new.free()
    a.assert_all_free()


def test_realloc_shrink_reuses_own_blocks():
    a = BlockAllocator(6)
    h = a.alloc(4, owner="x")
    filler = a.alloc(2, owner="y")
    h2 = a.realloc(h, 2)
    assert h2.blocks == h.blocks[:2] and a.num_free() == 2
    with pytest.raises(DoubleFreeError):
        a.realloc(h, 1)
    h2.free()
    filler.free()
    a.assert_all_free()


def test_assert_all_free_reports_owners():
    a = BlockAllocator(2, name="lang")
    h = a.alloc(1, owner="room-7")
    with pytest.raises(
        AssertionError, match="lang: 1/2 free; still allocated: {0: 'room-7'}"
    ):
        a.assert_all_free()
    a.cancel_resume("nobody")
    h.free()


def test_quarantine_is_counted_apart_and_released_by_free():
    """issue 7 item 10: quarantined blocks are neither free nor in use until freed; the three
    counts always add up to the pool."""
    a = BlockAllocator(4)
    h = a.alloc(3, owner="room-1")
    h.quarantine()
    h.quarantine()  # idempotent
    assert h.quarantined
    assert a.accounting() == dict(free=1, quarantined=3, used=0, total=4)
    assert a.alloc(2, owner="room-2") is None  # fenced blocks are not handed out
    with pytest.raises(DoubleFreeError):
        a.realloc(h, 1)
    with pytest.raises(
        AssertionError, match="quarantined: {0: 'room-1', 1: 'room-1', 2: 'room-1'}"
    ):
        a.assert_all_free()
    h.free()
    assert (
        a.accounting() == dict(free=4, quarantined=0, used=0, total=4)
        and not h.quarantined
    )
    h.free()  # idempotent
    a.assert_all_free()


def test_alloc_wait_wakes_on_free_and_on_cancel():
    """issue 7 item 11: a staging wait blocks on the allocator's condition (woken by a free or
    by notify_waiters for a cancelled request), bounded by its timeout."""
    a = BlockAllocator(2)
    h = a.alloc(2, owner="x")
    got = []
    waiter = threading.Thread(target=lambda: got.append(a.alloc_wait(2, "y", 30)))
    waiter.start()
    h.free()
    waiter.join(30)
    assert not waiter.is_alive() and got[0] is not None and got[0].owner == "y"
    cancelled = threading.Event()
    waiter = threading.Thread(
        target=lambda: got.append(a.alloc_wait(1, "z", 30, cancelled=cancelled.is_set))
    )
    waiter.start()
    cancelled.set()
    a.notify_waiters()
    waiter.join(30)
    assert not waiter.is_alive() and got[1] is None
    assert a.alloc_wait(1, "w", 0.01) is None  # times out
    got[0].free()
    a.assert_all_free()
