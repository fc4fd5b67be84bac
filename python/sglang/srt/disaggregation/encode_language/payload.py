"""What one request carries across: the encoder's ``MultimodalPayload`` and the language
side's ``ReceivedData`` (the tensors each round is copied into, ``alloc_received`` /
``slice_received``). The blocks in between are ``buffers.py``'s.
"""

from __future__ import annotations

import dataclasses
from typing import List, NamedTuple, Optional

import torch

from sglang.srt.disaggregation.encode_language.manifest import (
    LayoutManifest,
    RequestManifest,
    dtype_from_name,
)


@dataclasses.dataclass
class MultimodalPayload:
    """One request as the encoder produced it.

    fill_ids [T] int, mrope_positions [3, T] int, mm_mask [T] bool (True = multimodal token),
    embeddings [M, H] and deepstack [M, K*H] (None when K = 0) for the M multimodal tokens in
    prompt order, mrope_delta the M-RoPE position delta of the request.
    """

    fill_ids: torch.Tensor
    mrope_positions: torch.Tensor
    mm_mask: torch.Tensor
    embeddings: torch.Tensor
    deepstack: Optional[torch.Tensor]
    mrope_delta: int
    items: list = dataclasses.field(default_factory=list)  # item table, item_table.py
    # CUDA event recorded on the producing stream once the tensors are written: the copies out
    # of them (write_range, on a transfer thread's stream) wait for it (record_ready).
    ready: Optional["torch.cuda.Event"] = None

    def tensors(self) -> List[torch.Tensor]:
        ts = [self.fill_ids, self.mrope_positions, self.mm_mask, self.embeddings]
        return ts + ([self.deepstack] if self.deepstack is not None else [])

    def device(self) -> Optional[torch.device]:
        """The CUDA device of the payload's device tensors; None when all are on the host."""
        return next((t.device for t in self.tensors() if t.is_cuda), None)

    def nbytes(self) -> int:
        """Host or device bytes the payload holds (while the encoder keeps it)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def record_ready(self) -> None:
        """Set ``ready`` on the current stream: the producer calls this on the stream that
        wrote the tensors, before the payload leaves for another thread (``send()``), whose
        copies would otherwise race the producer's queued work (issue 15, item 1)."""
        device = self.device()
        if device is not None:
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(device))

    @property
    def total_tokens(self) -> int:
        return int(self.fill_ids.shape[0])

    @property
    def mm_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    def manifest(self, layout: LayoutManifest) -> RequestManifest:
        return RequestManifest(
            total_tokens=self.total_tokens,
            mm_tokens=self.mm_tokens,
            mrope_delta=int(self.mrope_delta),
            deepstack_count=layout.deepstack_count,
            embed_dtype=layout.embed_dtype,
            hidden_size=layout.hidden_size,
        )

    def validate(self, layout: LayoutManifest, count_mask: bool = True) -> None:
        """Shapes and dtypes against ``layout``; with ``count_mask``, also that the mask marks
        as many tokens as there are rows (a device sync for a GPU mask: ``write_range`` counts
        its host copy instead)."""
        T, H, K = self.total_tokens, layout.hidden_size, layout.deepstack_count
        M = self.mm_tokens
        if T < 1:
            raise ValueError("payload has no tokens")
        if self.fill_ids.dim() != 1:
            raise ValueError(f"fill_ids must be [T], got {tuple(self.fill_ids.shape)}")
        if tuple(self.mrope_positions.shape) != (3, T):
            raise ValueError(
                f"mrope_positions must be [3, {T}], got {tuple(self.mrope_positions.shape)}"
            )
        if tuple(self.mm_mask.shape) != (T,) or self.mm_mask.dtype != torch.bool:
            raise ValueError(f"mm_mask must be bool [{T}]")
        if count_mask:
            self.check_mask_count(int(self.mm_mask.sum()))
        if tuple(self.embeddings.shape) != (M, H):
            raise ValueError(
                f"embeddings must be [{M}, {H}], got {tuple(self.embeddings.shape)}"
            )
        if self.embeddings.dtype != dtype_from_name(layout.embed_dtype):
            raise ValueError(
                f"embeddings dtype {self.embeddings.dtype} != layout {layout.embed_dtype}"
            )
        if K == 0:
            if self.deepstack is not None and self.deepstack.numel() != 0:
                raise ValueError(
                    "layout has no deepstack slot (K = 0) but the payload carries deepstack"
                )
        else:
            if self.deepstack is None or tuple(self.deepstack.shape) != (M, K * H):
                got = None if self.deepstack is None else tuple(self.deepstack.shape)
                raise ValueError(f"deepstack must be [{M}, {K * H}], got {got}")
            if self.deepstack.dtype != self.embeddings.dtype:
                raise ValueError("deepstack dtype differs from embeddings dtype")

    def check_mask_count(self, n_mask: int) -> None:
        if n_mask != self.mm_tokens:
            raise ValueError(
                f"mm_mask marks {n_mask} multimodal tokens but embeddings has "
                f"{self.mm_tokens} rows"
            )


