"""The language server's ``Scheduler.mm_receiver`` (``--disaggregation-mode language``).

Implements the scheduler's multimodal-receiver duck interface (``process_waiting_requests``,
``abort_waiting_requests``, ``waiting_list``; upstream's EPD language side uses the same seam)
on ``LanguageManager`` / ``LanguageReceiver``:

* A tokenized request whose prompt holds an image or video placeholder (the shared rule with
  the encode server, which finishes at once when there is no media) waits here, beside the
  normal scheduler, while its rows are received (expect -> the encoder's announcement ->
  reserve -> rounds -> take; a request too large for this rank fails at the announcement,
  answered 400 on both sides). Everything else
  (text-only, health checks and warm-up from the fake bootstrap host) passes straight through.
* A received request becomes an ordinary multimodal request: ``input_ids`` are the encode
  side's expanded ids, and ``mm_inputs`` holds one precomputed ``MultimodalDataItem`` per image
  or video (rows = embedding and deepstack concatenated on width), hashed with the encoder's
  content hash, plus the encoder's M-RoPE positions and delta. The unchanged scheduling path
  then pads ids by item hash (radix cache), chunks prefill, retracts and logs probabilities as
  in colocated serving.
* A failed transfer (encoder abort, timeout, dead peer, bad data) fails the request at once
  with the transport's reason; an encoder that has no media for the placeholder answers
  ``FaultKind.NO_TRANSFER`` and the request runs as it is (``waits_for_rows``).
* An abort wins over a transfer that ended meanwhile (``WaitingRequest.aborted``), and the
  aborts of an iteration apply before its poll.
* ``--tp N`` (one receive per server): only attention-TP rank 0 (the *owner*) has a
  ``LanguageManager`` and creates receivers (the encoder sends one copy per server).
  Every rank keeps the same waiting list (the scheduler hands every rank the same requests);
  the other ranks poll a stand-in that reports ``Success``, so the MIN all-reduce of the poll
  states over the TP cpu group yields the owner's state on every rank. When a request is ready,
  all ranks take part in one broadcast from the owner (a pickled header, then the rows in a
  fixed order), so every rank attaches the same rows before the request enters scheduling.
  Every rank joins every collective of a request whatever fails on it (``_take_rows``).
* Prefix-aware skip (one receive per server, ``--tp 1``): an announcement waits until this
  thread has matched the request's ids against the radix cache (``PrefixHolds``); the items the
  cache holds are named in the reservation and locked until the request is over, the encoder
  sends no rows for them, and they become items without rows (``_attach``): they lie in the
  cached prefix, which prefill never embeds. A request whose every item is held takes no
  round: it is ready in the iteration that matched it (ids and positions from the
  announcement).
* The request's ``bootstrap_host`` is looked up off the scheduler's thread
  (``PeerLookups.lookup_async``): a request whose name is not in the lookup table waits here
  (``_Resolving``) meanwhile; a name that does not exist is the client's fault (400), a
  lookup that failed for now a 503.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from array import array
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch
import torch.distributed as dist
import zmq

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.buffers import (
    MultimodalBufferConfig,
    use_on_streams,
)
from sglang.srt.disaggregation.encode_language.connection import (
    PEER_LOOKUPS,
    ConnectionConfig,
    PeerAddressError,
    RoomInUseError,
)
from sglang.srt.disaggregation.encode_language.encode_request_faults import (
    poll_and_end_failed,
    status_of_transfer_failure,
)
from sglang.srt.disaggregation.encode_language.item_table import (
    ItemEntry,
    check_against_mask,
)
from sglang.srt.disaggregation.encode_language.language_mm_inputs import rows_to_host
from sglang.srt.disaggregation.encode_language.manifest import FaultKind, dtype_name
from sglang.srt.disaggregation.encode_language.metrics import EncodeLanguageMetrics
from sglang.srt.disaggregation.encode_language.payload import ReceivedData
from sglang.srt.disaggregation.encode_language.prefix_holds import (
    PrefixHolds,
    item_without_rows,
)
from sglang.srt.disaggregation.encode_language.receiver import (
    LanguageManager,
    LanguageReceiver,
)
from sglang.srt.disaggregation.utils import FAKE_BOOTSTRAP_HOST, all_reduce_flags
from sglang.srt.managers.io_struct import AbortReq, TokenizedGenerateReqInput
from sglang.srt.managers.schedule_batch import MultimodalProcessorOutput, Req
from sglang.srt.managers.utils import (
    compute_num_reserved_tokens,
    validate_context_length,
)
from sglang.srt.multimodal.modality import MultimodalInputFormat
from sglang.srt.runtime_context import get_device, get_disagg, get_parallel, get_serving

if TYPE_CHECKING:
    from sglang.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)

# Longest sleep of ``sleep_until_progress``: transfers, failures and arriving requests end it at
# once; the bound covers the one deadline this thread checks itself (a bootstrap address
# lookup's, ``_start_looked_up``).
PROGRESS_WAIT_MAX_S = 0.05


def placeholder_token_ids(hf_config) -> set:
    """The image and video placeholder token ids of a Qwen3-VL config."""
    return {hf_config.image_token_id, hf_config.video_token_id}


def waits_for_rows(input_ids, placeholder_ids: set) -> bool:
    """The language side's rule, which the encode server applies to the same prompt: a prompt
    with a placeholder token reserves a room. The encoder has the last word (the media): it
    sends the rows, or answers ``FaultKind.NO_TRANSFER`` and the prompt runs as it is.
    """
    return input_ids is not None and any(t in placeholder_ids for t in input_ids)


@dataclasses.dataclass
class WaitingRequest:
    recv_req: TokenizedGenerateReqInput
    # LanguageReceiver on the owner; a stand-in (below) on the other TP ranks
    receiver: Any
    since: float
    # Set by an AbortReq (on every TP rank alike): the request fails whatever its transfer
    # does meanwhile, even if it succeeded already.
    aborted: Optional[str] = None
    # the radix-cache lock on the prefix holding the items named in the reservation
    lock: Any = None

    @property
    def rid(self) -> str:
        return self.recv_req.rid


class _FollowerPoll:
    """A non-owner TP rank's stand-in receiver: reports the highest state, so the MIN
    all-reduce over the TP group yields the owner's state."""

    reason = None

    def poll(self) -> int:
        return KVPoll.Success

    def abort(self, reason: str = "") -> None:
        pass  # the owner, which got the same abort, ends the room


