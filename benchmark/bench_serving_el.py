"""Side-by-side serving benchmark on the CPU test bed: colocated vs encode/language vs upstream.

One command, one machine, one tiny Qwen3-VL-MoE checkpoint (``epd_testbed.tiny_ckpt``), one
request stream per cell, five deployments, one deployment alive at a time:

  colocated        (a)  one fork server (``sglang.launch_server``)
  colocated-x2     (a2) two colocated fork servers behind ``sglang-router`` in regular mode,
                        round robin: the same two server processes (two cores here) as (b), the
                        alternative a user would pick
  el-router        (b)  ``sglang-router`` (PD mode) + ``--disaggregation-mode encode`` +
                        ``--disaggregation-mode language`` (Mooncake over TCP loopback)
  el-global-cache  (b2) (b) with two encode servers that share rows through upstream's
                        ``--enable-mm-global-cache`` (a real ``mooncake_master``); only the
                        repeated-image streams, once per prefill policy of the router
                        (``B2_POLICIES``): does routing an image to the encoder that holds it
                        beat the shared store?
  upstream-epd     (c)  upstream 0.5.23's own encoder disaggregation: ``--encoder-only`` +
                        ``--language-only --encoder-urls`` (its default ``zmq_to_scheduler``)

Every cell is driven by SGLang's own client, ``python -m sglang.benchmark.serving``, run in
this process through its ``cli_main`` with exactly the argument list recorded next to the
result. Streams the client generates (``--backend sglang``, streamed ``/generate``): one
224x224 image per request, text only (``random-ids``), three 224x224 images per request; rates
1, 4 and inf (saturation) requests/s. Two streams that repeat images, written here as JSONL
files of the client's ``openai`` dataset and sent as OpenAI chat (``--backend
sglang-oai-chat``): ``zipf``, a pool of N distinct images drawn Zipf-like over 4N requests,
each with its own question before the image (so only an embedding cache, not a prefix cache,
can save the vision tower), at saturation; ``multiturn``, conversations of 3-5 turns over one
image, each turn's prompt the last one plus its answer plus a new question (the client's
multi-turn mode), at 2 conversations/s.

Cold, the same way for every deployment: each cell has its own fixed seed (the same seed for
the same cell in every deployment), so its images and prompts were never seen by the servers;
before each cell every server's prefix cache is flushed (``/flush_cache``) and the client runs
no warm-up request (its warm-up would re-send the cell's first request). Each deployment gets
unreported warm-up requests (seed 1) after start-up. The repeated-image run re-sends the
single-image saturation cell with the same seed on the same servers and is reported separately.

Measured per cell, as deltas of the servers' ``/metrics`` over the cell: images and video
frames through the vision tower (the test bed's ``sglang:testbed_vision_attention_segments``
divided by the tower's depth, on every server that runs it), the embedding-cache hit rate
(upstream's ``sglang:encoder_cache_{hit,total}_files``: ours and upstream's encoders; a
colocated server exports none), encoder -> language bytes, row bytes and items sent or held
back by the prefix-aware skip (ours); the prefix-cache hit rate comes from the client's
``--cache-report``.

Results are written after every cell to ``<out-dir>/serving-cpu[-quick].json``; a second run
skips the cells already there (``--fresh`` starts the selected configurations over), so an
interrupted run resumes per deployment and cell. The table (``serving-cpu[-quick].md``), the
plot (``.png``) and, for a full run into the default folder, the generated block of
``docs/benchmarks.md`` are rewritten from that JSON (``--render-only`` does only that, no
servers).

``--mixed`` measures something else on (a), (a2), (b) and (c) (issue 16, item 6): long text
streams decoding, alone and while a burst of image requests arrives from a second, concurrent
client run; it reports the text streams' TPOT (whole stream and in the burst window) and the
images' TTFT into ``serving-cpu-mixed.{json,md,png}`` and its own block of ``docs/benchmarks.md``.

    .fork/venv/bin/python benchmark/bench_serving_el.py            # full run, ~20-30 min
    .fork/venv/bin/python benchmark/bench_serving_el.py --quick    # smoke run, few requests
    .fork/venv/bin/python benchmark/bench_serving_el.py --configs el-router --fresh
    .fork/venv/bin/python benchmark/bench_serving_el.py --mixed    # text under an image burst
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
OUT_DIR = REPO / "docs" / "benchmarks"
DOC_BEGIN = "<!-- serving-cpu:begin (generated by benchmark/bench_serving_el.py) -->"
DOC_END = "<!-- serving-cpu:end -->"

CONFIGS = {
    "colocated": "(a) colocated fork server",
    "colocated-x2": "(a2) two colocated fork servers behind sglang-router (regular, round robin)",
    "el-router": "(b) sglang-router + encode + language",
    "el-router-2l": "(b3) sglang-router + one encode + two language servers (round robin)",
    "el-global-cache": "(b2) sglang-router + two encoders sharing rows (Mooncake Store) + language",
    "upstream-epd": "(c) upstream --encoder-only / --language-only",
}
LABEL = {
    "colocated": "a",
    "colocated-x2": "a2",
    "el-router": "b",
    "el-router-2l": "b3",
    "el-global-cache": "b2",
    "upstream-epd": "c",
}
# (b2) runs only the repeated-image streams, once per prefill policy of the router: round
# robin (the shared Mooncake Store gives the other encoder the rows), cache_aware (the
# router's prefix tree over the request text) and manual (sticky by a routing key, sent as
# X-SMG-Routing-Key: here the image's identity).
B2_POLICIES = ("round_robin", "cache_aware", "manual")
# (b2) local pool per encoder (SGLANG_VLM_CACHE_SIZE_MB): upstream's default, as (b) has
GLOBAL_CACHE_MB = 100

IMAGE_ARGS = ("--dataset-name", "image", "--image-resolution", "224x224")
IMAGE_ARGS += ("--image-format", "png", "--image-content", "random")
STREAMS = {
    "image1": (*IMAGE_ARGS, "--image-count", "1", "--random-input-len", "32"),
    "text": ("--dataset-name", "random-ids", "--random-input-len", "80"),
    "image3": (*IMAGE_ARGS, "--image-count", "3", "--random-input-len", "32"),
}
# Streams that repeat images: JSONL files (write_chat_dataset) the client's ``openai`` dataset
# reads, sent as OpenAI chat at one rate each.
CHAT_STREAMS = {"zipf": "inf", "multiturn": "2"}
# the rates a chat stream may also run at (bench_targets_el.py), each with images of its own
OTHER_CHAT_RATES = ("0.5", "1", "4", "0.25")
ALL_STREAMS = (*STREAMS, *CHAT_STREAMS)
STREAM_TITLE = {
    "image1": "one 224x224 image + 32 text tokens",
    "text": "text only, 80 tokens",
    "image3": "three 224x224 images + 32 text tokens",
    "zipf": "N distinct 224x224 images drawn Zipf-like over 4N requests, a different question "
    "before the image in each (OpenAI chat)",
    "multiturn": "conversations of 3-5 turns over one 224x224 image, each turn = the last "
    "prompt + its answer + a new question (OpenAI chat, the client's multi-turn mode)",
}
OUTPUT_LEN = 16
RATES = ("1", "4", "inf")
PROMPTS = {"1": 12, "4": 24, "inf": 32}
QUICK_PROMPTS = {"1": 3, "4": 4, "inf": 6}
CHAT_PROMPTS = {"zipf": 64, "multiturn": 12}  # requests; conversations
QUICK_CHAT_PROMPTS = {"zipf": 12, "multiturn": 3}
ZIPF_EXPONENT = 1.1  # image k of the pool drawn with probability proportional to 1/k^s
TURNS = (3, 5)  # turns per conversation, drawn uniformly
QUESTION_WORDS = 10
WORDS = (
    "what which where color shape object left right top bottom center small large bright "
    "dark pattern texture noise pixel region corner edge line red green blue count many "
    "few describe compare explain detail image picture scene part area visible"
).split()
WARMUP_SEED = 1
REPEATED = ("image1", "inf")  # the cell sent twice for the repeated-image run
CELL_TIMEOUT_S = 300

# Language-side transfer buffers of (b): 256 blocks x 32 tokens on each side, 128 tokens
# reserved per request and per resume round (a one-image prompt fits one round, three images
# take a resume round). Later flags win over the test bed's smaller EL_BUFFER_ARGS.
EL_BENCH_ARGS = (
    "--disaggregation-mm-num-blocks",
    "256",
    "--disaggregation-mm-reserve-tokens",
    "128",
)
# No per-deployment ViT flags: the CPU platform plugin's vision attention is per image
# (cu_seqlens-aware, as GPU backends), so every deployment runs its servers' defaults.
EL_ENCODE_ARGS = ()
# Extra flags of our language servers, (b) and (b2) (``--el-language-args``; default none:
# upstream's scheduling defaults, as every other deployment), e.g. ``--enable-mixed-chunk``.
EL_LANGUAGE_ARGS = ()


@dataclass(frozen=True)
class Cell:
    """One client run: a stream at a rate, ``n`` requests (conversations for ``multiturn``);
    ``repeat``: the same seed again without a flush; ``policy``: (b2)'s prefill policy;
    ``rep``: the cell's repetition (``bench_targets_el.py``'s rounds), new images and prompts.
    """

    stream: str
    rate: str
    n: int
    repeat: bool = False
    policy: str | None = None
    rep: int = 0

    @property
    def key(self) -> str:
        key = cell_key(self.stream, self.rate, self.repeat, self.policy)
        return key + (f"#r{self.rep}" if self.rep else "")

    @property
    def seed(self) -> int:
        """Fixed per cell, equal across deployments, distinct across cells; (b2)'s policies
        after the first get images of their own (a shared store outlives a flush), and so
        does each repetition, and a chat stream at a rate other than the full run's."""
        if self.stream in CHAT_STREAMS and self.rate != CHAT_STREAMS[self.stream]:
            if self.rate not in OTHER_CHAT_RATES:
                raise ValueError(f"{self.stream} at {self.rate}/s: not a planned rate")
            rate = 5 + OTHER_CHAT_RATES.index(self.rate)
        else:
            rate = RATES.index(self.rate) if self.rate in RATES else 0
        policy = B2_POLICIES.index(self.policy) if self.policy else 0
        stream = 10 * ALL_STREAMS.index(self.stream)
        return 1000 + stream + rate + 100 * policy + 10_000 * self.rep


def cell_key(
    stream: str, rate: str, repeat: bool = False, policy: str | None = None
) -> str:
    return (
        f"{stream}@{rate}"
        + ("#repeat" if repeat else "")
        + (f"~{policy}" if policy else "")
    )


def planned_cells(config: str, quick: bool) -> list[Cell]:
    prompts = QUICK_PROMPTS if quick else PROMPTS
    chat = QUICK_CHAT_PROMPTS if quick else CHAT_PROMPTS
    if config == "el-global-cache":  # the repeated-image streams only, per policy
        first, *others = B2_POLICIES
        cells = [Cell(s, r, chat[s], policy=first) for s, r in CHAT_STREAMS.items()]
        return cells + [
            Cell("zipf", CHAT_STREAMS["zipf"], chat["zipf"], policy=p) for p in others
        ]
    cells = []
    for stream in STREAMS:
        for rate in RATES:
            cells.append(Cell(stream, rate, prompts[rate]))
            if (
                stream,
                rate,
            ) == REPEATED:  # right after its cold twin: no flush in between
                cells.append(Cell(stream, rate, prompts[rate], repeat=True))
    return cells + [Cell(s, r, chat[s]) for s, r in CHAT_STREAMS.items()]


