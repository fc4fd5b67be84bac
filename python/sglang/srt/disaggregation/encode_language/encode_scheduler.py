"""The scheduler of an encode server (``--disaggregation-mode encode``).

Shaped like a PD prefill server so ``sglang-router --pd-disaggregation`` fronts it unchanged:

1. ``add_disagg_encode_request``: a request with media gets an ``EncodeSender`` for its
   bootstrap room at once, with its shape (T unpadded tokens, M placeholder tokens, the item
   table: the processor ran in the tokenizer manager), which the transport announces to the
   language side once it expects the request (it may do so before or after); a request without
   image or video, or from the fake bootstrap host (health checks, warm-up), finishes at once
   with nothing sent; if its prompt holds a placeholder token anyway, the language side (which
   reserves on placeholders) is told "no transfer" (``_answer_no_transfer``).
2. ``run_disagg_encode_batch``: only requests whose every destination has reserved blocks
   for round 0 (sender poll ``WaitingForInput``; ``Bootstrapping`` ones keep waiting) go on: so
   payload bytes are only ever held by requests that hold language blocks, and language blocks
   only by requests whose vision tower will run (no cycle of waits between the two bounds).
   A request whose every item the language side's prefix cache holds polls ``Success`` here
   instead (``AllHeld``: the announcement carried all it needs) and finishes at once, with no
   vision tower and no round (outcome ``all_held``).
   Their images (and videos) go through upstream's ``get_image_feature`` /
   ``get_video_feature`` in one call per modality, as many requests per call as fit
   ``--max-prefill-tokens`` placeholder tokens (``take_vit_batch``) and whose payloads fit the
   in-flight bound (``_admit_payloads``: the rest wait), and ``separate_deepstack_embeds`` splits
   the rows; each request's ``MultimodalPayload`` (unpadded ids, M-RoPE positions and delta,
   multimodal mask, rows, item table) is handed to its sender.
3. ``process_disagg_encode_inflight``: senders are polled (MIN over the TP group, as PD
   does); Success finishes the request with an empty output (``FINISH_LENGTH(0)``, no tokens,
   empty logprob lists), exactly what the router merges from a prefill server; Failed answers
   500 with the transport's reason.

``--tp N``: every rank runs the vision tower (upstream's TP vision tower: its collectives need
every rank, with the same items in the same order); only attention-TP rank 0 (the *owner*) has
an ``EncodeManager``, creates the senders and sends. The other ranks hold a stand-in sender
that reports ``Success``, so the MIN all-reduce of the poll states over the TP cpu group (for
the waiting queue before the ViT and for the in-flight queue) yields the owner's state on every
rank and every rank keeps the same queues.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import struct
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.buffers import MultimodalBufferConfig
from sglang.srt.disaggregation.encode_language.connection import (
    ConnectionConfig,
    RoomInUseError,
)
from sglang.srt.disaggregation.encode_language.encode_request_faults import (
    client_fault,
    poll_and_end_failed,
    room_failure,
    status_of_transfer_failure,
)
from sglang.srt.disaggregation.encode_language.encoder_cache import (
    EncoderEmbeddingCache,
    item_tokens,
)
from sglang.srt.disaggregation.encode_language.item_table import (
    ItemTableError,
    item_table,
)
from sglang.srt.disaggregation.encode_language.language_mm_receiver import (
    placeholder_token_ids,
    waits_for_rows,
)
from sglang.srt.disaggregation.encode_language.manifest import (
    FaultKind,
    RequestShape,
    dtype_name,
)
from sglang.srt.disaggregation.encode_language.metrics import EncodeLanguageMetrics
from sglang.srt.disaggregation.encode_language.payload import MultimodalPayload
from sglang.srt.disaggregation.encode_language.sender import EncodeManager
from sglang.srt.disaggregation.utils import FAKE_BOOTSTRAP_HOST, prepare_abort
from sglang.srt.managers.schedule_batch import FINISH_LENGTH
from sglang.srt.multimodal.modality import Modality
from sglang.srt.runtime_context import (
    get_device,
    get_disagg,
    get_parallel,
    get_schedule,
)

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)

# Pause of the encode loop while transfers are in flight and nothing else is to do: the
# transfer runs in the manager's threads, polling faster only burns a core.
INFLIGHT_POLL_INTERVAL_S = 0.002


def checkpoint_bytes_not_loaded(model_path: str) -> Optional[int]:
    """Bytes of a local safetensors checkpoint outside the vision tower (what the encode
    server leaves out), read from the file headers only; None when there are no local files.
    """
    from sglang.srt.models.qwen3_vl_moe_language import is_vision_weight

    files = glob.glob(os.path.join(model_path, "*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, entry in header.items():
            if name != "__metadata__" and not is_vision_weight(name):
                start, end = entry["data_offsets"]
                total += end - start
    return total


def vit_tokens(req: "Req") -> int:
    """Placeholder tokens of a request's images and videos (rows its ViT call produces)."""
    return sum(
        item_tokens(item)
        for item in req.multimodal_inputs.mm_items
        if item.modality in (Modality.IMAGE, Modality.VIDEO)
    )


