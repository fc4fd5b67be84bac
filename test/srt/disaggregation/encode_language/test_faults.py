"""Faults between two real processes: each ends with the expected error, the other side still
serving, and every block free on both sides (make_lang's teardown and peer.assert_idle)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from types import SimpleNamespace

import pytest
import requests
from conftest import (
    RESERVE,
    EncodePeer,
    H,
    buffer_config,
    conn_config,
    new_room,
    ok_transfer,
    wait_final,
)
from el_helpers import (
    accounting_ok,
    assert_same,
    make_payload,
    send_control,
    wait_until,
)
from el_peer import poll_as_scheduler
from fastapi import HTTPException

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.encode_request_faults import (
    fault_of_exception,
    http_status,
    request_refused,
    room_failure,
    status_of_transfer_failure,
)
from sglang.srt.disaggregation.encode_language.item_table import ItemEntry
from sglang.srt.disaggregation.encode_language.manifest import (
    Abort,
    FaultKind,
    encode_message,
    make,
)
from sglang.srt.disaggregation.encode_language.receiver import Phase


def stuck_in_resume(peer, lang, room, total=4 * RESERVE):
    """Start a request and park it between rounds: the language side cannot get resume blocks
    because a blocker holds the rest of its pool. Returns (receiver, blocker handle)."""
    rx = lang.create_receiver(peer.addr, room)
    peer.call("create", room, total, 10)
    assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
    blocker = lang.allocator.alloc(lang.allocator.num_free(), owner="blocker")
    lang.config.resume_tokens = 2 * RESERVE  # needs more blocks than the request holds
    peer.call("send", room, 9, total, 10)
    assert wait_until(lambda: rx.phase == Phase.RESUME_ALLOC, 10)
    return rx, blocker


def test_sender_process_killed_mid_transfer(mp_ctx, peers, make_lang):
    """A killed encoder looks like a stalled one: its reserved blocks are fenced until the fence
    timeout (no abort_ack can come), then released."""
    victim = EncodePeer(mp_ctx, buffer_config(), conn_config())
    lang = make_lang(fence_timeout_s=1.0)
    room = new_room()
    rx, blocker = stuck_in_resume(victim, lang, room)
    victim.kill()
    blocker.free()
    assert wait_final(lang, rx) == KVPoll.Failed
    assert f"peer {victim.addr} is unreachable" in rx.reason
    ok_transfer(peers(), lang)  # the language side keeps serving other encoders
    assert wait_until(lambda: not lang.fences, 10)
    assert accounting_ok(lang.allocator)["quarantined"] == 0


def test_one_rooms_error_fails_that_room_not_the_control_thread(
    peers, make_lang, monkeypatch
):
    """Review of issue 16, finding 6: an error in one room's step of the control thread's tick
    fails that room with a clear reason; the tick goes on for every other room (admissions,
    timers, heartbeats), so the next request completes. Before, the error left the tick on
    every pass, before admissions: no later request was ever reserved. The error is injected
    (the allocator's realloc raises for the parked room's resume): no input provokes one.
    """
    peer = peers()
    lang = make_lang()
    room = new_room()
    rx, blocker = stuck_in_resume(peer, lang, room)
    realloc = lang.allocator.realloc

    def failing_realloc(handle, *args, **kwargs):
        if handle is rx.handle:
            raise RuntimeError("injected")
        return realloc(handle, *args, **kwargs)

    monkeypatch.setattr(lang.allocator, "realloc", failing_realloc)
    blocker.free()  # wakes the control thread: the resume is tried again
    assert wait_final(lang, rx) == KVPoll.Failed
    assert rx.reason == "internal error: injected"
    lang.config.resume_tokens = None
    ok_transfer(peer, lang)
    peer.assert_idle()


def test_receiver_abort_mid_transfer(peers, make_lang):
    peer = peers()
    lang = make_lang()
    room = new_room()
    rx, blocker = stuck_in_resume(peer, lang, room)
    rx.abort()
    assert (
        wait_final(lang, rx) == KVPoll.Failed
        and rx.reason == "aborted by language side"
    )
    assert peer.call("wait", room, 10) == (
        KVPoll.Failed,
        f"aborted by language side {lang.manager_id}: aborted by language side",
    )
    blocker.free()
    lang.config.resume_tokens = None
    ok_transfer(peer, lang)
    peer.assert_idle()


def test_receiver_abort_while_encoder_may_write_waits_for_ack(peers, make_lang):
    """Aborting a reserved receiver keeps its blocks until the encoder acknowledges."""
    peer = peers()
    lang = make_lang()
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    peer.call("create", room, 20, 5)
    assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
    rx.abort("client went away")
    assert rx.poll() == KVPoll.Failed
    assert wait_final(lang, rx) == KVPoll.Failed  # finished = released after AbortAck
    assert peer.call("wait", room, 10)[0] == KVPoll.Failed
    ok_transfer(peer, lang)
    peer.assert_idle()


def test_encoder_abort(peers, make_lang):
    peer = peers()
    lang = make_lang()
    room = new_room()
    rx, blocker = stuck_in_resume(peer, lang, room)
    peer.call("abort", room)
    assert peer.call("wait", room, 10) == (KVPoll.Failed, "aborted by encoder")
    assert wait_final(lang, rx) == KVPoll.Failed
    assert rx.reason == f"encoder {peer.addr} aborted: aborted by encoder"
    blocker.free()
    lang.config.resume_tokens = None
    ok_transfer(peer, lang)
    peer.assert_idle()


def test_bootstrap_timeout_language_side(make_lang, peers):
    """No encoder listens at the bootstrap address: the registration times out."""
    lang = make_lang(bootstrap_timeout_s=0.5)
    rx = lang.create_receiver("127.0.0.1:9", new_room())
    assert wait_final(lang, rx) == KVPoll.Failed
    assert rx.reason.startswith(
        "bootstrap timeout: encoder 127.0.0.1:9 did not answer registration"
    )
    ok_transfer(peers(), lang)


def test_bootstrap_timeout_encoder_side(peers, make_lang):
    """The encoder has the request but no language server ever expects it."""
    peer = peers(bootstrap_timeout_s=0.5)
    lang = make_lang()
    room = new_room()
    peer.call("create", room, 20, 5)
    assert peer.call("wait", room, 10) == (
        KVPoll.Failed,
        "bootstrap timeout: no language server expected the request within 0.5s",
    )
    ok_transfer(peer, lang)
    peer.assert_idle()


def test_waiting_timeout(peers, make_lang):
    """Blocks reserved but the encoder never sends: the language side gives up and frees them."""
    peer = peers()
    lang = make_lang(waiting_timeout_s=0.5)
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    peer.call("create", room, 20, 5)
    assert wait_final(lang, rx) == KVPoll.Failed
    assert rx.reason == "waiting timeout: no data from encoder within 0.5s"
    assert peer.call("wait", room, 10)[0] == KVPoll.Failed
    ok_transfer(peer, lang)
    peer.assert_idle()


def test_transfer_timeout_encoder_stopped(mp_ctx, make_lang, peers):
    """The encoder process freezes (SIGSTOP) between rounds: transfer timeout; when it thaws it
    acknowledges the abort and the blocks come back. The language side waits for the round the
    encoder's own bound for it (``round_timeout_s``): staging (0.2 s) + Mooncake's timeout
    (MC_TRANSFER_TIMEOUT=5 s in el_helpers; the bytes are negligible) + data_write_timeout_s
    (0.1 s) + transfer_grace_s (0.2 s)."""
    victim = EncodePeer(mp_ctx, buffer_config(), conn_config(heartbeat_interval_s=30))
    try:
        lang = make_lang(
            transfer_timeout_s=0.2,
            data_write_timeout_s=0.1,
            transfer_grace_s=0.2,
            heartbeat_interval_s=30,
        )
        room = new_room()
        rx, blocker = stuck_in_resume(victim, lang, room)
        os.kill(victim.pid, signal.SIGSTOP)
        blocker.free()
        assert wait_until(lambda: rx.poll() == KVPoll.Failed, 15)
        assert rx.reason == "transfer timeout: round 1 did not arrive within 5.5s"
        # Blocks fenced, not freed: the encoder might still write.
        assert wait_until(lambda: rx.finished, 10)
        assert (
            accounting_ok(lang.allocator)["quarantined"]
            == len(lang.fences[(victim.addr, room)].handle)
            > 0
        )
        os.kill(victim.pid, signal.SIGCONT)
        assert wait_final(lang, rx) == KVPoll.Failed
        assert victim.call("wait", room, 10)[0] == KVPoll.Failed
        victim.assert_idle()
    finally:
        os.kill(victim.pid, signal.SIGCONT)
        victim.close()


def test_resume_timeout_both_sides(peers, make_lang):
    peer = peers(resume_timeout_s=0.5)
    lang = make_lang(resume_timeout_s=60)
    room = new_room()
    rx, blocker = stuck_in_resume(peer, lang, room)
    assert peer.call("wait", room, 10) == (
        KVPoll.Failed,
        "resume timeout: the language server did not ask for round 1 within 0.5s",
    )
    assert wait_final(lang, rx) == KVPoll.Failed and "resume timeout" in rx.reason
    blocker.free()
    lang.config.resume_tokens = None
    # language-side resume timeout
    lang2 = make_lang(resume_timeout_s=0.5)
    room = new_room()
    rx, blocker = stuck_in_resume(peers(), lang2, room)
    assert wait_final(lang2, rx) == KVPoll.Failed
    assert rx.reason == "resume timeout: no blocks for round 1 within 0.5s"
    assert peers().call("wait", room, 10)[0] == KVPoll.Failed
    blocker.free()
    ok_transfer(peer, lang)
    peer.assert_idle()
    peers().assert_idle()


def test_layout_mismatch_both_sides(peers, make_lang):
    peer = peers()
    lang = make_lang(hidden=H * 2)
    rx = lang.create_receiver(peer.addr, new_room())
    assert wait_final(lang, rx) == KVPoll.Failed
    assert (
        "buffer layout mismatch with encoder: field 'hidden_size' is 64 here but 32 on the peer"
        in rx.reason
    )
    assert lang.manager_id not in peer.state()["peers"]  # refused: never written to
    lang_k = make_lang(k=2)
    rx = lang_k.create_receiver(peer.addr, new_room())
    assert wait_final(lang_k, rx) == KVPoll.Failed
    assert "field 'deepstack_count' is 2 here but 3 on the peer" in rx.reason
    assert lang_k.manager_id not in peer.state()["peers"]
    ok_transfer(peer, make_lang())  # the encoder keeps serving matching peers
    peer.assert_idle()


def test_garbage_control_messages(peers, make_lang):
    peer = peers()
    lang = make_lang()
    before = peer.state()["rejected"]
    garbage = [
        b"",
        b"\xff\xfe",
        b"not msgpack",
        encode_message(
            make(Abort, room=1, manager_id="x", reason="r", kind=FaultKind.CLIENT)
        )[:-3],
        b"\x82\xa4type\xa7unknown\xa7version\x01",
        # well formed, but names no endpoint to answer (a sender that is not host:port)
        encode_message(
            make(Abort, room=1, manager_id="garbage", reason="r", kind=FaultKind.CLIENT)
        ),
    ]
    for g in garbage:
        send_control(peer.addr, g)
        send_control(lang.manager_id, g)
    assert wait_until(lambda: lang.channel.rejected == len(garbage), 10)
    assert peer.state()["rejected"] == before + len(garbage)
    ok_transfer(peer, lang)
    peer.assert_idle()


def test_bad_reservation_fails_only_that_request(peers, make_lang):
    """A reservation naming blocks outside the peer's pool is refused; the encoder lives on."""
    from sglang.srt.disaggregation.encode_language.manifest import Reserve

    peer = peers()
    lang = make_lang()
    ok_transfer(peer, lang)  # registers lang with the peer
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    peer.call("create", room, 20, 3)
    assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
    bad = make(
        Reserve,
        room=new_room(),
        manager_id=lang.manager_id,
        epoch=rx.epoch,
        round=0,
        generation=1,
        blocks=[10_000],
        max_tokens=0,
        checksum=False,
    )
    lang.channel.send(peer.addr, bad)
    peer.call("send", room, 2, 20, 3)
    assert peer.call("wait", room, 10)[0] == KVPoll.Success
    assert wait_final(lang, rx) == KVPoll.Success
    peer.assert_idle()


