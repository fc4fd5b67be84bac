"""What the language side's prefix cache already holds of an announced request, kept held.

At the encoder's announcement (T ids, item table) the language scheduler matches the ids its
radix cache is keyed by (placeholders replaced by the items' pad values, as the request itself
will be keyed: ``MultimodalProcessorOutput.build_padded_input_ids``) against the cache, with the
request's own key (extra key, cache salt) and cap (``Req._compute_max_prefix_len``: one token
left to compute, and no further than ``logprob_start_len``). The items lying wholly inside the
matched prefix are *held*: the encoder runs no vision tower for them and sends none of their
rows; an item that straddles the prefix's end is sent whole.

Bounded: a hold is taken only while at most ``HELD_SHARE_OF_POOL`` of the KV pool is locked
(its rows are sent otherwise), so held prefixes cannot fill the pool and stall admission.

Race-free against eviction: the matched node is locked (``tree_cache.lock``) from the match
until the request is over, not only until its prefill: a request retracted after its prefill
re-prefills from the cache, and the held items' rows exist nowhere else. The lock ends when the
request fails or is aborted before it reaches the scheduler (``release``), when the scheduler
releases it as aborted (``released``), when the scheduler's ``Req`` has finished (``sweep``),
or when a request handed to the scheduler was never queued there (refused on arrival; a
request whose grammar still compiles is queued later).

Runs on the scheduler thread only (the radix cache is not thread-safe).
"""

from __future__ import annotations

import dataclasses
import logging
from array import array
from typing import Any, Container, Dict, List, Optional, Tuple

from sglang.srt.disaggregation.encode_language.item_table import ItemEntry
from sglang.srt.environ import envs
from sglang.srt.managers.schedule_batch import (
    MultimodalDataItem,
    MultimodalProcessorOutput,
)
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

logger = logging.getLogger(__name__)

# Most of the KV pool that may be locked (requests' own prefixes and holds) when a hold is
# taken. Upstream never locks a waiting request's prefix; holds do, and locked tokens cannot
# be evicted: were they to fill the pool, no waiting request could be admitted and, with
# nothing running, none would ever end. Past this share a request holds nothing.
HELD_SHARE_OF_POOL = 0.5


def item_without_rows(entry: ItemEntry) -> MultimodalDataItem:
    """The ``MultimodalDataItem`` of an item table entry, keyed (pad values) by the encoder's
    content hash or identity, as the received request's item will be."""
    item = MultimodalDataItem(
        modality=entry.sglang_modality,
        offsets=[tuple(span) for span in entry.offsets],
    )
    if entry.identity is not None:
        item.set_identity(entry.identity)
    else:
        item.set_hash(entry.hash)
    return item


def padded_ids(input_ids: List[int], entries: List[ItemEntry]) -> List[int]:
    """The ids the radix cache keys the request by (placeholders -> the items' pad values)."""
    return MultimodalProcessorOutput.build_padded_input_ids(
        list(input_ids), [item_without_rows(e) for e in entries]
    )


def prefix_cap(recv_req, num_ids: int) -> int:
    """The longest prefix the request's own prefill may reuse (``_compute_max_prefix_len``
    with the scheduler's ``logprob_start_len`` rule): one token is always computed, and input
    logprobs from ``logprob_start_len`` on are computed too."""
    cap = num_ids - 1
    start = getattr(recv_req, "logprob_start_len", -1)
    if getattr(recv_req, "return_logprob", False) and start is not None and start >= 0:
        cap = min(cap, start)
    return max(cap, 0)


@dataclasses.dataclass
class _Hold:
    lock: Any  # TreeLock
    req: Any = None  # the scheduler's Req once queued
    # a sweep has seen it (the scheduler queues a request in the iteration it is handed)
    handed: bool = False


class PrefixHolds:
    def __init__(self, tree_cache) -> None:
        self.tree_cache = tree_cache
        # rid -> the hold of a request the scheduler has
        self._handed: Dict[str, _Hold] = {}

    def match(
        self, recv_req, input_ids: List[int], items: list
    ) -> Tuple[List[int], Any]:
        """(indices of the items the cache holds, the lock keeping them; None when none)."""
        tree = self.tree_cache
        if (
            tree is None
            or not tree.supports_prefix_sharing()
            or envs.SGLANG_RADIX_FORCE_MISS.get()
            or getattr(recv_req, "session_params", None) is not None
            # a LoRA request is keyed in a namespace of its own (``Req`` appends the adapter
            # to its extra key): never matched here, so a base-model prefix is never held
            or getattr(recv_req, "lora_id", None) is not None
        ):
            return [], None
        entries = [ItemEntry.from_wire(raw) for raw in items]
        ids = padded_ids(input_ids, entries)
        if ids is None:
            return [], None
        key = RadixKey(
            token_ids=array("q", ids),
            extra_key=getattr(recv_req, "extra_key", None),
            limit=prefix_cap(recv_req, len(ids)),
            cache_salt=getattr(recv_req, "cache_salt", None),
        )
        result = tree.match_prefix(MatchPrefixParams(key=key))
        matched = result.device_prefix_len
        held = [
            i
            for i, e in enumerate(entries)
            if max(end for _, end in e.offsets) < matched
        ]
        if not held:
            return [], None
        lock = tree.lock(result.last_device_node)
        if (
            tree.protected_size()
            > HELD_SHARE_OF_POOL * tree.token_to_kv_pool_allocator.size
        ):
            # the rows are sent instead: locked prefixes never fill the pool
            self.release(lock)
            return [], None
        return held, lock

    def release(self, lock) -> None:
        """Unlock. (The tree cannot have been reset meanwhile: ``/flush_cache`` needs an idle
        server, and a server holding a lock is not idle: ``LanguageMMReceiver.idle``.)
        """
        if lock is not None:
            self.tree_cache.unlock(lock)

    # The request in the scheduler ------------------------------------------------------------
    def hand_over(self, rid: str, lock) -> None:
        """The request goes to the scheduler; its lock lasts until that request is over."""
        if lock is not None:
            self.release(self._handed.pop(rid, _Hold(None)).lock)
            self._handed[rid] = _Hold(lock)

    def queued(self, req) -> None:
        hold = self._handed.get(req.rid)
        if hold is not None:
            hold.req = req

    def released(self, req) -> None:
        """The scheduler dropped ``req`` unfinished (aborted in its queue, refused there)."""
        hold = self._handed.get(req.rid)
        if hold is not None and hold.req in (None, req):
            del self._handed[req.rid]
            self.release(hold.lock)

    def sweep(self, compiling: Container[str] = ()) -> None:
        """Release the locks of requests that finished, and of requests handed over but never
        queued (the scheduler refused them on arrival: it queues in the same iteration, except
        a request whose grammar is ``compiling``, queued when it is ready).
        """
        for rid, hold in list(self._handed.items()):
            if (hold.req is not None and hold.req.finished()) or (
                hold.req is None and hold.handed and rid not in compiling
            ):
                del self._handed[rid]
                self.release(hold.lock)
            hold.handed = True

    @property
    def num_held(self) -> int:
        """Requests the scheduler has whose held prefix is locked."""
        return len(self._handed)
