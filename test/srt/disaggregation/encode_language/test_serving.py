"""Encode/language disaggregation end to end: SGLang's own ``sglang-router`` in PD mode
(unchanged) in front of a ``--disaggregation-mode encode`` server (vision tower only) and a
``--disaggregation-mode language`` server (``Qwen3MoeForCausalLM`` from the VL checkpoint), on
the tiny K=3 checkpoint, fp32, greedy. Every answer must equal Hugging Face fp32 token for token,
with per-token logprobs within 1e-3; after every test all transfer blocks are free on both
servers (read from their Prometheus endpoints, not from inside the processes).

Real components throughout: ``python -m sglang_router.launch_router``, two
``python -m sglang.launch_server`` processes, Mooncake over TCP loopback, HTTP.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import random
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
from epd_testbed.cases import MAX_NEW_TOKENS, VL_CASES, Case
from epd_testbed.hf_reference import render_prompt
from epd_testbed.images import save_image
from epd_testbed.servers import (
    RequestError,
    bootstrap_port,
    encode_language_metrics,
    encode_language_specs,
    wait_all_blocks_free,
)
from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint

from el_serving import (
    CASES,
    LOGPROB_TOLERANCE,
    _greedy_body,
    assert_blocks_free,
    assert_matches_reference,
    encoder_cache_metrics,
)
from el_serving import generate as _generate
from el_serving import generate_messages, generate_video
from el_serving import hf_reference as _hf_reference
from el_serving import (
    image_messages,
    messages_reference,
    post_as_router,
    video_messages,
    video_reference,
)

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def vl_model() -> str:
    return str(ensure_checkpoint(TinyVLMoeSpec()))


@pytest.fixture()
def deployment(servers, vl_model):
    """(router, encode, language); after the test, every block is free on both servers."""
    router, encoder, language = servers.encode_language(vl_model)
    yield router, encoder, language
    assert_blocks_free(encoder, language)


@pytest.mark.parametrize("case", VL_CASES, ids=lambda c: c.name)
def test_router_generate_matches_hf(deployment, vl_model, case) -> None:
    """Token ids and per-token logprobs through the router equal HF fp32; an image request
    is transferred (encode side counts a success and bytes), a text-only one is not."""
    router, encoder, language = deployment
    before = encode_language_metrics(encoder)
    expected_tokens, expected_logprobs = _hf_reference(vl_model, case)
    out = _generate(router, vl_model, case)
    assert out["output_ids"] == expected_tokens, case.name
    got_logprobs = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
    assert [
        entry[1] for entry in out["meta_info"]["output_token_logprobs"]
    ] == expected_tokens
    assert got_logprobs == pytest.approx(
        expected_logprobs, abs=LOGPROB_TOLERANCE
    ), case.name
    assert (
        len(set(expected_tokens)) > 1
    ), f"{case.name}: degenerate reference {expected_tokens}"

    after = encode_language_metrics(encoder)
    transferred = after.get("requests.success", 0) - before.get("requests.success", 0)
    moved = after.get("bytes", 0) - before.get("bytes", 0)
    if case.images:
        assert transferred == 1 and moved > 0, (before, after)
    else:
        assert transferred == 0 and moved == 0, (before, after)
        assert after.get("requests.local", 0) - before.get("requests.local", 0) == 1


def test_same_image_twice_hits_the_prefix_cache(deployment, vl_model) -> None:
    """The language side keys an image by the encoder's content hash: the second request for
    the same image reuses the cached prefix (image tokens included) and answers the same.
    """
    router, _, _ = deployment
    case = CASES["non_square"]
    expected_tokens, expected_logprobs = _hf_reference(vl_model, case)
    first = _generate(router, vl_model, case)
    second = _generate(router, vl_model, case)
    prompt_tokens = second["meta_info"]["prompt_tokens"]
    # all but the last token
    assert second["meta_info"]["cached_tokens"] == prompt_tokens - 1
    for out in (first, second):
        assert out["output_ids"] == expected_tokens
        got = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE)


def test_repeated_image_is_an_encoder_cache_hit(deployment, vl_model) -> None:
    """The encode server keeps rows in SGLang's multimodal embedding cache (on by default, as
    in colocated serving): the same image again, behind a different system prompt (so no
    language-side prefix holds it), runs no vision tower; its cached rows are still sent, and
    both answers equal HF. Observed on the encoder's /metrics."""
    router, encoder, _ = deployment
    image = save_image(88, 72, 1717)  # an image no other test sends
    question = "Describe the shapes and colors."
    deltas = []
    for system in ("You are a careful assistant.", "Answer briefly."):
        messages = image_messages(system, image, question)
        reference = messages_reference(vl_model, messages)
        before = encoder_cache_metrics(encoder)
        sent_before = encode_language_metrics(encoder).get("bytes", 0)
        assert_matches_reference(
            generate_messages(router, vl_model, messages), reference
        )
        after = encoder_cache_metrics(encoder)
        sent = encode_language_metrics(encoder).get("bytes", 0) - sent_before
        deltas.append(
            {
                k: after.get(k, 0) - before.get(k, 0)
                for k in ("vit_calls", "hit_files", "total_files")
            }
            | {"sent": sent > 0}
        )
    assert deltas == [
        {"vit_calls": 1, "hit_files": 0, "total_files": 1, "sent": True},
        {"vit_calls": 0, "hit_files": 1, "total_files": 1, "sent": True},
    ], deltas
    assert encoder_cache_metrics(encoder)["entries"] >= 1


