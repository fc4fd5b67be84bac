"""The heart of the disaggregated design, checked without the transport: for the same prompts,
``Qwen3MoeForCausalLM`` loaded from the Qwen3-VL-MoE checkpoint and fed ``input_embeds`` +
``input_deepstack_embeds`` + M-RoPE positions produced by the encode-only construction of the VL
class gives the same greedy tokens as the colocated VL class (a real server), and logits within
1e-4 of Hugging Face's (fp32) at every step.

What is compared, exactly:
  * tokens: language side (``epd_testbed.lm_harness``, a real ModelRunner driven like
    ``sglang.benchmark.one_batch``) == Hugging Face ``generate`` (16 tokens, greedy, eos
    ignored), and for K=3 == the colocated ``Qwen3VLMoeForConditionalGeneration`` server's
    ``/generate`` too;
  * logits: the language side's full-vocabulary next-token logits of all 16 steps vs HF's
    (``output_logits``), max |diff| <= 1e-4. The colocated server exposes no raw logits; for
    K=3 it equals HF token for token (test_qwen3_vl_moe.py), so HF stands in for it there;
  * split prefill: the same prefill through ``ModelRunner.forward_split_prefill`` one layer per
    call gives the same first-step logits (within 1e-4) as the plain prefill;
  * the encode-only construction's rows for an image and a video equal Hugging Face's vision
    tower output for the same pixels;
  * InternS1Pro's and Qwen3-Omni's text stacks (built on upstream's former ``Qwen3MoeLLMModel``,
    now ``Qwen3MoeModel``) construct, load and run the image prefill with deepstack.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from epd_testbed.cases import MAX_NEW_TOKENS, VL_CASES
from epd_testbed.hf_reference import hf_greedy_logits, render_prompt
from epd_testbed.servers import BASE_ENV, colocated_spec, generate
from epd_testbed.tiny_ckpt import DEEPSTACK_K4_NONCONTIG_SHALLOW, TinyVLMoeSpec, ensure_checkpoint

pytestmark = pytest.mark.server

LOGIT_TOL = 1e-4


# default: K=3 (0, 1, 2), compared with the colocated server too (it is up from
# test_qwen3_vl_moe.py); k4: K=4 non-contiguous (0, 2, 3, 5) on a 4-layer text model (a slice
# after the last layer), compared with HF (served by the encode/language deployment of
# test_serving_coverage.py; no colocated server of it, to keep the suite short).
SPECS = {
    "k3": TinyVLMoeSpec(),
    "k4_noncontig_shallow": DEEPSTACK_K4_NONCONTIG_SHALLOW,
}


@pytest.fixture(scope="module", params=list(SPECS))
def spec_name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def vl_model(spec_name) -> str:
    return str(ensure_checkpoint(SPECS[spec_name]))


@pytest.fixture(scope="module")
def language_side(vl_model, spec_name, tmp_path_factory) -> dict:
    import torch

    out = tmp_path_factory.mktemp("lm") / f"language_side-{spec_name}.pt"
    log = tmp_path_factory.getbasetemp() / f"lm_harness-{spec_name}.log"
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "epd_testbed.lm_harness", vl_model, str(out)],
                            stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, **BASE_ENV),
                            timeout=600).returncode
    assert rc == 0, Path(log).read_text()[-6000:]
    return torch.load(out)


@pytest.mark.parametrize("case", VL_CASES, ids=lambda c: c.name)
def test_language_side_equals_colocated_and_hf(servers, spec_name, vl_model, language_side, case) -> None:
    got = language_side[case.name]
    assert got["num_deepstack"] == len(SPECS[spec_name].deepstack_visual_indexes)
    assert (got["num_image_rows"] > 0) == bool(case.images)

    hf_tokens, hf_logits = hf_greedy_logits(vl_model, case.messages(), MAX_NEW_TOKENS)
    if spec_name == "k3":
        server = servers.get(colocated_spec(vl_model))
        prompt, image_paths = render_prompt(vl_model, case.messages())
        colocated = generate(server, prompt, image_paths, MAX_NEW_TOKENS, ignore_eos=True)["output_ids"]
        assert got["tokens"] == colocated, f"{case.name}: language side {got['tokens']} != colocated {colocated}"
    assert got["tokens"] == hf_tokens
    assert len(set(hf_tokens)) > 1
    diff = (got["logits"] - hf_logits).abs().max().item()
    assert diff <= LOGIT_TOL, f"{case.name}: max |logit diff| vs HF {diff:.2e} > {LOGIT_TOL}"
    # split prefill (one layer per call) honours deepstack too: same first-step logits
    split = (got["split_prefill_logits"] - got["logits"][0]).abs().max().item()
    assert split <= LOGIT_TOL, f"{case.name}: split prefill differs by {split:.2e}"
    if case.images:  # control: deepstack matters, so the comparisons above are not vacuous
        assert (got["logits_without_deepstack"] - got["logits"][0]).abs().max().item() > 1e-2


def test_language_side_loads_no_vision_weights(vl_model, language_side) -> None:
    """Only the LLM is loaded; every vision tensor of the checkpoint is skipped and counted."""
    from safetensors import safe_open

    vision = [0, 0]
    for f in Path(vl_model).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as g:
            for k in g.keys():
                if k.startswith("model.visual."):
                    shape = g.get_slice(k).get_shape()
                    n = 1
                    for d in shape:
                        n *= d
                    vision[0] += 1
                    vision[1] += n
    meta = language_side["__meta__"]
    skipped = meta["vision_weights_skipped"]
    assert (skipped["tensors"], skipped["parameters"]) == tuple(vision)
    assert skipped["bytes"] == 4 * vision[1]  # fp32
    # issue 7 item 5: the shared loader plants no encoder_only / language_only on the text config
    assert meta["language_config_flags"] == []


def test_encode_side_holds_the_vision_tower_only(language_side) -> None:
    """issue 7 item 6: the encode-only construction loads no token embeddings (the language
    side embeds text itself): only ``visual.*`` parameters exist."""
    meta = language_side["__meta__"]
    assert meta["encoder_modules"] == ["visual"]
    assert meta["encoder_non_vision_params"] == []


ENCODE_TOL = 1e-5


@pytest.mark.parametrize("kind", ["image", "video"])
def test_encode_only_matches_hf_vision_tower(language_side, spec_name, kind) -> None:
    """issue 7 item 6: the encode side runs upstream's own get_image_feature /
    get_video_feature and separate_deepstack_embeds, so an image and a video give Hugging
    Face's merged rows and deepstack features (fp32), at the placeholder positions."""
    got = language_side["__encode__"][kind]
    k = len(SPECS[spec_name].deepstack_visual_indexes)
    assert got["deepstack"].shape == (got["mm_embeds"].shape[0], k * got["mm_embeds"].shape[1])
    assert got["mm_embeds"].shape == got["hf_mm_embeds"].shape and got["mm_embeds"].shape[0] > 0
    assert (got["mm_embeds"] - got["hf_mm_embeds"]).abs().max().item() <= ENCODE_TOL
    assert (got["deepstack"] - got["hf_deepstack"]).abs().max().item() <= ENCODE_TOL
    assert got["mm_positions"].tolist() == got["placeholder_positions"].tolist()


STACK_CLASSES = {"interns1pro": "sglang.srt.models.interns1pro.InternS1ProTextModel",
                 # the alias of the removed Qwen3MoeLLMModel that qwen3_omni_moe imports
                 "qwen3_omni_moe": "sglang.srt.models.qwen3_moe.Qwen3MoeModel"}


@pytest.mark.parametrize("stack", list(STACK_CLASSES))
def test_text_stacks_of_models_that_used_qwen3_moe_llm_model(language_side, stack) -> None:
    """issue 7 item 2 (alias coverage): InternS1Pro's text stack (InternS1ProTextModel) and
    Qwen3-Omni's (qwen3_omni_moe.Qwen3MoeLLMModel) construct on the checkpoint's text config,
    load through the language-side loader and run the image prefill with deepstack and M-RoPE
    positions, giving Qwen3MoeModel's tokens and logits (same weights, same math)."""
    got = language_side["__text_stacks__"][stack]
    reference = language_side["one_image"]
    assert got["class"] == STACK_CLASSES[stack]
    assert got["num_image_rows"] > 0
    assert got["tokens"] == reference["tokens"][:2]
    assert (got["logits"] - reference["logits"][:2]).abs().max().item() <= 1e-5