class _RefusedPoll:
    """The owner could not create a receiver (room in use, a bootstrap address that
    cannot be used): the request fails through the poll agreement, so every rank drops it in
    the same iteration, answered by ``kind``."""

    def __init__(self, reason: str, kind: FaultKind = FaultKind.CLIENT) -> None:
        self.reason, self.kind = reason, kind

    def poll(self) -> int:
        return KVPoll.Failed

    def abort(self, reason: str = "") -> None:
        pass


class _Resolving:
    """The owner's stand-in while the request's bootstrap address is looked up on a worker
    thread (``lookup``, a future): reports Bootstrapping, so the MIN all-reduce keeps every
    rank waiting; the owner replaces it with the receiver once the lookup is done."""

    reason = None

    def __init__(self, lookup, deadline: float) -> None:
        self.lookup, self.deadline = lookup, deadline

    def poll(self) -> int:
        return KVPoll.Bootstrapping

    def abort(self, reason: str = "") -> None:
        pass  # nothing started; the lookup's answer is dropped with the request


class _FailedOnAnotherRank(Exception):
    """``_take_rows``: another TP rank could not take part; ``_agree_on_failures`` names it."""


# The rows broadcast over the TP group, in this order on every rank; the last ones (the
# multimodal rows) on the device on GPUs.
_TOKEN_FIELDS = ("fill_ids", "mrope_positions", "mm_mask")
_ON_DEVICE = (False, False, False, True)


