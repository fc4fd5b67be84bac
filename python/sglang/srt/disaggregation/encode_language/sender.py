"""Encode side: ``EncodeManager`` (one per encode process) and ``EncodeSender`` (one per request).

Flow of one request (bootstrap room R) to its language server (one destination: the language
server's rank 0 receives every request and broadcasts it to its other TP ranks):

1. The language manager registers (``Register``: epoch, layout, buffer addresses). The layouts
   are compared field by field; a mismatch is answered with ``RegisterAck(ok=False)`` naming the
   field, logged here, and nothing is ever written to that peer. A reservation naming a
   registration this side does not hold (peer declared dead, pruned, or this process restarted)
   is answered with ``Unregistered``, and the language side registers again.
2. The destination sends ``Expect(room)``: it holds the request, and no blocks yet. A room may
   learn about its destination before or after ``create_sender(R, shape)``, whose shape (T
   tokens, M multimodal tokens, item table) is known when the request arrives (its processor ran
   in the tokenizer manager). Once both halves are here (the request and the Expect) the encoder
   sends ``Announce(T, M, items, ids, M-RoPE positions and delta)`` (and at once to an Expect
   that comes again later); the destination reserves ``min(needed, reserve)`` blocks and
   sends ``Reserve(room, round=0, blocks)``. Pairing is bounded by ``bootstrap_timeout_s``; waiting for the reservation after
   the announcement is not (it waits for language blocks: load; a dead peer is found by
   heartbeats). The sender polls ``WaitingForInput`` once round 0 is reserved: the encode
   scheduler runs the vision tower only then, so payload bytes are held only by requests that
   hold language blocks. A destination whose prefix cache holds every item answers
   ``AllHeld`` instead (the announcement carried the ids and M-RoPE positions it needs): the
   sender polls ``Success`` at once, with no payload, no vision tower and no round.
3. ``sender.send(payload)`` hands over the request (the sender keeps a reference; the caller must
   not modify the tensors afterwards); a payload whose T, M or items differ from the announced
   shape fails the request. A round starts only when the payload is there and the destination
   has reserved blocks for that round.
4. A round stages the next ``min(remaining, capacity)`` tokens (and as many multimodal rows) in
   this side's blocks, writes them into the destination with one Mooncake batch, frees the
   staging blocks, and sends ``RoundDone`` with the token/multimodal ranges it covered. The
   capacity is the destination's reservation, capped by this side's pool. Bytes already sent
   are never sent again.
5. Not the last round: wait (``resume_timeout_s``) until the destination reserved blocks for the
   next round, then go to 4. Last round: Success, the room's table entry is dropped.

Staging per round (instead of holding a whole request in encode blocks) means encode blocks are
held only while a write is in flight, so no cycle of waits between the two pools can form.

Abort: ``sender.abort()`` or a language ``Abort`` fails the room; if a write is in flight, the
worker finishes or fails it first, and only then tells the destination (``Abort``, or
``AbortAck`` when it asked), so a language block is never freed while being written.

Bounded writes: a round's write is made on the worker thread itself and the control thread
watches its deadline (no thread hand-off on a small request's path):
``ConnectionConfig.write_deadline_s``, Mooncake's own timeout for the bytes written
(``connection.mooncake_timeout_s``) plus ``data_write_timeout_s``, so a write Mooncake watches
always ends by Mooncake's verdict first, and this deadline only catches a write Mooncake is not
timing (the language side waits for a round longer still: ``ConnectionConfig.round_timeout_s``).
Past it the room fails and the destination gets ``Abort(writes_pending=True)``: the write cannot
be cancelled, so the destination fences those blocks, and this side quarantines the staging
blocks, until the write returns; a write that returns complete earns the destination an
``AbortAck`` (an ``Abort`` asking about that room is answered only then). The worker the write
holds gets a replacement, so later rounds still start (bounded: ``MAX_ABANDONED_WRITES``).

Failed writes: Mooncake returns -1 while parts of a batch may still be in flight (a task FAILED
while others wait, a slice TIMEOUT, its own deadline), and nothing says when they end. So a
failed write is treated as one that may still land: the destination gets
``Abort(writes_pending=True, write_failed=True)`` and never an ``AbortAck`` for the room (for
``fence_timeout_s``): its blocks are exposed, checksummed when reused. The staging blocks are
freed at once: they are only the write's source, so a late slice can carry only whatever they
hold next into the failed destination's exposed blocks; quarantining them would let a dead
language server's failing writes take the whole staging pool from the healthy ones.

Admission: payloads are held by reference until their last round. ``send()`` of a payload that
would take the bytes held past ``max_inflight_payload_bytes`` raises ``PayloadBudgetError`` and
changes nothing (the caller keeps the request and retries after others finish); a payload larger
than the whole bound fails the request (``OversizeError``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import queue
import threading
import time
from typing import Dict, List, Optional, Tuple

from sglang.srt.disaggregation.base.conn import KVPoll, KVTransferMetric
from sglang.srt.disaggregation.encode_language.allocator import (
    BlockHandle,
    OversizeError,
)
from sglang.srt.disaggregation.encode_language.buffers import MultimodalBufferConfig
from sglang.srt.disaggregation.encode_language.connection import (
    ConnectionConfig,
    ManagerBase,
    RoomInUseError,
    TransferError,
    write_segments,
)
from sglang.srt.disaggregation.encode_language.manifest import (
    Abort,
    AbortAck,
    AllHeld,
    Announce,
    Expect,
    FaultKind,
    LayoutManifest,
    LayoutMismatchError,
    ProtocolError,
    Register,
    RegisterAck,
    RequestShape,
    Reserve,
    RoundDone,
    Unregistered,
    make,
)
from sglang.srt.disaggregation.encode_language.payload import MultimodalPayload
from sglang.srt.disaggregation.encode_language.round_plan import (
    blocks_for_tokens,
    region_base,
    round_segments,
)

logger = logging.getLogger(__name__)

# Workers that abandoned (timed-out) writes made on them may hold at once
# (``EncodeManager._write_inline``).
MAX_ABANDONED_WRITES = 64


class _Abandoned(Exception):
    """Raised on a worker whose write returned after the control thread abandoned it at its
    deadline (``_expire_writes_locked``); ``replaced``: a replacement worker was started.
    """

    def __init__(self, replaced: bool):
        super().__init__(replaced)
        self.replaced = replaced


@dataclasses.dataclass(eq=False)
class _InlineWrite:
    """A write made on a worker thread (``_write_inline``), watched by the control thread."""

    room: "_Room"
    manager_id: str
    staging: BlockHandle
    deadline: float  # monotonic
    timeout: float
    thread: threading.Thread  # the worker making it
    replaced: bool = False  # abandoned, and a replacement worker started


class PayloadBudgetError(TransferError):
    """``send()`` would take the encoder's in-flight payload bytes past
    ``max_inflight_payload_bytes``; nothing changed, retry later."""


class WriteTimeoutError(TransferError):
    """A transfer-engine write did not return by its deadline
    (``ConnectionConfig.write_deadline_s``)."""

    def __init__(self, room: int, reason: str):
        super().__init__(room, reason, FaultKind.TIMEOUT)


@dataclasses.dataclass
class _Peer:
    manager_id: str
    epoch: int
    session_id: str
    layout: LayoutManifest
    slot_ptrs: List[int]


# _Dest.round of a destination that expects the request but has not reserved round 0 yet
EXPECTING = -1


@dataclasses.dataclass
class _Dest:
    """The language server a room's rows go to (its rank 0)."""

    manager_id: str
    round: int  # the round its current reservation is for; EXPECTING before round 0
    generation: int
    blocks: List[int]
    max_tokens: int = 0
    checksum: bool = False  # this round's reservation asked for block checksums
    held: frozenset = frozenset()  # items its prefix cache holds (round-0 Reserve)