# ---- request files of the repeated-image streams -------------------------------------------


def write_chat_dataset(
    stream: str, seed: int, n: int, folder: Path
) -> tuple[Path, dict]:
    """The JSONL file of ``stream`` (``zipf``: ``n`` requests; ``multiturn``: ``n``
    conversations) for the client's ``openai`` dataset, its images as PNG files next to it
    (``file://`` URLs: every server runs on this host), and what the cell needs to know of it.
    Deterministic in ``seed``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def image(name: str) -> dict:
        path = folder / f"{stream}-{seed}-{name}.png"
        pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        return {"type": "image_url", "image_url": {"url": f"file://{path}"}}

    def question() -> str:
        return " ".join(rng.choice(WORDS, QUESTION_WORDS)).capitalize() + "?"

    rows = []
    if stream == "zipf":
        pool = max(1, n // 4)
        weights = 1.0 / np.arange(1, pool + 1) ** ZIPF_EXPONENT
        draws = rng.choice(pool, n, p=weights / weights.sum()).tolist()
        images = [image(str(k)) for k in range(pool)]
        for k in draws:
            content = [{"type": "text", "text": question()}, images[k]]
            rows.append(
                {
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": OUTPUT_LEN,
                    "routing_key": f"image-{seed}-{k}",  # see routing_keys()
                }
            )
        info = {"pool": pool, "distinct": len(set(draws)), "top_image": draws.count(0)}
    elif stream == "multiturn":
        turns = rng.integers(TURNS[0], TURNS[1] + 1, n).tolist()
        for c, count in enumerate(turns):
            first = [image(str(c)), {"type": "text", "text": question()}]
            rounds = [[{"role": "user", "content": first}]]
            rounds += [
                [{"role": "user", "content": question()}] for _ in range(count - 1)
            ]
            rows.append({"messages": rounds, "max_tokens": OUTPUT_LEN})
        info = {"turns": turns}
    else:
        raise ValueError(f"not a chat stream: {stream!r}")
    path = folder / f"{stream}-{seed}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, info


# ---- deployments ----------------------------------------------------------------------------


@dataclass
class Deployment:
    """The servers of one configuration: ``entry`` takes the client's requests; ``caches``
    are the SGLang servers whose caches are flushed before each cell; ``vit`` the servers that
    run the vision tower, ``lm`` those that run the language model (their prefix cache),
    ``encoders`` our encode servers (their transfer counters)."""

    name: str
    entry: object
    servers: list
    caches: list
    startup: dict
    vit: list = field(default_factory=list)
    lm: list = field(default_factory=list)
    encoders: list = field(default_factory=list)
    policy: str | None = None  # (b2): the router's prefill policy now
    store: object | None = None  # (b2): the mooncake_master (its metrics port)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def alive(self) -> bool:
        return all(s.alive() for s in self.servers)


# torch intra-op threads of every server process (OMP_NUM_THREADS). One: the tiny model's ops
# are too small to split, and on this shared 2-core machine a second OpenMP thread per process
# spins against every other process. Measured with profile_serving_el.py, image1 at 1 req/s:
# colocated 156 CPU-ms per request with one thread, 482 with torch's default (docs/benchmarks.md).
SERVER_THREADS = 1


@contextlib.contextmanager
def server_threads(threads: int):
    """The servers launched inside inherit ``OMP_NUM_THREADS=threads`` (0: torch's default,
    one thread per core, in every process)."""
    if not threads:
        yield
        return
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def launch_deployment(
    name: str, model: Path, log_dir: Path, threads: int = SERVER_THREADS
) -> Deployment:
    with server_threads(threads):
        dep = start_servers(name, model, log_dir)
    dep.startup["omp_num_threads"] = threads
    return dep


def b2_router_args(policy: str) -> tuple[str, ...]:
    return ("--prefill-policy", policy, "--decode-policy", "round_robin")


def start_servers(name: str, model: Path, log_dir: Path) -> Deployment:
    from epd_testbed import servers as srv

    t0 = time.time()
    encoders, policy, store = [], None, None
    if name == "colocated":
        spec = srv.colocated_spec(model, "--enable-metrics")
        server = srv.launch(spec, log_dir, wait=False)
        try:
            server.wait_ready()
        except BaseException:  # interrupted or failed start: no server left behind
            server.stop()
            raise
        group, entry, caches, vit = [server], server, [server], [server]
        lm = vit
    elif name == "colocated-x2":
        router, pair = srv.launch_colocated_replicas(
            model, log_dir, "--enable-metrics", name="colocated", policy="round_robin"
        )
        group, entry, caches, vit = [router, *pair], router, pair, pair
        lm = vit
    elif name == "el-router":
        router, encoder, language = srv.launch_encode_language(
            model,
            log_dir,
            *EL_BENCH_ARGS,
            language_args=EL_LANGUAGE_ARGS,
            encode_args=EL_ENCODE_ARGS,
            name="bench-el",
        )
        group, entry, caches = [router, encoder, language], router, [encoder, language]
        vit, lm, encoders = [encoder], [language], [encoder]
    elif name == "el-router-2l":
        router, encoder, languages = srv.launch_encode_languages(
            model,
            log_dir,
            *EL_BENCH_ARGS,
            languages=2,
            language_args=EL_LANGUAGE_ARGS,
            encode_args=EL_ENCODE_ARGS,
            name="bench-el2l",
        )
        group, entry = [router, encoder, *languages], router
        caches, vit, lm, encoders = (
            [encoder, *languages],
            [encoder],
            languages,
            [encoder],
        )
    elif name == "el-global-cache":
        policy = B2_POLICIES[0]
        router, enc_a, enc_b, language, master = srv.launch_global_cache(
            model,
            log_dir,
            *EL_BENCH_ARGS,
            name="bench-gc",
            cache_mb=GLOBAL_CACHE_MB,
            language_args=EL_LANGUAGE_ARGS,
            router_args=b2_router_args(policy),
            retries=False,
            decode_log_interval=None,
        )
        group, entry = [router, enc_a, enc_b, language, master], router
        caches, vit, lm = [enc_a, enc_b, language], [enc_a, enc_b], [language]
        encoders, store = [enc_a, enc_b], master
    elif name == "upstream-epd":
        encoder, language = srv.launch_upstream_epd(model, log_dir, "--enable-metrics")
        # an --encoder-only server has no /flush_cache; its embedding cache is keyed by image
        # content, which no earlier cell has sent (per-cell seeds)
        group, entry, caches, vit = [encoder, language], language, [language], [encoder]
        lm = [language]
    else:
        raise ValueError(f"unknown configuration {name!r}")
    startup = {s.spec.name: round(s.ready_s, 1) for s in group if s.ready_s}
    startup["deployment"] = round(time.time() - t0, 1)
    commands = {s.spec.name: s.log_path.read_text().splitlines()[0][2:] for s in group}
    return Deployment(
        name,
        entry,
        group,
        caches,
        {"ready_s": startup, "commands": commands},
        vit=vit,
        lm=lm,
        encoders=encoders,
        policy=policy,
        store=store,
    )


def use_policy(dep: Deployment, policy: str | None, log_dir: Path) -> None:
    """(b2): a router with ``policy`` for the encoders (its servers stay up)."""
    if policy is None or policy == dep.policy:
        return
    from epd_testbed import servers as srv

    old = dep.entry
    old.stop()
    language = next(s for s in dep.caches if s not in dep.encoders)
    router = srv.launch_router(
        [(e, srv.bootstrap_port(e)) for e in dep.encoders],
        [language],
        log_dir,
        *b2_router_args(policy),
        name=old.spec.name,
    )
    dep.servers[dep.servers.index(old)] = dep.entry = router
    dep.policy = policy
    dep.startup["commands"][
        f"{router.spec.name} ({policy})"
    ] = router.log_path.read_text().splitlines()[0][2:]


def flush_caches(dep: Deployment, timeout: float = 30.0) -> None:
    """``/flush_cache`` on the servers with a prefix cache (each waits for its server to be
    idle)."""
    for server in dep.caches:
        server.flush_cache(timeout)


# ---- what the servers count (/metrics) ------------------------------------------------------

CACHE_HITS = "sglang:encoder_cache_hit_files_total"
CACHE_LOOKUPS = "sglang:encoder_cache_total_files_total"
# prompt tokens and prefix-cache hits of finished requests (upstream's per-request counters)
PROMPT_TOKENS = "sglang:prompt_tokens_total"
CACHED_TOKENS = "sglang:cached_tokens_total"
TRANSFER_KEYS = (
    "bytes",
    "rounds",
    "row_bytes",
    "items.sent",
    "items.held",
    "vit_calls",
    "requests.success",
    "requests.all_held",
    "requests.local",
    "requests.failed",
)


def counters(dep: Deployment) -> dict[str, dict[str, float | None]]:
    """Per server of ``dep`` that runs the vision tower or the language model: its
    vision-attention segments, the embedding cache's hits and lookups, the prompt tokens and
    the prefix-cache hits of its requests (None where a server does not export the counter)
    and, for our encoders, the ``sglang:encode_language_*`` counters; the router's policy
    counters (``smg_*``) under ``"router"``, (b2)'s Mooncake Store GETs and PUTs (its master's
    replica-list lookups and put starts) under ``"mooncake_master"``."""
    from epd_testbed import servers as srv
    from sglang_cpu_platform.vision_attention import SEGMENTS_METRIC

    out = {}
    servers = [*dep.vit, *dep.lm]
    for server in [s for i, s in enumerate(servers) if s not in servers[:i]]:
        samples = srv.prometheus_samples(server.url + "/metrics")
        names = {name for name, _, _ in samples}
        out[server.spec.name] = {
            key: srv.samples_sum(samples, metric) if metric in names else None
            for key, metric, where in (
                ("vit_segments", SEGMENTS_METRIC + "_total", dep.vit),
                ("cache_hits", CACHE_HITS, dep.vit),
                ("cache_lookups", CACHE_LOOKUPS, dep.vit),
                ("prompt_tokens", PROMPT_TOKENS, dep.lm),
                ("cached_tokens", CACHED_TOKENS, dep.lm),
            )
            if server in where
        }
        if server in dep.encoders:
            m = srv.encode_language_metrics(server)
            out[server.spec.name].update({k: m.get(k, 0.0) for k in TRANSFER_KEYS})
    port = getattr(dep.entry, "extra", {}).get("prometheus_port")
    if port:
        samples = srv.prometheus_samples(f"http://127.0.0.1:{port}/metrics")
        out["router"] = {
            name + "{" + ",".join(sorted(labels)) + "}": value
            for name, labels, value in samples
            if name.startswith(("smg_manual_policy", "smg_worker_selection"))
        }
    if dep.store is not None:  # Mooncake Store objects looked up (GET) and stored (PUT)
        samples = srv.prometheus_samples(dep.store.url + "/metrics")
        count = lambda *names: sum(  # noqa: E731
            srv.samples_sum(samples, f"master_{n}_total") for n in names
        )
        out["mooncake_master"] = {
            "store_gets": count(
                "get_replica_list_requests", "batch_get_replica_list_items"
            ),
            "store_puts": count("put_start_requests", "batch_put_start_items"),
        }
    return out


def counter_deltas(before: dict, after: dict) -> dict[str, dict[str, float | None]]:
    """``after - before`` per server and counter (a counter a server creates on first use
    counts from 0; None where the server has none)."""
    return {
        server: {
            key: (
                None
                if value is None
                else value - (before.get(server, {}).get(key) or 0.0)
            )
            for key, value in values.items()
        }
        for server, values in after.items()
    }


def total(deltas: dict, key: str) -> float | None:
    """Sum of ``key`` over the servers that have it; None if none has."""
    values = [v[key] for v in deltas.values() if v.get(key) is not None]
    return sum(values) if values else None


def measured(deltas: dict, completed: int, depth: int) -> dict:
    """Per request, from the counter deltas of a cell: images through the vision tower (each
    image or video frame is one segment in each of the ``depth`` vision blocks), the
    embedding-cache hit rate, and what our encoders sent."""
    per = lambda x: None if x is None or not completed else x / completed  # noqa: E731
    segments, hits, lookups = (
        total(deltas, k) for k in ("vit_segments", "cache_hits", "cache_lookups")
    )
    vit_images = None if segments is None else segments / depth
    prompt, cached = total(deltas, "prompt_tokens"), total(deltas, "cached_tokens")
    return {
        "source": "measured: deltas of the servers' /metrics over the cell",
        "vit_images": vit_images,
        "vit_images_per_request": per(vit_images),
        "embedding_cache_lookups": lookups,
        "embedding_cache_hit_pct": 100 * (hits or 0) / lookups if lookups else None,
        "prefix_hit_pct": 100 * (cached or 0) / prompt if prompt else None,
        "row_bytes_per_request": per(total(deltas, "row_bytes")),
        "items_sent": total(deltas, "items.sent"),
        "items_held": total(deltas, "items.held"),
        "vit_calls": total(deltas, "vit_calls"),
        "servers": deltas,
    }


def transfer(deltas: dict, completed: int) -> dict:
    """(b), (b2), (b3): encoder -> language bytes and rounds, summed over the encoders."""
    get = lambda key: total(deltas, key) or 0.0  # noqa: E731
    moved = get("requests.success")
    return {
        "source": "measured: sglang:encode_language_* of the encode server(s)",
        "bytes_per_request": get("bytes") / completed if completed else None,
        "requests_transferred": moved,
        # every item held by the language side's prefix cache: no round (AllHeld)
        "requests_all_held": get("requests.all_held"),
        "requests_local": get("requests.local"),
        "requests_failed": get("requests.failed"),
        "resume_rounds_per_request": (get("rounds") - moved) / moved if moved else 0.0,
    }


def cpu_seconds(dep: Deployment) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each server's process group (a server and
    its scheduler and detokenizer children, the router, the Mooncake master) and by this
    process (the client), from ``/proc``: which process a deployment's saturation waits for.
    """
    from epd_testbed import servers as srv

    used = srv.process_group_cpu_seconds([server.pid for server in dep.servers])
    out = {server.spec.name: used[server.pid] for server in dep.servers}
    mine = os.times()
    out["client"] = mine.user + mine.system
    return out


