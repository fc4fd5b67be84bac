"""Unit tests of the deepstack hook (sglang/srt/models/deepstack.py) inside the model's own
layer loops, no server.

There is no GPU, attention backend or process group here, so decoder layers are stand-ins
(``h -> tanh(h @ W + b)``) and each pipeline stage is a stand-in holder carrying exactly the
attributes the loops read; the loops themselves are the real ones: ``Qwen2MoeModel.forward``
(plain, pipeline stages, two-batch-overlap branch) and
``Qwen3MoeForCausalLM.forward_split_prefill``, with the real ``residual_batch`` and
``PPProxyTensors``. Pipeline parallelism cannot run on the CPU test bed (one process), so each
stage is built for the layer range upstream's ``get_pp_indices`` gives it and hands its
``PPProxyTensors`` to the next, as the PP runtime does.
"""
from __future__ import annotations

import contextlib
import types

import pytest
import torch

ds = pytest.importorskip("sglang.srt.models.deepstack")
from sglang.srt.layers.aux_hidden_states import AuxHiddenStateList  # noqa: E402
from sglang.srt.layers.layer_boundary.residual import batch as residual_batch  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import PPProxyTensors  # noqa: E402
from sglang.srt.models import qwen2_moe, qwen3_moe  # noqa: E402

H, K, LAYERS, TOKENS = 8, 3, 4, 5


# ---- width, dtype and device validation --------------------------------------------------
def _hook(k=K, h=H, layers=LAYERS, start=0, end=None, last=True, hf_order=False, mrope=False):
    return ds.DeepStack(k, h, start, layers if end is None else end, layers, is_last_stage=last,
                        hf_order=hf_order, mrope=mrope)


def _hidden(n=TOKENS, dtype=torch.float32):
    return torch.zeros(n, H, dtype=dtype)


@pytest.mark.parametrize("width", [8, 16, 32, 24 + 1])
def test_wrong_width_is_a_clear_error(width) -> None:
    with pytest.raises(ValueError, match=r"\[num_tokens, 3 \* 8\] \(width 24\)"):
        _hook().check(torch.zeros(TOKENS, width), _hidden())


def test_wrong_rank_and_rows_and_k0_are_errors() -> None:
    with pytest.raises(ValueError, match="width 24"):
        _hook().check(torch.zeros(TOKENS, 3, 8), _hidden())
    with pytest.raises(ValueError, match="4 rows but the batch has 5 tokens"):
        _hook().check(torch.zeros(4, 24), _hidden())
    with pytest.raises(ValueError, match="K=0"):
        _hook(k=0).check(torch.zeros(TOKENS, 8), _hidden())
    _hook().check(torch.zeros(TOKENS, 24), _hidden())  # the right layout passes


