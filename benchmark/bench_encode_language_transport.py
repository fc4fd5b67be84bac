"""Benchmark of the encode -> language transport for one 1024x1024-image payload.

Phases, each timed separately and as GB/s of the request's wire bytes:
  write     payload tensors -> encode-side MultimodalDataBuffers (staging)
  transfer  Mooncake write encode buffers -> language buffers (another process)
  read      language buffers -> fresh tensors (copy-out)
  e2e       sender.send() -> receiver Success + take(), through the full connection
  memcpy    torch copy of the same number of bytes on this host, for reference

Models: Qwen3-VL-30B-A3B (H=2048, K=3) and 235B-A22B (H=4096, K=3), bf16, 1024 image tokens.
Run:  .fork/venv/bin/python benchmark/bench_encode_language_transport.py [--device cuda] [--iters N]
With --device cuda the payload lives on the GPU and the host buffers are pinned.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

# One intra-op thread: on a small shared CPU, torch's parallel copies wait for a descheduled
# worker thread (~8 ms a copy under load), which measures the scheduler, not the transport.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MC_FORCE_TCP", "1")
os.environ.setdefault("MOONCAKE_PROTOCOL", "tcp")

import torch
from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.buffers import (
    MultimodalBufferConfig,
    MultimodalDataBuffers,
    MultimodalPayload,
    RoundStamp,
)
from sglang.srt.disaggregation.encode_language.connection import ConnectionConfig
from sglang.srt.disaggregation.encode_language.receiver import LanguageManager
from sglang.srt.disaggregation.encode_language.sender import EncodeManager

MODELS = {"Qwen3-VL-30B-A3B": 2048, "Qwen3-VL-235B-A22B": 4096}
IMAGE_TOKENS, TEXT_TOKENS, K, BLOCK = 1024, 0, 3, 128


def payload(hidden: int, device: str) -> MultimodalPayload:
    g = torch.Generator().manual_seed(0)
    T = IMAGE_TOKENS + TEXT_TOKENS
    mask = torch.zeros(T, dtype=torch.bool)
    mask[TEXT_TOKENS // 2 : TEXT_TOKENS // 2 + IMAGE_TOKENS] = True
    return MultimodalPayload(
        fill_ids=torch.randint(0, 150000, (T,), generator=g, dtype=torch.int32).to(
            device
        ),
        mrope_positions=torch.randint(
            0, 4096, (3, T), generator=g, dtype=torch.int32
        ).to(device),
        mm_mask=mask.to(device),
        embeddings=torch.randn(IMAGE_TOKENS, hidden, generator=g)
        .to(torch.bfloat16)
        .to(device),
        deepstack=torch.randn(IMAGE_TOKENS, K * hidden, generator=g)
        .to(torch.bfloat16)
        .to(device),
        mrope_delta=-100,
    )


def cfg(hidden: int, pin: bool) -> MultimodalBufferConfig:
    return MultimodalBufferConfig(
        hidden_size=hidden,
        deepstack_count=K,
        block_size=BLOCK,
        num_blocks=16,
        embed_dtype="bfloat16",
        pin_memory=pin,
    )


def encoder_process(conn, hidden, device, pin, iters):
    """The encode side: staging write + transfer timings, then end-to-end sends."""
    enc = EncodeManager(
        cfg(hidden, pin),
        ConnectionConfig(default_reserve_tokens=IMAGE_TOKENS + TEXT_TOKENS),
    )
    conn.send(enc.bootstrap_addr)
    lang_id, session, ptrs = conn.recv()
    p = payload(hidden, device)
    T, M = p.total_tokens, p.mm_tokens
    blocks = list(range(-(-T // BLOCK)))
    dst_blocks = list(range(len(blocks)))
    write_t, xfer_t = [], []
    for _ in range(iters):
        t = time.perf_counter()
        enc.buffers.write_range(blocks, p, 0, T, 0, M)
        write_t.append(time.perf_counter() - t)
        srcs, dsts, lens = enc.buffers.round_segments(blocks, dst_blocks, T, M, ptrs)
        t = time.perf_counter()
        assert enc.engine.batch_transfer_sync(session, srcs, dsts, lens) >= 0
        xfer_t.append(time.perf_counter() - t)
    conn.send((write_t, xfer_t, sum(lens)))
    while True:
        room = conn.recv()
        if room is None:
            break
        s = enc.create_sender(room)
        s.send(p)
        conn.send(int(s.wait(60)))
    enc.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    pin = args.device == "cuda"
    ctx = mp.get_context("spawn")
    rows = []
    for name, hidden in MODELS.items():
        lang = LanguageManager(
            cfg(hidden, pin),
            ConnectionConfig(default_reserve_tokens=IMAGE_TOKENS + TEXT_TOKENS),
        )
        a, b = ctx.Pipe()
        proc = ctx.Process(
            target=encoder_process, args=(b, hidden, args.device, pin, args.iters)
        )
        proc.start()
        enc_addr = a.recv()
        a.send((lang.manager_id, lang.session_id, lang.buffers.slot_ptrs()))
        write_t, xfer_t, nbytes = a.recv()
        T = IMAGE_TOKENS + TEXT_TOKENS
        blocks = list(range(-(-T // BLOCK)))
        read_t = []
        for _ in range(args.iters):
            t = time.perf_counter()
            out = lang.buffers.read_round(blocks, T, IMAGE_TOKENS, RoundStamp(0, 0, 0))[
                1:
            ]
            if args.device == "cuda":
                [x.to("cuda", non_blocking=True) for x in out if x is not None]
                torch.cuda.synchronize()
            read_t.append(time.perf_counter() - t)
        e2e_t = []
        for i in range(args.iters):
            room = 10_000 + i
            rx = lang.create_receiver(enc_addr, room)
            t = time.perf_counter()
            a.send(room)
            assert a.recv() == KVPoll.Success
            deadline = time.monotonic() + 60
            while rx.poll() != KVPoll.Success:
                assert (
                    time.monotonic() < deadline and rx.poll() != KVPoll.Failed
                ), rx.reason
                time.sleep(0.001)
            rx.take()
            e2e_t.append(time.perf_counter() - t)
        a.send(None)
        proc.join(30)
        lang.close()
        src = torch.empty(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        mem_t = []
        for _ in range(args.iters):
            t = time.perf_counter()
            dst.copy_(src)
            mem_t.append(time.perf_counter() - t)
        for phase, ts in (
            ("write", write_t),
            ("transfer", xfer_t),
            ("read", read_t),
            ("e2e", e2e_t),
            ("memcpy", mem_t),
        ):
            med = statistics.median(ts)
            rows.append((name, phase, nbytes, med * 1e3, nbytes / med / 1e9))
    print(f"device={args.device} pinned={pin} iters={args.iters} (median)")
    print("| model | phase | MiB | ms | GB/s |")
    print("|---|---|---:|---:|---:|")
    for name, phase, nbytes, ms, gbs in rows:
        print(f"| {name} | {phase} | {nbytes / 2**20:.2f} | {ms:.2f} | {gbs:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