def process_cpu_seconds(dep: Deployment) -> dict[str, float]:
    """CPU seconds used so far by each process of ``dep``'s servers, as
    ``server:comm`` (``bench-el-language:sglang::schedul``; a server's HTTP front end is its
    ``python`` process), from ``/proc``: which single process a deployment waits for."""
    from epd_testbed.servers import stat_cpu_seconds

    groups = {server.pid: server.spec.name for server in dep.servers}
    out: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            text = stat.read_text()
            pgid = int(text.rsplit(")", 1)[1].split()[2])
            if pgid in groups:
                comm = text.split("(", 1)[1].rsplit(")", 1)[0]
                key = f"{groups[pgid]}:{comm}"
                out[key] = out.get(key, 0.0) + stat_cpu_seconds(text)
    return out


# ---- the client -----------------------------------------------------------------------------


class CellTimeout(Exception):
    pass


def client_argv(
    url: str, model: Path, stream: str, rate: str, seed: int, n: int, out: Path
) -> list[str]:
    return _client_args(
        "sglang",
        url,
        model,
        (*STREAMS[stream], "--random-output-len", str(OUTPUT_LEN)),
        rate,
        seed,
        n,
        out,
        "--random-range-ratio",
        "1",
    )


def chat_argv(
    url: str, model: Path, dataset: Path, rate: str, seed: int, n: int, out: Path
) -> list[str]:
    """A repeated-image stream: OpenAI chat, rows (multi-turn: conversations) of ``dataset``;
    with ``--output-details`` (per-turn TTFTs)."""
    return _client_args(
        "sglang-oai-chat",
        url,
        model,
        ("--dataset-name", "openai", "--dataset-path", str(dataset)),
        rate,
        seed,
        n,
        out,
        "--output-details",
    )


def _client_args(
    backend: str,
    url: str,
    model: Path,
    dataset: tuple,
    rate: str,
    seed: int,
    n: int,
    out: Path,
    *extra: str,
) -> list[str]:
    """``sglang.benchmark.serving``'s arguments of one cold cell: no warm-up request, the
    prefix-cache report, the result appended to ``out``."""
    return [
        "--backend",
        backend,
        "--base-url",
        url,
        "--model",
        str(model),
        "--tokenizer",
        str(model),
        *dataset,
        *extra,
        "--num-prompts",
        str(n),
        "--request-rate",
        rate,
        "--seed",
        str(seed),
        "--warmup-requests",
        "0",
        "--cache-report",
        "--disable-tqdm",
        "--output-file",
        str(out),
    ]


@contextlib.contextmanager
def routing_keys(serving, send: bool):
    """The client's ``openai`` dataset passes a row's other fields as request body; a row's
    ``routing_key`` is taken out of it and, with ``send``, becomes the row's routing key,
    which the client sends as ``X-SMG-Routing-Key`` (what ``--gsp-send-routing-key`` does for
    its generated-shared-prefix dataset; no flag does it for a dataset file)."""
    original = serving.get_dataset

    def get_dataset(*args, **kwargs):
        rows = original(*args, **kwargs)
        for row in rows:
            key = (row.extra_request_body or {}).pop("routing_key", None)
            if send:
                row.routing_key = key
        return rows

    serving.get_dataset = get_dataset
    try:
        yield
    finally:
        serving.get_dataset = original


def run_client(
    argv: list[str],
    log_path: Path,
    timeout: float = CELL_TIMEOUT_S,
    send_routing_keys: bool = False,
) -> dict:
    """``python -m sglang.benchmark.serving ARGV`` in this process (its import takes ~10 s
    once); the result is the line it appends to ``--output-file``."""
    from sglang.benchmark import serving

    out = Path(argv[argv.index("--output-file") + 1])
    out.unlink(missing_ok=True)

    def expire(signum, frame):
        raise CellTimeout(f"client did not finish within {timeout}s")

    saved_argv, saved_handler = sys.argv, signal.signal(signal.SIGALRM, expire)
    sys.argv = ["sglang.benchmark.serving", *argv]
    signal.alarm(int(timeout))
    try:
        with open(log_path, "w") as log, contextlib.redirect_stdout(
            log
        ), contextlib.redirect_stderr(log), routing_keys(serving, send_routing_keys):
            serving.cli_main()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, saved_handler)
        sys.argv = saved_argv
    if not out.is_file():
        raise RuntimeError(f"client wrote no result; see {log_path}")
    return json.loads(out.read_text().splitlines()[-1])


RESULT_KEYS = (
    "completed",
    "duration",
    "request_throughput",
    "output_throughput",
    "total_input_tokens",
    "total_input_vision_tokens",
    "total_output_tokens",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "mean_e2e_latency_ms",
    "median_e2e_latency_ms",
    "p99_e2e_latency_ms",
)


def model_shape(model: Path) -> dict:
    cfg = json.loads((model / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    return {
        "hidden": text["hidden_size"],
        "deepstack": len(vision["deepstack_visual_indexes"]),
        "vision_depth": vision["depth"],
        "patch_size": vision["patch_size"],
        "spatial_merge_size": vision["spatial_merge_size"],
        "dtype_bytes": 4,  # the test bed serves fp32
    }


def turn_ttfts(raw: dict, turns: list[int]) -> dict:
    """TTFT of the first turns and of the later ones (ms), from the client's per-request
    output (its multi-turn mode lists every conversation's turns in order)."""
    import numpy as np

    first, later, i = [], [], 0
    for count in turns:
        for turn in range(count):
            if raw["ttfts"][i] > 0 and not raw["errors"][i]:
                (first if turn == 0 else later).append(raw["ttfts"][i] * 1e3)
            i += 1
    stat = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return {
        "first_turns": len(first),
        "later_turns": len(later),
        "ttft_p50_first_ms": stat(first, 50),
        "ttft_p50_later_ms": stat(later, 50),
        "ttft_p99_later_ms": stat(later, 99),
    }


def client_prefix_hit(raw: dict) -> float | None:
    """The client's ``--cache-report`` hit rate; None where no response carried cache details
    (the router's OpenAI chat path drops SGLang's ``sglext`` field from what it returns).
    """
    report = raw.get("cache_report") or {}
    if report.get("device_cached_tokens") is None and not report.get(
        "total_cached_tokens"
    ):
        return None
    return report.get("cache_hit_rate_pct")


def run_cell(dep: Deployment, model: Path, cell: Cell, work: Path) -> dict:
    if not cell.repeat:
        flush_caches(dep)
    out = work / f"{dep.name}-{cell.key}.jsonl"
    info = {}
    if cell.stream in CHAT_STREAMS:
        dataset, info = write_chat_dataset(
            cell.stream, cell.seed, cell.n, work / "datasets"
        )
        argv = chat_argv(
            dep.entry.url, model, dataset, cell.rate, cell.seed, cell.n, out
        )
    else:
        argv = client_argv(
            dep.entry.url, model, cell.stream, cell.rate, cell.seed, cell.n, out
        )
    shape = model_shape(model)
    before = counters(dep)
    load_before = os.getloadavg()[0]
    cpu_before, procs_before = cpu_seconds(dep), process_cpu_seconds(dep)
    t0 = time.time()
    raw = run_client(
        argv,
        work / f"{dep.name}-{cell.key}.log",
        send_routing_keys=cell.policy == "manual",
    )
    procs = process_cpu_seconds(dep)
    cpu = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_seconds(dep).items()}
    deltas = counter_deltas(before, counters(dep))
    result = {k: raw.get(k) for k in RESULT_KEYS}
    command = "python -m sglang.benchmark.serving " + shlex.join(argv).replace(
        str(REPO) + "/", ""
    ).replace(str(work), "$OUT")
    if cell.stream in CHAT_STREAMS:
        command = (
            f"# --dataset-path: bench_serving_el.write_chat_dataset({cell.stream!r}, "
            f"seed={cell.seed}, n={cell.n}, ...)\n" + command
        )
    result.update(
        stream=cell.stream,
        rate=cell.rate,
        seed=cell.seed,
        num_prompts=cell.n,
        repeat=cell.repeat,
        policy=cell.policy,
        dataset=info,
        wall_s=round(time.time() - t0, 1),
        load1_before=load_before,
        load1_after=os.getloadavg()[0],
        cache_hit_rate_pct=client_prefix_hit(raw),
        command=command,
    )
    completed = result["completed"] or 0
    result["measured"] = measured(deltas, completed, shape["vision_depth"])
    result["cpu_s"] = {k: round(v, 3) for k, v in cpu.items()}
    result["process_cpu_s"] = {
        k: round(v - procs_before.get(k, 0.0), 3) for k, v in procs.items()
    }
    if cell.stream == "multiturn":
        result["turns"] = turn_ttfts(raw, info["turns"])
    if dep.encoders:
        result["transfer"] = transfer(deltas, completed)
    elif dep.name == "upstream-epd":
        result["transfer"] = upstream_transfer(cell.stream, shape)
    return result


def upstream_transfer(stream: str, shape: dict) -> dict | None:
    """What upstream's encoder sends per request, computed: the embedding rows of the image
    tokens, (1+K) x hidden values each (its embedding carries the deepstack features); None
    for the multi-turn stream (whether a later turn's image is sent again is not counted).
    """
    if stream == "multiturn":
        return None
    argv = STREAMS.get(stream, ("--image-count", "1", "--image-resolution", "224x224"))
    images = (
        int(argv[argv.index("--image-count") + 1]) if "--image-count" in argv else 0
    )
    if images:
        height, width = map(int, argv[argv.index("--image-resolution") + 1].split("x"))
        factor = (
            shape["patch_size"] * shape["spatial_merge_size"]
        )  # a multiple: no resize
        tokens = images * (height // factor) * (width // factor)
    else:
        tokens = 0
    row = (1 + shape["deepstack"]) * shape["hidden"] * shape["dtype_bytes"]
    return {
        "source": "computed: image tokens x (1+K) x hidden x 4 bytes (the embedding it sends)",
        "image_tokens_per_request": tokens,
        "bytes_per_request": tokens * row,
        "resume_rounds_per_request": None,
    }


# ---- the run --------------------------------------------------------------------------------


def machine_info() -> dict:
    import importlib.metadata as md

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next(
        (
            l.split(":", 1)[1].strip()
            for l in lscpu.splitlines()
            if l.startswith("Model name")
        ),
        "?",
    )
    versions = {}
    for pkg in (
        "sglang",
        "sglang-router",
        "torch",
        "transformers",
        "mooncake-transfer-engine-non-cuda",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    versions["python"] = platform.python_version()
    git = lambda *a: subprocess.run(  # noqa: E731
        ["git", "-C", str(REPO), *a], capture_output=True, text=True
    ).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "kernel": platform.release(),
        "versions": versions,
        "fork_commit": git("rev-parse", "--short", "HEAD")
        + (" + uncommitted changes" if dirty else ""),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M"
        ),
    }


def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"configs": {}}