def test_router_chat_completions_matches_hf(deployment, vl_model) -> None:
    """OpenAI chat through the router (it rewrites the body and sends it to both servers)."""
    router, _, _ = deployment
    case = CASES["one_image"]
    expected_tokens, expected_logprobs = _hf_reference(vl_model, case)
    out = router.post("/v1/chat/completions", _chat_body(vl_model, case))
    choice = out["choices"][0]
    got = [entry["logprob"] for entry in choice["logprobs"]["content"]]
    assert got == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE)
    assert choice["message"]["content"] == _decode(vl_model, expected_tokens)


def _chat_body(model_path: str, case: Case, stream: bool = False) -> dict:
    """Greedy chat request for ``case`` with per-token logprobs."""
    return {
        "model": model_path,
        "messages": _chat_messages(case),
        "temperature": 0.0,
        "max_tokens": MAX_NEW_TOKENS,
        "ignore_eos": True,
        "logprobs": True,
        "stream": stream,
    }


def _chat_messages(case: Case) -> list[dict]:
    """The case's messages with image paths as file:// URLs (what a chat client sends)."""
    messages = case.messages()
    for message in messages:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    part["image_url"]["url"] = "file://" + part["image_url"]["url"]
    return messages


def _decode(model_path: str, tokens: list[int]) -> str:
    from epd_testbed.hf_reference import _tok_and_proc

    tokenizer, _ = _tok_and_proc(model_path)
    return tokenizer.decode(tokens, skip_special_tokens=True)


def test_encode_server_answers_like_a_prefill_server(deployment, vl_model) -> None:
    """What the router gets from the encode ("prefill") side: HTTP 200 and an empty finished
    output (no tokens, finish reason length 0, empty logprob lists the router can merge).
    """
    _, encoder, _ = deployment
    prompt, _ = render_prompt(vl_model, CASES["text_only"].messages())
    out = encoder.post(
        "/generate",
        {
            "text": prompt,
            "return_logprob": True,
            "sampling_params": {"max_new_tokens": 4},
            "bootstrap_host": "127.0.0.1",
            "bootstrap_port": 1,
            "bootstrap_room": 12345,
        },
    )
    meta = out["meta_info"]
    assert out["output_ids"] == [] and out["text"] == ""
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    assert meta["completion_tokens"] == 0
    assert meta["input_token_logprobs"] == [] and meta["output_token_logprobs"] == []


@pytest.mark.parametrize("role", ["encode", "language"])
def test_health_generate(deployment, role) -> None:
    """``/health_generate`` runs on each server through the fake bootstrap path (no buffer)."""
    _, encoder, language = deployment
    server = encoder if role == "encode" else language
    with urllib.request.urlopen(server.url + "/health_generate", timeout=120) as r:
        assert r.status == 200


