"""Shared helpers of the serving tests: the HF fp32 reference of a case (token ids and
per-token logprobs), the same case sent through the router's ``/generate``, and deployments
with extra server arguments."""

from __future__ import annotations

import dataclasses

import torch
from epd_testbed import servers as srv
from epd_testbed.cases import MAX_NEW_TOKENS, Case
from epd_testbed.hf_reference import hf_greedy_logits, render_prompt
from epd_testbed.servers import wait_all_blocks_free


def hf_reference(model_path: str, case: Case) -> tuple[list[int], list[float]]:
    tokens, logits = hf_greedy_logits(model_path, case.messages(), MAX_NEW_TOKENS)
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return tokens, [float(logprobs[i, t]) for i, t in enumerate(tokens)]


def generate(router, model_path: str, case: Case) -> dict:
    prompt, image_paths = render_prompt(model_path, case.messages())
    payload = {
        "text": prompt,
        "return_logprob": True,
        "sampling_params": {
            "temperature": 0.0,
            "max_new_tokens": MAX_NEW_TOKENS,
            "ignore_eos": True,
        },
    }
    if image_paths:
        payload["image_data"] = image_paths
    return router.post("/generate", payload)


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
