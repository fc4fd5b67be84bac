"""Encode/language coverage through the real ``sglang-router`` (PD mode, unchanged): resume
rounds, ``/generate`` streaming, retraction of a multimodal request under a small KV pool, and
checkpoints with K=2 and K=4 deepstack layers. Every answer equals Hugging Face fp32 token for
token with per-token logprobs within 1e-3; after every test all transfer blocks are free on
both servers (free == total, quarantined == 0, read from /metrics).
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from epd_testbed import videos
from epd_testbed.cases import MAX_NEW_TOKENS, Case
from epd_testbed.hf_reference import hf_greedy_logits, render_prompt
from epd_testbed.servers import bootstrap_port, encode_language_metrics, metric_sum
from epd_testbed.tiny_ckpt import (
    DEEPSTACK_K4_NONCONTIG_SHALLOW,
    TinyVLMoeSpec,
    ensure_checkpoint,
)

from el_serving import (
    CASES,
    LOGPROB_TOLERANCE,
    assert_blocks_free,
    custom_deployment,
    encoder_cache_metrics,
    generate_video,
    video_messages,
)

pytestmark = pytest.mark.server


# Three 256x256 images: 64 tokens each, 215 prompt tokens. The shared deployment reserves 64
# tokens per round (epd_testbed.servers.EL_BUFFER_ARGS), so this prompt needs 4 rounds: the
# first and three resume rounds.
FOUR_ROUNDS = Case(
    "four_rounds",
    "Compare the three pictures.",
    ((256, 256, 5), (256, 256, 6), (256, 256, 8)),
)

# Language KV pool of the small deployment. A 45-token prompt (200x120 image; distinct images,
# so the radix cache shares nothing) asking for 48 new tokens is admitted with its whole decode
# reserved (93 tokens), so a second one starts while the first has used < 57 of the 150 tokens;
# running requests (eos not ignored) only reserve a fraction of their remaining decode
# (--schedule-conservativeness 0.01), and two full decodes (186 tokens) overrun the pool: the
# scheduler retracts one of them.
RETRACT_POOL_TOKENS = 150
RETRACT_NEW_TOKENS = 48
VIT_BUDGET_TOKENS = 32
RETRACT_CASES = tuple(
    Case(f"retract_{i}", "Describe the shapes and colors.", ((200, 120, 20 + i),))
    for i in range(3)
)
# Images no earlier test sends: neither cache holds them, so the vision tower runs for each.
BUDGET_CASES = tuple(
    Case(f"budget_{i}", "Describe the shapes and colors.", ((200, 120, 40 + i),))
    for i in range(3)
)


@pytest.fixture(scope="module")
def vl_model() -> str:
    return str(ensure_checkpoint(TinyVLMoeSpec()))


@pytest.fixture()
def deployment(servers, vl_model):
    """The shared K=3 deployment of test_serving.py (same server group)."""
    router, encoder, language = servers.encode_language(vl_model)
    yield router, encoder, language
    assert_blocks_free(encoder, language)


def _hf_reference(
    model_path: str, case: Case, max_new_tokens: int = MAX_NEW_TOKENS
) -> tuple[list[int], list[float]]:
    tokens, logits = hf_greedy_logits(model_path, case.messages(), max_new_tokens)
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return tokens, [float(logprobs[i, t]) for i, t in enumerate(tokens)]


def _payload(
    model_path: str,
    case: Case,
    stream: bool = False,
    max_new_tokens: int = MAX_NEW_TOKENS,
    ignore_eos: bool = True,
) -> dict:
    prompt, image_paths = render_prompt(model_path, case.messages())
    payload = {
        "text": prompt,
        "return_logprob": True,
        "stream": stream,
        "sampling_params": {
            "temperature": 0.0,
            "max_new_tokens": max_new_tokens,
            "ignore_eos": ignore_eos,
        },
    }
    if image_paths:
        payload["image_data"] = image_paths
    return payload


def _assert_matches(out: dict, reference, name: str) -> None:
    expected_tokens, expected_logprobs = reference
    entries = out["meta_info"]["output_token_logprobs"]
    assert out["output_ids"] == expected_tokens, name
    assert [e[1] for e in entries] == expected_tokens, name
    got = [e[0] for e in entries]
    assert got == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE), name
    assert len(set(expected_tokens)) > 1, f"{name}: degenerate reference"


def test_three_resume_rounds(deployment, vl_model) -> None:
    """A 215-token prompt against a 64-token reservation: the encode side sends it in four
    rounds, three of them resume rounds (its rounds counter on /metrics says so), and the
    answer still equals HF."""
    router, encoder, _ = deployment
    reference = _hf_reference(vl_model, FOUR_ROUNDS)
    before = encode_language_metrics(encoder)
    out = router.post("/generate", _payload(vl_model, FOUR_ROUNDS))
    after = encode_language_metrics(encoder)
    _assert_matches(out, reference, FOUR_ROUNDS.name)
    assert out["meta_info"]["prompt_tokens"] == 215
    assert after["requests.success"] - before.get("requests.success", 0) == 1
    assert after["rounds"] - before.get("rounds", 0) == 4, (before, after)


@pytest.mark.parametrize("with_image", [False, True], ids=["video", "image_and_video"])
def test_video_matches_hf(deployment, vl_model, with_image) -> None:
    """A video (and an image + a video in one prompt) through the router. The encode side
    expands the placeholder (timestamp text, one vision span per frame pair), computes the
    per-frame M-RoPE positions, encodes every frame, and sends one item per video with one span
    per frame; the 148+-token prompt needs two resume rounds against the 64-token reservation.
    Token ids and logprobs equal HF fp32 fed the same sampled frames. The language side's
    prefix cache is emptied first: earlier tests sent the same video, which the prefix-aware
    skip would otherwise leave out (test_serving_prefix_skip.py covers that)."""
    router, encoder, language = deployment
    language.flush_cache()
    messages = video_messages(with_image)
    tokens, logprobs, prompt_len = videos.hf_greedy_logprobs(
        vl_model, messages, MAX_NEW_TOKENS
    )
    before = encode_language_metrics(encoder)
    lookups = encoder_cache_metrics(encoder).get("total_files", 0)
    out = generate_video(router, vl_model, messages)
    after = encode_language_metrics(encoder)
    _assert_matches(out, (tokens, logprobs), "video")
    assert out["meta_info"]["prompt_tokens"] == prompt_len
    assert after["requests.success"] - before.get("requests.success", 0) == 1
    assert after["rounds"] - before.get("rounds", 0) >= 3, (before, after)
    # one item per video (and one per image), whether encoded or an embedding-cache hit
    items = 2 if with_image else 1
    assert encoder_cache_metrics(encoder)["total_files"] - lookups == items


def test_router_generate_streaming_matches_hf(deployment, vl_model) -> None:
    """``/generate`` with ``stream: true`` through the router: the streamed chunks carry the
    same token ids and per-token logprobs as HF (two images, a request with resume)."""
    router, _, _ = deployment
    case = CASES["two_images"]
    expected_tokens, expected_logprobs = _hf_reference(vl_model, case)
    request = urllib.request.Request(
        router.url + "/generate",
        data=json.dumps(_payload(vl_model, case, stream=True)).encode(),
        headers={"Content-Type": "application/json"},
    )
    chunks = []
    with urllib.request.urlopen(request, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data:") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data:") :]))
    assert len(chunks) > 1, "the router did not stream"
    # Chunks are cumulative (upstream's default): the last one holds the whole answer, and
    # every earlier one is a prefix of it.
    final = chunks[-1]
    assert final["meta_info"]["finish_reason"]["type"] == "length"
    entries = final["meta_info"]["output_token_logprobs"]
    assert [e[1] for e in entries] == expected_tokens
    assert [e[0] for e in entries] == pytest.approx(
        expected_logprobs, abs=LOGPROB_TOLERANCE
    )
    for chunk in chunks[:-1]:
        got = [e[1] for e in chunk["meta_info"]["output_token_logprobs"]]
        assert got == expected_tokens[: len(got)]


# Public request fields that reach upstream's ``disaggregation_mode != NULL`` checks (meant as
# "prefill/decode", docs/serving.md "PD-mode checks") or validation that only some modes run:
# (extra top-level fields, extra sampling params, expected status). 200: served, the tokens
# and logprobs equal HF; 400: refused by both servers, as a colocated server refuses it.
REQUEST_FIELDS = {
    "return_sampling_mask": ({"return_sampling_mask": True}, {"top_k": 1}, 200),
    "return_sampling_mask_bad_top_k": (
        {"return_sampling_mask": True},
        # sampled (temperature 0 means top_k=1); top_k over --sampling-mask-max-tokens
        {"temperature": 0.5, "top_k": 10**6},
        400,
    ),
    "sampling_logprobs_mode_without_mask": (
        {"sampling_logprobs_mode": "processed"},
        {},
        400,
    ),
    "top_logprobs_num": ({"top_logprobs_num": 3}, {}, 200),
    "token_ids_logprob": ({"token_ids_logprob": [1, 2, 3]}, {}, 200),
    "logprob_start_len": ({"logprob_start_len": 0}, {}, 200),
    "return_hidden_states": ({"return_hidden_states": True}, {}, 400),
    # without --enable-return-routed-experts the field is ignored, as on a colocated server
    "return_routed_experts": ({"return_routed_experts": True}, {}, 200),
    "session_params": ({"session_params": {"id": "no-such-session"}}, {}, 400),
    "lora_path": ({"lora_path": "no-such-adapter"}, {}, 400),
    "custom_logit_processor": ({"custom_logit_processor": "{}"}, {}, 400),
    "beam_width": ({}, {"beam_width": 2}, 400),
}


# Fields sglang-router 0.3.2 does not forward (it re-serializes the body it knows): through the
# router such a request is an ordinary one (200, equal to HF); the field reaches the servers
# only from a client that talks to them directly.
ROUTER_DROPS = {
    "return_sampling_mask",
    "return_sampling_mask_bad_top_k",
    "sampling_logprobs_mode_without_mask",
    "return_routed_experts",
    "beam_width",
}


def _post_status(server, body: dict, timeout: float = 120) -> tuple[int, dict | str]:
    request = urllib.request.Request(
        server.url + "/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _post_pair_directly(encoder, language, body: dict) -> tuple[int, dict | str]:
    """What the router does (the same body, with bootstrap fields, to both servers at once),
    done by the client: sglang-router 0.3.2 forwards only the fields it knows, so this is how a
    field the router drops (``return_sampling_mask``) reaches the servers. Returns the
    language server's answer; the encode server answers 200 too, or a 4xx with it."""
    body = body | {
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": bootstrap_port(encoder),
        "bootstrap_room": random.getrandbits(62),
    }
    with ThreadPoolExecutor(2) as pool:
        enc = pool.submit(_post_status, encoder, body)
        lang = pool.submit(_post_status, language, body)
        enc_status, enc_out = enc.result()
        lang_status, lang_out = lang.result()
    if lang_status == 200:
        assert enc_status == 200, (enc_status, enc_out)
    else:
        assert 400 <= enc_status < 500, (enc_status, enc_out, lang_status, lang_out)
    return lang_status, lang_out


