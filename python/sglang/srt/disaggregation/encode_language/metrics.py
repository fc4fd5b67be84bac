"""Prometheus metrics of encode/language disaggregation, on the server's ``/metrics``.

Exported only with ``--enable-metrics`` (SGLang's multiprocess Prometheus directory collects
them from the scheduler process). Blocks are published as gauges, so "all blocks free" is
observable from outside the process::

    sglang:encode_language_blocks{role="encode|language",state="free|in_use|total"}
    sglang:encode_language_requests_total{role,outcome="success|all_held|failed|local"}
    sglang:encode_language_bytes_total{role}          encode: bytes sent
    sglang:encode_language_rounds_total{role}         encode: rounds of successful requests
    sglang:encode_language_transfer_seconds{role}     last request's transfer latency
    sglang:encode_language_waiting_requests{role}     requests whose transfer is not over
    sglang:encode_language_held_total{role}           requests the encoder held back before
                                                      the vision tower (in-flight payload bound)
    sglang:encode_language_exposed_blocks{role}       language: blocks a late write may still
                                                      reach (rounds on them are checksummed)
    sglang:encode_language_items_total{role,outcome="sent|held"}  images/videos whose rows were
                                                      sent, or left out because the language
                                                      side's prefix cache holds them
    sglang:encode_language_row_bytes_total{role}      encode: embedding + deepstack row
                                                      bytes sent
    sglang:encode_language_vit_calls_total{role}      encode: vision-tower calls
    sglang:encode_language_vit_call_tokens{role}      encode: histogram of the tokens of
                                                      each vision-tower call
    sglang:encode_language_weight_bytes{role,state="loaded|not_loaded"}  encode: weight bytes
                                                      loaded (the vision tower) and the
                                                      checkpoint's bytes it did not load
"""

from __future__ import annotations

from typing import Optional


