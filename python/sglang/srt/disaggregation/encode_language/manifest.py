"""Manifests and typed control messages of the encode -> language transport.

Three things live here because both sides must agree on them byte for byte:

* ``LayoutManifest``: the shape of a side's ``MultimodalDataBuffers`` (hidden size H, deepstack
  count K, block size B, dtypes, slot count, ``LAYOUT_VERSION``). Exchanged at registration and
  compared field by field; a mismatch names the field and no byte moves.
* ``RequestManifest``: what one request carries (total tokens, multimodal token count, M-RoPE
  delta, K, dtype, H, layout version). Packed into the fixed-size aux slot of every block, followed
  by the bitmap of which of the block's B tokens are multimodal, so the language side knows exactly
  where the received embedding rows go without guessing from token ids.
* Control messages: msgspec structs with an explicit ``type`` tag and a ``version`` field, encoded
  as msgpack maps (named fields, never positional frames). ``decode_message`` rejects anything
  malformed, unknown or of another version with a ``ProtocolError``.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from typing import List, NamedTuple, Tuple, Union

import msgspec
import numpy as np
import torch

from sglang.srt.utils.network import NetworkAddress

LAYOUT_VERSION = 5  # 2: aux header carries room, reservation generation and a block checksum; 3: XXH3
# 4: block-major buffers (one registered region; round_plan.block_layout), rows hashed whole;
# 5: no scratch block after the pool (the region is exactly the pool's blocks)
# 2: epochs, generations, sender ids, Unregistered; 3: Reserve.checksum;
# 4: Abort.kind (FaultKind) and Abort.write_failed; 5: Expect and Announce (reservations sized
# from the encoder's announcement of the request's shape); 6: Announce.input_ids,
# Reserve.held_items and RoundDone.held_items (items the language side's prefix cache holds:
# no vision tower, no rows); 7: Expect and Reserve without rank and num_ranks (one destination
# per request: the language server's rank 0 receives and broadcasts); 8: Announce.mrope_positions
# and mrope_delta, AllHeld (the language side holds every item: the request needs no round).
PROTOCOL_VERSION = 8

# dtype <-> wire name; the names are what manifests carry.
_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "int32": torch.int32,
    "int64": torch.int64,
}
_DTYPE_CODES = {"bfloat16": 1, "float16": 2, "float32": 3}


class LayoutMismatchError(ValueError):
    """The two sides' buffer layouts differ; carries the name of the first differing field."""

    def __init__(self, field: str, local, remote, where: str = ""):
        self.field = field
        self.local = local
        self.remote = remote
        super().__init__(
            f"buffer layout mismatch{(' with ' + where) if where else ''}: "
            f"field '{field}' is {local!r} here but {remote!r} on the peer"
        )


class ProtocolError(ValueError):
    """A control message (or aux header) that is malformed, unknown or of another version."""


