"""Encode side: ``EncodeManager`` (one per encode process) and ``EncodeSender`` (one per request).

Flow of one request (bootstrap room R) with N language destinations (language TP ranks):

1. Each language manager registers once (``Register``: layout + buffer addresses). The layouts are
   compared field by field; a mismatch is answered with ``RegisterAck(ok=False)`` naming the field,
   logged here, and nothing is ever written to that peer.
2. Each destination rank sends ``Reserve(room, round=0, blocks)``. A room may learn about its
   destinations before or after ``create_sender(R)``.
3. ``sender.send(payload)`` hands over the request (the sender keeps a reference; the caller must
   not modify the tensors afterwards). A round starts only when the payload is there and *every*
   destination has reserved blocks for that round.
4. A round stages the next ``min(remaining, capacity)`` tokens (and as many multimodal rows) in
   this side's blocks, writes them into every destination with Mooncake, frees the staging
   blocks, and sends ``RoundDone`` with the token/multimodal ranges it covered. The capacity is the
   smallest destination reservation, capped by this side's pool. Bytes already sent are never
   sent again.
5. Not the last round: wait (``resume_timeout_s``) until every destination reserved blocks for the
   next round, then go to 4. Last round: Success, the room's table entry is dropped.

Staging per round (instead of holding a whole request in encode blocks) means encode blocks are
held only while a write is in flight, so no cycle of waits between the two pools can form.

Abort: ``sender.abort()`` or a language ``Abort`` fails the room; if a write is in flight, the
worker finishes or fails it first, and only then tells the destinations (``Abort``, or
``AbortAck`` to the one that asked), so a language block is never freed while being written.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Dict, List, Optional

from sglang.srt.disaggregation.base.conn import BaseKVSender, KVPoll, KVTransferMetric
from sglang.srt.disaggregation.encode_language.allocator import OversizeError
from sglang.srt.disaggregation.encode_language.buffers import (
    MultimodalBufferConfig,
    MultimodalPayload,
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


@dataclasses.dataclass
class _Peer:
    manager_id: str
    session_id: str
    layout: LayoutManifest
    slot_ptrs: List[int]


@dataclasses.dataclass
class _Dest:
    manager_id: str
    rank: int
    round: int
    blocks: List[int]
    max_tokens: int = 0


@dataclasses.dataclass
class _Room:
    room: int
    created: float
    sender: Optional["EncodeSender"] = None
    num_ranks: Optional[int] = None
    dests: Dict[int, _Dest] = dataclasses.field(default_factory=dict)
    payload: Optional[MultimodalPayload] = None
    round: int = 0
    token_sent: int = 0
    mm_sent: int = 0
    in_flight: bool = False
    waiting_since: float = 0.0  # start of the current wait for destinations
    failed: Optional[str] = None  # reason, once failed
    ack_to: List[str] = dataclasses.field(default_factory=list)  # managers that asked to abort
    bytes_sent: int = 0
    first_send: Optional[float] = None


class EncodeManager(ManagerBase):
    """Owns the encode side's buffers and the transfer workers."""

    role = "encode"

    def __init__(self, buffer_config: MultimodalBufferConfig, config: Optional[ConnectionConfig] = None, engine=None):
        self.peers: Dict[str, _Peer] = {}
        self.rooms: Dict[int, _Room] = {}
        self._queue: "queue.Queue[Optional[int]]" = queue.Queue()
        self._probes: Dict[int, threading.Event] = {}
        self.refused_registrations = 0
        super().__init__(buffer_config, config, engine)
        self._workers = [
            threading.Thread(target=self._worker_loop, name=f"el-encode-worker-{i}", daemon=True)
            for i in range(self.config.num_transfer_workers)
        ]
        for w in self._workers:
            w.start()

    # Public API -----------------------------------------------------------------------------
    def create_sender(self, room: int) -> "EncodeSender":
        with self.lock:
            r = self.rooms.get(room)
            if r is not None and r.sender is not None:
                raise RoomInUseError(f"bootstrap room {room} is already in use by an active request on this encoder")
            if r is None:
                r = self.rooms[room] = _Room(room=room, created=time.monotonic())
            r.waiting_since = time.monotonic()
            sender = EncodeSender(self, room)
            r.sender = sender
            self._update_sender_status(r)
            return sender

    def num_active_rooms(self) -> int:
        with self.lock:
            return len(self.rooms)

    def room_state(self, room: int) -> Optional[dict]:
        with self.lock:
            r = self.rooms.get(room)
            if r is None:
                return None
            return dict(
                round=r.round,
                num_ranks=r.num_ranks,
                ready=sum(1 for d in r.dests.values() if d.round == r.round),
                token_sent=r.token_sent,
                mm_sent=r.mm_sent,
                in_flight=r.in_flight,
                has_payload=r.payload is not None,
            )

    def probe(self, manager_id: str, timeout_s: float = 5.0) -> bool:
        """Health check of the data path to a registered language manager: write a nonce into its
        scratch block (never a request's block) and ask it, by ping, to read it back."""
        with self.lock:
            peer = self.peers.get(manager_id)
        if peer is None:
            return False
        nonce = next(self._nonce)
        src_blocks = [self.buffers.scratch_block]
        self.buffers.write_scratch_nonce(nonce)
        aux_block_bytes = self.buffers.slot_block_bytes()[3]
        dst = peer.slot_ptrs[3] + peer.layout.num_blocks * aux_block_bytes
        ret = self.engine.transfer_sync(peer.session_id, self.buffers.scratch_aux_address(), dst, 8)
        if ret < 0:
            return False
        done = threading.Event()
        with self.lock:
            self._probes[nonce] = done
        from sglang.srt.disaggregation.encode_language.manifest import Ping

        self.channel.send(manager_id, make(Ping, manager_id=self.manager_id, nonce=-nonce))
        ok = done.wait(timeout_s)
        with self.lock:
            self._probes.pop(nonce, None)
        del src_blocks
        return ok

    def _on_pong(self, msg) -> None:
        if msg.nonce < 0:
            with self.lock:
                ev = self._probes.get(-msg.nonce)
            if ev is not None:
                ev.set()

    # Message handling -----------------------------------------------------------------------
    def _handle(self, msg) -> None:
        if isinstance(msg, Register):
            self._on_register(msg)
        elif isinstance(msg, Reserve):
            self._on_reserve(msg)
        elif isinstance(msg, Abort):
            self._on_abort(msg)
        else:
            logger.warning("encode: unexpected control message %s; dropped", type(msg).__name__)
            self.channel.rejected += 1

    def _on_register(self, msg: Register) -> None:
        try:
            remote = LayoutManifest.from_dict(msg.layout)
            self.layout.check_compatible(remote, where=f"language peer {msg.manager_id}")
            if len(msg.slot_ptrs) != self.layout.num_slots:
                raise ProtocolError(f"peer sent {len(msg.slot_ptrs)} slot addresses, layout has {self.layout.num_slots}")
        except (LayoutMismatchError, ProtocolError) as e:
            logger.error("encode: rejected registration of %s: %s", msg.manager_id, e)
            self.refused_registrations += 1
            with self.lock:
                self.peers.pop(msg.manager_id, None)
            self.channel.send(msg.manager_id, make(RegisterAck, manager_id=self.manager_id, ok=False, error=str(e), layout=self.layout.to_dict()))
            return
        with self.lock:
            self.peers[msg.manager_id] = _Peer(msg.manager_id, msg.session_id, remote, list(msg.slot_ptrs))
            self.health.pop(msg.manager_id, None)
        self.channel.send(msg.manager_id, make(RegisterAck, manager_id=self.manager_id, ok=True, error="", layout=self.layout.to_dict()))

    def _on_reserve(self, msg: Reserve) -> None:
        def refuse(reason):
            logger.warning("encode: refused reservation of room %d rank %d from %s: %s", msg.room, msg.rank, msg.manager_id, reason)
            self.channel.send(msg.manager_id, make(Abort, room=msg.room, manager_id=self.manager_id, reason=reason))

        with self.lock:
            peer = self.peers.get(msg.manager_id)
            if peer is None:
                return refuse("language manager is not registered with this encoder")
            nb = peer.layout.num_blocks
            if not msg.blocks or len(set(msg.blocks)) != len(msg.blocks) or any(not (0 <= b < nb) for b in msg.blocks):
                return refuse(f"invalid block list for a pool of {nb} blocks")
            if msg.num_ranks < 1 or not (0 <= msg.rank < msg.num_ranks):
                return refuse(f"invalid rank {msg.rank} of {msg.num_ranks}")
            r = self.rooms.get(msg.room)
            if r is None:
                if msg.round != 0:
                    return refuse("unknown room (already finished or failed)")
                r = self.rooms[msg.room] = _Room(room=msg.room, created=time.monotonic(), waiting_since=time.monotonic())
            if r.failed:
                return refuse(f"request already failed: {r.failed}")
            if r.num_ranks is None:
                r.num_ranks = msg.num_ranks
            elif r.num_ranks != msg.num_ranks:
                return refuse(f"room {msg.room} has {r.num_ranks} destinations, this one says {msg.num_ranks}")
            d = r.dests.get(msg.rank)
            if msg.round == 0:
                if d is not None:
                    return refuse(f"bootstrap room {msg.room} is already in use (rank {msg.rank} already reserved)")
                r.dests[msg.rank] = _Dest(msg.manager_id, msg.rank, 0, list(msg.blocks), msg.max_tokens)
            else:
                if d is None or d.manager_id != msg.manager_id or msg.round != r.round or d.round == r.round:
                    return refuse(f"unexpected reservation for round {msg.round} (room is at round {r.round})")
                d.round, d.blocks = msg.round, list(msg.blocks)
            self._update_sender_status(r)
            self._maybe_schedule(r)

    def _on_abort(self, msg: Abort) -> None:
        with self.lock:
            r = self.rooms.get(msg.room)
            if r is None or all(d.manager_id != msg.manager_id for d in r.dests.values()):
                # Nothing of ours is writing for that manager: acknowledge at once.
                self.channel.send(msg.manager_id, make(AbortAck, room=msg.room))
                return
            r.ack_to.append(msg.manager_id)
            self._fail_locked(r, f"aborted by language side {msg.manager_id}: {msg.reason}")

    # Scheduling -------------------------------------------------------------------------------
    def _update_sender_status(self, r: _Room) -> None:
        s = r.sender
        if s is None or r.failed:
            return
        all_ready = r.num_ranks is not None and len(r.dests) == r.num_ranks
        if r.payload is not None and (r.token_sent > 0 or r.in_flight or all_ready):
            s._set_status(KVPoll.Transferring)
        elif all_ready:
            s._set_status(KVPoll.WaitingForInput)

    def _maybe_schedule(self, r: _Room) -> None:
        if r.failed or r.in_flight or r.sender is None or r.payload is None or r.num_ranks is None:
            return
        if len(r.dests) != r.num_ranks or any(d.round != r.round for d in r.dests.values()):
            return
        r.in_flight = True
        self._queue.put(r.room)

    def _submit(self, sender: "EncodeSender", payload: MultimodalPayload) -> None:
        payload.validate(self.layout)
        with self.lock:
            r = self.rooms.get(sender.room)
            if r is None or r.sender is not sender:
                raise TransferError(sender.room, sender.reason or "request is no longer active")
            if r.payload is not None:
                raise TransferError(sender.room, "send() called twice")
            r.payload = payload
            r.first_send = time.monotonic()
            self._update_sender_status(r)
            self._maybe_schedule(r)

    # Worker -------------------------------------------------------------------------------------
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
            except Exception as e:  # one request fails, the worker lives on
                logger.exception("encode: round %d of room %d failed", r.round, room)
                with self.lock:
                    self._fail_locked(r, f"transfer failed: {e}")
            finally:
                with self.lock:
                    r.in_flight = False
                    if r.failed:
                        self._finish_failed_locked(r)
                    elif self.rooms.get(room) is r:
                        # Every destination may already have asked for the next round while
                        # this one was finishing: schedule it now.
                        self._maybe_schedule(r)

    def _run_round(self, r: _Room) -> None:
        B = self.layout.block_size
        with self.lock:
            if r.failed:
                return
            payload = r.payload
            dests = sorted(r.dests.values(), key=lambda d: d.rank)
            peers = [self.peers.get(d.manager_id) for d in dests]
            t0, m0, rnd = r.token_sent, r.mm_sent, r.round
        T, M = payload.total_tokens, payload.mm_tokens
        for d, p in zip(dests, peers):
            if p is None:
                raise TransferError(r.room, f"destination {d.manager_id} is no longer registered")
            if d.max_tokens and T > d.max_tokens:
                raise OversizeError(
                    f"request has {T} tokens but language rank {d.rank} accepts at most {d.max_tokens}"
                )
        cap_blocks = min([len(d.blocks) for d in dests] + [self.layout.num_blocks])
        ct = min(T - t0, cap_blocks * B)
        cm = max(0, min(M - m0, cap_blocks * B))
        if cm and m0 != t0:
            raise AssertionError(f"stream misalignment: token_sent={t0} mm_sent={m0}")
        nb = blocks_for_tokens(ct, B)
        staging = self._alloc_staging(r, nb)
        if staging is None:
            return  # failed while waiting
        try:
            self.buffers.write_range(staging.blocks, payload, t0, ct, m0, cm)
            nbytes = 0
            for d, p in zip(dests, peers):
                with self.lock:
                    if r.failed:
                        return
                srcs, dsts, lens = self.buffers.round_segments(staging.blocks, d.blocks, ct, cm, p.slot_ptrs)
                ret = self.engine.batch_transfer_sync(p.session_id, srcs, dsts, lens)
                if ret < 0:
                    raise TransferError(r.room, f"Mooncake write to {d.manager_id} failed (ret={ret})")
                nbytes += sum(lens)
        finally:
            staging.free()
        with self.lock:
            if r.failed:
                return
            r.token_sent, r.mm_sent = t0 + ct, m0 + cm
            r.bytes_sent += nbytes
            last = r.token_sent == T
            for d in dests:
                self.channel.send(
                    d.manager_id,
                    make(RoundDone, room=r.room, round=rnd, token_start=t0, token_count=ct, mm_start=m0,
                         mm_count=cm, total_tokens=T, mm_tokens=M, last=last,
                         items=payload.items if last else []),
                )
            if last:
                r.sender._finish(KVPoll.Success, "", r)
                del self.rooms[r.room]
            else:
                r.round += 1
                r.waiting_since = time.monotonic()

    def _alloc_staging(self, r: _Room, nb: int):
        deadline = time.monotonic() + self.config.transfer_timeout_s
        while True:
            h = self.allocator.alloc(nb, owner=("staging", r.room))
            if h is not None:
                return h
            with self.lock:
                if r.failed:
                    return None
            if time.monotonic() > deadline:
                raise TransferError(r.room, f"no encode staging blocks within {self.config.transfer_timeout_s}s")
            time.sleep(0.002)

    # Failure ------------------------------------------------------------------------------------
    def _fail_locked(self, r: _Room, reason: str) -> None:
        """Fail the room now; tell the destinations now if no write is in flight, else the
        worker does it when the write has finished or failed."""
        if r.failed is None:
            r.failed = reason
            logger.info("encode: room %d failed: %s", r.room, reason)
            if r.sender is not None:
                r.sender._set_failed(reason)
        if not r.in_flight:
            self._finish_failed_locked(r)

    def _finish_failed_locked(self, r: _Room) -> None:
        """No write is in flight any more: tell every destination and drop the room."""
        if self.rooms.get(r.room) is not r:
            return
        for d in r.dests.values():
            if d.manager_id in r.ack_to:
                self.channel.send(d.manager_id, make(AbortAck, room=r.room))
            else:
                self.channel.send(d.manager_id, make(Abort, room=r.room, manager_id=self.manager_id, reason=r.failed))
        for m in set(r.ack_to) - {d.manager_id for d in r.dests.values()}:
            self.channel.send(m, make(AbortAck, room=r.room))
        del self.rooms[r.room]
        if r.sender is not None:
            r.sender._finish(KVPoll.Failed, r.failed, r)

    def _tick(self, now: float) -> None:
        cfg = self.config
        with self.lock:
            for r in list(self.rooms.values()):
                if r.failed or r.in_flight:
                    continue
                all_reserved = r.num_ranks is not None and len(r.dests) == r.num_ranks
                if r.sender is None and now - r.created > cfg.bootstrap_timeout_s:
                    self._fail_locked(r, f"bootstrap timeout: no encode request for room {r.room} within {cfg.bootstrap_timeout_s}s")
                elif r.round == 0 and not all_reserved and now - r.waiting_since > cfg.bootstrap_timeout_s:
                    self._fail_locked(
                        r,
                        f"bootstrap timeout: {len(r.dests)}/{r.num_ranks or '?'} destinations reserved "
                        f"within {cfg.bootstrap_timeout_s}s",
                    )
                elif r.round > 0 and now - r.waiting_since > cfg.resume_timeout_s:
                    ready = sum(1 for d in r.dests.values() if d.round == r.round)
                    self._fail_locked(
                        r, f"resume timeout: {ready}/{r.num_ranks} destinations asked for round {r.round} within {cfg.resume_timeout_s}s"
                    )
        super()._tick(now)

    def _active_peers(self) -> List[str]:
        with self.lock:
            return list({d.manager_id for r in self.rooms.values() for d in r.dests.values()})

    def _on_peer_dead(self, endpoint: str, reason: str) -> None:
        with self.lock:
            self.peers.pop(endpoint, None)
            for r in list(self.rooms.values()):
                if any(d.manager_id == endpoint for d in r.dests.values()):
                    self._fail_locked(r, reason)

    def _close_workers(self) -> None:
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join(timeout=5)

    def _abort_sender(self, sender: "EncodeSender", reason: str) -> None:
        with self.lock:
            r = self.rooms.get(sender.room)
            if r is None or r.sender is not sender:
                return
            self._fail_locked(r, reason)


