"""Where a request's data lies in the blocks, and what one round moves.

Block-major layout (``block_layout``): block k of a side's region is one stretch of ``stride``
bytes at ``k * stride``, holding fill_ids, positions, aux, then B rows of (1+K)*H values, the
i-th row the i-th token's embedding and deepstack side by side (the [M, (1+K)*H] layout of
``ReceivedData.rows``). So a block's bytes in flight are one prefix of its stretch (its ids,
positions and aux whole, then its multimodal rows), and a run of consecutive blocks whose rows
are full is ONE transfer segment (``round_segments``): Mooncake's TCP transport moves a
request's segments one after another (~65 us each on loopback), so five slots meant five
segments per run of blocks (docs/benchmarks.md, issue 16 item 5).

A request of T tokens of which M are multimodal occupies ceil(T/B) blocks and uses them as two
streams that advance together:

* the *token stream* (fill_ids, M-RoPE positions, aux): token t lives in block t // B, row t % B;
* the *multimodal-row stream* (embeddings, deepstack): the i-th multimodal token's rows live in
  block i // B, row i % B. Rows after M are never written or sent.

So a text token costs 4 + 12 = 16 bytes on the wire and a multimodal token 16 + (1+K)*H*E bytes
(a round's last block ships its ids and positions whole: the unused tail, at most 16*B bytes,
costs less than the extra segments that skipping it would); a text token never ships an embedding
or deepstack row (the language side embeds text itself).
Saving versus a dense layout: (T - M) * (1+K) * H * E bytes per request; for Qwen3-VL-30B-A3B
(H=2048, K=3, bf16) that is 16 KiB per text token, for 235B-A22B (H=4096) 32 KiB
(docs/transport.md works the numbers for a 1024-image-token request).
"""

from __future__ import annotations

from typing import Iterator, List, NamedTuple, Sequence, Tuple

from sglang.srt.disaggregation.encode_language.manifest import LayoutManifest, Slot


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def block_runs(
    blocks: Sequence[int], max_len: int = 0
) -> Iterator[Tuple[int, int, int]]:
    """(index of the run's first block in ``blocks``, first block id, run length) for each
    run of consecutive block ids (at most ``max_len`` long, 0 = unbounded): one copy per slot.
    """
    j = 0
    while j < len(blocks):
        n = 1
        while (
            j + n < len(blocks)
            and blocks[j + n] == blocks[j] + n
            and (not max_len or n < max_len)
        ):
            n += 1
        yield j, blocks[j], n
        j += n


class BlockLayout(NamedTuple):
    """Where each slot lives inside a block's stretch of the region (``block_layout``)."""

    block_size: int  # B: tokens per block
    stride: int  # bytes from one block to the next
    # byte offset of each slot's block k within stretch k, in ``Slot`` order
    offsets: List[int]
    head_bytes: int  # fill_ids + positions + aux: sent whole for every block of a round
    # one multimodal row: embedding and deepstack side by side, (1+K)*H*E
    row_bytes: int


def block_layout(layout: LayoutManifest) -> BlockLayout:
    """Block-major placement of ``layout``'s slots: [fill_ids | positions | aux | rows] per
    block, the stride rounded up to 8 bytes (derived from the compared fields, so both sides
    compute the same addresses for the peer's blocks)."""
    sizes = layout.slot_block_bytes
    ids = 0
    pos = ids + sizes[Slot.FILL_IDS]
    aux = pos + sizes[Slot.MROPE_POSITIONS]
    rows = aux + sizes[Slot.AUX]
    row_bytes = layout.embed_row_bytes + layout.deepstack_row_bytes
    stride = -(-(rows + layout.block_size * row_bytes) // 8) * 8
    offsets = [rows, ids, pos, aux]
    if layout.deepstack_count > 0:
        offsets.append(rows + layout.embed_row_bytes)
    return BlockLayout(layout.block_size, stride, offsets, rows, row_bytes)


def region_base(slot_ptrs: Sequence[int]) -> int:
    """The address of a side's region (block 0's stretch) from its slot addresses."""
    return slot_ptrs[Slot.FILL_IDS]  # offset 0 of block 0


def round_segments(
    bl: BlockLayout,
    src_base: int,
    src_blocks: Sequence[int],
    dst_base: int,
    dst_blocks: Sequence[int],
    token_count: int,
    mm_count: int,
) -> Tuple[List[int], List[int], List[int]]:
    """(src addresses, dst addresses, lengths) that move ``token_count`` tokens and
    ``mm_count`` multimodal rows from ``src_blocks`` of the region at ``src_base`` into
    ``dst_blocks`` of the region at ``dst_base`` (both laid out as ``bl``; k-th source block ->
    k-th destination block). Only valid multimodal rows are sent (ids, positions and aux of
    each block whole); a run of blocks consecutive on both sides whose rows fill them is one
    segment (``LayoutManifest.wire_bytes`` counts the bytes).
    """
    B = bl.block_size
    nb = blocks_for_tokens(token_count, B)
    if len(src_blocks) < nb or len(dst_blocks) < nb:
        raise ValueError(
            f"round needs {nb} blocks: src has {len(src_blocks)}, dst {len(dst_blocks)}"
        )
    # Block k's bytes in flight are one prefix of its stretch: ids, positions and aux whole,
    # then its multimodal rows. Consecutive blocks on both sides merge when the earlier one's
    # rows fill it.
    srcs: List[int] = []
    dsts: List[int] = []
    lens: List[int] = []
    for k in range(nb):
        rows = max(0, min(B, mm_count - k * B))
        n = bl.stride if rows == B else bl.head_bytes + rows * bl.row_bytes
        s = src_base + src_blocks[k] * bl.stride
        d = dst_base + dst_blocks[k] * bl.stride
        if srcs and srcs[-1] + lens[-1] == s and dsts[-1] + lens[-1] == d:
            lens[-1] += n
        else:
            srcs.append(s)
            dsts.append(d)
            lens.append(n)
    return srcs, dsts, lens
