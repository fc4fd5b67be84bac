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

import pytest
from el_serving import (
    ask_counting_skips,
    assert_blocks_free,
    fresh_system_prompt,
    image_messages,
    video_messages,
)
from epd_testbed.images import save_image
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


def test_multi_turn_chat_over_one_image_sends_it_once(deployment, vl_model) -> None:
    """Turns 2 and 3 extend turn 1's prompt: the image lies in the cached prefix, so they run
    no vision tower and take no transfer round at all (ids and positions came with the
    announcement): no byte moves."""
    router, encoder, _ = deployment
    messages = image_messages(
        fresh_system_prompt(), save_image(72, 64, 17001), "Describe it."
    )
    deltas = []
    for question in ("What color dominates?", "Name one shape in it.", None):
        d = ask_counting_skips(router, encoder, vl_model, messages)
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
    first = ask_counting_skips(
        router,
        encoder,
        vl_model,
        image_messages(fresh_system_prompt(), image, "Describe it."),
    )
    second = ask_counting_skips(
        router,
        encoder,
        vl_model,
        image_messages(fresh_system_prompt(), image, "Describe it."),
    )
    for d in (first, second):
        assert (d["held"], d["sent"]) == (0, 1), d
    assert second["row_bytes"] == first["row_bytes"] > 0, (first, second)


def test_two_images_of_which_the_first_is_cached(deployment, vl_model) -> None:
    """A prompt with image A then image B, after a prompt with image A alone behind the same
    system prompt: A is held, B's rows alone are sent (A and B have the same size, so B's
    rows are exactly as many bytes as A's were)."""
    router, encoder, _ = deployment
    system = fresh_system_prompt()
    image_a, image_b = save_image(72, 64, 17003), save_image(72, 64, 17004)
    first = ask_counting_skips(
        router, encoder, vl_model, image_messages(system, image_a, "Describe it.")
    )
    both = image_messages(system, (image_a, image_b), "Compare them.")
    second = ask_counting_skips(router, encoder, vl_model, both)
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
    first = ask_counting_skips(router, encoder, vl_model, messages, video=True)
    second = ask_counting_skips(router, encoder, vl_model, messages, video=True)
    assert (first["held"], first["sent"]) == (0, 1) and first["row_bytes"] > 0, first
    assert (second["held"], second["sent"], second["row_bytes"]) == (1, 0, 0), second
    assert second["vit_calls"] == 0, second
    assert (second["all_held"], second["rounds"], second["bytes"]) == (1, 0, 0), second