def test_router_streaming_chat_matches_hf(deployment, vl_model) -> None:
    """Streaming chat through the router: the chunks' text and logprobs equal HF's."""
    router, _, _ = deployment
    case = CASES["two_images"]
    expected_tokens, expected_logprobs = _hf_reference(vl_model, case)
    body = json.dumps(_chat_body(vl_model, case, stream=True)).encode()
    request = urllib.request.Request(
        router.url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    text, logprobs = "", []
    with urllib.request.urlopen(request, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choice = json.loads(line[len("data:") :])["choices"][0]
            text += choice["delta"].get("content") or ""
            if choice.get("logprobs"):
                logprobs += [e["logprob"] for e in choice["logprobs"]["content"]]
    assert logprobs == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE)
    assert text == _decode(vl_model, expected_tokens)


def test_different_images_of_equal_length_share_no_image_tokens(
    deployment, vl_model
) -> None:
    """Two different images with the same token count: the second request may reuse only the
    text before its image (pad ids come from each image's own content hash)."""
    router, _, _ = deployment
    first, second = (
        Case(f"image_seed_{seed}", "What is in this image?", ((64, 64, seed),))
        for seed in (11, 12)
    )
    image_start = _first_image_token(vl_model, first)
    assert image_start == _first_image_token(vl_model, second)
    for case in (first, second):
        expected_tokens, expected_logprobs = _hf_reference(vl_model, case)
        out = _generate(router, vl_model, case)
        assert out["output_ids"] == expected_tokens, case.name
        got = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE), case.name
    assert out["meta_info"]["cached_tokens"] <= image_start


def _first_image_token(model_path: str, case: Case) -> int:
    """Index of the first image token in the HF processor's ids for ``case``."""
    from epd_testbed.hf_reference import _tok_and_proc
    from PIL import Image

    _, processor = _tok_and_proc(model_path)
    prompt, paths = render_prompt(model_path, case.messages())
    images = [Image.open(p).convert("RGB") for p in paths]
    ids = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"][0]
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return int((ids == image_token_id).nonzero()[0])


@pytest.mark.parametrize("role", ["language", "encode"])
def test_abort_request_ends_a_waiting_room(deployment, vl_model, role) -> None:
    """``/abort_request`` on one server while its room waits for the other side (which never
    gets the request): the request ends at once with the abort reason and every block is
    free again."""
    _, encoder, language = deployment
    server = language if role == "language" else encoder
    # language: it expects the request at the encoder, which never sees it;
    # encode: no language server ever expects this room.
    port = bootstrap_port(encoder) if role == "language" else 1
    rid, worker, result = _start_waiting_request(server, vl_model, port)
    request = urllib.request.Request(
        server.url + "/abort_request",
        data=json.dumps({"rid": rid}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:  # answers with an empty body
        assert r.status == 200
    worker.join(timeout=60)
    assert not worker.is_alive(), "aborted request did not end"
    assert "aborted by the client" in result["error"], result
    blocks = wait_all_blocks_free(server)
    assert blocks["in_use"] == 0 and blocks["free"] == blocks["total"] > 0, blocks


def _start_waiting_request(server, model_path: str, port: int):
    """Send a one-image request for a fresh room to ``server`` alone (its peer never gets it)
    from a thread; return (rid, thread, result dict) once the room is live there."""
    rid = f"waiting-{uuid.uuid4().hex}"
    prompt, image_paths = render_prompt(model_path, CASES["one_image"].messages())
    payload = {
        "rid": rid,
        "text": prompt,
        "image_data": image_paths,
        "sampling_params": {"max_new_tokens": 4},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": port,
        "bootstrap_room": random.getrandbits(62),
    }
    result: dict = {}
    worker = threading.Thread(target=_post_capturing, args=(server, payload, result))
    worker.start()
    deadline = time.time() + 60
    while time.time() < deadline and not _waiting(server):
        time.sleep(0.2)
    assert _waiting(server), "the request never reached the waiting state"
    return rid, worker, result


def _post_capturing(server, payload: dict, result: dict) -> None:
    try:
        out = server.post("/generate", payload, timeout=120)
        result["error"] = json.dumps(out["meta_info"]["finish_reason"])
    except Exception as e:  # the abort may come back as an HTTP error
        result["error"] = str(e)


def _waiting(server) -> bool:
    """The server holds a request whose transfer has not ended."""
    return encode_language_metrics(server).get("waiting_requests", 0) > 0


def test_language_server_alone(deployment, vl_model) -> None:
    """Without the router: a text-only request needs no bootstrap fields and runs locally
    (equal to HF); a request with an image but no bootstrap room is refused with a clear 400.
    """
    _, _, language = deployment
    case = CASES["text_only"]
    expected_tokens, expected_logprobs = _hf_reference(vl_model, case)
    out = _generate(language, vl_model, case)
    assert out["output_ids"] == expected_tokens
    got = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
    assert got == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE)
    with pytest.raises(
        RequestError,
        match="HTTP 400.*needs bootstrap_host, bootstrap_port and bootstrap_room",
    ):
        _generate(language, vl_model, CASES["one_image"])


# Text-only requests of the concurrent test: distinct long prompts (about 330 tokens, ~20
# language-side chunks of 16 each), so they are still being prefilled when the received image
# requests join the queue behind them.
LONG_TEXT_CASES = tuple(
    Case(
        f"long_text_{i}",
        f"Story {i}: " + "red circles and blue squares meet green triangles. " * 40,
    )
    for i in range(4)
)


def test_sixteen_concurrent_mixed_requests(deployment, vl_model) -> None:
    """16 requests at once through the router (one image, two images and a non-square image
    three times each, a video three times, four distinct long text-only prompts): every answer
    equals its HF reference in ids and per-token logprobs: received (multimodal) and
    text-only requests share the language server's one unchanged scheduling path."""
    from concurrent.futures import ThreadPoolExecutor

    router, _, _ = deployment
    image_cases = [case for case in VL_CASES if case.images]
    cases = [case for case in image_cases for _ in range(3)] + list(LONG_TEXT_CASES)
    references = {case.name: _hf_reference(vl_model, case) for case in set(cases)}
    video = video_messages(with_image=False)
    references["video"] = video_reference(vl_model, video)
    jobs = [
        (case.name, functools.partial(_generate, router, vl_model, case))
        for case in cases
    ] + [("video", functools.partial(generate_video, router, vl_model, video))] * 3
    with ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda job: job[1](), jobs))
    assert len(jobs) == 16
    for (name, _), out in zip(jobs, outs):
        expected_tokens, expected_logprobs = references[name]
        assert out["output_ids"] == expected_tokens, name
        got = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE), name


