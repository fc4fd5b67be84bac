"""Failure paths of encode/language serving through the real ``sglang-router`` 0.3.2: a client
fault before the transfer (4xx on both sides, the language side told at once, no router retry,
no breaker trip), client disconnects mid-transfer and mid-decode, and one of two encoders dying
and coming back. One deployment (``epd_testbed.servers.launch_two_encoders_language``: two
encode servers, one language server, ``EL_FAULT_ROUTER_ARGS``) carries every test; after each
test every block is free on all its servers.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import signal
import threading
import time
import types
import urllib.request
import uuid

import pytest
from epd_testbed.cases import MAX_NEW_TOKENS
from epd_testbed.hf_reference import hf_greedy_logits, render_prompt
from epd_testbed.servers import (
    RequestError,
    bootstrap_port,
    encode_language_metrics,
    metric_sum,
    relaunch,
)
from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint

from el_serving import (
    CASES,
    LOGPROB_TOLERANCE,
    _greedy_body,
    assert_blocks_free,
    hf_reference,
)

pytestmark = pytest.mark.server

# Bounds of the waits below (never asserted as timings): every wait ends or fails.
WAIT_S = 60
BAD_IMAGES = {
    "missing_file": "/nonexistent/epd-missing-image.png",
    "unreachable_url": "http://127.0.0.1:9/image.png",
    "undecodable": "data:image/png;base64,"
    + base64.b64encode(b"not an image").decode(),
}
# What the encoder calls each fault: a file or URL that cannot be read is an OSError; bytes
# that do not decode fail upstream's validation (a ValueError), like a too long prompt.
BAD_IMAGE_LABELS = {
    "missing_file": "the request's media cannot be used",
    "unreachable_url": "the request's media cannot be used",
    "undecodable": "invalid request",
}


@pytest.fixture(scope="module")
def vl_model() -> str:
    return str(ensure_checkpoint(TinyVLMoeSpec()))


@pytest.fixture()
def deployment(servers, vl_model):
    """(router, encode A, encode B, language); afterwards every block is free on each live
    server of the group (a test may have replaced an encoder)."""
    group = servers.two_encoders_language(vl_model)
    yield group
    current = servers.two_encoders_language(vl_model)
    assert_blocks_free(*current[1:])


def _payload(model_path: str, case_name: str, image_data=None, **sampling) -> dict:
    prompt, image_paths = render_prompt(model_path, CASES[case_name].messages())
    payload = {
        "text": prompt,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": MAX_NEW_TOKENS}
        | sampling,
    }
    if image_data is not None or image_paths:
        payload["image_data"] = image_data if image_data is not None else image_paths
    return payload


def _expected(model_path: str, case_name: str) -> list[int]:
    tokens, _ = hf_greedy_logits(
        model_path, CASES[case_name].messages(), MAX_NEW_TOKENS
    )
    return tokens


def _room_fields(encoder) -> dict:
    return {
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": bootstrap_port(encoder),
        "bootstrap_room": random.getrandbits(62),
    }


def _waiting(server) -> bool:
    return encode_language_metrics(server).get("waiting_requests", 0) > 0


def _wait_until(predicate, what: str) -> None:
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {WAIT_S} s: {what}")


def _post_in_thread(server, payload: dict):
    result: dict = {}

    def run():
        try:
            result["out"] = server.post("/generate", payload, timeout=WAIT_S * 2)
        except Exception as e:
            result["error"] = str(e)

    worker = threading.Thread(target=run)
    worker.start()
    return worker, result


def _received(encoder) -> float:
    """Requests the encoder finished for the language side: transferred or all held."""
    m = encode_language_metrics(encoder)
    return m.get("requests.success", 0) + m.get("requests.all_held", 0)


def _failed(server) -> float:
    return encode_language_metrics(server).get("requests.failed", 0)


# 1. A client fault before the transfer ---------------------------------------------------------
@pytest.mark.parametrize(
    "language_first", [True, False], ids=["reserved", "not_reserved"]
)
def test_unreadable_image_fails_the_language_side_at_once(
    deployment, vl_model, language_first
) -> None:
    """The encode server cannot load the image: it answers 400 and the language side, which
    got the same room, fails it with the encoder's reason (not a bootstrap timeout), also 400.
    ``reserved``: the language side expected the room first (the encoder fails the room it
    holds); ``not_reserved``: the encoder failed first, the later Expect is refused at once.
    """
    _, encoder, _, language = deployment
    payload = _payload(vl_model, "one_image", BAD_IMAGES["missing_file"])
    payload |= _room_fields(encoder)
    if language_first:
        worker, result = _post_in_thread(language, payload)
        _wait_until(lambda: _waiting(language), "the language side expects the room")
        with pytest.raises(RequestError, match="HTTP 400.*client error"):
            encoder.post("/generate", payload)
    else:
        with pytest.raises(RequestError, match="HTTP 400.*client error"):
            encoder.post("/generate", payload)
        worker, result = _post_in_thread(language, payload)
    worker.join(WAIT_S)
    assert not worker.is_alive(), "the language side kept waiting"
    assert "HTTP 400" in result.get("error", ""), result
    assert "client error: the request's media cannot be used" in result["error"]
    assert "bootstrap timeout" not in result["error"]


@pytest.mark.parametrize("image", list(BAD_IMAGES), ids=list(BAD_IMAGES))
def test_router_passes_a_client_fault_through(deployment, vl_model, image) -> None:
    """Through the router (retries on, breaker threshold 2, round robin over two encoders):
    four requests with a bad image each answer 4xx, each reached exactly one encoder once (no
    retry), and a good request right after succeeds (no encoder's breaker opened)."""
    router, enc_a, enc_b, language = deployment
    before = _failed(enc_a) + _failed(enc_b)
    for _ in range(4):
        with pytest.raises(RequestError, match=r"HTTP 4\d\d") as err:
            router.post("/generate", _payload(vl_model, "one_image", BAD_IMAGES[image]))
        assert f"client error: {BAD_IMAGE_LABELS[image]}: " in str(err.value)
    _wait_until(
        lambda: _failed(enc_a) + _failed(enc_b) - before == 4,
        "each bad request counted once by the encoders",
    )
    assert _failed(enc_a) + _failed(enc_b) - before == 4  # a retry would add more
    for _ in range(2):  # one per encoder under round robin
        out = router.post("/generate", _payload(vl_model, "one_image"))
        assert out["output_ids"] == _expected(vl_model, "one_image")
    _wait_until(lambda: not _waiting(language), "the language side has nothing waiting")


@pytest.mark.parametrize("host", ["no-such-host.invalid", "1.2.3.4:5"])
def test_bad_bootstrap_host_is_refused(deployment, vl_model, host) -> None:
    """issue: blockers item 3(a). A direct ``/generate`` to the language server whose
    ``bootstrap_host`` cannot be resolved or parsed: a 400 that names the address (the
    scheduler survives), and the deployment serves the next image request equal to HF.
    """
    router, encoder, _, language = deployment
    payload = _payload(vl_model, "one_image") | _room_fields(encoder)
    with pytest.raises(RequestError, match="HTTP 400") as err:
        language.post("/generate", payload | {"bootstrap_host": host}, timeout=WAIT_S)
    assert f"bootstrap address '{host}:{bootstrap_port(encoder)}' cannot be used" in (
        str(err.value)
    )
    out = router.post("/generate", _payload(vl_model, "one_image"))
    assert out["output_ids"] == _expected(vl_model, "one_image")


# Prompts on which the two sides once disagreed about a transfer: a placeholder token typed as
# text without an image, and an image whose prompt has no placeholder for it.
_MISMATCHED = {
    "placeholder_without_image": (
        [{"role": "user", "content": "Describe <|image_pad|> in one word."}],
        False,
    ),
    "image_without_placeholder": (
        [{"role": "user", "content": "What is in the picture?"}],
        True,
    ),
}


@pytest.mark.parametrize("name", list(_MISMATCHED))
def test_placeholder_and_media_mismatch_answers_like_colocated(
    deployment, vl_model, name
) -> None:
    """issue: blockers item 6. Through the router (round robin: both encoders), the prompt
    answers as the colocated model does, as text: token for token and logprob for logprob the
    Hugging Face model on the same prompt without image (what a colocated server runs: no
    image fills the placeholder, or no placeholder takes the image).
    ``placeholder_without_image``: the encoder finishes the request itself and tells the
    language side, which reserved for the placeholder, that nothing comes (before: HTTP 500
    after the 30 s bootstrap timeout).
    ``image_without_placeholder``: upstream's processor drops the image, neither side waits (a
    guard; it passed before too). Every block is free afterwards (fixture)."""
    router, _, _, language = deployment
    messages, with_image = _MISMATCHED[name]
    expected, logprobs = hf_reference(
        vl_model, types.SimpleNamespace(messages=lambda: messages)
    )
    prompt, _ = render_prompt(vl_model, messages)
    body = _greedy_body(prompt)
    if with_image:
        body["image_data"] = render_prompt(vl_model, CASES["one_image"].messages())[1]
    for _ in range(2):
        out = router.post("/generate", body, timeout=WAIT_S)
        assert out["output_ids"] == expected
        got = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(logprobs, abs=LOGPROB_TOLERANCE)
    _wait_until(lambda: not _waiting(language), "the language side has nothing waiting")


# 2. Client disconnects -------------------------------------------------------------------------
def _open_stream(server, payload: dict) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
    conn.request(
        "POST",
        "/generate",
        body=json.dumps(payload | {"stream": True}),
        headers={"Content-Type": "application/json"},
    )
    return conn


@pytest.mark.parametrize("role", ["language", "encode"])
def test_client_disconnect_mid_transfer_ends_the_room(
    deployment, vl_model, role
) -> None:
    """A streaming client closes its connection while the room waits for the other side (the
    peer never gets the request, so the transfer cannot finish first): the server aborts the
    request, tells the other side, and every block is free on both (checked by the fixture).
    """
    _, encoder, _, language = deployment
    server = language if role == "language" else encoder
    payload = _payload(vl_model, "one_image") | {"rid": f"dc-{uuid.uuid4().hex}"}
    payload |= (
        _room_fields(encoder)
        if role == "language"
        else {
            "bootstrap_host": "127.0.0.1",
            "bootstrap_port": 1,
            "bootstrap_room": random.getrandbits(62),
        }
    )
    failed = _failed(server)
    conn = _open_stream(server, payload)
    _wait_until(lambda: _waiting(server), "the request is waiting for its transfer")
    conn.close()
    _wait_until(lambda: not _waiting(server), "the disconnected request ended")
    assert _failed(server) == failed + 1  # ended as an abort, not a success


def test_client_disconnect_mid_decode_ends_the_request(deployment, vl_model) -> None:
    """A streaming client of the router reads a few chunks of a long generation and closes:
    the router closes its upstream connection, the language server aborts the request (its
    aborted-requests counter) and stops decoding it (no running request left)."""
    router, _, _, language = deployment
    aborted = metric_sum(language, "sglang:num_aborted_requests_total")
    payload = _payload(vl_model, "one_image", max_new_tokens=7000, ignore_eos=True)
    conn = _open_stream(router, payload)
    response = conn.getresponse()
    assert response.status == 200
    chunks = 0
    while chunks < 3:
        line = response.fp.readline()
        assert line, "the stream ended early"
        chunks += line.startswith(b"data:")
    _wait_until(
        lambda: metric_sum(language, "sglang:num_running_reqs") >= 1,
        "the language server reports the request decoding",
    )
    conn.close()
    _wait_until(
        lambda: metric_sum(language, "sglang:num_aborted_requests_total")
        == aborted + 1,
        "the language server aborted the disconnected request",
    )
    _wait_until(
        lambda: metric_sum(language, "sglang:num_running_reqs") == 0,
        "decoding stopped",
    )


# 3. One of two encoders dies ---------------------------------------------------------------------
def _router_workers_healthy(router, url: str) -> bool:
    """The router's view of ``url`` (``GET /workers`` of sglang-router 0.3.2)."""
    workers = router.get("/workers").get("workers", [])
    return any(w.get("url") == url and w.get("is_healthy") for w in workers)


def test_dead_encoder_is_dropped_and_serves_again_after_restart(
    servers, deployment, vl_model
) -> None:
    """Encode A is killed while the language side waits for it: that request fails at once
    (the transport's heartbeat, a clear error); the router's health checks drop A and requests
    keep succeeding on B; A restarted on the same ports serves again."""
    router, enc_a, enc_b, language = deployment
    payload = _payload(vl_model, "one_image") | _room_fields(enc_a)
    worker, result = _post_in_thread(language, payload)
    _wait_until(lambda: _waiting(language), "the language side waits for encode A")
    os.killpg(enc_a.pid, signal.SIGKILL)
    worker.join(WAIT_S)
    assert not worker.is_alive(), "the language side kept waiting for a dead encoder"
    assert "unreachable (missed 2 heartbeats)" in result.get("error", ""), result

    _wait_until(
        lambda: not _router_workers_healthy(router, enc_a.url),
        "the router marked encode A unhealthy",
    )
    expected = _expected(vl_model, "one_image")
    served_by_b = _received(enc_b)
    for _ in range(4):
        out = router.post("/generate", _payload(vl_model, "one_image"))
        assert out["output_ids"] == expected
    # transferred, or (the prompt cached on the language side) all held: no round
    assert _received(enc_b) - served_by_b == 4

    enc_a.proc.wait(10)
    new_a = relaunch(enc_a, enc_a.log_path.parent)
    servers.replace(enc_a, new_a)
    _wait_until(
        lambda: _router_workers_healthy(router, new_a.url),
        "the router took encode A back",
    )
    for _ in range(4):  # round robin: some reach A again
        out = router.post("/generate", _payload(vl_model, "one_image"))
        assert out["output_ids"] == expected
    assert _received(new_a) >= 1
