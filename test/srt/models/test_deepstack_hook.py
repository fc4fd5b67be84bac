"""Unit tests of the deepstack hook (sglang/srt/models/deepstack.py), no server.

Pipeline parallelism cannot run on the CPU test bed (one process, no second device), so the
PP tests run the hook's own per-stage logic directly: each "stage" is a DeepStack built for
the layer range that upstream's ``get_pp_indices`` gives it, running its layers with the
real ``run_layers`` and handing the deepstack tensor to the next stage through a real
``PPProxyTensors`` exactly as ``Qwen2MoeModel.forward`` does.
"""
from __future__ import annotations

import types

import pytest
import torch

ds = pytest.importorskip("sglang.srt.models.deepstack")


def _vl_config(indexes, layers=4, hidden=8):
    from transformers import Qwen3VLMoeConfig

    return Qwen3VLMoeConfig(
        text_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=4, moe_intermediate_size=6, num_experts=2,
                         num_experts_per_tok=1, vocab_size=32,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                          "mrope_section": [1, 0, 1], "mrope_interleaved": True}),
        vision_config=dict(depth=6, hidden_size=8, num_heads=2, intermediate_size=8, out_hidden_size=hidden,
                           deepstack_visual_indexes=list(indexes)),
    )


# ---- K comes from the checkpoint ---------------------------------------------------------
@pytest.mark.parametrize("indexes", [(), (0, 1), (0, 1, 2), (0, 2, 3, 5)])
def test_k_from_vl_config(indexes) -> None:
    cfg = _vl_config(indexes)
    assert ds.deepstack_layer_count(cfg) == len(indexes)
    text = ds.text_config_for_language_model(cfg)
    assert text is cfg.text_config
    assert ds.deepstack_layer_count(text) == len(indexes)  # what the language model sees
    assert ds.uses_mrope(text)


def test_text_only_configs_have_no_deepstack_and_no_mrope() -> None:
    from transformers import Qwen3MoeConfig

    plain = Qwen3MoeConfig(hidden_size=8, num_hidden_layers=2)
    yarn = Qwen3MoeConfig(hidden_size=8, num_hidden_layers=2,
                          rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                           "original_max_position_embeddings": 4096})
    for cfg in (plain, yarn):
        assert ds.text_config_for_language_model(cfg) is cfg
        assert ds.deepstack_layer_count(cfg) == 0
        assert not ds.uses_mrope(cfg)  # YaRN rope scaling is not M-RoPE


# ---- width validation --------------------------------------------------------------------
def _hook(k=3, h=8, layers=4, start=0, end=None, last=True, hf_order=False):
    return ds.DeepStack(k, h, start, layers if end is None else end, layers, is_last_stage=last,
                        hf_order=hf_order)


@pytest.mark.parametrize("width", [8, 16, 32, 24 + 1])
def test_wrong_width_is_a_clear_error(width) -> None:
    with pytest.raises(ValueError, match=r"\[num_tokens, 3 \* 8\] \(width 24\)"):
        _hook().check(torch.zeros(5, width), num_tokens=5)


def test_wrong_rank_and_rows_and_k0_are_errors() -> None:
    with pytest.raises(ValueError, match="width 24"):
        _hook().check(torch.zeros(5, 3, 8), num_tokens=5)
    with pytest.raises(ValueError, match="4 rows but the batch has 5 tokens"):
        _hook().check(torch.zeros(4, 24), num_tokens=5)
    with pytest.raises(ValueError, match="K=0"):
        _hook(k=0).check(torch.zeros(5, 8), num_tokens=5)
    _hook().check(torch.zeros(5, 24), num_tokens=5)  # the right layout passes


# ---- per-stage layer ownership -----------------------------------------------------------
def test_stage_slices() -> None:
    assert list(ds.stage_slices(3, 0, 4)) == [0, 1, 2]
    assert list(ds.stage_slices(3, 0, 1)) == [0]  # first stage shorter than K
    assert list(ds.stage_slices(3, 1, 2)) == [1]
    assert list(ds.stage_slices(3, 2, 4)) == [2]
    assert list(ds.stage_slices(3, 3, 4)) == []
    assert list(ds.stage_slices(4, 0, 4)) == [0, 1, 2, 3]  # text model with exactly K layers
    assert ds.needed_after_stage(3, 1, is_last_stage=False, hf_order=False)
    assert not ds.needed_after_stage(3, 3, is_last_stage=False, hf_order=False)
    assert not ds.needed_after_stage(3, 1, is_last_stage=True, hf_order=False)
    # HF order: slice k is consumed at layer k + 1 (or in the final norm for the last layer)
    assert list(ds.hf_order_stage_slices(3, 0, 1, is_last_stage=False)) == []
    assert list(ds.hf_order_stage_slices(3, 1, 4, is_last_stage=True)) == [0, 1, 2]
    assert list(ds.hf_order_stage_slices(4, 2, 4, is_last_stage=True)) == [1, 2, 3]
    assert ds.needed_after_stage(3, 3, is_last_stage=False, hf_order=True)


