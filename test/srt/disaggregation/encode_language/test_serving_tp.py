"""Encode/language disaggregation with tensor parallelism, through SGLang's own router.

The main deployment, ``--tp 2`` on both sides (two scheduler ranks per server on this CPU:
``SGLANG_CPU_OMP_THREADS_BIND="0|1"``). The two sides meet only through their owners (attention-TP
rank 0 of each), so one deployment exercises both rank-1 paths:

* Language ``--tp 2``: one receive per server. Only rank 0 reserves and receives; rank 1 gets the
  rows over the TP group (gloo here). Every answer equals Hugging Face fp32 (token ids, and
  per-token logprobs within 1e-3), all blocks are free on both servers afterwards, and the
  metrics show one transfer sent by the encoder, one network receive (``success``, counted by the
  receiving rank only) plus one broadcast sent by rank 0 and one broadcast received by rank 1 per
  image request.
* Encode ``--tp 2``: both ranks run upstream's TP vision tower, rank 0 alone owns the transfer;
  the answers equal Hugging Face and all blocks are free. A request the encoder's tokenizer
  refuses (unreadable image, undecodable bytes, too long a prompt, a client gone during
  preprocessing) is answered 4xx and every rank survives the abort it broadcasts.

A second deployment, encode ``--tp 2`` with a ``--tp 1`` language server (the prefix-aware
skip needs one receive per server on one rank), shows that skip on both encode ranks: items
held in part (the owner broadcasts which) and a request held whole (``all_held``).

TP 1 on either side is every other serving test's deployment. The tiny K=3 checkpoint (4
attention heads, 2 KV heads, 4 vision heads) divides by 2.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import threading
import time
import urllib.request

import pytest
from el_serving import (
    CASES,
    LOGPROB_TOLERANCE,
    ask_counting_skips,
    assert_blocks_free,
    fresh_system_prompt,
)
from el_serving import generate as _generate
from el_serving import hf_reference as _hf_reference
from el_serving import image_messages
from epd_testbed import servers as srv
from epd_testbed.hf_reference import render_prompt
from epd_testbed.images import save_image
from epd_testbed.servers import RequestError, encode_language_metrics
from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint

pytestmark = pytest.mark.server

TP_ENV = (("SGLANG_CPU_OMP_THREADS_BIND", "0|1"),)


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


def _deployment(server_pool, vl_model, **tp):
    """(router, encode, language) with the given TP sizes, shared through the session's
    server pool; every block free on both servers after the test."""
    key = ("encode-language-tp", vl_model, tuple(sorted(tp.items())))
    router, encoder, language = server_pool._group(
        key, 2, lambda: _launch(vl_model, server_pool.log_dir, **tp)
    )
    yield router, encoder, language
    assert_blocks_free(encoder, language)


@pytest.fixture()
def tp2(server_pool, vl_model):
    yield from _deployment(server_pool, vl_model, encode_tp=2, language_tp=2)


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
def test_language_tp2_matches_hf_with_one_receive(tp2, vl_model, name) -> None:
    router, encoder, language = tp2
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


@pytest.mark.parametrize("name", ["one_image", "text_only"])
def test_encode_tp2_matches_hf(tp2, vl_model, name) -> None:
    """Encode ``--tp 2``: both ranks run the TP vision tower, rank 0 alone sends (the
    encoder's counters, exported by rank 0 only, count one transfer; a text-only request
    none: it is served locally)."""
    router, encoder, _ = tp2
    case = CASES[name]
    before = encode_language_metrics(encoder)
    _check_equal_hf(router, vl_model, case)
    after = encode_language_metrics(encoder)
    if case.images:
        assert _delta(after, before, "requests.success") == 1
        assert _delta(after, before, "bytes") > 0
    else:
        assert _delta(after, before, "bytes") == 0
        assert _delta(after, before, "requests.local") == 1


class _ImageURL(http.server.ThreadingHTTPServer):
    """A local image URL that answers ``image`` (bytes), else 404 (an image that cannot be
    read); with ``stall`` only once the test sets ``release`` (bounded): the encode server's
    tokenizer manager is still loading the request's media meanwhile."""

    def __init__(self, stall: bool = False, image: bytes | None = None) -> None:
        self.requested, self.release = threading.Event(), threading.Event()
        if not stall:
            self.release.set()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requested.set()
                outer.release.wait(60)
                if image is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/image.png"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


@pytest.fixture()
def image_url():
    made = []

    def make(stall: bool = False, image: bytes | None = None) -> _ImageURL:
        made.append(_ImageURL(stall, image))
        return made[-1]

    yield make
    for server in made:
        server.close()