def rows_to_send(req: "Req") -> int:
    """Placeholder tokens of the items whose rows the request's payload carries."""
    return sum(item_tokens(item) for item in items_to_send(req))


def take_vit_batch(reqs: List, budget: int, tokens=vit_tokens) -> Tuple[List, List]:
    """Split waiting requests into (this ViT call, later), in arrival order: requests join
    the call while their placeholder tokens fit ``budget``; the first request always joins
    (one larger than the budget runs alone, never starves); the first that does not fit
    ends the call, so no request overtakes an earlier one."""
    total = 0
    for i, req in enumerate(reqs):
        total += tokens(req)
        if i > 0 and total > budget:
            return reqs[:i], reqs[i:]
    return list(reqs), []


def request_shape(req: "Req") -> RequestShape:
    """What the encoder announces for ``req`` before its vision tower runs: the unpadded
    tokens, the placeholder tokens its images and videos fill, their item table, the ids and
    the M-RoPE positions and delta (what ``_payload`` will carry): a language side matches
    the ids against its prefix cache, and one that holds every item needs nothing more.
    """
    positions, delta = mm_positions(req), mrope_delta(req)
    known = positions is not None and delta is not None  # else it always takes a round
    return RequestShape(
        len(req.origin_input_ids_unpadded),
        vit_tokens(req),
        [entry.to_wire() for entry in item_table(req.multimodal_inputs.mm_items)],
        list(req.origin_input_ids_unpadded),
        positions.flatten().tolist() if known else [],
        delta if known else 0,
    )


def mm_positions(req: "Req") -> Optional[torch.Tensor]:
    """The request's [3, T] M-RoPE positions (int64), None when the processor gave none."""
    positions = req.multimodal_inputs.mrope_positions
    T = len(req.origin_input_ids_unpadded)
    if positions is None or tuple(positions.shape) != (3, T):
        return None
    return positions.to(torch.int64)


def mrope_delta(req: "Req") -> Optional[int]:
    """The request's M-RoPE position delta, None when the processor gave none."""
    delta = req.multimodal_inputs.mrope_position_delta
    if delta is None:
        return None
    delta = torch.as_tensor(delta).flatten()
    return int(delta[0]) if delta.numel() else None


def items_in_order(req: "Req") -> List:
    """The request's image/video items in item-table order (by first token)."""
    return sorted(
        (
            item
            for item in req.multimodal_inputs.mm_items
            if item.modality in (Modality.IMAGE, Modality.VIDEO)
        ),
        key=lambda item: item.offsets[0][0],
    )


def items_to_send(req: "Req") -> List:
    """The items whose rows the request's payload carries: all but those every language
    destination's prefix cache holds (``req.disagg_held_items``, indices into the item
    table, set before the vision tower runs)."""
    held = getattr(req, "disagg_held_items", ())
    return [item for i, item in enumerate(items_in_order(req)) if i not in held]


def has_media(req: "Req") -> bool:
    """Processed images or videos (upstream's processor drops one no placeholder takes)."""
    mm = req.multimodal_inputs
    return mm is not None and any(
        item.modality in (Modality.IMAGE, Modality.VIDEO) for item in mm.mm_items
    )


class _FollowerSender:
    """A non-owner TP rank's stand-in sender: reports the highest state, so the MIN
    all-reduce over the TP group yields the owner's state; sends nothing."""

    reason = None

    def poll(self) -> int:
        return KVPoll.Success

    def send(self, payload) -> None:
        pass

    def abort(self, reason: str = "", kind: FaultKind = FaultKind.INTERNAL) -> None:
        pass