def test_dtype_and_device_mismatch_are_clear_errors() -> None:
    """issue 7 item 3: an fp32 tensor must not be cast silently into bf16 hidden states, nor
    a tensor on another device be used; both are a ValueError naming what was expected."""
    hook = _hook()
    with pytest.raises(ValueError, match=r"dtype and device \(torch.bfloat16 on cpu\), got torch.float32"):
        hook.check(torch.zeros(TOKENS, 24, dtype=torch.float32), _hidden(dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"got torch.float32 on meta"):
        hook.check(torch.zeros(TOKENS, 24, device="meta"), _hidden())
    hook.check(torch.zeros(TOKENS, 24, dtype=torch.bfloat16), _hidden(dtype=torch.bfloat16))


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


# ---- stand-ins for what needs a GPU, and the real loops -----------------------------------
class _Layer(torch.nn.Module):
    """A decoder-layer stand-in: h -> tanh(h @ W + b), deterministic per layer; records the
    keyword arguments the loop passed."""

    def __init__(self, i: int, h: int = H) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(100 + i)
        self.w = torch.randn(h, h, generator=g) / h**0.5
        self.b = torch.randn(h, generator=g)
        self.calls: list[dict] = []
        # a later pipeline stage enters through its first layer's attention boundary
        self.attn_boundary = types.SimpleNamespace(from_pp=self._from_pp)

    @staticmethod
    def _from_pp(proxy, forward_batch):
        residual_batch.start(forward_batch)
        return proxy["hidden_states"]

    def forward(self, positions, hidden_states, forward_batch, post_residual_addition=None, **kwargs):
        self.calls.append(dict(kwargs, post_residual_addition=post_residual_addition))
        if kwargs.get("captured_last_layer_outputs") is not None:  # EAGLE3/DFlash capture
            kwargs["captured_last_layer_outputs"].capture(hidden_states)
        if post_residual_addition is not None:  # HF order: added to the layer's input
            hidden_states = hidden_states + post_residual_addition
        return torch.tanh(hidden_states @ self.w + self.b)


def _layers(n=LAYERS):
    return [_Layer(i) for i in range(n)]


def _reference(x, layers, embeds, k=K, h=H):
    for i, layer in enumerate(layers):
        x = torch.tanh(x @ layer.w + layer.b)
        if embeds is not None and i < k:
            x = x + embeds[:, i * h:(i + 1) * h]
    return x


def _stack(layers, hook, start=0, end=None, first=True, last=True):
    """What Qwen2MoeModel.forward reads of its model (one pipeline stage)."""
    return types.SimpleNamespace(
        pp_group=types.SimpleNamespace(is_first_rank=first, is_last_rank=last),
        embed_tokens=None, layers=layers, start_layer=start,
        end_layer=len(layers) if end is None else end, norm=lambda h: h, deepstack=hook,
        layers_to_capture=[], config=types.SimpleNamespace(num_hidden_layers=len(layers)))


def _batch(can_run_tbo=False):
    return types.SimpleNamespace(residual_stream=None, can_run_tbo=can_run_tbo, hidden_states=None)


@pytest.fixture()
def recorded_layers(monkeypatch) -> list:
    """The expert-distribution recorder both upstream loops enter per layer, recording ids."""
    entered: list[int] = []
    recorder = types.SimpleNamespace(
        with_current_layer=lambda i: entered.append(i) or contextlib.nullcontext())
    for module in (qwen2_moe, qwen3_moe):
        monkeypatch.setattr(module, "get_global_expert_distribution_recorder", lambda: recorder)
    return entered


def _inputs(seed=0):
    x = torch.randn(TOKENS, H, generator=torch.Generator().manual_seed(seed))
    embeds = torch.randn(TOKENS, K * H, generator=torch.Generator().manual_seed(seed + 1))
    return x, embeds


@pytest.mark.parametrize("with_deepstack", [True, False], ids=["deepstack", "none"])
def test_deepstack_runs_in_the_models_own_layer_loop(recorded_layers, with_deepstack) -> None:
    """issue 7 item 1: a forward with deepstack goes through Qwen2MoeModel.forward's own loop:
    the same expert-recorder entries and the same EAGLE3/DFlash capture argument
    (``captured_last_layer_outputs``) as a forward without it, and slice k added after layer
    k; ``None`` adds nothing."""
    x, embeds = _inputs()
    layers = _layers()
    layers[1]._is_layer_to_capture = True
    embeds = embeds if with_deepstack else None
    out, aux = qwen2_moe.Qwen2MoeModel.forward(
        _stack(layers, _hook()), None, None, _batch(), input_embeds=x.clone(),
        input_deepstack_embeds=embeds)
    assert recorded_layers == [0, 1, 2, 3]
    captured = [layer.calls[0]["captured_last_layer_outputs"] for layer in layers]
    assert isinstance(captured[1], AuxHiddenStateList) and captured[1] is aux and len(aux) == 1
    assert [c for i, c in enumerate(captured) if i != 1] == [None] * 3
    torch.testing.assert_close(out, _reference(x, layers, embeds), rtol=0, atol=1e-6)
    if not with_deepstack:  # None: no step adds or passes anything
        assert all(layer.calls[0]["post_residual_addition"] is None for layer in layers)
        assert _hook().layer_kwargs(0, None) == {} and _hook().final_norm_kwargs(None) == {}


@pytest.mark.parametrize("intervals", [[(0, 4)], [(0, 1), (1, 2), (2, 3), (3, 4)], [(0, 2), (2, 4)]],
                         ids=["one_call", "per_layer", "halves"])
def test_split_prefill_uses_the_same_steps(recorded_layers, intervals) -> None:
    """issue 7 item 1: split prefill (Qwen3MoeForCausalLM.forward_split_prefill) runs its own
    upstream loop with the hook's steps: every layer entered in the expert recorder once,
    every slice added once across intervals, the result equal to the one-shot reference."""
    x, embeds = _inputs(seed=3)
    layers = _layers()
    holder = types.SimpleNamespace(model=_stack(layers, _hook()), is_mrope_enabled=False, lm_head=None,
                                   logits_processor=lambda ids, h, head, fb: h)
    fb = _batch()
    out = None
    for interval in intervals:
        out = qwen3_moe.Qwen3MoeForCausalLM.forward_split_prefill(
            holder, None, None, fb, interval, input_embeds=x.clone(), input_deepstack_embeds=embeds)
    assert recorded_layers == [0, 1, 2, 3]
    torch.testing.assert_close(out, _reference(x, layers, embeds), rtol=0, atol=1e-6)


def _run_pipeline(x, layers, embeds, partition, monkeypatch):
    """Run the stages of `partition` (layers per stage) through the real Qwen2MoeModel.forward."""
    from sglang.srt.distributed.utils import get_pp_indices

    monkeypatch.setenv("SGLANG_PP_LAYER_PARTITION", ",".join(map(str, partition)))
    pp = len(partition)
    added = []
    orig_add = residual_batch.add_to_output
    monkeypatch.setattr(residual_batch, "add_to_output",
                        lambda hs, fb, extra: added.append(extra) or orig_add(hs, fb, extra))
    proxy, out = None, None
    for rank in range(pp):
        start, end = get_pp_indices(len(layers), rank, pp) if pp > 1 else (0, len(layers))
        first, last = rank == 0, rank == pp - 1
        hook = ds.DeepStack(K, H, start, end, len(layers), is_last_stage=last)
        stack = _stack(layers, hook, start, end, first=first, last=last)
        if any(start <= j < end for j in range(K)) and not first:
            assert hook.from_pp(proxy) is not None, f"stage {rank} owns a slice but did not get the tensor"
        out = qwen2_moe.Qwen2MoeModel.forward(
            stack, None, None, _batch(), input_embeds=x.clone() if first else None,
            pp_proxy_tensors=proxy, input_deepstack_embeds=embeds if first else None)
        if not last:
            assert isinstance(out, PPProxyTensors)
            assert (ds.PP_PROXY_KEY in out.tensors) == hook.forwards_to_next_stage
            proxy = out
    return out, added


@pytest.mark.parametrize("partition", [(4,), (1, 3), (2, 2), (3, 1), (1, 1, 2), (1, 1, 1, 1)],
                         ids=lambda p: "x".join(map(str, p)))
def test_pp_split_adds_each_slice_once_on_its_owner(partition, monkeypatch, recorded_layers) -> None:
    x, embeds = _inputs(seed=5)
    layers = _layers()
    out, added = _run_pipeline(x, layers, embeds, partition, monkeypatch)
    assert len(added) == K  # each slice exactly once, whatever the split
    torch.testing.assert_close(out, _reference(x, layers, embeds), rtol=0, atol=1e-6)


def test_first_stage_shorter_than_k_forwards_the_tensor() -> None:
    first = _hook(start=0, end=1, last=False)
    assert list(first.slices) == [0] and first.forwards_to_next_stage
    proxy = first.to_pp(PPProxyTensors({"hidden_states": torch.zeros(2, 8)}), torch.ones(2, 24))
    second = _hook(start=1, end=4, last=True)
    assert list(second.slices) == [1, 2]
    assert torch.equal(second.from_pp(proxy), torch.ones(2, 24))
    # a stage past layer K does not forward it further, and None is never forwarded
    assert not _hook(start=0, end=3, last=False).forwards_to_next_stage
    assert "input_deepstack_embeds" not in first.to_pp(PPProxyTensors({}), None).tensors


def test_hf_order_matches_hf_semantics(monkeypatch, recorded_layers) -> None:
    """HF order: slice k goes into layer k+1's input (post_residual_addition) and the last one
    into the final norm; the model's loop must pass exactly those slices."""
    k = 2
    hook = _hook(k=k, layers=2, hf_order=True)
    embeds = torch.arange(TOKENS * k * H, dtype=torch.float32).reshape(TOKENS, k * H)
    layers = _layers(2)
    norm_kwargs = {}
    orig_final = residual_batch.final_norm
    monkeypatch.setattr(residual_batch, "final_norm",
                        lambda *a, **kw: norm_kwargs.update(kw) or orig_final(*a, **kw))
    qwen2_moe.Qwen2MoeModel.forward(_stack(layers, hook), None, None, _batch(),
                                    input_embeds=torch.zeros(TOKENS, H), input_deepstack_embeds=embeds)
    assert layers[0].calls[0]["post_residual_addition"] is None
    assert torch.equal(layers[1].calls[0]["post_residual_addition"], embeds[:, :H])
    assert torch.equal(norm_kwargs["post_residual_addition"], embeds[:, H:])


# ---- two-batch overlap --------------------------------------------------------------------
@pytest.mark.parametrize("k,mrope,allowed", [(0, False, True), (K, True, False), (0, True, False)],
                         ids=["text", "vl_deepstack", "mrope_without_deepstack"])
def test_two_batch_overlap_only_for_stacks_it_can_split(monkeypatch, recorded_layers, k, mrope, allowed) -> None:
    """issue 7 item 2: TBO slices positions on dim 0 and has no deepstack step, so a stack with
    M-RoPE positions or deepstack never takes the overlapped schedule, for any batch (a
    property of the model, identical on every DP rank, not a per-batch fallback); a text
    stack keeps it."""
    overlapped = []
    monkeypatch.setattr(qwen2_moe, "model_forward_stages",
                        lambda **kw: overlapped.append(kw) or kw["hidden_states"])
    hook = _hook(k=k, mrope=mrope)
    assert hook.allows_two_batch_overlap is allowed
    x = torch.randn(TOKENS, H)
    qwen2_moe.Qwen2MoeModel.forward(_stack(_layers(), hook), None, None, _batch(can_run_tbo=True),
                                    input_embeds=x)
    assert bool(overlapped) is allowed
    assert recorded_layers == ([] if allowed else [0, 1, 2, 3])


def test_allows_two_batch_overlap_from_configs() -> None:
    """issue 7 item 2: what the stack decides from the configs of Qwen3-VL-MoE (K=3), a VL
    checkpoint without deepstack (M-RoPE only, like InternS1Pro without deepstack), the
    language side's text config (K attached, M-RoPE) and a text-only Qwen3-MoE."""
    from transformers import Qwen3MoeConfig

    from sglang.srt.models.qwen3_vl_moe_language import text_config_for_language_model
    from tiny_configs import vl_config

    def decides(config) -> bool:
        return ds.DeepStack.from_config(config, 0, config.num_hidden_layers).allows_two_batch_overlap

    assert not decides(vl_config((0, 1, 2)).text_config)  # VL class: K attached by its __init__
    assert not decides(text_config_for_language_model(vl_config((0, 1, 2))))
    assert not decides(text_config_for_language_model(vl_config(())))
    assert decides(Qwen3MoeConfig(hidden_size=8, num_hidden_layers=2))