def dtype_name(dtype: torch.dtype) -> str:
    """The layout's name of a model dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; supported: {sorted(_DTYPES)}")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype name {name!r}") from None


def itemsize(name: str) -> int:
    return torch.empty((), dtype=dtype_from_name(name)).element_size()


class Slot(enum.IntEnum):
    """The buffer slots, in registration order (``Register.slot_ptrs`` follows it)."""

    EMBEDDINGS = 0
    FILL_IDS = 1
    MROPE_POSITIONS = 2
    AUX = 3
    DEEPSTACK = 4  # absent when deepstack_count == 0


# --------------------------------------------------------------------------------------------
# Per-request manifest (aux slot)
# --------------------------------------------------------------------------------------------

# magic, layout version, dtype code, K, H, total tokens, mm tokens, mrope delta, block index,
# block checksum, bootstrap room, reservation generation
_AUX_HEADER = struct.Struct("<4sHHiiqqqiIqq")
AUX_MAGIC = b"ELMM"
AUX_HEADER_BYTES = _AUX_HEADER.size  # 64
# The same header as a numpy record, to read the stamps of many blocks at once; the request
# manifest is the bytes before ``STAMP_OFFSET``.
AUX_HEADER_DTYPE = np.dtype(
    [
        ("magic", "S4"),
        ("layout_version", "<u2"),
        ("dtype_code", "<u2"),
        ("deepstack_count", "<i4"),
        ("hidden_size", "<i4"),
        ("total_tokens", "<i8"),
        ("mm_tokens", "<i8"),
        ("mrope_delta", "<i8"),
        ("block_index", "<i4"),
        ("checksum", "<u4"),
        ("room", "<i8"),
        ("generation", "<i8"),
    ]
)
STAMP_OFFSET = AUX_HEADER_DTYPE.fields["block_index"][1]  # 40
# The two descriptions of the header must agree field by field, not only in size.
assert np.frombuffer(_AUX_HEADER.pack(AUX_MAGIC, *range(1, 12)), AUX_HEADER_DTYPE)[
    0
].tolist() == (AUX_MAGIC, *range(1, 12))


class BlockStamp(NamedTuple):
    """Per-block part of an aux header: which request, which reservation, which block of the
    request, and a checksum (XXH3-64, low 32 bits) of the bytes the round wrote into the block. The receiver compares all
    four with what it expects, so a late write from an earlier reservation of the same block is
    an error, never data."""

    block_index: int
    room: int
    generation: int
    checksum: int


def aux_slot_bytes(block_size: int) -> int:
    """Header plus one bit per token of the block, rounded up to 8 bytes."""
    raw = AUX_HEADER_BYTES + (block_size + 7) // 8
    return (raw + 7) // 8 * 8


@dataclasses.dataclass(frozen=True)
class RequestManifest:
    """What one request carries; written into every block's aux slot."""

    total_tokens: int
    mm_tokens: int
    mrope_delta: int
    deepstack_count: int
    embed_dtype: str
    hidden_size: int
    layout_version: int = LAYOUT_VERSION

    def pack(self, stamp: BlockStamp) -> bytes:
        return _AUX_HEADER.pack(
            AUX_MAGIC,
            self.layout_version,
            _DTYPE_CODES[self.embed_dtype],
            self.deepstack_count,
            self.hidden_size,
            self.total_tokens,
            self.mm_tokens,
            self.mrope_delta,
            stamp.block_index,
            stamp.checksum,
            stamp.room,
            stamp.generation,
        )

    @staticmethod
    def unpack(data: bytes) -> Tuple["RequestManifest", BlockStamp]:
        """Returns (manifest, stamp); ProtocolError on a header that is not ours."""
        if len(data) < AUX_HEADER_BYTES:
            raise ProtocolError(f"aux header too short: {len(data)} bytes")
        magic, ver, code, k, h, total, mm, delta, block_index, crc, room, gen = (
            _AUX_HEADER.unpack(bytes(data[:AUX_HEADER_BYTES]))
        )
        if magic != AUX_MAGIC:
            raise ProtocolError(f"aux header has bad magic {magic!r}")
        names = {v: n for n, v in _DTYPE_CODES.items()}
        if code not in names:
            raise ProtocolError(f"aux header has unknown dtype code {code}")
        return (
            RequestManifest(
                total_tokens=total,
                mm_tokens=mm,
                mrope_delta=delta,
                deepstack_count=k,
                embed_dtype=names[code],
                hidden_size=h,
                layout_version=ver,
            ),
            BlockStamp(block_index, room, gen, crc),
        )

    def check_against(self, layout: "LayoutManifest") -> None:
        """Raise LayoutMismatchError if this request cannot live in buffers of ``layout``."""
        for field, mine, theirs in (
            ("layout_version", layout.layout_version, self.layout_version),
            ("hidden_size", layout.hidden_size, self.hidden_size),
            ("deepstack_count", layout.deepstack_count, self.deepstack_count),
            ("embed_dtype", layout.embed_dtype, self.embed_dtype),
        ):
            if mine != theirs:
                raise LayoutMismatchError(field, mine, theirs, "request manifest")
        if not (0 <= self.mm_tokens <= self.total_tokens) or self.total_tokens < 1:
            raise ProtocolError(
                f"request manifest has inconsistent counts: total_tokens={self.total_tokens} "
                f"mm_tokens={self.mm_tokens}"
            )


# --------------------------------------------------------------------------------------------
# Buffer layout manifest (exchanged at registration)
# --------------------------------------------------------------------------------------------


