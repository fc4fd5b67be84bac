from __future__ import annotations

import dataclasses

import msgspec
import pytest

from sglang.srt.disaggregation.encode_language import manifest as mf
from sglang.srt.disaggregation.encode_language.manifest import (
    BlockStamp,
    LayoutManifest,
    LayoutMismatchError,
    ProtocolError,
    RequestManifest,
)


def layout(**kw):
    base = dict(hidden_size=2048, deepstack_count=3, block_size=128)
    base.update(kw)
    return LayoutManifest(**base)


def test_derived_fields():
    L = layout()
    assert (L.aux_bytes, L.num_slots) == (80, 5)  # 64-byte header + 16-byte bitmap
    assert layout(deepstack_count=0).num_slots == 4
    assert layout(block_size=1).aux_bytes == 72


@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden_size", 1024),
        ("deepstack_count", 2),
        ("block_size", 64),
        ("embed_dtype", "float16"),
        ("id_dtype", "int64"),
        ("pos_dtype", "int64"),
    ],
)
def test_mismatch_names_the_field(field, value):
    a, b = layout(), layout(**{field: value})
    with pytest.raises(
        LayoutMismatchError,
        match=f"field '{field}' is {getattr(a, field)!r} here but {value!r} on the peer",
    ) as e:
        a.check_compatible(b)
    assert e.value.field == field


def test_num_blocks_is_local():
    layout(num_blocks=10).check_compatible(layout(num_blocks=99))


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(hidden_size=0), "hidden_size must be a positive int"),
        (dict(deepstack_count=-1), "deepstack_count must be an int >= 0"),
        (dict(block_size=0), "block_size must be a positive int"),
        (dict(embed_dtype="int8"), "embed_dtype must be one of"),
        (dict(aux_bytes=8), "aux_bytes must be >= 80"),
        (
            dict(num_slots=5, deepstack_count=0),
            "num_slots must be 4 for deepstack_count=0",
        ),
        (dict(layout_version=99), "layout_version 99 is not supported"),
    ],
)
def test_invalid_layout(kw, msg):
    with pytest.raises(ValueError, match=msg):
        layout(**kw)


def test_register_layout_is_a_typed_struct():
    """issue 7 item 12: Register.layout is decoded as a LayoutManifest: an unknown field, a
    wrong type or an invalid value is a ProtocolError when the message is decoded."""
    L = layout(num_blocks=7)
    reg = dict(
        type="register",
        version=mf.PROTOCOL_VERSION,
        manager_id="h:1",
        epoch=1,
        session_id="s",
        slot_ptrs=[],
        slot_block_bytes=[],
    )
    got = mf.decode_message(
        msgspec.msgpack.encode({**reg, "layout": msgspec.to_builtins(L)})
    )
    assert isinstance(got.layout, LayoutManifest) and got.layout == L
    for bad, msg in [
        ({**msgspec.to_builtins(L), "bogus": 1}, "unknown field `bogus`"),
        ({**msgspec.to_builtins(L), "hidden_size": "x"}, "Expected `int`"),
        (
            {**msgspec.to_builtins(L), "hidden_size": 0},
            "hidden_size must be a positive int",
        ),
    ]:
        with pytest.raises(ProtocolError, match=msg):
            mf.decode_message(msgspec.msgpack.encode({**reg, "layout": bad}))


def test_request_manifest_roundtrip_and_checks():
    m = RequestManifest(
        total_tokens=1100,
        mm_tokens=1024,
        mrope_delta=-77,
        deepstack_count=3,
        embed_dtype="bfloat16",
        hidden_size=2048,
    )
    stamp = BlockStamp(block_index=5, room=2**62 + 3, generation=9, checksum=0xDEADBEEF)
    got, got_stamp = RequestManifest.unpack(m.pack(stamp) + b"\0" * 16)
    assert (got, got_stamp) == (m, stamp)
    m.check_against(layout())
    with pytest.raises(
        LayoutMismatchError, match="field 'deepstack_count' is 2 here but 3"
    ):
        m.check_against(layout(deepstack_count=2))
    with pytest.raises(ProtocolError, match="bad magic"):
        RequestManifest.unpack(b"XXXX" + m.pack(stamp)[4:])
    with pytest.raises(ProtocolError, match="too short"):
        RequestManifest.unpack(b"ELMM")
    bad = dataclasses.replace(m, mm_tokens=2000)
    with pytest.raises(ProtocolError, match="inconsistent counts"):
        bad.check_against(layout())


