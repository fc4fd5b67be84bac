"""Multimodal inputs of the language side: ``Qwen3MoeForCausalLM`` built from a VL checkpoint.

The language server receives each image/video as precomputed rows (embedding and deepstack
concatenated on width, ``[n, (1+K)*H]``) inside ordinary ``MultimodalInputs`` (see
``language_mm_receiver.py``). Upstream's ``prepare_mm_inputs`` then places the rows of the
current chunk, splits deepstack off and scatters both, the same routine the colocated VL class
runs. It needs a "multimodal model" with a few hooks; this object is that model for
``Qwen3MoeForCausalLM`` and is used only when the class is built from a VL config (no
subclass, no calls into the VL class). Text-only checkpoints never construct it.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Tuple

import torch

from sglang.srt.multimodal.modality import Modality

logger = logging.getLogger(__name__)


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
        logger.info(
            "language: extend batch of %d request(s): %d multimodal, %d text-only",
            len(forward_batch.mm_inputs),
            with_mm,
            len(forward_batch.mm_inputs) - with_mm,
        )
        kwargs: dict = {}
        input_embeds = prepare_mm_inputs(
            input_ids,
            forward_batch,
            language_model,
            kwargs,
            multimodal_model=self,
            use_deepstack=self.use_deepstack,
        )
        return input_embeds, kwargs.get("input_deepstack_embeds")
