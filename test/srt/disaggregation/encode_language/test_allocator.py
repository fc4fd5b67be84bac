from __future__ import annotations

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
    assert h.blocks == [0, 1, 2] and (a.num_free(), a.num_used(), a.num_total()) == (5, 3, 8)
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
    h2.free(); h3.free()
    a.assert_all_free()


def test_exhaustion_and_oversize():
    a = BlockAllocator(4)
    h = a.alloc(4, owner=1)
    assert a.alloc(1, owner=2) is None
    with pytest.raises(OversizeError, match="request needs 5 blocks but the whole pool has 4"):
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
    assert r2 is not None and r.freed and len(r2) == 3 and a.pending_resume_blocks() == 0
    new = a.alloc(1, owner="new")
    assert new is not None
    r2.free(); new.free()
    a.assert_all_free()


def test_realloc_shrink_reuses_own_blocks():
    a = BlockAllocator(6)
    h = a.alloc(4, owner="x")
    filler = a.alloc(2, owner="y")
    h2 = a.realloc(h, 2)
    assert h2.blocks == h.blocks[:2] and a.num_free() == 2
    with pytest.raises(DoubleFreeError):
        a.realloc(h, 1)
    h2.free(); filler.free()
    a.assert_all_free()


def test_assert_all_free_reports_owners():
    a = BlockAllocator(2, name="lang")
    h = a.alloc(1, owner="room-7")
    with pytest.raises(AssertionError, match="lang: 1/2 free; still allocated: {0: 'room-7'}"):
        a.assert_all_free()
    a.cancel_resume("nobody")
    h.free()
