"""Shared helpers of the serving tests: the HF fp32 reference of a case or of a video prompt
(token ids and per-token logprobs), the same request sent through the router's ``/generate``,
deployments with extra server arguments, and the all-blocks-free check."""

from __future__ import annotations

import dataclasses
import random
import threading
import uuid

import pytest
import torch
from epd_testbed import servers as srv
from epd_testbed import videos
from epd_testbed.cases import MAX_NEW_TOKENS, VL_CASES, Case
from epd_testbed.hf_reference import _tok_and_proc, hf_greedy_logits, render_prompt
from epd_testbed.images import save_image
from epd_testbed.servers import wait_all_blocks_free

# The serving tests' cases by name, and how far a logprob may differ from the HF reference.
CASES = {c.name: c for c in VL_CASES}
LOGPROB_TOLERANCE = 1e-3


def hf_reference(model_path: str, case: Case) -> tuple[list[int], list[float]]:
    tokens, logits = hf_greedy_logits(model_path, case.messages(), MAX_NEW_TOKENS)
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return tokens, [float(logprobs[i, t]) for i, t in enumerate(tokens)]


def messages_reference(
    model_path: str, messages: list[dict]
) -> tuple[list[int], list[float]]:
    """HF fp32 token ids and per-token logprobs of chat ``messages`` (images as paths)."""
    tokens, logits = hf_greedy_logits(model_path, messages, MAX_NEW_TOKENS)
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return tokens, [float(logprobs[i, t]) for i, t in enumerate(tokens)]


def generate_messages(router, model_path: str, messages: list[dict]) -> dict:
    """Chat ``messages`` (images as paths) rendered and sent through ``/generate``."""
    prompt, image_paths = render_prompt(model_path, messages)
    return router.post("/generate", _greedy_body(prompt) | {"image_data": image_paths})


def image_messages(system: str, image, question: str) -> list[dict]:
    """A system prompt, then one image (or a tuple of images) and a question: a request whose
    image tokens no other prompt's cached prefix covers unless its system prompt is the same.
    """
    images = image if isinstance(image, tuple) else (image,)
    return [
        {"role": "system", "content": system},
        {
            "role": "user",
            "content": [
                *({"type": "image_url", "image_url": {"url": str(i)}} for i in images),
                {"type": "text", "text": question},
            ],
        },
    ]


def assert_matches_reference(out: dict, reference, label: str = "") -> None:
    """Token ids equal the reference's, per-token logprobs within ``LOGPROB_TOLERANCE``."""
    tokens, logprobs = reference
    assert out["output_ids"] == tokens, label
    got = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
    assert got == pytest.approx(logprobs, abs=LOGPROB_TOLERANCE), label


def encoder_cache_metrics(server) -> dict[str, float]:
    """An encode server's embedding-cache samples (upstream's ``sglang:encoder_cache_*``)
    and its vision-tower calls, keyed ``"hit_files"``, ``"total_files"``, ``"evictions"``,
    ``"size_mb"``, ``"entries"`` (summed over modalities) and ``"vit_calls"``."""
    prefix = "sglang:encoder_cache_"
    samples: dict[str, float] = {}
    for sample, _, value in srv.prometheus_samples(server.url + "/metrics"):
        if sample.startswith(prefix):
            name = sample[len(prefix) :].removesuffix("_total")
        elif sample == "sglang:encode_language_vit_calls_total":
            name = "vit_calls"
        else:
            continue
        samples[name] = samples.get(name, 0.0) + value
    return samples


def _greedy_body(prompt: str) -> dict:
    return {
        "text": prompt,
        "return_logprob": True,
        "sampling_params": {
            "temperature": 0.0,
            "max_new_tokens": MAX_NEW_TOKENS,
            "ignore_eos": True,
        },
    }


def generate(router, model_path: str, case: Case, **fields) -> dict:
    """``case`` through ``router`` (greedy); ``fields`` join the request body."""
    prompt, image_paths = render_prompt(model_path, case.messages())
    payload = _greedy_body(prompt) | fields
    if image_paths:
        payload["image_data"] = image_paths
    return router.post("/generate", payload)