def test_context_length_is_checked_with_the_expanded_prompt(
    deployment, vl_model
) -> None:
    """The language tokenizer sees one placeholder per image; the real prompt length is known
    after the transfer. A request whose expanded prompt plus max_new_tokens exceeds the context
    length by one token passes the language tokenizer's check, is received, and is then refused
    with HTTP 400 and upstream's message, word for word what the encode server's tokenizer (the
    colocated path: it expands the image itself) answers for the same body. Nothing leaks and
    the deployment keeps serving."""
    router, encoder, language = deployment
    case = CASES["one_image"]
    context_len = _context_length(vl_model)
    expanded, unexpanded = _prompt_lengths(vl_model, case)
    assert expanded > unexpanded  # else the language tokenizer's own check would refuse
    too_many = context_len - expanded + 1  # one token over
    prompt, image_paths = render_prompt(vl_model, case.messages())
    body = {
        "text": prompt,
        "image_data": image_paths,
        "sampling_params": {"max_new_tokens": too_many, "temperature": 0.0},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": bootstrap_port(encoder),
    }
    before = encode_language_metrics(encoder)

    # The colocated answer: the encode server's tokenizer manager validates the expanded ids.
    with pytest.raises(RequestError, match="HTTP 400") as colocated:
        encoder.post("/generate", body | {"bootstrap_room": random.getrandbits(62)})
    expected = (
        f"Requested token count exceeds the model's maximum context length of "
        f"{context_len} tokens. You requested a total of {context_len + 1} tokens: "
        f"{expanded} tokens from the input messages and {too_many} tokens for the completion."
    )
    assert expected in str(colocated.value)

    # The language side: its encode half asks for one token, so the request is received.
    room = random.getrandbits(62)
    short = body | {"bootstrap_room": room, "sampling_params": {"max_new_tokens": 1}}
    result: dict = {}
    worker = threading.Thread(
        target=_post_capturing, args=(language, body | {"bootstrap_room": room}, result)
    )
    worker.start()
    out = encoder.post("/generate", short)
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert "HTTP 400" in result["error"] and expected in result["error"], result
    after = encode_language_metrics(encoder)
    # received: transferred, or (its image cached by an earlier test) all held, no round
    received = [
        after.get(k, 0) - before.get(k, 0)
        for k in ("requests.success", "requests.all_held")
    ]
    assert sum(received) == 1, (before, after)

    # Through the router: a 4xx with the same message; then the deployment still serves.
    with pytest.raises(RequestError, match=r"HTTP 4\d\d") as routed:
        router.post(
            "/generate",
            {k: body[k] for k in ("text", "image_data")}
            | {"sampling_params": body["sampling_params"]},
        )
    assert f"client error: invalid request: {expected}" in str(routed.value)
    for name in ("one_image", "text_only"):
        expected_tokens, _ = _hf_reference(vl_model, CASES[name])
        assert _generate(router, vl_model, CASES[name])["output_ids"] == expected_tokens


def _context_length(model_path: str) -> int:
    """The checkpoint's context length (what SGLang derives without --context-length)."""
    with open(os.path.join(model_path, "config.json")) as f:
        return json.load(f)["text_config"]["max_position_embeddings"]


