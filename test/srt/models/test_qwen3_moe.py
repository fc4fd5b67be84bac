"""Text-only Qwen3-MoE on the composed fork: real server, fp32 greedy, token for token vs HF and
vs unpatched upstream 0.5.23 (the shared environment without the overlay: the deepstack hook must
not change text-only serving)."""
from __future__ import annotations

import dataclasses
import subprocess

import pytest
import torch

from epd_testbed.cases import MAX_NEW_TOKENS, TEXT_CASES, check_greedy_equal
from epd_testbed.hf_reference import hf_greedy_logits, render_prompt
from epd_testbed.servers import colocated_spec, pristine_python
from epd_testbed.tiny_ckpt import TinyTextMoeSpec, ensure_checkpoint

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def text_model() -> str:
    return str(ensure_checkpoint(TinyTextMoeSpec()))


@pytest.mark.parametrize("case", TEXT_CASES, ids=lambda c: c.name)
def test_text_moe_matches_hf(servers, text_model, case) -> None:
    server = servers.get(colocated_spec(text_model, name="text-moe"))
    check_greedy_equal(server, text_model, case)


YARN = TinyTextMoeSpec(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048})
# |fork - HF| per-token logprob bound (fp32; the served tests' bound too)
LOGPROB_TOLERANCE = 1e-3


def _greedy_with_logprobs(server, model_path: str, case) -> tuple[list[int], list[float]]:
    prompt, _ = render_prompt(model_path, case.messages())
    payload = {"text": prompt, "return_logprob": True, "top_logprobs_num": 5,
               "sampling_params": {"temperature": 0.0, "max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True}}
    r = server.post("/generate", payload)
    return r["output_ids"], [t[0] for t in r["meta_info"]["output_token_logprobs"]]


def test_text_moe_matches_unpatched_upstream(servers, text_model) -> None:
    """Same tokens and the same sampled-token logprobs (1e-5) as sglang 0.5.23 without the
    patch series: the deepstack hook leaves text-only serving as it was."""
    up_spec = dataclasses.replace(colocated_spec(text_model, name="text-moe-upstream"), python=pristine_python())
    # The baseline really is the unpatched package: sglang resolves outside the overlay.
    origin = subprocess.run([up_spec.python, "-c", "import importlib.util as u; print(u.find_spec('sglang').origin)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert ".fork/overlay" not in origin and "site-packages/sglang/" in origin, origin

    # One server at a time is enough (and EPD_MAX_LIVE_SERVERS=1 may stop the first).
    fork_server = servers.get(colocated_spec(text_model, name="text-moe"))
    fork = {case.name: _greedy_with_logprobs(fork_server, text_model, case) for case in TEXT_CASES}
    up_server = servers.get(up_spec)
    upstream = {case.name: _greedy_with_logprobs(up_server, text_model, case) for case in TEXT_CASES}
    for name, (ids, logprobs) in fork.items():
        assert ids == upstream[name][0], name
        assert logprobs == pytest.approx(upstream[name][1], abs=1e-5), name


@pytest.mark.parametrize("case", TEXT_CASES, ids=lambda c: c.name)
def test_text_moe_yarn_matches_hf(servers, case) -> None:
    """A YaRN checkpoint (rope scaling that is not M-RoPE must keep 1-D positions): the same
    tokens as Hugging Face fp32 and per-token logprobs within 1e-3 (the text-only comparison
    with unpatched upstream is the default checkpoint's, above)."""
    model = str(ensure_checkpoint(YARN))
    ids, logprobs = _greedy_with_logprobs(servers.get(colocated_spec(model, name="text-moe-yarn")), model, case)
    expected, logits = hf_greedy_logits(model, case.messages(), MAX_NEW_TOKENS)
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert ids == expected, case.name
    assert len(set(expected)) > 1, f"{case.name}: degenerate reference {expected}"
    assert logprobs == pytest.approx([float(reference[i, t]) for i, t in enumerate(expected)],
                                     abs=LOGPROB_TOLERANCE), case.name
