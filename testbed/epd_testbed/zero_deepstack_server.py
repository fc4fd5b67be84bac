"""Test-bed control: ``python -m epd_testbed.zero_deepstack_server <launch_server args>``.

A language server whose received deepstack rows are replaced by zeros before they reach the
model. It exists only to show that the end-to-end comparison has power: with deepstack zeroed
the per-token logprobs must differ from Hugging Face's (``test_serving.py``). The patch is made
at import of this module, which SGLang's spawned scheduler processes import again as their
``__main__``, so it holds in every process of the server.
"""

from __future__ import annotations

import runpy

import torch
from sglang.srt.disaggregation.encode_language.language_mm_inputs import (
    LanguageMultimodalInputs,
)

_separate = LanguageMultimodalInputs.separate_deepstack_embeds


def _separate_and_zero_deepstack(self, embedding):
    embeddings, deepstack = _separate(self, embedding)
    return embeddings, torch.zeros_like(deepstack)


LanguageMultimodalInputs.separate_deepstack_embeds = _separate_and_zero_deepstack

if __name__ == "__main__":
    # alter_sys=False keeps this module as __main__, so spawned children re-import it.
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=False)
