from __future__ import annotations

import pytest
import torch
from el_helpers import assert_same, make_payload

from sglang.srt.disaggregation.encode_language.buffers import (
    MultimodalBufferConfig,
    MultimodalDataBuffers,
    RoundStamp,
)
from sglang.srt.disaggregation.encode_language.connection import make_transfer_engine
from sglang.srt.disaggregation.encode_language.manifest import ProtocolError
from sglang.srt.disaggregation.encode_language.round_plan import round_segments


def bufs(k=3, h=16, b=4, n=8, dtype="bfloat16"):
    return MultimodalDataBuffers(
        MultimodalBufferConfig(
            hidden_size=h,
            deepstack_count=k,
            block_size=b,
            num_blocks=n,
            embed_dtype=dtype,
        )
    )


@pytest.mark.parametrize("k", [0, 2, 3])
def test_slots_and_sizes(k):
    m = bufs(k=k)
    n, B, H = 8, 4, 16
    assert [tuple(t.shape) for t in m.slots()] == [
        (n, B, H),
        (n, B),
        (n, 3, B),
        (n, 72),
    ] + ([(n, B, k * H)] if k else [])
    assert m.slot_block_bytes() == [B * H * 2, B * 4, 3 * B * 4, 72] + (
        [B * k * H * 2] if k else []
    )
    assert m.slot_block_bytes() == [t[0].numel() * t.element_size() for t in m.slots()]
    assert m.nbytes() == n * sum(m.slot_block_bytes())
    assert (m.deepstack is None) == (k == 0)
    assert m.pinned is torch.cuda.is_available()


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("total,mm", [(1, 1), (4, 0), (7, 5), (13, 13)])
def test_write_read_byte_exact(k, total, mm):
    m = bufs(k=k)
    p = make_payload(total * 7 + mm, total, mm, 16, k)
    blocks = [5, 2, 7, 0][: -(-total // 4)]
    man = m.write_request(blocks, p, room=77, generation=5)
    data = m.read_round(blocks, total, mm, RoundStamp(77, 5, 0))
    assert data.manifest == man
    assert_same(data, p)
    got, stamp = m.read_manifest(blocks[-1])
    assert got == man and (stamp.block_index, stamp.room, stamp.generation) == (
        len(blocks) - 1,
        77,
        5,
    )


def test_checksum_is_what_catches_a_changed_row():
    """write_range(checksum=False) stamps 0 and read_round(verify=False) does not look: the
    receiver asks for checksums only where a late write can land. With them, one changed
    byte in a row fails the round; without them the same bytes pass (the contract)."""
    m = bufs(k=3)
    p = make_payload(3, 7, 5, 16, 3)
    blocks = [4, 5]
    m.write_request(blocks, p, room=9, generation=2)
    assert all(m.read_manifest(b)[1].checksum != 0 for b in blocks)
    assert_same(m.read_round(blocks, 7, 5, RoundStamp(9, 2, 0)), p)
    m.embeddings[5, 0, 3] += 1  # a late write into the second block's first row
    with pytest.raises(ProtocolError, match="block 5 checksum .* torn or late write"):
        m.read_round(blocks, 7, 5, RoundStamp(9, 2, 0))
    unverified = m.read_round(blocks, 7, 5, RoundStamp(9, 2, 0), verify=False)
    assert not torch.equal(unverified.embeddings, p.embeddings)

    m.write_range(blocks, p, 0, 7, 0, 5, room=9, generation=3, checksum=False)
    assert [m.read_manifest(b)[1].checksum for b in blocks] == [0, 0]
    assert_same(m.read_round(blocks, 7, 5, RoundStamp(9, 3, 0), verify=False), p)
    with pytest.raises(ProtocolError, match="checksum"):
        m.read_round(blocks, 7, 5, RoundStamp(9, 3, 0))


def test_stamps_of_every_block_are_checked():
    """A round is refused when any block (not only the first) carries another reservation's
    stamp or another request's manifest; the error names the block and what it holds."""
    m = bufs(k=3)
    p = make_payload(4, 10, 6, 16, 3)
    blocks = [6, 1, 3]
    m.write_request(blocks, p, room=11, generation=4)
    with pytest.raises(
        ProtocolError,
        match=r"block 6 holds \(room, generation, block index\) \(11, 4, 0\), expected "
        r"\(11, 5, 0\): written by another reservation",
    ):
        m.read_round(blocks, 10, 6, RoundStamp(11, 5, 0))
    m.write_request([1], make_payload(4, 3, 1, 16, 3), room=11, generation=4)
    with pytest.raises(ProtocolError, match=r"expected \(11, 4, 1\)"):
        # block 1 is index 0 of another
        m.read_round(blocks, 10, 6, RoundStamp(11, 4, 0))
    m.write_request(blocks, p, room=11, generation=4)
    m.aux[3, 16] ^= 1  # total_tokens of the third block's manifest
    with pytest.raises(ProtocolError, match="block 3 carries another request manifest"):
        m.read_round(blocks, 10, 6, RoundStamp(11, 4, 0))


def test_round_segments_move_only_valid_rows():
    """Text tokens cost no embedding/deepstack bytes: total segment bytes == wire_bytes()."""
    m = bufs(k=3)
    base, peer = m.region.data_ptr(), 2 << 40
    total, mm = 10, 3
    srcs, dsts, lens = round_segments(
        m.block_layout, base, [0, 1, 2], peer, [4, 5, 6], total, mm
    )
    assert sum(lens) == m.layout.wire_bytes(total, mm)
    assert m.layout.dense_wire_bytes(total) - sum(lens) == (total - mm) * 4 * 16 * 2
    # block-major: each block's ids, positions, aux and rows are one prefix of its stretch;
    # the first block's 3 rows do not fill it, so the next block is a segment of its own
    stride, head, row = m.block_layout.stride, m.block_layout.head_bytes, 4 * 16 * 2
    assert list(zip(srcs, dsts, lens)) == [
        (base + k * stride, peer + (4 + k) * stride, head + (3 if k == 0 else 0) * row)
        for k in range(3)
    ]


def test_a_run_of_full_blocks_is_one_segment():
    """Issue 16 item 5: Mooncake's TCP transport moves a write's segments one after another
    (~65 us each), so a run of consecutive blocks whose rows fill them must be ONE segment,
    the tail of text-only tokens after the rows included, whatever the slot count."""
    m = bufs(k=3)
    peer = 2 << 40
    total, mm = 11, 8  # rows fill blocks 0 and 1; block 2 holds 3 text tokens
    srcs, dsts, lens = round_segments(
        m.block_layout, m.region.data_ptr(), [3, 4, 5], peer, [0, 1, 2], total, mm
    )
    assert len(lens) == 1 and sum(lens) == m.layout.wire_bytes(total, mm)
    # fill_ids sit at offset 0 of a block
    assert (srcs[0], dsts[0]) == (m.fill_ids[3].data_ptr(), peer)
    # and what the segment carries is the staged round, byte for byte (the language side's
    # buffers are a copy of the segment's bytes here)
    p = make_payload(5, total, mm, 16, 3)
    m.write_request([3, 4, 5], p, room=3, generation=1)
    lang = bufs(k=3)
    src = m.region.view(-1)
    dst = lang.region.view(-1)
    off = srcs[0] - m.region.data_ptr()
    dst[: lens[0]].copy_(src[off : off + lens[0]])
    assert_same(lang.read_round([0, 1, 2], total, mm, RoundStamp(3, 1, 0)), p)


def test_payload_validation_messages():
    m = bufs(k=3)
    p = make_payload(1, 5, 2, 16, 3)
    p.deepstack = p.deepstack[:, :16]
    with pytest.raises(ValueError, match=r"deepstack must be \[2, 48\], got \(2, 16\)"):
        m.write_request([0, 1], p)
    p = make_payload(1, 5, 2, 16, 3)
    p.mm_mask[:] = False
    with pytest.raises(
        ValueError, match="mm_mask marks 0 multimodal tokens but embeddings has 2 rows"
    ):
        m.write_request([0, 1], p)
    with pytest.raises(ValueError, match="block 8 out of range"):
        m.write_request([8, 1], make_payload(1, 5, 2, 16, 3))


def test_registered_once():
    m = bufs()
    eng = make_transfer_engine("127.0.0.1")
    m.register(eng)
    m.register(eng)  # once only: a second call is a no-op
    with pytest.raises(RuntimeError, match="already registered with another engine"):
        m.register(object())
    m.deregister()
