"""Upstream 0.5.23's own encoder disaggregation (`--encoder-only` + `--language-only
--encoder-urls`, zmq_to_scheduler): the side-by-side baseline, equal to HF on the same cases."""
from __future__ import annotations

import pytest

from epd_testbed.cases import VL_CASES, check_greedy_equal
from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def vl_model() -> str:
    return str(ensure_checkpoint(TinyVLMoeSpec()))


@pytest.mark.parametrize("case", VL_CASES, ids=lambda c: c.name)
def test_upstream_epd_matches_hf(servers, vl_model, case) -> None:
    encoder, language = servers.upstream_epd(vl_model)
    check_greedy_equal(language, vl_model, case)
    assert encoder.alive()