class EncodeSender(BaseKVSender):
    """One request on the encode side. ``send(payload)``, then ``poll()`` until Success/Failed."""

    def __init__(self, mgr: EncodeManager, room: int):
        self.mgr = mgr
        self.room = room
        self._status = KVPoll.Bootstrapping
        self.reason = ""
        self._metric = KVTransferMetric()
        self._done = threading.Event()

    # BaseKVSender ---------------------------------------------------------------------------
    def init(self, num_kv_indices: int = 0, aux_index: Optional[int] = None):
        """Nothing to do: destinations arrive by reservation."""

    def send(self, payload: MultimodalPayload, state_indices=None, num_kv_tokens=None):  # noqa: D401
        """Hand over the request (kept by reference; do not modify it afterwards)."""
        try:
            self.mgr._submit(self, payload)
        except Exception as e:
            if not isinstance(e, TransferError):
                self.mgr._abort_sender(self, f"rejected: {e}")
            raise

    def poll(self) -> KVPoll:
        return self._status

    def failure_exception(self):
        raise TransferError(self.room, self.reason or "failed")

    def get_transfer_metric(self) -> KVTransferMetric:
        return self._metric

    def abort(self, reason: str = "aborted by encoder"):
        self.mgr._abort_sender(self, reason)

    def clear(self):
        """Nothing to clear: the manager drops the room when the request ends."""

    def wait(self, timeout_s: float) -> KVPoll:
        """Block until Success or Failed (or the timeout); returns the status."""
        self._done.wait(timeout_s)
        return self._status

    # Manager callbacks ------------------------------------------------------------------------
    def _set_status(self, status: int) -> None:
        if self._status not in (KVPoll.Success, KVPoll.Failed):
            self._status = max(self._status, status)

    def _set_failed(self, reason: str) -> None:
        if self._status != KVPoll.Success:
            self.reason = reason
            self._status = KVPoll.Failed

    def _finish(self, status: int, reason: str, r: _Room) -> None:
        if status == KVPoll.Failed:
            self._set_failed(reason)
        else:
            self._status = KVPoll.Success
        self._metric = KVTransferMetric(
            transfer_latency_s=(time.monotonic() - r.first_send) if r.first_send else None,
            transfer_total_bytes=r.bytes_sent,
        )
        self._done.set()