def post_as_router(encoder, language, body: dict, timeout: float = 300) -> dict:
    """A PD request sent by hand as the router sends it: ``body`` with a fresh room on
    ``encoder``'s control socket, to the encoder (its answer dropped, as the router drops the
    prefill answer) and to ``language``, whose answer is returned (or whose error raised).
    """
    body = body | {
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": srv.bootstrap_port(encoder),
        "bootstrap_room": random.getrandbits(62),
    }

    def to_encoder() -> None:
        try:
            encoder.post("/generate", body, timeout=timeout)
        except srv.RequestError:
            pass  # the encoder's own answer: the client is answered by the language side

    threading.Thread(target=to_encoder, daemon=True).start()
    return language.post("/generate", body, timeout=timeout)


def video_messages(with_image: bool) -> list[dict]:
    """A 2 s, 4 fps test clip (4 frames sampled, 108 video tokens), optionally after an
    image, then a question."""
    parts = []
    if with_image:
        parts.append(
            {"type": "image_url", "image_url": {"url": str(save_image(64, 64, 7))}}
        )
    parts.append({"type": "video_url", "video_url": {"url": str(videos.make_clip())}})
    parts.append({"type": "text", "text": "What happens in this video?"})
    return [{"role": "user", "content": parts}]


def generate_video(router, model_path: str, messages: list[dict], **fields) -> dict:
    """``messages`` holding a video (and images, as paths) through ``/generate``;
    ``fields`` join the request body."""
    tokenizer, _ = _tok_and_proc(model_path)
    prompt = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    payload = (
        _greedy_body(prompt) | {"video_data": videos.video_refs(messages)} | fields
    )
    images = [
        part["image_url"]["url"]
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image_url"
    ]
    if images:
        payload["image_data"] = images
    return router.post("/generate", payload)


def video_reference(
    model_path: str, messages: list[dict]
) -> tuple[list[int], list[float]]:
    """HF fp32 token ids and per-token logprobs of ``messages`` with a video."""
    tokens, logprobs, _ = videos.hf_greedy_logprobs(
        model_path, messages, MAX_NEW_TOKENS
    )
    return tokens, logprobs


def custom_deployment(
    server_pool,
    model_path: str,
    name: str,
    language_args: tuple[str, ...],
    encode_args: tuple[str, ...] = (),
):
    """(router, encode, language) with extra language-side and encode-side arguments;
    launched once per configuration through the session's server pool (counted against its
    live-server cap)."""

    def start():
        bootstrap_port = srv.free_port()
        enc_spec, lang_spec = srv.encode_language_specs(
            model_path,
            bootstrap_port,
            language_args=srv.EL_LANGUAGE_ARGS + language_args,
            name=name,
        )
        enc_spec = dataclasses.replace(enc_spec, args=enc_spec.args + encode_args)
        encoder = srv.launch(enc_spec, server_pool.log_dir, wait=False)
        language = srv.launch(lang_spec, server_pool.log_dir, wait=False)
        try:
            encoder.wait_ready()
            language.wait_ready()
            router = srv.launch_router(
                [(encoder, bootstrap_port)], [language], server_pool.log_dir
            )
        except Exception:
            encoder.stop()
            language.stop()
            raise
        return router, encoder, language

    key = ("encode-language-coverage", model_path, name, language_args, encode_args)
    return server_pool._group(key, 2, start)


def assert_blocks_free(*servers) -> None:
    """Every transfer block free on each server (read from /metrics): none in use, none
    quarantined."""
    for server in servers:
        blocks = wait_all_blocks_free(server)
        assert (
            blocks["in_use"] == 0
            and blocks["quarantined"] == 0
            and blocks["free"] == blocks["total"] > 0
        ), (server.spec.name, blocks)


def skip_counts(encoder) -> dict:
    """The encoder's counters that show what the prefix-aware skip spared (/metrics)."""
    m = srv.encode_language_metrics(encoder)
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


def ask_counting_skips(
    router, encoder, model_path, messages, video: bool = False
) -> dict:
    """One request through the router, checked against HF; the deltas of ``encoder``'s
    ``skip_counts`` and the answer's text."""
    before = skip_counts(encoder)
    if video:
        out = generate_video(router, model_path, messages)
        reference = video_reference(model_path, messages)
    else:
        out = generate_messages(router, model_path, messages)
        reference = messages_reference(model_path, messages)
    assert_matches_reference(out, reference, str(messages)[:200])
    after = skip_counts(encoder)
    return {k: after[k] - before[k] for k in after} | {"text": out["text"]}


def fresh_system_prompt() -> str:
    """A system prompt no other request used: only this test's requests can have filled the
    language server's prefix cache behind it."""
    return f"You are assistant {uuid.uuid4().hex[:8]}."