class LanguageMMReceiver:
    def __init__(self, scheduler: "Scheduler") -> None:
        self.scheduler = scheduler
        hf_config = scheduler.model_config.hf_config
        self.hf_config = hf_config
        self.placeholder_ids = placeholder_token_ids(hf_config)
        disagg = get_disagg()
        buffer_config = MultimodalBufferConfig.from_server_args(
            disagg,
            hidden_size=hf_config.text_config.hidden_size,
            deepstack_count=len(
                getattr(hf_config.vision_config, "deepstack_visual_indexes", None) or []
            ),
            embed_dtype=dtype_name(scheduler.model_config.dtype),
        )
        conn = ConnectionConfig.from_server_args(
            scheduler.server_args, gpu_id=get_device().gpu_id
        )
        self.rank = get_parallel().attn_tp_rank
        self.num_ranks = get_parallel().attn_tp_size
        # One receive per server: only the owner (attention-TP rank 0) has buffers and receives.
        self.is_owner = self.rank == 0
        # Prefix-aware skip needs the owner's match to hold on every rank: one rank only.
        self.holds = (
            PrefixHolds(scheduler.tree_cache)
            if self.is_owner and self.num_ranks == 1
            else None
        )
        self.manager: Optional[LanguageManager] = (
            LanguageManager(buffer_config, conn, prefix_match=self.holds is not None)
            if self.is_owner
            else None
        )
        self.waiting_list: List[WaitingRequest] = []
        self.peer_lookups = PEER_LOOKUPS
        self._progress_poller: Optional[zmq.Poller] = None  # sleep_until_progress
        self.metrics = EncodeLanguageMetrics(
            "language", scheduler.metrics_reporter.enable_metrics
        )
        if self.manager is not None:
            self.metrics.observe_blocks(
                self.manager.allocator, len(self.manager.exposures.blocks)
            )

    # The mm_receiver interface ---------------------------------------------------------------
    def process_waiting_requests(self, recv_reqs: List) -> Tuple[List, List]:
        """(requests to schedule now, [(Req, error, status)] to fail)."""
        ready: List = []
        aborts: List = []
        if self.holds is not None:
            self.holds.sweep(
                {req.rid for req in self.scheduler.grammar_manager.grammar_queue}
            )
        for recv_req in recv_reqs:
            if isinstance(recv_req, AbortReq):
                # Before the poll below: a request that becomes ready in this iteration is
                # not in the scheduler's queues yet when the scheduler handles this abort.
                self.abort_waiting_requests(recv_req)
            if not self.needs_transfer(recv_req):
                ready.append(recv_req)
                continue
            error = self._start(recv_req)
            if error is not None:
                logger.error("language: request %s refused: %s", recv_req.rid, error)
                aborts.append(
                    (self._req_for_error(recv_req), error, HTTPStatus.BAD_REQUEST)
                )
        if self.waiting_list:
            if self.is_owner:
                self._start_looked_up()
            if self.holds is not None:
                self._match_announced()
            self._poll(ready, aborts)
        if self.manager is not None:
            self.metrics.observe_blocks(
                self.manager.allocator, len(self.manager.exposures.blocks)
            )
        self.metrics.observe_waiting(len(self.waiting_list))
        return ready, aborts

    def abort_waiting_requests(self, recv_req) -> None:
        """``/abort_request`` or a client disconnect: the room ends on both sides and the next
        poll fails the request, also when its transfer succeeded meanwhile (as upstream's EPD
        receiver fails PENDING and SUCCESS requests alike). Idempotent: the scheduler calls it
        again for an abort ``process_waiting_requests`` already applied."""
        for w in self.waiting_list:
            if w.aborted is None and (
                recv_req.abort_all or w.rid.startswith(recv_req.rid)
            ):
                logger.info(
                    "language: abort request %s (room %s)",
                    w.rid,
                    w.recv_req.bootstrap_room,
                )
                w.aborted = "aborted by the client"
                w.receiver.abort(w.aborted)

    def idle(self) -> bool:
        """Nothing waits here and no prefix is held for a request: the scheduler may call
        itself idle (and ``/flush_cache`` reset the tree, which a held lock must outlive).
        """
        return not self.waiting_list and (
            self.holds is None or self.holds.num_held == 0
        )

    def request_queued(self, req: Req) -> None:
        """The scheduler queued ``req`` (a received request, or one retracted): a held
        prefix stays locked until it is over."""
        if self.holds is not None:
            self.holds.queued(req)

    def request_released(self, req: Req) -> None:
        """The scheduler dropped ``req`` unfinished (aborted in its queue): its held prefix
        is released."""
        if self.holds is not None:
            self.holds.released(req)

    def sleep_until_progress(self) -> None:
        """The scheduler has nothing to run and sleeps when idle (``--sleep-on-idle``, this
        rank polls the scheduler's sockets): while requests wait here, block until one can go
        on (it succeeded or failed, or waits for the prefix match), a request or an abort
        arrives, or ``PROGRESS_WAIT_MAX_S`` passed, instead of spinning on a core the encode
        server may share."""
        if self.manager is None or not self.waiting_list:
            return
        wakeups = self.manager.scheduler_wakeups
        if self._progress_poller is None:
            self._progress_poller = zmq.Poller()
            channels = self.scheduler.ipc_channels
            for sock in (channels.recv_from_tokenizer, channels.recv_from_rpc):
                self._progress_poller.register(sock, zmq.POLLIN)
            self._progress_poller.register(wakeups.fileno(), zmq.POLLIN)
        self._progress_poller.poll(PROGRESS_WAIT_MAX_S * 1000)
        wakeups.drain()

    # Rules --------------------------------------------------------------------------------------
    def needs_transfer(self, recv_req) -> bool:
        """Same rule as the encode server: media in the prompt, not a health check."""
        return (
            isinstance(recv_req, TokenizedGenerateReqInput)
            and recv_req.bootstrap_host != FAKE_BOOTSTRAP_HOST
            and waits_for_rows(recv_req.input_ids, self.placeholder_ids)
        )

    # Internals ----------------------------------------------------------------------------------
    def _start(self, recv_req: TokenizedGenerateReqInput):
        if None in (
            recv_req.bootstrap_host,
            recv_req.bootstrap_port,
            recv_req.bootstrap_room,
        ):
            return (
                "a request with an image or video needs bootstrap_host, bootstrap_port and "
                "bootstrap_room (send it through sglang-router --pd-disaggregation)"
            )
        now = time.monotonic()
        if not self.is_owner:
            self.waiting_list.append(WaitingRequest(recv_req, _FollowerPoll(), now))
            return None
        lookup = self.peer_lookups.lookup_async(
            f"{recv_req.bootstrap_host}:{recv_req.bootstrap_port}"
        )
        if lookup.done():  # an IP or a cached name: the usual case
            rx = self._create_receiver(recv_req, lookup)
        else:  # a name looked up on a worker thread: its end wakes a sleeping scheduler
            wakeups = self.manager.scheduler_wakeups
            lookup.add_done_callback(lambda _: wakeups.wake())
            rx = _Resolving(lookup, now + self.manager.config.bootstrap_timeout_s)
        self.waiting_list.append(WaitingRequest(recv_req, rx, now))
        return None

    def _start_looked_up(self) -> None:
        """The owner: start the requests whose bootstrap address lookup finished (or ran out
        of the bootstrap timeout)."""
        now = time.monotonic()
        for w in self.waiting_list:
            if not isinstance(w.receiver, _Resolving) or w.aborted is not None:
                continue
            if w.receiver.lookup.done():
                w.receiver = self._create_receiver(w.recv_req, w.receiver.lookup)
            elif now > w.receiver.deadline:
                reason = (
                    f"looking up bootstrap address {w.recv_req.bootstrap_host!r} took "
                    f"over {self.manager.config.bootstrap_timeout_s} s"
                )
                logger.error("language: request %s refused: %s", w.rid, reason)
                w.receiver = _RefusedPoll(reason, FaultKind.UNAVAILABLE)

    def _create_receiver(self, recv_req: TokenizedGenerateReqInput, lookup):
        """The receiver of ``recv_req`` at the looked-up endpoint (``lookup``, a done future),
        or a ``_RefusedPoll`` that fails it through the poll agreement (every TP rank queued
        the request)."""
        try:
            return self.manager.create_receiver(
                lookup.result(),
                recv_req.bootstrap_room,
                max_tokens=self.scheduler.max_req_input_len,
            )
        except (RoomInUseError, PeerAddressError) as e:
            logger.error("language: request %s refused: %s", recv_req.rid, e)
            return _RefusedPoll(str(e), getattr(e, "kind", FaultKind.CLIENT))
        except Exception as e:  # fails the request, never the scheduler
            logger.exception("language: request %s could not start", recv_req.rid)
            return _RefusedPoll(
                f"could not start the transfer: {e}", FaultKind.INTERNAL
            )

    def _match_announced(self) -> None:
        """Answer every announcement that waits for the prefix cache (``MATCH``): match its
        ids, lock the prefix holding its items, tell the receiver which items it holds.
        """
        for w in self.waiting_list:
            shape = (
                w.receiver.match_wanted()
                if isinstance(w.receiver, LanguageReceiver)
                else None
            )
            if shape is None:
                continue
            self.holds.release(w.lock)  # announced again (the encoder lost the room)
            w.lock = None
            try:
                held, lock = self.holds.match(w.recv_req, shape.input_ids, shape.items)
            except Exception:  # a bad item table fails at _attach; nothing is held here
                logger.exception("language: request %s: prefix match failed", w.rid)
                held, lock = [], None
            if w.receiver.set_held(held):
                w.lock = lock
                if held:
                    logger.info(
                        "language: request %s (room %s): the prefix cache holds items %s; "
                        "their rows are not sent",
                        w.rid,
                        w.recv_req.bootstrap_room,
                        held,
                    )
            else:
                self.holds.release(lock)

    def _poll(self, ready: List, aborts: List) -> None:
        polls = poll_and_end_failed(
            [w.receiver for w in self.waiting_list], self.scheduler.attn_tp_cpu_group
        )
        without_transfer = self._without_transfer(
            [
                w
                for w, poll in zip(self.waiting_list, polls)
                if poll == KVPoll.Failed and w.aborted is None
            ]
        )
        arrived, still_waiting = [], []
        for w, poll in zip(self.waiting_list, polls):
            if w.aborted is not None:
                # Rows that arrived meanwhile are dropped with the receiver.
                self._count_failed()
                aborts.append(
                    (
                        self._req_for_error(w.recv_req),
                        w.aborted,
                        HTTPStatus.BAD_REQUEST,
                    )
                )
            elif poll == KVPoll.Success:
                arrived.append(w)
            elif poll == KVPoll.Failed and w.rid in without_transfer:
                logger.info(
                    "language: request %s (room %s): the encode server has no media for its "
                    "placeholder tokens; it runs as it is",
                    w.rid,
                    w.recv_req.bootstrap_room,
                )
                ready.append(w.recv_req)
            elif poll == KVPoll.Failed:
                reason = w.receiver.reason or "transfer failed"
                if isinstance(w.receiver, _RefusedPoll):
                    self._count_failed()
                    aborts.append(
                        (
                            self._req_for_error(w.recv_req),
                            reason,
                            status_of_transfer_failure(w.receiver),
                        )
                    )
                    continue
                logger.error(
                    "language: request %s (room %s) failed: %s",
                    w.rid,
                    w.recv_req.bootstrap_room,
                    reason,
                )
                self._count_failed()
                aborts.append(
                    (
                        self._req_for_error(w.recv_req),
                        f"multimodal transfer failed: {reason}",
                        status_of_transfer_failure(w.receiver),
                    )
                )
            else:
                still_waiting.append(w)
        if self.holds is not None:
            kept = {id(w) for w in still_waiting + arrived}
            for w in self.waiting_list:
                if id(w) not in kept:
                    self.holds.release(w.lock)  # failed, aborted or run without rows
                    w.lock = None
        self.waiting_list = still_waiting
        if arrived:
            self._admit_arrived(arrived, ready, aborts)

    def _without_transfer(self, failed: List[WaitingRequest]) -> set:
        """Rids of the ``failed`` requests the encode server finished without a transfer
        (``FaultKind.NO_TRANSFER``): the owner's receivers know, the other TP ranks learn it
        by a MAX all-reduce (every rank calls this with the same requests)."""
        flags = [
            int(getattr(w.receiver, "kind", None) == FaultKind.NO_TRANSFER)
            for w in failed
        ]
        if self.num_ranks > 1 and flags:
            flags = all_reduce_flags(
                flags, self.scheduler.attn_tp_cpu_group, op=dist.ReduceOp.MAX
            )
        return {w.rid for w, flag in zip(failed, flags) if flag}

    def _admit_arrived(self, arrived: List, ready: List, aborts: List) -> None:
        """Attach the rows of the requests whose transfer succeeded; with ``--tp > 1`` the
        ranks then agree on which failed (``_agree_on_failures``), so a rank-local error
        fails the request on every rank and the batches stay the same."""
        errors = []
        for w in arrived:
            try:
                left_out = getattr(w.receiver, "rows_left_out", ())
                self._attach(w.recv_req, self._take_rows(w), left_out)
                errors.append(None)
            except _FailedOnAnotherRank:
                errors.append(None)  # _agree_on_failures says so
            except Exception as e:
                logger.exception(
                    "language: request %s: received data is invalid", w.rid
                )
                errors.append(f"received multimodal data is invalid: {e}")
        for w, error in zip(arrived, self._agree_on_failures(errors)):
            if self.holds is not None:
                # the scheduler has the request from here (or it fails: not held any more)
                lock, w.lock = w.lock, None
                if error is None:
                    self.holds.hand_over(w.rid, lock)
                else:
                    self.holds.release(lock)
            if error is not None:
                self._count_failed()
                aborts.append(
                    (
                        self._req_for_error(w.recv_req),
                        error,
                        HTTPStatus.INTERNAL_SERVER_ERROR,
                    )
                )
                continue
            if self.is_owner:  # counted once per server, by the rank that received
                self.metrics.request_done(
                    "success", latency_s=time.monotonic() - w.since
                )
            try:
                self._check_context_length(w.recv_req)
            except ValueError as e:
                logger.error("language: request %s refused: %s", w.rid, e)
                aborts.append(
                    (
                        self._req_for_error(w.recv_req),
                        str(e),
                        HTTPStatus.BAD_REQUEST,
                    )
                )
                continue
            ready.append(w.recv_req)

    def _agree_on_failures(self, errors: List[Optional[str]]) -> List[Optional[str]]:
        """Each request's error, failed on every TP rank if it failed on any (a MAX
        all-reduce over the TP cpu group, as upstream's ``_finalize_shm_features``)."""
        if self.num_ranks == 1:
            return errors
        failed = all_reduce_flags(
            [int(e is not None) for e in errors],
            self.scheduler.attn_tp_cpu_group,
            op=dist.ReduceOp.MAX,
        )
        return [
            error
            or ("received multimodal data is invalid on another TP rank" if f else None)
            for error, f in zip(errors, failed)
        ]

    def _check_context_length(self, recv_req: TokenizedGenerateReqInput) -> None:
        """Upstream's context-length check (the tokenizer manager's), again with the expanded
        prompt: the language tokenizer saw one placeholder per image or video. Raises
        ValueError with upstream's message, as a colocated server answers."""
        params = {"max_new_tokens": recv_req.sampling_params.max_new_tokens}
        validate_context_length(
            list(recv_req.input_ids),
            params,
            self.scheduler.model_config.context_len,
            compute_num_reserved_tokens(),
            get_serving().allow_auto_truncate,
        )
        recv_req.sampling_params.max_new_tokens = params["max_new_tokens"]

    def _count_failed(self) -> None:
        if self.is_owner:  # counted once per server
            self.metrics.request_done("failed")

    def _take_rows(self, w: WaitingRequest) -> ReceivedData:
        """The received rows of a ready request; with ``--tp > 1`` every rank calls this for
        the same requests in the same order and gets the owner's rows over the TP group: the
        token fields over the cpu group, the multimodal rows ([M, (1+K)*H], embedding and
        deepstack side by side) in one broadcast (on GPUs over the device group; ``_attach``
        then moves them to pinned host memory on every rank).

        Every rank joins every collective of the request, whatever fails on it: the owner's
        error taking the rows travels in the header (every rank raises it); a rank's error
        allocating its buffers (a CUDA OOM copying the rows to the device on the owner, or
        allocating them on another rank) is agreed on by a MAX all-reduce before the rows
        travel, so no rank leaves a broadcast the others wait in. The rank that failed raises
        its error, the others ``_FailedOnAnotherRank``; ``_agree_on_failures`` then fails the
        request on every rank.
        """
        if self.num_ranks == 1:
            return w.receiver.take()
        header, data = None, None
        if self.is_owner:
            try:
                data = w.receiver.take()
                header = {
                    "error": None,
                    "manifest": data.manifest,
                    "items": data.items,
                    "hidden": data.embeddings.shape[1],
                    "deepstack": data.deepstack is not None,
                    "rows": [
                        (tuple(t.shape), t.dtype) for t in self._row_sources(data)
                    ],
                }
            except Exception as e:
                header = {"error": f"{type(e).__name__}: {e}"}
        header = self._broadcast_object(header)
        if header["error"] is not None:
            raise ValueError(header["error"])
        sources = self._row_sources(data) if self.is_owner else [None] * 4
        bufs, error = [], None
        try:
            for source, (shape, dtype), on_device in zip(
                sources, header["rows"], _ON_DEVICE
            ):
                bufs.append(self._row_buffer(source, shape, dtype, on_device))
        except Exception as e:
            error = e
        group = self.scheduler.attn_tp_group
        (failed,) = all_reduce_flags(
            [int(error is not None)], group.cpu_group, op=dist.ReduceOp.MAX
        )
        if error is not None:
            raise error
        if failed:
            raise _FailedOnAnotherRank()
        for buf in bufs:
            dist.broadcast(
                buf,
                src=group.first_rank,
                group=(
                    group.cpu_group if buf.device.type == "cpu" else group.device_group
                ),
            )
        ids, pos, mask, wide = [
            buf.to(torch.bool) if dtype == torch.bool else buf
            for buf, (_, dtype) in zip(bufs, header["rows"])
        ]
        H = header["hidden"]
        self.metrics.request_done("tp_broadcast" if self.is_owner else "tp_received")
        return ReceivedData(
            header["manifest"],
            ids,
            pos,
            mask,
            wide[:, :H],
            wide[:, H:] if header["deepstack"] else None,
            items=header["items"],
            rows=wide,
        )

    @staticmethod
    def _row_sources(data: ReceivedData) -> List[torch.Tensor]:
        """The owner's tensors broadcast over the TP group, in ``_TOKEN_FIELDS`` order, then
        the multimodal rows."""
        return [getattr(data, f) for f in _TOKEN_FIELDS] + [data.rows]

    def _broadcast_object(self, obj):
        group = self.scheduler.attn_tp_group
        box = [obj]
        dist.broadcast_object_list(box, src=group.first_rank, group=group.cpu_group)
        return box[0]

    def _row_buffer(
        self, source: Optional[torch.Tensor], shape, dtype, on_device: bool
    ) -> torch.Tensor:
        """This rank's buffer of one broadcast tensor: the owner's ``source``, another rank's
        empty buffer of ``shape``. Bools travel as uint8 (gloo has no bool). On the host,
        broadcast over the TP cpu (gloo) group, except ``on_device`` on GPUs: on the device,
        broadcast over the device (NCCL) group, the owner copying its pinned rows to its GPU
        once (no host round trip through gloo; not exercised on the CPU test bed); the device
        buffer lives only until ``_attach`` has copied its items to pinned host memory.
        Device branch, stream order: the H2D copy and the result live on this thread's current
        stream; ProcessGroupNCCL's stream waits for it before the broadcast, and it for that
        stream after (the collective keeps the buffer until done); the pinned host source stays
        allocated until its copy ran (PyTorch's host allocator records the copy's event).
        """
        wire = torch.uint8 if dtype == torch.bool else dtype
        device = (
            "cpu"
            if self.scheduler.device == "cpu" or not on_device
            else f"{self.scheduler.device}:{get_device().gpu_id}"
        )
        if source is None:
            # only the shape matters: no host -> device copy of an empty buffer
            return torch.empty(shape, dtype=wire, device=device)
        return source.to(device=device, dtype=wire, non_blocking=True).contiguous()

    def _attach(
        self,
        recv_req: TokenizedGenerateReqInput,
        data: ReceivedData,
        left_out: tuple = (),
    ) -> None:
        """Turn received data into the precomputed multimodal inputs of ``recv_req``. The
        items ``left_out`` (the prefix cache holds them, locked) get no rows: they lie wholly
        in the cached prefix, which prefill never embeds (``stage_rows`` refuses otherwise).
        """
        entries = [ItemEntry.from_wire(raw) for raw in data.items]
        if not entries:
            raise ValueError("the encode server sent no item table")
        check_against_mask(
            [e for i, e in enumerate(entries) if i not in left_out], data.mm_mask
        )
        rows = data.rows
        if rows.is_cuda:
            # Written on another stream (the manager thread's read_round, waited for before
            # Success) or on this one (the TP broadcast); read only here, by the items' copies
            # to pinned host memory (rows_to_host): the request keeps its rows on the host for
            # its whole life, and the forward copies them back per chunk (stage_rows). The
            # allocator keeps the memory until this stream's reads are done.
            use_on_streams(rows, (torch.cuda.current_stream(rows.device),))
        row_of_token = torch.cumsum(data.mm_mask.to(torch.int64), 0) - 1
        items = []
        for i, entry in enumerate(entries):
            item = item_without_rows(entry)
            item.format = MultimodalInputFormat.PRECOMPUTED_EMBEDDING
            items.append(item)
            if i in left_out:
                # no rows: precomputed (so the batch takes the precomputed path), empty
                item.precomputed_embeddings = rows.new_empty(
                    (0, rows.shape[1]), device="cpu"
                )
                continue
            tokens = torch.cat([torch.arange(s, e + 1) for s, e in entry.offsets])
            idx = row_of_token[tokens]
            first, n = int(idx[0]), len(idx)
            contiguous = int(idx[-1]) - first + 1 == n and bool((idx.diff() == 1).all())
            # an item's rows are consecutive in the row stream: a view, not a copy
            # (gathered on the device, before the copy to the host, when they are not)
            item.precomputed_embeddings = rows_to_host(
                rows[first : first + n] if contiguous else rows[idx.to(rows.device)]
            )
        input_ids = data.fill_ids.tolist()
        hf = self.hf_config
        recv_req.input_ids = array("q", input_ids)  # what the tokenizer sends
        recv_req.mm_inputs = MultimodalProcessorOutput(
            mm_items=items,
            input_ids=input_ids,
            padded_input_ids=MultimodalProcessorOutput.build_padded_input_ids(
                input_ids, items
            ),
            im_token_id=hf.image_token_id,
            im_start_id=getattr(hf, "vision_start_token_id", None),
            im_end_id=getattr(hf, "vision_end_token_id", None),
            video_token_id=hf.video_token_id,
            mrope_positions=data.mrope_positions.to(torch.int64),
            mrope_position_delta=torch.tensor(
                [[data.manifest.mrope_delta]], dtype=torch.int64
            ),
        )

    def _req_for_error(self, recv_req: TokenizedGenerateReqInput) -> Req:
        """A ``Req`` that only carries an error back to the client."""
        s = self.scheduler
        req = Req(
            recv_req.rid,
            recv_req.input_text,
            recv_req.input_ids,
            recv_req.sampling_params,
            return_logprob=recv_req.return_logprob,
            top_logprobs_num=recv_req.top_logprobs_num,
            token_ids_logprob=recv_req.token_ids_logprob,
            stream=recv_req.stream,
            eos_token_ids=s.model_config.hf_eos_token_id,
            bootstrap_host=recv_req.bootstrap_host,
            bootstrap_port=recv_req.bootstrap_port,
            bootstrap_room=recv_req.bootstrap_room,
            disagg_mode=s.disaggregation_mode,
            vocab_size=s.model_config.vocab_size,
            http_worker_ipc=recv_req.http_worker_ipc,
        )
        req.tokenizer = s.tokenizer
        return req
