"""Language side: ``LanguageManager`` (one per language rank) and ``LanguageReceiver`` (per request).

Lifecycle of a receiver (``KVPoll`` values in brackets)::

    create_receiver ─> waiting for blocks [Bootstrapping] ─> registering with the encoder
      [Bootstrapping] ─> Reserve(round 0) sent [WaitingForInput] ─> RoundDone(partial)
      [Transferring]: copy the round out, resize the reservation (resume priority), Reserve(next)
      ─> ... any number of rounds ... ─> RoundDone(last) [Success] ─> take()

* Resume: after a partial round the received rows are *copied* into the request's own tensors
  (lesson 2), then the reservation is resized atomically to ``min(remaining, resume_tokens)`` with
  ``Priority.RESUME``; with the default ``resume_tokens`` (= the initial reservation) that reuses
  the request's own blocks and can never wait. Data already received is never asked for again.
* Blocks are released only when the encoder cannot be writing into them: after ``RoundDone``, an
  ``Abort`` from the encoder, an ``AbortAck`` for our own ``Abort``, or the encoder declared dead.
  A failure while the encoder may write (timeout, local abort, bad data) sends ``Abort`` and keeps
  the blocks until one of those arrives (``Abort`` is re-sent every ``abort_ack_timeout_s``).
* Status tables are dropped as soon as a request ends; a receiver keeps its own result.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Dict, List, Optional

import torch

from sglang.srt.disaggregation.base.conn import BaseKVReceiver, KVPoll
from sglang.srt.disaggregation.encode_language.allocator import BlockHandle, Priority
from sglang.srt.disaggregation.encode_language.buffers import (
    MultimodalBufferConfig,
    ReceivedData,
    blocks_for_tokens,
)
from sglang.srt.disaggregation.encode_language.connection import (
    ConnectionConfig,
    ManagerBase,
    RoomInUseError,
    TransferError,
)
from sglang.srt.disaggregation.encode_language.manifest import (
    Abort,
    AbortAck,
    LayoutManifest,
    LayoutMismatchError,
    ProtocolError,
    Register,
    RegisterAck,
    Reserve,
    RoundDone,
    make,
)

logger = logging.getLogger(__name__)

# Receiver phases (finer than KVPoll).
ALLOC, REGISTER, RESERVED, RESUME_ALLOC, ABORTING, DONE = (
    "alloc", "register", "reserved", "resume_alloc", "aborting", "done",
)


@dataclasses.dataclass
class _Registration:
    ok: Optional[bool] = None  # None = pending
    error: str = ""
    sent_at: float = 0.0


class LanguageManager(ManagerBase):
    """Owns one language rank's buffers; drives every receiver from its control thread."""

    role = "language"

    def __init__(self, buffer_config: MultimodalBufferConfig, config: Optional[ConnectionConfig] = None, engine=None):
        self.rooms: Dict[int, "LanguageReceiver"] = {}
        self.registrations: Dict[str, _Registration] = {}
        super().__init__(buffer_config, config, engine)

    # Public API -----------------------------------------------------------------------------
    def create_receiver(
        self,
        bootstrap_addr: str,
        room: int,
        rank: int = 0,
        num_ranks: int = 1,
        reserve_tokens: Optional[int] = None,
        max_tokens: int = 0,
    ) -> "LanguageReceiver":
        """Start receiving request ``room`` from the encoder at ``bootstrap_addr``. Raises
        OversizeError when the reservation can never fit this pool, RoomInUseError when the room
        is live here."""
        reserve = reserve_tokens or self.config.default_reserve_tokens
        nb = blocks_for_tokens(reserve, self.layout.block_size)
        self.allocator.check_fits(nb)
        with self.lock:
            if room in self.rooms:
                raise RoomInUseError(f"bootstrap room {room} is already in use by an active request on this language rank")
            r = LanguageReceiver(self, bootstrap_addr, room, rank, num_ranks, nb, max_tokens)
            self.rooms[room] = r
            self._advance_locked(r, time.monotonic())
            return r

    def num_active_rooms(self) -> int:
        with self.lock:
            return len(self.rooms)

    # Progress ---------------------------------------------------------------------------------
    def _advance_locked(self, r: "LanguageReceiver", now: float) -> None:
        """Move a receiver forward as far as possible without waiting."""
        if r.phase == ALLOC:
            h = self.allocator.alloc(r.reserve_blocks, owner=("room", r.room))
            if h is None:
                return
            r.handle = h
            r._enter(REGISTER, now)
        if r.phase == REGISTER:
            reg = self.registrations.get(r.encoder)
            if reg is None or (reg.ok is False and self.peer_is_dead(r.encoder)):
                reg = self.registrations[r.encoder] = _Registration(sent_at=now)
                self.channel.send(
                    r.encoder,
                    make(Register, manager_id=self.manager_id, session_id=self.session_id,
                         layout=self.layout.to_dict(), slot_ptrs=self.buffers.slot_ptrs(),
                         slot_block_bytes=self.buffers.slot_block_bytes()),
                )
            if reg.ok is None:
                return
            if reg.ok is False:
                self._fail_locked(r, reg.error, encoder_may_write=False)
                return
            self._reserve_locked(r, now)

    def _reserve_locked(self, r: "LanguageReceiver", now: float) -> None:
        r._enter(RESERVED, now)
        r.encoder_may_write = True
        r.reserved_once = True
        r._set_status(KVPoll.WaitingForInput if r.round == 0 else KVPoll.Transferring)
        self.channel.send(
            r.encoder,
            make(Reserve, room=r.room, manager_id=self.manager_id, rank=r.rank, num_ranks=r.num_ranks,
                 round=r.round, blocks=r.handle.blocks, max_tokens=r.max_tokens),
        )

    def _handle(self, msg) -> None:
        if isinstance(msg, RegisterAck):
            self._on_register_ack(msg)
        elif isinstance(msg, RoundDone):
            self._on_round_done(msg)
        elif isinstance(msg, Abort):
            with self.lock:
                r = self.rooms.get(msg.room)
                if r is None or r.encoder != msg.manager_id:
                    return
                # The encoder sends Abort only when none of its writes is in flight.
                r.encoder_may_write = False
                self._fail_locked(r, f"encoder {msg.manager_id} aborted: {msg.reason}", encoder_may_write=False, notify=False)
        elif isinstance(msg, AbortAck):
            with self.lock:
                r = self.rooms.get(msg.room)
                if r is not None and r.phase == ABORTING:
                    r.encoder_may_write = False
                    self._release_locked(r)
        else:
            logger.warning("language: unexpected control message %s; dropped", type(msg).__name__)
            self.channel.rejected += 1

    def _on_register_ack(self, msg: RegisterAck) -> None:
        now = time.monotonic()
        with self.lock:
            ep = msg.manager_id
            if ep not in self.registrations:
                return
            error = msg.error
            ok = msg.ok
            try:
                remote = LayoutManifest.from_dict(msg.layout)
                self.layout.check_compatible(remote, where="encoder")
            except (LayoutMismatchError, ProtocolError) as e:
                ok, error = False, str(e)
            if not ok:
                logger.error("language: registration refused: %s", error)
            self.registrations[ep] = _Registration(ok=ok, error=error, sent_at=now)
            for r in list(self.rooms.values()):
                if r.phase == REGISTER:
                    self._advance_locked(r, now)

    def _on_round_done(self, msg: RoundDone) -> None:
        now = time.monotonic()
        with self.lock:
            r = self.rooms.get(msg.room)
            if r is None or r.phase != RESERVED or msg.round != r.round:
                logger.debug("language: stale RoundDone for room %d round %d", msg.room, msg.round)
                return
            r.encoder_may_write = False
            try:
                self._take_round_locked(r, msg)
            except Exception as e:
                logger.exception("language: bad round %d of room %d", msg.round, msg.room)
                self._fail_locked(r, f"invalid data in round {msg.round}: {e}", encoder_may_write=False)
                return
            if msg.last:
                r._set_status(KVPoll.Success)
                self._release_locked(r)
                return
            r.round += 1
            r._set_status(KVPoll.Transferring)
            r._enter(RESUME_ALLOC, now)
            self._try_resume_locked(r, now)

    def _take_round_locked(self, r: "LanguageReceiver", msg: RoundDone) -> None:
        B = self.layout.block_size
        cap = len(r.handle) * B
        if msg.token_start != r.tokens_received or msg.mm_start != r.mm_received:
            raise ProtocolError(
                f"round covers tokens from {msg.token_start} / rows from {msg.mm_start}, "
                f"expected {r.tokens_received} / {r.mm_received}"
            )
        if not (0 < msg.token_count <= cap) or not (0 <= msg.mm_count <= cap):
            raise ProtocolError(f"round of {msg.token_count} tokens / {msg.mm_count} rows exceeds {cap} reserved")
        manifest, block_index = self.buffers.read_manifest(r.handle.blocks[0])
        manifest.check_against(self.layout)
        if block_index * B != msg.token_start:
            raise ProtocolError(f"aux says block {block_index}, round starts at token {msg.token_start}")
        if (manifest.total_tokens, manifest.mm_tokens) != (msg.total_tokens, msg.mm_tokens):
            raise ProtocolError("aux manifest and RoundDone disagree on the request size")
        if r.manifest is not None and manifest != r.manifest:
            raise ProtocolError("request manifest changed between rounds")
        if r.max_tokens and manifest.total_tokens > r.max_tokens:
            raise ProtocolError(f"request has {manifest.total_tokens} tokens, this rank accepts {r.max_tokens}")
        r.manifest = manifest
        parts = self.buffers.read_round(r.handle.blocks, msg.token_count, msg.mm_count)
        r.parts.append(parts)
        r.tokens_received += msg.token_count
        r.mm_received += msg.mm_count
        r.items = list(msg.items)
        if msg.last and (r.tokens_received, r.mm_received) != (manifest.total_tokens, manifest.mm_tokens):
            raise ProtocolError(
                f"last round ends at {r.tokens_received} tokens / {r.mm_received} rows, manifest says "
                f"{manifest.total_tokens} / {manifest.mm_tokens}"
            )

    def _try_resume_locked(self, r: "LanguageReceiver", now: float) -> None:
        remaining = r.manifest.total_tokens - r.tokens_received
        tokens = min(remaining, self.config.resume_tokens or r.reserve_blocks * self.layout.block_size)
        h = self.allocator.realloc(r.handle, blocks_for_tokens(tokens, self.layout.block_size), Priority.RESUME)
        if h is None:
            return
        r.handle = h
        self._reserve_locked(r, now)

    # Failure / release ----------------------------------------------------------------------------
    def _fail_locked(
        self, r: "LanguageReceiver", reason: str, encoder_may_write: Optional[bool] = None, notify: bool = True
    ) -> None:
        """Fail ``r``. While the encoder may be writing into its blocks, ask it to stop and keep
        the blocks until it confirms; otherwise tell it (if it knows the room) and release."""
        if encoder_may_write is not None:
            r.encoder_may_write = encoder_may_write
        if r.status != KVPoll.Failed:
            r.reason = reason
            r._set_status(KVPoll.Failed)
            logger.info("language: room %d failed: %s", r.room, reason)
        if r.encoder_may_write:
            # Blocks stay ours until the encoder confirms nothing is being written.
            if r.phase != ABORTING:
                r._enter(ABORTING, time.monotonic())
                self.channel.send(r.encoder, make(Abort, room=r.room, manager_id=self.manager_id, reason=reason))
            return
        if notify and r.reserved_once:
            self.channel.send(r.encoder, make(Abort, room=r.room, manager_id=self.manager_id, reason=reason))
        self._release_locked(r)

    def _release_locked(self, r: "LanguageReceiver") -> None:
        self.allocator.cancel_resume(("room", r.room))
        if r.handle is not None:
            r.handle.free()
            r.handle = None
        r._enter(DONE, time.monotonic())
        if self.rooms.get(r.room) is r:
            del self.rooms[r.room]
        r._done()

    def _abort_receiver(self, r: "LanguageReceiver", reason: str) -> None:
        with self.lock:
            if r.phase == DONE:
                return
            self._fail_locked(r, reason)

    # Timers ---------------------------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        cfg = self.config
        with self.lock:
            # Resumes first (they hold partial data), then new admissions in arrival order.
            for r in [x for x in self.rooms.values() if x.phase == RESUME_ALLOC]:
                self._try_resume_locked(r, now)
            for r in [x for x in self.rooms.values() if x.phase in (ALLOC, REGISTER)]:
                self._advance_locked(r, now)
            for r in list(self.rooms.values()):
                age = now - r.phase_since
                if r.phase == ALLOC and age > cfg.waiting_timeout_s:
                    self._fail_locked(r, f"waiting timeout: no free blocks within {cfg.waiting_timeout_s}s")
                elif r.phase == REGISTER and age > cfg.bootstrap_timeout_s:
                    self.registrations.pop(r.encoder, None)
                    self._fail_locked(r, f"bootstrap timeout: encoder {r.encoder} did not answer registration within {cfg.bootstrap_timeout_s}s")
                elif r.phase == RESERVED and r.round == 0 and age > cfg.waiting_timeout_s:
                    self._fail_locked(r, f"waiting timeout: no data from encoder within {cfg.waiting_timeout_s}s")
                elif r.phase == RESERVED and r.round > 0 and age > cfg.transfer_timeout_s:
                    self._fail_locked(r, f"transfer timeout: round {r.round} did not arrive within {cfg.transfer_timeout_s}s")
                elif r.phase == RESUME_ALLOC and age > cfg.resume_timeout_s:
                    # Encoder is not writing (it waits for our Reserve): release at once.
                    self._fail_locked(r, f"resume timeout: no blocks for round {r.round} within {cfg.resume_timeout_s}s", encoder_may_write=False)
                elif r.phase == ABORTING and age > cfg.abort_ack_timeout_s:
                    r.phase_since = now
                    logger.warning("language: no AbortAck for room %d from %s; asking again", r.room, r.encoder)
                    self.channel.send(r.encoder, make(Abort, room=r.room, manager_id=self.manager_id, reason=r.reason))
        super()._tick(now)

    def _active_peers(self) -> List[str]:
        with self.lock:
            return list({r.encoder for r in self.rooms.values() if r.phase not in (ALLOC, DONE)})

    def _pong_nonce(self, ping) -> int:
        if ping.nonce < 0:  # health probe: report the nonce the encoder wrote into our scratch block
            return -self.buffers.read_scratch_nonce()
        return ping.nonce

    def _on_peer_dead(self, endpoint: str, reason: str) -> None:
        with self.lock:
            self.registrations.pop(endpoint, None)
            for r in list(self.rooms.values()):
                if r.encoder == endpoint:
                    # A dead encoder writes nothing: the blocks are safe to free.
                    self._fail_locked(r, reason, encoder_may_write=False, notify=False)


