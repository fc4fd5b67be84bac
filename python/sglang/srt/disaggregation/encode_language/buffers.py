"""``MultimodalDataBuffers``: the host block buffers both sides register with the transfer engine.

Layout (N = ``num_blocks`` blocks; B tokens per block; H hidden size; K deepstack layers; E =
embedding itemsize). Five slots, in ``Slot`` order::

    slot 0  embeddings  [N, B, H]       embed dtype   B*H*E bytes per block
    slot 1  fill_ids    [N, B]          int32         4*B
    slot 2  mrope_pos   [N, 3, B]       int32         12*B
    slot 3  aux         [N, A]          uint8         A = 64-byte RequestManifest header
                                                          + ceil(B/8) bytes of multimodal bitmap,
                                                          rounded up to 8 (80 for B = 128)
    slot 4  deepstack   [N, B, K*H]     embed dtype   B*K*H*E  (absent, zero bytes, when K = 0)

laid out *block-major* in one registered region (``round_plan.block_layout``): block k is one
stretch holding its fill_ids, positions, aux and B multimodal rows; the slot tensors are strided
views of that region. ``round_plan.py`` gives the layout, the two streams a request uses (token
stream and multimodal-row stream) and the segments a round moves.

The aux bitmap tells the language side which tokens of a block are multimodal, so the received
rows are placed exactly, without guessing from token ids. Each aux header also carries a
``BlockStamp``: the bootstrap room, the generation of the reservation written, the block's index
in the request and, when the round asks for it, a checksum (XXH3-64, low 32 bits) of what the
round wrote into the block (bitmap, ids, positions, rows). ``read_round`` checks room,
generation, index and manifest of every block, and with ``verify`` the checksum after copying
out, so a late write from an earlier owner of the block (an encoder that stalled past its fence)
fails the request instead of passing wrong bytes. The receiver asks for checksums only in rounds
whose blocks such a write can reach (``receiver.py``).

The region is allocated once, registered once with the transfer engine, and pinned when a CUDA
GPU is present.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import xxhash

from sglang.srt.disaggregation.encode_language.manifest import (
    AUX_HEADER_BYTES,
    AUX_HEADER_DTYPE,
    STAMP_OFFSET,
    BlockStamp,
    LayoutManifest,
    ProtocolError,
    RequestManifest,
    Slot,
    dtype_from_name,
)
from sglang.srt.disaggregation.encode_language.payload import (
    MultimodalPayload,
    ReceivedData,
    alloc_received,
)
from sglang.srt.disaggregation.encode_language.round_plan import (
    block_layout,
    block_runs,
    blocks_for_tokens,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class MultimodalBufferConfig:
    """Sizes of one side's buffers (``--disaggregation-mm-*`` server arguments)."""

    hidden_size: int
    deepstack_count: int
    block_size: int = 128
    num_blocks: int = 256
    embed_dtype: str = "bfloat16"
    pin_memory: Optional[bool] = None  # None = pin iff torch.cuda.is_available()

    @classmethod
    def from_server_args(
        cls,
        server_args,
        *,
        hidden_size: int,
        deepstack_count: int,
        embed_dtype: str = "bfloat16",
    ) -> "MultimodalBufferConfig":
        """Sizes from the server arguments; H, K and dtype from the model."""
        return cls(
            hidden_size=hidden_size,
            deepstack_count=deepstack_count,
            block_size=server_args.disaggregation_mm_block_size,
            num_blocks=server_args.disaggregation_mm_num_blocks,
            embed_dtype=embed_dtype,
        )

    def layout(self) -> LayoutManifest:
        return LayoutManifest(
            hidden_size=self.hidden_size,
            deepstack_count=self.deepstack_count,
            block_size=self.block_size,
            embed_dtype=self.embed_dtype,
            num_blocks=self.num_blocks,
        )


def _record_event(device: torch.device) -> "torch.cuda.Event":
    """An event on ``device``'s current stream, the stream its copies run on (a transfer
    thread's current device is not the server's GPU: CUDA starts every thread on device 0).
    """
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def use_on_streams(t: torch.Tensor, streams) -> None:
    """``t`` (a device tensor allocated on another stream) is read by work queued on
    ``streams``: the caching allocator must not hand its memory to a new tensor of the
    allocating stream before that work is done, whenever ``t`` is freed (``record_stream``).
    Ordering the reads after the writes is the caller's part (events or host waits)."""
    if t.is_cuda:
        for stream in streams:
            t.record_stream(stream)


