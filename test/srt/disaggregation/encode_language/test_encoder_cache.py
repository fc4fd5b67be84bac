"""The encode server's embedding cache (``encoder_cache.EncoderEmbeddingCache``) in process,
over SGLang's own multimodal embedding cache (``mm_schedule.embedding_cache``): cached rows
come back byte for byte, a hash whose cached rows have another size is a miss, LRU eviction
within ``SGLANG_VLM_CACHE_SIZE_MB``, and with two TP ranks (gloo) both agree on the hits while
only the owner holds rows. The served behaviour (through the router, equal to HF) is in
``test_serving.py`` and ``test_serving_global_cache.py``."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import torch
from el_helpers import run_two_ranks

from sglang.srt.disaggregation.encode_language.encoder_cache import (
    EncoderEmbeddingCache,
)
from sglang.srt.managers import mm_schedule
from sglang.srt.multimodal.modality import Modality

DIM = 16  # (1+K)*H of the rows


@dataclasses.dataclass
class _Item:
    hash: int
    offsets: list
    modality: Modality = Modality.IMAGE


def _cache(max_bytes: int, is_owner: bool = True, **kw) -> EncoderEmbeddingCache:
    mm_schedule.init_mm_embedding_cache(max_bytes)
    return EncoderEmbeddingCache(
        max_bytes=max_bytes, dim=DIM, dtype=torch.float32, is_owner=is_owner, **kw
    )


def _vit_out(*counts: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(counts), DIM, generator=g)


def test_cached_rows_come_back_byte_for_byte() -> None:
    cache = _cache(1 << 20)
    a, b = _Item(11, [[2, 5]]), _Item(12, [[8, 10], [12, 13]])  # 4 and 5 rows
    assert cache.lookup([a, b]) == {}
    out = _vit_out(4, 5)
    rows = dict(zip((id(a), id(b)), out.split([4, 5])))
    cache.store([a, b], rows)
    expected = out.clone()
    out.zero_()  # the ViT output's storage is reused: the cache holds its own copy
    a2, b2 = _Item(11, [[0, 3]]), _Item(12, [[1, 5]])  # same images in another prompt
    got = cache.lookup([a2, b2])
    assert set(got) == {id(a2), id(b2)}
    assert torch.equal(torch.cat([got[id(a2)], got[id(b2)]]), expected)
    assert got[id(a2)].dtype == torch.float32


def test_a_hash_with_rows_of_another_size_is_a_miss() -> None:
    cache = _cache(1 << 20)
    a = _Item(21, [[0, 3]])
    cache.store([a], {id(a): _vit_out(4)})
    other = _Item(21, [[0, 5]])  # 6 rows under the same hash
    assert cache.lookup([other]) == {}
    assert not mm_schedule.embedding_cache.has(21)  # dropped, not served


def test_least_recently_used_rows_are_evicted_within_the_budget() -> None:
    row_bytes = 4 * DIM * 4  # 4 rows of fp32
    cache = _cache(2 * row_bytes)
    a, b, c = (_Item(h, [[0, 3]]) for h in (31, 32, 33))
    for item in (a, b):
        cache.store([item], {id(item): _vit_out(4, seed=item.hash)})
    assert set(cache.lookup([a])) == {id(a)}  # a is now more recent than b
    cache.store([c], {id(c): _vit_out(4, seed=33)})
    assert set(cache.lookup([a, b, c])) == {id(a), id(c)}


def test_size_zero_turns_the_cache_off() -> None:
    cache = _cache(0)
    a = _Item(41, [[0, 3]])
    cache.store([a], {id(a): _vit_out(4)})
    assert not cache.enabled and cache.lookup([a]) == {}


def test_the_shared_cache_without_a_host_pool_is_refused() -> None:
    """``--enable-mm-global-cache`` with ``SGLANG_VLM_CACHE_SIZE_MB=0`` (SGLang's own default
    for Qwen3-VL on large Hopper GPUs) would store and fetch nothing: refused at start-up.
    """
    with pytest.raises(ValueError, match="SGLANG_VLM_CACHE_SIZE_MB"):
        EncoderEmbeddingCache(
            max_bytes=0,
            dim=DIM,
            dtype=torch.float32,
            is_owner=True,
            global_backend="mooncake",
        )


@contextlib.contextmanager
def _rank_cache(rank: int, port: int):
    """This rank's cache in a gloo TP group of two (rank 0 the owner)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        yield _cache(1 << 20, is_owner=rank == 0, tp_size=2, tp_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _tp_worker(rank: int, port: int, results) -> None:
    with _rank_cache(rank, port) as cache:
        a, b = _Item(51, [[0, 3]]), _Item(52, [[4, 7]])
        rows = _vit_out(4, seed=5)
        cache.store([a], {id(a): rows})  # only the owner keeps rows
        got = cache.lookup([a, b])
        results[rank] = (
            [key == id(a) for key in got],
            [None if r is None else r.clone() for r in got.values()],
            len(mm_schedule.embedding_cache),
            rows,
        )


@pytest.mark.timeout(300)
def test_tp_ranks_agree_on_hits_and_only_the_owner_holds_rows() -> None:
    owner, follower = run_two_ranks(_tp_worker)
    assert owner[0] == follower[0] == [True]  # the same hit set on both ranks
    assert torch.equal(owner[1][0], owner[3]) and follower[1] == [None]
    assert (owner[2], follower[2]) == (1, 0)


def _failing_owner_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    with _rank_cache(rank, port) as cache:
        a = _Item(61, [[0, 3]])
        cache.store([a], {id(a): _vit_out(4, seed=6)})

        def fail(*args, **kwargs):
            raise torch.cuda.OutOfMemoryError("injected: owner only")

        # The owner's lookup fails (a device copy out of memory, say): a miss on both ranks.
        if rank == 0:
            cache.local.get_single = fail
        missed = cache.lookup([a])
        # The owner's store fails: it returns; the next lookup is agreed on both ranks.
        b = _Item(62, [[0, 3]])
        if rank == 0:
            cache.local.set = fail
        cache.store([b], {id(b): _vit_out(4, seed=7)})
        after = cache.lookup([b])
        # A collective of each rank's count of completed steps: the ranks are still paired.
        steps = torch.tensor([2])
        dist.all_reduce(steps)
        results[rank] = (missed, after, int(steps))


@pytest.mark.timeout(300)
def test_a_failing_lookup_or_store_on_the_owner_is_a_miss_on_every_rank() -> None:
    """Only the owner reads and stores rows, between the TP ranks' agreements: an exception
    there (a device copy out of memory) must not leave the other rank waiting in the hit
    agreement while the owner goes on to another collective. It is a miss on both ranks.
    """
    owner, follower = run_two_ranks(_failing_owner_worker)
    assert owner == follower == ({}, {}, 4)