def save_results(results: dict, path: Path, indent: int | None = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=indent, sort_keys=True) + "\n")
    tmp.replace(path)


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)


def warm_up(dep: Deployment, model: Path, work: Path) -> None:
    """Unreported requests after start-up (seed 1): four one-image ``/generate`` requests and
    four chat requests over one image."""
    url = dep.entry.url
    run_client(
        client_argv(url, model, "image1", "inf", WARMUP_SEED, 4, work / "warm.jsonl"),
        work / f"{dep.name}-warmup.log",
    )
    dataset, _ = write_chat_dataset("zipf", WARMUP_SEED, 4, work / "datasets")
    run_client(
        chat_argv(url, model, dataset, "inf", WARMUP_SEED, 4, work / "warm-chat.jsonl"),
        work / f"{dep.name}-warmup-chat.log",
    )


def run(args: argparse.Namespace) -> dict:
    from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint

    t0 = time.time()
    results = load_results(args.json)
    if args.fresh:  # only the configurations this run measures start over
        for name in args.configs:
            results["configs"].pop(name, None)
    results["machine"] = machine_info()
    results["command"] = shlex.join(
        ["python", "benchmark/bench_serving_el.py", *args.argv]
    )
    model = ensure_checkpoint(TinyVLMoeSpec())
    results["model"] = {
        "path": "epd_testbed.tiny_ckpt.TinyVLMoeSpec()",
        "dir": str(model),
        **model_shape(model),
    }
    work = Path(tempfile.mkdtemp(prefix="bench-serving-el-"))
    log(f"checkpoint {model}; logs and client output under {work}", t0)
    for name in args.configs:
        entry = results["configs"].setdefault(name, {"cells": {}})
        cells = planned_cells(name, args.quick)
        todo = [c for c in cells if c.key not in entry["cells"]]
        if not todo:
            log(
                f"{name}: all {len(cells)} cells already in {args.json.name}, skipped",
                t0,
            )
            continue
        log(f"{name}: starting {CONFIGS[name]} (load {os.getloadavg()[0]:.1f})", t0)
        started = time.time()
        dep = launch_deployment(name, model, work / "logs", args.server_threads)
        try:
            entry.update(startup=dep.startup, load1_at_start=os.getloadavg()[0])
            log(f"{name}: healthy, launch -> healthy {dep.startup['ready_s']}", t0)
            warm_up(dep, model, work)
            for i, cell in enumerate(todo, 1):
                use_policy(dep, cell.policy, work / "logs")
                twin = Cell(cell.stream, cell.rate, cell.n, policy=cell.policy)
                if cell.repeat and twin not in todo:
                    # resumed between the twins: fill the caches again (not recorded)
                    run_cell(dep, model, twin, work)
                got = entry["cells"][cell.key] = run_cell(dep, model, cell, work)
                save_results(results, args.json)
                m = got["measured"]
                log(
                    f"{name} [{i}/{len(todo)}] {cell.key}: "
                    f"{got['request_throughput']:.2f} req/s, TTFT p50 {got['median_ttft_ms']:.0f} ms, "
                    f"TPOT p50 {got['median_tpot_ms']:.1f} ms, prefix hit {fmt(m['prefix_hit_pct'], '.1f')}% (client {got['cache_hit_rate_pct']}%), "
                    f"ViT images/req {fmt(m['vit_images_per_request'], '.2f')}, embedding-cache hit "
                    f"{fmt(m['embedding_cache_hit_pct'], '.0f')}% (load {got['load1_after']:.1f})",
                    t0,
                )
                if not dep.alive():
                    raise RuntimeError(
                        f"{name}: a server died; logs under {work / 'logs'}"
                    )
        finally:
            dep.stop()
        entry["wall_s"] = round(time.time() - started, 1)
        save_results(results, args.json)
    results["wall_s_last_run"] = round(time.time() - t0, 1)
    save_results(results, args.json)
    log(f"done; results in {args.json}", t0)
    return results


# ---- table, ratios, plot --------------------------------------------------------------------