class _Layer(torch.nn.Module):
    """A decoder-layer stand-in: h -> tanh(h @ W + b), deterministic per layer."""

    def __init__(self, i: int, h: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(100 + i)
        self.w = torch.randn(h, h, generator=g) / h**0.5
        self.b = torch.randn(h, generator=g)

    def forward(self, positions, hidden_states, forward_batch, post_residual_addition=None, **_):
        if post_residual_addition is not None:  # HF order: added to the layer's input
            hidden_states = hidden_states + post_residual_addition
        return torch.tanh(hidden_states @ self.w + self.b)


def _reference(x, layers, embeds, k, h):
    for i, layer in enumerate(layers):
        x = layer(None, x, None)
        if i < k:
            x = x + embeds[:, i * h:(i + 1) * h]
    return x


def _run_pipeline(x, layers, embeds, k, h, partition, monkeypatch):
    """Run the stages of `partition` (layers per stage) as Qwen2MoeModel.forward would."""
    from sglang.srt.distributed.utils import get_pp_indices
    from sglang.srt.layers.layer_boundary.residual import batch as residual_batch
    from sglang.srt.model_executor.forward_batch_info import PPProxyTensors

    monkeypatch.setenv("SGLANG_PP_LAYER_PARTITION", ",".join(map(str, partition)))
    pp = len(partition)
    proxy, hidden = None, x
    added = []
    orig_add = residual_batch.add_to_output
    monkeypatch.setattr(residual_batch, "add_to_output",
                        lambda hs, fb, extra: added.append(extra) or orig_add(hs, fb, extra))
    for rank in range(pp):
        start, end = get_pp_indices(len(layers), rank, pp) if pp > 1 else (0, len(layers))
        hook = ds.DeepStack(k, h, start, end, len(layers), is_last_stage=rank == pp - 1)
        model = types.SimpleNamespace(layers=layers, start_layer=start, end_layer=end)
        fb = types.SimpleNamespace(residual_stream=None, can_run_tbo=False)
        residual_batch.start(fb)
        stage_embeds = embeds if rank == 0 else hook.from_pp(proxy)
        if any(start <= j < end for j in range(k)):
            assert stage_embeds is not None, f"stage {rank} owns a slice but did not get the tensor"
        if rank > 0:
            hidden = proxy["hidden_states"]
        if stage_embeds is not None:
            hidden = hook.run_layers(model, None, hidden, fb, stage_embeds, record_expert_layer=False)
        else:
            for i in range(start, end):
                hidden = layers[i](None, hidden, fb)
        if rank < pp - 1:
            proxy = PPProxyTensors({"hidden_states": hidden})
            if stage_embeds is not None:
                hook.to_pp(proxy, stage_embeds)
    return hidden, added


@pytest.mark.parametrize("partition", [(4,), (1, 3), (2, 2), (3, 1), (1, 1, 2), (1, 1, 1, 1)],
                         ids=lambda p: "x".join(map(str, p)))
def test_pp_split_adds_each_slice_once_on_its_owner(partition, monkeypatch) -> None:
    h, k, n = 8, 3, 5
    layers = [_Layer(i, h) for i in range(4)]
    x = torch.randn(n, h, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(n, k * h, generator=torch.Generator().manual_seed(1))
    out, added = _run_pipeline(x, layers, embeds, k, h, partition, monkeypatch)
    assert len(added) == k  # each slice exactly once, whatever the split
    torch.testing.assert_close(out, _reference(x, layers, embeds, k, h), rtol=0, atol=1e-6)


def test_first_stage_shorter_than_k_forwards_the_tensor() -> None:
    from sglang.srt.model_executor.forward_batch_info import PPProxyTensors

    first = _hook(k=3, start=0, end=1, last=False)
    assert list(first.slices) == [0] and first.forwards_to_next_stage
    proxy = first.to_pp(PPProxyTensors({"hidden_states": torch.zeros(2, 8)}), torch.ones(2, 24))
    second = _hook(k=3, start=1, end=4, last=True)
    assert list(second.slices) == [1, 2]
    assert torch.equal(second.from_pp(proxy), torch.ones(2, 24))
    # a stage past layer K does not forward it further
    assert not _hook(k=3, start=0, end=3, last=False).forwards_to_next_stage


def test_hf_order_matches_hf_semantics(monkeypatch) -> None:
    """HF order: slice k goes into layer k+1's input (post_residual_addition) and the last one
    into the final norm; the hook must pick exactly those slices on a single stage."""
    h, k = 8, 2
    hook = _hook(k=k, h=h, layers=2, hf_order=True)
    embeds = torch.arange(2 * k * h, dtype=torch.float32).reshape(2, k * h)
    seen = {}

    class Rec(torch.nn.Module):
        def __init__(self, i):
            super().__init__()
            self.i = i

        def forward(self, positions, hs, fb, post_residual_addition=None, **_):
            seen[self.i] = post_residual_addition
            return hs

    model = types.SimpleNamespace(layers=[Rec(0), Rec(1)], start_layer=0, end_layer=2)
    fb = types.SimpleNamespace(residual_stream=None, can_run_tbo=False)
    hook.run_layers(model, None, torch.zeros(2, h), fb, embeds, record_expert_layer=False)
    assert seen[0] is None and torch.equal(seen[1], embeds[:, :h])
    assert torch.equal(hook.final_norm_kwargs(embeds)["post_residual_addition"], embeds[:, h:])
