"""The encode server's in-flight payload bound (``max_inflight_payload_bytes`` in
``--disaggregation-mm-transfer-config``): requests over it wait in the encoder's queue before
the vision tower until in-flight bytes drop, and succeed; a request that can never fit fails
at once with a clear 400 on both sides. Real router, real servers, tiny K=3 checkpoint, fp32;
every answer equals Hugging Face fp32 (ids and per-token logprobs within 1e-3); every block is
free on both servers afterwards.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time

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
        (),
        encode_args=("--disaggregation-mm-transfer-config", transfer_config),
    )
    yield router, encoder, language
    assert_blocks_free(encoder, language)


def _body(model_path: str, case: Case) -> dict:
    prompt, image_paths = render_prompt(model_path, case.messages())
    return {
        "text": prompt,
        "image_data": image_paths,
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


def _wait_until(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        time.sleep(0.2)
    assert predicate(), f"timed out waiting until {what}"


def _held(encoder) -> float:
    return encode_language_metrics(encoder).get("held", 0)


def test_requests_over_the_payload_bound_wait_and_succeed(deployment, vl_model) -> None:
    """Request A goes to the encode server alone, so its payload stays in flight (no language
    side has reserved for its room yet) and fills the bound. Three more image requests through
    the router are then held back before the vision tower (the encoder counts three held
    requests and logs why). Once A's language half arrives, A completes, the held requests are
    admitted one at a time as bytes drop, and all four answers equal HF."""
    router, encoder, language = deployment
    a_case, *held_cases = SMALL
    references = {case.name: hf_reference(vl_model, case) for case in SMALL}
    held_before = _held(encoder)
    log_start = encoder.log_path.stat().st_size

    a_body = _body(vl_model, a_case) | {
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": _bootstrap_port(encoder),
        "bootstrap_room": random.getrandbits(62),
    }
    a_encode, a_encode_result = _post_in_thread(encoder, a_body)
    _wait_until(
        lambda: "one vision-tower call" in _log_since(encoder, log_start),
        "request A's payload was encoded and handed over",
    )
    others = [_post_in_thread(router, _body(vl_model, case)) for case in held_cases]
    _wait_until(
        lambda: _held(encoder) - held_before == len(held_cases),
        "the encoder held back the other requests",
    )
    assert "held back before the vision tower" in _log_since(encoder, log_start)
    assert all(worker.is_alive() for worker, _ in others)  # still waiting, not failed

    a_language, a_language_result = _post_in_thread(language, a_body)
    for worker, _ in [(a_encode, None), (a_language, None), *others]:
        worker.join(timeout=300)
        assert not worker.is_alive()
    assert "out" in a_encode_result, a_encode_result
    results = [a_language_result] + [result for _, result in others]
    for case, result in zip(SMALL, results):
        assert "out" in result, (case.name, result)
        expected_tokens, expected_logprobs = references[case.name]
        out = result["out"]
        assert out["output_ids"] == expected_tokens, case.name
        got = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE), case.name
    assert _held(encoder) - held_before == len(held_cases)  # each counted once


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


def _bootstrap_port(encoder) -> int:
    args = encoder.spec.args
    return int(args[args.index("--disaggregation-bootstrap-port") + 1])


def _log_since(server, offset: int) -> str:
    with open(server.log_path, errors="replace") as log:
        log.seek(offset)
        return log.read()
