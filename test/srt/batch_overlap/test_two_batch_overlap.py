"""Patch 0007: models whose forward two-batch overlap cannot split (M-RoPE positions, deepstack)
vote against TBO on every DP rank, before the cross-rank agreement.

DP attention across ranks cannot run on this CPU test bed (one process, no second device), so
the agreement is driven directly: each simulated rank runs the real
``TboDPAttentionPreparer.prepare_all_gather`` on its own local batch (a stand-in carrying the
fields the preparer reads) with the real ``model_supports_tbo`` of a real ``ModelConfig``; the
per-rank votes are stacked as the scheduler's all-gather stacks them, and the real
``compute_output`` decides for every rank.
"""
from __future__ import annotations

import json
import types

import pytest
import torch

from epd_testbed.tiny_ckpt import TinyTextMoeSpec, TinyVLMoeSpec, ensure_checkpoint
from sglang.srt.batch_overlap.two_batch_overlap import TboDPAttentionPreparer, model_supports_tbo
from sglang.srt.model_executor.forward_batch_info import ForwardMode


def _model_config(kind: str):
    from sglang.srt.configs.model_config import ModelConfig

    if kind == "text_moe":
        return ModelConfig(str(ensure_checkpoint(TinyTextMoeSpec())))
    vl = str(ensure_checkpoint(TinyVLMoeSpec()))
    if kind == "vl_moe":
        return ModelConfig(vl)
    # the language side: the VL checkpoint served by Qwen3MoeForCausalLM
    return ModelConfig(vl, model_override_args=json.dumps({"architectures": ["Qwen3MoeForCausalLM"]}))


def _prefill(extend_lens):
    """A rank's local extend batch, as far as the preparer reads it."""
    return types.SimpleNamespace(forward_mode=ForwardMode.EXTEND, spec_info=None,
                                 extend_num_tokens=sum(extend_lens), extend_lens=list(extend_lens),
                                 is_extend_in_batch=True, batch_size=lambda: len(extend_lens))


def _agree(model_config, local_batches):
    """Every rank votes on its own batch; the gathered votes decide for each rank."""
    preparers, votes = [], []
    for batch in local_batches:
        preparer = TboDPAttentionPreparer()
        votes.append(preparer.prepare_all_gather(batch, model_supports_tbo(model_config)))
        preparers.append(preparer)
    gathered = torch.tensor([[int(can), mode] for can, mode in votes])
    return [p.compute_output(gathered) for p in preparers]


@pytest.fixture(autouse=True)
def tbo_enabled(monkeypatch):
    from sglang.srt.runtime_context import get_flags

    monkeypatch.setattr(get_flags().moe, "tbo_enabled", True)


# rank 0 prefills a request with an image (deepstack rows), rank 1 a text request, rank 2 idles
RANK_BATCHES = [_prefill([40, 24]), _prefill([30, 30]), None]


@pytest.mark.parametrize("kind", ["vl_moe", "language_side"])
def test_mrope_models_agree_on_no_tbo(kind) -> None:
    """issue 7 item 2: for Qwen3-VL-MoE and the language side (M-RoPE positions; the same rule
    covers InternS1Pro and Qwen3-Omni, built on the same VL class), every rank, with an image
    prefill, a text prefill or idle, ends up without TBO, so all run the same collectives."""
    config = _model_config(kind)
    assert config.model_is_mrope and not model_supports_tbo(config)
    for split_seq_index, global_mode in _agree(config, RANK_BATCHES):
        assert split_seq_index is None and global_mode is None


def test_text_moe_keeps_tbo() -> None:
    """issue 7 item 2 (control): a text-only Qwen3-MoE keeps two-batch overlap with the same
    per-rank inputs, so the vote above is not vacuous."""
    config = _model_config("text_moe")
    assert model_supports_tbo(config)
    decided = _agree(config, RANK_BATCHES)
    assert [d[1] for d in decided] == [ForwardMode.EXTEND] * 3
    assert all(split_seq_index is not None for split_seq_index, _ in decided)