def test_oversize_rejected_at_the_announcement(peers, make_lang):
    """A reservation is min(blocks the announced request needs, reserve): a reserve larger
    than the pool fails only a request that needs more than the pool, on both sides, as a
    client fault; a smaller request under the same reserve goes through."""
    peer = peers()
    lang = make_lang(num_blocks=4)
    room = new_room()
    rx = lang.create_receiver(peer.addr, room, reserve_tokens=33)
    # 5 blocks of 8 tokens; failed at the announcement, before any payload (the ViT) exists
    peer.call("create", room, 33, 4)
    assert wait_final(lang, rx) == KVPoll.Failed
    assert "request needs 5 blocks but the whole pool has 4" in rx.reason
    assert wait_until(lambda: peer.call("poll", room)[0] == KVPoll.Failed, 10)
    status, reason, kind = peer.call("fault", room)
    assert "request needs 5 blocks but the whole pool has 4" in reason
    assert rx.kind is FaultKind.CLIENT and kind is FaultKind.CLIENT
    assert peer.call("wait", room, 10)[0] == KVPoll.Failed
    room = new_room()
    rx = lang.create_receiver(peer.addr, room, reserve_tokens=33)
    peer.call("send", room, 2, 20, 4)  # 3 blocks: fits, one round
    assert peer.call("wait", room, 10) == (KVPoll.Success, "")
    assert wait_final(lang, rx) == KVPoll.Success
    assert_same(rx.take(), make_payload(2, 20, 4, H, 3))
    room = new_room()
    rx = lang.create_receiver(peer.addr, room, max_tokens=40)
    peer.call("create", room, 41, 4)
    status, reason = peer.call("wait", room, 10)
    assert (
        status == KVPoll.Failed
        and "request has 41 tokens but the language server accepts at most 40" in reason
    )
    assert wait_final(lang, rx) == KVPoll.Failed and "accepts at most 40" in rx.reason
    ok_transfer(peer, lang)
    peer.assert_idle()


