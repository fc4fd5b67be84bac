"""Colocated Qwen3-VL-MoE on the composed fork: real server, fp32 greedy, token for token vs HF.

Checkpoint matrix (one server each; K = len(deepstack_visual_indexes)):
  * default: K=3, indexes (0, 1, 2), 4 text layers;
  * K=2, indexes (0, 1): fewer slices than upstream's former hard-coded three (the foundation's
    expected failure, now test_colocated_deepstack_k_matches_hf[k2-*]);
  * K=4, non-contiguous indexes (0, 2, 3, 5) of a 6-block ViT, with a 4-layer text model,
    i.e. shallower than K+1 layers: a slice is added after the last decoder layer too.
"""
from __future__ import annotations

import pytest

from epd_testbed.cases import VL_CASES, check_greedy_equal
from epd_testbed.servers import colocated_spec
from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint

pytestmark = pytest.mark.server

DEEPSTACK_SPECS = {
    "k2": TinyVLMoeSpec(deepstack_visual_indexes=(0, 1)),
    "k4_noncontig_shallow": TinyVLMoeSpec(deepstack_visual_indexes=(0, 2, 3, 5), vision_depth=6, text_layers=4),
}


@pytest.fixture(scope="module")
def vl_model() -> str:
    return str(ensure_checkpoint(TinyVLMoeSpec()))


@pytest.mark.parametrize("case", VL_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("spec_name", list(DEEPSTACK_SPECS))
def test_colocated_deepstack_k_matches_hf(servers, spec_name, case) -> None:
    model = str(ensure_checkpoint(DEEPSTACK_SPECS[spec_name]))
    server = servers.get(colocated_spec(model, name=f"colocated-{spec_name}"))
    check_greedy_equal(server, model, case)


# Last, so the default server stays up for test_qwen3_vl_moe_language_side.py.
@pytest.mark.parametrize("case", VL_CASES, ids=lambda c: c.name)
def test_colocated_matches_hf(servers, vl_model, case) -> None:
    server = servers.get(colocated_spec(vl_model))
    check_greedy_equal(server, vl_model, case)
