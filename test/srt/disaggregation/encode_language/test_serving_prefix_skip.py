"""Prefix-aware skip through the router (issue 17 item 2): when the language server's radix
cache already holds an image's (or video's) tokens, the encode server runs no vision tower for
it and sends none of its rows; the answer still equals Hugging Face fp32 token for token, with
per-token logprobs within 1e-3. Observed on the encode server's /metrics:
``sglang:encode_language_items_total{outcome="held|sent"}``, ``..._row_bytes_total``
(embedding + deepstack bytes sent), ``..._vit_calls_total``, and for a request whose every item
the language side holds ``..._requests_total{outcome="all_held"}`` with no round and no byte
moved at all (``..._rounds_total``, ``..._bytes_total``): it needs nothing the encoder's
announcement did not carry.

Each test uses its own system prompt and images, so only its own requests can have filled the
shared language server's prefix cache. Real components: sglang-router, two launch_server
processes, Mooncake over TCP loopback, HTTP. That a held prefix cannot be evicted before the
request's prefill (the lock) is shown in process: test_prefix_skip.py.
"""

from __future__ import annotations

import uuid

import pytest
from el_serving import (
    assert_blocks_free,
    assert_matches_reference,
    generate_messages,
    generate_video,
    image_messages,
    messages_reference,
    video_messages,
    video_reference,
)
from epd_testbed.images import save_image
from epd_testbed.servers import encode_language_metrics
from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def vl_model() -> str:
    return str(ensure_checkpoint(TinyVLMoeSpec()))


@pytest.fixture()
def deployment(servers, vl_model):
    """(router, encode, language) of the shared el-router group; every block free after."""
    router, encoder, language = servers.encode_language(vl_model)
    yield router, encoder, language
    assert_blocks_free(encoder, language)


def _counts(encoder) -> dict:
    m = encode_language_metrics(encoder)
    return {
        "held": m.get("items.held", 0),
        "sent": m.get("items.sent", 0),
        "row_bytes": m.get("row_bytes", 0),
        "vit_calls": m.get("vit_calls", 0),
        "bytes": m.get("bytes", 0),
        "rounds": m.get("rounds", 0),
        "transferred": m.get("requests.success", 0),
        "all_held": m.get("requests.all_held", 0),
    }


def _ask(router, encoder, vl_model, messages, video: bool = False) -> dict:
    """One request through the router, checked against HF; the encoder's counter deltas."""
    before = _counts(encoder)
    if video:
        out = generate_video(router, vl_model, messages)
        reference = video_reference(vl_model, messages)
    else:
        out = generate_messages(router, vl_model, messages)
        reference = messages_reference(vl_model, messages)
    assert_matches_reference(out, reference, str(messages)[:200])
    after = _counts(encoder)
    return {k: after[k] - before[k] for k in after} | {"text": out["text"]}


def _system() -> str:
    return f"You are assistant {uuid.uuid4().hex[:8]}."


def test_multi_turn_chat_over_one_image_sends_it_once(deployment, vl_model) -> None:
    """Turns 2 and 3 extend turn 1's prompt: the image lies in the cached prefix, so they run
    no vision tower and take no transfer round at all (ids and positions came with the
    announcement): no byte moves."""
    router, encoder, _ = deployment
    messages = image_messages(_system(), save_image(72, 64, 17001), "Describe it.")
    deltas = []
    for question in ("What color dominates?", "Name one shape in it.", None):
        d = _ask(router, encoder, vl_model, messages)
        deltas.append(d)
        if question is not None:
            messages = messages + [
                {"role": "assistant", "content": d["text"]},
                {"role": "user", "content": question},
            ]
    first, *later = deltas
    assert (first["held"], first["sent"], first["vit_calls"]) == (0, 1, 1), first
    assert first["row_bytes"] > 0, first
    assert (first["transferred"], first["all_held"], first["rounds"]) == (
        1,
        0,
        1,
    ), first
    for d in later:
        assert (d["held"], d["sent"], d["vit_calls"], d["row_bytes"]) == (1, 0, 0, 0), d
        assert (d["transferred"], d["all_held"], d["rounds"], d["bytes"]) == (
            0,
            1,
            0,
            0,
        ), d


def test_same_image_behind_a_different_prefix_is_sent(deployment, vl_model) -> None:
    """The same image in a new prompt whose ids before it differ: no cached prefix covers
    it, so its rows are sent again (the encoder's own cache may spare the vision tower).
    """
    router, encoder, _ = deployment
    image = save_image(72, 64, 17002)
    first = _ask(
        router, encoder, vl_model, image_messages(_system(), image, "Describe it.")
    )
    second = _ask(
        router, encoder, vl_model, image_messages(_system(), image, "Describe it.")
    )
    for d in (first, second):
        assert (d["held"], d["sent"]) == (0, 1), d
    assert second["row_bytes"] == first["row_bytes"] > 0, (first, second)


def test_two_images_of_which_the_first_is_cached(deployment, vl_model) -> None:
    """A prompt with image A then image B, after a prompt with image A alone behind the same
    system prompt: A is held, B's rows alone are sent (A and B have the same size, so B's
    rows are exactly as many bytes as A's were)."""
    router, encoder, _ = deployment
    system = _system()
    image_a, image_b = save_image(72, 64, 17003), save_image(72, 64, 17004)
    first = _ask(
        router, encoder, vl_model, image_messages(system, image_a, "Describe it.")
    )
    both = [
        {"role": "system", "content": system},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": str(image_a)}},
                {"type": "image_url", "image_url": {"url": str(image_b)}},
                {"type": "text", "text": "Compare them."},
            ],
        },
    ]
    second = _ask(router, encoder, vl_model, both)
    assert (first["held"], first["sent"]) == (0, 1), first
    assert (second["held"], second["sent"], second["vit_calls"]) == (1, 1, 1), second
    assert second["row_bytes"] == first["row_bytes"] > 0, (first, second)
    assert (second["transferred"], second["all_held"]) == (1, 0), second


def test_video_asked_twice_is_sent_once(deployment, vl_model) -> None:
    """The same video question twice: the second one's video lies in the cached prefix.
    Its own system prompt keeps other tests' cached video prompts out (a fixed one: the HF
    reference stops at the tiny model's eos token, which greedy decoding behind most system
    prompts reaches within 16 tokens; behind this one it does not)."""
    router, encoder, _ = deployment
    messages = [{"role": "system", "content": "You describe videos."}] + video_messages(
        False
    )
    first = _ask(router, encoder, vl_model, messages, video=True)
    second = _ask(router, encoder, vl_model, messages, video=True)
    assert (first["held"], first["sent"]) == (0, 1) and first["row_bytes"] > 0, first
    assert (second["held"], second["sent"], second["row_bytes"]) == (1, 0, 0), second
    assert second["vit_calls"] == 0, second
    assert (second["all_held"], second["rounds"], second["bytes"]) == (1, 0, 0), second
