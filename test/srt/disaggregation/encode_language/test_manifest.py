from __future__ import annotations

import dataclasses

import msgspec
import pytest

from sglang.srt.disaggregation.encode_language import manifest as mf
from sglang.srt.disaggregation.encode_language.manifest import (
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
    assert (L.aux_bytes, L.num_slots) == (64, 5)  # 48-byte header + 16-byte bitmap
    assert layout(deepstack_count=0).num_slots == 4
    assert layout(block_size=1).aux_bytes == 56


@pytest.mark.parametrize(
    "field,value",
    [("hidden_size", 1024), ("deepstack_count", 2), ("block_size", 64), ("embed_dtype", "float16"),
     ("id_dtype", "int64"), ("pos_dtype", "int64")],
)
def test_mismatch_names_the_field(field, value):
    a, b = layout(), layout(**{field: value})
    with pytest.raises(LayoutMismatchError, match=f"field '{field}' is {getattr(a, field)!r} here but {value!r} on the peer") as e:
        a.check_compatible(b)
    assert e.value.field == field


def test_num_blocks_is_local():
    layout(num_blocks=10).check_compatible(layout(num_blocks=99))


@pytest.mark.parametrize(
    "kw,msg",
    [(dict(hidden_size=0), "hidden_size must be a positive int"),
     (dict(deepstack_count=-1), "deepstack_count must be an int >= 0"),
     (dict(block_size=0), "block_size must be a positive int"),
     (dict(embed_dtype="int8"), "embed_dtype must be one of"),
     (dict(aux_bytes=8), "aux_bytes must be >= 64"),
     (dict(num_slots=5, deepstack_count=0), "num_slots must be 4 for deepstack_count=0"),
     (dict(layout_version=99), "layout_version 99 is not supported")],
)
def test_invalid_layout(kw, msg):
    with pytest.raises(ValueError, match=msg):
        layout(**kw)


def test_layout_dict_roundtrip_and_rejects_unknown_fields():
    L = layout(num_blocks=7)
    assert LayoutManifest.from_dict(L.to_dict()) == L
    with pytest.raises(ProtocolError, match=r"unknown fields \['bogus'\]"):
        LayoutManifest.from_dict({**L.to_dict(), "bogus": 1})
    with pytest.raises(ProtocolError, match="must be a map"):
        LayoutManifest.from_dict([1, 2])


def test_request_manifest_roundtrip_and_checks():
    m = RequestManifest(total_tokens=1100, mm_tokens=1024, mrope_delta=-77, deepstack_count=3,
                        embed_dtype="bfloat16", hidden_size=2048)
    got, idx = RequestManifest.unpack(m.pack(5) + b"\0" * 16)
    assert (got, idx) == (m, 5)
    m.check_against(layout())
    with pytest.raises(LayoutMismatchError, match="field 'deepstack_count' is 2 here but 3"):
        m.check_against(layout(deepstack_count=2))
    with pytest.raises(ProtocolError, match="bad magic"):
        RequestManifest.unpack(b"XXXX" + m.pack(0)[4:])
    with pytest.raises(ProtocolError, match="too short"):
        RequestManifest.unpack(b"ELMM")
    bad = dataclasses.replace(m, mm_tokens=2000)
    with pytest.raises(ProtocolError, match="inconsistent counts"):
        bad.check_against(layout())


ALL = [
    mf.make(mf.Register, manager_id="h:1", session_id="h:2", layout=layout().to_dict(), slot_ptrs=[1, 2], slot_block_bytes=[3, 4]),
    mf.make(mf.RegisterAck, manager_id="h:3", ok=False, error="x", layout={}),
    mf.make(mf.Reserve, room=1, manager_id="h:1", rank=0, num_ranks=2, round=3, blocks=[4, 5], max_tokens=0),
    mf.make(mf.RoundDone, room=1, round=0, token_start=0, token_count=3, mm_start=0, mm_count=1, total_tokens=3, mm_tokens=1, last=True),
    mf.make(mf.Abort, room=1, manager_id="h:1", reason="r"),
    mf.make(mf.AbortAck, room=1),
    mf.make(mf.Ping, manager_id="h", nonce=-3),
    mf.make(mf.Pong, manager_id="h", nonce=3),
]


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_message_roundtrip_is_named_map(msg):
    data = mf.encode_message(msg)
    assert mf.decode_message(data) == msg
    decoded = msgspec.msgpack.decode(data)
    assert isinstance(decoded, dict) and decoded["version"] == mf.PROTOCOL_VERSION and "type" in decoded


@pytest.mark.parametrize(
    "data,msg",
    [(b"", "undecodable"), (b"\xc1", "undecodable"),
     (msgspec.msgpack.encode({"type": "nope", "version": 1}), "invalid control message"),
     (msgspec.msgpack.encode([1, 2, 3]), "invalid control message"),
     (msgspec.msgpack.encode({"type": "abort_ack", "version": 1, "room": "x"}), "Expected `int`"),
     (msgspec.msgpack.encode({"type": "abort_ack", "version": 1, "room": 1, "extra": 0}), "unknown field"),
     (msgspec.msgpack.encode({"type": "abort_ack", "room": 1}), "missing required field `version`"),
     (msgspec.msgpack.encode({"type": "abort_ack", "version": 2, "room": 1}), "protocol version 2, expected 1")],
)
def test_malformed_messages_rejected(data, msg):
    with pytest.raises(ProtocolError, match=msg):
        mf.decode_message(data)
