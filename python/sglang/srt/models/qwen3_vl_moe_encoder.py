# Copyright 2025 SGLang Team
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
# ==============================================================================
"""Encode-only construction of ``Qwen3VLMoeForConditionalGeneration`` (the encode side).

The encode server of an encode/language disaggregated deployment needs the vision tower and
the token embeddings of a Qwen3-VL-MoE checkpoint, nothing else: no decoder layers, no
``lm_head``, no KV cache. This builds the VL class itself (not a subclass) with upstream's
``encoder_only`` switch, which already leaves out the language model and ``lm_head``, and
gives it back only the token embedding table (``model.embed_tokens``, loaded by the VL
class's own weight loader from ``model.language_model.embed_tokens.weight``).

:func:`encode` returns, per request, what the language side needs for the multimodal
positions: the merged patch embeddings ``[n_mm, H]`` and the K deepstack features
``[n_mm, K * H]``, plus the positions they belong to. :meth:`EncodedRequest.language_inputs`
assembles the language model's inputs from them (``input_embeds [N, H]`` with text rows from
the token embeddings, and ``input_deepstack_embeds [N, K * H]`` with zero text rows), the
layout ``Qwen3MoeModel.forward(..., input_deepstack_embeds=...)`` takes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from sglang.srt.models.deepstack import deepstack_layer_count


class TokenEmbeddingsOnly(nn.Module):
    """Stands where the language model would be: only ``embed_tokens``, so parameter names
    (``model.embed_tokens.weight``) match the VL class's loader mapping."""

    def __init__(self, text_config: Any, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
        from sglang.srt.utils import add_prefix

        self.config = text_config
        self.embed_tokens = VocabParallelEmbedding(
            text_config.vocab_size,
            text_config.hidden_size,
            quant_config=quant_config,
            prefix=add_prefix("embed_tokens", prefix),
        )

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens


def build_encode_only(config: Any, quant_config=None, prefix: str = ""):
    """``Qwen3VLMoeForConditionalGeneration`` with the vision tower and token embeddings only.

    ``config`` is a Qwen3-VL-MoE config; it is copied, not modified.
    """
    from sglang.srt.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration

    config = copy.deepcopy(config)
    config.encoder_only = True
    config.language_only = False
    model = Qwen3VLMoeForConditionalGeneration(config, quant_config, prefix)
    assert not hasattr(model, "model") and model.lm_head is None
    model.config_vl = config  # the VL class keeps only text_config as .config
    model.model = TokenEmbeddingsOnly(
        config.text_config, quant_config, prefix=f"{prefix}model" if prefix else "model"
    )
    return model


@dataclass
class EncodedRequest:
    """What the encode side produces for one request."""

    mm_positions: torch.Tensor  # [n_mm] indices into the request's input_ids
    mm_embeds: torch.Tensor  # [n_mm, H]
    deepstack: torch.Tensor  # [n_mm, K * H]
    num_deepstack: int

    def language_inputs(
        self, input_ids: torch.Tensor, embed_tokens: nn.Module
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(input_embeds [N, H], input_deepstack_embeds [N, K*H] or None when K == 0)."""
        embeds = embed_tokens(input_ids).clone()
        embeds[self.mm_positions] = self.mm_embeds.to(embeds.dtype)
        if self.num_deepstack == 0:
            return embeds, None
        deepstack = embeds.new_zeros(input_ids.shape[0], self.deepstack.shape[1])
        deepstack[self.mm_positions] = self.deepstack.to(embeds.dtype)
        return embeds, deepstack


@torch.no_grad()
def encode(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
) -> EncodedRequest:
    """Run the vision tower on one request's images and split off the deepstack features.

    ``input_ids`` are the request's prompt ids with the image placeholders already expanded
    (one ``image_token_id`` per merged patch, as the processor emits them).
    """
    k = model.num_deepstack_embeddings
    assert k == deepstack_layer_count(model.config_vl), (k, model.config_vl)
    feats = model.visual(
        pixel_values.to(device=model.visual.device, dtype=model.visual.dtype),
        grid_thw=image_grid_thw,
    )
    hidden = model.config.hidden_size
    mm_embeds, deepstack = feats[:, :hidden], feats[:, hidden:]
    positions = (input_ids == model.config_vl.image_token_id).nonzero(as_tuple=True)[0]
    if positions.numel() != mm_embeds.shape[0]:
        raise ValueError(
            f"{positions.numel()} image placeholders in input_ids but the vision tower "
            f"produced {mm_embeds.shape[0]} embeddings"
        )
    if deepstack.shape[1] != k * hidden:
        raise ValueError(
            f"vision tower returned deepstack width {deepstack.shape[1]}, expected "
            f"K * hidden_size = {k} * {hidden}"
        )
    return EncodedRequest(positions, mm_embeds, deepstack, k)
