"""Language side: blocks freed while an encoder may still have a write into them in flight.

The language manager frees a request's blocks without the encoder's word that its writes into
them ended when no such word can come: the encoder is declared dead, it reports a failed write
(parts may still land), or a fence timed out. Such blocks are *exposed*: every round whose
reservation includes one asks the encoder for block checksums (``Reserve.checksum``), so the
next owner's ``read_round`` catches a late write (room, generation and checksum checks).
``Exposures`` keeps them until each exposure ends, so the exposed set does not grow for good.

Why an exposure ends: a late write is a transfer-engine write the encoder started before the
blocks were freed. The encoder gives up every write at Mooncake's bound (``MC_TRANSFER_TIMEOUT`` s
+ 1 ns per byte after it started: ``connection.mooncake_timeout_s``, ``write_segments``), and
its own deadline for a round into these blocks is that plus ``data_write_timeout_s``
(``ConnectionConfig.write_deadline_s``). Giving up cancels nothing in the transport: a slice
held up by a stopped *reader* (this side) lands when it runs again (test_connection.py), which
this bound assumes happens before any new round into those blocks can. So a write that started
before ``since`` is taken not to land ``bound_s = write_deadline_s(len(blocks))`` after it,
*counted while the writer runs*: its
timers do not advance its writes while it is stopped (SIGSTOP, a frozen VM), and a resumed write
lands after its deadline has passed. So the clock does not run while this side holds the writer
dead; it restarts when the writer answers a heartbeat again (revived) or when it is forgotten
(dead ``peer_prune_s``: taken as gone; a writer stopped even longer and then resumed is outside
this bound).

A fence that timed out is different: the encoder abandoned a write at its own deadline, so
Mooncake is not timing it (``connection.ConnectionConfig``): no bound holds. Such an exposure
(``room`` set, ``bound_s`` infinite) ends only when the encoder says the write ended: its
``AbortAck`` for the room (returned complete), or its ``Abort(write_failed)`` (returned failed:
the bound above holds from then).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable, List, Optional, Set, Tuple

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Exposure:
    writer: str  # the encoder whose write may still land
    blocks: Tuple[int, ...]
    since: float  # monotonic; the bound counts from here (while the writer runs)
    bound_s: float
    # a timed-out fence's room: unbounded until the encoder says the write ended
    room: Optional[int] = None


class Exposures:
    """The exposed blocks of one language manager (``blocks``). Not thread-safe: the caller
    holds the manager's lock. ``bound_s(num_blocks)``: how long after it started a write into
    that many blocks can still land (``ConnectionConfig.write_deadline_s``)."""

    def __init__(self, bound_s: Callable[[int], float]):
        self._bound_s = bound_s
        self._exposures: List[_Exposure] = []
        self.blocks: Set[int] = set()

    def add(self, writer: str, blocks, room: Optional[int] = None) -> None:
        """``blocks`` are about to be freed while ``writer`` may still write them (with
        ``room``: a timed-out fence's write, unbounded)."""
        bound = math.inf if room is not None else self._bound_s(len(blocks))
        self._exposures.append(
            _Exposure(writer, tuple(blocks), time.monotonic(), bound, room)
        )
        self.blocks.update(blocks)

    def write_returned(self, writer: str, room: int, complete: bool) -> None:
        """The encoder says its write of ``room`` past a timed-out fence returned: the
        exposure ends (``complete``) or takes the write's bound from now (failed)."""
        for e in self._exposures:
            if e.room == room and e.writer == writer:
                e.room, e.since = None, time.monotonic()
                e.bound_s = 0.0 if complete else self._bound_s(len(e.blocks))

    def writer_revived(self, writer: str) -> None:
        """The writer runs again: a write it had in flight ends within the bound from now."""
        for e in self._exposures:
            if e.writer == writer:
                e.since = max(e.since, time.monotonic())

    def expire(self, now: float, is_dead: Callable[[str], bool]) -> float:
        """End the exposures whose bound has passed (their writer not held dead); return
        when the next one ends (``math.inf``: none)."""
        due = math.inf
        kept = []
        for e in self._exposures:
            if is_dead(e.writer):
                e.since = now  # its writes do not advance while it is stopped
            if now - e.since < e.bound_s:
                kept.append(e)
                due = min(due, e.since + e.bound_s)
        if len(kept) != len(self._exposures):
            ended = len(self._exposures) - len(kept)
            self._exposures = kept
            self.blocks = {b for e in kept for b in e.blocks}
            logger.info(
                "language: %d exposures ended (%d blocks still exposed)",
                ended,
                len(self.blocks),
            )
        return due