def _after_producer(payload: MultimodalPayload, device: torch.device) -> None:
    """Order the copies this thread is about to queue out of ``payload`` after the producer's
    stream (``payload.ready``), and keep the tensors' memory until those copies are done.
    """
    stream = torch.cuda.current_stream(device)
    if payload.ready is not None:
        stream.wait_event(payload.ready)
    for t in payload.tensors():
        use_on_streams(t, (stream,))


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; from pinned host memory to a GPU asynchronously, through one
    contiguous device buffer when ``dst`` is a column view (the embedding or deepstack part of
    ``rows``), so the H2D copy is one contiguous transfer and the scatter a device copy.
    """
    if not dst.is_cuda or src.is_cuda:
        dst.copy_(src)
    elif dst.is_contiguous():
        dst.copy_(src, non_blocking=True)
    else:
        tmp = torch.empty(src.shape, dtype=src.dtype, device=dst.device)
        tmp.copy_(src, non_blocking=True)
        dst.copy_(tmp)


def _wait_for(pieces) -> None:
    """Until the copies of every piece (index, length, CUDA event or None) have completed."""
    if pieces and pieces[-1][2] is not None:
        pieces[-1][2].synchronize()


class RoundStamp(NamedTuple):
    """What the receiver expects in every aux header of a round."""

    room: int
    generation: int
    first_block: int  # index within the request of the round's first block


# Checksummed rounds copy between payload / request tensors and blocks in pieces of at most
# this many consecutive blocks: each piece is one copy per slot, and the checksums of piece i
# are computed while the copies of piece i+1 run (GPU: after piece i's CUDA event). Rounds
# without checksums copy whole runs of consecutive blocks.
PIECE_BLOCKS = 2


class MultimodalDataBuffers:
    """Host block buffers of one side (encode or language)."""

    def __init__(self, config: MultimodalBufferConfig):
        self.config = config
        self.layout = config.layout()
        L = self.layout
        self.num_blocks = L.num_blocks
        self.block_size = B = L.block_size
        n = L.num_blocks
        pin = (
            torch.cuda.is_available()
            if config.pin_memory is None
            else config.pin_memory
        )
        self.pinned = bool(pin)
        edt = dtype_from_name(L.embed_dtype)
        self.block_layout = BL = block_layout(L)
        # One region, block-major (module docstring); the slots are strided views of it.
        self.region = torch.zeros(
            (n, BL.stride), dtype=torch.uint8, pin_memory=self.pinned
        )

        def view(slot: Slot, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
            off = BL.offsets[slot]
            return self.region[:, off : off + nbytes].view(dtype)

        sizes = L.slot_block_bytes
        H, K = L.hidden_size, L.deepstack_count
        self.fill_ids = view(
            Slot.FILL_IDS, sizes[Slot.FILL_IDS], dtype_from_name(L.id_dtype)
        )
        self.mrope_positions = view(
            Slot.MROPE_POSITIONS,
            sizes[Slot.MROPE_POSITIONS],
            dtype_from_name(L.pos_dtype),
        ).view(n, 3, B)
        self.aux = view(Slot.AUX, sizes[Slot.AUX], torch.uint8)
        # [N, B, (1+K)*H]: each row a token's embedding and deepstack side by side
        self.rows = view(Slot.EMBEDDINGS, B * BL.row_bytes, edt).view(n, B, (1 + K) * H)
        self.embeddings = self.rows[:, :, :H]
        self.deepstack = self.rows[:, :, H:] if K > 0 else None
        self._registered_with = None
        logger.info(
            "MultimodalDataBuffers: %d blocks x %d tokens, H=%d K=%d %s: "
            "%.1f MiB host memory (%s)",
            L.num_blocks,
            B,
            L.hidden_size,
            L.deepstack_count,
            L.embed_dtype,
            self.nbytes() / 2**20,
            "pinned" if self.pinned else "pageable",
        )

    # Slots --------------------------------------------------------------------------------
    def slots(self) -> List[torch.Tensor]:
        s = [self.embeddings, self.fill_ids, self.mrope_positions, self.aux]
        if self.deepstack is not None:
            s.append(self.deepstack)
        return s

    def slot_ptrs(self) -> List[int]:
        return [t.data_ptr() for t in self.slots()]

    def slot_block_bytes(self) -> List[int]:
        return self.layout.slot_block_bytes

    def nbytes(self) -> int:
        return self.region.numel()

    def register(self, engine) -> None:
        """Register the region (every slot) once with a MooncakeTransferEngine-like object."""
        if self._registered_with is not None:
            if self._registered_with is engine:
                return
            raise RuntimeError(
                "MultimodalDataBuffers are already registered with another engine"
            )
        engine.register(self.region.data_ptr(), self.region.numel())
        self._registered_with = engine

    def deregister(self) -> None:
        if self._registered_with is None:
            return
        try:
            self._registered_with.deregister(self.region.data_ptr())
        except Exception:  # engine may already be gone at shutdown
            logger.debug("deregister failed", exc_info=True)
        self._registered_with = None

    def _check_blocks(self, blocks: Sequence[int], n: int) -> None:
        if len(blocks) < n:
            raise ValueError(f"need {n} blocks, got {len(blocks)}")
        for b in blocks[:n]:
            if not (0 <= b < self.num_blocks):
                raise ValueError(f"block {b} out of range 0..{self.num_blocks - 1}")

    # Encode side: write a request -----------------------------------------------------------
    def write_request(
        self,
        blocks: Sequence[int],
        payload: MultimodalPayload,
        room: int = 0,
        generation: int = 0,
    ) -> RequestManifest:
        """Copy a whole ``payload`` into ``blocks`` (token stream and multimodal-row stream, see
        the module docstring). Returns the request manifest written into every aux slot.
        """
        return self.write_range(
            blocks,
            payload,
            0,
            payload.total_tokens,
            0,
            payload.mm_tokens,
            room,
            generation,
        )

    def write_range(
        self,
        blocks: Sequence[int],
        payload: MultimodalPayload,
        token_start: int,
        token_count: int,
        mm_start: int,
        mm_count: int,
        room: int = 0,
        generation: int = 0,
        checksum: bool = True,
    ) -> RequestManifest:
        """Stage tokens ``[token_start, +token_count)`` and multimodal rows ``[mm_start, +mm_count)``
        of ``payload`` into ``blocks`` (block k holds the k-th B tokens / rows of the range).
        ``token_start`` is a multiple of B; each aux slot gets the manifest, its multimodal bitmap
        and a ``BlockStamp`` (room, ``generation``, block index, and the checksum when
        ``checksum``, else 0: the receiver asks for it only where a late write is possible).

        From a GPU payload the multimodal rows go in one asynchronous D2H copy per slot per run
        of blocks, then the token stream (ids and positions, 16 bytes a token; the mask comes to
        the host first, for the bitmaps), while the host builds bitmaps and headers; one wait.
        The copies run on this thread's stream, after ``payload.ready`` (the producer's stream),
        and have completed when this returns, so the blocks can be sent.
        """
        L, B = self.layout, self.block_size
        payload.validate(L, count_mask=False)
        T, M = payload.total_tokens, payload.mm_tokens
        if token_start % B or not (0 < token_count and token_start + token_count <= T):
            raise ValueError(
                f"bad token range [{token_start}, +{token_count}) for {T} tokens, B={B}"
            )
        if mm_count and (mm_start % B or mm_start + mm_count > M):
            raise ValueError(
                f"bad multimodal range [{mm_start}, +{mm_count}) for {M} rows, B={B}"
            )
        nb = blocks_for_tokens(token_count, B)
        self._check_blocks(blocks, nb)
        blocks = list(blocks[:nb])
        t = slice(token_start, token_start + token_count)
        device = payload.device()
        cuda = device is not None
        if cuda:  # before any copy out of the payload
            _after_producer(payload, device)
        mask = self._to_host(payload.mm_mask[t])  # for the bitmaps
        emb, ds = payload.embeddings, payload.deepstack
        small = _record_event(device) if cuda else None

        def put_token_stream():  # 16 bytes a token: one copy per slot per run, into blocks
            for j, b, n in block_runs(blocks):
                t0 = token_start + j * B
                t1 = token_start + min(token_count, (j + n) * B)
                self._put_tokens(
                    b, n, payload.fill_ids[t0:t1], payload.mrope_positions[:, t0:t1]
                )

        if checksum:  # before the rows: a piece's checksum follows its copies' event
            put_token_stream()
        # Multimodal rows: per run of consecutive blocks, one strided copy per slot (host) or,
        # from a GPU, the rows joined on the device and one contiguous D2H copy per block (a
        # block's rows are contiguous, a run's are not); in pieces of PIECE_BLOCKS when
        # checksumming, so the checksums of a piece overlap the copies of the next.
        mm, H = slice(mm_start, mm_start + mm_count), L.hidden_size
        if cuda and mm_count:
            joined = emb[mm] if ds is None else torch.cat((emb[mm], ds[mm]), dim=1)
        pieces = []
        for j, b, n in block_runs(blocks, PIECE_BLOCKS if checksum else 0):
            m0, m1 = j * B, min(mm_count, (j + n) * B)
            for r0, r1, dst in self._row_views(b, m1 - m0, per_block=cuda):
                r0, r1 = m0 + r0, m0 + r1
                if cuda:
                    dst.copy_(joined[r0:r1], non_blocking=True)
                    continue
                src = slice(mm_start + r0, mm_start + r1)
                dst[..., :H].copy_(emb[src].reshape(dst[..., :H].shape))
                if ds is not None:
                    dst[..., H:].copy_(ds[src].reshape(dst[..., H:].shape))
            pieces.append((j, n, _record_event(device) if cuda else None))
        if not checksum:  # after the rows, so their D2H copies start first
            put_token_stream()
            if cuda:  # the last event waited for covers the token stream's copies too
                pieces.append((nb, 0, _record_event(device)))
        # Meanwhile the bitmaps and the headers, on the host.
        if small is not None:
            small.synchronize()
        mask_np = mask.numpy()
        n_mask = int(np.count_nonzero(mask_np))
        if token_count == T and n_mask != M:
            _wait_for(pieces)  # no copy may still write the blocks once this raises
            payload.check_mask_count(n_mask)
        padded = np.zeros(nb * B, dtype=bool)  # (np.pad: ~25 us more on a small round)
        padded[:token_count] = mask_np
        bits = np.packbits(padded.reshape(nb, B), axis=1, bitorder="little")
        aux = self.aux.numpy()
        aux[blocks] = 0
        aux[blocks, AUX_HEADER_BYTES : AUX_HEADER_BYTES + bits.shape[1]] = bits
        manifest = payload.manifest(L)
        checksums = (
            dict(self._checksums_after(pieces, blocks, token_count, mm_count, bits))
            if checksum
            else {}
        )
        for j, b in enumerate(blocks):
            stamp = BlockStamp(
                token_start // B + j, room, generation, checksums.get(j, 0)
            )
            header = manifest.pack(stamp)
            aux[b, : len(header)] = np.frombuffer(header, dtype=np.uint8)
        # unchecksummed: the headers were written while the rows copied
        _wait_for(pieces)
        return manifest

    def _checksums_after(
        self,
        pieces: List[Tuple[int, int, Optional["torch.cuda.Event"]]],
        blocks: Sequence[int],
        token_count: int,
        mm_count: int,
        bits: np.ndarray,
    ) -> Iterator[Tuple[int, int]]:
        """(j, checksum of ``blocks[j]``) piece by piece, each piece once its copies have
        completed (its CUDA event), so later pieces still copy while earlier ones hash.
        """
        B = self.block_size
        for j0, n, event in pieces:
            if event is not None:
                event.synchronize()
            for j in range(j0, j0 + n):
                c = min(B, token_count - j * B)
                mc = max(0, min(B, mm_count - j * B))
                yield j, self._checksum(blocks[j], c, mc, bits[j, : (c + 7) // 8])

    def _to_host(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the host: itself, or a (pinned) copy queued on the current stream."""
        if not x.is_cuda:
            return x
        h = torch.empty(x.shape, dtype=x.dtype, pin_memory=self.pinned)
        h.copy_(x, non_blocking=True)
        return h

    def _row_views(
        self, b: int, count: int, per_block: bool = False
    ) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """(first row, end row, view of ``self.rows``) covering the first ``count`` multimodal
        rows of blocks ``b, b+1, ...``: the full blocks as one [n, B, W] view and the last
        block's rows as [r, W]; with ``per_block``, one contiguous [r, W] view per block (what a
        copy to or from a GPU needs to stay one DMA transfer)."""
        B = self.block_size
        full, rest = divmod(max(count, 0), B)
        if per_block:
            for k in range(full + (rest > 0)):
                n = min(B, count - k * B)
                yield k * B, k * B + n, self.rows[b + k, :n]
            return
        if full:
            yield 0, full * B, self.rows[b : b + full]
        if rest:
            yield full * B, count, self.rows[b + full, :rest]

    def _put_tokens(self, b: int, n: int, ids: torch.Tensor, pos: torch.Tensor) -> None:
        """Ids and M-RoPE positions of up to ``n * B`` tokens into blocks ``b .. b+n-1``: one
        copy each into contiguous block memory (from a GPU: asynchronous D2H; the positions
        are laid out [block, 3, B] where they are, the unused tail of the last block zeroed).
        """
        B, c = self.block_size, ids.shape[0]
        pad = torch.nn.functional.pad
        self.fill_ids[b : b + n].copy_(
            pad(ids, (0, n * B - c)).view(n, B), non_blocking=True
        )
        blocked = pad(pos, (0, n * B - c)).view(3, n, B)
        self.mrope_positions[b : b + n].copy_(
            blocked.transpose(0, 1), non_blocking=True
        )

    def _get_tokens(self, b: int, n: int, ids: torch.Tensor, pos: torch.Tensor) -> None:
        """The reverse of ``_put_tokens``: blocks ``b .. b+n-1`` into ``ids`` / ``pos``."""
        B, c = self.block_size, ids.shape[0]
        full = c // B
        if full:
            ids[: full * B].view(full, B).copy_(self.fill_ids[b : b + full])
        if c % B:
            ids[full * B :].copy_(self.fill_ids[b + full, : c % B])
        if full:
            pos[:, : full * B].view(3, full, B).copy_(
                self.mrope_positions[b : b + full].permute(1, 0, 2)
            )
        if c % B:
            pos[:, full * B :].copy_(self.mrope_positions[b + full, :, : c % B])

    def _checksum(self, b: int, c: int, mc: int, bits: np.ndarray) -> int:
        """Checksum of what a round puts into block ``b``: bitmap, ``c`` ids and positions,
        ``mc`` multimodal rows (embedding and deepstack side by side, as they lie in the block;
        the order both sides use). XXH3-64 (~13x faster than zlib's CRC32 here), low 32 bits
        (the aux header's field)."""
        h = xxhash.xxh3_64(np.ascontiguousarray(bits))
        h.update(self.fill_ids[b, :c].numpy())
        for r in range(3):
            h.update(self.mrope_positions[b, r, :c].numpy())
        if mc:
            h.update(self.rows[b, :mc].view(torch.uint8).numpy())
        return h.intdigest() & 0xFFFFFFFF

    # Language side: read a round out ---------------------------------------------------------
    def read_manifest(self, block: int) -> Tuple[RequestManifest, BlockStamp]:
        return RequestManifest.unpack(self.aux[block].numpy().tobytes())

    @staticmethod
    def _check_stamps(
        blocks: Sequence[int], auxes: np.ndarray, expect: RoundStamp
    ) -> Tuple[RequestManifest, np.ndarray]:
        """The round's manifest and the blocks' checksums; ``ProtocolError`` unless every block
        carries ``expect``'s room and generation, its index in the request and the same
        manifest (all blocks' headers read at once, the first one parsed)."""
        heads = np.ascontiguousarray(auxes[:, :AUX_HEADER_BYTES])
        manifest, _ = RequestManifest.unpack(heads[0].tobytes())
        rec = heads.view(AUX_HEADER_DTYPE)[:, 0]
        stamp_ok = (
            (rec["room"] == expect.room)
            & (rec["generation"] == expect.generation)
            & (rec["block_index"] == expect.first_block + np.arange(len(heads)))
        )
        same = (heads[:, :STAMP_OFFSET] == heads[0, :STAMP_OFFSET]).all(axis=1)
        bad = np.flatnonzero(~(stamp_ok & same))
        if len(bad):
            j = int(bad[0])
            if not stamp_ok[j]:
                want = (expect.room, expect.generation, expect.first_block + j)
                got = tuple(
                    int(rec[f][j]) for f in ("room", "generation", "block_index")
                )
                raise ProtocolError(
                    f"block {blocks[j]} holds (room, generation, block index) {got}, expected "
                    f"{want}: written by another reservation (a late write)"
                )
            raise ProtocolError(f"block {blocks[j]} carries another request manifest")
        return manifest, rec["checksum"]

    def read_round(
        self,
        blocks: Sequence[int],
        token_count: int,
        mm_count: int,
        expect: RoundStamp,
        device: Optional[torch.device] = None,
        out: Optional[ReceivedData] = None,
        verify: bool = True,
    ) -> ReceivedData:
        """Check and copy a round out of ``blocks``: the request manifest and the round's data,
        copies, never views of the blocks (lesson 2).

        Every block's aux header must carry ``expect``'s room and generation, the right block
        index and the same manifest (checked while the rows copy); with ``verify``, after
        copying, every block's checksum must match what is in the blocks now. Otherwise
        ``ProtocolError``: the blocks were written by someone else (a late write of an earlier
        reservation), and the data must not be used. (The receiver verifies only rounds whose blocks a late write can reach.)

        ``out`` (e.g. ``slice_received`` of ``alloc_received``): the destination tensors of this
        round, filled in place (the request's final tensors: no later concatenation). Without
        it, fresh tensors, the multimodal rows on ``device`` (default: host). Each slot is one
        copy per run of consecutive blocks, straight from the block buffers (from pinned buffers
        to a GPU: one H2D copy at pinned bandwidth, no host gather); the token stream and the
        bitmap are unpacked on the host while those copies run."""
        B, H = self.block_size, self.layout.hidden_size
        nb = blocks_for_tokens(max(token_count, 1), B)
        self._check_blocks(blocks, nb)
        blocks = list(blocks[:nb])
        if mm_count > nb * B:
            raise ProtocolError(
                f"round has {mm_count} rows but {nb} blocks hold at most {nb * B}"
            )
        if out is None:
            out = alloc_received(self.layout, token_count, mm_count, device)
        for name, n in (
            ("fill_ids", token_count),
            ("mm_mask", token_count),
            ("embeddings", mm_count),
        ):
            if getattr(out, name).shape[0] != n:
                raise ValueError(
                    f"out.{name} has {getattr(out, name).shape[0]} rows, not {n}"
                )
        # The multimodal rows first (to a GPU: asynchronous H2D copies), then, while they run,
        # the headers and the token stream on the host.
        emb, ds = out.embeddings, out.deepstack
        non_blocking = self.pinned and emb.is_cuda
        # Copies on this thread's stream of the rows' device; waited for (host) before return,
        # so the thread that takes ``out`` (take()) needs no stream ordering, only the
        # allocator rule for the streams it reads the rows on (``use_on_streams``).
        # Whole rows (embedding | deepstack, as the block holds them) into ``out.rows`` where
        # it has them: to a GPU one contiguous H2D copy per block, on the host one strided copy
        # per run; else the two column parts separately.
        rows = out.rows
        pieces = []
        for j, b, n in block_runs(blocks, PIECE_BLOCKS if verify else 0):
            m0, m1 = j * B, min(mm_count, (j + n) * B)
            for r0, r1, src in self._row_views(b, m1 - m0, per_block=emb.is_cuda):
                r0, r1 = m0 + r0, m0 + r1
                if rows is not None:
                    _copy_rows(rows[r0:r1].view(src.shape), src)
                    continue
                emb[r0:r1].view(src[..., :H].shape).copy_(src[..., :H])
                if ds is not None:
                    ds[r0:r1].view(src[..., H:].shape).copy_(src[..., H:])
            pieces.append((j, n, _record_event(emb.device) if non_blocking else None))
        auxes = self.aux.numpy()[blocks]  # a copy: the headers as they were checked
        try:
            manifest, checksums = self._check_stamps(blocks, auxes, expect)
        except ProtocolError:
            _wait_for(pieces)  # the blocks may be reused once this raises
            raise
        out = out._replace(manifest=manifest)
        for j, b, n in block_runs(blocks):
            t0, t1 = j * B, min(token_count, (j + n) * B)
            self._get_tokens(b, n, out.fill_ids[t0:t1], out.mrope_positions[:, t0:t1])
        bits = auxes[:, AUX_HEADER_BYTES : AUX_HEADER_BYTES + (B + 7) // 8]
        out.mm_mask.numpy()[:] = np.unpackbits(
            bits, axis=1, count=B, bitorder="little"
        ).reshape(-1)[:token_count]
        if not verify:
            _wait_for(pieces)  # the blocks may be reused once this returns
            return out
        # Checked after each piece's copy has completed: a byte that came from a late write is
        # still in the block then. (Checking while the copy runs could miss a late write landing
        # between the check and the copy; that is why a piece's checksums wait for its event.)
        for j, got in self._checksums_after(
            pieces, blocks, token_count, mm_count, bits
        ):
            if got != checksums[j]:
                raise ProtocolError(
                    f"block {blocks[j]} checksum {got:#010x} != {int(checksums[j]):#010x} "
                    f"in its aux header: torn or late write"
                )
        return out


__all__ = [
    "MultimodalBufferConfig",
    "MultimodalDataBuffers",
    "RoundStamp",
    "use_on_streams",
]
