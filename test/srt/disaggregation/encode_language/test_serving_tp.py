"""Encode/language disaggregation with tensor parallelism, through SGLang's own router.

* Language ``--tp 2`` (two scheduler ranks on this CPU: ``SGLANG_CPU_OMP_THREADS_BIND="0|1"``):
  one receive per server. Only attention-TP rank 0 reserves and receives; rank 1 gets the
  rows over the TP group (gloo here). Every answer equals Hugging Face fp32 (token ids, and
  per-token logprobs within 1e-3), all blocks are free on both servers afterwards, and the
  metrics show one network receive (``success``, counted by the receiving rank only) plus
  one broadcast sent by rank 0 and one broadcast received by rank 1 per image request.
* Encode ``--tp 2``: both ranks run upstream's TP vision tower, rank 0 alone owns the transfer;
  the answers equal Hugging Face and all blocks are free.

The tiny K=3 checkpoint (4 attention heads, 2 KV heads, 4 vision heads) divides by 2.
"""

from __future__ import annotations

import pytest
from el_serving import CASES, LOGPROB_TOLERANCE, assert_blocks_free
from el_serving import generate as _generate
from el_serving import hf_reference as _hf_reference
from epd_testbed import servers as srv
from epd_testbed.servers import encode_language_metrics
from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint

pytestmark = pytest.mark.server

TP_ENV = (("SGLANG_CPU_OMP_THREADS_BIND", "0|1"),)
# Encoder bytes sent for one request, by (case, language TP size): equal for TP 1 and TP 2 (the
# network carries one copy, not one per language rank).
_BYTES_SENT: dict[tuple[str, int], float] = {}


@pytest.fixture(scope="module")
def vl_model() -> str:
    return str(ensure_checkpoint(TinyVLMoeSpec()))


def _launch(model_path: str, log_dir, *, encode_tp: int, language_tp: int) -> tuple:
    """(router, encode, language) with the given TP sizes (TP 2 ranks pinned one per core)."""
    bootstrap_port = srv.free_port()
    enc, lang = srv.encode_language_specs(
        model_path, bootstrap_port, name=f"el-tp-e{encode_tp}l{language_tp}"
    )
    if encode_tp > 1:
        enc = srv.ServerSpec(
            enc.model_path,
            (*enc.args, "--tp", str(encode_tp)),
            env=enc.env + TP_ENV,
            name=enc.name,
        )
    if language_tp > 1:
        lang = srv.ServerSpec(
            lang.model_path,
            (*lang.args, "--tp", str(language_tp)),
            env=lang.env + TP_ENV,
            name=lang.name,
            module=lang.module,
        )
    encoder = srv.launch(enc, log_dir, wait=False)
    language = srv.launch(lang, log_dir, wait=False)
    try:
        encoder.wait_ready()
        language.wait_ready()
        router = srv.launch_router([(encoder, bootstrap_port)], [language], log_dir)
    except BaseException:  # an interrupted start leaves no server behind
        encoder.stop()
        language.stop()
        raise
    return router, encoder, language


def _deployment(server_pool, servers_handle, vl_model, **tp):
    key = ("encode-language-tp", vl_model, tuple(sorted(tp.items())))
    group = server_pool._group(
        key, 2, lambda: _launch(vl_model, server_pool.log_dir, **tp)
    )
    return group


@pytest.fixture()
def language_tp2(server_pool, servers, vl_model):
    router, encoder, language = _deployment(
        server_pool, servers, vl_model, encode_tp=1, language_tp=2
    )
    yield router, encoder, language
    assert_blocks_free(encoder, language)


def _delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0) - before.get(key, 0)


def _check_equal_hf(router, vl_model, case) -> dict:
    expected_tokens, expected_logprobs = _hf_reference(vl_model, case)
    out = _generate(router, vl_model, case)
    assert out["output_ids"] == expected_tokens, case.name
    got = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
    assert got == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE), case.name
    return out


@pytest.mark.parametrize("name", ["one_image", "non_square", "text_only"])
def test_language_tp2_matches_hf_with_one_receive(language_tp2, vl_model, name) -> None:
    router, encoder, language = language_tp2
    case = CASES[name]
    enc_before = encode_language_metrics(encoder)
    lang_before = encode_language_metrics(language)
    _check_equal_hf(router, vl_model, case)
    enc_after = encode_language_metrics(encoder)
    lang_after = encode_language_metrics(language)
    if case.images:
        # The encoder sent once, to one destination (a second reservation of the room by
        # another rank would have been refused, and each would have its own bytes).
        assert _delta(enc_after, enc_before, "requests.success") == 1
        assert _delta(enc_after, enc_before, "bytes") > 0
        _BYTES_SENT[(name, 2)] = _delta(enc_after, enc_before, "bytes")
        # Language side (counters summed over the two rank processes): one network receive,
        # one broadcast sent by rank 0, one received by rank 1.
        assert _delta(lang_after, lang_before, "requests.success") == 1, lang_after
        assert _delta(lang_after, lang_before, "requests.tp_broadcast") == 1
        assert _delta(lang_after, lang_before, "requests.tp_received") == 1
    else:
        assert _delta(enc_after, enc_before, "bytes") == 0
        for key in (
            "requests.success",
            "requests.tp_broadcast",
            "requests.tp_received",
        ):
            assert _delta(lang_after, lang_before, key) == 0, key


@pytest.fixture()
def encode_tp2(server_pool, servers, vl_model):
    router, encoder, language = _deployment(
        server_pool, servers, vl_model, encode_tp=2, language_tp=1
    )
    yield router, encoder, language
    assert_blocks_free(encoder, language)


@pytest.mark.parametrize("name", ["one_image", "text_only"])
def test_encode_tp2_matches_hf(encode_tp2, vl_model, name) -> None:
    """Encode ``--tp 2``: both ranks run the TP vision tower, rank 0 alone sends (the
    encoder's counters, exported by rank 0 only, count one transfer)."""
    router, encoder, _ = encode_tp2
    case = CASES[name]
    before = encode_language_metrics(encoder)
    _check_equal_hf(router, vl_model, case)
    after = encode_language_metrics(encoder)
    if case.images:
        assert _delta(after, before, "requests.success") == 1
        assert _delta(after, before, "bytes") > 0
        # Same image to a TP 1 language server: the same bytes as to the TP 2 one (run first
        # in this file), i.e. the TP 2 server received one copy.
        if (name, 2) in _BYTES_SENT:
            assert _delta(after, before, "bytes") == _BYTES_SENT[(name, 2)]
    else:
        assert _delta(after, before, "bytes") == 0
        assert _delta(after, before, "requests.local") == 1