def test_randomized_faults_no_leak_no_hang(peers, make_lang):
    """Fixed seed; EL_FAULT_OPS=N for a longer run."""
    n_ops = int(os.environ.get("EL_FAULT_OPS", "200"))
    rnd = random.Random(1234)
    peer = peers(num_blocks=16)
    lang = make_lang(num_blocks=12)
    live = {}
    outcomes = {"ok": 0, "failed": 0}
    for op in range(n_ops):
        action = rnd.random()
        if action < 0.5 or not live:
            room = new_room()
            total = rnd.choice([1, 5, 8, 17, 40])
            rx = lang.create_receiver(peer.addr, room)
            live[room] = (rx, total, rnd.randint(0, total), op)
            if rnd.random() < 0.9:
                peer.call("send", room, op, total, live[room][2])
            else:
                # never sent: will be aborted below
                peer.call("create", room, total, live[room][2])
        else:
            room = rnd.choice(list(live))
            rx = live[room][0]
            what = rnd.random()
            if what < 0.3:
                rx.abort()
            elif what < 0.5:
                try:
                    peer.call("abort", room)
                except Exception:
                    pass  # encoder already finished or never had it
    for room, (rx, total, mm, seed) in live.items():
        if rx.poll() not in (KVPoll.Success, KVPoll.Failed) and rx.phase in (
            Phase.REGISTER,
            Phase.ANNOUNCE,
            Phase.ALLOC,
            Phase.RESERVED,
        ):
            if (
                wait_until(lambda: rx.poll() in (KVPoll.Success, KVPoll.Failed), 3)
                is False
            ):
                rx.abort("test cleanup")
        st = wait_final(lang, rx, 30)
        if st == KVPoll.Success:
            assert_same(rx.take(), make_payload(seed, total, mm, H, 3))
            outcomes["ok"] += 1
        else:
            outcomes["failed"] += 1
        try:
            peer.call("wait", room, 10)
        except Exception:
            pass
    assert outcomes["ok"] > 0 and outcomes["failed"] > 0
    peer.assert_idle()


