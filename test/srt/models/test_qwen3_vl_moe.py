"""Colocated Qwen3-VL-MoE on the composed fork: real server, fp32 greedy, token for token vs HF.

Checkpoint matrix (one server each; K = len(deepstack_visual_indexes)):
  * default: K=3, indexes (0, 1, 2), 4 text layers;
  * K=2, non-contiguous indexes (0, 2) (``DEEPSTACK_K2_NONCONTIG``): fewer slices than upstream's
    former hard-coded three (the foundation's expected failure, now
    test_colocated_deepstack_k_matches_hf[k2_noncontig-*]).
K=4 on a text model shallower than K+1 layers (``DEEPSTACK_K4_NONCONTIG_SHALLOW``) is served by
the encode/language deployment (test_serving_coverage.py) and checked against HF at the model
level (test_qwen3_vl_moe_language_side.py): the same deepstack hook as the VL class's.
"""
from __future__ import annotations

import pytest

from epd_testbed.cases import VL_CASES, check_greedy_equal
from epd_testbed.servers import colocated_spec
from epd_testbed.tiny_ckpt import DEEPSTACK_K2_NONCONTIG, TinyVLMoeSpec, ensure_checkpoint

pytestmark = pytest.mark.server

DEEPSTACK_SPECS = {"k2_noncontig": DEEPSTACK_K2_NONCONTIG}


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
