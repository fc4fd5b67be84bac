"""Text-only Qwen3-MoE on the composed fork: real server, fp32 greedy, token for token vs HF and
vs unpatched upstream 0.5.23 (the shared environment without the overlay: the deepstack hook must
not change text-only serving)."""
from __future__ import annotations

import dataclasses
import subprocess

import pytest

from epd_testbed.cases import TEXT_CASES, check_greedy_equal
from epd_testbed.hf_reference import render_prompt
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


@pytest.mark.parametrize("spec", [TinyTextMoeSpec(), YARN], ids=["default", "yarn"])
def test_text_moe_matches_unpatched_upstream(servers, spec) -> None:
    """Same tokens and the same sampled-token logprobs as sglang 0.5.23 without the patch series,
    also for a YaRN checkpoint (rope scaling that is not M-RoPE must keep 1-D positions)."""
    text_model = str(ensure_checkpoint(spec))
    name = "text-moe" if spec == TinyTextMoeSpec() else "text-moe-yarn"
    up_spec = dataclasses.replace(colocated_spec(text_model, name=f"{name}-upstream"), python=pristine_python())
    # The baseline really is the unpatched package: sglang resolves outside the overlay.
    origin = subprocess.run([up_spec.python, "-c", "import importlib.util as u; print(u.find_spec('sglang').origin)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert ".fork/overlay" not in origin and "site-packages/sglang/" in origin, origin

    def run(server) -> dict:
        out = {}
        for case in TEXT_CASES:
            prompt, _ = render_prompt(text_model, case.messages())
            payload = {"text": prompt, "return_logprob": True, "top_logprobs_num": 5,
                       "sampling_params": {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}}
            r = server.post("/generate", payload)
            out[case.name] = (r["output_ids"], [t[0] for t in r["meta_info"]["output_token_logprobs"]])
        return out

    # One server at a time is enough (and EPD_MAX_LIVE_SERVERS=1 may stop the first).
    fork = run(servers.get(colocated_spec(text_model, name=name)))
    upstream = run(servers.get(up_spec))
    for name, (ids, logprobs) in fork.items():
        assert ids == upstream[name][0], name
        assert logprobs == pytest.approx(upstream[name][1], abs=1e-5), name
