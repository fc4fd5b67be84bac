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
"""DeepStack as an optional input of a decoder-layer stack (Qwen3-VL / Qwen3-VL-MoE).

Qwen3-VL's vision tower returns, besides the merged patch embeddings, K "deepstack"
features taken from intermediate ViT blocks (``vision_config.deepstack_visual_indexes``).
The language model adds feature ``k`` to the hidden states after decoder layer ``k``
(``k < K``), on the multimodal rows; text rows carry zeros.

The language model receives them as one tensor ``input_deepstack_embeds`` of shape
``[num_tokens, K * hidden_size]``: columns ``[k * H, (k + 1) * H)`` are slice ``k``.
``None`` means "no deepstack" (text-only batches, decode, text-only checkpoints).

This module is the single implementation used by every class that runs a Qwen-MoE
decoder stack (``Qwen2MoeModel`` and its subclass ``Qwen3MoeModel``, hence
``Qwen3MoeForCausalLM`` and ``Qwen3VLMoeForConditionalGeneration``). It owns K
(:func:`deepstack_layer_count`), the validation of the tensor, which slices a pipeline
stage owns, and the per-layer steps; the model's own layer loops (``forward`` and split
prefill) call those steps, each of which does nothing for ``None``:

* :meth:`DeepStack.layer_kwargs` before layer ``i`` (HF order only: the slice that goes
  into the layer's input after the residual);
* :meth:`DeepStack.after_layer` after layer ``i`` (inference order: slice ``i`` is added
  to the layer's output);
* :meth:`DeepStack.final_norm_kwargs` for the final norm (HF order: the last slice);
* :meth:`DeepStack.to_pp` / :meth:`DeepStack.from_pp` between pipeline stages.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch

logger = logging.getLogger(__name__)

# Attribute set on a text config (by the VL class or the language-side construction)
# carrying K from the enclosing VL config, because the decoder stack only sees the text
# config.
NUM_DEEPSTACK_LAYERS_ATTR = "num_deepstack_layers"
# Key under which a pipeline stage forwards the deepstack tensor to the next stage.
PP_PROXY_KEY = "input_deepstack_embeds"
# What a step returns when it has nothing to add (shared, never mutated).
_NO_KWARGS: dict = {}


def deepstack_layer_count(config: Any) -> int:
    """K: the number of deepstack slices the checkpoint declares.

    * a VL config: ``len(vision_config.deepstack_visual_indexes)`` (0 when absent/empty);
    * a text config that a VL config was unwrapped into: the attached count;
    * a text-only config: 0.
    """
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        return len(getattr(vision, "deepstack_visual_indexes", None) or ())
    return int(getattr(config, NUM_DEEPSTACK_LAYERS_ATTR, 0) or 0)


def attach_deepstack_count(text_config: Any, vl_config: Any) -> int:
    """Record K of ``vl_config`` on its ``text_config`` (what the language model sees)."""
    k = deepstack_layer_count(vl_config)
    setattr(text_config, NUM_DEEPSTACK_LAYERS_ATTR, k)
    return k


def rope_parameters(config: Any) -> Dict[str, Any]:
    return (
        getattr(config, "rope_parameters", None)
        or getattr(config, "rope_scaling", None)
        or {}
    )


def uses_mrope(config: Any) -> bool:
    """M-RoPE iff the rope parameters declare ``mrope_section``.

    Keyed on ``mrope_section`` itself, not on the presence of rope scaling, so a text-only
    checkpoint with YaRN (or any other rope type) keeps 1-D positions.
    """
    return "mrope_section" in rope_parameters(config)


def stage_slices(num_deepstack: int, start_layer: int, end_layer: int) -> range:
    """Slices ``k`` a pipeline stage owning layers ``[start_layer, end_layer)`` adds
    (inference order: slice ``k`` after layer ``k``). Empty when the stage starts at or
    after layer K; a first stage shorter than K layers owns only its own layers."""
    return range(start_layer, max(start_layer, min(end_layer, num_deepstack)))


def hf_order_stage_slices(
    num_deepstack: int, start_layer: int, end_layer: int, is_last_stage: bool
) -> range:
    """Slices a stage consumes in the HF order (RL on-policy): slice ``k`` is added after
    the residual, at the start of layer ``k + 1`` (or in the final norm when ``k`` is the
    last layer), so a stage consumes ``[start - 1, end - 1)`` plus ``end - 1`` if last.
    """
    lo = max(0, start_layer - 1)
    hi = min(num_deepstack, end_layer if is_last_stage else end_layer - 1)
    return range(lo, max(lo, hi))


def needed_after_stage(
    num_deepstack: int, end_layer: int, is_last_stage: bool, hf_order: bool
) -> bool:
    """Whether a later pipeline stage still needs a slice (so this stage forwards it)."""
    if is_last_stage:
        return False
    first_later = end_layer - 1 if hf_order else end_layer
    return num_deepstack > first_later


class DeepStack:
    """Deepstack bookkeeping of one decoder stack (one pipeline stage of it)."""

    def __init__(
        self,
        num_deepstack: int,
        hidden_size: int,
        start_layer: int,
        end_layer: int,
        num_hidden_layers: int,
        is_last_stage: bool = True,
        hf_order: bool = False,
        mrope: bool = False,
    ) -> None:
        self.num_deepstack = num_deepstack
        self.hidden_size = hidden_size
        self.start_layer = start_layer
        self.end_layer = end_layer
        self.num_hidden_layers = num_hidden_layers
        self.is_last_stage = is_last_stage
        self.hf_order = hf_order
        if hf_order:
            self.slices = hf_order_stage_slices(
                num_deepstack, start_layer, end_layer, is_last_stage
            )
        else:
            self.slices = stage_slices(num_deepstack, start_layer, end_layer)
        self.forwards_to_next_stage = needed_after_stage(
            num_deepstack, end_layer, is_last_stage, hf_order
        )
        # Two-batch overlap splits ``positions`` on dim 0 (M-RoPE positions are [3, T])
        # and has no deepstack step: such stacks never take the overlapped schedule. A
        # property of the model, so every DP rank decides alike (the scheduler's TBO vote
        # excludes M-RoPE models too: two_batch_overlap.model_supports_tbo).
        self.allows_two_batch_overlap = num_deepstack == 0 and not mrope
        if num_deepstack > num_hidden_layers:
            logger.warning(
                "deepstack: the checkpoint declares K=%d deepstack slices but the text "
                "model has %d layers; slices %d.. are ignored (as in Hugging Face)",
                num_deepstack,
                num_hidden_layers,
                num_hidden_layers,
            )

    @classmethod
    def from_config(
        cls,
        config: Any,
        start_layer: int,
        end_layer: int,
        is_last_stage: bool = True,
        hf_order: Optional[bool] = None,
    ) -> "DeepStack":
        if hf_order is None:
            hf_order = _hf_order_requested()
        return cls(
            deepstack_layer_count(config),
            config.hidden_size,
            start_layer,
            end_layer,
            config.num_hidden_layers,
            is_last_stage=is_last_stage,
            hf_order=hf_order,
            mrope=uses_mrope(config),
        )

    # ---- validation --------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.num_deepstack * self.hidden_size

    def check(
        self, input_deepstack_embeds: torch.Tensor, hidden_states: torch.Tensor
    ) -> None:
        """Raise a ValueError naming the expected layout unless the tensor fits the
        batch's ``hidden_states`` (the input embeddings): shape, row count, dtype and
        device. Nothing is broadcast or cast silently."""
        t = input_deepstack_embeds
        if self.num_deepstack == 0:
            raise ValueError(
                "input_deepstack_embeds was given, but this model has no deepstack "
                "layers (K=0: the checkpoint declares no "
                "vision_config.deepstack_visual_indexes)"
            )
        if t.dim() != 2 or t.shape[1] != self.width:
            raise ValueError(
                "input_deepstack_embeds must have shape [num_tokens, K * hidden_size] = "
                f"[num_tokens, {self.num_deepstack} * {self.hidden_size}] (width "
                f"{self.width}), got {tuple(t.shape)}"
            )
        if t.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"input_deepstack_embeds has {t.shape[0]} rows but the batch has "
                f"{hidden_states.shape[0]} tokens (one row per token, zeros for text "
                "tokens)"
            )
        if t.dtype != hidden_states.dtype or t.device != hidden_states.device:
            raise ValueError(
                "input_deepstack_embeds must have the hidden states' dtype and device "
                f"({hidden_states.dtype} on {hidden_states.device}), got {t.dtype} on "
                f"{t.device}"
            )

    def slice(self, input_deepstack_embeds: torch.Tensor, k: int) -> torch.Tensor:
        h = self.hidden_size
        return input_deepstack_embeds[:, k * h : (k + 1) * h]

    # ---- pipeline parallel -------------------------------------------------------
    @staticmethod
    def from_pp(pp_proxy_tensors: Any) -> Optional[torch.Tensor]:
        if pp_proxy_tensors is None:
            return None
        return pp_proxy_tensors.tensors.get(PP_PROXY_KEY)

    def to_pp(
        self, pp_proxy_tensors: Any, input_deepstack_embeds: Optional[torch.Tensor]
    ):
        """Forward the tensor to the next stage when it still owns a slice."""
        if input_deepstack_embeds is not None and self.forwards_to_next_stage:
            pp_proxy_tensors.tensors[PP_PROXY_KEY] = input_deepstack_embeds
        return pp_proxy_tensors

    # ---- the steps the model's layer loops call ----------------------------------
    def layer_kwargs(
        self, layer_id: int, input_deepstack_embeds: Optional[torch.Tensor]
    ) -> dict:
        """Extra arguments of decoder layer ``layer_id``. HF order only: slice
        ``layer_id - 1`` goes into the layer's input, after the residual
        (``post_residual_addition``)."""
        if (
            input_deepstack_embeds is None
            or not self.hf_order
            or (layer_id - 1) not in self.slices
        ):
            return _NO_KWARGS
        return {
            "post_residual_addition": self.slice(input_deepstack_embeds, layer_id - 1)
        }

    def after_layer(
        self,
        layer_id: int,
        hidden_states: Any,
        forward_batch: Any,
        input_deepstack_embeds: Optional[torch.Tensor],
    ) -> Any:
        """Inference order: add slice ``layer_id`` to the layer's completed output
        (``residual_batch.add_to_output``), leaving the residual update pending for the
        next layer's fused add-norm, exactly as upstream's VL path did."""
        if (
            input_deepstack_embeds is None
            or self.hf_order
            or layer_id not in self.slices
        ):
            return hidden_states
        from sglang.srt.layers.layer_boundary.residual import batch as residual_batch

        return residual_batch.add_to_output(
            hidden_states,
            forward_batch,
            self.slice(input_deepstack_embeds, layer_id),
        )

    def final_norm_kwargs(self, input_deepstack_embeds: Optional[torch.Tensor]) -> dict:
        """HF order only: the slice of the last layer goes into the final norm."""
        last = self.end_layer - 1
        if (
            input_deepstack_embeds is None
            or not self.hf_order
            or not self.is_last_stage
            or last not in self.slices
        ):
            return _NO_KWARGS
        return {"post_residual_addition": self.slice(input_deepstack_embeds, last)}


def _hf_order_requested() -> bool:
    """Upstream's switch: HF deepstack order only for RL on-policy targets."""
    try:
        from sglang.srt.runtime_context import get_exec

        return get_exec().deterministic.rl_on_policy_target is not None
    except Exception:  # no runtime context (unit tests, tools)
        return False
