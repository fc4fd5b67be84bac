"""The language side's row broadcast over the TP group (``LanguageMMReceiver._take_rows``), on
two real gloo ranks without servers: the non-owner rank gets exactly the owner's rows (dtypes,
shapes, values, the bool mask, ``deepstack=None``, item table, manifest), and an error the
owner hits while taking the rows fails the request on both ranks."""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.distributed as dist
from el_helpers import run_two_ranks


def _rows(with_deepstack: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    T, M, H = 11, 4, 8
    mask = torch.zeros(T, dtype=torch.bool)
    mask[3:7] = True
    return dict(
        fill_ids=torch.arange(T, dtype=torch.int64) + 100,
        mrope_positions=torch.randint(0, 50, (3, T), generator=g, dtype=torch.int64),
        mm_mask=mask,
        embeddings=torch.randn(M, H, generator=g),
        deepstack=torch.randn(M, 3 * H, generator=g) if with_deepstack else None,
    )


def _as_taken(fields: dict) -> dict:
    """``fields`` laid out as ``LanguageReceiver.take()`` returns them: embedding and
    deepstack rows side by side in ``rows``, the two fields views of it."""
    emb, ds = fields["embeddings"], fields["deepstack"]
    rows = emb if ds is None else torch.cat([emb, ds], dim=1)
    H = emb.shape[1]
    return fields | dict(
        embeddings=rows[:, :H], deepstack=None if ds is None else rows[:, H:], rows=rows
    )


class _Receiver:
    def __init__(self, data=None, error=None) -> None:
        self.data, self.error = data, error

    def take(self):
        if self.error is not None:
            raise RuntimeError(self.error)
        return self.data


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from sglang.srt.disaggregation.encode_language.payload import ReceivedData
    from sglang.srt.disaggregation.encode_language.language_mm_receiver import (
        LanguageMMReceiver,
        WaitingRequest,
    )
    from sglang.srt.disaggregation.encode_language.metrics import EncodeLanguageMetrics

    group = types.SimpleNamespace(
        first_rank=0, cpu_group=dist.group.WORLD, device_group=dist.group.WORLD
    )
    rx = object.__new__(LanguageMMReceiver)
    rx.scheduler = types.SimpleNamespace(attn_tp_group=group, device="cpu")
    rx.rank, rx.num_ranks, rx.is_owner = rank, 2, rank == 0
    rx.metrics = EncodeLanguageMetrics("language", enabled=False)
    out = []
    for with_deepstack, error in ((True, None), (False, None), (True, "bad block")):
        data = ReceivedData(
            manifest=types.SimpleNamespace(mrope_delta=-7),
            items=({"modality": "image", "offsets": [[3, 6]], "hash": 5},),
            **_as_taken(_rows(with_deepstack)),
        )
        receiver = _Receiver(data, error) if rank == 0 else None
        w = WaitingRequest(recv_req=None, receiver=receiver, since=0.0)
        try:
            got = rx._take_rows(w)
        except ValueError as e:
            out.append(("error", str(e)))
            continue
        out.append(
            (
                "ok",
                {f: getattr(got, f) for f in _rows(True)},
                got.items,
                got.manifest.mrope_delta,
            )
        )
    results[rank] = out
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_rows_broadcast_to_the_other_rank() -> None:
    owner, follower = run_two_ranks(_worker)
    assert len(owner) == len(follower) == 3
    for i, with_deepstack in enumerate((True, False)):
        expected = _rows(with_deepstack)
        for got in (owner[i], follower[i]):
            assert got[0] == "ok"
            for name, tensor in expected.items():
                if tensor is None:
                    assert got[1][name] is None, name
                else:
                    assert got[1][name].dtype == tensor.dtype, name
                    assert torch.equal(got[1][name], tensor), name
            assert got[2] == ({"modality": "image", "offsets": [[3, 6]], "hash": 5},)
            assert got[3] == -7
    # The owner's failure to take the rows fails the request on both ranks.
    assert owner[2] == follower[2] == ("error", "RuntimeError: bad block")