def fmt(value, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(num: dict | None, den: dict | None, key: str) -> float | None:
    """``num[key] / den[key]`` of two cells, None where either is missing."""
    a, b = (cell.get(key) if cell else None for cell in (num, den))
    return a / b if a is not None and b else None


def cell_of(
    results: dict,
    config: str,
    stream: str,
    rate: str,
    repeat: bool = False,
    policy: str | None = None,
) -> dict | None:
    if config == "el-global-cache" and policy is None:
        policy = B2_POLICIES[0]
    return (
        results.get("configs", {})
        .get(config, {})
        .get("cells", {})
        .get(cell_key(stream, rate, repeat, policy))
    )


def runs(config: str, stream: str) -> bool:
    """Whether ``config`` runs ``stream`` at all ((b2): the repeated-image streams only)."""
    return config != "el-global-cache" or stream in CHAT_STREAMS


def ratios(results: dict) -> list[dict]:
    """(b)/(a) at the lowest rate, (b)/(a2) and (b)/(c) at saturation, per stream."""
    low, sat = RATES[0], RATES[-1]
    rows = []
    for stream in STREAMS:
        a, a2, b, c = (
            cell_of(results, n, stream, low)
            for n in ("colocated", "colocated-x2", "el-router", "upstream-epd")
        )
        sa, sa2, sb, sc = (
            cell_of(results, n, stream, sat)
            for n in ("colocated", "colocated-x2", "el-router", "upstream-epd")
        )
        rows.append(
            {
                "stream": stream,
                "ttft_p50_b_over_a_low": ratio(b, a, "median_ttft_ms"),
                "ttft_mean_b_over_a_low": ratio(b, a, "mean_ttft_ms"),
                "e2e_mean_b_over_a_low": ratio(b, a, "mean_e2e_latency_ms"),
                "e2e_mean_ms_low": {
                    LABEL[n]: (x or {}).get("mean_e2e_latency_ms")
                    for n, x in zip(
                        ("colocated", "colocated-x2", "el-router", "upstream-epd"),
                        (a, a2, b, c),
                    )
                },
                "throughput_b_over_a_sat": ratio(sb, sa, "request_throughput"),
                "throughput_b_over_a2_sat": ratio(sb, sa2, "request_throughput"),
                "throughput_b_over_c_sat": ratio(sb, sc, "request_throughput"),
                "ttft_p50_b_over_c_low": ratio(b, c, "median_ttft_ms"),
            }
        )
    return rows


def later_ttft(cell: dict | None) -> dict | None:
    """The multi-turn cell's TTFT p50 of turns >= 2 as a one-key dict (for ``ratio``)."""
    turns = (cell or {}).get("turns") or {}
    return {"p50": turns["ttft_p50_later_ms"]} if turns else None


def against_a2(results: dict, name: str) -> dict:
    """Issue 17's ratios of deployment ``name`` against (a2): one-image and zipf saturation
    throughput, the image1 cell re-sent, the multi-turn TTFT p50 of turns >= 2."""
    a2 = "colocated-x2"

    def of(stream, rate, key, repeated=False, value=lambda cell: cell):
        args = (stream, rate, True) if repeated else (stream, rate)
        return ratio(
            value(cell_of(results, name, *args)),
            value(cell_of(results, a2, *args)),
            key,
        )

    return {
        "one": of("image1", "inf", "request_throughput"),
        "zipf": of("zipf", "inf", "request_throughput"),
        "repeat": of(*REPEATED, "request_throughput", repeated=True),
        "turns": of("multiturn", CHAT_STREAMS["multiturn"], "p50", value=later_ttft),
    }


def cached_turns_moved_nothing(cell: dict | None) -> bool | None:
    """A multi-turn cell of (b): its image went over once per conversation (items sent =
    first turns) and every later turn's was held by the prefix cache (items held = later
    turns), so a cached turn moved no image row; None where not measured."""
    m = (cell or {}).get("measured") or {}
    t = (cell or {}).get("turns") or {}
    if m.get("items_held") is None or not t:
        return None
    return m["items_held"] == t["later_turns"] and m["items_sent"] == t["first_turns"]


def cached_turns_text(cell: dict | None) -> str:
    """What ``cached_turns_moved_nothing`` compares, as text."""
    m = (cell or {}).get("measured") or {}
    t = (cell or {}).get("turns") or {}
    return (
        f"items sent {fmt(m.get('items_sent'))} = first turns {t.get('first_turns', '-')}, "
        f"items held {fmt(m.get('items_held'))} = later turns {t.get('later_turns', '-')}"
    )


def targets(results: dict) -> list[tuple[str, bool | None, str]]:
    """Issue 17's targets against (a2), for (b) and, where measured, (b3); the earlier ones:
    (what, met, value)."""
    b = "el-router"
    mt_b = cell_of(results, b, "multiturn", CHAT_STREAMS["multiturn"])
    cached_ok = cached_turns_moved_nothing(mt_b)
    image1 = ratios(results)[0]
    low, vs_c = image1["ttft_p50_b_over_a_low"], image1["throughput_b_over_c_sat"]
    ok = lambda value, good: None if value is None else good(value)  # noqa: E731
    rows = []
    for name in (b, "el-router-2l"):
        r, label = against_a2(results, name), LABEL[name]
        if name != b and all(v is None for v in r.values()):
            continue  # (b3) not measured
        rows += [
            (
                f"one-image saturation throughput ({label}) >= 0.9x (a2)",
                ok(r["one"], lambda x: x >= 0.9),
                f"ratio {fmt(r['one'], '.2f')}",
            ),
            (
                f"repeated-image (zipf) saturation throughput ({label}) >= (a2)",
                ok(r["zipf"], lambda x: x >= 1.0),
                f"ratio {fmt(r['zipf'], '.2f')} (the image1 cell re-sent: "
                f"{fmt(r['repeat'], '.2f')})",
            ),
            (
                f"multi-turn TTFT p50 of turns >= 2 ({label}) within 10% of (a2)",
                ok(r["turns"], lambda x: x <= 1.10),
                f"ratio {fmt(r['turns'], '.2f')}",
            ),
        ]
    return rows + [
        (
            "image-row bytes per cached turn = 0 (b)",
            cached_ok,
            cached_turns_text(mt_b),
        ),
        (
            "single image, 1 req/s: TTFT p50 (b) within 15% of (a)",
            ok(low, lambda r: r <= 1.15),
            f"ratio {fmt(low, '.2f')}",
        ),
        (
            "single image, saturation: throughput (b) >= (c)",
            ok(vs_c, lambda r: r >= 1.0),
            f"ratio {fmt(vs_c, '.2f')}",
        ),
    ]


HEAD = (
    "| config | rate (req/s) | req/s | TTFT mean / p50 / p99 (ms) | TPOT mean / p50 / p99 (ms) "
    "| E2E mean (ms) | ViT images/req | embedding-cache hit % | prefix hit %, servers / client "
    "| enc->lang bytes/req | resume rounds/req | load |"
)
RULE = "|---|---|---|---|---|---|---|---|---|---|---|---|"
CHAT_HEAD = (
    "| config | req/s | TTFT mean / p50 / p99 (ms) | TTFT p50 turn 1 / turns >= 2 (ms) "
    "| TPOT p50 (ms) | ViT images/req | embedding-cache hit % | prefix hit %, servers / client "
    "| enc->lang bytes/req | row bytes/req | items sent / held | load |"
)
CHAT_RULE = "|---|---|---|---|---|---|---|---|---|---|---|---|"


def render_markdown(results: dict) -> str:
    m = results.get("machine", {})
    v = m.get("versions", {})
    sizes = results.get("model", {})
    out = [
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB, Linux "
        f"{m.get('kernel')}; sglang {v.get('sglang')}, sglang-router {v.get('sglang-router')}, torch "
        f"{v.get('torch')}, transformers {v.get('transformers')}, Mooncake "
        f"{v.get('mooncake-transfer-engine-non-cuda')}, Python {v.get('python')}; fork commit "
        f"`{m.get('fork_commit')}`, {m.get('date_utc', '?')} UTC. Command: `{results.get('command')}` "
        f"(last run {fmt(results.get('wall_s_last_run'))} s). Model: the test bed's tiny Qwen3-VL-MoE "
        f"(`{sizes.get('path')}`), fp32, vision depth {sizes.get('vision_depth')}.",
        "",
        "Start-up, launch -> `/health` answers (s; servers of one configuration start together, "
        "`deployment` is the whole configuration), and the configuration's wall time (start, "
        "warm-up, its cells, stop):",
        "",
        "| configuration | servers (launch -> healthy, s) | OMP_NUM_THREADS per server "
        "| load (1 min) at start | wall (s) |",
        "|---|---|---|---|---|",
    ]
    for name, title in CONFIGS.items():
        entry = results.get("configs", {}).get(name, {})
        startup = entry.get("startup", {})
        ready = sorted(
            startup.get("ready_s", {}).items(),
            key=lambda kv: (kv[0] == "deployment", kv[0]),
        )
        out.append(
            f"| {title} | {', '.join(f'{k} {v}' for k, v in ready) or '-'} "
            f"| {startup.get('omp_num_threads', 'torch default')} "
            f"| {fmt(entry.get('load1_at_start'), '.1f')} | {fmt(entry.get('wall_s'))} |"
        )
    for stream in STREAMS:
        out += [
            "",
            f"**{stream}**: {STREAM_TITLE[stream]}, {OUTPUT_LEN} output tokens",
            "",
            HEAD,
            RULE,
        ]
        for rate in RATES:
            for name in CONFIGS:
                if runs(name, stream):
                    out.append(row(cell_of(results, name, stream, rate), name, rate))
    out += [
        "",
        "**Repeated image** (the image1 saturation cell sent a second time with the same seed "
        "on the same servers: multimodal and prefix caches hit; not a cold number)",
        "",
        HEAD,
        RULE,
    ]
    for name in CONFIGS:
        if runs(name, REPEATED[0]):
            out.append(row(cell_of(results, name, *REPEATED, True), name, REPEATED[1]))
    for stream, rate in CHAT_STREAMS.items():
        any_cell = next(
            (
                c
                for n in CONFIGS
                for c in [cell_of(results, n, stream, rate)]
                if c is not None
            ),
            {},
        )
        info = any_cell.get("dataset") or {}
        detail = (
            f"{any_cell.get('num_prompts', '-')} requests over a pool of {info.get('pool', '-')} "
            f"images ({info.get('distinct', '-')} drawn, the most frequent {info.get('top_image', '-')} "
            f"times), all at t = 0"
            if stream == "zipf"
            else f"{any_cell.get('num_prompts', '-')} conversations, "
            f"{sum(info.get('turns', []))} turns, conversations arriving at {rate}/s (Poisson)"
        )
        out += [
            "",
            f"**{stream}**: {STREAM_TITLE[stream]}, {OUTPUT_LEN} output tokens per turn; {detail}. "
            "(b2) with the router's round-robin prefill policy; per policy below.",
            "",
            CHAT_HEAD,
            CHAT_RULE,
        ]
        for name in CONFIGS:
            out.append(chat_row(cell_of(results, name, stream, rate), name))
    out += affinity(results)
    out += cpu_table(results)
    out += [
        "",
        "Ratios ((b) = sglang-router + encode + language; low = rate 1, saturation = inf):",
        "",
        "| stream | TTFT p50 (b)/(a), low | TTFT mean (b)/(a), low | E2E mean (b)/(a), low "
        "| E2E mean ms (a) / (a2) / (b) / (c), low | req/s (b)/(a), sat. | req/s (b)/(a2), sat. "
        "| req/s (b)/(c), sat. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ratios(results):
        e2e = r["e2e_mean_ms_low"]
        out.append(
            f"| {r['stream']} | {fmt(r['ttft_p50_b_over_a_low'], '.2f')} | {fmt(r['ttft_mean_b_over_a_low'], '.2f')} "
            f"| {fmt(r['e2e_mean_b_over_a_low'], '.2f')} | {fmt(e2e['a'])} / {fmt(e2e['a2'])} / {fmt(e2e['b'])} / {fmt(e2e['c'])} "
            f"| {fmt(r['throughput_b_over_a_sat'], '.2f')} | {fmt(r['throughput_b_over_a2_sat'], '.2f')} "
            f"| {fmt(r['throughput_b_over_c_sat'], '.2f')} |"
        )
    out += ["", "Targets:", "", "| target | verdict | measured |", "|---|---|---|"]
    for what, met, value in targets(results):
        verdict_ = "not measured" if met is None else ("met" if met else "missed")
        out.append(f"| {what} | {verdict_} | {value} |")
    out += [
        "",
        "<details><summary>Exact command lines (servers as launched; the client once per cell, "
        "in this process through <code>cli_main</code>)</summary>",
        "",
        "```bash",
        "MODEL=$(.fork/venv/bin/python -c 'from epd_testbed.tiny_ckpt import TinyVLMoeSpec, "
        "ensure_checkpoint; print(ensure_checkpoint(TinyVLMoeSpec()))')",
    ]
    model = results.get("model", {}).get("dir")
    for name in CONFIGS:  # sorted: the same order from a run and from its JSON
        for server, cmd in sorted(
            results.get("configs", {})
            .get(name, {})
            .get("startup", {})
            .get("commands", {})
            .items()
        ):
            out.append(f"# ({LABEL[name]}) {server}\n" + short(cmd, model))
    seen = set()
    for name in CONFIGS:
        entry = results.get("configs", {}).get(name, {})
        for key, cell in sorted(entry.get("cells", {}).items()):
            if key not in seen:
                seen.add(key)
                url = cell["command"].split("--base-url ", 1)[1].split(" ", 1)[0]
                out.append(
                    f"# cell {key} (URL = the configuration's entry point)\n"
                    + short(cell["command"].replace(url, "$URL"), model)
                )
    out += ["```", "", "</details>"]
    return "\n".join(out) + "\n"


CPU_CELLS = (
    ("image1", "inf"),
    ("zipf", "inf"),
    ("multiturn", CHAT_STREAMS["multiturn"]),
)


def cpu_table(results: dict) -> list[str]:
    """CPU per request of every process group in the saturation and multi-turn cells."""
    out = [
        "",
        "**CPU per request** (user + system time of each server's process group over the cell, "
        "from `/proc`, divided by the requests; in brackets the share of one core it used over "
        "the cell; the client runs in the benchmark's process):",
        "",
        "| config | cell | req/s | CPU ms per request: each process group [share of a core] "
        "| servers' total (ms) | client (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for stream, rate in CPU_CELLS:
        for name in CONFIGS:
            cell = cell_of(results, name, stream, rate)
            if not cell or not cell.get("cpu_s") or not cell.get("completed"):
                continue
            n, wall = cell["completed"], cell.get("duration") or 0
            servers = {k: v for k, v in cell["cpu_s"].items() if k != "client"}
            each = ", ".join(
                f"{k} {1e3 * v / n:.1f} [{100 * v / wall if wall else 0:.0f}%]"
                for k, v in sorted(servers.items(), key=lambda kv: -kv[1])
            )
            out.append(
                f"| ({LABEL[name]}) {name} | {cell_key(stream, rate)} "
                f"| {fmt(cell['request_throughput'], '.2f')} | {each} "
                f"| {1e3 * sum(servers.values()) / n:.1f} | {1e3 * cell['cpu_s'].get('client', 0) / n:.1f} |"
            )
    return out


def affinity(results: dict) -> list[str]:
    """(b2), the zipf stream per prefill policy: what each encoder ran and hit."""
    entry = results.get("configs", {}).get("el-global-cache")
    if not entry:
        return []
    out = [
        "",
        "**Affinity** ((b2): two encode servers sharing rows through `--enable-mm-global-cache` "
        "and a `mooncake_master`, one language server; the zipf stream, fresh images per "
        "policy): the router's prefill policy, and per encoder (A / B) what it served, ran and "
        "hit:",
        "",
        "| prefill policy | req/s | TTFT mean / p50 / p99 (ms) | requests A / B "
        "| ViT images A / B | embedding-cache hits / lookups A / B | Mooncake Store GETs / PUTs "
        "| router policy counters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for policy in B2_POLICIES:
        cell = cell_of(
            results, "el-global-cache", "zipf", CHAT_STREAMS["zipf"], policy=policy
        )
        if cell is None:
            out.append(f"| {policy} | not run |||||||")
            continue
        servers = cell["measured"]["servers"]
        encoders = sorted(s for s in servers if "items.sent" in servers[s])
        store = servers.get("mooncake_master", {})
        each = lambda f: " / ".join(f(servers[s]) for s in encoders)  # noqa: E731
        depth = results.get("model", {}).get("vision_depth") or 1
        router = ", ".join(
            f"{k.split('{', 1)[1].rstrip('}')}: {v:.0f}"
            for k, v in sorted(servers.get("router", {}).items())
            if k.startswith("smg_manual_policy_branch_total") and v
        )
        out.append(
            f"| {policy} | {fmt(cell['request_throughput'], '.2f')} "
            f"| {fmt(cell['mean_ttft_ms'])} / {fmt(cell['median_ttft_ms'])} / {fmt(cell['p99_ttft_ms'])} "
            f"| {each(lambda s: fmt(s.get('requests.success')))} "
            f"| {each(lambda s: fmt(None if s.get('vit_segments') is None else s['vit_segments'] / depth))} "
            f"| {each(lambda s: fmt(s.get('cache_hits')) + '/' + fmt(s.get('cache_lookups')))} "
            f"| {fmt(store.get('store_gets'))} / {fmt(store.get('store_puts'))} "
            f"| {router or '-'} |"
        )
    return out


def short(cmd: str, model: str | None) -> str:
    cmd = cmd.replace(str(REPO) + "/", "")
    return cmd.replace(model, "$MODEL") if model else cmd


def verdict(ok: bool, value) -> str:
    return (
        f"{'met' if ok else 'missed'} (ratio {fmt(value, '.2f')})"
        if value is not None
        else "not measured"
    )


def prefix_cell(cell: dict) -> str:
    """Prefix-cache hit %, from the language servers' counters / from the client's report."""
    server = (cell.get("measured") or {}).get("prefix_hit_pct")
    return f"{fmt(server, '.1f')} / {fmt(cell.get('cache_hit_rate_pct'), '.1f')}"


def bytes_cell(cell: dict) -> str:
    t = cell.get("transfer") or {}
    value = t.get("bytes_per_request")
    if value is None:
        return "-"
    return f"{value:.0f} ({'measured' if t['source'].startswith('measured') else 'computed'})"


def row(cell: dict | None, name: str, rate: str) -> str:
    if cell is None:
        return f"| ({LABEL[name]}) {name} | {rate} | not run |||||||||| "
    t = cell.get("transfer") or {}
    m = cell.get("measured") or {}
    return (
        f"| ({LABEL[name]}) {name} | {rate} | {fmt(cell['request_throughput'], '.2f')} "
        f"| {fmt(cell['mean_ttft_ms'])} / {fmt(cell['median_ttft_ms'])} / {fmt(cell['p99_ttft_ms'])} "
        f"| {fmt(cell['mean_tpot_ms'], '.1f')} / {fmt(cell['median_tpot_ms'], '.1f')} / {fmt(cell['p99_tpot_ms'], '.1f')} "
        f"| {fmt(cell['mean_e2e_latency_ms'])} | {fmt(m.get('vit_images_per_request'), '.2f')} "
        f"| {fmt(m.get('embedding_cache_hit_pct'), '.1f')} | {prefix_cell(cell)} "
        f"| {bytes_cell(cell)} | {fmt(t.get('resume_rounds_per_request'), '.2f')} "
        f"| {fmt(cell.get('load1_after'), '.1f')} |"
    )


def chat_row(cell: dict | None, name: str) -> str:
    if cell is None:
        return f"| ({LABEL[name]}) {name} | not run |||||||||| "
    m = cell.get("measured") or {}
    t = cell.get("turns") or {}
    items = (
        "-"
        if m.get("items_sent") is None
        else f"{m['items_sent']:.0f} / {m['items_held']:.0f}"
    )
    return (
        f"| ({LABEL[name]}) {name} | {fmt(cell['request_throughput'], '.2f')} "
        f"| {fmt(cell['mean_ttft_ms'])} / {fmt(cell['median_ttft_ms'])} / {fmt(cell['p99_ttft_ms'])} "
        f"| {fmt(t.get('ttft_p50_first_ms'))} / {fmt(t.get('ttft_p50_later_ms'))} "
        f"| {fmt(cell['median_tpot_ms'], '.1f')} | {fmt(m.get('vit_images_per_request'), '.2f')} "
        f"| {fmt(m.get('embedding_cache_hit_pct'), '.1f')} | {prefix_cell(cell)} "
        f"| {bytes_cell(cell)} | {fmt(m.get('row_bytes_per_request'))} | {items} "
        f"| {fmt(cell.get('load1_after'), '.1f')} |"
    )


def render_plot(results: dict, path: Path) -> None:
    """Per generated stream, throughput, TTFT p50 and TPOT p50 against the rate; last column,
    the repeated-image streams: zipf throughput (b2 per policy), multi-turn TTFT p50 of turns
    >= 2, and vision-tower images per zipf request."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (
        ("request_throughput", "requests/s"),
        ("median_ttft_ms", "TTFT p50 (ms)"),
        ("median_tpot_ms", "TPOT p50 (ms)"),
    )
    fig, axes = plt.subplots(
        len(metrics),
        len(STREAMS) + 1,
        figsize=(4 * (len(STREAMS) + 1), 3 * len(metrics)),
        squeeze=False,
    )
    colors = {name: f"C{i}" for i, name in enumerate(CONFIGS)}
    for col, stream in enumerate(STREAMS):
        for rowi, (key, label) in enumerate(metrics):
            ax = axes[rowi][col]
            for name in CONFIGS:
                if not runs(name, stream):
                    continue
                ys = [(cell_of(results, name, stream, r) or {}).get(key) for r in RATES]
                xs = [i for i, y in enumerate(ys) if y is not None]
                ax.plot(
                    xs,
                    [ys[i] for i in xs],
                    marker="o",
                    label=CONFIGS[name],
                    color=colors[name],
                )
            ax.set_xticks(range(len(RATES)), [f"{r} req/s" for r in RATES])
            ax.set_ylabel(label)
            if rowi == 0:
                ax.set_title(STREAM_TITLE[stream], fontsize=9)
            ax.grid(alpha=0.3)
    bars = []  # (label, color, zipf cell, multiturn cell)
    for name in CONFIGS:
        policies = B2_POLICIES if name == "el-global-cache" else (None,)
        for policy in policies:
            zipf = cell_of(results, name, "zipf", CHAT_STREAMS["zipf"], policy=policy)
            turns = cell_of(
                results, name, "multiturn", CHAT_STREAMS["multiturn"], policy=policy
            )
            short_policy = {"round_robin": "rr", "cache_aware": "c-aware"}.get(
                policy, policy
            )
            tag = f"({LABEL[name]})" + (f"\n{short_policy}" if policy else "")
            if zipf or turns:
                bars.append((tag, colors[name], zipf or {}, turns or {}))
    col = len(STREAMS)
    for rowi, (label, value) in enumerate(
        (
            ("zipf: requests/s", lambda z, t: z.get("request_throughput")),
            (
                "multi-turn: TTFT p50, turns >= 2 (ms)",
                lambda z, t: (t.get("turns") or {}).get("ttft_p50_later_ms"),
            ),
            (
                "zipf: ViT images per request",
                lambda z, t: (z.get("measured") or {}).get("vit_images_per_request"),
            ),
        )
    ):
        ax = axes[rowi][col]
        ys = [value(z, t) for _, _, z, t in bars]
        ax.bar(
            range(len(bars)),
            [y or 0 for y in ys],
            color=[c for _, c, _, _ in bars],
        )
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        if rowi == 0:
            ax.set_title("repeated images (zipf, multi-turn)", fontsize=9)
    # (b2) has bars only (last column): a proxy entry names its color
    from matplotlib.patches import Patch

    handles, _ = axes[0][0].get_legend_handles_labels()
    handles.append(
        Patch(color=colors["el-global-cache"], label=CONFIGS["el-global-cache"])
    )
    axes[0][1].legend(handles=handles, fontsize=6, loc="upper left")
    fig.suptitle(
        "CPU test bed, tiny Qwen3-VL-MoE, sglang.benchmark.serving (cold runs)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class Report:
    """A benchmark's outputs: its table and plot of the results, and the markers of its
    generated block in the docs."""

    table: Callable[[dict], str]
    plot: Callable[[dict, Path], None]
    begin: str
    end: str

    def write(self, results: dict, json_path: Path, doc: Path | None) -> str:
        """The table (``.md``) and the plot (``.png``) next to ``json_path``, and the table
        between the markers of ``doc``; returns the table."""
        table = self.table(results)
        json_path.with_suffix(".md").write_text(table)
        self.plot(results, json_path.with_suffix(".png"))
        replace_doc_block(doc, self.begin, self.end, table)
        return table


REPORT = Report(render_markdown, render_plot, DOC_BEGIN, DOC_END)


def replace_doc_block(doc: Path | None, begin: str, end: str, table: str) -> None:
    """Rewrite what lies between the markers ``begin`` and ``end`` of ``doc``."""
    if doc is not None and doc.is_file():
        text = doc.read_text()
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            tail = rest.split(end, 1)[1]
            doc.write_text(f"{head}{begin}\n{table}{end}{tail}")


# ---- mixed stream: text streams decoding while an image burst arrives (issue 16 item 6) -----

# Long text streams (the same in both cells of a repeat: same seed) and a burst of single-image
# requests sent all at once MIXED_BURST_DELAY_S after the text streams start, by a second,
# concurrent client run. Image answers are short, so what the text streams see is the burst's
# encoding and prefill, not a decode batch that stays larger for long.
MIXED_TEXT_ARGS = ("--dataset-name", "random-ids", "--random-input-len", "80")
MIXED_BURST_ARGS = (*IMAGE_ARGS, "--image-count", "1", "--random-input-len", "32")
# text streams, their output tokens, burst images, their output tokens, repeats of the pair
MIXED_SIZES = {
    "full": {"streams": 8, "text_out": 384, "images": 16, "image_out": 8, "repeats": 2},
    "quick": {"streams": 4, "text_out": 96, "images": 4, "image_out": 8, "repeats": 1},
}
MIXED_BURST_DELAY_S = 1.0
MIXED_TEXT_SEED, MIXED_BURST_SEED = 3000, 3100  # + repeat index
MIXED_DOC_BEGIN = (
    "<!-- serving-mixed:begin (generated by benchmark/bench_serving_el.py --mixed) -->"
)
MIXED_DOC_END = "<!-- serving-mixed:end -->"
MIXED_GOAL = 1.2  # text TPOT p99 during the burst / without it, on (b)
# (b2) is the affinity measurement of the repeated-image streams, not part of this one
MIXED_CONFIGS = ("colocated", "colocated-x2", "el-router", "upstream-epd")


def gated_client(argv: list[str]) -> None:
    """Child process: ``sglang.benchmark.serving`` unchanged, except that its request
    generator (``get_request``) writes ``<output-file>.ready`` and waits for a line on stdin
    before its first request, and records the wall-clock time at which it issues each request
    in ``<output-file>.sends``: so two client runs start on cue and their token times share
    one clock (ttft and itls, with ``--output-details``, are relative to the send)."""
    from sglang.benchmark import serving

    out = Path(argv[argv.index("--output-file") + 1])
    original = serving.get_request

    async def gated(*args, **kwargs):
        out.with_suffix(".ready").write_text(f"{time.time():.6f}\n")
        sys.stdin.readline()
        with open(out.with_suffix(".sends"), "w") as sends:
            async for request in original(*args, **kwargs):
                sends.write(f"{time.time():.6f}\n")
                sends.flush()
                yield request

    serving.get_request = gated
    sys.argv = ["sglang.benchmark.serving", *argv]
    serving.cli_main()


def mixed_argv(
    url: str, model: Path, stream: tuple, n: int, out_len: int, seed: int, out: Path
) -> list[str]:
    return [
        "--backend",
        "sglang",
        "--base-url",
        url,
        "--model",
        str(model),
        "--tokenizer",
        str(model),
        *stream,
        "--random-output-len",
        str(out_len),
        "--random-range-ratio",
        "1",
        "--num-prompts",
        str(n),
        "--request-rate",
        "inf",
        "--seed",
        str(seed),
        "--warmup-requests",
        "0",
        "--output-details",
        "--disable-tqdm",
        "--output-file",
        str(out),
    ]


class GatedClient:
    """One ``gated_client`` child (its own process group, so SIGTERM of the benchmark stops
    it with the servers)."""

    def __init__(self, argv: list[str], log_path: Path):
        self.out = Path(argv[argv.index("--output-file") + 1])
        for suffix in (".jsonl", ".ready", ".sends"):
            self.out.with_suffix(suffix).unlink(missing_ok=True)
        self.log = open(log_path, "w")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--gated-client", *argv],
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            text=True,
        )

    def wait_ready(self, deadline: float) -> None:
        while not self.out.with_suffix(".ready").is_file():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"client exited before its first request; see {self.log.name}"
                )
            if time.time() > deadline:
                raise CellTimeout(f"client not ready; see {self.log.name}")
            time.sleep(0.05)

    def release(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()
        return time.time()

    def result(self, deadline: float) -> dict:
        try:
            self.proc.wait(max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            raise CellTimeout(f"client did not finish; see {self.log.name}") from None
        finally:
            self.stop()
        if self.proc.returncode or not self.out.is_file():
            raise RuntimeError(
                f"client failed (rc {self.proc.returncode}); see {self.log.name}"
            )
        raw = json.loads(self.out.read_text().splitlines()[-1])
        sends = [float(x) for x in self.out.with_suffix(".sends").read_text().split()]
        return {"raw": raw, "sends": sends}

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()


def request_traces(client: dict) -> list[dict]:
    """Per request: wall-clock send time, ttft and the client's itls (ms; what the JSON
    keeps)."""
    raw = client["raw"]
    return [
        {
            "send": send,
            "ttft": ttft,
            "itl_ms": [round(gap * 1e3, 3) for gap in itls],
            "ok": not err and ttft > 0,
        }
        for send, ttft, itls, err in zip(
            client["sends"], raw["ttfts"], raw["itls"], raw["errors"]
        )
    ]


def token_times(trace: dict) -> list[tuple[float, float]]:
    """(arrival on the wall clock, gap in ms) of every token after the first: send + ttft +
    the running sum of the itls."""
    t, out = trace["send"] + trace["ttft"], []
    for gap in trace["itl_ms"]:
        t += gap / 1e3
        out.append((t, gap))
    return out


def cell_name(rep: int, burst: bool) -> str:
    return f"{'burst' if burst else 'alone'}#{rep}"


def spawn_mixed_clients(
    dep: Deployment, model: Path, sizes: dict, rep: int, burst: bool, work: Path
) -> dict[str, GatedClient]:
    """The client runs of one cell, started (import, tokenizer, dataset) and left waiting at
    their start cue: the text streams, and with ``burst`` the image requests."""
    streams = {
        "text": (MIXED_TEXT_ARGS, sizes["streams"], sizes["text_out"], MIXED_TEXT_SEED)
    }
    if burst:
        streams["images"] = (
            MIXED_BURST_ARGS,
            sizes["images"],
            sizes["image_out"],
            MIXED_BURST_SEED,
        )
    folder = work / dep.name
    folder.mkdir(parents=True, exist_ok=True)
    clients = {}
    for who, (stream, n, out_len, seed) in streams.items():
        out = folder / f"mixed-{cell_name(rep, burst)}-{who}.jsonl"
        argv = mixed_argv(dep.entry.url, model, stream, n, out_len, seed + rep, out)
        clients[who] = GatedClient(argv, out.with_suffix(".log"))
        clients[who].command = (
            "python benchmark/bench_serving_el.py --gated-client "
            + shlex.join(argv).replace(str(folder), "$OUT").replace(str(REPO) + "/", "")
        )
    return clients


def mixed_cell(dep: Deployment, clients: dict[str, GatedClient], rep: int) -> dict:
    """One run of the text streams, alone or with the image burst (``clients``, waiting at
    their cue): caches flushed, text released, the burst released MIXED_BURST_DELAY_S later.
    """
    burst = "images" in clients
    flush_caches(dep)
    load_before = os.getloadavg()[0]
    try:
        deadline = time.time() + 180
        for client in clients.values():
            client.wait_ready(deadline)
        t0 = clients["text"].release()
        if burst:
            time.sleep(max(0.0, t0 + MIXED_BURST_DELAY_S - time.time()))
            clients["images"].release()
        deadline = time.time() + CELL_TIMEOUT_S
        got = {who: client.result(deadline) for who, client in clients.items()}
    finally:
        for client in clients.values():
            client.stop()
    cell = {
        "burst": burst,
        "repeat": rep,
        "load1_before": load_before,
        "load1_after": os.getloadavg()[0],
        "commands": {who: client.command for who, client in clients.items()},
    }
    for who, result in got.items():
        cell[who] = {
            "traces": request_traces(result),
            "completed": result["raw"]["completed"],
        }
    if burst:
        start, traces = cell["text"]["traces"][0]["send"], cell["images"]["traces"]
        ends = [
            tr["send"] + tr["ttft"] + sum(tr["itl_ms"]) / 1e3
            for tr in traces
            if tr["ok"]
        ]
        first = min(tr["send"] for tr in traces)
        cell["window"] = [first - start, max(ends, default=first) - start]
    return cell


def mixed_cells(sizes: dict) -> list[tuple[int, bool]]:
    """Alone, then with the burst, per repeat (the two cells of a repeat send the same text)."""
    return [(rep, burst) for rep in range(sizes["repeats"]) for burst in (False, True)]


def run_mixed(args: argparse.Namespace) -> dict:
    from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint

    t0 = time.time()
    sizes = MIXED_SIZES["quick" if args.quick else "full"]
    results = load_results(args.json)
    if args.fresh:
        for name in args.configs:
            results["configs"].pop(name, None)
    results.update(
        machine=machine_info(),
        sizes=sizes,
        burst_delay_s=MIXED_BURST_DELAY_S,
        command=shlex.join(["python", "benchmark/bench_serving_el.py", *args.argv]),
    )
    model = ensure_checkpoint(TinyVLMoeSpec())
    results["model"] = {
        "path": "epd_testbed.tiny_ckpt.TinyVLMoeSpec()",
        "dir": str(model),
    }
    work = Path(tempfile.mkdtemp(prefix="bench-serving-el-mixed-"))
    log(f"checkpoint {model}; logs and client output under {work}", t0)
    for name in args.configs:
        entry = results["configs"].setdefault(name, {"cells": {}})
        todo = [c for c in mixed_cells(sizes) if cell_name(*c) not in entry["cells"]]
        if not todo:
            log(f"{name}: all cells already in {args.json.name}, skipped", t0)
            continue
        log(f"{name}: starting {CONFIGS[name]} (load {os.getloadavg()[0]:.1f})", t0)
        dep = launch_deployment(name, model, work / "logs", args.server_threads)
        spawned = []
        try:
            entry.update(startup=dep.startup, load1_at_start=os.getloadavg()[0])
            # every cell's clients start now and wait at their cue (their start-up overlaps
            # the warm-up, which is not measured)
            for rep, burst in todo:
                spawned.append(spawn_mixed_clients(dep, model, sizes, rep, burst, work))
            run_client(
                client_argv(
                    dep.entry.url,
                    model,
                    "image1",
                    "inf",
                    WARMUP_SEED,
                    4,
                    work / "warm.jsonl",
                ),
                work / f"{name}-warmup.log",
            )
            for (rep, burst), clients in zip(todo, spawned):
                key = cell_name(rep, burst)
                cell = entry["cells"][key] = mixed_cell(dep, clients, rep)
                save_results(results, args.json, indent=None)
                s = mixed_summary([(cell, cell if burst else None)])
                log(
                    f"{name} {key}: text TPOT p50/p99 {fmt(s['tpot_p50'], '.1f')}/"
                    f"{fmt(s['tpot_p99'], '.1f')} ms, ITL max {fmt(s['itl_max'])} ms"
                    + (
                        f", images TTFT p50 {fmt(s['image_ttft_p50'])} ms, window "
                        f"{cell['window'][0]:.2f}-{cell['window'][1]:.2f} s"
                        if burst
                        else ""
                    )
                    + f" (load {cell['load1_after']:.1f})",
                    t0,
                )
                if not dep.alive():
                    raise RuntimeError(
                        f"{name}: a server died; logs under {work / 'logs'}"
                    )
        finally:
            for clients in spawned:
                for client in clients.values():
                    client.stop()
            dep.stop()
    results["wall_s_last_run"] = round(time.time() - t0, 1)
    save_results(results, args.json, indent=None)
    log(f"done; results in {args.json}", t0)
    return results


def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def mixed_summary(pairs: list[tuple[dict, dict | None]]) -> dict:
    """Pooled over ``pairs`` of (cell, the burst cell whose window applies): text streams'
    TPOT over the whole stream and over the burst window, inter-token latencies in the window;
    images: TTFT. A text-alone cell takes the window of its burst twin, at the same offsets
    from the start of its text streams."""
    streams, window_tpots, window_itls, all_itls, ttfts, images = (
        [],
        [],
        [],
        [],
        [],
        [0, 0],
    )
    for cell, twin in pairs:
        traces = cell["text"]["traces"]
        start = traces[0]["send"]
        window = (twin or {}).get("window")
        for tr in traces:
            gaps = tr["itl_ms"]
            if not tr["ok"] or not gaps:
                continue
            streams.append(sum(gaps) / len(gaps))
            all_itls += gaps
            if window:
                # every token whose wait overlaps the window
                lo, hi = start + window[0], start + window[1]
                inside = [g for t, g in token_times(tr) if t > lo and t - g / 1e3 < hi]
                if inside:
                    window_tpots.append(sum(inside) / len(inside))
                    window_itls += inside
        for tr in cell.get("images", {}).get("traces", []):
            images[0] += 1
            if tr["ok"]:
                images[1] += 1
                ttfts.append(tr["ttft"] * 1e3)
    return {
        "streams": len(streams),
        "tpot_p50": percentile(streams, 50),
        "tpot_p99": percentile(streams, 99),
        "itl_p99": percentile(all_itls, 99),
        "itl_max": max(all_itls) if all_itls else None,
        "window_tpot_p50": percentile(window_tpots, 50),
        "window_tpot_p99": percentile(window_tpots, 99),
        "window_itl_p50": percentile(window_itls, 50),
        "window_itl_p99": percentile(window_itls, 99),
        "window_itl_max": max(window_itls) if window_itls else None,
        "window_s": [
            (twin or {}).get("window", [0, 0])[1]
            - (twin or {}).get("window", [0, 0])[0]
            for _, twin in pairs
        ],
        "image_ttft_mean": sum(ttfts) / len(ttfts) if ttfts else None,
        "image_ttft_p50": percentile(ttfts, 50),
        "image_ttft_p99": percentile(ttfts, 99),
        "images_sent": images[0],
        "images_ok": images[1],
    }


def mixed_pairs(entry: dict, burst: bool) -> list[tuple[dict, dict | None]]:
    kind = "burst" if burst else "alone"
    cells = entry.get("cells", {})
    return [
        (cell, cells.get(f"burst#{cell['repeat']}"))
        for key, cell in sorted(cells.items())
        if key.startswith(kind + "#")
    ]


def repeat_ratios(entry: dict) -> list[float | None]:
    """Text TPOT p99 in the burst window, with the burst / alone, per repeat."""
    cells, out = entry.get("cells", {}), []
    for key in sorted(k for k in cells if k.startswith("burst#")):
        burst, alone = cells[key], cells.get("alone#" + key.split("#")[1])
        if alone is None:
            continue
        a = mixed_summary([(alone, burst)])["window_tpot_p99"]
        b = mixed_summary([(burst, burst)])["window_tpot_p99"]
        out.append(b / a if a and b is not None else None)
    return out


def render_mixed(results: dict) -> str:
    m, v, sz = (
        results.get("machine", {}),
        results.get("machine", {}).get("versions", {}),
        results.get("sizes", {}),
    )
    out = [
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB; sglang "
        f"{v.get('sglang')}, sglang-router {v.get('sglang-router')}, torch {v.get('torch')}, "
        f"Mooncake {v.get('mooncake-transfer-engine-non-cuda')}; fork commit `{m.get('fork_commit')}`. "
        f"Command: `{results.get('command')}` (last run {fmt(results.get('wall_s_last_run'))} s). "
        f"Text: {sz.get('streams')} streams, 80 random token ids in, {sz.get('text_out')} tokens out, "
        f"all sent at t = 0. Burst: {sz.get('images')} requests of one 224x224 image + 32 text "
        f"tokens, {sz.get('image_out')} tokens out, all sent at t = {results.get('burst_delay_s')} s "
        f"by a second client run. {sz.get('repeats')} repeats per cell, pooled. Burst window: from "
        f'the first image request sent to the last image answer\'s last token; "alone" rows use '
        f"the same window (same offsets from the text start) of the run without the burst.",
        "",
        "| config | run | text TPOT p50 / p99, whole stream (ms) | text TPOT p50 / p99 in the "
        "burst window (ms) | text ITL p50 / p99 / max in the window (ms) | image TTFT mean / p50 / "
        "p99 (ms) | images ok | window (s) | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ratios_ = []
    for name in MIXED_CONFIGS:
        entry = results.get("configs", {}).get(name)
        if not entry:
            out.append(f"| ({LABEL[name]}) {name} | not run ||||||||")
            continue
        rows = {}
        for burst in (False, True):
            pairs = mixed_pairs(entry, burst)
            if not pairs:
                continue
            s = rows[burst] = mixed_summary(pairs)
            loads = [c.get("load1_after") for c, _ in pairs]
            out.append(
                f"| ({LABEL[name]}) {name} | {'with burst' if burst else 'alone'} "
                f"| {fmt(s['tpot_p50'], '.1f')} / {fmt(s['tpot_p99'], '.1f')} "
                f"| {fmt(s['window_tpot_p50'], '.1f')} / {fmt(s['window_tpot_p99'], '.1f')} "
                f"| {fmt(s['window_itl_p50'], '.1f')} / {fmt(s['window_itl_p99'], '.1f')} / {fmt(s['window_itl_max'])} "
                + (
                    f"| {fmt(s['image_ttft_mean'])} / {fmt(s['image_ttft_p50'])} / {fmt(s['image_ttft_p99'])} "
                    f"| {s['images_ok']}/{s['images_sent']} "
                    if burst
                    else "| - | - "
                )
                + f"| {', '.join(format(w, '.2f') for w in s['window_s'])} "
                f"| {', '.join(fmt(x, '.1f') for x in loads)} |"
            )
        if len(rows) == 2:
            ratios_.append((name, rows[False], rows[True], repeat_ratios(entry)))
    out += [
        "",
        "Ratios, with the burst / alone (same deployment, same text streams):",
        "",
        "| config | text TPOT p99 in the window | same, each repeat | text TPOT p99, whole "
        "stream | text ITL p99 in the window | longest text ITL in the window (ms), alone -> "
        "with burst |",
        "|---|---|---|---|---|---|",
    ]
    goal = None
    for name, alone, burst, each in ratios_:
        r = lambda key: (
            burst[key] / alone[key] if burst[key] is not None and alone[key] else None
        )
        if name == "el-router":
            goal = r("window_tpot_p99")
        out.append(
            f"| ({LABEL[name]}) {name} | {fmt(r('window_tpot_p99'), '.2f')} "
            f"| {', '.join(fmt(x, '.2f') for x in each)} | {fmt(r('tpot_p99'), '.2f')} "
            f"| {fmt(r('window_itl_p99'), '.2f')} | {fmt(alone['window_itl_max'])} -> {fmt(burst['window_itl_max'])} |"
        )
    out += [
        "",
        f"Goal: text TPOT p99 during the burst within {MIXED_GOAL}x of the same streams alone on (b): "
        f"{verdict(goal is not None and goal <= MIXED_GOAL, goal)}.",
        "",
        "<details><summary>Exact command lines (servers as in the side-by-side run above; the "
        "clients as child processes, <code>--gated-client</code> = "
        "<code>sglang.benchmark.serving</code> with a start cue and send times)</summary>",
        "",
        "```bash",
    ]
    model = results.get("model", {}).get("dir")
    for name in MIXED_CONFIGS:
        for server, cmd in (
            results.get("configs", {})
            .get(name, {})
            .get("startup", {})
            .get("commands", {})
            .items()
        ):
            out.append(f"# ({LABEL[name]}) {server}\n" + short(cmd, model))
    seen = set()
    for entry in results.get("configs", {}).values():
        for key, cell in sorted(entry.get("cells", {}).items()):
            for who, cmd in cell.get("commands", {}).items():
                url = cmd.split("--base-url ", 1)[1].split(" ", 1)[0]
                cmd = short(cmd.replace(url, "$URL"), model)
                if cmd not in seen:
                    seen.add(cmd)
                    out.append(
                        f"# {key} {who} (URL = the configuration's entry point)\n{cmd}"
                    )
    out += ["```", "", "</details>"]
    return "\n".join(out) + "\n"


def render_mixed_plot(results: dict, path: Path) -> None:
    """Per deployment, the text streams' inter-token latencies over time (first repeat: alone
    and with the burst, window shaded, the images' first tokens marked); last panel: text TPOT
    p99 in the window, alone and with the burst."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = (
        0.5  # ms; smaller gaps are tokens the client read together, drawn at the floor
    )
    fig, axes = plt.subplots(
        1, len(MIXED_CONFIGS) + 1, figsize=(4.2 * (len(MIXED_CONFIGS) + 1), 3.8)
    )
    bars = []
    for ax, name in zip(axes, MIXED_CONFIGS):
        entry = results.get("configs", {}).get(name, {})
        cells = entry.get("cells", {})
        for key, color, label in (
            ("alone#0", "0.55", "text alone"),
            ("burst#0", "C3", "text, with the burst"),
        ):
            cell = cells.get(key)
            if not cell:
                continue
            start = cell["text"]["traces"][0]["send"]
            tokens = [tok for tr in cell["text"]["traces"] for tok in token_times(tr)]
            ax.scatter(
                [t - start for t, _ in tokens],
                [max(g, floor) for _, g in tokens],
                s=3,
                color=color,
                label=label,
                alpha=0.6,
            )
        burst = cells.get("burst#0")
        if burst:
            ax.axvspan(*burst["window"], color="C0", alpha=0.12, label="burst window")
            start = burst["text"]["traces"][0]["send"]
            firsts = [
                tr["send"] + tr["ttft"] - start
                for tr in burst["images"]["traces"]
                if tr["ok"]
            ]
            ax.scatter(
                firsts,
                [floor * 1.5] * len(firsts),
                marker="|",
                color="C0",
                label="image first tokens",
            )
        ax.set_title(CONFIGS[name], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor * 0.8)
        ax.set_xlabel("time since the text streams started (s)")
        ax.set_ylabel("text inter-token latency (ms)")
        ax.grid(alpha=0.3)
        if entry:
            bars.append(
                (
                    LABEL[name],
                    mixed_summary(mixed_pairs(entry, False)),
                    mixed_summary(mixed_pairs(entry, True)),
                )
            )
    axes[0].legend(fontsize=7, loc="upper left")
    ax = axes[-1]
    xs = range(len(bars))
    for shift, i, color, label in (
        (-0.2, 1, "0.55", "alone"),
        (0.2, 2, "C3", "with the burst"),
    ):
        ax.bar(
            [x + shift for x in xs],
            [b[i]["window_tpot_p99"] or 0 for b in bars],
            0.4,
            color=color,
            label=label,
        )
    ax.set_xticks(list(xs), [f"({b[0]})" for b in bars])
    ax.set_ylabel("text TPOT p99 in the burst window (ms)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        "Text streams decoding while an image burst arrives (CPU test bed, tiny "
        "Qwen3-VL-MoE, sglang.benchmark.serving)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


MIXED_REPORT = Report(render_mixed, render_mixed_plot, MIXED_DOC_BEGIN, MIXED_DOC_END)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated subset of {', '.join(CONFIGS)} (run in this order; default: "
        f"all, with --mixed {', '.join(MIXED_CONFIGS)})",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="few requests per cell (smoke run; separate result file)",
    )
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="discard the earlier results of the selected configurations instead of resuming",
    )
    ap.add_argument(
        "--mixed",
        action="store_true",
        help="the mixed stream instead of the cells: long text streams decoding while a burst "
        "of image requests arrives, alone and with the burst (own JSON, table, plot, doc block)",
    )
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite table, plot and doc block from the JSON",
    )
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument(
        "--no-doc",
        action="store_true",
        help=f"do not rewrite the generated block of {DOC.name} (implied by an --out-dir "
        f"other than {OUT_DIR.relative_to(REPO)}: the block shows that folder's results)",
    )
    ap.add_argument(
        "--server-threads",
        type=int,
        default=SERVER_THREADS,
        help="OMP_NUM_THREADS of every server process; 0: torch's default (default %(default)s)",
    )
    ap.add_argument(
        "--el-language-args",
        default="",
        help="extra flags of our language servers ((b), (b2); not the other deployments'), "
        "e.g. '--enable-mixed-chunk' (default: none; recorded in each server's command line)",
    )
    args = ap.parse_args(argv)
    args.argv = argv
    choices = MIXED_CONFIGS if args.mixed else tuple(CONFIGS)
    args.configs = (
        [c.strip() for c in args.configs.split(",") if c.strip()]
        if args.configs
        else list(choices)
    )
    unknown = [c for c in args.configs if c not in choices]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; choose from {list(choices)}")
    args.json = args.out_dir / (
        ("serving-cpu-mixed" if args.mixed else "serving-cpu")
        + ("-quick.json" if args.quick else ".json")
    )
    return args


def child_pids() -> list[int]:
    """This process's direct children (each server leads its own process group)."""
    me, pids = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                pids.append(int(stat.parent.name))
    return pids


def stop_servers_on_sigterm() -> None:
    """On SIGTERM (``kill``, a timeout) stop every child's process group (servers, router,
    py-spy: SIGTERM, then SIGKILL after 10 s), then exit. Done in the handler itself, so it
    works wherever the signal lands, half-started deployments included."""

    def terminate(signum, frame):
        groups = child_pids()
        for pid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and any(
            Path(f"/proc/{p}").exists() for p in groups
        ):
            time.sleep(0.2)
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
        for pid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        print(
            f"terminated by signal {signum}; stopped {len(groups)} process group(s)",
            flush=True,
        )
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--gated-client"]:  # a child of --mixed
        gated_client(argv[1:])
        return
    args = parse_args(argv)
    global EL_LANGUAGE_ARGS
    EL_LANGUAGE_ARGS = tuple(shlex.split(args.el_language_args))
    stop_servers_on_sigterm()
    measure = run_mixed if args.mixed else run
    results = load_results(args.json) if args.render_only else measure(args)
    elsewhere = args.out_dir.resolve() != OUT_DIR.resolve()
    doc = None if (args.no_doc or args.quick or elsewhere) else DOC
    print((MIXED_REPORT if args.mixed else REPORT).write(results, args.json, doc))


if __name__ == "__main__":
    main()
