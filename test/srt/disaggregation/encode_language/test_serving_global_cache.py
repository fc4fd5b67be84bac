"""Encoders sharing rows through upstream's global embedding cache (issue 17, item 1).

Two ``--disaggregation-mode encode`` servers with ``--enable-mm-global-cache`` (upstream's
``EmbeddingCacheController`` over ``MooncakeEmbeddingStore``) against one real
``mooncake_master`` (from the Mooncake wheel), one language server, SGLang's router in PD mode
(prefill round robin). An image that encoder A ran is a hit on encoder B, which never saw it:
B runs no vision tower and still sends the rows; every answer equals HF fp32 token for token,
with per-token logprobs within 1e-3. Observed through the servers' /metrics and the master's.

Real components: ``mooncake_master``, ``sglang_router.launch_router``, three
``sglang.launch_server`` processes, Mooncake Store and transfer engine over TCP loopback, HTTP.
"""

from __future__ import annotations

import time

import pytest
from el_serving import (
    assert_blocks_free,
    assert_matches_reference,
    encoder_cache_metrics,
    generate_messages,
    image_messages,
    messages_reference,
)
from epd_testbed.images import save_image
from epd_testbed.servers import encode_language_metrics, mooncake_key_count
from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint

pytestmark = pytest.mark.server

WAIT_S = 60  # bound of the wait for the Mooncake Store PUT (never asserted as a timing)


@pytest.fixture(scope="module")
def vl_model() -> str:
    return str(ensure_checkpoint(TinyVLMoeSpec()))


def _served(encoders, before) -> list:
    """The encoders whose successful requests went up since ``before``."""
    return [
        e
        for e in encoders
        if encode_language_metrics(e).get("requests.success", 0)
        > before[e.spec.name].get("requests.success", 0)
    ]


def test_image_encoded_by_one_encoder_is_a_hit_on_the_other(servers, vl_model) -> None:
    router, enc_a, enc_b, language, master = servers.global_cache(vl_model)
    encoders = (enc_a, enc_b)
    image = save_image(104, 80, 2929)
    question = "What is in this image?"
    try:
        # 1. The first request: a miss on whichever encoder the router picks, which runs the
        #    vision tower and stores the rows in the Mooncake Store.
        messages = image_messages("You are a careful assistant.", image, question)
        before = {e.spec.name: encode_language_metrics(e) for e in encoders}
        cache_before = {e.spec.name: encoder_cache_metrics(e) for e in encoders}
        keys_before = mooncake_key_count(master)
        assert_matches_reference(
            generate_messages(router, vl_model, messages),
            messages_reference(vl_model, messages),
        )
        (first,) = _served(encoders, before)
        got = encoder_cache_metrics(first)
        was = cache_before[first.spec.name]
        assert got.get("vit_calls", 0) - was.get("vit_calls", 0) == 1
        assert got.get("hit_files", 0) - was.get("hit_files", 0) == 0
        deadline = time.time() + WAIT_S
        while mooncake_key_count(master) <= keys_before and time.time() < deadline:
            time.sleep(0.2)
        assert mooncake_key_count(master) == keys_before + 1

        # 2. The same image behind another system prompt (no language-side prefix holds it)
        #    until round robin sends it to the other encoder: a hit there, no vision tower.
        other = None
        for i in range(2):
            messages = image_messages(f"Answer briefly ({i}).", image, question)
            before = {e.spec.name: encode_language_metrics(e) for e in encoders}
            cache_before = {e.spec.name: encoder_cache_metrics(e) for e in encoders}
            assert_matches_reference(
                generate_messages(router, vl_model, messages),
                messages_reference(vl_model, messages),
                f"repeat {i}",
            )
            (served,) = _served(encoders, before)
            got = encoder_cache_metrics(served)
            was = cache_before[served.spec.name]
            sent = encode_language_metrics(served).get("bytes", 0) - before[
                served.spec.name
            ].get("bytes", 0)
            assert {
                "vit_calls": got.get("vit_calls", 0) - was.get("vit_calls", 0),
                "hit_files": got.get("hit_files", 0) - was.get("hit_files", 0),
                "sent": sent > 0,
            } == {"vit_calls": 0, "hit_files": 1, "sent": True}, served.spec.name
            if served is not first:
                other = served
                break
        assert (
            other is not None
        ), "round robin never sent the image to the other encoder"
    finally:
        assert_blocks_free(enc_a, enc_b, language)