@pytest.mark.parametrize("field", list(REQUEST_FIELDS))
def test_request_fields_served_or_refused(deployment, vl_model, field) -> None:
    """issue: blockers item 3. An image request carrying each public field that reaches a
    mode check, through the router and as a client talking to both servers directly (the
    router drops fields it does not know), and the same field on a text-only request straight
    to the language server: served (200, equal to HF, the field's output present) or refused
    with a 4xx within seconds, never a crashed scheduler or a request that waits out the
    transfer timeout; both servers stay up and answer the next request equal to HF."""
    router, encoder, language = deployment
    image_case, text_case = CASES["one_image"], CASES["text_only"]
    extra, sampling, status = REQUEST_FIELDS[field]
    for route, case, send in (
        ("router", image_case, lambda body: _post_status(router, body)),
        ("direct", image_case, lambda b: _post_pair_directly(encoder, language, b)),
        ("language", text_case, lambda body: _post_status(language, body)),
    ):
        reference = _hf_reference(vl_model, case)
        body = _payload(vl_model, case)
        body["sampling_params"] |= sampling
        body |= extra
        start = time.monotonic()
        got_status, out = send(body)
        elapsed = time.monotonic() - start
        expected = 200 if route == "router" and field in ROUTER_DROPS else status
        assert got_status == expected, (field, route, got_status, out)
        assert elapsed < 20, (field, route, elapsed)
        assert encoder.alive() and language.alive(), (field, route)
        if expected != 200 or (route == "router" and "temperature" in sampling):
            continue  # refused, or sampled (not comparable with the greedy reference)
        _assert_matches(out, reference, f"{field} via {route}")
        meta = out["meta_info"]
        n = len(reference[0])
        if field == "top_logprobs_num":
            tops = meta["output_top_logprobs"]
            assert [len(t) for t in tops] == [3] * n
            # greedy: the chosen token is the most likely one
            assert [t[0][1] for t in tops] == reference[0]
        if field == "token_ids_logprob":
            ids = meta["output_token_ids_logprobs"]
            assert [[e[1] for e in t] for t in ids] == [[1, 2, 3]] * n
        if field == "logprob_start_len":
            assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
        if field == "return_sampling_mask" and route != "router":
            # top_k=1: the sampling support of every step is the chosen token alone
            assert meta["output_token_sampling_mask"] == [[t] for t in reference[0]]
    image_reference = _hf_reference(vl_model, image_case)
    _assert_matches(
        router.post("/generate", _payload(vl_model, image_case)),
        image_reference,
        field,
    )


