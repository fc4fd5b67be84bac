"""The encode server's embedding cache: a repeated image or video skips the vision tower.

Rows (embedding and deepstack, ``[n, (1+K)*H]``: what ``get_image_feature`` /
``get_video_feature`` return) are kept per item by its content hash (``item.hash``), in
SGLang's own caches, as the colocated scheduler and upstream's ``--encoder-only`` server do:

* by default SGLang's multimodal embedding cache (``mm_schedule.embedding_cache``, the
  ``MultiModalStaticCache`` that ``build_kv_cache`` sizes from ``SGLANG_VLM_CACHE_SIZE_MB`` in
  every scheduler, the one colocated serving hits); 0 turns it off;
* with ``--enable-mm-global-cache``, upstream's ``EmbeddingCacheController`` over its
  Mooncake Store backend (``MooncakeEmbeddingStore``; ``MOONCAKE_MASTER`` etc. configure the
  store): a host pool of ``SGLANG_VLM_CACHE_SIZE_MB`` is the local tier, the Mooncake Store
  is shared by every encode server, so an image one encoder ran is a hit on the others.

With ``--tp N`` every rank must run the vision tower on the same items: the owner (attention
TP rank 0, the only rank that sends rows) looks up, and its hit mask is agreed over the TP cpu
group (MAX with zeros from the other ranks) before anyone runs the ViT; only the owner reads
and stores rows. Metrics are upstream's encoder ones (``EncoderMetricsCollector``):
``sglang:encoder_cache_{hit,total}_files_total`` (hits, lookups), ``..._tokens_total``,
``sglang:encoder_cache_evictions_total``, ``sglang:encoder_cache_size_mb`` and
``sglang:encoder_cache_entries`` (vision-tower calls: ``sglang:encode_language_vit_calls_total``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from sglang.srt.mem_cache.multimodal_cache import EmbeddingResult
from sglang.srt.multimodal.modality import Modality

if TYPE_CHECKING:
    from sglang.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)

# Bound of the wait for a Mooncake Store GET of hit rows (upstream's encoder server waits as
# long); an item whose rows did not arrive runs the vision tower instead.
PREFETCH_TIMEOUT_S = 60.0


def item_tokens(item) -> int:
    """Placeholder tokens (rows) of one image or video item."""
    return sum(e - s + 1 for s, e in item.offsets)


class EncoderEmbeddingCache:
    """Rows by item hash for the encode server's ``_encode_items`` (``lookup`` before the
    vision tower, ``store`` after it)."""

    def __init__(
        self,
        *,
        max_bytes: int,
        dim: int,
        dtype: torch.dtype,
        is_owner: bool,
        tp_size: int = 1,
        tp_group=None,
        global_backend: Optional[str] = None,
        metrics=None,
        device: str = "cpu",
    ) -> None:
        self.is_owner = is_owner
        self.tp_size, self.tp_group = tp_size, tp_group
        self.metrics = metrics if is_owner else None
        # where the vision tower's rows live (hits read from the host pool go there)
        self.device = device
        self.local = None
        self.controller = None
        self._prefetch_ids = itertools.count()
        if global_backend is not None:
            if max_bytes <= 0:
                # a pool of 0 bytes stores and fetches nothing: the shared cache would be off
                raise ValueError(
                    "--enable-mm-global-cache needs a host pool: set SGLANG_VLM_CACHE_SIZE_MB "
                    "> 0 on the encode server (SGLang sets it to 0 for Qwen3-VL on large "
                    "Hopper GPUs unless it is set)"
                )
            from sglang.srt.mem_cache.embedding_cache_controller import (
                EmbeddingCacheController,
            )
            from sglang.srt.mem_cache.embedding_store import EmbeddingStoreFactory

            # Every TP rank builds it (its constructor makes a TP group), only the owner uses it.
            self.controller = EmbeddingCacheController(
                embedding_store=EmbeddingStoreFactory.create_backend(global_backend),
                max_pool_size_gb=max_bytes / 1024**3,
                hidden_dims={Modality.IMAGE: dim, Modality.VIDEO: dim},
                all_rank_get=False,
                dtype=dtype,
            )
        elif max_bytes > 0:
            from sglang.srt.managers import mm_schedule

            self.local = mm_schedule.embedding_cache

    @property
    def enabled(self) -> bool:
        return self.local is not None or self.controller is not None

    @classmethod
    def for_scheduler(
        cls, scheduler: "Scheduler", is_owner: bool
    ) -> "EncoderEmbeddingCache":
        """The cache of an encode scheduler (disabled when ``SGLANG_VLM_CACHE_SIZE_MB`` is 0
        and the global cache is off)."""
        from sglang.srt.environ import envs
        from sglang.srt.runtime_context import get_mm, get_observability, get_serving

        mm = get_mm()
        max_bytes = envs.SGLANG_VLM_CACHE_SIZE_MB.get() * 1024 * 1024
        global_backend = (
            mm.mm_global_cache_backend if mm.enable_mm_global_cache else None
        )
        metrics = None
        if is_owner and get_observability().enable_metrics:
            from sglang.srt.observability.metrics_collector import (
                EncoderMetricsCollector,
            )

            metrics = EncoderMetricsCollector(
                {"model_name": get_serving().served_model_name}
            )
        hf_config = scheduler.model_config.hf_config
        model = scheduler.tp_worker.model_runner.model
        dim = hf_config.text_config.hidden_size * (1 + model.num_deepstack_embeddings)
        cache = cls(
            max_bytes=max_bytes,
            dim=dim,
            dtype=scheduler.model_config.dtype,
            is_owner=is_owner,
            tp_size=scheduler.disagg_encode_tp_size,
            tp_group=scheduler.attn_tp_cpu_group,
            global_backend=global_backend,
            metrics=metrics,
            device=scheduler.tp_worker.model_runner.device,
        )
        logger.info(
            "encode server: embedding cache %s",
            (
                "off (SGLANG_VLM_CACHE_SIZE_MB=0)"
                if not cache.enabled
                else f"of {max_bytes // 2**20} MiB"
                + (f", shared through {global_backend}" if global_backend else "")
            ),
        )
        return cache

    # Lookup ---------------------------------------------------------------------------------
    def lookup(self, items: Sequence) -> Dict[int, Optional[torch.Tensor]]:
        """Cached items by ``id(item)``: their rows on the owner, None on the other TP ranks
        (which only skip the vision tower for them). The same set on every TP rank."""
        if not self.enabled or not items:
            return {}
        found: Dict[int, torch.Tensor] = {}
        if self.is_owner:
            # Never raises: the other TP ranks wait in the agreement below (a failed lookup
            # is a miss; the vision tower runs).
            try:
                if self.controller is not None:
                    found = self._lookup_global(items)
                else:
                    found = self._lookup_local(items)
            except Exception:
                logger.exception(
                    "embedding cache: lookup failed; running the vision tower"
                )
        hit = [id(item) in found for item in items]
        if self.tp_size > 1:
            mask = torch.tensor(hit, dtype=torch.int32)
            dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=self.tp_group)
            hit = [bool(m) for m in mask.tolist()]
        self._record_lookup(items, hit)
        return {id(item): found.get(id(item)) for item, h in zip(items, hit) if h}

    def _lookup_local(self, items) -> Dict[int, torch.Tensor]:
        from sglang.srt.managers.mm_schedule import (
            _discard_mismatched_cached_embedding,
            _embedding_token_count,
        )

        found = {}
        for item in items:
            cached = self.local.get_single(item.hash)
            if cached is None:
                continue
            n = _embedding_token_count(cached.embedding)
            if n == item_tokens(item):
                found[id(item)] = cached.embedding
            else:  # a hash collision of items of different sizes: recompute
                _discard_mismatched_cached_embedding(item.hash, item_tokens(item), n)
        return found

    def _lookup_global(self, items) -> Dict[int, torch.Tensor]:
        ctl = self.controller
        keys = [str(item.hash) for item in items]
        try:
            exists = asyncio.run(ctl.batch_is_exist(keys))
        except Exception:
            logger.exception("embedding cache: lookup failed; running the vision tower")
            return {}
        fetch: Dict[Modality, List[int]] = {}
        for i, (item, key) in enumerate(zip(items, keys)):
            if exists[i] and not ctl.has_local_embedding(key):
                fetch.setdefault(item.modality, []).append(i)
        for modality, idx in fetch.items():
            self._prefetch(
                [keys[i] for i in idx], [item_tokens(items[i]) for i in idx], modality
            )
        hits = [i for i, key in enumerate(keys) if ctl.has_local_embedding(key)]
        views = ctl.get_pool_views([keys[i] for i in hits])
        try:
            found = {}
            for i, slices in zip(hits, views):
                if slices is not None and sum(
                    s.shape[0] for s in slices
                ) == item_tokens(items[i]):
                    # owned rows: the pool pages may be reused once the views are released
                    found[id(items[i])] = torch.cat(slices).to(self.device)
            return found
        finally:
            ctl.release_pool_views([keys[i] for i in hits])

    def _prefetch(self, keys: List[str], tokens: List[int], modality) -> None:
        """Mooncake Store GET of rows another encoder stored, into the host pool; waits (an
        item whose GET failed or timed out is a miss)."""
        ctl = self.controller
        req_id = f"encode-cache-{next(self._prefetch_ids)}"
        before = len(ctl.entries)
        new = [key for key in keys if key not in ctl.entries]
        try:
            ctl.prefetch(req_id, keys, tokens, modality)
        except Exception:
            logger.exception(
                "embedding cache: prefetch failed; running the vision tower"
            )
            return
        created = sum(key in ctl.entries for key in new)
        self._record_evictions(modality, before + created - len(ctl.entries))
        deadline = time.monotonic() + PREFETCH_TIMEOUT_S
        while not ctl.check_prefetch_progress(req_id):
            if time.monotonic() > deadline:
                logger.error("embedding cache: prefetch %s timed out", req_id)
                return
            time.sleep(0.001)

    # Store ----------------------------------------------------------------------------------
    def store(self, items: Sequence, rows: Dict[int, torch.Tensor]) -> None:
        """Keep the rows the vision tower just produced (owner only). Never raises: the
        other TP ranks do not store, and go on to the next collective (rows not kept are
        a later miss)."""
        if not self.enabled or not self.is_owner or not items:
            return
        try:
            if self.controller is not None:
                self._store_global(items, rows)
            else:
                self._store_local(items, rows)
            self._record_state()
        except Exception:
            logger.exception("embedding cache: store failed (rows not cached)")

    def _store_local(self, items, rows) -> None:
        for item in items:
            before = len(self.local)
            present = self.local.has(item.hash)
            added = self.local.set(item.hash, EmbeddingResult(embedding=rows[id(item)]))
            added = int(added and not present)
            self._record_evictions(item.modality, before + added - len(self.local))

    def _store_global(self, items, rows) -> None:
        ctl = self.controller
        by_modality: Dict[Modality, List] = {}
        for item in items:
            by_modality.setdefault(item.modality, []).append(item)
        for modality, group in by_modality.items():
            keys = [str(item.hash) for item in group]
            try:
                before = len(ctl.entries)
                handles = ctl.store_to_pool_async(
                    keys, [rows[id(item)] for item in group], modality
                )
                self._record_evictions(
                    modality, before + len(handles) - len(ctl.entries)
                )
                ctl.wait_store_to_pool(handles)
                # the Mooncake Store PUT, in the background
                ctl.insert_batch(keys, modality)
            except Exception:
                logger.exception("embedding cache: store failed (rows not cached)")

    # Metrics --------------------------------------------------------------------------------
    def _record_lookup(self, items, hit) -> None:
        if self.metrics is None:
            return
        for modality in {item.modality for item in items}:
            name = modality.name.lower()
            mine = [
                (item, h) for item, h in zip(items, hit) if item.modality == modality
            ]
            self.metrics.record_cache_files(
                sum(h for _, h in mine), len(mine), modality=name
            )
            self.metrics.record_cache_tokens(
                sum(item_tokens(i) for i, h in mine if h),
                sum(item_tokens(i) for i, _ in mine),
                modality=name,
            )

    def _record_evictions(self, modality, count: int) -> None:
        if self.metrics is not None and count > 0:
            self.metrics.inc_cache_evictions(
                modality=modality.name.lower(), count=count
            )

    def _record_state(self) -> None:
        if self.metrics is None:
            return
        if self.controller is not None:
            stats = self.controller.get_stats()
            self.metrics.set_cache_state(
                int(stats["allocated_mb"] * 1024 * 1024), stats["num_cached"]
            )
        else:
            self.metrics.set_cache_state(self.local.current_size, len(self.local))