class ReceivedData(NamedTuple):
    """What the language side takes out of the blocks, for one round (T = the round's tokens,
    M its multimodal rows) or the whole request: copies of the blocks, never views of them.

    ``rows`` (whole requests from ``LanguageReceiver.take()``): one [M, (1+K)*H] tensor holding
    each multimodal token's embedding and deepstack rows side by side, the layout the model's
    precomputed-embedding input takes (and the blocks'); ``embeddings`` and ``deepstack`` are
    column views of it. For one round (``slice_received``): the round's rows of that tensor.
    """

    manifest: RequestManifest
    fill_ids: torch.Tensor  # [T]
    mrope_positions: torch.Tensor  # [3, T]
    mm_mask: torch.Tensor  # [T] bool
    embeddings: torch.Tensor  # [M, H]
    deepstack: Optional[torch.Tensor]  # [M, K*H] or None when K = 0
    # item table of the whole request (item_table.py); () for one round
    items: tuple = ()
    rows: Optional[torch.Tensor] = None  # [M, (1+K)*H]: embeddings | deepstack


def alloc_received(
    layout: LayoutManifest,
    total_tokens: int,
    mm_tokens: int,
    device: Optional[torch.device] = None,
    pin_memory: bool = False,
) -> ReceivedData:
    """Empty destination tensors for a whole request (manifest None until read), filled round
    by round by ``read_round(..., out=slice_received(...))``: ids, positions and mask on the
    host, the multimodal rows in one [M, (1+K)*H] tensor on ``device`` (host: pinned when
    ``pin_memory``)."""
    T, M, H = total_tokens, mm_tokens, layout.hidden_size
    width = (1 + layout.deepstack_count) * H
    device = torch.device("cpu") if device is None else torch.device(device)
    rows = torch.empty(
        (M, width),
        dtype=dtype_from_name(layout.embed_dtype),
        device=device,
        pin_memory=pin_memory and device.type == "cpu",
    )
    return ReceivedData(
        None,
        torch.empty(T, dtype=dtype_from_name(layout.id_dtype)),
        torch.empty((3, T), dtype=dtype_from_name(layout.pos_dtype)),
        torch.empty(T, dtype=torch.bool),
        rows[:, :H],
        rows[:, H:] if layout.deepstack_count else None,
        (),
        rows,
    )


def slice_received(data: ReceivedData, token_start, token_count, mm_start, mm_count):
    """The part of ``data`` (views) that one round fills."""
    t = slice(token_start, token_start + token_count)
    m = slice(mm_start, mm_start + mm_count)
    return data._replace(
        fill_ids=data.fill_ids[t],
        mrope_positions=data.mrope_positions[:, t],
        mm_mask=data.mm_mask[t],
        embeddings=data.embeddings[m],
        deepstack=None if data.deepstack is None else data.deepstack[m],
        rows=None if data.rows is None else data.rows[m],
    )