def _small_deployment(server_pool, vl_model):
    """Language: a small KV pool (retraction); encode: a ViT budget of 32 placeholder tokens
    per vision-tower call (one 24-token image per call)."""
    return custom_deployment(
        server_pool,
        vl_model,
        "el-small",
        (
            "--max-total-tokens",
            str(RETRACT_POOL_TOKENS),
            # admit on the prompt alone, so running decodes overrun the pool
            "--schedule-conservativeness",
            "0.01",
        ),
        encode_args=("--max-prefill-tokens", str(VIT_BUDGET_TOKENS)),
    )


def test_retraction_of_multimodal_requests(server_pool, vl_model) -> None:
    """A language KV pool too small for the concurrent image requests' decode: the scheduler
    retracts a multimodal request (``sglang:num_retracted_requests_total``), re-runs its
    prefill from the received rows later, and every answer still equals HF."""
    router, encoder, language = _small_deployment(server_pool, vl_model)
    try:
        references = {
            c.name: _hf_reference(vl_model, c, RETRACT_NEW_TOKENS)
            for c in RETRACT_CASES
        }
        # Upstream reserves a running request's whole remaining decode when it ignores eos, so
        # these requests keep eos on; the references hold no eos token, so they stop at length.
        with open(os.path.join(vl_model, "generation_config.json")) as f:
            eos_ids = set(json.load(f)["eos_token_id"])
        for tokens, _ in references.values():
            assert not eos_ids & set(tokens), "reference emits eos: pick other images"
        retracted = metric_sum(language, "sglang:num_retracted_requests_total")
        with ThreadPoolExecutor(len(RETRACT_CASES)) as pool:
            outs = list(
                pool.map(
                    lambda c: router.post(
                        "/generate",
                        _payload(
                            vl_model,
                            c,
                            max_new_tokens=RETRACT_NEW_TOKENS,
                            ignore_eos=False,
                        ),
                    ),
                    RETRACT_CASES,
                )
            )
        for case, out in zip(RETRACT_CASES, outs):
            _assert_matches(out, references[case.name], case.name)
        assert (
            metric_sum(language, "sglang:num_retracted_requests_total") > retracted
        ), "no request was retracted"
    finally:
        assert_blocks_free(encoder, language)