# What the encode server's tokenizer manager refuses before its scheduler sees it (each is then
# an AbortReq broadcast to every encode rank, naming the failed bootstrap room).
_REFUSED = {
    "unreadable_url": lambda image_url: dict(image=image_url().url),
    "undecodable": lambda _: dict(
        image="data:image/png;base64," + base64.b64encode(b"not an image").decode()
    ),
    # past the context length (8192 tokens) on both sides' tokenizers
    "too_long": lambda _: dict(text=" ".join(["word"] * 9000)),
}


def _body(vl_model, text: str = "", image=None) -> dict:
    prompt, image_paths = render_prompt(vl_model, CASES["one_image"].messages())
    return {
        "text": prompt + text,
        "image_data": [image] if image is not None else image_paths,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 4},
    }


def _serves_after(router, encoder, language, vl_model) -> None:
    """Both servers up; the next image request equals Hugging Face."""
    _check_equal_hf(router, vl_model, CASES["one_image"])
    for server in (encoder, language):
        with urllib.request.urlopen(server.url + "/health", timeout=30) as r:
            assert r.status == 200, server.spec.name


@pytest.mark.parametrize("trigger", list(_REFUSED))
def test_encode_tp2_survives_a_refused_request(
    tp2, vl_model, image_url, trigger
) -> None:
    """issue: blockers item 2. A request the encode server refuses before its scheduler (the
    tokenizer manager cannot load or validate it) fails its bootstrap room through an abort
    broadcast to both encode ranks; only rank 0 owns the transfer: the client gets a 4xx and
    both servers keep serving (the next image request equals Hugging Face, every block free).
    """
    router, encoder, language = tp2
    with pytest.raises(RequestError, match=r"HTTP 4\d\d"):
        router.post("/generate", _body(vl_model, **_REFUSED[trigger](image_url)))
    _serves_after(router, encoder, language, vl_model)


def test_encode_tp2_survives_a_client_gone_during_preprocessing(
    tp2, vl_model, image_url
) -> None:
    """issue: blockers item 2. A streamed request whose client closes its connection to the
    router while the encode server still loads the request's image: the router closes its
    upstream connections, the encode server's HTTP server cancels the request
    (``asyncio.CancelledError`` in its tokenizer manager) and refuses its room with an abort
    broadcast to both ranks, while the image is still not answered (a load that went on
    would have got a valid image and no refusal). Both servers keep serving."""
    router, encoder, language = tp2
    _, image_paths = render_prompt(vl_model, CASES["one_image"].messages())
    with open(image_paths[0], "rb") as f:
        image = image_url(stall=True, image=f.read())
    failed = encode_language_metrics(encoder).get("requests.failed", 0)
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=60)
    conn.request(
        "POST",
        "/generate",
        body=json.dumps(_body(vl_model, image=image.url) | {"stream": True}),
        headers={"Content-Type": "application/json"},
    )
    assert image.requested.wait(60), "the encode server never fetched the image"
    conn.close()
    # the refusal was counted (rank 0 processed the abort) before the image was answered
    deadline = time.monotonic() + 30
    while encode_language_metrics(encoder).get("requests.failed", 0) == failed:
        assert (
            time.monotonic() < deadline
        ), "the encode server did not refuse the request when its client left"
        time.sleep(0.2)
    assert not image.release.is_set()
    image.release.set()
    _serves_after(router, encoder, language, vl_model)


@pytest.fixture()
def encode_tp2(server_pool, vl_model):
    """Encode ``--tp 2`` with a ``--tp 1`` language server: the prefix-aware skip's setup."""
    yield from _deployment(server_pool, vl_model, encode_tp=2, language_tp=1)


def test_encode_tp2_skips_held_items_on_both_ranks(encode_tp2, vl_model) -> None:
    """The prefix-aware skip on a TP-2 encoder: image A alone, then A and B behind the same
    system prompt (A held: rank 0 broadcasts the held items, so both ranks run the TP vision
    tower on B alone), then A and B again (all held: every rank finishes the request without
    a vision tower or a round). Each answer equals HF; every block is free afterwards.
    """
    router, encoder, _ = encode_tp2
    system = fresh_system_prompt()
    image_a, image_b = save_image(72, 64, 17101), save_image(72, 64, 17102)
    both = image_messages(system, (image_a, image_b), "Compare them.")
    first = ask_counting_skips(
        router, encoder, vl_model, image_messages(system, image_a, "Describe it.")
    )
    second = ask_counting_skips(router, encoder, vl_model, both)
    third = ask_counting_skips(router, encoder, vl_model, both)
    assert (first["held"], first["sent"], first["vit_calls"]) == (0, 1, 1), first
    assert (second["held"], second["sent"], second["vit_calls"]) == (1, 1, 1), second
    assert second["row_bytes"] == first["row_bytes"] > 0, (first, second)
    assert (third["held"], third["sent"], third["vit_calls"]) == (2, 0, 0), third
    assert (third["all_held"], third["rounds"], third["bytes"]) == (1, 0, 0), third
