"""Liveness between real processes: registrations that recover from a one-sided "peer dead",
dead peers heartbeated and revived, idle and dead peers forgotten, the encoder's in-flight payload
bound."""

from __future__ import annotations

import os
import signal
import time

from conftest import (
    RESERVE,
    B,
    EncodePeer,
    H,
    PeerError,
    buffer_config,
    conn_config,
    new_room,
    ok_transfer,
    wait_final,
)
from el_helpers import (
    accounting_ok,
    assert_same,
    declare_dead,
    make_payload,
    push_endpoints,
    record_checksummed_rounds,
    wait_until,
)

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.connection import ConnectionConfig
from sglang.srt.disaggregation.encode_language.encode_request_faults import (
    status_of_transfer_failure,
)
from sglang.srt.disaggregation.encode_language.manifest import FaultKind
from sglang.srt.disaggregation.encode_language.receiver import Phase


def test_false_dead_on_encoder_side_then_20_requests_succeed(peers, make_lang):
    """issue 7 item 8: the encoder declares a live language manager dead (and drops its
    registration); the language side's cached registration is refused with Unregistered, it
    registers again, and every later request succeeds."""
    peer = peers()
    lang = make_lang()
    ok_transfer(peer, lang)  # registered (epoch 1)
    epoch = lang.registrations[peer.addr].epoch
    peer.call("declare_dead", lang.manager_id)
    assert lang.manager_id not in peer.state()["peers"]
    for i in range(20):
        ok_transfer(peer, lang, seed=100 + i, total=RESERVE + i, mm=i)
    assert lang.registrations[peer.addr].epoch > epoch  # registered again, once
    peer.assert_idle()


def test_dead_peer_is_heartbeated_revived_and_dead_again(mp_ctx, make_lang):
    """issue 7 item 9: a peer declared dead is still pinged and a pong revives it; then it is
    declared dead again (really stopped) and revived again. The first verdict is forced on a live
    peer, so only pings sent after it can revive it. issue 16 item 2: its request's blocks are
    freed at once, exposed (not fenced), and it drops the room (it was told) once it runs.
    """
    victim = EncodePeer(mp_ctx, buffer_config(), conn_config(heartbeat_interval_s=30))
    lang = make_lang()
    try:
        for stop in (False, True):
            room = new_room()
            rx = lang.create_receiver(victim.addr, room)
            victim.call("create", room, 20, 5)
            assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
            if stop:
                os.kill(victim.pid, signal.SIGSTOP)
                assert wait_until(lambda: lang.peer_is_dead(victim.addr), 10)
            else:
                declare_dead(lang, victim.addr)
            assert wait_final(lang, rx) == KVPoll.Failed
            assert (
                "unreachable" in rx.reason or rx.reason == "declared dead by the test"
            )
            assert not lang.fences and lang.exposures.blocks
            assert accounting_ok(lang.allocator)["quarantined"] == 0
            if stop:
                os.kill(victim.pid, signal.SIGCONT)
            # revived by a pong
            assert wait_until(lambda: not lang.peer_is_dead(victim.addr), 10)
            # it dropped the room
            assert wait_until(lambda: victim.state()["rooms"] == 0, 10)
        ok_transfer(victim, lang)
        victim.assert_idle()
    finally:
        os.kill(victim.pid, signal.SIGCONT)
        victim.close()


def test_idle_and_dead_peers_are_forgotten(mp_ctx, peers, make_lang):
    """issue 7 item 13: a peer idle (or dead) for peer_prune_s is forgotten on both sides:
    health entry, registration and PUSH socket; it registers again when it comes back.
    """
    peer = peers(peer_prune_s=0.5)
    lang = make_lang(peer_prune_s=0.5, fence_timeout_s=0.5)
    ok_transfer(peer, lang)

    def forgotten_here(ep):
        return (
            ep not in lang.registrations
            and ep not in lang.health
            and ep not in push_endpoints(lang.channel)
        )

    assert wait_until(lambda: forgotten_here(peer.addr), 10)

    def forgotten_there():
        st = peer.state()
        return (
            lang.manager_id not in st["peers"] + st["push_endpoints"]
            and not st["health"]
        )

    assert wait_until(forgotten_there, 10)
    ok_transfer(peer, lang)  # both sides meet again
    victim = EncodePeer(mp_ctx, buffer_config(), conn_config())
    room = new_room()
    rx = lang.create_receiver(victim.addr, room)
    victim.call("create", room, 20, 5)
    assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
    victim.kill()
    assert wait_final(lang, rx) == KVPoll.Failed
    assert wait_until(lambda: forgotten_here(victim.addr), 15)
    peer.assert_idle()