@dataclasses.dataclass
class _Room:
    room: int
    created: float
    sender: Optional["EncodeSender"] = None
    shape: Optional[RequestShape] = None  # from create_sender: what is announced
    announced: bool = False  # Announce sent to the destination
    dest: Optional[_Dest] = None  # from its Expect
    payload: Optional[MultimodalPayload] = None
    payload_bytes: int = 0  # counted against max_inflight_payload_bytes while held
    round: int = 0
    token_sent: int = 0
    mm_sent: int = 0
    in_flight: bool = False
    waiting_since: float = 0.0  # start of the current wait for the destination
    failed: Optional[str] = None  # reason, once failed
    fault_kind: FaultKind = FaultKind.INTERNAL  # what failed it, once failed
    abort_asked: bool = False  # the destination asked to abort: it gets an AbortAck
    bytes_sent: int = 0
    first_send: Optional[float] = None


class EncodeManager(ManagerBase):
    """Owns the encode side's buffers and the transfer workers."""

    role = "encode"

    def __init__(
        self,
        buffer_config: MultimodalBufferConfig,
        config: Optional[ConnectionConfig] = None,
        engine=None,
    ):
        self.peers: Dict[str, _Peer] = {}
        self.rooms: Dict[int, _Room] = {}
        # rooms whose next round is due, for the workers (SimpleQueue: C, a cheaper hand-off)
        self._queue: "queue.SimpleQueue[Optional[int]]" = queue.SimpleQueue()
        # (room, language manager) -> timed-out writes that have not returned yet
        self._pending_writes: Dict[Tuple[int, str], int] = {}
        # (room, language manager) -> until: a write failed while parts may still be in
        # flight; the room is never acknowledged to that manager until fence_timeout_s passed
        self._failed_writes: Dict[Tuple[int, str], float] = {}
        # room -> (reason, kind, time) of rooms that failed, kept for bootstrap_timeout_s so that
        # a reservation arriving after the failure is refused with it (no fresh room to time out)
        self._failed_rooms: Dict[int, Tuple[str, FaultKind, float]] = {}
        self.inflight_payload_bytes = 0
        # writes made on a worker thread (_write_inline) until they return or are abandoned
        self._inline_writes: set = set()
        # workers replaced while an abandoned write holds them (they end when it returns)
        self._retiring_workers: set = set()
        super().__init__(buffer_config, config, engine)
        self._worker_ids = itertools.count()
        self._workers: List[threading.Thread] = []
        for _ in range(self.config.num_transfer_workers):
            self._start_worker()

    def _control_port(self) -> int:
        """The bootstrap port: the router hands it to the language side with each request."""
        return self.config.bootstrap_port

    # Public API -----------------------------------------------------------------------------
    def create_sender(self, room: int, shape: RequestShape) -> "EncodeSender":
        """The request of ``room``, whose ``shape`` (T, M, item table) is known at arrival:
        it is announced to the destination once that expects the request.
        """
        with self.lock:
            r = self.rooms.get(room)
            if r is not None and r.sender is not None:
                raise RoomInUseError(
                    f"bootstrap room {room} is already in use by an active request on this encoder"
                )
            if r is None:
                r = self.rooms[room] = _Room(room=room, created=time.monotonic())
            r.waiting_since = time.monotonic()
            sender = EncodeSender(self, room)
            r.sender, r.shape = sender, RequestShape(*shape)
            self._announce_locked(r)
            self._update_sender_status(r)
        self.wake()  # its pairing timer starts now
        return sender

    def fail_room(
        self, room: int, reason: str, kind: FaultKind = FaultKind.INTERNAL
    ) -> None:
        """Fail a request that never got a sender (its tokenizer refused it, e.g. an image
        that cannot be read): a language side that reserved the room gets Abort(reason, kind)
        now, one that reserves it later gets it at once."""
        with self.lock:
            r = self.rooms.get(room)
            if r is not None and r.sender is not None:
                return  # an active request owns the room: not this failure's to end
            if r is None:
                now = time.monotonic()
                r = self.rooms[room] = _Room(room=room, created=now, waiting_since=now)
            self._fail_locked(r, reason, kind)
        self.wake()

    def num_active_rooms(self) -> int:
        with self.lock:
            return len(self.rooms)

    # Message handling -----------------------------------------------------------------------
    def _handle(self, msg) -> None:
        if isinstance(msg, Register):
            self._on_register(msg)
        elif isinstance(msg, Expect):
            self._on_expect(msg)
        elif isinstance(msg, Reserve):
            self._on_reserve(msg)
        elif isinstance(msg, AllHeld):
            self._on_all_held(msg)
        elif isinstance(msg, Abort):
            self._on_abort(msg)
        else:
            logger.warning(
                "encode: unexpected control message %s; dropped", type(msg).__name__
            )
            self.channel.rejected += 1

    def _on_register(self, msg: Register) -> None:
        remote = msg.layout
        try:
            self.layout.check_compatible(
                remote, where=f"language peer {msg.manager_id}"
            )
            if len(msg.slot_ptrs) != remote.num_slots:
                raise ProtocolError(
                    f"peer sent {len(msg.slot_ptrs)} slot addresses, layout has {remote.num_slots}"
                )
            if list(msg.slot_block_bytes) != remote.slot_block_bytes:
                raise ProtocolError(
                    f"peer's slot_block_bytes {list(msg.slot_block_bytes)} do not match its layout "
                    f"({remote.slot_block_bytes})"
                )
        except (LayoutMismatchError, ProtocolError) as e:
            logger.error("encode: rejected registration of %s: %s", msg.manager_id, e)
            with self.lock:
                self.peers.pop(msg.manager_id, None)
            ack = make(
                RegisterAck,
                manager_id=self.manager_id,
                epoch=msg.epoch,
                ok=False,
                error=str(e),
                layout=self.layout,
            )
            self.channel.send(msg.manager_id, ack)
            return
        with self.lock:
            self.peers[msg.manager_id] = _Peer(
                msg.manager_id, msg.epoch, msg.session_id, remote, list(msg.slot_ptrs)
            )
            self.last_active[msg.manager_id] = time.monotonic()
        ack = make(
            RegisterAck,
            manager_id=self.manager_id,
            epoch=msg.epoch,
            ok=True,
            error="",
            layout=self.layout,
        )
        self.channel.send(msg.manager_id, ack)

    def _refuse(self, msg, what: str, reason: str, kind=FaultKind.INTERNAL) -> None:
        """Answer an ``Expect``, ``Reserve`` or ``AllHeld`` with an Abort naming why."""
        logger.warning(
            "encode: refused %s of room %d from %s: %s",
            what,
            msg.room,
            msg.manager_id,
            reason,
        )
        self.channel.send(
            msg.manager_id,
            make(
                Abort,
                room=msg.room,
                manager_id=self.manager_id,
                reason=reason,
                kind=kind,
            ),
        )

    def _peer_holds_locked(self, msg, what: str) -> Optional[_Peer]:
        """The peer whose registration ``msg`` relies on; None (and ``Unregistered`` sent,
        so it registers again) when this encoder does not hold that registration."""
        peer = self.peers.get(msg.manager_id)
        if peer is not None and peer.epoch == msg.epoch:
            return peer
        logger.warning(
            "encode: %s of room %d from %s relies on registration epoch %d, which this "
            "encoder does not hold; asking it to register again",
            what,
            msg.room,
            msg.manager_id,
            msg.epoch,
        )
        self.channel.send(
            msg.manager_id,
            make(
                Unregistered,
                manager_id=self.manager_id,
                room=msg.room,
                epoch=msg.epoch,
            ),
        )
        return None

    def _on_expect(self, msg: Expect) -> None:
        """The destination holds the request and waits for its announcement: recorded as a
        destination that has not reserved yet (``EXPECTING``). Announced once the request is
        here too; a destination that expects it again (after registering again) is answered
        at once."""
        refuse = lambda reason, kind=FaultKind.INTERNAL: self._refuse(  # noqa: E731
            msg, "expect", reason, kind
        )
        with self.lock:
            if self._peer_holds_locked(msg, "expect") is None:
                return
            r = self.rooms.get(msg.room)
            if r is None and msg.room in self._failed_rooms:
                reason, kind, _ = self._failed_rooms[msg.room]
                return refuse(f"request already failed: {reason}", kind)
            if r is None:
                now = time.monotonic()
                r = self.rooms[msg.room] = _Room(
                    room=msg.room, created=now, waiting_since=now
                )
            if r.failed:
                return refuse(f"request already failed: {r.failed}", r.fault_kind)
            d = r.dest
            if d is not None and (
                d.manager_id != msg.manager_id or d.round != EXPECTING
            ):
                return refuse(
                    f"bootstrap room {msg.room} is already in use (a language server "
                    f"already expects it)",
                    FaultKind.CLIENT,
                )
            r.dest = _Dest(msg.manager_id, EXPECTING, 0, [], msg.max_tokens)
            if r.announced:
                self._send_announce_locked(r)
            else:
                self._announce_locked(r)

    def _announce_locked(self, r: _Room) -> None:
        """Both halves are here (the request's shape and the destination's Expect): tell the
        destination the shape, so it reserves what the request needs."""
        if r.announced or r.failed or r.shape is None or r.dest is None:
            return
        r.announced = True
        self._send_announce_locked(r)

    def _send_announce_locked(self, r: _Room) -> None:
        shape = r.shape
        self.channel.send(
            r.dest.manager_id,
            make(
                Announce,
                room=r.room,
                manager_id=self.manager_id,
                total_tokens=shape.total_tokens,
                mm_tokens=shape.mm_tokens,
                items=list(shape.items),
                input_ids=list(shape.input_ids),
                mrope_positions=list(shape.mrope_positions),
                mrope_delta=shape.mrope_delta,
            ),
        )

    def _on_reserve(self, msg: Reserve) -> None:
        refuse = lambda reason, kind=FaultKind.INTERNAL: self._refuse(  # noqa: E731
            msg, "reservation", reason, kind
        )
        with self.lock:
            peer = self._peer_holds_locked(msg, "reservation")
            if peer is None:
                return
            nb = peer.layout.num_blocks
            if (
                not msg.blocks
                or len(set(msg.blocks)) != len(msg.blocks)
                or any(not (0 <= b < nb) for b in msg.blocks)
            ):
                return refuse(f"invalid block list for a pool of {nb} blocks")
            r, error = self._room_for_answer_locked(msg)
            if error is not None:
                return refuse(*error)
            d = r.dest
            if msg.round == 0:
                error = self._check_round0_locked(r, msg.held_items)
                if error is not None:
                    return refuse(error)
                d.held = frozenset(msg.held_items)
            elif msg.round != r.round or d.round == r.round:
                return refuse(
                    f"unexpected reservation for round {msg.round} (room is at round {r.round})"
                )
            d.round, d.generation, d.blocks, d.checksum = (
                msg.round,
                msg.generation,
                list(msg.blocks),
                msg.checksum,
            )
            self._update_sender_status(r)
            self._maybe_schedule(r)

    def _on_all_held(self, msg: AllHeld) -> None:
        """The destination holds every item and took the ids and positions from the
        announcement: the request succeeds without a round (no vision tower, no write). An
        ``AllHeld`` a live room cannot take fails that room here (its destination would never
        reserve for it); the destination, which counted the request as received when it
        answered, drops the Abort that follows, as it drops one for an unknown room."""
        with self.lock:
            r, error = self._room_for_answer_locked(msg)
            if error is not None:
                return self._refuse(msg, "all_held", *error)
            error = self._check_round0_locked(r, [])
            if error is None and not (r.shape.mrope_positions and r.shape.items):
                error = "the request was announced without M-RoPE positions or items"
            if error is not None:
                logger.warning(
                    "encode: invalid all_held for room %d from %s: %s",
                    msg.room,
                    msg.manager_id,
                    error,
                )
                self._fail_locked(r, f"invalid all_held: {error}")
                return
            self._drop_room_locked(r)
            r.sender._finish(KVPoll.Success, "", r)

    def _room_for_answer_locked(self, msg):
        """(the room a destination's ``Reserve`` or ``AllHeld`` is about, None) or (None,
        (reason, kind)) to refuse it with."""
        r = self.rooms.get(msg.room)
        if r is None and msg.room in self._failed_rooms:
            reason, kind, _ = self._failed_rooms[msg.room]
            return None, (f"request already failed: {reason}", kind)
        if r is None:
            return None, (
                "unknown room (already finished or failed)",
                FaultKind.INTERNAL,
            )
        if r.failed:
            return None, (f"request already failed: {r.failed}", r.fault_kind)
        if r.dest is None or r.dest.manager_id != msg.manager_id:
            return None, (
                f"answer for room {msg.room} without its expect",
                FaultKind.INTERNAL,
            )
        return r, None

    @staticmethod
    def _check_round0_locked(r: _Room, held_items) -> Optional[str]:
        """Why the destination's round-0 answer naming ``held_items`` is refused, or None."""
        if not r.announced or r.dest.round != EXPECTING:
            return (
                f"unexpected answer for round 0 of room {r.room} "
                f"({'already reserved' if r.announced else 'not announced yet'})"
            )
        if len(set(held_items)) != len(held_items) or any(
            not (0 <= i < len(r.shape.items)) for i in held_items
        ):
            return (
                f"invalid held items {list(held_items)} for an item table of "
                f"{len(r.shape.items)} items"
            )
        return None

    def _on_abort(self, msg: Abort) -> None:
        with self.lock:
            r = self.rooms.get(msg.room)
            if r is None or r.dest is None or r.dest.manager_id != msg.manager_id:
                # Nothing of ours writes for that manager, unless a timed-out write has not
                # returned yet (its AbortAck follows when it does) or a write failed (it may
                # still land: never acknowledged, said again).
                key = (msg.room, msg.manager_id)
                if key in self._failed_writes:
                    self.channel.send(
                        msg.manager_id,
                        self._write_failed_abort(
                            msg.room, "a write for this room failed and may still land"
                        ),
                    )
                elif key not in self._pending_writes:
                    ack = make(AbortAck, room=msg.room, manager_id=self.manager_id)
                    self.channel.send(msg.manager_id, ack)
                return
            r.abort_asked = True
            self._fail_locked(
                r,
                f"aborted by language side {msg.manager_id}: {msg.reason}",
                msg.kind,
            )

    @staticmethod
    def _held(r: _Room) -> frozenset:
        """The items the destination holds (named in its round-0 Reserve)."""
        return r.dest.held if r.dest is not None else frozenset()

    # Scheduling -------------------------------------------------------------------------------
    def _update_sender_status(self, r: _Room) -> None:
        s = r.sender
        if s is None or r.failed:
            return
        # the destination reserved round 0: the request may run its vision tower
        reserved = r.dest is not None and r.dest.round != EXPECTING
        if r.payload is not None and (r.token_sent > 0 or r.in_flight or reserved):
            s._set_status(KVPoll.Transferring)
        elif reserved:
            s._set_status(KVPoll.WaitingForInput)

    def _maybe_schedule(self, r: _Room) -> None:
        if r.failed or r.in_flight or r.sender is None or r.payload is None:
            return
        if r.dest is None or r.dest.round != r.round:
            return
        r.in_flight = True
        self._queue.put(r.room)

    def _submit(self, sender: "EncodeSender", payload: MultimodalPayload) -> None:
        payload.validate(self.layout)
        if payload.device() is not None and payload.ready is None:
            # The worker's copies run on another thread's stream: without the producer's
            # event they may read the rows before the producer's stream wrote them.
            raise ValueError(
                "a payload with CUDA tensors needs its ready event: call "
                "payload.record_ready() on the stream that produced it before send()"
            )
        nbytes = payload.nbytes()
        bound = self.config.max_inflight_payload_bytes
        with self.lock:
            r = self.rooms.get(sender.room)
            if r is None or r.sender is not sender:
                raise TransferError(
                    sender.room, sender.reason or "request is no longer active"
                )
            if r.payload is not None:
                raise TransferError(sender.room, "send() called twice")
            # rows of the items the destination holds are left out
            rows = r.shape.mm_tokens - r.shape.held_tokens(self._held(r))
            shape = (payload.total_tokens, payload.mm_tokens, list(payload.items))
            if shape != (r.shape.total_tokens, rows, list(r.shape.items)):
                raise ValueError(
                    f"payload of {shape[0]} tokens / {shape[1]} multimodal rows (items "
                    f"{shape[2]}) differs from the announced shape "
                    f"{r.shape.total_tokens} / {rows} rows (items {r.shape.items})"
                )
            if bound and nbytes > bound:
                raise OversizeError(
                    f"payload of {nbytes} bytes exceeds max_inflight_payload_bytes={bound}; "
                    f"it can never be admitted"
                )
            if bound and self.inflight_payload_bytes + nbytes > bound:
                raise PayloadBudgetError(
                    sender.room,
                    f"encoder holds {self.inflight_payload_bytes} payload bytes; {nbytes} more "
                    f"would exceed max_inflight_payload_bytes={bound} (nothing changed; retry later)",
                )
            r.payload, r.payload_bytes = payload, nbytes
            self.inflight_payload_bytes += nbytes
            r.first_send = time.monotonic()
            self._update_sender_status(r)
            self._maybe_schedule(r)
            scheduled = r.in_flight
        # a round queued now needs no timer (the wake-up costs ~0.1 ms)
        if not scheduled:
            self.wake()

    # Worker -------------------------------------------------------------------------------------
    def _start_worker(self) -> None:
        w = threading.Thread(
            target=self._worker_loop,
            name=f"el-encode-worker-{next(self._worker_ids)}",
            daemon=True,
        )
        self._workers = [x for x in self._workers if x.is_alive()] + [w]
        w.start()

    def _worker_loop(self) -> None:
        while True:
            room = self._queue.get()
            if room is None:
                return
            with self.lock:
                r = self.rooms.get(room)
            if r is None:
                continue
            try:
                self._run_round(r)
            except _Abandoned as e:
                # The control thread failed the round at the write's deadline (the room is
                # not this worker's any more); the write has returned since.
                if e.replaced:  # a replacement took this worker's place
                    with self.lock:
                        self._retiring_workers.discard(threading.current_thread())
                        self._workers.remove(threading.current_thread())
                    return
                continue
            except Exception as e:  # one request fails, the worker lives on
                if isinstance(e, WriteTimeoutError):
                    logger.error("encode: %s", e)
                else:
                    logger.exception(
                        "encode: round %d of room %d failed", r.round, room
                    )
                if isinstance(e, TransferError):
                    reason, kind = e.reason, e.kind
                elif isinstance(e, OversizeError):  # the request exceeds a destination
                    reason, kind = f"transfer failed: {e}", FaultKind.CLIENT
                else:
                    reason, kind = f"transfer failed: {e}", FaultKind.INTERNAL
                with self.lock:
                    self._fail_locked(r, reason, kind)
            with self.lock:
                r.in_flight = False
                # a timer starts now: the room's failure record, or its resume timer
                timer = bool(r.failed)
                if r.failed:
                    self._finish_failed_locked(r)
                elif self.rooms.get(room) is r:
                    # Every destination may already have asked for the next round while
                    # this one was finishing: schedule it now.
                    self._maybe_schedule(r)
                    timer = not r.in_flight
            if timer:  # not after a request's last round: nothing to time then
                self.wake()

    def _run_round(self, r: _Room) -> None:
        """Stage the round in encode blocks, then write it into the destination's reserved
        blocks: one transfer-engine batch, made on this thread (``_write_inline``).
        """
        B = self.layout.block_size
        with self.lock:
            if r.failed:
                return
            payload = r.payload
            d = dataclasses.replace(r.dest, blocks=list(r.dest.blocks))
            peer = self.peers.get(d.manager_id)
            t0, m0, rnd = r.token_sent, r.mm_sent, r.round
        T, M = payload.total_tokens, payload.mm_tokens
        if peer is None:
            raise TransferError(
                r.room,
                f"destination {d.manager_id} is no longer registered",
                FaultKind.UNAVAILABLE,
            )
        if d.max_tokens and T > d.max_tokens:
            raise OversizeError(
                f"request has {T} tokens but the language server accepts at most "
                f"{d.max_tokens}"
            )
        cap = min(len(d.blocks), self.layout.num_blocks) * B
        ct = min(T - t0, cap)
        cm = max(0, min(M - m0, cap))
        if cm and m0 != t0:
            raise AssertionError(f"stream misalignment: token_sent={t0} mm_sent={m0}")
        nb = blocks_for_tokens(ct, B)
        timeout = self.config.transfer_timeout_s
        staging = self.allocator.alloc_wait(
            nb, ("staging", r.room), timeout, cancelled=lambda: r.failed is not None
        )
        if staging is None:
            if r.failed:
                return
            raise TransferError(
                r.room, f"no encode staging blocks within {timeout}s", FaultKind.TIMEOUT
            )
        try:
            with self.lock:
                if r.failed:
                    return
            self.buffers.write_range(
                staging.blocks,
                payload,
                t0,
                ct,
                m0,
                cm,
                r.room,
                d.generation,
                d.checksum,
            )
            segs = round_segments(
                self.buffers.block_layout,
                self.buffers.region.data_ptr(),
                staging.blocks,
                region_base(peer.slot_ptrs),
                d.blocks,
                ct,
                cm,
            )
            self._write_inline(r, d.manager_id, peer.session_id, segs, staging)
        finally:
            # else the pending write frees it when it returns (or already did)
            if not (staging.quarantined or staging.freed):
                staging.free()
        with self.lock:
            if r.failed:
                return
            r.token_sent, r.mm_sent = t0 + ct, m0 + cm
            r.bytes_sent += sum(segs[2])
            last = r.token_sent == T
            done = make(
                RoundDone,
                room=r.room,
                manager_id=self.manager_id,
                round=rnd,
                generation=d.generation,
                token_start=t0,
                token_count=ct,
                mm_start=m0,
                mm_count=cm,
                total_tokens=T,
                mm_tokens=M,
                last=last,
                items=payload.items if last else [],
                held_items=sorted(d.held),
            )
            self.channel.send(d.manager_id, done)
            if last:
                self._drop_room_locked(r)
                r.sender._finish(KVPoll.Success, "", r)
            else:
                r.round += 1
                r.waiting_since = time.monotonic()

    def _write_inline(
        self,
        r: _Room,
        manager_id: str,
        session_id: str,
        segs: tuple,
        staging: BlockHandle,
    ) -> None:
        """A round's one transfer-engine write, made on this worker thread (no hop to a writer
        thread: that hop was ~0.15 ms of a small request's latency), until
        ``ConnectionConfig.write_deadline_s``. The control thread watches the deadline
        (``_expire_writes_locked``): past it the room fails, and the worker pool gets a
        replacement. This thread then handles the write's return as a late one and raises
        ``_Abandoned``. A failed write (ret < 0, or the engine raised) may still land in
        part: ``_raise_write_failed``."""
        timeout = self.config.write_deadline_s(
            len(staging), sum(self.layout.slot_block_bytes)
        )
        w = _InlineWrite(
            r,
            manager_id,
            staging,
            time.monotonic() + timeout,
            timeout,
            threading.current_thread(),
        )
        with self.lock:
            self._inline_writes.add(w)
        if self._next_deadline > w.deadline:  # its timers sleep past this deadline
            self.wake()
        ret, error = -1, None
        try:
            ret = write_segments(self.engine, session_id, *segs)
        except Exception as e:  # a failed write, like ret < 0
            error = e
        with self.lock:
            abandoned = w not in self._inline_writes
            self._inline_writes.discard(w)
        if abandoned:
            self._late_write_returned(
                r.room, manager_id, staging, error is not None or ret < 0
            )
            raise _Abandoned(w.replaced)
        if error is not None or ret < 0:
            self._raise_write_failed(r.room, manager_id, staging, ret, error)

    def _expire_writes_locked(self, now: float) -> float:
        """Control thread: fail the rooms whose write on a worker thread (``_write_inline``)
        is past its deadline (staging quarantined, the destination told a write may still land,
        an AbortAck once it returns complete),
        and start a replacement worker (at most ``MAX_ABANDONED_WRITES`` workers held by such
        writes at once). Returns the next deadline."""
        due = math.inf
        for w in list(self._inline_writes):
            if now < w.deadline:
                due = min(due, w.deadline)
                continue
            self._inline_writes.discard(w)
            r = w.room
            key = (r.room, w.manager_id)
            self._pending_writes[key] = self._pending_writes.get(key, 0) + 1
            w.staging.quarantine()
            if len(self._retiring_workers) < MAX_ABANDONED_WRITES:
                w.replaced = True
                self._retiring_workers.add(w.thread)
                self._start_worker()
            else:
                logger.error(
                    "encode: %d workers are held by abandoned writes (the bound); no "
                    "replacement",
                    len(self._retiring_workers),
                )
            e = WriteTimeoutError(
                r.room,
                f"data write to {w.manager_id} timed out after {w.timeout:.1f}s (it may "
                "still land)",
            )
            logger.error("encode: %s", e)
            self._fail_locked(r, e.reason, e.kind)
            r.in_flight = False  # the worker is not coming back for this room
            self._finish_failed_locked(r)
        return due

    def _raise_write_failed(
        self,
        room: int,
        manager_id: str,
        staging: BlockHandle,
        ret: int,
        error: Optional[BaseException],
    ) -> None:
        """A write returned failed (``ret`` < 0, or the engine raised ``error``) in time:
        ``_write_failed_locked``, then the room fails with ``TransferError``."""
        with self.lock:
            self._write_failed_locked(room, manager_id, staging)
        what = (
            f"ret={ret}" if error is None else f"raised {type(error).__name__}: {error}"
        )
        raise TransferError(
            room,
            f"Mooncake write to {manager_id} failed ({what}; parts of it may still land)",
        ) from error

    def _write_failed_locked(
        self, room: int, manager_id: str, staging: BlockHandle
    ) -> None:
        """A write to ``manager_id`` failed: parts may still be in flight and nothing will say
        when they end, so the room is never acknowledged to that destination for
        ``fence_timeout_s``. Its staging is free at once (only the write's source: see the
        module docstring, "Failed writes")."""
        staging.free()
        self._failed_writes[(room, manager_id)] = (
            time.monotonic() + self.config.fence_timeout_s
        )

    def _write_failed_abort(
        self, room: int, reason: str, kind: FaultKind = FaultKind.INTERNAL
    ) -> Abort:
        """The Abort for a destination whose write failed: no AbortAck will follow."""
        return make(
            Abort,
            room=room,
            manager_id=self.manager_id,
            reason=reason,
            kind=kind,
            writes_pending=True,
            write_failed=True,
        )

    def _late_write_returned(
        self,
        room: int,
        manager_id: str,
        staging: BlockHandle,
        failed: bool,
    ) -> None:
        """A write abandoned at its deadline returned (``failed``: ret < 0, it raised, or it
        was cancelled): the room's destination gets its AbortAck, or never one."""
        with self.lock:
            key = (room, manager_id)
            self._pending_writes[key] -= 1
            if self._pending_writes[key] == 0:
                del self._pending_writes[key]
            if failed:
                self._write_failed_locked(room, manager_id, staging)
            else:
                staging.free()
        if failed:
            logger.warning(
                "encode: timed-out write of room %d to %s returned failed; parts of it may "
                "still land, so the room is never acknowledged",
                room,
                manager_id,
            )
            self.channel.send(
                manager_id,
                self._write_failed_abort(room, "a timed-out write returned failed"),
            )
            self.wake()  # the never-acknowledge timer starts now
            return
        logger.warning(
            "encode: timed-out write of room %d to %s returned; acknowledging",
            room,
            manager_id,
        )
        self.channel.send(
            manager_id, make(AbortAck, room=room, manager_id=self.manager_id)
        )

    # Failure ------------------------------------------------------------------------------------
    def _fail_locked(
        self, r: _Room, reason: str, kind: FaultKind = FaultKind.INTERNAL
    ) -> None:
        """Fail the room now; tell the destination now if no write is in flight, else the
        worker does it when the write has finished, failed or timed out."""
        if r.failed is None:
            r.failed, r.fault_kind = reason, kind
            logger.info("encode: room %d failed (%s): %s", r.room, kind.value, reason)
            if r.sender is not None:
                r.sender._set_failed(reason, kind)
            self.allocator.notify_waiters()  # a worker may wait for staging blocks for it
        if not r.in_flight:
            self._finish_failed_locked(r)

    def _finish_failed_locked(self, r: _Room) -> None:
        """No write is in flight any more (or one timed out or failed): tell the destination
        and drop the room. A destination whose write is still pending gets
        ``writes_pending=True`` now and an AbortAck if the write returns complete; one whose
        write failed gets ``write_failed=True`` and never an AbortAck."""
        if self.rooms.get(r.room) is not r:
            return
        d = r.dest
        if d is not None:
            key = (r.room, d.manager_id)
            pending = key in self._pending_writes
            if key in self._failed_writes:
                msg = self._write_failed_abort(r.room, r.failed, r.fault_kind)
            elif r.abort_asked and not pending:
                msg = make(AbortAck, room=r.room, manager_id=self.manager_id)
            else:
                msg = make(
                    Abort,
                    room=r.room,
                    manager_id=self.manager_id,
                    reason=r.failed,
                    kind=r.fault_kind,
                    writes_pending=pending,
                )
            self.channel.send(d.manager_id, msg)
        self._drop_room_locked(r)
        if r.sender is not None:
            r.sender._finish(KVPoll.Failed, r.failed, r, r.fault_kind)

    def _drop_room_locked(self, r: _Room) -> None:
        del self.rooms[r.room]
        if r.failed:
            self._failed_rooms[r.room] = (r.failed, r.fault_kind, time.monotonic())
        self.inflight_payload_bytes -= r.payload_bytes
        r.payload, r.payload_bytes = None, 0

    def _tick(self, now: float) -> float:
        """Fire pairing and resume timeouts, expire failed-room records; return when the next
        one is due. A round that ends, a ``send()``, a new sender or an abort wakes the control
        thread (``wake()``), so a wait that starts then is timed from its start.

        Pairing (the request's arrival -> the destination's Expect, or the Expect -> the
        request) is bounded by ``bootstrap_timeout_s``. After the announcement, waiting for
        the destination's round-0 reservation has no timer: it waits for language blocks
        (load, not a fault; a dead peer is found by heartbeats)."""
        cfg = self.config
        due = math.inf
        with self.lock:
            for r in list(self.rooms.values()):
                if r.failed or r.in_flight:
                    continue
                if r.sender is None:
                    due = min(due, r.created + cfg.bootstrap_timeout_s)
                    if now - r.created > cfg.bootstrap_timeout_s:
                        self._fail_locked(
                            r,
                            f"bootstrap timeout: no encode request for room {r.room} "
                            f"within {cfg.bootstrap_timeout_s}s",
                            FaultKind.TIMEOUT,
                        )
                    continue
                if r.round == 0 and not r.announced:
                    due = min(due, r.waiting_since + cfg.bootstrap_timeout_s)
                    if now - r.waiting_since > cfg.bootstrap_timeout_s:
                        self._fail_locked(
                            r,
                            f"bootstrap timeout: no language server expected the "
                            f"request within {cfg.bootstrap_timeout_s}s",
                            FaultKind.TIMEOUT,
                        )
                elif r.round > 0:
                    due = min(due, r.waiting_since + cfg.resume_timeout_s)
                    if now - r.waiting_since > cfg.resume_timeout_s:
                        self._fail_locked(
                            r,
                            f"resume timeout: the language server did not ask for round "
                            f"{r.round} within {cfg.resume_timeout_s}s",
                            FaultKind.TIMEOUT,
                        )
            # After the rooms: a room failed above leaves a record whose expiry must count.
            for room, (_, _, since) in list(self._failed_rooms.items()):
                if now - since > cfg.bootstrap_timeout_s:
                    del self._failed_rooms[room]
                else:
                    due = min(due, since + cfg.bootstrap_timeout_s)
            for key, until in list(self._failed_writes.items()):
                if now >= until:
                    del self._failed_writes[key]
                else:
                    due = min(due, until)
            due = min(due, self._expire_writes_locked(now))
        return min(due, super()._tick(now))

    def _active_peers(self) -> List[str]:
        with self.lock:
            return list(
                {r.dest.manager_id for r in self.rooms.values() if r.dest is not None}
            )

    def _on_peer_dead(self, endpoint: str, reason: str) -> None:
        with self.lock:
            self.peers.pop(endpoint, None)
            for r in list(self.rooms.values()):
                if r.dest is not None and r.dest.manager_id == endpoint:
                    self._fail_locked(r, reason, FaultKind.UNAVAILABLE)

    def _drop_registration(self, endpoint: str) -> None:
        self.peers.pop(endpoint, None)

    def _close_workers(self) -> None:
        for _ in self._workers:
            self._queue.put(None)
        with self.lock:  # a worker an abandoned write holds ends when (if) it returns
            workers = [w for w in self._workers if w not in self._retiring_workers]
        for w in workers:
            w.join(timeout=5)

    def _abort_sender(
        self, sender: "EncodeSender", reason: str, kind: FaultKind
    ) -> None:
        with self.lock:
            r = self.rooms.get(sender.room)
            if r is None or r.sender is not sender:
                return
            self._fail_locked(r, reason, kind)
        self.wake()


