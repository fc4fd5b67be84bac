"""Block allocator for ``MultimodalDataBuffers``.

Why it exists as its own object: every leak and every "two requests share a block" bug of earlier
implementations came from block ids kept in loose lists and freed by whoever remembered them.
Here an allocation is a ``BlockHandle``; ``handle.free()`` is idempotent, and freeing a block the
allocator does not consider allocated raises ``DoubleFreeError`` *before* anything changes, so a
bug is loud and never corrupts the free list.

Priority: a request that already started transferring and needs more blocks for its next round
(a *resume*) must not starve behind new admissions, or it would hold its partial data forever.
``alloc(..., priority=Priority.RESUME)`` that cannot be satisfied registers its demand; while any
resume demand is pending, new admissions only see ``free - pending resume demand`` blocks.
A request larger than the whole pool is rejected up front with ``OversizeError``.

Quarantine: blocks a peer may still write (it was declared dead, or a write timed out, while
writing into them) must not be handed out again, yet they belong to no live request.
``handle.quarantine()`` moves them out of use into a third state; ``handle.free()`` later returns
them. ``num_free() + num_quarantined() + num_used() == num_total()`` at every moment.

``alloc_wait`` waits on a condition that every free and every ``notify_waiters()`` signals.
"""

from __future__ import annotations

import enum
import threading
import time
from typing import Callable, Dict, Hashable, List, Optional


class AllocatorError(RuntimeError):
    pass


class DoubleFreeError(AllocatorError):
    """A block was freed that is not currently allocated."""


class OversizeError(AllocatorError):
    """A request needs more blocks than the whole pool has; it can never be served."""


class Priority(enum.IntEnum):
    NEW = 0
    RESUME = 1


