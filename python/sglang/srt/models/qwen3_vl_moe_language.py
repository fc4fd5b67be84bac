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
"""``Qwen3MoeForCausalLM`` loaded from a Qwen3-VL-MoE checkpoint: the language side.

The language server of an encode/language disaggregated deployment serves only the LLM
of a Qwen3-VL-MoE checkpoint. It builds ``Qwen3MoeForCausalLM`` from the VL config's
``text_config`` (:func:`text_config_for_language_model`: K, the deepstack count, attached,
see ``deepstack.py``), uses M-RoPE positions iff the rope parameters declare them
(``deepstack.uses_mrope``, which the decoder stack's hook decides on too) and loads:

* the LLM weights, ``model.language_model.*`` (renamed to ``model.*``) and ``lm_head``,
  with fused experts in the released layout (``experts.gate_up_proj [E, H, 2I]``,
  ``experts.down_proj [E, I, H]``), through the loader body the VL class runs too
  (``Qwen3VLMoeForConditionalGeneration.load_weights_into``), so the two classes cannot
  disagree on the mapping;
* nothing of the vision tower: no vision module is built, and every ``model.visual.*``
  tensor is skipped by the safetensors iterators from its header alone, before it is read
  (``skip_checkpoint_tensor``, the model-loader seam); other iterators (``.bin``, ...) yield it
  and it is dropped before any parameter exists for it. The bytes and parameters skipped are
  logged and kept on the model (``vision_weights_skipped``) as what this class saves versus
  the VL class.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Tuple

import torch

from sglang.srt.models.deepstack import attach_deepstack_count, uses_mrope

logger = logging.getLogger(__name__)

VISION_PREFIXES = ("model.visual.", "visual.")


def is_vl_config(config: Any) -> bool:
    return (
        getattr(config, "text_config", None) is not None
        and getattr(config, "vision_config", None) is not None
    )


def text_config_for_language_model(config: Any) -> Any:
    """The config the language model of ``config`` is built from.

    A text-only config is returned unchanged. A VL config (e.g. ``Qwen3VLMoeConfig``)
    yields its ``text_config`` with K attached and ``tie_word_embeddings`` taken from the
    VL config (transformers 5 defaults it to True on the text config, while the released
    checkpoints have a separate ``lm_head``; upstream's VL class does the same).
    """
    if not is_vl_config(config):
        return config
    text = config.text_config
    attach_deepstack_count(text, config)
    if hasattr(config, "tie_word_embeddings"):
        text.tie_word_embeddings = config.tie_word_embeddings
    return text


def is_vision_weight(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


@dataclass
class SkippedWeights:
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0  # at the model's parameter dtype, what the VL class would hold

    def describe(self) -> str:
        return (
            f"{self.tensors} vision tensors, {self.parameters} parameters, "
            f"{self.bytes / 2**20:.2f} MiB"
        )


def vision_tensor_skipper(model):
    """``skip_checkpoint_tensor`` for the loader: skip vision tensors unread, counting them."""
    model.vision_weights_skipped = skipped = SkippedWeights()

    def skip(name: str, shape, dtype: str) -> bool:
        if not is_vision_weight(name):
            return False
        numel = math.prod(shape)
        skipped.tensors += 1
        skipped.parameters += numel
        skipped.bytes += numel * next(model.parameters()).element_size()
        return True

    return skip


def _drop_vision(
    weights: Iterable[Tuple[str, torch.Tensor]], skipped: SkippedWeights, itemsize: int
) -> Iterator[Tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        if is_vision_weight(name):
            skipped.tensors += 1
            skipped.parameters += tensor.numel()
            skipped.bytes += tensor.numel() * itemsize
            continue
        yield name, tensor


def load_language_weights(model, weights: Iterable[Tuple[str, torch.Tensor]]):
    """Load the LLM part of a Qwen3-VL-MoE checkpoint into ``Qwen3MoeForCausalLM``."""
    # Imported here: qwen3_vl_moe imports qwen3_moe, which calls this function.
    from sglang.srt.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration

    itemsize = next(model.parameters()).element_size()
    # Tensors the loader already skipped unread were counted by vision_tensor_skipper.
    skipped = getattr(model, "vision_weights_skipped", None) or SkippedWeights()
    Qwen3VLMoeForConditionalGeneration.load_weights_into(
        model, _drop_vision(weights, skipped, itemsize), language_only=True
    )
    model.vision_weights_skipped = skipped
    logger.info(
        "Qwen3MoeForCausalLM from a Qwen3-VL-MoE checkpoint (language side): loaded "
        "the language model only; skipped %s versus Qwen3VLMoeForConditionalGeneration",
        skipped.describe(),
    )
    return skipped


__all__ = [
    "SkippedWeights",
    "is_vision_weight",
    "is_vl_config",
    "load_language_weights",
    "text_config_for_language_model",
    "uses_mrope",  # deepstack's, for the language model's positions (Qwen3MoeForCausalLM)
    "vision_tensor_skipper",
]