class _RefusedSender(_FollowerSender):
    """The owner could not create a sender (room in use): the request fails through the poll
    agreement, so every rank drops it before the vision tower runs."""

    kind = FaultKind.CLIENT  # answered 400, as on TP 1

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def poll(self) -> int:
        return KVPoll.Failed


class SchedulerDisaggregationEncodeMixin:
    """Encode-server parts of ``Scheduler`` (only used with ``--disaggregation-mode encode``)."""

    def init_disagg_encode(self: "Scheduler") -> None:
        self.disagg_encode_waiting: List["Req"] = []  # sender created, ViT not run yet
        # payload handed over, transferring
        self.disagg_encode_inflight: List["Req"] = []
        self.disagg_encode_held: set = set()  # rids held back by the payload bound
        model = self.tp_worker.model_runner.model
        hf_config = self.model_config.hf_config
        disagg = get_disagg()
        buffer_config = MultimodalBufferConfig.from_server_args(
            disagg,
            hidden_size=hf_config.text_config.hidden_size,
            deepstack_count=model.num_deepstack_embeddings,
            embed_dtype=dtype_name(self.model_config.dtype),
        )
        # The control socket binds --host on --disaggregation-bootstrap-port (where the router
        # sends the language side); its id names the advertised address (docs/transport.md,
        # addressing).
        conn = ConnectionConfig.from_server_args(
            self.server_args, gpu_id=get_device().gpu_id
        )
        # With --tp N only the owner (attention-TP rank 0) has buffers and sends.
        self.disagg_encode_tp_size = get_parallel().attn_tp_size
        self.disagg_encode_is_owner = get_parallel().attn_tp_rank == 0
        self.disagg_encode_manager = (
            EncodeManager(buffer_config, conn) if self.disagg_encode_is_owner else None
        )
        self.disagg_encode_metrics = EncodeLanguageMetrics(
            "encode",
            self.metrics_reporter.enable_metrics and self.disagg_encode_is_owner,
        )
        # Rows of repeated images and videos (every rank: TP ranks agree on the hits).
        self.disagg_encode_cache = EncoderEmbeddingCache.for_scheduler(
            self, self.disagg_encode_is_owner
        )
        if not self.disagg_encode_is_owner:
            logger.info("encode server: TP rank without transfer (vision tower only)")
            return
        self.disagg_encode_metrics.observe_blocks(self.disagg_encode_manager.allocator)
        loaded = sum(p.numel() * p.element_size() for p in model.parameters())
        skipped = checkpoint_bytes_not_loaded(self.model_config.model_path)
        self.disagg_encode_metrics.weights(loaded, skipped)
        logger.info(
            "encode server: vision tower only (%.1f MiB of weights; %s of checkpoint "
            "weights not loaded versus the full model), manager id %s",
            loaded / 2**20,
            "unknown" if skipped is None else f"{skipped / 2**20:.1f} MiB",
            self.disagg_encode_manager.bootstrap_addr,
        )

    # Queues ---------------------------------------------------------------------------------
    def add_disagg_encode_request(self: "Scheduler", req: "Req") -> None:
        if req.to_finish is not None and not req.finished():
            # set_finish_with_abort (unknown session, ...) leaves the abort for the batch
            # loop to apply; the encode loop runs no batch: apply it here.
            req.finished_reason, req.to_finish = req.to_finish, None
        if req.finished():  # refused before admission (too long, unknown session, ...)
            self._fail_refused_room(req)
            self._finish_disagg_encode([req], outcome="failed")
            return
        if req.bootstrap_host == FAKE_BOOTSTRAP_HOST or not has_media(req):
            req.finished_reason = FINISH_LENGTH(length=0)
            self._answer_no_transfer(req)
            self._finish_disagg_encode([req], outcome="local")
            return
        if not self.disagg_encode_is_owner:
            req.disagg_kv_sender = _FollowerSender()
            self.disagg_encode_waiting.append(req)
            return
        try:
            req.disagg_kv_sender = self.disagg_encode_manager.create_sender(
                req.bootstrap_room, request_shape(req)
            )
        except (RoomInUseError, ItemTableError) as e:
            logger.error("encode: request %s refused: %s", req.rid, e)
            if isinstance(e, ItemTableError):  # a modality the transport does not carry
                # the language side expects the room: it gets the refusal, not a timeout
                self.disagg_encode_manager.fail_room(
                    req.bootstrap_room, client_fault(str(e)), FaultKind.CLIENT
                )
            if self.disagg_encode_tp_size > 1:
                # The other ranks queued it: fail it through the poll agreement.
                req.disagg_kv_sender = _RefusedSender(str(e))
                self.disagg_encode_waiting.append(req)
                return
            prepare_abort(req, str(e), status_code=HTTPStatus.BAD_REQUEST)
            self._finish_disagg_encode([req], outcome="failed")
            return
        self.disagg_encode_waiting.append(req)

    def _fail_refused_room(self: "Scheduler", req: "Req") -> None:
        """The scheduler refused this request (upstream's checks: unknown session, beam
        search, sampling mask options, ...). The language server got the same body and
        reserves its room: end the room there with the refusal now, instead of leaving it to
        the bootstrap timeout (the language side then answers the same 4xx)."""
        if (
            self.disagg_encode_manager is None
            or req.bootstrap_room is None
            or req.bootstrap_host == FAKE_BOOTSTRAP_HOST
        ):
            return
        reason = req.finished_reason
        status = getattr(reason, "status_code", None) or HTTPStatus.BAD_REQUEST
        message = f"refused by the encode server: {getattr(reason, 'message', reason)}"
        if 400 <= int(status) < 500:
            self.disagg_encode_manager.fail_room(
                req.bootstrap_room, client_fault(message), FaultKind.CLIENT
            )
        else:
            self.disagg_encode_manager.fail_room(req.bootstrap_room, message)

    def _answer_no_transfer(self: "Scheduler", req: "Req") -> None:
        """A request finished here without media whose prompt still holds a placeholder token
        (e.g. ``<|image_pad|>`` typed as text): the language side, which decides on the same
        prompt, reserves its room; tell it now (``FaultKind.NO_TRANSFER``, also in answer to
        a later reservation) so it runs the request as it is, as a colocated server does.
        """
        if (
            self.disagg_encode_manager is None
            or req.bootstrap_host == FAKE_BOOTSTRAP_HOST
            or req.bootstrap_room is None
            or not waits_for_rows(
                req.origin_input_ids,
                placeholder_token_ids(self.model_config.hf_config),
            )
        ):
            return
        logger.info(
            "encode: request %s (room %s) has no media for its placeholder tokens: no transfer",
            req.rid,
            req.bootstrap_room,
        )
        self.disagg_encode_manager.fail_room(
            req.bootstrap_room,
            "the request has no image or video for its placeholder tokens",
            FaultKind.NO_TRANSFER,
        )

    def disagg_encode_queues_empty(self: "Scheduler") -> bool:
        return not self.disagg_encode_waiting and not self.disagg_encode_inflight

    def abort_disagg_encode_requests(self: "Scheduler", recv_req) -> None:
        """``/abort_request`` or a client disconnect: end the room on both sides. A request
        the tokenizer manager refused before admission fails its room in the transport.
        """
        refused = room_failure(recv_req)
        if refused is not None:
            # Every TP rank gets the abort; only the owner has a manager to tell the
            # language side (the request never reached any rank's queues).
            if self.disagg_encode_manager is not None:
                self.disagg_encode_manager.fail_room(*refused)
                self.disagg_encode_metrics.request_done("failed")
            return
        for req in self.disagg_encode_waiting + self.disagg_encode_inflight:
            if recv_req.abort_all or req.rid.startswith(recv_req.rid):
                logger.info(
                    "encode: abort request %s (room %s)", req.rid, req.bootstrap_room
                )
                req.disagg_kv_sender.abort("aborted by the client")

    # Event loop -------------------------------------------------------------------------------
    def event_loop_disagg_encode(self: "Scheduler") -> None:
        while True:
            if self.gracefully_exit:
                break
            self.ingest_requests()
            if self._engine_paused:
                self._record_scheduler_state_for_paused_engine()
                continue
            self.run_disagg_encode_batch()
            self.process_disagg_encode_inflight()
            if self.disagg_encode_manager is not None:
                self.disagg_encode_metrics.observe_blocks(
                    self.disagg_encode_manager.allocator
                )
            self.disagg_encode_metrics.observe_waiting(
                len(self.disagg_encode_waiting) + len(self.disagg_encode_inflight)
            )
            if self.disagg_encode_queues_empty():
                self._sched_idled = True
                self.on_idle()
            else:
                time.sleep(INFLIGHT_POLL_INTERVAL_S)

    def run_disagg_encode_batch(self: "Scheduler") -> None:
        """One ViT call per modality over the waiting requests that fit the ViT token budget
        (``--max-prefill-tokens``, see ``take_vit_batch``), then hand the payloads over;
        requests the language side answered with ``AllHeld`` finish without either.
        """
        reqs, self.disagg_encode_waiting = self.disagg_encode_waiting, []
        if not reqs:
            return
        if self.disagg_encode_tp_size > 1:
            # Every rank must run the (TP) vision tower on the same requests.
            polls = poll_and_end_failed(
                [req.disagg_kv_sender for req in reqs], self.attn_tp_cpu_group
            )
        else:
            polls = [req.disagg_kv_sender.poll() for req in reqs]
        live, unreserved, held_whole = [], [], []
        for req, poll in zip(reqs, polls):
            if poll == KVPoll.Failed:  # aborted or refused while waiting
                self._fail_disagg_encode(req)
            elif poll == KVPoll.WaitingForInput:  # every destination reserved round 0
                live.append(req)
            elif poll == KVPoll.Success:  # the destination holds every item (AllHeld)
                held_whole.append(req)
            else:  # Bootstrapping: not announced, or waiting for language blocks
                unreserved.append(req)
        if held_whole:
            for req in held_whole:
                req.finished_reason = FINISH_LENGTH(length=0)
                self.disagg_encode_metrics.items_done(0, len(items_in_order(req)), 0)
            self._finish_disagg_encode(held_whole, outcome="all_held")
        if not live:
            self.disagg_encode_waiting = unreserved
            return
        self._agree_held_items(live)
        live, later = take_vit_batch(
            live, get_schedule().max_prefill_tokens, tokens=rows_to_send
        )
        live, held = self._admit_payloads(live)
        waiting = {id(req) for req in held + later + unreserved}
        self.disagg_encode_waiting = [req for req in reqs if id(req) in waiting]
        if not live:
            return
        try:
            rows = self._encode_items(live)
        except Exception as e:  # a bad item fails its batch, never the server
            logger.exception("encode: vision tower failed")
            for req in live:
                req.disagg_kv_sender.abort(f"vision tower failed: {e}")
                self._fail_disagg_encode(req)
            return
        for req in live:
            if not self.disagg_encode_is_owner:
                self.disagg_encode_inflight.append(req)  # the owner sends
                continue
            try:
                payload = self._payload(req, rows)
                req.disagg_kv_sender.send(payload)
                self.disagg_encode_metrics.items_done(
                    len(items_to_send(req)),
                    len(req.disagg_held_items),
                    payload.embeddings.nbytes
                    + (
                        payload.deepstack.nbytes if payload.deepstack is not None else 0
                    ),
                )
            except Exception as e:
                logger.exception("encode: request %s could not be sent", req.rid)
                req.disagg_kv_sender.abort(f"encode failed: {e}")
                if self.disagg_encode_tp_size == 1:
                    self._fail_disagg_encode(req)
                    continue
                # else the poll agreement fails it on every rank
            self.disagg_encode_inflight.append(req)

    def process_disagg_encode_inflight(self: "Scheduler") -> None:
        if not self.disagg_encode_inflight:
            return
        polls = poll_and_end_failed(
            [req.disagg_kv_sender for req in self.disagg_encode_inflight],
            self.attn_tp_cpu_group,
        )
        done, undone = [], []
        for req, poll in zip(self.disagg_encode_inflight, polls):
            if poll == KVPoll.Success:
                req.finished_reason = FINISH_LENGTH(length=0)
                if self.disagg_encode_is_owner:
                    metric = req.disagg_kv_sender.get_transfer_metric()
                    self.disagg_encode_metrics.request_done(
                        "success",
                        metric.transfer_total_bytes or 0,
                        metric.transfer_latency_s,
                        rounds=req.disagg_kv_sender.rounds,
                    )
                done.append(req)
            elif poll == KVPoll.Failed:
                self._fail_disagg_encode(req)
            else:
                undone.append(req)
        self.disagg_encode_inflight = undone
        if done:
            self._finish_disagg_encode(done, outcome=None)

    def _admit_payloads(self: "Scheduler", reqs: List["Req"]) -> Tuple[List, List]:
        """(ViT now, wait) under the encoder's in-flight payload bound
        (``max_inflight_payload_bytes``: payload bytes held until their last round), in
        arrival order, before the vision tower runs: a request waits in the queue until
        in-flight bytes drop, instead of failing at ``send()``. One that can never fit is
        failed (its sender aborted with a client fault: 400 on both sides). With ``--tp N``
        the owner decides and the other ranks take the same count (MIN all-reduce)."""
        admitted = len(reqs)
        mgr = self.disagg_encode_manager  # None on the other TP ranks
        bound = mgr.config.max_inflight_payload_bytes if mgr is not None else 0
        if bound:  # 0: unbounded
            room = bound - mgr.inflight_payload_bytes
            for i, req in enumerate(reqs):
                nbytes = self._payload_nbytes_before_vit(req)
                if nbytes > bound:  # the next poll fails it on every rank
                    req.disagg_kv_sender.abort(
                        client_fault(
                            f"the request is too large for this encode server: its payload "
                            f"of {nbytes} bytes exceeds max_inflight_payload_bytes={bound}"
                        ),
                        FaultKind.CLIENT,
                    )
                if nbytes > room:
                    admitted = i
                    break
                room -= nbytes
        if self.disagg_encode_tp_size > 1:
            count = torch.tensor([admitted], dtype=torch.int64)
            dist.all_reduce(count, op=dist.ReduceOp.MIN, group=self.attn_tp_cpu_group)
            admitted = int(count.item())
        for req in reqs[admitted:]:
            held = mgr is not None and req.disagg_kv_sender.poll() != KVPoll.Failed
            if held and req.rid not in self.disagg_encode_held:
                self.disagg_encode_held.add(req.rid)
                self.disagg_encode_metrics.request_held()
                logger.info(
                    "encode: request %s held back before the vision tower: %d payload "
                    "bytes in flight, max_inflight_payload_bytes=%d",
                    req.rid,
                    mgr.inflight_payload_bytes,
                    bound,
                )
        for req in reqs[:admitted]:
            self.disagg_encode_held.discard(req.rid)
        return reqs[:admitted], reqs[admitted:]

    def _agree_held_items(self: "Scheduler", reqs: List["Req"]) -> None:
        """Set ``req.disagg_held_items``: the items every language destination's prefix cache
        holds (the owner's senders know, once every destination reserved round 0); with
        ``--tp N`` the other ranks take the owner's answer (one broadcast), so every rank
        runs the vision tower on the same items."""
        held = (
            [tuple(req.disagg_kv_sender.held_items()) for req in reqs]
            if self.disagg_encode_is_owner
            else None
        )
        if self.disagg_encode_tp_size > 1:
            box = [held]
            group = self.attn_tp_group
            dist.broadcast_object_list(box, src=group.first_rank, group=group.cpu_group)
            held = box[0]
        for req, items in zip(reqs, held):
            req.disagg_held_items = frozenset(items)

    def _payload_nbytes_before_vit(self: "Scheduler", req: "Req") -> int:
        """Bytes ``_payload`` will hold for ``req``, from its shapes alone (meta tensors)."""
        T, n = len(req.origin_input_ids_unpadded), rows_to_send(req)
        width = self.model_config.hf_config.text_config.hidden_size
        deepstack = self.tp_worker.model_runner.model.num_deepstack_embeddings
        rows = self.model_config.dtype

        def meta(*shape, dtype):
            return torch.empty(shape, dtype=dtype, device="meta")

        return MultimodalPayload(
            fill_ids=meta(T, dtype=torch.int64),
            mrope_positions=meta(3, T, dtype=torch.int64),
            mm_mask=meta(T, dtype=torch.bool),
            embeddings=meta(n, width, dtype=rows),
            deepstack=meta(n, deepstack * width, dtype=rows) if deepstack else None,
            mrope_delta=0,
        ).nbytes()

    # Helpers ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_items(self: "Scheduler", reqs: List["Req"]) -> Dict[int, torch.Tensor]:
        """Rows ``[n, (1+K)*H]`` of every image/video item of ``reqs``, keyed by ``id(item)``."""
        model = self.tp_worker.model_runner.model
        rows: Dict[int, torch.Tensor] = {}
        for modality, encode in (
            (Modality.IMAGE, model.get_image_feature),
            (Modality.VIDEO, model.get_video_feature),
        ):
            items = [
                item
                for req in reqs
                for item in items_to_send(req)
                if item.modality == modality
            ]
            # cached rows (on the owner; the other TP ranks only skip their ViT run)
            cached = self.disagg_encode_cache.lookup(items)
            rows.update((key, r) for key, r in cached.items() if r is not None)
            items = [item for item in items if id(item) not in cached]
            if not items:
                continue
            out = encode(items)
            sizes = [item_tokens(item) for item in items]
            self.disagg_encode_metrics.vit_call(sum(sizes))
            logger.debug(
                "encode: one vision-tower call for %d %s item(s) of %d request(s), "
                "%d tokens",
                len(items),
                modality.name.lower(),
                len(reqs),
                sum(sizes),
            )
            if sum(sizes) != out.shape[0]:
                raise ValueError(
                    f"{modality.name.lower()} placeholders cover {sum(sizes)} tokens but the "
                    f"vision tower produced {out.shape[0]} rows"
                )
            # Owned rows, one copy each: they outlive the next vision-tower run (cached,
            # staged later), and a ViT under CUDA graphs (SGLANG_VIT_ENABLE_CUDA_GRAPH)
            # returns its graph's static output buffer, which that graph's next run
            # overwrites. (The cache keeps a row it is given whole, without a copy of its own.)
            for item, chunk in zip(items, out.split(sizes)):
                rows[id(item)] = chunk.clone()
            self.disagg_encode_cache.store(items, rows)
        return rows

    def _payload(
        self: "Scheduler", req: "Req", rows: Dict[int, torch.Tensor]
    ) -> MultimodalPayload:
        model = self.tp_worker.model_runner.model
        fill_ids = torch.tensor(list(req.origin_input_ids_unpadded), dtype=torch.int64)
        T = fill_ids.shape[0]
        items = items_in_order(req)
        # the rows of the items the language side holds are left out, as is their mask
        sent = items_to_send(req)
        mm_mask = torch.zeros(T, dtype=torch.bool)
        for item in sent:
            for s, e in item.offsets:
                mm_mask[s : e + 1] = True
        width = self.model_config.hf_config.text_config.hidden_size * (
            1 + model.num_deepstack_embeddings
        )
        embeddings, deepstack = model.separate_deepstack_embeds(
            torch.cat([rows[id(item)] for item in sent])
            if sent
            else torch.empty(0, width, dtype=self.model_config.dtype)
        )
        positions, delta = mm_positions(req), mrope_delta(req)
        if positions is None or delta is None:
            raise ValueError(
                f"request {req.rid} has no M-RoPE positions (or delta) for its {T} tokens"
            )
        payload = MultimodalPayload(
            fill_ids=fill_ids,
            mrope_positions=positions,
            mm_mask=mm_mask,
            embeddings=embeddings.contiguous(),
            deepstack=deepstack.contiguous() if deepstack.shape[-1] else None,
            mrope_delta=delta,
            items=[entry.to_wire() for entry in item_table(items)],
        )
        # The vision tower, cat and contiguous() are queued on this loop's stream (upstream's
        # schedule_stream); the transfer worker copies on its own: it waits for this event.
        payload.record_ready()
        return payload

    def _fail_disagg_encode(self: "Scheduler", req: "Req") -> None:
        self.disagg_encode_held.discard(req.rid)
        reason = req.disagg_kv_sender.reason or "transfer failed"
        logger.error(
            "encode: request %s (room %s) failed: %s",
            req.rid,
            req.bootstrap_room,
            reason,
        )
        prepare_abort(
            req,
            f"encode/language transfer failed: {reason}",
            status_code=status_of_transfer_failure(req.disagg_kv_sender),
        )
        self._finish_disagg_encode([req], outcome="failed")

    def _finish_disagg_encode(self: "Scheduler", reqs: List["Req"], outcome) -> None:
        for req in reqs:
            req.time_stats.set_completion_time()
            if outcome is not None:
                self.disagg_encode_metrics.request_done(outcome)
        self.output_streamer.stream_output(
            reqs, any(r.return_logprob for r in reqs), None
        )
        for req in reqs:
            if req.multimodal_inputs is not None:
                req.multimodal_inputs.release_features()