class BlockHandle:
    """Blocks owned by one allocation. ``free()`` is idempotent; ``blocks`` is a copy."""

    __slots__ = ("_alloc", "_blocks", "_freed", "_quarantined", "owner")

    def __init__(self, alloc: "BlockAllocator", blocks: List[int], owner: Hashable):
        self._alloc = alloc
        self._blocks = list(blocks)
        self._freed = False
        self._quarantined = False
        self.owner = owner

    @property
    def blocks(self) -> List[int]:
        return list(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def freed(self) -> bool:
        return self._freed

    @property
    def quarantined(self) -> bool:
        return self._quarantined and not self._freed

    def free(self) -> None:
        self._alloc._free_handle(self)

    def quarantine(self) -> None:
        """Out of use but not free: a peer may still write these blocks. ``free()`` ends it."""
        self._alloc._quarantine_handle(self)

    def __repr__(self) -> str:
        return (
            f"BlockHandle(owner={self.owner!r}, blocks={self._blocks}, freed={self._freed}, "
            f"quarantined={self._quarantined})"
        )


class BlockAllocator:
    """Thread-safe allocator of ``num_blocks`` block ids ``0 .. num_blocks-1``."""

    def __init__(self, num_blocks: int, name: str = "blocks"):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.name = name
        self._total = num_blocks
        # pop() gives low ids first
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))
        self._owner: Dict[int, Hashable] = {}  # blocks in use
        # blocks fenced off: not free, not in use
        self._quarantine: Dict[int, Hashable] = {}
        self._resume_demand: Dict[Hashable, int] = {}
        self._lock = threading.Lock()
        self._freed_cond = threading.Condition(self._lock)
        # Called (under the allocator's lock; it must not call back into it) whenever blocks
        # are freed: the manager wakes its control thread to retry admissions and resumes.
        self.on_free: Optional[Callable[[], None]] = None

    # Accounting ---------------------------------------------------------------------------
    def num_total(self) -> int:
        return self._total

    def num_free(self) -> int:
        with self._lock:
            return len(self._free)

    def num_used(self) -> int:
        with self._lock:
            return len(self._owner)

    def num_quarantined(self) -> int:
        with self._lock:
            return len(self._quarantine)

    def accounting(self) -> Dict[str, int]:
        """One consistent snapshot: free + quarantined + used == total."""
        with self._lock:
            return dict(
                free=len(self._free),
                quarantined=len(self._quarantine),
                used=len(self._owner),
                total=self._total,
            )

    def pending_resume_blocks(self) -> int:
        with self._lock:
            return sum(self._resume_demand.values())

    def owners(self) -> Dict[int, Hashable]:
        with self._lock:
            return dict(self._owner)

    def assert_all_free(self) -> None:
        with self._lock:
            if self._owner or len(self._free) != self._total or self._resume_demand:
                raise AssertionError(
                    f"{self.name}: {len(self._free)}/{self._total} free; still allocated: "
                    f"{dict(sorted(self._owner.items()))}; quarantined: "
                    f"{dict(sorted(self._quarantine.items()))}; pending resume demand: "
                    f"{self._resume_demand}"
                )

    # Allocation ---------------------------------------------------------------------------
    def check_fits(self, num_blocks: int) -> None:
        if num_blocks > self._total:
            raise OversizeError(
                f"{self.name}: request needs {num_blocks} blocks but the whole pool has "
                f"{self._total}; it can never be served"
            )

    def alloc(
        self, num_blocks: int, owner: Hashable, priority: Priority = Priority.NEW
    ) -> Optional[BlockHandle]:
        """Allocate ``num_blocks`` or return None (never blocks). A failed RESUME allocation
        records its demand so NEW allocations leave room for it; ``cancel_resume(owner)``
        withdraws it."""
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.check_fits(num_blocks)
        with self._lock:
            if priority == Priority.RESUME:
                if len(self._free) < num_blocks:
                    self._resume_demand[owner] = num_blocks
                    return None
                self._resume_demand.pop(owner, None)
            elif self._free_for_new_locked() < num_blocks:
                return None
            blocks = [self._free.pop() for _ in range(num_blocks)]
            for b in blocks:
                self._owner[b] = owner
            return BlockHandle(self, blocks, owner)

    def alloc_wait(
        self,
        num_blocks: int,
        owner: Hashable,
        timeout_s: float,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Optional[BlockHandle]:
        """``alloc`` that waits up to ``timeout_s`` for blocks to be freed. Returns None on
        timeout or once ``cancelled()`` (checked on every free and ``notify_waiters()``; it must
        not take a lock that is held while calling into this allocator)."""
        deadline = time.monotonic() + timeout_s
        while True:
            h = self.alloc(num_blocks, owner)
            if h is not None or cancelled():
                return h
            with self._freed_cond:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if self._free_for_new_locked() < num_blocks:
                    self._freed_cond.wait(left)

    def notify_waiters(self) -> None:
        """Wake ``alloc_wait`` callers (e.g. their request was cancelled)."""
        with self._freed_cond:
            self._freed_cond.notify_all()

    def _free_for_new_locked(self) -> int:
        return len(self._free) - sum(self._resume_demand.values())

    def realloc(
        self, handle: BlockHandle, num_blocks: int, priority: Priority = Priority.RESUME
    ) -> Optional[BlockHandle]:
        """Atomically free ``handle`` and allocate ``num_blocks`` for the same owner; the freed
        blocks are reused first, so shrinking or keeping the size always succeeds. Returns None
        (and leaves ``handle`` untouched) when it cannot be satisfied."""
        self.check_fits(num_blocks)
        with self._lock:
            if handle._freed or handle._quarantined:
                raise DoubleFreeError(
                    f"{self.name}: realloc of a released handle {handle!r}"
                )
            avail = len(self._free) + len(handle._blocks)
            if priority == Priority.NEW:
                avail -= sum(self._resume_demand.values())
            if avail < num_blocks:
                if priority == Priority.RESUME:
                    self._resume_demand[handle.owner] = num_blocks - len(handle._blocks)
                return None
            self._resume_demand.pop(handle.owner, None)
            self._release_locked(handle)
            # Most recently freed first: the handle's own blocks come back in order.
            blocks = [self._free.pop() for _ in range(num_blocks)]
            for b in blocks:
                self._owner[b] = handle.owner
            return BlockHandle(self, blocks, handle.owner)

    def cancel_resume(self, owner: Hashable) -> None:
        with self._lock:
            self._resume_demand.pop(owner, None)

    # Free ---------------------------------------------------------------------------------
    def _check_owned_locked(
        self, handle: BlockHandle, table: Dict[int, Hashable]
    ) -> None:
        for b in handle._blocks:
            if table.get(b, _MISSING) is _MISSING:
                raise DoubleFreeError(
                    f"{self.name}: block {b} of {handle!r} is not allocated (double free)"
                )
            if table[b] != handle.owner:
                raise DoubleFreeError(
                    f"{self.name}: block {b} of {handle!r} belongs to {table[b]!r}"
                )

    def _release_locked(self, handle: BlockHandle) -> None:
        table = self._quarantine if handle._quarantined else self._owner
        self._check_owned_locked(handle, table)
        for b in reversed(handle._blocks):
            del table[b]
            self._free.append(b)
        handle._freed = True
        self._freed_cond.notify_all()
        if self.on_free is not None:
            self.on_free()

    def _free_handle(self, handle: BlockHandle) -> None:
        with self._lock:
            if handle._freed:
                return  # idempotent
            self._release_locked(handle)

    def _quarantine_handle(self, handle: BlockHandle) -> None:
        with self._lock:
            if handle._freed or handle._quarantined:
                return  # idempotent
            self._check_owned_locked(handle, self._owner)
            for b in handle._blocks:
                self._quarantine[b] = self._owner.pop(b)
            handle._quarantined = True


_MISSING = object()