# Typed fault kinds and fault injection (issue: blockers item 8) ---------------------------


def test_fault_kind_to_http_status():
    """issue: blockers item 8 (typed fault kinds): the one mapping from a fault kind to the
    HTTP status both servers answer."""
    assert {k: int(http_status(k)) for k in FaultKind} == {
        FaultKind.CLIENT: 400,
        FaultKind.TIMEOUT: 504,
        FaultKind.UNAVAILABLE: 503,
        FaultKind.INTERNAL: 500,
        FaultKind.NO_TRANSFER: 500,  # never answered: the language side runs the request
    }


@pytest.mark.parametrize(
    "exc,kind",
    [
        (TimeoutError("media download timed out"), FaultKind.TIMEOUT),
        (requests.ConnectTimeout("connect timed out"), FaultKind.TIMEOUT),
        (requests.ReadTimeout("read timed out"), FaultKind.TIMEOUT),
        (ConnectionResetError("reset by peer"), FaultKind.UNAVAILABLE),
        (BrokenPipeError("broken pipe"), FaultKind.UNAVAILABLE),
        # a media URL nobody answers at: unreadable media (test_serving_faults "unreachable_url")
        (requests.ConnectionError("connection refused"), FaultKind.CLIENT),
        (FileNotFoundError("/no/such.png"), FaultKind.CLIENT),
        (requests.HTTPError("404 Client Error"), FaultKind.CLIENT),
        (ValueError("Could not decode image"), FaultKind.CLIENT),
        (asyncio.CancelledError(), FaultKind.CLIENT),
        (RuntimeError("bug"), FaultKind.INTERNAL),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.value,
)
def test_what_stopped_a_request_is_classified(exc, kind):
    """issue: blockers item 8 (typed fault kinds): a timeout or a broken connection of this
    server is not the client's fault; unreadable media (a URL nobody answers at included) and
    invalid requests are."""
    assert fault_of_exception(exc) is kind


def upstream_answer(raised: BaseException) -> int:
    """The HTTP status upstream answers for what its tokenizer manager raised: an
    HTTPException's ``status_code`` (http_server's HTTPException handler for /generate,
    ``OpenAIServingBase.handle_request`` for the OpenAI endpoints), 400 for a ValueError
    (``http_server._create_error_response`` reads a ``status_code`` attribute, the OpenAI
    endpoints answer every ValueError 400: a ValueError must be a client fault), 500 for
    anything else."""
    if isinstance(raised, HTTPException):
        return raised.status_code
    return 400 if isinstance(raised, ValueError) else 500


@pytest.mark.parametrize(
    "exc,status,kind",
    [
        (TimeoutError("media download timed out"), 504, FaultKind.TIMEOUT),
        (ConnectionResetError("reset by peer"), 503, FaultKind.UNAVAILABLE),
        (FileNotFoundError("/no/such.png"), 400, FaultKind.CLIENT),
        (RuntimeError("bug"), 500, FaultKind.INTERNAL),
    ],
    ids=["timeout", "connection", "missing-file", "internal"],
)
def test_refused_request_carries_its_kind_to_the_room(exc, status, kind):
    """issue: blockers item 8 (typed fault kinds): the encode server's tokenizer refuses a
    request; the abort it hands the scheduler (for ``fail_room``) carries the kind, and only a
    client fault is raised as upstream's 400 (a ValueError). Before the fix TimeoutError and
    ConnectionError, being OSErrors, were answered 400 as client errors. The encode server's
    own answer carries the kind's status too, the one the language side answers (review of
    issue 15, finding 9: a timeout or a broken connection was re-raised as it was, which
    upstream answers 500, while the room's abort and the language side said 504 / 503).
    """
    sent = []
    tokenizer_manager = SimpleNamespace(_dispatch_to_scheduler=sent.append)
    obj = SimpleNamespace(
        rid="r1", bootstrap_room=7, bootstrap_host="10.0.0.1", is_single=True
    )
    raised = request_refused(
        tokenizer_manager, obj, {"r1": SimpleNamespace(dispatched=False)}, exc
    )
    (abort,) = sent
    assert abort.finished_reason["status_code"] == status
    assert room_failure(abort) == (7, abort.finished_reason["message"], kind)
    assert isinstance(raised, ValueError) == (kind is FaultKind.CLIENT)
    assert upstream_answer(raised) == status


def test_client_fault_arrives_typed_on_the_other_side(peers, make_lang):
    """issue: blockers item 8 (typed fault kinds): a client fault crosses the transport as a
    typed kind in both directions (no reason text is parsed): the encoder's refused request
    fails the language receiver with kind CLIENT (400), so does a reservation arriving after
    that failure; a language-side client abort fails the encoder's sender with kind CLIENT;
    a timeout arrives as TIMEOUT (504), never as a client fault."""
    peer = peers()
    lang = make_lang()
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    assert wait_until(lambda: rx.phase == Phase.ANNOUNCE, 10)
    peer.call(
        "fail_room", room, "client error: the image cannot be read", FaultKind.CLIENT
    )
    assert wait_final(lang, rx) == KVPoll.Failed
    assert (
        rx.reason
        == f"encoder {peer.addr} aborted: client error: the image cannot be read"
    )
    assert rx.kind is FaultKind.CLIENT and status_of_transfer_failure(rx) == 400
    # the same room, reserved after the failure
    late = lang.create_receiver(peer.addr, room)
    assert wait_final(lang, late) == KVPoll.Failed
    assert late.kind is FaultKind.CLIENT and "request already failed" in late.reason

    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    peer.call("create", room, 20, 5)
    assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
    rx.abort("the client disconnected", FaultKind.CLIENT)
    assert wait_until(lambda: peer.call("poll", room)[0] == KVPoll.Failed, 10)
    assert peer.call("fault", room) == (
        KVPoll.Failed,
        f"aborted by language side {lang.manager_id}: the client disconnected",
        FaultKind.CLIENT,
    )
    assert peer.call("wait", room, 10)[0] == KVPoll.Failed
    assert wait_final(lang, rx) == KVPoll.Failed

    timed_out = peers(bootstrap_timeout_s=0.3)  # its sender is never expected
    room = new_room()
    timed_out.call("create", room, 20, 5)
    assert wait_until(lambda: timed_out.call("poll", room)[0] == KVPoll.Failed, 10)
    status, reason, kind = timed_out.call("fault", room)
    assert reason.startswith("bootstrap timeout") and kind is FaultKind.TIMEOUT
    assert int(status_of_transfer_failure(SimpleNamespace(kind=kind))) == 504
    timed_out.call("wait", room, 1)
    ok_transfer(peer, lang)
    peer.assert_idle()
    timed_out.assert_idle()


def test_injected_failure_ends_the_room_on_both_sides(peers, make_lang):
    """issue: blockers item 8 (SGLANG_TEST_DISAGG_FAILURE_PROB): upstream injects the failure
    into the poll only (``poll_and_all_reduce``); the schedulers' poll (``poll_and_end_failed``)
    aborts the transfer it fails, so the room ends on both sides and no block stays held on
    either, whichever side the failure is injected on. Before, the scheduler dropped the
    request while its receiver kept its blocks reserved (until waiting_timeout_s) and the
    encoder kept the room."""
    peer = peers()
    # before any room: no heartbeat to miss
    peer.call("load_scheduler_poll", timeout=60)
    lang = make_lang()
    injected = "failure injected by SGLANG_TEST_DISAGG_FAILURE_PROB"
    # Language side.
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    peer.call("create", room, 20, 5)
    assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
    assert poll_as_scheduler(rx, 1.0) == KVPoll.Failed
    assert rx.poll() == KVPoll.Failed and rx.reason == injected
    # blocks back after the encoder's AbortAck
    assert wait_final(lang, rx) == KVPoll.Failed
    assert peer.call("wait", room, 10) == (
        KVPoll.Failed,
        f"aborted by language side {lang.manager_id}: {injected}",
    )
    # Encode side.
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    peer.call("create", room, 20, 5)
    assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
    assert peer.call("poll_scheduler", room, 1.0) == KVPoll.Failed
    assert peer.call("wait", room, 10) == (KVPoll.Failed, injected)
    assert wait_final(lang, rx) == KVPoll.Failed
    assert rx.reason == f"encoder {peer.addr} aborted: {injected}"
    # No injection: the same poll reports the transfer's own state and ends nothing.
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    peer.call("create", room, RESERVE, 5)
    assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
    assert poll_as_scheduler(rx, 0.0) == KVPoll.WaitingForInput
    peer.call("send", room, 1, RESERVE, 5)
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx) == KVPoll.Success
    assert_same(rx.take(), make_payload(1, RESERVE, 5, H, 3))
    peer.assert_idle()


