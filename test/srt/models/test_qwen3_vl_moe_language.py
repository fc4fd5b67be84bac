"""Unit tests of the language-side construction (sglang/srt/models/qwen3_vl_moe_language.py):
which config the language model is built from, and the shared Qwen3-VL-MoE loader, no server."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sglang.srt.models import deepstack, qwen3_vl_moe_language as language
from tiny_configs import vl_config


# ---- config helpers (issue 7 item 4) ------------------------------------------------------
@pytest.mark.parametrize("indexes", [(), (0, 1), (0, 1, 2), (0, 2, 3, 5)])
def test_k_from_vl_config(indexes) -> None:
    """issue 7 item 4: the language side's config helpers live in the language-side
    construction module; the text config they give carries K and M-RoPE."""
    cfg = vl_config(indexes)
    assert language.is_vl_config(cfg)
    text = language.text_config_for_language_model(cfg)
    assert text is cfg.text_config
    assert deepstack.deepstack_layer_count(text) == len(indexes)  # what the language model sees
    assert language.uses_mrope(text)
    assert deepstack.rope_parameters(text)["mrope_section"] == [1, 0, 1]


def test_construction_helpers_are_not_in_the_hook() -> None:
    """issue 7 item 4: deepstack.py keeps K, the M-RoPE predicate its TBO decision uses,
    validation, PP ownership and the per-layer steps; construction helpers are not there.
    Issue 18 item 2: the language-side construction imports the hook, never the reverse."""
    for name in ("is_vl_config", "text_config_for_language_model", "load_language_weights"):
        assert not hasattr(deepstack, name), name
    assert language.uses_mrope is deepstack.uses_mrope
    assert "qwen3_vl_moe_language" not in Path(deepstack.__file__).read_text()


def test_text_only_configs_have_no_deepstack_and_no_mrope() -> None:
    from transformers import Qwen3MoeConfig

    plain = Qwen3MoeConfig(hidden_size=8, num_hidden_layers=2)
    yarn = Qwen3MoeConfig(hidden_size=8, num_hidden_layers=2,
                          rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                           "original_max_position_embeddings": 4096})
    for cfg in (plain, yarn):
        assert not language.is_vl_config(cfg)
        assert language.text_config_for_language_model(cfg) is cfg
        assert deepstack.deepstack_layer_count(cfg) == 0
        assert not language.uses_mrope(cfg)  # YaRN rope scaling is not M-RoPE


# ---- the shared loader (issue 7 item 5) ---------------------------------------------------
class _LanguageModel(torch.nn.Module):
    """The parameters of the language side's Qwen3MoeForCausalLM that the non-expert part of
    the loader fills (``model.*``, ``lm_head``), with the text config it is built from."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = torch.nn.Module()
        self.model.norm = torch.nn.Module()
        self.model.norm.weight = torch.nn.Parameter(torch.zeros(8))
        self.lm_head = torch.nn.Module()
        self.lm_head.weight = torch.nn.Parameter(torch.zeros(32, 8))


def test_language_side_loader_plants_no_flags_on_the_text_config() -> None:
    """issue 7 item 5: the language side loads through the VL class's loader body as a function
    of the model (``load_weights_into``), not an unbound method call on a foreign class, and
    leaves its text config as it was (no ``encoder_only`` / ``language_only`` planted)."""
    text = language.text_config_for_language_model(vl_config())
    model = _LanguageModel(text)
    norm, head = torch.randn(8), torch.randn(32, 8)
    weights = [("model.language_model.norm.weight", norm), ("lm_head.weight", head),
               ("model.visual.blocks.0.norm1.weight", torch.randn(8))]
    skipped = language.load_language_weights(model, iter(weights))
    assert torch.equal(model.model.norm.weight, norm) and torch.equal(model.lm_head.weight, head)
    assert (skipped.tensors, skipped.parameters) == (1, 8)
    assert not hasattr(text, "encoder_only") and not hasattr(text, "language_only")
