"""issue 16 item 1: reservations sized from the encoder's announcement. The language side holds
no blocks until the encoder, holding the request and every destination's Expect, announces its
exact shape; it then reserves min(blocks needed, reserve) blocks and waits for them without a
timer (load, not a fault); pairing is still bounded by the bootstrap timeout. Real encoder
processes, real Mooncake TCP transfers; every block free after (make_lang, assert_idle)."""

from __future__ import annotations

import time

from conftest import RESERVE, B, H, new_room, wait_final
from el_helpers import FakePeer, assert_same, make_payload, wait_until

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.manifest import (
    Expect,
    FaultKind,
    Register,
    RegisterAck,
    Reserve,
    make,
)
from sglang.srt.disaggregation.encode_language.receiver import Phase


def test_reserved_only_after_the_announcement_and_only_what_is_needed(peers, make_lang):
    """issue 16 item 1: a request takes no language block while the encoder has not got its
    half (before: the reservation was taken at arrival); once announced it takes
    min(blocks for T, reserve) blocks: 1 block for a 5-token request, the 2-block reserve for a
    5-block request (which then moves in rounds); both arrive byte for byte."""
    peer, lang = peers(), make_lang()
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    assert wait_until(lambda: (peer.call("room_state", room) or {}).get("expected"), 10)
    assert lang.allocator.num_used() == 0 and rx.handle is None
    assert rx.phase == Phase.ANNOUNCE
    peer.call("create", room, 5, 3)
    assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
    assert lang.allocator.num_used() == 1 and len(rx.handle) == 1
    assert tuple(rx.shape[:2]) == (5, 3)
    peer.call("send", room, 1, 5, 3)
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx) == KVPoll.Success
    assert_same(rx.take(), make_payload(1, 5, 3, H, 3))

    room, total = new_room(), 5 * B
    assert total > RESERVE
    rx = lang.create_receiver(peer.addr, room)
    peer.call("create", room, total, 20)
    assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
    assert lang.allocator.num_used() == RESERVE // B == len(rx.handle)
    peer.call("send", room, 2, total, 20)
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx) == KVPoll.Success
    assert rx.round + 1 == 3  # 16 + 16 + 8 tokens
    assert_same(rx.take(), make_payload(2, total, 20, H, 3))
    peer.assert_idle()


def test_requests_queued_for_a_full_pool_do_not_time_out(peers, make_lang):
    """issue 16 item 1: at the production ratio (a pool of 16 full reservations) the 17th to
    24th requests wait for blocks, queued, for several bootstrap timeouts, and all complete
    once the first ones transfer (before: their encoder rooms failed with "bootstrap timeout:
    0/1 destinations reserved" after bootstrap_timeout_s)."""
    peer = peers(bootstrap_timeout_s=1.0)
    lang = make_lang(num_blocks=16 * RESERVE // B, bootstrap_timeout_s=1.0)
    total, mm = 3 * RESERVE, 2 * RESERVE
    reqs = []
    for seed in range(24):
        room = new_room()
        reqs.append((room, seed, lang.create_receiver(peer.addr, room)))
        peer.call("create", room, total, mm)
    phases = lambda: [rx.phase for _, _, rx in reqs]  # noqa: E731
    assert wait_until(
        lambda: phases().count(Phase.RESERVED) == 16
        and phases().count(Phase.ALLOC) == 8,
        10,
    ), phases()
    assert lang.allocator.num_free() == 0
    time.sleep(3.0)  # three bootstrap timeouts: nothing fails for waiting on blocks
    assert phases().count(Phase.RESERVED) == 16 and phases().count(Phase.ALLOC) == 8
    polls = [peer.call("poll", room)[0] for room, _, _ in reqs]
    assert polls.count(KVPoll.WaitingForInput) == 16
    assert polls.count(KVPoll.Bootstrapping) == 8
    for room, seed, _ in reqs:
        peer.call("send", room, seed, total, mm)
    for room, seed, rx in reqs:
        assert peer.call("wait", room, 60) == (KVPoll.Success, "")
        assert wait_final(lang, rx, 60) == KVPoll.Success, rx.reason
        assert_same(rx.take(), make_payload(seed, total, mm, H, 3))
    peer.assert_idle()


def test_pairing_timeout_fires_when_the_encoder_never_gets_its_half(peers, make_lang):
    """issue 16 item 1: the pairing is still bounded. The encoder opened the room from the
    language side's Expect; its request never arrives: the encoder fails the room after
    bootstrap_timeout_s and the language side fails with its verdict (504), having held no
    block meanwhile (before: it held its reservation for that time)."""
    peer = peers(bootstrap_timeout_s=0.5)
    lang = make_lang()
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    used = []
    while rx.poll() != KVPoll.Failed and len(used) < 2000:
        used.append(lang.allocator.num_used())
        time.sleep(0.005)
    assert wait_final(lang, rx) == KVPoll.Failed
    assert rx.reason == (
        f"encoder {peer.addr} aborted: bootstrap timeout: no encode request for room "
        f"{room} within 0.5s"
    )
    assert rx.kind is FaultKind.TIMEOUT and set(used) == {0}
    peer.assert_idle()


def test_language_side_pairing_timeout_without_an_announcement(make_lang):
    """issue 16 item 1: an encoder that accepts the Expect but never announces (here a fake
    encoder the test speaks for): the language side's own pairing timer,
    bootstrap_timeout_s + transfer_grace_s, fails the request; no block was ever taken.
    """
    lang = make_lang(
        bootstrap_timeout_s=0.5, transfer_grace_s=0.2, heartbeat_interval_s=30
    )
    fake = FakePeer()
    try:
        room = new_room()
        rx = lang.create_receiver(fake.addr, room)
        reg = fake.expect(Register)
        fake.send(
            lang.manager_id,
            make(
                RegisterAck,
                manager_id=fake.addr,
                epoch=reg.epoch,
                ok=True,
                error="",
                layout=lang.layout,
            ),
        )
        expect = fake.expect(Expect)
        assert (expect.room, expect.epoch) == (room, reg.epoch)
        assert wait_final(lang, rx) == KVPoll.Failed
        assert rx.reason == (
            f"bootstrap timeout: encoder {fake.addr} did not announce the request within "
            "0.7s (its request for this room never arrived there)"
        )
        assert rx.kind is FaultKind.TIMEOUT
        assert lang.allocator.num_used() == 0
        try:
            fake.expect(Reserve, timeout_s=0.2)
            reserved = True
        except TimeoutError:
            reserved = False
        assert not reserved
    finally:
        fake.close()