class EncodeSender:
    """One request on the encode side (a ``TransferRequest``): ``send(payload)``, then
    ``poll()`` until Success or Failed."""

    def __init__(self, mgr: EncodeManager, room: int):
        self.mgr = mgr
        self.room = room
        self._status = KVPoll.Bootstrapping
        self.reason = ""
        self.kind = FaultKind.INTERNAL  # what failed the request, once Failed
        self._metric = KVTransferMetric()
        # rounds sent once the transfer succeeded (1 + resume rounds; 0 after AllHeld)
        self.rounds = 0

    def send(self, payload: MultimodalPayload) -> None:
        """Hand over the request (kept by reference until its last round; do not modify it;
        CUDA tensors need ``payload.record_ready()`` on their producing stream first).
        ``PayloadBudgetError``: over the in-flight bound, nothing changed, call again later.
        Any other error fails the request."""
        try:
            self.mgr._submit(self, payload)
        except PayloadBudgetError:
            raise
        except Exception as e:
            if not isinstance(e, TransferError):
                kind = (
                    FaultKind.CLIENT
                    if isinstance(e, OversizeError)
                    else FaultKind.INTERNAL
                )
                self.mgr._abort_sender(self, f"rejected: {e}", kind)
            raise

    def poll(self) -> int:
        return self._status

    def held_items(self) -> List[int]:
        """Once ``WaitingForInput``: the items (indices into the announced item table) every
        destination's prefix cache holds; ``send()``'s payload leaves their rows out and the
        vision tower need not run for them. Empty for a request no longer active."""
        with self.mgr.lock:
            r = self.mgr.rooms.get(self.room)
            if r is None or r.sender is not self:
                return []
            return sorted(self.mgr._held(r))

    def failure_exception(self) -> None:
        raise TransferError(self.room, self.reason or "failed", self.kind)

    def get_transfer_metric(self) -> KVTransferMetric:
        return self._metric

    def abort(
        self,
        reason: str = "aborted by encoder",
        kind: FaultKind = FaultKind.INTERNAL,
    ) -> None:
        self.mgr._abort_sender(self, reason, kind)

    def clear(self) -> None:
        """Nothing to clear: the manager drops the room when the request ends."""

    # Manager callbacks ------------------------------------------------------------------------
    def _set_status(self, status: int) -> None:
        if self._status not in (KVPoll.Success, KVPoll.Failed):
            self._status = max(self._status, status)

    def _set_failed(self, reason: str, kind: FaultKind) -> None:
        if self._status != KVPoll.Success:
            self.reason, self.kind = reason, kind
            self._status = KVPoll.Failed

    def _finish(
        self,
        status: int,
        reason: str,
        r: _Room,
        kind: FaultKind = FaultKind.INTERNAL,
    ) -> None:
        if status == KVPoll.Failed:
            self._set_failed(reason, kind)
        else:
            self._status = KVPoll.Success
            # no round at all when the destination held everything (AllHeld)
            self.rounds = r.round + 1 if r.token_sent else 0
        self._metric = KVTransferMetric(
            transfer_latency_s=(
                (time.monotonic() - r.first_send) if r.first_send else None
            ),
            transfer_total_bytes=r.bytes_sent,
        )
