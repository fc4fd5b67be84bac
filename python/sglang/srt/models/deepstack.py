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
``Qwen3MoeForCausalLM`` and ``Qwen3VLMoeForConditionalGeneration``):

* :func:`deepstack_layer_count` resolves K from a (VL or text) config, never a constant;
* :class:`DeepStack` validates the width, knows which slices a pipeline stage owns, runs
  the stage's layers adding its slices, and forwards the tensor to later pipeline
  stages that still need slices (a first stage shorter than K layers);
* :func:`text_config_for_language_model` unwraps a VL config for the language side.

The model's own layer loop is left untouched: the model branches once per forward on
``input_deepstack_embeds is not None`` and calls :meth:`DeepStack.run_layers`, so a
forward without deepstack does no extra work per layer.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Dict, Optional

import torch

logger = logging.getLogger(__name__)

# Attribute set on a text config (by the VL class or the language-side loader) carrying
# K from the enclosing VL config, because the decoder stack only sees the text config.
NUM_DEEPSTACK_LAYERS_ATTR = "num_deepstack_layers"
# Key under which a pipeline stage forwards the deepstack tensor to the next stage.
PP_PROXY_KEY = "input_deepstack_embeds"


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
    last layer), so a stage consumes ``[start - 1, end - 1)`` plus ``end - 1`` if last."""
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
        if num_deepstack > num_hidden_layers:
            logger.warning(
                "deepstack: the checkpoint declares K=%d deepstack slices but the text "
                "model has %d layers; slices %d.. are ignored (as in Hugging Face)",
                num_deepstack,
                num_hidden_layers,
                num_hidden_layers,
            )
        self._warned_tbo = False

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
        )

    # ---- validation --------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.num_deepstack * self.hidden_size

    def check(
        self, input_deepstack_embeds: torch.Tensor, num_tokens: Optional[int] = None
    ) -> None:
        """Raise a ValueError naming the expected layout unless the tensor fits."""
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
        if num_tokens is not None and t.shape[0] != num_tokens:
            raise ValueError(
                f"input_deepstack_embeds has {t.shape[0]} rows but the batch has "
                f"{num_tokens} tokens (one row per token, zeros for text tokens)"
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

    def to_pp(self, pp_proxy_tensors: Any, input_deepstack_embeds: torch.Tensor):
        """Forward the tensor to the next stage when it still owns a slice."""
        if self.forwards_to_next_stage:
            pp_proxy_tensors.tensors[PP_PROXY_KEY] = input_deepstack_embeds
        return pp_proxy_tensors

    # ---- the layer loop with deepstack -------------------------------------------
    def final_norm_kwargs(self, input_deepstack_embeds: torch.Tensor) -> dict:
        """HF order only: the slice of the last layer goes into the final norm."""
        last = self.end_layer - 1
        if self.hf_order and self.is_last_stage and last in self.slices:
            return {"post_residual_addition": self.slice(input_deepstack_embeds, last)}
        return {}

    def run_layers(
        self,
        model: Any,
        positions: torch.Tensor,
        hidden_states: Any,
        forward_batch: Any,
        input_deepstack_embeds: torch.Tensor,
        aux_hidden_states: Any = None,
        start: Optional[int] = None,
        end: Optional[int] = None,
        record_expert_layer: bool = True,
    ) -> Any:
        """Run ``model.layers[start:end]`` adding this stage's deepstack slices.

        Inference order (default): slice ``k`` is added to the layer's completed output
        (``residual_batch.add_to_output``) right after layer ``k``; the residual update
        stays pending for the next layer, exactly as upstream's VL path did.
        HF order (``rl_on_policy_target`` set): slice ``k - 1`` is passed to layer ``k``
        as ``post_residual_addition`` (and the last one to the final norm).

        Two-batch overlap is not used for a batch that carries deepstack (it would split
        the batch into micro-batches whose per-layer additions the overlapped schedule
        cannot express); such batches (multimodal prefills) run the plain per-layer loop,
        which is what upstream's VL language model always did.
        """
        from sglang.srt.layers.layer_boundary.residual import batch as residual_batch

        start = model.start_layer if start is None else start
        end = model.end_layer if end is None else end
        if getattr(forward_batch, "can_run_tbo", False) and not self._warned_tbo:
            self._warned_tbo = True
            logger.info(
                "deepstack: batches carrying input_deepstack_embeds run without "
                "two-batch overlap (plain layer loop)"
            )
        recorder = None
        if record_expert_layer:
            recorder = _expert_recorder()
        slices = self.slices
        for i in range(start, end):
            layer = model.layers[i]
            kwargs = {}
            if aux_hidden_states is not None and getattr(
                layer, "_is_layer_to_capture", False
            ):
                kwargs["captured_last_layer_outputs"] = aux_hidden_states
            if self.hf_order and (i - 1) in slices:
                kwargs["post_residual_addition"] = self.slice(
                    input_deepstack_embeds, i - 1
                )
            ctx = recorder(i) if recorder is not None else nullcontext()
            with ctx:
                hidden_states = layer(positions, hidden_states, forward_batch, **kwargs)
            if not self.hf_order and i in slices:
                hidden_states = residual_batch.add_to_output(
                    hidden_states, forward_batch, self.slice(input_deepstack_embeds, i)
                )
        return hidden_states


def _hf_order_requested() -> bool:
    """Upstream's switch: HF deepstack order only for RL on-policy targets."""
    try:
        from sglang.srt.runtime_context import get_exec

        return get_exec().deterministic.rl_on_policy_target is not None
    except Exception:  # no runtime context (unit tests, tools)
        return False


def _expert_recorder():
    """Per-layer context of the expert distribution recorder (as the model loop uses),
    or None when piecewise CUDA graphs are on (the model loop skips it then too)."""
    try:
        from sglang.srt.eplb.expert_distribution import (
            get_global_expert_distribution_recorder,
        )
        from sglang.srt.model_executor.cuda_graph_config import (
            Backend,
            Phase,
            check_cuda_graph_backend,
        )
    except Exception:
        return None
    if check_cuda_graph_backend(Phase.PREFILL, Backend.TC_PIECEWISE):
        return None
    rec = get_global_expert_distribution_recorder()
    return rec.with_current_layer