class LanguageReceiver(BaseKVReceiver):
    """One request on a language rank. ``poll()`` until Success, then ``take()``."""

    def __init__(self, mgr: LanguageManager, bootstrap_addr: str, room: int, rank: int, num_ranks: int,
                 reserve_blocks: int, max_tokens: int):
        self.mgr = mgr
        self.encoder = bootstrap_addr
        self.room = room
        self.rank = rank
        self.num_ranks = num_ranks
        self.reserve_blocks = reserve_blocks
        self.max_tokens = max_tokens
        self.handle: Optional[BlockHandle] = None
        self.phase = ALLOC
        self.phase_since = time.monotonic()
        self.round = 0
        self.status = KVPoll.Bootstrapping
        self.reason = ""
        self.encoder_may_write = False
        self.reserved_once = False
        self.manifest = None
        self.parts: List[tuple] = []
        self.tokens_received = 0
        self.mm_received = 0
        self.items: list = []  # item table of the last round
        self._finished = False

    # BaseKVReceiver ---------------------------------------------------------------------------
    def init(self, prefill_dp_rank: int = 0):
        """Nothing to do: the manager registers and reserves on its own."""

    def send_metadata(self, *args, **kwargs):
        """Reservations are sent by the manager (initial and every resume round)."""

    def poll(self) -> KVPoll:
        return self.status

    def failure_exception(self):
        raise TransferError(self.room, self.reason or "failed")

    def abort(self, reason: str = "aborted by language side"):
        self.mgr._abort_receiver(self, reason)

    def clear(self):
        """Drop received data (the manager already dropped its tables)."""
        self.parts = []

    @property
    def finished(self) -> bool:
        """True once the request ended and its blocks are back in the pool."""
        return self._finished

    def take(self) -> ReceivedData:
        """The received request as fresh tensors (copies; safe after every block is reused)."""
        if self.status != KVPoll.Success:
            raise TransferError(self.room, f"take() before Success (status {self.status}; {self.reason})")
        parts, self.parts = self.parts, []
        if not parts:
            raise TransferError(self.room, "data already taken")
        ids = torch.cat([p[0] for p in parts])
        pos = torch.cat([p[1] for p in parts], dim=1)
        mask = torch.cat([p[2] for p in parts])
        emb = torch.cat([p[3] for p in parts])
        ds = torch.cat([p[4] for p in parts]) if parts[0][4] is not None else None
        return ReceivedData(self.manifest, ids, pos, mask, emb, ds, self.items)

    # Manager callbacks ------------------------------------------------------------------------
    def _enter(self, phase: str, now: float) -> None:
        self.phase, self.phase_since = phase, now

    def _set_status(self, status: int) -> None:
        if self.status == KVPoll.Failed or self.status == KVPoll.Success:
            return
        self.status = status if status == KVPoll.Failed else max(self.status, status)

    def _done(self) -> None:
        self._finished = True