def test_an_abort_the_full_control_queue_refused_is_sent_again(peers, make_lang):
    """A request the language side fails after the encoder's announcement, before any
    reservation (here: aborted while it waits for the prefix-cache match), tells the encoder
    with one Abort; an announced room waiting for its reservation has no timer on the
    encoder (that wait is load). A full control queue refuses that Abort (``send`` returns
    False, as on ``zmq.Again``; injected for the first Abort): it is sent again, the encoder's
    room ends and every block is free (before: the room stayed until the encode request's own
    HTTP abort)."""
    peer, lang = peers(), make_lang(prefix_match=True)
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    assert wait_until(lambda: (peer.call("room_state", room) or {}).get("expected"), 10)
    item = ItemEntry("image", ((1, 3),), 0x5EED)  # an announcement with an item table
    peer.call("create_shaped", room, 5, 3, [item.to_wire()], [1, 7, 7, 7, 2])
    assert wait_until(lambda: rx.phase == Phase.MATCH, 10)
    send, refused = lang.channel.send, []

    def full_once(endpoint, msg):
        if isinstance(msg, Abort) and not refused:
            refused.append(msg)
            return False
        return send(endpoint, msg)

    lang.channel.send = full_once
    rx.abort("the client went away", FaultKind.CLIENT)
    assert wait_final(lang, rx) == KVPoll.Failed
    assert [m.room for m in refused] == [room]
    assert wait_until(lambda: peer.call("room_state", room) is None, 10)
    assert not lang.unsent_aborts
    peer.assert_idle()