def test_vit_token_budget_with_concurrent_images(server_pool, vl_model) -> None:
    """Concurrent image requests against an encode server whose ViT budget
    (``--max-prefill-tokens 32``) holds one 24-token image per vision-tower call: every image
    runs (fresh images, no cache holds them) and no call exceeds the budget
    (``sglang:encode_language_vit_call_tokens``, a histogram of every call); every answer
    equals HF."""
    router, encoder, language = _small_deployment(server_pool, vl_model)
    tokens = "sglang:encode_language_vit_call_tokens"
    try:
        cases = BUDGET_CASES + (CASES["one_image"],)  # 24, 24, 24 and 4 tokens
        references = {c.name: _hf_reference(vl_model, c) for c in cases}
        before = [
            metric_sum(encoder, tokens + "_count"),
            metric_sum(encoder, tokens + "_bucket", le="32.0"),
            metric_sum(encoder, tokens + "_sum"),
        ]
        with ThreadPoolExecutor(len(cases)) as pool:
            outs = list(
                pool.map(
                    lambda c: router.post("/generate", _payload(vl_model, c)), cases
                )
            )
        for case, out in zip(cases, outs):
            _assert_matches(out, references[case.name], case.name)
        calls, within, run = (
            metric_sum(encoder, tokens + suffix, **labels) - b
            for (suffix, labels), b in zip(
                (("_count", {}), ("_bucket", {"le": "32.0"}), ("_sum", {})), before
            )
        )
        assert run == 3 * 24 + 4, run  # every image ran the vision tower
        assert calls >= 3 and within == calls, (calls, within)  # none above the budget
    finally:
        assert_blocks_free(encoder, language)


def test_deepstack_count_from_the_config(server_pool) -> None:
    """A checkpoint with K=4 deepstack layers at non-contiguous indexes (0, 2, 3, 5) of a
    6-block vision tower, on a 4-layer text model (shallower than K+1: a slice is added after
    the last decoder layer), in its own deployment: the buffers' deepstack slot, the transfer
    and the language side's hook all take K from the config. A reduced set, one image and
    text only, both equal to HF. (K=2 is served colocated, test_qwen3_vl_moe.py.)"""
    model = str(ensure_checkpoint(DEEPSTACK_K4_NONCONTIG_SHALLOW))
    router, encoder, language = custom_deployment(server_pool, model, "el-k4", ())
    try:
        for case in (CASES["one_image"], CASES["text_only"]):
            out = router.post("/generate", _payload(model, case))
            _assert_matches(out, _hf_reference(model, case), case.name)
    finally:
        assert_blocks_free(encoder, language)