class LayoutManifest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Shape of one side's buffers. Everything but ``num_blocks`` must match the peer's.

    A msgspec struct, so ``Register``/``RegisterAck`` carry it typed: unknown fields, wrong types
    and invalid values (``validate``) are rejected when the message is decoded."""

    hidden_size: int
    deepstack_count: int
    block_size: int
    embed_dtype: str = "bfloat16"
    id_dtype: str = "int32"
    pos_dtype: str = "int32"
    aux_bytes: int = 0  # 0 = derived from block_size
    num_slots: int = 0  # 0 = derived from deepstack_count
    num_blocks: int = 0  # local pool size; not compared
    layout_version: int = LAYOUT_VERSION

    # Fields compared between the two sides, in the order errors report them.
    COMPARED = (
        "layout_version",
        "hidden_size",
        "deepstack_count",
        "block_size",
        "embed_dtype",
        "id_dtype",
        "pos_dtype",
        "aux_bytes",
        "num_slots",
    )

    def __post_init__(self):
        if self.aux_bytes == 0:
            self.aux_bytes = aux_slot_bytes(self.block_size)
        if self.num_slots == 0:
            self.num_slots = 5 if self.deepstack_count > 0 else 4
        self.validate()

    def validate(self) -> None:
        def bad(field, why):
            raise ValueError(f"invalid buffer layout: {field} {why}")

        if not isinstance(self.hidden_size, int) or self.hidden_size <= 0:
            bad("hidden_size", f"must be a positive int, got {self.hidden_size!r}")
        if not isinstance(self.deepstack_count, int) or self.deepstack_count < 0:
            bad("deepstack_count", f"must be an int >= 0, got {self.deepstack_count!r}")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            bad("block_size", f"must be a positive int, got {self.block_size!r}")
        if self.embed_dtype not in _DTYPE_CODES:
            bad(
                "embed_dtype",
                f"must be one of {sorted(_DTYPE_CODES)}, got {self.embed_dtype!r}",
            )
        for f in ("id_dtype", "pos_dtype"):
            if getattr(self, f) not in ("int32", "int64"):
                bad(f, f"must be int32 or int64, got {getattr(self, f)!r}")
        if self.aux_bytes < aux_slot_bytes(self.block_size):
            bad(
                "aux_bytes",
                f"must be >= {aux_slot_bytes(self.block_size)}, got {self.aux_bytes}",
            )
        expect_slots = 5 if self.deepstack_count > 0 else 4
        if self.num_slots != expect_slots:
            bad(
                "num_slots",
                f"must be {expect_slots} for deepstack_count={self.deepstack_count}",
            )
        if not isinstance(self.num_blocks, int) or self.num_blocks < 0:
            bad("num_blocks", f"must be an int >= 0, got {self.num_blocks!r}")
        if self.layout_version != LAYOUT_VERSION:
            bad(
                "layout_version",
                f"{self.layout_version} is not supported (this build: {LAYOUT_VERSION})",
            )

    def check_compatible(self, remote: "LayoutManifest", where: str = "") -> None:
        for field in self.COMPARED:
            mine, theirs = getattr(self, field), getattr(remote, field)
            if mine != theirs:
                raise LayoutMismatchError(field, mine, theirs, where)

    # Sizes -------------------------------------------------------------------------------
    @property
    def slot_block_bytes(self) -> List[int]:
        """Bytes one block occupies in each slot, in ``Slot`` order (no deepstack slot when K=0)."""
        B = self.block_size
        sizes = [
            B * self.embed_row_bytes,
            B * itemsize(self.id_dtype),
            3 * B * itemsize(self.pos_dtype),
            self.aux_bytes,
        ]
        if self.deepstack_count > 0:
            sizes.append(B * self.deepstack_row_bytes)
        return sizes

    @property
    def embed_itemsize(self) -> int:
        return itemsize(self.embed_dtype)

    @property
    def embed_row_bytes(self) -> int:
        return self.hidden_size * self.embed_itemsize

    @property
    def deepstack_row_bytes(self) -> int:
        return self.deepstack_count * self.hidden_size * self.embed_itemsize

    @property
    def token_bytes(self) -> int:
        """Wire bytes every token costs (fill id + 3 M-RoPE positions)."""
        return itemsize(self.id_dtype) + 3 * itemsize(self.pos_dtype)

    @property
    def mm_row_bytes(self) -> int:
        """Extra wire bytes a multimodal token costs (embedding + deepstack rows)."""
        return self.embed_row_bytes + self.deepstack_row_bytes

    def wire_bytes(self, total_tokens: int, mm_tokens: int) -> int:
        """Bytes one request moves: each block's ids, positions and aux (a partial last block's
        whole: one segment, see buffers.py), multimodal rows only."""
        nblocks = -(-total_tokens // self.block_size)
        return (
            nblocks * (self.block_size * self.token_bytes + self.aux_bytes)
            + mm_tokens * self.mm_row_bytes
        )

    def dense_wire_bytes(self, total_tokens: int) -> int:
        """What a layout that ships an embedding and deepstack row for every token would move."""
        return self.wire_bytes(total_tokens, total_tokens)


# --------------------------------------------------------------------------------------------
# Control messages
# --------------------------------------------------------------------------------------------


class _Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, frozen=True):
    version: int


class Register(_Msg, tag="register"):
    """Language manager -> encoder: who I am, where my buffers are, what they look like.
    ``epoch`` numbers this manager's registrations with that encoder; reservations name the
    epoch they rely on."""

    manager_id: str  # the language manager's control endpoint "host:port"
    epoch: int
    session_id: str  # Mooncake session id of the language engine
    layout: LayoutManifest
    slot_ptrs: List[int]  # base address of each slot buffer, in Slot order
    # bytes one block occupies in each slot; must match layout
    slot_block_bytes: List[int]


class RegisterAck(_Msg, tag="register_ack"):
    """Encoder -> language manager: registration ``epoch`` accepted, or the reason not."""

    manager_id: str  # the encoder's id: its advertised address and bound port
    epoch: int
    ok: bool
    error: str
    layout: LayoutManifest  # the encoder's layout, so the language side validates too


class Unregistered(_Msg, tag="unregistered"):
    """Encoder -> language manager: an ``Expect`` or reservation relied on registration
    ``epoch``, which this encoder does not hold (it declared the manager dead, pruned it, or
    restarted). The language side registers again and sends its ``Expect`` again (a receiver
    past round 0 fails: its encoder room is gone)."""

    manager_id: str  # the encoder
    room: int
    epoch: int


class Expect(_Msg, tag="expect"):
    """Language manager -> encoder: this language server holds request ``room`` and waits for
    its announcement (sent once registration ``epoch`` is acknowledged; no blocks are held yet).
    """

    room: int
    manager_id: str
    epoch: int  # the registration this relies on
    max_tokens: int  # most tokens this side accepts for one request; 0 = no limit


class Announce(_Msg, tag="announce"):
    """Encoder -> language manager: the request's exact shape, known before its vision tower
    runs (the processor ran at arrival). Sent once the encoder holds the request and the
    language side's ``Expect``; it reserves ``min(needed, reserve)`` blocks then.
    ``items`` is the item table (item_table.py) the payload carries and ``input_ids`` the
    request's T ids as its fill ids will carry them (placeholders expanded): with both, a
    language side builds the ids its prefix cache is keyed by and answers, in its round-0
    ``Reserve``, which items it already holds (``held_items``). With ``mrope_positions``
    ([3, T] row-major, as the payload will carry them) and ``mrope_delta``, a language side
    that holds every item has all the request needs and answers ``AllHeld`` instead."""

    room: int
    manager_id: str  # the encoder; must be the room's encoder
    total_tokens: int
    mm_tokens: int
    items: list = []
    input_ids: List[int] = []
    mrope_positions: List[int] = []
    mrope_delta: int = 0


class RequestShape(NamedTuple):
    """What the encoder announces for a request: total tokens T, multimodal tokens M, the
    item table entries (``ItemEntry.to_wire()``), the T ids and the [3, T] M-RoPE positions
    (flattened row-major) with their delta, as its payload will carry them (``input_ids`` may
    be empty: the language side then matches nothing; ``mrope_positions`` may be empty: the
    request then always takes a round)."""

    total_tokens: int
    mm_tokens: int
    items: list = []
    input_ids: list = []
    mrope_positions: list = []
    mrope_delta: int = 0

    def held_tokens(self, held_items) -> int:
        """Placeholder tokens of the items ``held_items`` (indices into ``items``) covers:
        rows the encoder does not send."""
        return sum(
            end - start + 1 for i in held_items for start, end in self.items[i][1]
        )


class Reserve(_Msg, tag="reserve"):
    """Language manager -> encoder: blocks reserved for round ``round`` of ``room``. ``generation``
    is unique per reservation; the encoder stamps it into every aux slot it writes."""

    room: int
    manager_id: str
    epoch: int  # the registration this reservation relies on
    round: int
    generation: int
    blocks: List[int]
    max_tokens: int  # most tokens this side accepts for one request; 0 = no limit
    # Stamp block checksums this round: the blocks may still receive a late write (the
    # receiver released them from a fence without an abort_ack), or the receiver always asks.
    checksum: bool
    # Round 0: the items (indices into the announced item table) whose tokens lie wholly in
    # the prefix the language server's prefix cache holds, locked there until the request's prefill:
    # the encoder runs no vision tower for them and sends none of their rows.
    held_items: List[int] = []


class AllHeld(_Msg, tag="all_held"):
    """Language manager -> encoder, instead of the round-0 ``Reserve``: its prefix cache holds
    every item of ``room`` (locked until the request's prefill) and it took the ids and
    M-RoPE positions from the announcement, so the request needs no round: it is done on
    both sides, no vision tower runs and nothing is written. (No registration epoch: nothing
    is written into this side's buffers, so the room and the sender are all it relies on.)
    """

    room: int
    manager_id: str


class RoundDone(_Msg, tag="round_done"):
    """Encoder -> language manager: round written; token/mm ranges it covered; last or not."""

    room: int
    manager_id: str  # the encoder; must be the room's encoder
    round: int
    generation: int  # of the reservation written
    token_start: int
    token_count: int
    mm_start: int
    mm_count: int
    total_tokens: int
    mm_tokens: int
    last: bool
    items: list = []  # last round only: the item table (item_table.py)
    # The items whose rows the payload leaves out (the language side holds them); the rows
    # sent (mm_tokens, the bitmap) are those of the other items, in prompt order.
    held_items: List[int] = []


class FaultKind(str, enum.Enum):
    """Why a request failed, carried typed with the failure (``Abort.kind``, the senders' and
    receivers' ``kind``, ``TransferError.kind``) so neither side parses reasons; the HTTP answer
    of each kind is decided in one place (``encode_request_faults.http_status``)."""

    CLIENT = "client"  # the request itself cannot be served (media, size, room, client abort)
    TIMEOUT = "timeout"  # a peer, a write or a resource did not answer in time
    # a peer is down, unreachable or forgot our registration
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"  # anything else: a failed write, invalid data, a server error
    # Not a fault: the encoder finished the request itself, with no media to send (a prompt
    # with a placeholder token but no image); the language side runs it as it is.
    NO_TRANSFER = "no_transfer"


class Abort(_Msg, tag="abort"):
    """Either direction: the request is over; from the language side it asks for an AbortAck.
    From the encoder, ``writes_pending`` False means no write for the room is in flight; True
    means a write may still land: the language side fences the blocks until the encoder's
    AbortAck, which follows when a timed-out write returns complete. ``write_failed`` (with
    ``writes_pending``): a transfer-engine write returned an error while parts of it may still
    be in flight; no AbortAck will ever say they ended, so the fence ends only by
    ``fence_timeout_s`` and its blocks are then exposed (checksummed when reused)."""

    room: int
    manager_id: str
    reason: str
    kind: FaultKind
    writes_pending: bool = False
    write_failed: bool = False


class AbortAck(_Msg, tag="abort_ack"):
    """Encoder -> language manager: no write for ``room`` is in flight or will start."""

    room: int
    manager_id: str  # the encoder; must be the room's encoder


class Ping(_Msg, tag="ping"):
    manager_id: str
    nonce: int


class Pong(_Msg, tag="pong"):
    manager_id: str
    nonce: int


Message = Union[
    Register,
    RegisterAck,
    Unregistered,
    Expect,
    Announce,
    Reserve,
    AllHeld,
    RoundDone,
    Abort,
    AbortAck,
    Ping,
    Pong,
]
_decoder = msgspec.msgpack.Decoder(Message)
_encoder = msgspec.msgpack.Encoder()


def make(cls, **fields):
    """Build a message of the current protocol version."""
    return cls(version=PROTOCOL_VERSION, **fields)


def encode_message(msg: _Msg) -> bytes:
    return _encoder.encode(msg)


def decode_message(data: bytes) -> Message:
    """Decode one control message; ProtocolError for anything malformed, unknown or of
    another protocol version."""
    try:
        msg = _decoder.decode(data)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"invalid control message: {e}") from None
    except msgspec.DecodeError as e:
        raise ProtocolError(f"undecodable control message: {e}") from None
    if msg.version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"control message {type(msg).__name__} has protocol version {msg.version}, "
            f"expected {PROTOCOL_VERSION}"
        )
    try:  # the sender's control endpoint, which answers are sent to
        NetworkAddress.parse(msg.manager_id)
    except ValueError as e:
        raise ProtocolError(
            f"control message {type(msg).__name__} names no endpoint: {e}"
        ) from None
    return msg