class EncodeLanguageMetrics:
    def __init__(self, role: str, enabled: bool) -> None:
        self.role = role
        self.enabled = enabled
        self._last_blocks: Optional[tuple] = None
        self._last_waiting: Optional[int] = None
        if not enabled:
            return
        from prometheus_client import Counter, Gauge, Histogram

        self._blocks = Gauge(
            name="sglang:encode_language_blocks",
            documentation="Multimodal transfer buffer blocks by state: free, quarantined (a dead or timed-out peer may still write them), in_use, total.",
            labelnames=("role", "state"),
            multiprocess_mode="mostrecent",
        )
        self._requests = Counter(
            name="sglang:encode_language_requests_total",
            documentation="Requests by outcome: success (transferred; language: also those whose every item its prefix cache held), all_held (encode: the language side held every item, no round), failed, local (nothing to transfer).",
            labelnames=("role", "outcome"),
        )
        self._bytes = Counter(
            name="sglang:encode_language_bytes_total",
            documentation="Bytes the encode server sent over the transfer engine.",
            labelnames=("role",),
        )
        self._rounds = Counter(
            name="sglang:encode_language_rounds_total",
            documentation="Transfer rounds of successful requests (the first round plus resume rounds).",
            labelnames=("role",),
        )
        self._latency = Gauge(
            name="sglang:encode_language_transfer_seconds",
            documentation="Transfer latency of the last finished request.",
            labelnames=("role",),
            multiprocess_mode="mostrecent",
        )
        self._waiting = Gauge(
            name="sglang:encode_language_waiting_requests",
            documentation="Requests whose multimodal transfer has not ended yet.",
            labelnames=("role",),
            multiprocess_mode="mostrecent",
        )
        self._exposed = Gauge(
            name="sglang:encode_language_exposed_blocks",
            documentation="Language side: blocks freed while a dead or failed encoder's write may still land in them; rounds on them are checksummed until the exposure ends (a bound from Mooncake's own transfer timeout).",
            labelnames=("role",),
            multiprocess_mode="mostrecent",
        )
        self._held = Counter(
            name="sglang:encode_language_held_total",
            documentation="Requests the encoder held back before the vision tower until in-flight payload bytes dropped below max_inflight_payload_bytes (once per request).",
            labelnames=("role",),
        )

        self._items = Counter(
            name="sglang:encode_language_items_total",
            documentation="Images and videos by what happened to their rows: sent, or held (the language side's prefix cache holds the item: no vision tower, no rows).",
            labelnames=("role", "outcome"),
        )
        self._row_bytes = Counter(
            name="sglang:encode_language_row_bytes_total",
            documentation="Embedding and deepstack row bytes the encode server sent.",
            labelnames=("role",),
        )
        self._vit_calls = Counter(
            name="sglang:encode_language_vit_calls_total",
            documentation="Vision-tower calls of the encode server.",
            labelnames=("role",),
        )
        self._vit_call_tokens = Histogram(
            name="sglang:encode_language_vit_call_tokens",
            documentation="Multimodal tokens per vision-tower call of the encode server (bounded by --max-prefill-tokens unless one request alone is larger).",
            labelnames=("role",),
            buckets=[2**i for i in range(4, 17)],
        )
        self._weight_bytes = Gauge(
            name="sglang:encode_language_weight_bytes",
            documentation="Encode server: weight bytes loaded (the vision tower) and checkpoint weight bytes not loaded versus the full model (the memory an encode-only server saves).",
            labelnames=("role", "state"),
            multiprocess_mode="mostrecent",
        )

    def weights(self, loaded: int, not_loaded: Optional[int]) -> None:
        """The encoder's weights: ``not_loaded`` None when the checkpoint cannot be read."""
        if not self.enabled:
            return
        self._weight_bytes.labels(self.role, "loaded").set(loaded)
        if not_loaded is not None:
            self._weight_bytes.labels(self.role, "not_loaded").set(not_loaded)

    def items_done(self, sent: int, held: int, row_bytes: int) -> None:
        """One request's items: ``sent`` with their rows (``row_bytes``), ``held`` left out."""
        if not self.enabled:
            return
        self._items.labels(self.role, "sent").inc(sent)
        self._items.labels(self.role, "held").inc(held)
        self._row_bytes.labels(self.role).inc(row_bytes)

    def vit_call(self, tokens: int) -> None:
        if self.enabled:
            self._vit_calls.labels(self.role).inc()
            self._vit_call_tokens.labels(self.role).observe(tokens)

    def request_held(self) -> None:
        if self.enabled:
            self._held.labels(self.role).inc()

    def observe_waiting(self, num_requests: int) -> None:
        if not self.enabled or num_requests == self._last_waiting:
            return
        self._last_waiting = num_requests
        self._waiting.labels(self.role).set(num_requests)

    def observe_blocks(self, allocator, exposed: int = 0) -> None:
        """``exposed``: of those blocks, how many a late write may reach (language side)."""
        if not self.enabled:
            return
        # free + quarantined (a dead or timed-out peer may still write them) + in use = total
        acc = allocator.accounting()
        snapshot = (acc["free"], acc["quarantined"], acc["used"], acc["total"], exposed)
        if snapshot == self._last_blocks:
            return
        self._last_blocks = snapshot
        self._blocks.labels(self.role, "free").set(acc["free"])
        self._blocks.labels(self.role, "quarantined").set(acc["quarantined"])
        self._blocks.labels(self.role, "in_use").set(acc["used"])
        self._blocks.labels(self.role, "total").set(acc["total"])
        self._exposed.labels(self.role).set(exposed)

    def request_done(
        self,
        outcome: str,
        nbytes: int = 0,
        latency_s: Optional[float] = None,
        rounds: int = 0,
    ) -> None:
        if not self.enabled:
            return
        self._requests.labels(self.role, outcome).inc()
        if rounds:
            self._rounds.labels(self.role).inc(rounds)
        if nbytes:
            self._bytes.labels(self.role).inc(nbytes)
        if latency_s is not None:
            self._latency.labels(self.role).set(latency_s)