ALL = [
    mf.make(
        mf.Register,
        manager_id="h:1",
        epoch=1,
        session_id="h:2",
        layout=layout(),
        slot_ptrs=[1, 2],
        slot_block_bytes=[3, 4],
    ),
    mf.make(
        mf.RegisterAck, manager_id="h:3", epoch=1, ok=False, error="x", layout=layout()
    ),
    mf.make(mf.Unregistered, manager_id="h:3", room=1, epoch=2),
    mf.make(mf.Expect, room=1, manager_id="h:1", epoch=1, max_tokens=9),
    mf.make(
        mf.Announce,
        room=1,
        manager_id="h:3",
        total_tokens=300,
        mm_tokens=256,
        items=[["image", [[10, 265]], 2**63 + 5, b"\x01" * 32]],
    ),
    mf.make(
        mf.Announce,
        room=1,
        manager_id="h:3",
        total_tokens=3,
        mm_tokens=1,
        items=[["image", [[1, 1]], 7, b""]],
        input_ids=[5, 9, 6],
        mrope_positions=[0, 1, 2, 0, 1, 2, 0, 1, 2],
        mrope_delta=-4,
    ),
    mf.make(mf.AllHeld, room=1, manager_id="h:1"),
    mf.make(
        mf.Reserve,
        room=1,
        manager_id="h:1",
        epoch=1,
        round=3,
        generation=4,
        blocks=[4, 5],
        max_tokens=0,
        checksum=True,
    ),
    mf.make(
        mf.RoundDone,
        room=1,
        manager_id="h:3",
        round=0,
        generation=4,
        token_start=0,
        token_count=3,
        mm_start=0,
        mm_count=1,
        total_tokens=3,
        mm_tokens=1,
        last=True,
    ),
    mf.make(
        mf.Abort,
        room=1,
        manager_id="h:1",
        reason="r",
        kind=mf.FaultKind.TIMEOUT,
        writes_pending=True,
    ),
    mf.make(
        mf.Abort,
        room=1,
        manager_id="h:1",
        reason="r",
        kind=mf.FaultKind.INTERNAL,
        writes_pending=True,
        write_failed=True,
    ),
    mf.make(mf.AbortAck, room=1, manager_id="h:3"),
    mf.make(mf.Ping, manager_id="h:4", nonce=-3),
    mf.make(mf.Pong, manager_id="h:5", nonce=3),
]


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_message_roundtrip_is_named_map(msg):
    data = mf.encode_message(msg)
    assert mf.decode_message(data) == msg
    decoded = msgspec.msgpack.decode(data)
    assert (
        isinstance(decoded, dict)
        and decoded["version"] == mf.PROTOCOL_VERSION
        and "type" in decoded
    )


def test_abort_carries_its_fault_kind_typed():
    """issue: blockers item 8 (typed fault kinds): the kind travels as a typed enum field of
    ``abort`` (since protocol version 4): decoded as ``FaultKind``, an unknown kind or an abort
    without one is rejected, never guessed from the reason."""
    base = {
        "type": "abort",
        "version": mf.PROTOCOL_VERSION,
        "room": 1,
        "manager_id": "h:1",
        "reason": "r",
    }
    msg = mf.decode_message(msgspec.msgpack.encode({**base, "kind": "client"}))
    assert msg.kind is mf.FaultKind.CLIENT
    assert (msg.writes_pending, msg.write_failed) == (False, False)
    with pytest.raises(ProtocolError, match="Invalid enum value 'oops'"):
        mf.decode_message(msgspec.msgpack.encode({**base, "kind": "oops"}))
    with pytest.raises(ProtocolError, match="missing required field `kind`"):
        mf.decode_message(msgspec.msgpack.encode(base))


@pytest.mark.parametrize(
    "data,msg",
    [
        (b"", "undecodable"),
        (b"\xc1", "undecodable"),
        (
            msgspec.msgpack.encode({"type": "nope", "version": 1}),
            "invalid control message",
        ),
        (msgspec.msgpack.encode([1, 2, 3]), "invalid control message"),
        (
            msgspec.msgpack.encode(
                {"type": "abort_ack", "version": 5, "room": "x", "manager_id": "h"}
            ),
            "Expected `int`",
        ),
        (
            msgspec.msgpack.encode(
                {
                    "type": "abort_ack",
                    "version": 5,
                    "room": 1,
                    "manager_id": "h",
                    "extra": 0,
                }
            ),
            "unknown field",
        ),
        (
            msgspec.msgpack.encode({"type": "abort_ack", "room": 1, "manager_id": "h"}),
            "missing required field `version`",
        ),
        (
            msgspec.msgpack.encode(
                {"type": "abort_ack", "version": 1, "room": 1, "manager_id": "h"}
            ),
            f"protocol version 1, expected {mf.PROTOCOL_VERSION}",
        ),
        (
            # answers go to the sender's endpoint: one that is not host:port is refused at
            # the door (sending to it raised in the encoder's heartbeat thread, every pass)
            msgspec.msgpack.encode(
                {
                    "type": "abort_ack",
                    "version": mf.PROTOCOL_VERSION,
                    "room": 1,
                    "manager_id": "garbage",
                }
            ),
            "AbortAck names no endpoint: Missing port",
        ),
    ],
)
def test_malformed_messages_rejected(data, msg):
    with pytest.raises(ProtocolError, match=msg):
        mf.decode_message(data)
