"""Checks on what a peer sends: the test speaks for a misbehaving encoder (``FakePeer``) to a real
language manager, and for a misbehaving language manager to a real encoder process."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import B, H, buffer_config, new_room, wait_final
from el_helpers import FakePeer, accounting_ok, make_payload, wait_until

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.connection import RoomInUseError
from sglang.srt.disaggregation.encode_language.manifest import (
    AUX_HEADER_BYTES,
    Abort,
    AbortAck,
    Announce,
    Expect,
    Ping,
    Pong,
    Register,
    RegisterAck,
    Reserve,
    RoundDone,
    make,
)
from sglang.srt.disaggregation.encode_language.receiver import Phase

FOREIGN = "127.0.0.1:1"  # a manager id that is not the room's encoder


@pytest.fixture
def fake():
    f = FakePeer()
    yield f
    f.close()


def expected(fake, lang, room):
    """A receiver whose encoder is ``fake`` (registered if needed), its Expect received."""
    rx = lang.create_receiver(fake.addr, room)
    if fake.addr not in lang.registrations or lang.registrations[fake.addr].ok is None:
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
    assert (
        expect.room == room and rx.handle is None
    )  # no blocks before the announcement
    return rx


def announced(fake, lang, room, total, mm, **fields):
    """A receiver whose encoder is ``fake``, sent ``Announce(total, mm, **fields)``."""
    rx = expected(fake, lang, room)
    fake.send(
        lang.manager_id,
        make(
            Announce,
            room=room,
            manager_id=fake.addr,
            total_tokens=total,
            mm_tokens=mm,
            **fields,
        ),
    )
    return rx


def reserved(fake, lang, room, total=2 * B, mm=5):
    """A receiver whose encoder is ``fake``, announced as (total, mm) tokens; returns
    (receiver, its Reserve)."""
    rx = announced(fake, lang, room, total, mm)
    res = fake.expect(Reserve)
    assert res.room == room and wait_until(lambda: rx.phase == Phase.RESERVED, 10)
    return rx, res


def round_done(fake_addr, res, **kw):
    fields = dict(
        room=res.room,
        manager_id=fake_addr,
        round=0,
        generation=res.generation,
        token_start=0,
        token_count=2 * B,
        mm_start=0,
        mm_count=5,
        total_tokens=2 * B,
        mm_tokens=5,
        last=True,
    )
    fields.update(kw)
    return make(RoundDone, **fields)


def processed(fake, lang):
    """Bounded wait until the manager handled everything ``fake`` sent it before (one socket,
    one control thread: a ping's pong comes after)."""
    fake.send(lang.manager_id, make(Ping, manager_id=fake.addr, nonce=424242))
    assert fake.expect(Pong).nonce == 424242


def test_round_done_checked_against_sender_ranges_and_bitmap(fake, make_lang):
    """issue 7 item 12: a RoundDone from another manager than the room's encoder is dropped; one
    whose ranges exceed total_tokens fails the request with a clear error; one whose bitmap
    marks fewer multimodal tokens than the manifest says fails it too."""
    lang = make_lang(heartbeat_interval_s=30)  # the fake answers no heartbeat
    rx, res = reserved(fake, lang, new_room())
    rejected = lang.channel.rejected
    fake.send(lang.manager_id, round_done(FOREIGN, res))
    processed(fake, lang)
    assert lang.channel.rejected == rejected + 1 and rx.phase == Phase.RESERVED
    fake.send(
        lang.manager_id,
        round_done(
            fake.addr, res, token_count=2 * B, total_tokens=B, mm_count=0, mm_tokens=0
        ),
    )
    assert wait_final(lang, rx) == KVPoll.Failed
    assert (
        rx.reason
        == f"invalid data in round 0: round_done tokens [0, {2 * B}) exceed total_tokens {B}"
    )

    rx, res = reserved(fake, lang, new_room())
    payload = make_payload(3, 2 * B, 5, H, 3)
    lang.buffers.write_request(
        res.blocks, payload, room=res.room, generation=res.generation
    )
    # Clear one multimodal bit and re-seal the header (checksum), as a buggy encoder would.
    j = int(payload.mm_mask.nonzero()[0, 0]) // B
    block = res.blocks[j]
    manifest, stamp = lang.buffers.read_manifest(block)
    bits = lang.buffers.aux[block, AUX_HEADER_BYTES : AUX_HEADER_BYTES + 1].numpy()
    mask = np.unpackbits(bits, bitorder="little")
    mask[np.flatnonzero(mask)[0]] = 0
    bits[:] = np.packbits(mask, bitorder="little")
    rows = max(0, min(B, payload.mm_tokens - j * B))
    header = manifest.pack(
        stamp._replace(checksum=lang.buffers._checksum(block, B, rows, bits))
    )
    lang.buffers.aux[block, : len(header)].numpy()[:] = np.frombuffer(
        header, dtype=np.uint8
    )
    fake.send(lang.manager_id, round_done(fake.addr, res))
    assert wait_final(lang, rx) == KVPoll.Failed
    assert (
        rx.reason
        == "invalid data in round 0: multimodal bitmap marks 4 tokens, manifest says 5"
    )
    accounting_ok(lang.allocator)


def test_abort_ack_checked_against_sender(fake, make_lang):
    """issue 7 item 12: an AbortAck names its sender; one from another manager does not release
    the room's fenced blocks, the room's encoder's does."""
    lang = make_lang(heartbeat_interval_s=30)  # the fake answers no heartbeat
    rx, res = reserved(fake, lang, new_room())
    rx.abort("client went away")  # the encoder may be writing: fenced until its ack
    assert rx.finished and accounting_ok(lang.allocator)["quarantined"] == len(
        res.blocks
    )
    with pytest.raises(
        RoomInUseError, match=f"bootstrap room {res.room} is still fenced"
    ):
        lang.create_receiver(fake.addr, res.room)
    fake.send(lang.manager_id, make(AbortAck, room=res.room, manager_id=FOREIGN))
    processed(fake, lang)
    assert (fake.addr, res.room) in lang.fences
    fake.send(lang.manager_id, make(AbortAck, room=res.room, manager_id=fake.addr))
    assert wait_until(lambda: not lang.fences, 10)
    assert accounting_ok(lang.allocator)["quarantined"] == 0


def test_register_slot_block_bytes_validated(fake, peers):
    """issue 7 item 12: Register.slot_block_bytes must match the layout it comes with; a
    registration that disagrees is refused with the reason."""
    peer = peers()
    layout = buffer_config().layout()
    wrong = list(layout.slot_block_bytes)
    wrong[0] += 2
    fake.send(
        peer.addr,
        make(
            Register,
            manager_id=fake.addr,
            epoch=1,
            session_id="x",
            layout=layout,
            slot_ptrs=[1] * layout.num_slots,
            slot_block_bytes=wrong,
        ),
    )
    ack = fake.expect(RegisterAck)
    assert not ack.ok and ack.epoch == 1
    assert (
        f"peer's slot_block_bytes {wrong} do not match its layout ({layout.slot_block_bytes})"
        in ack.error
    )
    assert fake.addr not in peer.state()["peers"]  # refused: never written to
    peer.assert_idle()


def test_announced_positions_must_cover_the_prompt(fake, make_lang):
    """An announcement whose M-RoPE positions are not 3 x T values fails the request at once
    (a language side would otherwise build a fully held request from them), before any
    block is taken; the encoder is told."""
    lang = make_lang()
    room = new_room()
    rx = announced(
        fake,
        lang,
        room,
        4,
        2,
        input_ids=[1, 7, 7, 2],
        mrope_positions=[0, 1, 2, 3] * 2,
    )
    assert fake.expect(Abort).room == room
    assert wait_final(lang, rx) == KVPoll.Failed
    assert "announcement has 8 M-RoPE positions for T=4 tokens (3 x T expected)" in (
        rx.reason
    )
    assert lang.allocator.num_used() == 0
