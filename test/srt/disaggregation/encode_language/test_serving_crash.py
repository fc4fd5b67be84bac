"""An encoder crash at production defaults (issue 16, item 2).

The deployment is the production one of ``test_serving_burst.py`` (``servers.production``:
256 blocks of 128 tokens, 2048 reserved tokens, 120 s fence timeout, the default liveness
window of 5 s x 2): two encode servers, one language server, SGLang's own router. The last test
kills encode A with its requests queued, so this module runs after the burst test (file order)
and the pool relaunches the group for any later user (``ServerPool._group`` restarts a group
with a dead member). Both tests pause A's vision tower (the test bed's ``slow_vit_server``) to
hold the language side's requests waiting for rows on purpose.

Real components: ``sglang_router.launch_router``, three ``sglang.launch_server`` processes,
Mooncake over TCP loopback, HTTP; the tiny K=3 checkpoint, fp32, greedy.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request
import uuid

import pytest
from el_serving import (
    CASES,
    LOGPROB_TOLERANCE,
    _greedy_body,
    assert_blocks_free,
    hf_reference,
    post_as_router,
)
from epd_testbed.cases import LARGE_CASES, Case
from epd_testbed.hf_reference import render_prompt
from epd_testbed.servers import (
    RequestError,
    encode_language_metrics,
    process_group_cpu_seconds,
)
from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint

pytestmark = pytest.mark.server

QUEUED = 16  # requests pinned to encode A: 16 x 16 blocks, the whole pool
POOL_FILLING = next(c for c in LARGE_CASES if c.name == "over_reservation")
SURVIVOR_OK = 4  # successes through the router after the first one
WAIT_S = 120  # bound of every wait (never asserted as a timing)
CPU_WINDOW_S = 3.0  # how long the language server's CPU use is measured while it waits


@pytest.fixture(scope="module")
def vl_model() -> str:
    return str(ensure_checkpoint(TinyVLMoeSpec()))


def _body(model_path: str, case: Case) -> dict:
    """The case's request in a prefix-cache namespace of its own (``extra_key``): no earlier
    request's cached prompt can hold its images, so it reserves blocks and waits for its
    rows (a fully held request takes no round: ``all_held``)."""
    prompt, image_paths = render_prompt(model_path, case.messages())
    return _greedy_body(prompt) | {
        "image_data": image_paths,
        "extra_key": uuid.uuid4().hex,
    }


def _post_pinned(result: dict, encoder, language, body: dict) -> None:
    """One request as the router sends it, to ``encoder`` and ``language``: its output or
    its error in ``result``, and when it ended (``"at"``)."""
    try:
        result["out"] = post_as_router(encoder, language, body, timeout=WAIT_S)
    except RequestError as e:
        result["error"] = str(e)
    result["at"] = time.monotonic()


def _check(out: dict, reference) -> None:
    tokens, logprobs = reference
    assert out["output_ids"] == tokens
    got = [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]
    assert got == pytest.approx(logprobs, abs=LOGPROB_TOLERANCE)


def test_language_scheduler_sleeps_while_requests_wait_for_rows(
    servers, vl_model
) -> None:
    """With ``--sleep-on-idle`` (every test-bed server), a language scheduler that has nothing
    to run but requests waiting for their rows sleeps until their transfer moves (it spun a
    core before, as a PD server's does, against the encoder on a shared host): while A's
    vision tower is paused with two requests reserved, the language server's processes use
    under 30% of one core (spinning: about 100%), and its ``/health`` answers 200 (a health
    check is not held behind them); once A goes on, both requests complete equal to HF (the
    wake-up works) and every block is free."""
    router, enc_a, enc_b, language = servers.production(vl_model)
    case = CASES["one_image"]
    reference = hf_reference(vl_model, case)
    results: list[dict] = [{} for _ in range(2)]
    body = _body(vl_model, case)
    threads = [
        threading.Thread(
            target=_post_pinned, args=(r, enc_a, language, body), daemon=True
        )
        for r in results
    ]
    pause = enc_a.extra["vit_pause_file"]
    pause.touch()
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + WAIT_S
        while encode_language_metrics(language).get("blocks.in_use", 0) < 1:
            assert time.monotonic() < deadline, "the requests never reserved blocks"
            time.sleep(0.05)
        time.sleep(0.5)  # the second request's reservation, if any, and the gauge reads
        cpu_before, t0 = process_group_cpu_seconds([language.pid]), time.monotonic()
        time.sleep(CPU_WINDOW_S)
        cpu_after, t1 = process_group_cpu_seconds([language.pid]), time.monotonic()
        # Upstream's /health runs a one-token request from the fake bootstrap host: it
        # passes the requests waiting for rows and is answered (the router keeps the server).
        with urllib.request.urlopen(language.url + "/health", timeout=WAIT_S) as r:
            health = r.status
        still_waiting = encode_language_metrics(language).get("blocks.in_use", 0)
    finally:
        pause.unlink()
    for t in threads:
        t.join(WAIT_S)
    assert cpu_before[language.pid] > 0, "the language server's processes not found"
    share = (cpu_after[language.pid] - cpu_before[language.pid]) / (t1 - t0)
    print(
        f"\nlanguage server CPU while its requests waited for rows: {share:.0%} of a core"
    )
    assert share < 0.3, f"the language server used {share:.0%} of a core while waiting"
    assert (health, still_waiting > 0) == (200, True), (health, still_waiting)
    for r in results:
        assert "out" in r, r
        _check(r["out"], reference)
    assert_blocks_free(language, enc_a, enc_b)


def test_encoder_crash_fails_only_its_requests_and_frees_blocks_at_once(
    servers, vl_model
) -> None:
    """issue 16: item 2. Encode A is killed (kill -9) with 16 image requests sent to it (as
    the router sends a PD request: the same body to A and to the language server), each
    longer than the 2048-token reservation, so together they can reserve the language
    server's whole 256-block pool, and killed while the language side holds blocks for some
    of them that A has not written: each of those still waiting fails once with 503 and a
    reason (A unreachable, by the liveness verdict); the blocks they held come back at once,
    exposed (the gauge), so requests through the router keep succeeding on B (equal to HF,
    logprobs within tolerance): before the fix those blocks stayed fenced for the 120 s fence
    timeout and B's requests waited for them. The only router requests that may fail are
    those routed to A before the router dropped it, each a 5xx with a reason; every block of
    the language server and B is free after. Prints the time from the kill to the first success and the
    failure counts (no timing is asserted). Then B is killed too: the router answers with
    a 5xx, no hang.
    """
    router, enc_a, enc_b, language = servers.production(vl_model)
    case = CASES["one_image"]
    reference = hf_reference(vl_model, case)
    pinned_reference = hf_reference(vl_model, POOL_FILLING)
    _check(router.post("/generate", _body(vl_model, case)), reference)  # warm

    pinned: list[dict] = [{} for _ in range(QUEUED)]
    pinned_body = _body(vl_model, POOL_FILLING)

    def in_use() -> float:
        return encode_language_metrics(language).get("blocks.in_use", 0)

    # Kill A while the language side holds blocks A has not written: A's vision tower does not
    # return while the pause file exists (the test bed's slow_vit_server), and it runs only
    # for requests whose round-0 blocks the language side has reserved, so once the gauge
    # shows a reservation, A holds those blocks unwritten until it dies. (Racing a kill
    # against A's writes instead failed whenever A wrote everything first.)
    pause = enc_a.extra["vit_pause_file"]
    pause.touch()
    try:
        threads = [
            threading.Thread(
                target=_post_pinned,
                args=(r, enc_a, language, pinned_body),
                daemon=True,
            )
            for r in pinned
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + WAIT_S
        while (held := in_use()) < 16:
            assert time.monotonic() < deadline, "the requests never reserved blocks"
            time.sleep(0.05)
        killed = time.monotonic()
        os.killpg(enc_a.pid, signal.SIGKILL)
    finally:
        pause.unlink()  # B shares the file; it never held a request meanwhile

    # Through the router: until the first success, then SURVIVOR_OK more.
    router_failures: list[str] = []
    first_success = None
    successes = 0
    while successes <= SURVIVOR_OK:
        assert time.monotonic() - killed < WAIT_S, router_failures
        try:
            out = router.post("/generate", _body(vl_model, case), timeout=WAIT_S)
        except RequestError as e:
            assert first_success is None, f"a failure after the first success: {e}"
            router_failures.append(str(e))
            continue
        _check(out, reference)
        if first_success is None:
            first_success = time.monotonic() - killed
        successes += 1

    for t in threads:
        t.join(WAIT_S)
        assert not t.is_alive(), "a request pinned to the dead encoder hangs"
    pinned_failed = [r for r in pinned if "error" in r]
    for r in pinned:
        if "out" in r:  # finished before the kill
            _check(r["out"], pinned_reference)
        else:  # the liveness verdict, not a fence or bootstrap timeout
            assert re.search(
                r"HTTP 503: .*(unreachable \(missed|declared dead \(it missed) 2 "
                r"heartbeats\)",
                r["error"],
            ), r
    # A's blocks came back exposed (a late write of the dead encoder is checksummed away):
    # every block held for A when it was killed
    assert encode_language_metrics(language).get("exposed_blocks", 0) >= held
    for e in router_failures:
        assert re.search(r"HTTP 5\d\d: .+", e), e
    last_failure = max((r["at"] - killed for r in pinned_failed), default=0.0)
    print(
        f"\nencoder crash: first success through the router {first_success:.1f} s after "
        f"kill -9 ({held:.0f} language blocks held for it, all exposed); "
        f"{len(pinned_failed)} of {QUEUED} requests on the dead encoder failed (503, "
        f"the last {last_failure:.1f} s after the kill), {len(router_failures)} router "
        "requests failed before it dropped the dead encoder"
    )
    assert pinned_failed, "no request was queued on the dead encoder"
    assert_blocks_free(language, enc_b)

    # No encoder left: the router answers with an error, nobody hangs (the group is not
    # used after this test).
    os.killpg(enc_b.pid, signal.SIGKILL)
    with pytest.raises(RequestError, match="HTTP 5"):
        router.post("/generate", _body(vl_model, case), timeout=WAIT_S)