def _prompt_lengths(model_path: str, case: Case) -> tuple[int, int]:
    """(token count with each image expanded by the HF processor, token count of the prompt
    text with one placeholder per image: what the language tokenizer sees)."""
    from epd_testbed.hf_reference import _tok_and_proc
    from PIL import Image

    tokenizer, processor = _tok_and_proc(model_path)
    prompt, paths = render_prompt(model_path, case.messages())
    images = [Image.open(p).convert("RGB") for p in paths]
    ids = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"][0]
    return len(ids), len(tokenizer(prompt)["input_ids"])


def test_encode_server_reports_the_memory_saved(deployment, vl_model) -> None:
    """The encode server reports the weights it loaded (the vision tower) and those of the
    full model it did not load (``sglang:encode_language_weight_bytes``); both equal the
    tensor sizes read here from the checkpoint's safetensors header (``model.visual.*``
    against everything else)."""
    _, encoder, _ = deployment
    m = encode_language_metrics(encoder)
    loaded, skipped = m["weight_bytes.loaded"], m["weight_bytes.not_loaded"]
    vision = other = 0
    for path in glob.glob(os.path.join(vl_model, "*.safetensors")):
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            if name.startswith("model.visual."):
                vision += end - start
            else:
                other += end - start
    assert other > 0 and vision > 0
    assert (loaded, skipped) == (vision, other)


def test_streamed_client_fault_is_reported_in_the_event_stream(
    deployment, vl_model
) -> None:
    """A streamed ``/generate`` through the router whose image cannot be read. The router
    streams the language ("decode") server's answer: HTTP 200 and one event, upstream's
    report of an aborted streamed request (no tokens, ``finish_reason`` of type abort with
    status 400 and the reason: the encode server's client-fault message, which reached the
    language side through the failed room). Nothing is left waiting; every block is free
    (checked by the fixture)."""
    router, encoder, language = deployment
    prompt, _ = render_prompt(vl_model, CASES["one_image"].messages())
    body = {
        "text": prompt,
        "image_data": ["/nonexistent/streamed-client-fault.png"],
        "sampling_params": {"max_new_tokens": 4},
        "stream": True,
    }
    status, events = _stream_events(router, body)
    assert status == 200 and len(events) == 1, (status, events)
    assert events[0]["output_ids"] == [], events
    reason = events[0]["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["status_code"] == 400, reason
    assert (
        "client error: the request's media cannot be used: [Errno 2] No such file"
        in reason["message"]
    ), reason
    for server in (encoder, language):
        deadline = time.time() + 30
        while time.time() < deadline and _waiting(server):
            time.sleep(0.2)
        assert not _waiting(server), server.spec.name


def _stream_events(server, body: dict) -> tuple[int, list]:
    """(HTTP status, parsed ``data:`` events) of a streamed request; an HTTP error's body is
    returned as its only event."""
    request = urllib.request.Request(
        server.url + "/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            events = []
            for raw in r:
                line = raw.decode().strip()
                if line.startswith("data:") and line != "data: [DONE]":
                    events.append(json.loads(line[len("data:") :]))
            return r.status, events
    except urllib.error.HTTPError as e:
        return e.code, [e.read().decode(errors="replace")]


def test_control_zeroed_deepstack_fails_the_comparison(
    deployment, servers, vl_model
) -> None:
    """The check's power, shown once: a language server whose received deepstack rows are
    zeroed (``epd_testbed.zero_deepstack_server``, a test-bed switch), fed by the shared
    encoder, must not match HF within the tolerance, while the same request on the real
    deployment does (the tests above)."""
    _, encoder, _ = deployment
    _, spec = encode_language_specs(
        vl_model,
        bootstrap_port(encoder),
        language_module="epd_testbed.zero_deepstack_server",
        name="el-control",
    )
    zeroed = servers.get(spec)
    case = CASES["one_image"]
    expected_tokens, expected_logprobs = _hf_reference(vl_model, case)
    prompt, image_paths = render_prompt(vl_model, case.messages())
    out = post_as_router(
        encoder, zeroed, _greedy_body(prompt) | {"image_data": image_paths}
    )
    got = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
    worst = max(abs(a - b) for a, b in zip(got, expected_logprobs))
    assert out["output_ids"] != expected_tokens or worst > LOGPROB_TOLERANCE, worst
    blocks = wait_all_blocks_free(zeroed)
    assert blocks["in_use"] == 0 and blocks["free"] == blocks["total"] > 0, blocks
