"""Encode-only construction of ``Qwen3VLMoeForConditionalGeneration``, for the test bed's
in-process harness (``lm_harness``); an encode server builds the same class with the same
``encoder_only`` switch through SGLang's model loader (``serving_args.py``).

The encode server of an encode/language disaggregated deployment needs the vision tower of a
Qwen3-VL-MoE checkpoint and nothing else: no decoder layers, no ``lm_head``, no token
embeddings (the language side embeds text itself), no KV cache. :func:`build_encode_only`
builds the VL class itself (not a subclass) with upstream's ``encoder_only`` switch, which
leaves out the language model and ``lm_head``; its own weight loader then loads only
``visual.*``.

:meth:`EncodeOnly.encode` runs upstream's own ``get_image_feature`` / ``get_video_feature``
and ``separate_deepstack_embeds`` (the colocated path's functions, so images and videos are
encoded exactly as there) and returns, per request, the multimodal rows ``[n_mm, H]``, the K
deepstack features ``[n_mm, K * H]`` and the prompt positions they belong to.
:meth:`EncodedRequest.scatter` places them into the language model's inputs
(``input_embeds [N, H]`` embedded by the language side, ``input_deepstack_embeds [N, K * H]``
with zero text rows), the layout ``Qwen3MoeModel.forward(..., input_deepstack_embeds=...)``
takes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Tuple

import torch

from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

# Per modality: the VL class's feature function and the config's placeholder token.
_FEATURES = (
    (Modality.IMAGE, "get_image_feature", "image_token_id"),
    (Modality.VIDEO, "get_video_feature", "video_token_id"),
)


@dataclass
class EncodedRequest:
    """What the encode side produces for one request."""

    mm_positions: torch.Tensor  # [n_mm] indices into the request's input_ids, ascending
    mm_embeds: torch.Tensor  # [n_mm, H]
    deepstack: torch.Tensor  # [n_mm, K * H]
    num_deepstack: int

    def scatter(
        self, input_embeds: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(input_embeds [N, H], input_deepstack_embeds [N, K*H] or None when K == 0)
        from the language side's text embeddings of the request (``[N, H]``, copied)."""
        embeds = input_embeds.clone()
        embeds[self.mm_positions] = self.mm_embeds.to(embeds.dtype)
        if self.num_deepstack == 0:
            return embeds, None
        deepstack = embeds.new_zeros(embeds.shape[0], self.deepstack.shape[1])
        deepstack[self.mm_positions] = self.deepstack.to(embeds.dtype)
        return embeds, deepstack


@dataclass
class EncodeOnly:
    """The encode-only VL model and the VL config it was built from (the model keeps
    only ``text_config`` as ``.config``; the placeholder token ids live on the VL config).
    """

    model: Any  # Qwen3VLMoeForConditionalGeneration with encoder_only
    config: Any  # its Qwen3VLMoeConfig

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        self.model.load_weights(weights)

    @torch.no_grad()
    def encode(
        self, input_ids: torch.Tensor, items: List[MultimodalDataItem]
    ) -> EncodedRequest:
        """Encode one request's images and videos.

        ``input_ids`` are the request's prompt ids with the placeholders expanded (one
        ``image_token_id`` / ``video_token_id`` per merged patch, as the processor emits
        them); ``items`` are its multimodal items (``feature`` = pixel values, with
        ``image_grid_thw`` / ``video_grid_thw``), in prompt order per modality.
        """
        positions, embeds, deepstack = [], [], []
        for modality, feature_fn, token_attr in _FEATURES:
            mine = [item for item in items if item.is_modality(modality)]
            if not mine:
                continue
            features = getattr(self.model, feature_fn)(mine)
            mm, ds = self.model.separate_deepstack_embeds(features)
            where = (input_ids == getattr(self.config, token_attr)).nonzero()[:, 0]
            if where.numel() != mm.shape[0]:
                raise ValueError(
                    f"{where.numel()} {modality.name.lower()} placeholders in input_ids "
                    f"but the vision tower produced {mm.shape[0]} embeddings"
                )
            positions.append(where)
            embeds.append(mm)
            deepstack.append(ds)
        if not positions:
            raise ValueError("encode: the request has no image or video item")
        order = torch.cat(positions).argsort()
        return EncodedRequest(
            torch.cat(positions)[order],
            torch.cat(embeds)[order],
            torch.cat(deepstack)[order],
            self.model.num_deepstack_embeddings,
        )


def build_encode_only(config: Any, quant_config=None, prefix: str = "") -> EncodeOnly:
    """``Qwen3VLMoeForConditionalGeneration`` with the vision tower only.

    ``config`` is a Qwen3-VL-MoE config; it is copied, not modified.
    """
    from sglang.srt.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration

    config = copy.deepcopy(config)
    config.encoder_only = True
    config.language_only = False
    model = Qwen3VLMoeForConditionalGeneration(config, quant_config, prefix)
    assert not hasattr(model, "model") and model.lm_head is None
    return EncodeOnly(model, config)
