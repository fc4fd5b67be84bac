"""Multimodal inputs of the language side: ``Qwen3MoeForCausalLM`` built from a VL checkpoint.

The language server receives each image/video as precomputed rows (embedding and deepstack
concatenated on width, ``[n, (1+K)*H]``) inside ordinary ``MultimodalInputs`` (see
``language_mm_receiver.py``). Upstream's ``prepare_mm_inputs`` then places the rows of the
current chunk, splits deepstack off and scatters both, the same routine the colocated VL class
runs. It needs a "multimodal model" with a few hooks; this object is that model for
``Qwen3MoeForCausalLM`` and is used only when the class is built from a VL config (no
subclass, no calls into the VL class). Text-only checkpoints never construct it.

Where the rows live: a request keeps its rows for its whole life (chunked prefill and a
re-prefill after retraction read them again, as upstream keeps ``precomputed_embeddings``), so
they live in pinned host memory on every rank (``rows_to_host``, at ``_attach``), never on the
device outside a forward: on the device they would hold 16-32 MiB per 1024² image outside the
KV budget (docs/benchmarks-gpu.md, "Received rows"). Each extend forward copies the rows of the
items its chunk covers to the device on its own stream (``stage_rows``) and puts the host
tensors back after embedding (``restore_rows``); the device copies are then freed in the
forward stream's order, like any activation of that forward.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Tuple

import torch

from sglang.srt.multimodal.modality import Modality

logger = logging.getLogger(__name__)


def rows_to_host(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` where a request keeps them: a pinned host copy of device rows, queued on the
    current stream (ordered before the forward's reads by upstream's
    ``forward_stream.wait_stream(schedule_stream)``; the source stays allocated in that
    stream's order); host rows as they are. Nothing reads the copy on the host: the forward
    reads it through ``stage_rows`` only. Where page-locked memory runs out (it is bounded by
    the host, not by SGLang's budgets: docs/serving.md, "Memory sizing of the buffers"), the
    copy goes to pageable memory instead: slower to stage, never a failed request."""
    if not rows.is_cuda:
        return rows
    try:
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    except RuntimeError as e:
        logger.warning(
            "language: %d bytes of rows kept in pageable host memory (pinning failed: %s)",
            rows.numel() * rows.element_size(),
            e,
        )
        host = torch.empty(rows.shape, dtype=rows.dtype)
    host.copy_(rows, non_blocking=host.is_pinned())
    return host


def _covers(offsets, start: int, end: int) -> bool:
    """Whether an item's token spans (inclusive) meet the extend range ``[start, end)``."""
    return any(s < end and e >= start for s, e in offsets)


def stage_rows(
    mm_inputs: List[Any],
    prefix_lens: List[int],
    extend_lens: List[int],
    device: torch.device,
) -> List[Tuple[Any, torch.Tensor]]:
    """Copy the rows of every item the extend batch's chunks cover to ``device`` (one H2D copy
    from pinned memory per item, on the current stream) and set them on the item;
    ``[(item, host rows)]`` for ``restore_rows``. Items outside the chunk keep their host rows
    (upstream slices them empty, reading nothing)."""
    staged = []
    for mm, prefix, n in zip(mm_inputs, prefix_lens, extend_lens):
        if mm is None:
            continue
        for item in mm.mm_items:
            rows = item.precomputed_embeddings
            if not isinstance(rows, torch.Tensor) or not _covers(
                item.offsets, prefix, prefix + n
            ):
                continue
            if rows.shape[0] < sum(e - s + 1 for s, e in item.offsets):
                # an item the prefix cache held (no rows were sent) is being prefilled: its
                # prefix was not kept (PrefixHolds locks it until the request is over)
                raise RuntimeError(
                    f"an extend of [{prefix}, {prefix + n}) covers an item without rows "
                    f"(offsets {item.offsets}): its cached prefix is gone"
                )
            if rows.device == device:
                continue
            item.precomputed_embeddings = rows.to(device, non_blocking=True)
            staged.append((item, rows))
    return staged


def restore_rows(staged: List[Tuple[Any, torch.Tensor]]) -> None:
    """Put the host rows back on the items ``stage_rows`` staged (the request keeps them)."""
    for item, host in staged:
        item.precomputed_embeddings = host


class LanguageMultimodalInputs:
    """The hooks ``prepare_mm_inputs`` / ``embed_mm_inputs`` call on a multimodal model."""

    def __init__(self, vl_config: Any) -> None:
        self.hidden_size = vl_config.text_config.hidden_size
        self.deepstack_visual_indexes = list(
            getattr(vl_config.vision_config, "deepstack_visual_indexes", None) or []
        )
        self.num_deepstack_embeddings = len(self.deepstack_visual_indexes)
        self.use_deepstack = (
            {Modality.IMAGE: True, Modality.VIDEO: True}
            if self.num_deepstack_embeddings > 0
            else {}
        )

    def separate_deepstack_embeds(
        self, embedding: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Received rows ``[n, (1+K)*H]`` -> (embeddings ``[n, H]``, deepstack ``[n, K*H]``)."""
        width = self.hidden_size * (1 + self.num_deepstack_embeddings)
        if embedding.shape[-1] != width:
            raise ValueError(
                f"received multimodal rows have width {embedding.shape[-1]}, expected "
                f"(1 + K) * hidden_size = {width}"
            )
        return embedding[:, : self.hidden_size], embedding[:, self.hidden_size :]

    def get_image_feature(self, items: List[Any]) -> torch.Tensor:
        raise RuntimeError(
            "the language server has no vision tower: images arrive as precomputed "
            "embeddings from the encode server"
        )

    def get_video_feature(self, items: List[Any]) -> torch.Tensor:
        raise RuntimeError(
            "the language server has no vision tower: videos arrive as precomputed "
            "embeddings from the encode server"
        )

    def embed(
        self,
        input_ids: torch.Tensor,
        forward_batch,
        language_model: torch.nn.Module,
        input_deepstack_embeds: Optional[torch.Tensor] = None,
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(input_embeds, input_deepstack_embeds) for an extend batch that carries multimodal
        inputs; ``(None, input_deepstack_embeds)`` otherwise (the model embeds the ids).
        """
        from sglang.srt.managers.mm_utils import prepare_mm_inputs

        mode = forward_batch.forward_mode
        if (
            mode.is_decode()
            or mode.is_target_verify()
            or not forward_batch.contains_mm_inputs()
        ):
            return None, input_deepstack_embeds
        # Which requests of this extend batch carry received rows: received and text-only
        # requests share batches (the scheduling path is the colocated one).
        with_mm = sum(mm is not None for mm in forward_batch.mm_inputs)
        logger.debug(
            "language: extend batch of %d request(s): %d multimodal, %d text-only",
            len(forward_batch.mm_inputs),
            with_mm,
            len(forward_batch.mm_inputs) - with_mm,
        )
        kwargs: dict = {}
        staged = stage_rows(
            forward_batch.mm_inputs,
            forward_batch.extend_prefix_lens_cpu,
            forward_batch.extend_seq_lens_cpu,
            input_ids.device,
        )
        try:
            input_embeds = prepare_mm_inputs(
                input_ids,
                forward_batch,
                language_model,
                kwargs,
                multimodal_model=self,
                use_deepstack=self.use_deepstack,
            )
        finally:
            restore_rows(staged)
        return input_embeds, kwargs.get("input_deepstack_embeds")
