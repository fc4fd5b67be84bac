"""Admission under two small bounds at once: the encode server's in-flight payload bound
(``max_inflight_payload_bytes`` in ``--disaggregation-mm-transfer-config``) and a language pool
of two blocks. Requests over either wait (in the encoder's queue before the vision tower, or
for language blocks after the encoder's announcement) and succeed, none waiting for a timeout;
a request that can never fit fails at once with a clear 400 on both sides. Real router, real
servers, tiny K=3 checkpoint, fp32; every answer equals Hugging Face fp32 (ids and per-token
logprobs within 1e-3); every block is free on both servers afterwards.
"""

from __future__ import annotations

import json
import os
import threading
import uuid

import pytest
from el_serving import (
    LOGPROB_TOLERANCE,
    assert_blocks_free,
    custom_deployment,
    hf_reference,
)
from epd_testbed.cases import MAX_NEW_TOKENS, Case
from epd_testbed.hf_reference import _tok_and_proc, render_prompt
from epd_testbed.servers import RequestError, encode_language_metrics
from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint

pytestmark = pytest.mark.server

QUESTION = "What is in this image?"
# Distinct 64x64 images (same token count): the first blocks the bound, the others are held.
SMALL = tuple(
    Case(f"small_{seed}", QUESTION, ((64, 64, seed),)) for seed in range(31, 35)
)
TOO_LARGE = Case("too_large", QUESTION, ((200, 120, 36),))


@pytest.fixture(scope="module")
def vl_model() -> str:
    return str(ensure_checkpoint(TinyVLMoeSpec()))


def payload_bytes(model_path: str, case: Case) -> int:
    """Bytes of the payload the encoder holds for ``case``, computed here from the HF
    processor's ids and the config: int64 ids, int64 [3, T] M-RoPE positions, a bool mask, and
    fp32 rows of width (1 + K) * hidden for the image tokens."""
    from PIL import Image

    tokenizer, processor = _tok_and_proc(model_path)
    prompt, paths = render_prompt(model_path, case.messages())
    images = [Image.open(p).convert("RGB") for p in paths]
    ids = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"][0]
    rows = int((ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    with open(os.path.join(model_path, "config.json")) as f:
        config = json.load(f)
    deepstack = len(config["vision_config"]["deepstack_visual_indexes"])
    hidden = config["text_config"]["hidden_size"]
    return len(ids) * (8 + 3 * 8 + 1) + rows * (1 + deepstack) * hidden * 4


@pytest.fixture(scope="module")
def bound(vl_model) -> int:
    """One small request's payload fits the bound, two do not; TOO_LARGE never fits."""
    small = payload_bytes(vl_model, SMALL[0])
    assert all(payload_bytes(vl_model, case) == small for case in SMALL)
    value = small + small // 2
    assert payload_bytes(vl_model, TOO_LARGE) > value
    return value


@pytest.fixture()
def deployment(server_pool, vl_model, bound):
    transfer_config = json.dumps(
        {"fence_timeout_s": 5, "max_inflight_payload_bytes": bound}
    )
    router, encoder, language = custom_deployment(
        server_pool,
        vl_model,
        "el-bound",
        # a pool of two blocks: two small requests reserved at once, the rest queued
        ("--disaggregation-mm-num-blocks", "2"),
        encode_args=("--disaggregation-mm-transfer-config", transfer_config),
    )
    yield router, encoder, language
    assert_blocks_free(encoder, language)


def _body(model_path: str, case: Case) -> dict:
    """The case's request in a prefix-cache namespace of its own (``extra_key``): a repeat of
    a case the language side has cached would be fully held (``all_held``: no block, no
    round), and this test is about requests that transfer."""
    prompt, image_paths = render_prompt(model_path, case.messages())
    return {
        "text": prompt,
        "image_data": image_paths,
        "extra_key": uuid.uuid4().hex,
        "return_logprob": True,
        "sampling_params": {
            "temperature": 0.0,
            "max_new_tokens": MAX_NEW_TOKENS,
            "ignore_eos": True,
        },
    }


def _post_in_thread(server, body: dict) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        try:
            result["out"] = server.post("/generate", body, timeout=300)
        except RequestError as e:
            result["error"] = str(e)

    worker = threading.Thread(target=run)
    worker.start()
    return worker, result


def _held(encoder) -> float:
    return encode_language_metrics(encoder).get("held", 0)


def test_cross_bound_small_payload_bound_and_small_pool(deployment, vl_model) -> None:
    """issue 16 item 1, test (b): eight image requests at once through the router, against a
    payload bound of one request and a language pool of two blocks. Both bounds are reached
    (the encoder holds requests back before the vision tower) and every request completes,
    equal to HF, none failed on either server: none waited for a timeout. Before the fix the
    encoder ran the vision tower of a request whose language half was still waiting for blocks
    held by another request's reservation, whose vision tower the payload bound held back:
    nothing moved until the encoder's 30 s bootstrap timeout failed the first (HTTP 504
    "bootstrap timeout: 0/1 destinations reserved within 30.0s")."""
    router, encoder, language = deployment
    cases = SMALL + SMALL
    references = {case.name: hf_reference(vl_model, case) for case in SMALL}
    before = [encode_language_metrics(s) for s in (encoder, language)]
    requests = [_post_in_thread(router, _body(vl_model, case)) for case in cases]
    for worker, _ in requests:
        worker.join(timeout=300)
        assert not worker.is_alive()
    for case, (_, result) in zip(cases, requests):
        assert "out" in result, (case.name, result)
        expected_tokens, expected_logprobs = references[case.name]
        out = result["out"]
        assert out["output_ids"] == expected_tokens, case.name
        got = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE), case.name
    after = [encode_language_metrics(s) for s in (encoder, language)]
    for b, a in zip(before, after):
        assert a.get("requests.failed", 0) == b.get("requests.failed", 0)
        assert a.get("requests.success", 0) - b.get("requests.success", 0) == len(cases)
    assert after[0].get("held", 0) > before[0].get("held", 0)  # the bound was reached


def test_request_larger_than_the_bound_fails_clearly(deployment, vl_model) -> None:
    """A request whose payload alone exceeds the bound can never be admitted: the router's
    client gets HTTP 400 naming the bound (not a hang), and the next request succeeds.
    """
    router, encoder, _ = deployment
    failed_before = encode_language_metrics(encoder).get("requests.failed", 0)
    with pytest.raises(RequestError, match=r"HTTP 400") as err:
        router.post("/generate", _body(vl_model, TOO_LARGE), timeout=120)
    assert "too large for this encode server" in str(err.value)
    assert "max_inflight_payload_bytes" in str(err.value)
    failed = encode_language_metrics(encoder).get("requests.failed", 0)
    assert failed - failed_before == 1
    case = SMALL[1]
    expected_tokens, _ = hf_reference(vl_model, case)
    assert router.post("/generate", _body(vl_model, case))["output_ids"] == (
        expected_tokens
    )
