"""Language side: ``LanguageManager`` (one per language server, on its rank 0) and
``LanguageReceiver`` (one per request).

Lifecycle of a receiver (``Phase``; ``KVPoll`` values in brackets)::

    create_receiver ─> REGISTER [Bootstrapping] ─ack ok, Expect sent─> ANNOUNCE [Bootstrapping]
      ─Announce(T, M, items, ids, positions)─> [MATCH ─held items─>] ALLOC [Bootstrapping]
      ─min(blocks for T, reserve) blocks─>
      RESERVED r=0 [WaitingForInput] ─RoundDone(partial)─> RESUME_ALLOC [Transferring]
      ─blocks─> RESERVED r+1 [Transferring] ─ ... ─> RoundDone(last) ─> DONE [Success] ─> take()
    MATCH ─every item held─> AllHeld sent, DONE [Success] (no blocks, no round) ─> take()
    ANNOUNCE, MATCH, ALLOC, RESERVED r=0 ─Unregistered─> REGISTER (register again; blocks freed)
    any ─failure─> DONE [Failed]

Admission: a request holds no blocks until the encoder announces its exact shape (it does so
once it holds the request and its Expect); then it reserves
``min(blocks for T, reserve)`` blocks, in announcement order (nobody overtakes), waiting in ALLOC
without a timer: waiting for blocks is load, not a fault (a dead encoder is found by heartbeats).
Pairing (``ANNOUNCE``) is bounded by ``bootstrap_timeout_s + transfer_grace_s``, so the
encoder's own pairing verdict (``bootstrap_timeout_s``) arrives first; reserved round 0 -> its
first round by ``waiting_timeout_s``.

Prefix-aware skip (``prefix_match``): an announcement that carries the request's ids waits in
``MATCH`` until the scheduler thread, which owns the prefix cache, has matched them there and
locked what it holds (``LanguageReceiver.match_wanted`` / ``set_held``); the round-0
``Reserve`` names those items (``held_items``) and the encoder sends no rows for them
(``RoundDone.held_items`` says which it left out). When it holds every item, the request
needs nothing the announcement did not carry (ids, M-RoPE positions and delta): it succeeds at
once with no blocks and no round, and the encoder is told (``AllHeld``), so a later turn of a
chat over one image waits for neither the encoder nor a transfer. No timer: the scheduler
answers within an iteration, and a dead encoder is found by heartbeats.

``Phase`` has one transition function (``LanguageReceiver._transition``) that refuses any edge
not in ``_TRANSITIONS``.

* Resume: after a partial round the received rows are *copied* into the request's own tensors
  (lesson 2), then the reservation is resized atomically to ``min(remaining, resume_tokens)`` with
  ``Priority.RESUME``; with the default ``resume_tokens`` (= the initial reservation) that reuses
  the request's own blocks and can never wait. Data already received is never asked for again.
* The encoder may write a request's blocks only while it is RESERVED. A request that fails there
  while its encoder is alive (timeout, local abort, the encoder's write timed out) does not free
  its blocks: they are *fenced* (quarantined in the allocator, counted apart from free and in
  use) and the encoder is asked to abort, every ``abort_ack_timeout_s``, until its ``AbortAck``
  for the room, or until ``fence_timeout_s`` (logged). Where no AbortAck can come (the encoder is
  declared dead, or reports a failed write: ``Abort.write_failed``, parts may still land) the
  blocks are not fenced but freed at once as *exposed*, as are a fence timeout's: a late write may
  still land in them, so every round whose reservation includes an exposed block asks the encoder
  for block checksums (``Reserve.checksum``) and the next owner's ``read_round`` catches such a
  write (room, generation and checksum checks). Exposure ends after a bound derived from
  Mooncake's own transfer timeout (exposures.py), so the exposed set does not grow for good.
  Other rounds skip the checksum
  pass on both sides: every other way a block comes back (the last round's ``RoundDone``, an
  ``AbortAck``, an ``Abort`` without pending writes, a failure outside RESERVED) follows the end
  of the encoder's last write into it. The room/generation stamp is checked in every round.
* A request for an encoder this side has declared dead fails at once (``FaultKind.UNAVAILABLE``)
  instead of waiting ``bootstrap_timeout_s`` with blocks held; the encoder is still pinged, and
  its next pong makes requests to it go through again.
* Every failure carries a ``FaultKind`` (``receiver.kind``; from the encoder: ``Abort.kind``).
* Registrations carry an epoch. An encoder that no longer holds ours answers an Expect or a
  reservation with ``Unregistered``; the registration is dropped and receivers that have not
  received a round register again and send their Expect again.
* Status tables are dropped as soon as a request ends; a receiver keeps its own result.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import math
import time
from typing import Dict, List, Optional, Tuple

import torch

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.allocator import (
    BlockHandle,
    OversizeError,
    Priority,
)
from sglang.srt.disaggregation.encode_language.buffers import (
    MultimodalBufferConfig,
    RoundStamp,
)
from sglang.srt.disaggregation.encode_language.connection import (
    ConnectionConfig,
    ManagerBase,
    RoomInUseError,
    TransferError,
    WakePipe,
    peer_endpoint,
)
from sglang.srt.disaggregation.encode_language.exposures import Exposures
from sglang.srt.disaggregation.encode_language.manifest import (
    Abort,
    AbortAck,
    AllHeld,
    Announce,
    Expect,
    FaultKind,
    LayoutMismatchError,
    ProtocolError,
    Register,
    RegisterAck,
    RequestManifest,
    RequestShape,
    Reserve,
    RoundDone,
    Unregistered,
    make,
)
from sglang.srt.disaggregation.encode_language.payload import (
    ReceivedData,
    alloc_received,
    slice_received,
)
from sglang.srt.disaggregation.encode_language.round_plan import blocks_for_tokens

logger = logging.getLogger(__name__)

# How often an Abort the full control queue refused is offered again (``unsent_aborts``).
UNSENT_ABORT_RETRY_S = 1.0


class Phase(enum.Enum):
    """Where a receiver is; finer than ``KVPoll``."""

    REGISTER = "register"  # waiting for the encoder to accept our registration
    # Expect sent: waiting for the encoder's announcement of the shape
    ANNOUNCE = "announce"
    # announced: waiting for the scheduler's prefix match (prefix_match only)
    MATCH = "match"
    ALLOC = "alloc"  # announced: waiting for blocks (queued, in announcement order)
    RESERVED = "reserved"  # Reserve sent: the encoder may be writing our blocks
    # round copied out; waiting for the next round's blocks
    RESUME_ALLOC = "resume_alloc"
    DONE = "done"  # ended; blocks freed or fenced


_TRANSITIONS = {
    Phase.REGISTER: {Phase.ANNOUNCE, Phase.DONE},
    Phase.ANNOUNCE: {Phase.MATCH, Phase.ALLOC, Phase.REGISTER, Phase.DONE},
    Phase.MATCH: {Phase.ALLOC, Phase.REGISTER, Phase.DONE},
    Phase.ALLOC: {Phase.RESERVED, Phase.REGISTER, Phase.DONE},
    Phase.RESERVED: {Phase.RESUME_ALLOC, Phase.REGISTER, Phase.DONE},
    Phase.RESUME_ALLOC: {Phase.RESERVED, Phase.DONE},
    Phase.DONE: set(),
}


@dataclasses.dataclass
class _Registration:
    epoch: int
    ok: Optional[bool] = None  # None = pending
    error: str = ""


@dataclasses.dataclass
class _Fence:
    """Blocks of a failed request that its encoder may still write."""

    encoder: str
    room: int
    handle: BlockHandle
    since: float
    asked_at: float
    reason: str
    kind: FaultKind = FaultKind.INTERNAL


@dataclasses.dataclass
class _RoundCopy:
    """One round to copy out of its blocks, as checked under the lock (``_on_round_done``)."""

    msg: RoundDone
    blocks: List[int]
    expect: RoundStamp
    verify: bool  # the round carries block checksums (``Reserve.checksum``)
    # the request's tensors (``alloc_received``); None before its first round
    dest: Optional[ReceivedData]


class LanguageManager(ManagerBase):
    """Owns the language server's buffers; drives every receiver from its control thread."""

    role = "language"

    def __init__(
        self,
        buffer_config: MultimodalBufferConfig,
        config: Optional[ConnectionConfig] = None,
        engine=None,
        rows_device: Optional[str] = None,
        prefix_match: bool = False,
    ):
        """``rows_device``: where ``take()``'s multimodal rows live (None = host memory, pinned
        when the buffers are; e.g. ``"cuda:0"`` = copied from the pinned blocks straight to
        the GPU). Either way each round is copied once, into the request's final tensors.
        ``prefix_match``: announcements wait in ``MATCH`` for the owner of a prefix cache to
        say which items it holds (``LanguageReceiver.set_held``).
        """
        self.rows_device = rows_device
        self.prefix_match = prefix_match
        self.rooms: Dict[int, "LanguageReceiver"] = {}
        self.registrations: Dict[str, _Registration] = {}
        self.fences: Dict[Tuple[str, int], _Fence] = {}
        # Aborts of unfenced rooms the control queue refused (full): re-sent every tick until
        # queued, else the encoder's room could wait for a reservation without a timer.
        self.unsent_aborts: Dict[Tuple[str, int], Tuple[str, FaultKind]] = {}
        # Blocks freed without the encoder's word that its writes into them ended (a dead
        # encoder, a failed write, a fence timeout): rounds that use them are checksummed
        # until their exposure ends (exposures.py).
        self.exposures = Exposures(
            lambda n: self.config.write_deadline_s(n, sum(self.layout.slot_block_bytes))
        )
        self._epochs = itertools.count(1)
        self._generations = itertools.count(1)
        # Posted when the scheduler thread has something to do for a receiver (it succeeded
        # or failed, or waits in MATCH): a scheduler with nothing else to run sleeps on it
        # (LanguageMMReceiver.sleep_until_progress). Made before the control thread starts.
        self.scheduler_wakeups = WakePipe()
        try:
            super().__init__(buffer_config, config, engine)
        except BaseException:
            self.scheduler_wakeups.close()
            raise
        # Freed blocks may unblock an admission or a resume: the control thread looks at once.
        # (The encoder's staging pool needs no such hook: its waits block on the allocator.)
        self.allocator.on_free = self.channel.wake

    # Public API -----------------------------------------------------------------------------
    def create_receiver(
        self,
        bootstrap_addr: str,
        room: int,
        reserve_tokens: Optional[int] = None,
        max_tokens: int = 0,
    ) -> "LanguageReceiver":
        """Start receiving request ``room`` from the encoder at ``bootstrap_addr``: register
        (if needed) and tell the encoder it is expected; no blocks are held until the encoder
        announces the request's shape. Raises RoomInUseError when the room is live (or still
        fenced) here; a request that can never fit this pool fails at its announcement.
        """
        # as the encoder's manager id spells it
        bootstrap_addr = peer_endpoint(bootstrap_addr)
        reserve = reserve_tokens or self.config.default_reserve_tokens
        nb = blocks_for_tokens(reserve, self.layout.block_size)
        with self.lock:
            if room in self.rooms:
                raise RoomInUseError(
                    f"bootstrap room {room} is already in use by an active request on this language server"
                )
            if (bootstrap_addr, room) in self.fences:
                raise RoomInUseError(
                    f"bootstrap room {room} is still fenced: encoder {bootstrap_addr} may be writing "
                    f"its earlier blocks"
                )
            r = LanguageReceiver(self, bootstrap_addr, room, nb, max_tokens)
            self.rooms[room] = r
            if self.peer_is_dead(bootstrap_addr):
                # No blocks taken, nothing sent: it fails now, not after bootstrap_timeout_s.
                self._fail_locked(
                    r,
                    f"encoder {bootstrap_addr} is declared dead (it missed "
                    f"{self.config.heartbeat_max_failures} heartbeats); requests to it fail "
                    f"until it answers a heartbeat again",
                    notify=False,
                    kind=FaultKind.UNAVAILABLE,
                )
                return r
            self._advance_locked(r, time.monotonic())
        self.wake()  # its timers (and heartbeat to a new peer) start now
        return r

    def close(self) -> None:
        super().close()
        self.scheduler_wakeups.close()

    def num_active_rooms(self) -> int:
        with self.lock:
            return len(self.rooms)

    # Progress ---------------------------------------------------------------------------------
    def _advance_locked(self, r: "LanguageReceiver", now: float) -> None:
        """REGISTER: register with the encoder if needed; once acknowledged, send the Expect
        (ANNOUNCE). Blocks come only after the announcement (``_admit_locked``)."""
        if r.phase == Phase.REGISTER:
            reg = self.registrations.get(r.encoder)
            if reg is None or (reg.ok is False and self.peer_is_dead(r.encoder)):
                reg = self._register_locked(r.encoder, now)
            if reg.ok is None:
                return
            if reg.ok is False:
                self._fail_locked(r, reg.error, kind=FaultKind.INTERNAL)
                return
            self._expect_locked(r, reg.epoch, now)

    def _expect_locked(self, r: "LanguageReceiver", epoch: int, now: float) -> None:
        r._transition(Phase.ANNOUNCE, now)
        r.epoch = epoch
        # the encoder knows the room from now on: a failure tells it
        r.reserved_once = True
        msg = make(
            Expect,
            room=r.room,
            manager_id=self.manager_id,
            epoch=epoch,
            max_tokens=r.max_tokens,
        )
        self.channel.send(r.encoder, msg)

    def _on_announce(self, msg: Announce) -> None:
        """The encoder holds the request and this side expects it: check its size
        against this side (a request over ``max_tokens`` or one that can never fit the pool
        fails on both sides, a client fault), then queue for ``min(blocks for T, reserve)``
        blocks."""
        now = time.monotonic()
        with self.lock:
            r = self._room_from(msg, msg.manager_id)
            if r is None or r.phase != Phase.ANNOUNCE:
                logger.debug("language: stale Announce for room %d", msg.room)
                return
            T, M = msg.total_tokens, msg.mm_tokens
            if T < 1 or not (0 <= M <= T):
                self._fail_locked(
                    r, f"announcement has inconsistent counts: T={T} M={M}"
                )
                return
            if r.max_tokens and T > r.max_tokens:
                self._fail_locked(
                    r,
                    f"request has {T} tokens but the language server accepts at most "
                    f"{r.max_tokens}",
                    kind=FaultKind.CLIENT,
                )
                return
            nb = min(blocks_for_tokens(T, self.layout.block_size), r.reserve_blocks)
            try:
                self.allocator.check_fits(nb)
            except OversizeError as e:
                self._fail_locked(r, str(e), kind=FaultKind.CLIENT)
                return
            if msg.input_ids and len(msg.input_ids) != T:
                self._fail_locked(
                    r, f"announcement has {len(msg.input_ids)} ids for T={T} tokens"
                )
                return
            if msg.mrope_positions and len(msg.mrope_positions) != 3 * T:
                self._fail_locked(
                    r,
                    f"announcement has {len(msg.mrope_positions)} M-RoPE positions for "
                    f"T={T} tokens (3 x T expected)",
                )
                return
            r.shape = RequestShape(
                T,
                M,
                list(msg.items),
                list(msg.input_ids),
                list(msg.mrope_positions),
                msg.mrope_delta,
            )
            r.alloc_blocks = nb
            if self.prefix_match and msg.input_ids and msg.items:
                # the scheduler thread answers (set_held)
                r._transition(Phase.MATCH, now)
                self.scheduler_wakeups.wake()
                return
            r._transition(Phase.ALLOC, now)
            self._admit_locked(now)

    def _set_held(self, r: "LanguageReceiver", held: List[int]) -> bool:
        """The prefix cache's answer for ``r`` (in ``MATCH``): it queues for blocks, and its
        round-0 Reserve names ``held``; if ``held`` is every item and the announcement
        carried the positions, the request needs no round (``_complete_held_locked``).
        False when ``r`` left ``MATCH`` meanwhile (failed, or registering again): the
        caller's lock is not needed."""
        with self.lock:
            if r.phase != Phase.MATCH:
                return False
            r.held = tuple(sorted(held))
            shape = r.shape
            if shape.mrope_positions and r.held == tuple(range(len(shape.items))):
                if self._complete_held_locked(r):
                    return True
            r._transition(Phase.ALLOC, time.monotonic())
            self._admit_locked(time.monotonic())
        return True

    def _complete_held_locked(self, r: "LanguageReceiver") -> bool:
        """Every item of ``r`` is held: its data is the announcement's ids and positions (no
        multimodal rows, no token marked multimodal); no block is taken, and the encoder is
        told (``AllHeld``) that the request needs no round. Success at once; False (nothing
        changed: it reserves as usual) when the control queue to the encoder is full, since
        an encoder never told would wait for a reservation for good."""
        if not self.channel.send(
            r.encoder, make(AllHeld, room=r.room, manager_id=self.manager_id)
        ):
            return False
        shape = r.shape
        T = shape.total_tokens
        data = alloc_received(self.layout, T, 0, self.rows_device, self.buffers.pinned)
        data.fill_ids.copy_(torch.tensor(shape.input_ids))
        data.mrope_positions.copy_(torch.tensor(shape.mrope_positions).view(3, T))
        data.mm_mask.zero_()
        r.data = data
        r.manifest = RequestManifest(
            total_tokens=T,
            mm_tokens=0,
            mrope_delta=shape.mrope_delta,
            deepstack_count=self.layout.deepstack_count,
            embed_dtype=self.layout.embed_dtype,
            hidden_size=self.layout.hidden_size,
        )
        r.items, r.rows_left_out = tuple(shape.items), r.held
        r._set_status(KVPoll.Success)
        self._release_locked(r)
        return True

    def _admit_locked(self, now: float) -> None:
        """Blocks for announced receivers (ALLOC), in announcement order: the first that does
        not fit waits, and every later one with it (nobody overtakes). Freed blocks wake the
        control thread, which comes back here."""
        queued = [r for r in self.rooms.values() if r.phase == Phase.ALLOC]
        for r in sorted(queued, key=lambda r: r.phase_since):
            h = self.allocator.alloc(r.alloc_blocks, owner=("room", r.room))
            if h is None:
                return
            r.handle = h
            self._reserve_locked(r, r.epoch, now)

    def _register_locked(self, encoder: str, now: float) -> _Registration:
        reg = self.registrations[encoder] = _Registration(epoch=next(self._epochs))
        self.last_active[encoder] = now
        msg = make(
            Register,
            manager_id=self.manager_id,
            epoch=reg.epoch,
            session_id=self.session_id,
            layout=self.layout,
            slot_ptrs=self.buffers.slot_ptrs(),
            slot_block_bytes=self.buffers.slot_block_bytes(),
        )
        self.channel.send(encoder, msg)
        return reg

    def _reserve_locked(self, r: "LanguageReceiver", epoch: int, now: float) -> None:
        r._transition(Phase.RESERVED, now)
        r.epoch = epoch
        r.generation = next(self._generations)
        r.reserved_once = True
        r.checksum = not self.exposures.blocks.isdisjoint(r.handle.blocks)
        r._set_status(KVPoll.WaitingForInput if r.round == 0 else KVPoll.Transferring)
        msg = make(
            Reserve,
            room=r.room,
            manager_id=self.manager_id,
            epoch=epoch,
            round=r.round,
            generation=r.generation,
            blocks=r.handle.blocks,
            max_tokens=r.max_tokens,
            checksum=r.checksum,
            held_items=list(r.held) if r.round == 0 else [],
        )
        self.channel.send(r.encoder, msg)

    def _handle(self, msg) -> None:
        if isinstance(msg, RegisterAck):
            self._on_register_ack(msg)
        elif isinstance(msg, Announce):
            self._on_announce(msg)
        elif isinstance(msg, Unregistered):
            self._on_unregistered(msg)
        elif isinstance(msg, RoundDone):
            self._on_round_done(msg)
        elif isinstance(msg, Abort):
            self._on_abort(msg)
        elif isinstance(msg, AbortAck):
            with self.lock:
                self._release_fence_locked((msg.manager_id, msg.room), "abort_ack")
                self.exposures.write_returned(msg.manager_id, msg.room, complete=True)
            self.wake()  # an exposure may have ended
        else:
            logger.warning(
                "language: unexpected control message %s; dropped", type(msg).__name__
            )
            self.channel.rejected += 1

    def _room_from(self, msg, encoder: str) -> Optional["LanguageReceiver"]:
        """The live receiver ``msg`` concerns, if ``encoder`` (the message's sender) is its
        encoder; a message about a room from another manager is logged and dropped."""
        r = self.rooms.get(msg.room)
        if r is not None and r.encoder != encoder:
            logger.warning(
                "language: %s for room %d from %s, but the room's encoder is %s; dropped",
                type(msg).__name__,
                msg.room,
                encoder,
                r.encoder,
            )
            self.channel.rejected += 1
            return None
        return r

    def _on_register_ack(self, msg: RegisterAck) -> None:
        now = time.monotonic()
        with self.lock:
            # The epoch (unique on this manager) names the registration answered: the encoder
            # signs with its advertised address, we registered where the router sent us.
            endpoint = next(
                (ep for ep, g in self.registrations.items() if g.epoch == msg.epoch),
                None,
            )
            if endpoint is None:
                logger.warning(
                    "language: RegisterAck from %s (epoch %s) that no registration names "
                    "(registered: %s): a late answer; dropped",
                    msg.manager_id,
                    msg.epoch,
                    sorted(self.registrations),
                )
                return
            reg = self.registrations[endpoint]
            ok, error = msg.ok, msg.error
            other = self.reached_at.get(msg.manager_id, msg.manager_id)
            if other != endpoint and other in self.registrations:
                ok, error = False, (
                    f"encoder {msg.manager_id} is registered here through {other} already; "
                    f"one encoder reached through two addresses ({other}, {endpoint}) is "
                    "not supported: give the router one URL per encoder"
                )
            elif msg.manager_id != endpoint:
                self.reached_at[msg.manager_id] = endpoint  # ManagerBase._dispatch
            else:
                self.reached_at.pop(msg.manager_id, None)
            try:
                self.layout.check_compatible(msg.layout, where="encoder")
            except LayoutMismatchError as e:
                ok, error = False, str(e)
            if not ok:
                logger.error("language: registration refused: %s", error)
            reg.ok, reg.error = ok, error
            for r in list(self.rooms.values()):
                if r.phase == Phase.REGISTER:
                    self._advance_locked(r, now)

    def _on_unregistered(self, msg: Unregistered) -> None:
        now = time.monotonic()
        with self.lock:
            reg = self.registrations.get(msg.manager_id)
            if reg is not None and reg.epoch == msg.epoch:
                logger.warning(
                    "language: encoder %s no longer holds registration epoch %d; registering again",
                    msg.manager_id,
                    msg.epoch,
                )
                del self.registrations[msg.manager_id]
            r = self._room_from(msg, msg.manager_id)
            if r is None or r.epoch != msg.epoch:
                return
            if r.phase in (Phase.ANNOUNCE, Phase.MATCH, Phase.ALLOC) or (
                r.phase == Phase.RESERVED and r.round == 0
            ):
                # The encoder refused our Expect or round-0 Reserve before keeping it (no
                # write can come): free the blocks, register and expect again.
                if r.handle is not None:
                    r.handle.free()
                    r.handle = None
                r._transition(Phase.REGISTER, now)
                self._advance_locked(r, now)
            elif r.phase == Phase.RESERVED:
                self._fail_locked(
                    r,
                    f"encoder {r.encoder} dropped our registration during the request",
                    fence=False,
                    notify=False,
                    kind=FaultKind.UNAVAILABLE,
                )

    def _on_abort(self, msg: Abort) -> None:
        with self.lock:
            key = (msg.manager_id, msg.room)
            if msg.write_failed:  # a write past a timed-out fence ended (failed)
                self.exposures.write_returned(msg.manager_id, msg.room, complete=False)
                self.wake()  # its bound runs from now
            if key in self.fences:
                if msg.write_failed:
                    # no AbortAck will come: freed now, exposed
                    self._release_fence_locked(
                        key, "the encoder's write failed", acked=False
                    )
                elif not msg.writes_pending:
                    self._release_fence_locked(key, "abort from the encoder")
                return
            r = self._room_from(msg, msg.manager_id)
            if r is None:
                return
            # The encoder sends Abort with writes_pending=False only when none of its writes
            # is in flight; with True, a timed-out or failed write may still land: fenced
            # until the AbortAck of a timed-out write, exposed at once for a failed one
            # (parts may still land, and nothing will say when they ended).
            fence = (
                msg.writes_pending or msg.write_failed
            ) and r.phase == Phase.RESERVED
            self._fail_locked(
                r,
                f"encoder {msg.manager_id} aborted: {msg.reason}",
                fence=fence,
                notify=False,
                kind=msg.kind,
                expose=msg.write_failed,
            )

    def _on_round_done(self, msg: RoundDone) -> None:
        """Check the round under the lock, copy it out of the blocks *without* the lock (the
        scheduler thread's ``create_receiver`` and ``abort`` take it: a 32 MiB copy must not
        stall a decode step), then commit under the lock. While it copies the receiver is
        marked ``copying``: a failure meanwhile ends it at once (Failed) but leaves its blocks
        to this method, which frees them once the copy is done (``_fail_locked``)."""
        with self.lock:
            r = self._room_from(msg, msg.manager_id)
            if r is None or r.phase != Phase.RESERVED or msg.round != r.round:
                logger.debug(
                    "language: stale RoundDone for room %d round %d",
                    msg.room,
                    msg.round,
                )
                return
            try:
                job = self._check_round_locked(r, msg)
            except Exception as e:
                self._bad_round_locked(r, msg, e)
                return
            r.copying = True
        data = error = None
        try:
            data = self._copy_round(job)
        except Exception as e:
            error = e
        now = time.monotonic()
        with self.lock:
            r.copying = False
            if r.status == KVPoll.Failed:
                # Failed while copying (an abort, a dead encoder): the encoder's writes into the
                # blocks ended with its RoundDone, so they are freed (here, once), not fenced;
                # after the last round the encoder has nothing left to abort.
                self._fail_locked(
                    r,
                    r.reason,
                    fence=False,
                    notify=r.notify_after_copy and not msg.last,
                    kind=r.kind,
                )
                return
            try:
                if error is not None:
                    raise error
                self._commit_round_locked(r, msg, job, data)
            except Exception as e:
                self._bad_round_locked(r, msg, e)
                return
            if msg.last:
                r._set_status(KVPoll.Success)
                self._release_locked(r)
                return
            r.round += 1
            r._set_status(KVPoll.Transferring)
            r._transition(Phase.RESUME_ALLOC, now)
            self._try_resume_locked(r, now)

    def _bad_round_locked(self, r: "LanguageReceiver", msg: RoundDone, e) -> None:
        logger.error(
            "language: bad round %d of room %d: %s",
            msg.round,
            msg.room,
            e,
            exc_info=e,
        )
        # The encoder finished writing this round: nothing is in flight.
        self._fail_locked(r, f"invalid data in round {msg.round}: {e}", fence=False)

    def _check_round_locked(
        self, r: "LanguageReceiver", msg: RoundDone
    ) -> "_RoundCopy":
        """What ``msg`` says against what ``r`` expects; the copy to make (``_copy_round``)."""
        B = self.layout.block_size
        cap = len(r.handle) * B
        if msg.generation != r.generation:
            raise ProtocolError(
                f"round_done names reservation generation {msg.generation}, ours is {r.generation}"
            )
        if msg.token_start != r.tokens_received or msg.mm_start != r.mm_received:
            raise ProtocolError(
                f"round covers tokens from {msg.token_start} / rows from {msg.mm_start}, "
                f"expected {r.tokens_received} / {r.mm_received}"
            )
        if not (0 < msg.token_count <= cap) or not (0 <= msg.mm_count <= cap):
            raise ProtocolError(
                f"round of {msg.token_count} tokens / {msg.mm_count} rows exceeds {cap} reserved"
            )
        if msg.token_start + msg.token_count > msg.total_tokens:
            raise ProtocolError(
                f"round_done tokens [{msg.token_start}, {msg.token_start + msg.token_count}) "
                f"exceed total_tokens {msg.total_tokens}"
            )
        if msg.mm_start + msg.mm_count > msg.mm_tokens:
            raise ProtocolError(
                f"round_done rows [{msg.mm_start}, {msg.mm_start + msg.mm_count}) "
                f"exceed mm_tokens {msg.mm_tokens}"
            )
        if r.max_tokens and msg.total_tokens > r.max_tokens:
            raise ProtocolError(
                f"request has {msg.total_tokens} tokens, this side accepts {r.max_tokens}"
            )
        if msg.mm_tokens > msg.total_tokens:
            raise ProtocolError(
                f"round_done says {msg.mm_tokens} multimodal of {msg.total_tokens} tokens"
            )
        if r.data is not None and (
            r.data.fill_ids.shape[0],
            r.data.embeddings.shape[0],
        ) != (msg.total_tokens, msg.mm_tokens):
            raise ProtocolError("request size changed between rounds")
        if not set(msg.held_items) <= set(r.held):
            raise ProtocolError(
                f"round_done leaves out the rows of items {list(msg.held_items)}, this side "
                f"holds only {list(r.held)}"
            )
        if r.shape is not None and msg.mm_tokens != r.shape.mm_tokens - (
            r.shape.held_tokens(msg.held_items)
        ):
            raise ProtocolError(
                f"round_done sends {msg.mm_tokens} rows; the announcement's "
                f"{r.shape.mm_tokens} less the held items' would be "
                f"{r.shape.mm_tokens - r.shape.held_tokens(msg.held_items)}"
            )
        return _RoundCopy(
            blocks=r.handle.blocks,
            expect=RoundStamp(r.room, r.generation, msg.token_start // B),
            dest=r.data,
            msg=msg,
            verify=r.checksum,
        )

    def _copy_round(self, job: "_RoundCopy") -> ReceivedData:
        """Copy (and, where asked, checksum) one round out of its blocks into the request's
        tensors (``job.dest``, allocated here at the first round); runs without the manager
        lock. Returns the round's part of them, with the manifest read from the blocks.
        """
        msg = job.msg
        if job.dest is None:  # first round: the request's tensors, filled in place
            job.dest = alloc_received(
                self.layout,
                msg.total_tokens,
                msg.mm_tokens,
                self.rows_device,
                self.buffers.pinned,
            )
        return self.buffers.read_round(
            job.blocks,
            msg.token_count,
            msg.mm_count,
            job.expect,
            out=slice_received(
                job.dest, msg.token_start, msg.token_count, msg.mm_start, msg.mm_count
            ),
            verify=job.verify,
        )

    def _commit_round_locked(
        self,
        r: "LanguageReceiver",
        msg: RoundDone,
        job: "_RoundCopy",
        data: ReceivedData,
    ) -> None:
        """The copied round's manifest and bitmap against the request; then it counts."""
        manifest = data.manifest
        manifest.check_against(self.layout)
        if (manifest.total_tokens, manifest.mm_tokens) != (
            msg.total_tokens,
            msg.mm_tokens,
        ):
            raise ProtocolError(
                "aux manifest and RoundDone disagree on the request size"
            )
        if r.manifest is not None and manifest != r.manifest:
            raise ProtocolError("request manifest changed between rounds")
        mm_bits = r.mm_bits + int(data.mm_mask.sum())
        done_tokens = r.tokens_received + msg.token_count
        done_rows = r.mm_received + msg.mm_count
        if mm_bits > manifest.mm_tokens:
            raise ProtocolError(
                f"multimodal bitmap marks {mm_bits} tokens so far, manifest says {manifest.mm_tokens}"
            )
        if msg.last:
            if (done_tokens, done_rows) != (manifest.total_tokens, manifest.mm_tokens):
                raise ProtocolError(
                    f"last round ends at {done_tokens} tokens / {done_rows} rows, manifest says "
                    f"{manifest.total_tokens} / {manifest.mm_tokens}"
                )
            if mm_bits != manifest.mm_tokens:
                raise ProtocolError(
                    f"multimodal bitmap marks {mm_bits} tokens, manifest says {manifest.mm_tokens}"
                )
        r.data = job.dest
        r.manifest = manifest
        r.tokens_received, r.mm_received, r.mm_bits = done_tokens, done_rows, mm_bits
        if msg.last:
            r.items = tuple(msg.items)
            r.rows_left_out = tuple(msg.held_items)

    def _try_resume_locked(self, r: "LanguageReceiver", now: float) -> None:
        B = self.layout.block_size
        remaining = r.manifest.total_tokens - r.tokens_received
        tokens = min(remaining, self.config.resume_tokens or r.reserve_blocks * B)
        h = self.allocator.realloc(
            r.handle, blocks_for_tokens(tokens, B), Priority.RESUME
        )
        if h is None:
            return
        r.handle = h
        reg = self.registrations.get(r.encoder)
        if reg is None or not reg.ok:
            self._fail_locked(
                r,
                f"encoder {r.encoder} is no longer registered",
                fence=False,
                notify=False,
                kind=FaultKind.UNAVAILABLE,
            )
            return
        self._reserve_locked(r, reg.epoch, now)

    # Failure / release ----------------------------------------------------------------------------
    def _fail_locked(
        self,
        r: "LanguageReceiver",
        reason: str,
        fence: Optional[bool] = None,
        notify: bool = True,
        kind: FaultKind = FaultKind.INTERNAL,
        expose: bool = False,
    ) -> None:
        """Fail ``r`` and end it. ``fence`` (default: the encoder may be writing, i.e. RESERVED)
        quarantines its blocks and asks the encoder to abort, until its AbortAck; with
        ``expose`` (no AbortAck can come: the encoder is declared dead, or its write failed)
        they are freed at once instead, exposed to the late write (``Exposures``). Otherwise
        the blocks are freed and the encoder, if it knows the room and ``notify``, is told.
        """
        if fence is None:
            fence = r.phase == Phase.RESERVED
        r.data = None  # a failed request's partial rows are never handed out
        if r.status != KVPoll.Failed:
            r.reason, r.kind = reason, kind
            r._set_status(KVPoll.Failed)
            logger.info("language: room %d failed (%s): %s", r.room, kind.value, reason)
        if r.copying:
            # _on_round_done is copying a round out of r's blocks (the encoder's writes into
            # them ended with its RoundDone): it frees them once the copy is done, not now.
            r.notify_after_copy = r.notify_after_copy and notify
            return
        if fence and expose and r.handle is not None:
            self.exposures.add(r.encoder, r.handle.blocks)
            if notify:  # it drops the room if it comes back
                self._send_abort(r.encoder, r.room, reason, kind)
        elif fence and r.handle is not None:
            now = time.monotonic()
            r.handle.quarantine()
            self.fences[(r.encoder, r.room)] = _Fence(
                r.encoder, r.room, r.handle, now, now, reason, kind
            )
            r.handle = None
            self._send_abort(r.encoder, r.room, reason, kind)
        elif notify and r.reserved_once:
            if not self._send_abort(r.encoder, r.room, reason, kind):
                self.unsent_aborts[(r.encoder, r.room)] = (reason, kind)
        self._release_locked(r)

    def _send_abort(
        self, encoder: str, room: int, reason: str, kind: FaultKind
    ) -> bool:
        """Queue an Abort; False when the control queue to ``encoder`` is full."""
        msg = make(
            Abort, room=room, manager_id=self.manager_id, reason=reason, kind=kind
        )
        return self.channel.send(encoder, msg)

    def _release_fence_locked(
        self,
        key: Tuple[str, int],
        why: str,
        acked: bool = True,
        timed_out: bool = False,
    ) -> None:
        """Free a fence's blocks; not ``acked`` (the encoder never said its writes ended):
        exposed to a late write (``Exposures``), without a bound if the fence ``timed_out``.
        """
        f = self.fences.pop(key, None)
        if f is not None:
            if not acked:
                self.exposures.add(
                    f.encoder, f.handle.blocks, f.room if timed_out else None
                )
            logger.info(
                "language: room %d: %d fenced blocks released (%s)",
                f.room,
                len(f.handle),
                why,
            )
            f.handle.free()

    def _on_peer_revived(self, endpoint: str) -> None:
        with self.lock:
            self.exposures.writer_revived(endpoint)
        self.wake()

    def _release_locked(self, r: "LanguageReceiver") -> None:
        self.allocator.cancel_resume(("room", r.room))
        if r.handle is not None:
            r.handle.free()
            r.handle = None
        r._transition(Phase.DONE, time.monotonic())
        if self.rooms.get(r.room) is r:
            del self.rooms[r.room]
        r._finished = True

    def _abort_receiver(
        self, r: "LanguageReceiver", reason: str, kind: FaultKind
    ) -> None:
        with self.lock:
            if r.phase != Phase.DONE:
                self._fail_locked(r, reason, kind=kind)
        self.wake()  # a fence's timers start now

    # Timers ---------------------------------------------------------------------------------------
    def _tick(self, now: float) -> float:
        """Retry resumes (first: they hold partial data) and admissions, fire timeouts and
        fences; return when the next timer is due. Waiting for blocks needs no timer: a free
        wakes the control thread (``allocator.on_free``)."""
        cfg = self.config
        due = math.inf
        with self.lock:
            for r in [x for x in self.rooms.values() if x.phase == Phase.RESUME_ALLOC]:
                self._room_step_locked(self._try_resume_locked, r, now)
            for r in [x for x in self.rooms.values() if x.phase == Phase.REGISTER]:
                self._room_step_locked(self._advance_locked, r, now)
            self._admit_locked(now)
            for r in list(self.rooms.values()):
                self._room_step_locked(self._check_timeouts_locked, r, now)
                limit = self._phase_timeout(r)
                if r.phase != Phase.DONE and limit is not None:
                    due = min(due, r.phase_since + limit)
            for key, f in list(self.fences.items()):
                if now - f.since > cfg.fence_timeout_s:
                    logger.warning(
                        "language: fence timeout: releasing %d blocks of room %d that encoder %s "
                        "may still write (no abort_ack within %.1fs); rounds using them are "
                        "checksummed until their exposure ends, so a late write is caught",
                        len(f.handle),
                        f.room,
                        f.encoder,
                        cfg.fence_timeout_s,
                    )
                    self._release_fence_locked(
                        key, "fence timeout", acked=False, timed_out=True
                    )
                    continue
                if now - f.asked_at > cfg.abort_ack_timeout_s:
                    f.asked_at = now
                    self._send_abort(f.encoder, f.room, f.reason, f.kind)
                due = min(
                    due,
                    f.since + cfg.fence_timeout_s,
                    f.asked_at + cfg.abort_ack_timeout_s,
                )
            for (encoder, room), (reason, kind) in list(self.unsent_aborts.items()):
                if self._send_abort(encoder, room, reason, kind):
                    del self.unsent_aborts[(encoder, room)]
                else:
                    due = min(due, now + UNSENT_ABORT_RETRY_S)
            due = min(due, self.exposures.expire(now, self.peer_is_dead))
        return min(due, super()._tick(now))

    def _room_step_locked(self, step, r: "LanguageReceiver", now: float) -> None:
        """``step(r, now)``; an error fails ``r`` alone, never the rest of the tick (the
        timers, fences and heartbeats of every other room)."""
        try:
            step(r, now)
        except Exception as e:
            logger.exception("language: room %d: %s failed", r.room, step.__name__)
            if r.phase != Phase.DONE:
                self._fail_locked(r, f"internal error: {e}", kind=FaultKind.INTERNAL)

    def _phase_timeout(self, r: "LanguageReceiver") -> Optional[float]:
        """How long ``r`` may stay in its phase (``_check_timeouts_locked`` enforces it)."""
        cfg = self.config
        if r.phase == Phase.REGISTER:
            return cfg.bootstrap_timeout_s
        if r.phase == Phase.ANNOUNCE:
            # the encoder's pairing verdict (bootstrap_timeout_s from our Expect) comes first
            return cfg.bootstrap_timeout_s + cfg.transfer_grace_s
        # ALLOC: no timer; waiting for blocks is load (a dead encoder is found by heartbeats)
        if r.phase == Phase.RESERVED and r.round == 0:
            return cfg.waiting_timeout_s
        if r.phase == Phase.RESERVED:
            return cfg.round_timeout_s(len(r.handle), sum(self.layout.slot_block_bytes))
        if r.phase == Phase.RESUME_ALLOC:
            return cfg.resume_timeout_s
        return None

    def _check_timeouts_locked(self, r: "LanguageReceiver", now: float) -> None:
        cfg = self.config
        limit = self._phase_timeout(r)
        if limit is None or now - r.phase_since <= limit:
            return
        timeout = FaultKind.TIMEOUT
        if r.phase == Phase.ANNOUNCE:
            self._fail_locked(
                r,
                f"bootstrap timeout: encoder {r.encoder} did not announce the request within "
                f"{limit:.1f}s (its request for this room never arrived there)",
                kind=timeout,
            )
        elif r.phase == Phase.REGISTER:
            self.registrations.pop(r.encoder, None)
            self._fail_locked(
                r,
                f"bootstrap timeout: encoder {r.encoder} did not answer registration "
                f"within {cfg.bootstrap_timeout_s}s (is it listening there, and can it reach "
                f"this side's advertised address {self.manager_id}?)",
                kind=timeout,
            )
        elif r.phase == Phase.RESERVED and r.round == 0:
            self._fail_locked(
                r,
                f"waiting timeout: no data from encoder within {cfg.waiting_timeout_s}s",
                kind=timeout,
            )
        elif r.phase == Phase.RESERVED:
            self._fail_locked(
                r,
                f"transfer timeout: round {r.round} did not arrive within {limit:.1f}s",
                kind=timeout,
            )
        elif r.phase == Phase.RESUME_ALLOC:
            # The encoder is not writing (it waits for our Reserve): released at once.
            self._fail_locked(
                r,
                f"resume timeout: no blocks for round {r.round} within {cfg.resume_timeout_s}s",
                kind=timeout,
            )

    def _active_peers(self) -> List[str]:
        with self.lock:
            # every phase waits on the encoder (REGISTER and ANNOUNCE for its answer, ALLOC
            # with no timer of its own): its heartbeat finds a dead one
            live = {r.encoder for r in self.rooms.values()}
            live |= {encoder for encoder, _ in self.unsent_aborts}
            return list(live | {f.encoder for f in self.fences.values()})

    def _on_peer_dead(self, endpoint: str, reason: str) -> None:
        """Every request of a dead-declared encoder fails now (503): one that is not RESERVED
        holds no block it may write (freed); a RESERVED one's blocks, and those fenced for its
        AbortAck, are freed at once, exposed (a dead verdict may be a stall: its write may
        still land), not quarantined for ``fence_timeout_s``. The encoder is told (Abort),
        so if it was only stalled it drops the rooms when it runs again."""
        with self.lock:
            self.registrations.pop(endpoint, None)
            for r in list(self.rooms.values()):
                if r.encoder == endpoint:
                    self._fail_locked(
                        r, reason, kind=FaultKind.UNAVAILABLE, expose=True
                    )
            for key in [k for k in self.fences if k[0] == endpoint]:
                self._release_fence_locked(
                    key, "its encoder is declared dead", acked=False
                )
            for key in [k for k in self.unsent_aborts if k[0] == endpoint]:
                del self.unsent_aborts[key]  # a dead encoder's rooms end there too

    def _drop_registration(self, endpoint: str) -> None:
        self.registrations.pop(endpoint, None)


class LanguageReceiver:
    """One request on the language side (a ``TransferRequest``): ``poll()`` until Success, then
    ``take()``."""

    def __init__(
        self,
        mgr: LanguageManager,
        bootstrap_addr: str,
        room: int,
        reserve_blocks: int,
        max_tokens: int,
    ):
        self.mgr = mgr
        self.encoder = bootstrap_addr
        self.room = room
        self.reserve_blocks = reserve_blocks  # most blocks a round reserves
        self.max_tokens = max_tokens
        self.handle: Optional[BlockHandle] = None
        self.phase = Phase.REGISTER
        self.phase_since = time.monotonic()
        # the encoder's announcement (T, M, item table, ids), and the blocks reserved for round 0
        self.shape: Optional[RequestShape] = None
        # items the prefix cache holds (set_held), named in Reserve
        self.held: tuple = ()
        self.rows_left_out: tuple = ()  # items whose rows the encoder did not send
        self.alloc_blocks = 0
        self.round = 0
        self.epoch = 0  # registration epoch of the current reservation
        self.generation = 0  # of the current reservation
        self.status = KVPoll.Bootstrapping
        self.reason = ""
        self.kind = FaultKind.INTERNAL  # what failed the request, once Failed
        # the encoder knows the room (Expect sent): a failure tells it
        self.reserved_once = False
        self.checksum = False  # the current reservation asked for block checksums
        self.manifest: Optional[RequestManifest] = None
        # the request's tensors (alloc_received), filled in place round by round
        self.data: Optional[ReceivedData] = None
        self.tokens_received = 0
        self.mm_received = 0
        self.mm_bits = 0  # multimodal tokens the received bitmaps mark
        self.items: tuple = ()  # item table, from the last round (item_table.py)
        # a round is being copied out of our blocks without the manager lock (_on_round_done)
        self.copying = False
        self.notify_after_copy = True  # a failure during that copy tells the encoder
        self._finished = False

    def poll(self) -> int:
        return self.status

    def match_wanted(self) -> Optional[RequestShape]:
        """The announced shape while the request waits for the prefix cache's answer
        (``MATCH``), else None."""
        return self.shape if self.phase == Phase.MATCH else None

    def set_held(self, held: List[int]) -> bool:
        """Answer ``match_wanted``: the items (indices into the announced item table) the
        prefix cache holds and keeps locked until the request's prefill. False if the request
        left ``MATCH`` meanwhile (the caller releases its lock)."""
        return self.mgr._set_held(self, held)

    def failure_exception(self) -> None:
        raise TransferError(self.room, self.reason or "failed", self.kind)

    def abort(
        self,
        reason: str = "aborted by language side",
        kind: FaultKind = FaultKind.INTERNAL,
    ) -> None:
        self.mgr._abort_receiver(self, reason, kind)

    def clear(self) -> None:
        """Drop received data (the manager already dropped its tables)."""
        self.data = None

    @property
    def finished(self) -> bool:
        """True once the request ended and holds no blocks (freed, or fenced by the manager)."""
        return self._finished

    def take(self) -> ReceivedData:
        """The received request: the tensors each round was copied into from the blocks (one
        copy; no concatenation), safe after every block is reused. ``rows`` holds embedding and
        deepstack rows side by side; ``embeddings`` / ``deepstack`` are views of it."""
        if self.status != KVPoll.Success:
            raise TransferError(
                self.room,
                f"take() before Success (status {self.status}; {self.reason})",
            )
        data, self.data = self.data, None
        if data is None:
            raise TransferError(self.room, "data already taken")
        return data._replace(manifest=self.manifest, items=self.items)

    # Manager callbacks ------------------------------------------------------------------------
    def _transition(self, phase: Phase, now: float) -> None:
        if phase not in _TRANSITIONS[self.phase]:
            raise RuntimeError(
                f"room {self.room}: illegal phase change {self.phase} -> {phase}"
            )
        self.phase, self.phase_since = phase, now

    def _set_status(self, status: int) -> None:
        if self.status == KVPoll.Failed or self.status == KVPoll.Success:
            return
        self.status = status if status == KVPoll.Failed else max(self.status, status)
        if self.status == KVPoll.Failed or self.status == KVPoll.Success:
            self.mgr.scheduler_wakeups.wake()
