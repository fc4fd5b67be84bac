"""Two real processes, real Mooncake TCP transfers: encode peer process -> language managers here."""

from __future__ import annotations

import random

import pytest
from conftest import RESERVE, B, H, new_room, wait_final
from el_helpers import assert_same, make_payload, wait_until

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.connection import RoomInUseError
from sglang.srt.disaggregation.encode_language.receiver import Phase


def transfer(peer, lang, total, mm, k, seed, **rx_kw):
    room = new_room()
    rx = lang.create_receiver(peer.addr, room, **rx_kw)
    peer.call("send", room, seed, total, mm)
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx) == KVPoll.Success, rx.reason
    got = rx.take()
    assert_same(got, make_payload(seed, total, mm, H, k))
    return rx, got


# (total tokens, multimodal tokens, expected rounds with a 16-token reservation and 8-token blocks)
SIZES = [
    (1, 1, 1),  # one token
    (1, 0, 1),  # one text token
    (B, B, 1),  # exactly one block
    (2 * B, 5, 1),  # block multiple == reservation
    (B + 1, 4, 1),  # just over a block
    (RESERVE + 1, RESERVE + 1, 2),  # reservation + 1: two rounds
    (5 * RESERVE, 3 * RESERVE + 3, 5),  # five rounds
]


@pytest.mark.parametrize("k", [0, 2, 3])
@pytest.mark.parametrize("total,mm,rounds", SIZES)
def test_every_slot_byte_exact(peers, make_lang, k, total, mm, rounds):
    peer = peers(k=k)
    lang = make_lang(k=k)
    rx, got = transfer(peer, lang, total, mm, k, seed=total * 31 + mm + k)
    assert rx.round + 1 == rounds
    if k == 0:
        assert got.deepstack is None
        assert len(lang.buffers.slots()) == 4
    peer.assert_idle()


def test_resume_with_bigger_resume_rounds(peers, make_lang):
    """resume_tokens larger than the first reservation: later rounds allocate more blocks."""
    peer = peers()
    lang = make_lang(resume_tokens=4 * RESERVE)
    rx, _ = transfer(peer, lang, 9 * RESERVE + 1, 50, 3, seed=7)
    assert rx.round + 1 == 4  # rounds of 16, 64, 64 and 1 tokens
    peer.assert_idle()


def test_64_concurrent_mixed_sizes_small_pool(peers, make_lang):
    """Pools too small for all requests at once: all complete, all data exact, no deadlock."""
    peer = peers(num_blocks=12)
    lang = make_lang(num_blocks=10)  # 5 reservations of 2 blocks at a time
    rnd = random.Random(64)
    reqs = []
    for i in range(64):
        total = rnd.choice([1, 3, B, B + 1, 2 * B, 3 * B + 2, 7 * B])
        mm = rnd.randint(0, total)
        room = new_room()
        reqs.append((room, i, total, mm, lang.create_receiver(peer.addr, room)))
    order = list(range(64))
    rnd.shuffle(order)
    for j in order:
        room, seed, total, mm, _ = reqs[j]
        peer.call("send", room, seed, total, mm)
    for room, seed, total, mm, rx in reqs:
        assert peer.call("wait", room, 60) == (KVPoll.Success, "")
        assert wait_final(lang, rx, 60) == KVPoll.Success, rx.reason
        assert_same(rx.take(), make_payload(seed, total, mm, H, 3))
    peer.assert_idle()


def test_two_destination_ranks_wait_for_each_other(peers, make_lang):
    """Language TP=2: the request is announced only when both ranks expect it, a round starts
    only when both ranks reserved; a rank slow to get resume blocks holds the next round back
    for both; both receive identical, exact data."""
    peer = peers()
    r0, r1 = make_lang(), make_lang(num_blocks=4, resume_tokens=2 * RESERVE)
    room, seed, total, mm = new_room(), 11, 3 * RESERVE, 20
    rx0 = r0.create_receiver(peer.addr, room, rank=0, num_ranks=2)
    assert wait_until(
        lambda: (peer.call("room_state", room) or {}).get("expected") == 1, 10
    )
    peer.call("send", room, seed, total, mm)
    st = peer.call("room_state", room)
    # waits for rank 1: not announced, nothing reserved, nothing sent
    assert st["token_sent"] == 0 and not st["in_flight"] and st["ready"] == 0
    assert not st["announced"] and rx0.phase == Phase.ANNOUNCE and rx0.handle is None
    # Rank 1 resumes with 4 blocks but a blocker holds 2 of its 4: its resume allocation waits.
    blocker = r1.allocator.alloc(2, owner="blocker")
    # gets the other 2 blocks
    rx1 = r1.create_receiver(peer.addr, room, rank=1, num_ranks=2)
    assert wait_until(lambda: rx0.phase == Phase.RESERVED and rx0.round == 1, 10)
    assert wait_until(lambda: rx1.phase == Phase.RESUME_ALLOC, 10)
    # rank 0's next reservation reaches the encoder (a control message) a little later
    assert wait_until(lambda: peer.call("room_state", room)["ready"] == 1, 10)
    st = peer.call("room_state", room)
    assert (
        st["round"] == 1
        and st["token_sent"] == RESERVE
        and st["ready"] == 1
        and not st["in_flight"]
    )
    blocker.free()
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    p = make_payload(seed, total, mm, H, 3)
    for m, rx in ((r0, rx0), (r1, rx1)):
        assert wait_final(m, rx) == KVPoll.Success
        assert_same(rx.take(), p)
    peer.assert_idle()


def test_health_probe_uses_scratch_block_only(peers, make_lang):
    """Probes write only into the scratch block: concurrent real transfers stay exact (lesson 1)."""
    peer = peers()
    lang = make_lang()
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    peer.call("create", room, 3 * RESERVE, 30)
    assert wait_until(lambda: rx.phase == Phase.RESERVED, 10)
    for _ in range(3):
        assert peer.call("probe", lang.manager_id) is True
    assert lang.buffers.scratch_block not in lang.allocator.owners()
    peer.call("send", room, 5, 3 * RESERVE, 30)
    assert peer.call("wait", room, 20)[0] == KVPoll.Success
    assert wait_final(lang, rx) == KVPoll.Success
    assert_same(rx.take(), make_payload(5, 3 * RESERVE, 30, H, 3))
    peer.assert_idle()


def test_reused_room_is_a_clear_error_both_sides(peers, make_lang):
    peer = peers()
    lang = make_lang()
    room = new_room()
    rx = lang.create_receiver(peer.addr, room)
    with pytest.raises(
        RoomInUseError, match=f"bootstrap room {room} is already in use"
    ):
        lang.create_receiver(peer.addr, room)
    peer.call("create", room, 20, 5)
    with pytest.raises(Exception, match=f"bootstrap room {room} is already in use"):
        peer.call("create", room, 20, 5)
    # A second language instance (another manager) claiming the same room and rank is refused.
    other = make_lang()
    rx2 = other.create_receiver(peer.addr, room)
    assert wait_final(other, rx2) == KVPoll.Failed
    assert "already in use" in rx2.reason
    peer.call("send", room, 3, 20, 5)
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx) == KVPoll.Success
    assert_same(rx.take(), make_payload(3, 20, 5, H, 3))
    # After success the tables are clear: the room can be used again for a new request.
    rx3 = lang.create_receiver(peer.addr, room)
    peer.call("send", room, 4, 9, 9)
    assert peer.call("wait", room, 20) == (KVPoll.Success, "")
    assert wait_final(lang, rx3) == KVPoll.Success
    assert_same(rx3.take(), make_payload(4, 9, 9, H, 3))
    peer.assert_idle()
