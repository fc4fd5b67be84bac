"""A burst of image requests at production defaults (issue 16, item 1, test (a)).

The deployment (``servers.production``: ``epd_testbed.servers.launch_production``) is the one an
operator gets without tuning: 256 blocks of 128 tokens, 2048 reserved tokens, 120 s fence
timeout, default bootstrap and liveness timers; SGLang's own router in PD mode in front of two
encode servers and one language server. The small pools of the other serving tests never hold
more than a handful of requests; here 64 image requests arrive at once and their reservations
(sized from each request's announcement) exceed the 256-block pool. Every one must complete
(queued, never failed for load alone), equal Hugging Face fp32 token for token with per-token
logprobs within 1e-3, and leave every block free on all three servers.

Real components: ``sglang_router.launch_router``, three ``sglang.launch_server`` processes,
Mooncake over TCP loopback, HTTP; the tiny K=3 checkpoint, fp32, greedy.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from el_serving import (
    LOGPROB_TOLERANCE,
    assert_blocks_free,
    generate,
    generate_video,
    hf_reference,
    video_messages,
    video_reference,
)
from epd_testbed.cases import LARGE_CASES, VL_CASES
from epd_testbed.servers import (
    RequestError,
    encode_language_blocks,
    encode_language_metrics,
)
from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint

pytestmark = pytest.mark.server

BURST = 64

# Mixed sizes: the serving tests' cases, a largest single image, several mixed images, and three
# prompts longer than the 2048-token reservation (LARGE_CASES). Ten kinds over 64 requests: about
# 19 reservations of 16 blocks alone (304) exceed the 256-block pool, so requests must queue.
IMAGE_CASES = (*(case for case in VL_CASES if case.images), *LARGE_CASES)
VIDEOS = {
    "video": False,
    "image_and_video": True,
}  # name -> with an image before the clip


@pytest.fixture(scope="module")
def vl_model() -> str:
    return str(ensure_checkpoint(TinyVLMoeSpec()))


@pytest.fixture(scope="module")
def references(vl_model) -> dict[str, tuple[list[int], list[float]]]:
    """HF fp32 (token ids, per-token logprobs) of each distinct request, computed once."""
    refs = {case.name: hf_reference(vl_model, case) for case in IMAGE_CASES}
    for name, with_image in VIDEOS.items():
        refs[name] = video_reference(vl_model, video_messages(with_image))
    return refs


def _outcomes(server) -> tuple[float, float]:
    m = encode_language_metrics(server)
    return m.get("requests.success", 0), m.get("requests.failed", 0)


def _rounds(*encoders) -> float:
    """Transfer rounds of successful requests, counted by the encode servers."""
    return sum(encode_language_metrics(s).get("rounds", 0) for s in encoders)


def test_burst_of_64_image_requests_at_production_defaults(
    servers, vl_model, references
) -> None:
    """issue 16: item 1 (a). 64 concurrent image requests (one image, several images, a video,
    an image and a video; 30 to ~2250 tokens) through the router at production
    defaults: no request fails (none on any server either, so a router retry cannot hide
    one), every answer equals HF, every block is free on all three servers afterwards, the
    large prompts did take more than one round, and the pool was the bound: the language
    side's free blocks (sampled from /metrics during the burst) fell below one full
    reservation, so requests waited for blocks instead of failing."""
    router, encode_a, encode_b, language = servers.production(vl_model)
    # Each request in a prefix-cache namespace of its own (extra_key): a repeat of an earlier
    # prompt would otherwise be fully held on the language side and take no block or round.
    jobs = [
        (
            case.name,
            lambda case=case: generate(
                router, vl_model, case, extra_key=uuid.uuid4().hex
            ),
        )
        for case in IMAGE_CASES
    ] + [
        (
            name,
            lambda w=w: generate_video(
                router, vl_model, video_messages(w), extra_key=uuid.uuid4().hex
            ),
        )
        for name, w in VIDEOS.items()
    ]
    jobs = [jobs[i % len(jobs)] for i in range(BURST)]
    before = {s.spec.name: _outcomes(s) for s in (encode_a, encode_b, language)}
    rounds_before = _rounds(encode_a, encode_b)

    def run(job):
        name, call = job
        start = time.time()
        try:
            return name, call(), None, time.time() - start
        except RequestError as e:
            return name, None, str(e), time.time() - start

    free_seen: list[int] = []
    burst_over = threading.Event()

    def sample_free_blocks() -> None:
        while not burst_over.wait(0.2):
            free_seen.append(encode_language_blocks(language).get("free", -1))

    sampler = threading.Thread(target=sample_free_blocks, daemon=True)
    sampler.start()
    with ThreadPoolExecutor(BURST) as pool:
        results = list(pool.map(run, jobs))
    burst_over.set()
    sampler.join()

    failures = [(name, f"after {s:.1f}s", err) for name, _, err, s in results if err]
    assert not failures, f"{len(failures)} of {BURST} failed: {failures[:4]}"
    for name, out, _, _ in results:
        expected_tokens, expected_logprobs = references[name]
        assert out["output_ids"] == expected_tokens, name
        got = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE), name
    assert_blocks_free(encode_a, encode_b, language)
    after = {s.spec.name: _outcomes(s) for s in (encode_a, encode_b, language)}
    failed = {k: after[k][1] - before[k][1] for k in after}
    assert not any(failed.values()), failed
    assert after[language.spec.name][0] - before[language.spec.name][0] == BURST
    rounds = _rounds(encode_a, encode_b) - rounds_before
    assert rounds > BURST, rounds  # the over-reservation prompts took resume rounds
    # 16 blocks = one 2048-token reservation: a request of that size had to wait for blocks
    assert 0 <= min(free_seen) < 16, sorted(free_seen)[:8]
