"""Shared request helpers of the serving tests: the HF fp32 reference of a case (token ids and
per-token logprobs) and the same case sent through the router's ``/generate``."""

from __future__ import annotations

import torch
from epd_testbed.cases import MAX_NEW_TOKENS, Case
from epd_testbed.hf_reference import hf_greedy_logits, render_prompt


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
