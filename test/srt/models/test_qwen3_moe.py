"""Text-only Qwen3-MoE on the composed fork: real server, fp32 greedy, token for token vs HF."""
from __future__ import annotations

import pytest

from epd_testbed.cases import TEXT_CASES, check_greedy_equal
from epd_testbed.servers import colocated_spec
from epd_testbed.tiny_ckpt import TinyTextMoeSpec, ensure_checkpoint

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def text_model() -> str:
    return str(ensure_checkpoint(TinyTextMoeSpec()))


@pytest.mark.parametrize("case", TEXT_CASES, ids=lambda c: c.name)
def test_text_moe_matches_hf(servers, text_model, case) -> None:
    server = servers.get(colocated_spec(text_model, name="text-moe"))
    check_greedy_equal(server, text_model, case)