def test_inflight_payload_bytes_are_bounded(peers, make_lang):
    """issue 7 item 13: the encoder holds payloads by reference until their last round; a
    send() past max_inflight_payload_bytes raises PayloadBudgetError and changes nothing, so the
    same request is admitted once earlier ones finished; a payload over the whole bound fails.
    """
    total, mm = 3 * RESERVE, 20
    nbytes = make_payload(1, total, mm, H, 3).nbytes()
    peer = peers(max_inflight_payload_bytes=nbytes + nbytes // 2)
    lang = make_lang()
    first, second = new_room(), new_room()
    peer.call("send", first, 1, total, mm)  # no destination yet: held
    assert peer.state()["inflight_payload_bytes"] == nbytes
    try:
        peer.call("send", second, 2, total, mm)
        raise AssertionError("second payload admitted past the bound")
    except PeerError as e:
        assert e.kind == "PayloadBudgetError"
        assert (
            f"encoder holds {nbytes} payload bytes; {nbytes} more would exceed" in e.msg
        )
    assert peer.call("poll", second) == (KVPoll.Bootstrapping, "")  # nothing changed
    rx1 = lang.create_receiver(peer.addr, first)
    assert peer.call("wait", first, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx1) == KVPoll.Success
    assert peer.state()["inflight_payload_bytes"] == 0
    rx2 = lang.create_receiver(peer.addr, second)
    peer.call("send", second, 2, total, mm)  # admitted now
    assert peer.call("wait", second, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx2) == KVPoll.Success
    assert_same(rx2.take(), make_payload(2, total, mm, H, 3))
    big = new_room()
    try:
        peer.call("send", big, 3, 4 * total, 4 * mm)
        raise AssertionError("payload over the whole bound admitted")
    except PeerError as e:
        assert e.kind == "OversizeError" and "can never be admitted" in e.msg
    assert peer.call("wait", big, 10)[0] == KVPoll.Failed
    peer.assert_idle()


def test_request_for_a_dead_encoder_fails_at_once(mp_ctx, make_lang):
    """issue: blockers item 8 (dead encoder): once the language side has declared an encoder
    dead (killed: it missed its heartbeats), a new request for it fails at once, typed
    UNAVAILABLE (HTTP 503) and holding no block, instead of waiting bootstrap_timeout_s (10 s
    here) with its blocks reserved. Its request that was in flight fails too (fenced).
    """
    victim = EncodePeer(mp_ctx, buffer_config(), conn_config())
    lang = make_lang(fence_timeout_s=1.0)
    room = new_room()
    rx = lang.create_receiver(victim.addr, room)
    victim.call("create", room, 20, 5)
    assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
    victim.kill()
    assert wait_until(lambda: lang.peer_is_dead(victim.addr), 10)
    assert wait_final(lang, rx) == KVPoll.Failed and rx.kind is FaultKind.UNAVAILABLE
    held = accounting_ok(lang.allocator)
    late = lang.create_receiver(victim.addr, new_room())
    assert late.poll() == KVPoll.Failed and late.finished  # at once, not after 10 s
    assert late.reason == (
        f"encoder {victim.addr} is declared dead (it missed 3 heartbeats); requests to it "
        f"fail until it answers a heartbeat again"
    )
    assert late.kind is FaultKind.UNAVAILABLE
    assert int(status_of_transfer_failure(late)) == 503
    assert accounting_ok(lang.allocator) == held  # it took no block
    victim.close()


def _mooncake_bound(lang, num_blocks: int, data_write_timeout_s: float) -> float:
    """Mooncake's own timeout for a write of ``num_blocks`` blocks (MC_TRANSFER_TIMEOUT = 5 s in
    el_helpers, + 1 ns per byte) + data_write_timeout_s: computed here from Mooncake's rule.
    """
    nbytes = num_blocks * sum(lang.layout.slot_block_bytes)
    return 5 + nbytes * 1e-9 + data_write_timeout_s


def test_dead_encoder_frees_reserved_blocks_at_once_exposed_until_a_bound(
    mp_ctx, peers, make_lang
):
    """issue 16 item 2: an encoder with RESERVED receivers is declared dead (stopped: it may
    still write): the receivers fail at once with 503 and their blocks are free at once
    (allocator accounting: none quarantined, though fence_timeout_s is 120 s), exposed: a
    later round on them from another encoder is checksummed. The exposure does not run while
    the writer is held dead; once it answers again it ends after Mooncake's own timeout for
    those blocks' bytes + data_write_timeout_s, and rounds on those blocks are no longer
    checksummed. Before the fix the blocks stayed quarantined until fence_timeout_s and, once
    released, exposed for good."""
    dwt = 0.5
    victim = EncodePeer(mp_ctx, buffer_config(), conn_config(heartbeat_interval_s=30))
    healthy = peers()
    # the pool is two reservations
    lang = make_lang(num_blocks=4, fence_timeout_s=120.0, data_write_timeout_s=dwt)
    try:
        rooms = [new_room(), new_room()]
        rxs = [lang.create_receiver(victim.addr, room) for room in rooms]
        for room in rooms:
            victim.call("create", room, 2 * B, 5)
        assert wait_until(lambda: all(r.phase == Phase.RESERVED for r in rxs), 10)
        blocks = {b for r in rxs for b in r.handle.blocks}
        os.kill(victim.pid, signal.SIGSTOP)
        assert wait_until(lambda: lang.peer_is_dead(victim.addr), 10)
        for rx in rxs:
            assert wait_final(lang, rx) == KVPoll.Failed
            assert int(status_of_transfer_failure(rx)) == 503
        assert accounting_ok(lang.allocator) == dict(
            free=4, quarantined=0, used=0, total=4
        )
        assert lang.exposures.blocks == blocks and not lang.fences
        checksummed = record_checksummed_rounds(lang)
        ok_transfer(healthy, lang, total=4 * B, mm=9)  # every block: checksummed
        assert checksummed and all(checksummed)
        bound = _mooncake_bound(lang, 2, dwt)
        time.sleep(bound + 0.5)
        assert lang.exposures.blocks == blocks  # held while its writer is dead
        os.kill(victim.pid, signal.SIGCONT)
        assert wait_until(lambda: not lang.peer_is_dead(victim.addr), 10)
        revived = time.monotonic()
        assert wait_until(lambda: not lang.exposures.blocks, bound + 5)
        assert time.monotonic() - revived >= bound - 0.5
        checksummed.clear()
        ok_transfer(healthy, lang, total=4 * B, mm=9)
        assert checksummed and not any(checksummed)  # no exposed block left
        assert wait_until(lambda: victim.state()["rooms"] == 0, 10)  # told: dropped
        victim.assert_idle()
    finally:
        os.kill(victim.pid, signal.SIGCONT)
        victim.close()


def test_pause_shorter_than_the_liveness_window_loses_no_request(mp_ctx, make_lang):
    """issue 16 item 2: at the default liveness window (upstream PD's heartbeat: every 5 s, 2
    missed = 10 s) an encoder stopped (SIGSTOP: a GC pause, a noisy neighbour) for 8 s with a
    request reserved is not declared dead; the request completes byte for byte, on both sides.
    Before the fix the default window was 2 s x 3 = 6 s: the encoder was declared dead and the
    request failed."""
    default = ConnectionConfig()
    hb = dict(
        heartbeat_interval_s=default.heartbeat_interval_s,
        heartbeat_max_failures=default.heartbeat_max_failures,
    )
    victim = EncodePeer(mp_ctx, buffer_config(), conn_config(**hb))
    lang = make_lang(**hb)
    try:
        room = new_room()
        rx = lang.create_receiver(victim.addr, room)
        victim.call("create", room, 3 * RESERVE, 20)
        assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
        os.kill(victim.pid, signal.SIGSTOP)
        time.sleep(8.0)
        os.kill(victim.pid, signal.SIGCONT)
        victim.call("send", room, 3, 3 * RESERVE, 20)
        assert victim.call("wait", room, 20) == (KVPoll.Success, "")
        assert wait_final(lang, rx) == KVPoll.Success, rx.reason
        assert_same(rx.take(), make_payload(3, 3 * RESERVE, 20, H, 3))
        assert not lang.peer_is_dead(victim.addr)
        victim.assert_idle()
        assert default.liveness_window_s == 10.0
    finally:
        os.kill(victim.pid, signal.SIGCONT)
        victim.close()


def test_pause_longer_than_the_liveness_window_fails_requests_once(mp_ctx, make_lang):
    """issue 16 item 2: an encoder stopped longer than the liveness window (1 s x 2 here) is
    declared dead within the window + one interval of the stop; its requests fail once, 503,
    their blocks free at once (not quarantined); when it runs again it is revived, drops the
    rooms it was told about, and serves again."""
    hb = dict(heartbeat_interval_s=1.0, heartbeat_max_failures=2)
    victim = EncodePeer(mp_ctx, buffer_config(), conn_config(**hb))
    lang = make_lang(fence_timeout_s=120.0, **hb)
    try:
        room = new_room()
        rx = lang.create_receiver(victim.addr, room)
        victim.call("create", room, 3 * RESERVE, 20)
        assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
        stopped = time.monotonic()
        os.kill(victim.pid, signal.SIGSTOP)
        assert wait_final(lang, rx, timeout=10) == KVPoll.Failed
        # at most the window (2 s) after the first unanswered ping, sent within 1 s
        assert time.monotonic() - stopped <= 3.0 + 0.5
        assert "unreachable (missed 2 heartbeats)" in rx.reason
        assert int(status_of_transfer_failure(rx)) == 503
        assert accounting_ok(lang.allocator)["quarantined"] == 0
        time.sleep(2.0)
        os.kill(victim.pid, signal.SIGCONT)
        assert wait_until(lambda: not lang.peer_is_dead(victim.addr), 10)
        assert wait_until(lambda: victim.state()["rooms"] == 0, 10)
        ok_transfer(victim, lang)
        victim.assert_idle()
    finally:
        os.kill(victim.pid, signal.SIGCONT)
        victim.close()
