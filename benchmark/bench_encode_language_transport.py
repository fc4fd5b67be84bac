"""Benchmark of the encode -> language transport: end to end against the raw transfer-engine write.

Two processes (this one: language side; a spawned one: encode side), Mooncake between them (TCP
on loopback on the CPU test machine). Payloads (bf16, K=3, B=128):

  30B    Qwen3-VL-30B-A3B, one 1024x1024 image: 1024 image tokens, H=2048  (16.02 MiB)
  235B   Qwen3-VL-235B-A22B, the same image, H=4096                        (32.02 MiB)
  1blk   one block: 16 tokens, 8 of them image tokens, H=2048              (latency floor)

Each iteration measures, for every payload in turn (interleaved, so load changes hit all alike):

  write     EncodeManager.buffers.write_range of the whole payload (staging; no checksum, as in
            a round on healthy blocks)
  raw       one transfer-engine batch write of the same bytes (the round's segments), encoder ->
            the language process's registered buffers
  read      LanguageManager.buffers.read_round of those blocks into the request's tensors
            (stamp checks, copy; no checksum)
  memcpy    one host copy of the same bytes (the floor of each of the two copies the design
            makes: payload -> encode blocks, language blocks -> the request's tensors)
  e2e       sender.send() in the encoder process until the language receiver is Success and
            take() returned (both clocks are CLOCK_MONOTONIC); the request was announced and
            the receiver reserved beforehand (in serving that happens before the ViT runs)
  zmq_rtt   one ZMQ PUSH/PULL ping-pong between the same two processes (per iteration)

Reported: median, min and max over --iters; e2e / raw, e2e / max(write, raw, read),
e2e / (write + raw + read) and e2e / (raw + 2 memcpy) from the medians. The load average is printed with the results.

Run:  .fork/venv/bin/python benchmark/bench_encode_language_transport.py [--iters 20] [--json F]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

# One intra-op thread: on a small shared CPU, torch's parallel copies wait for a descheduled
# worker thread (~8 ms a copy under load), which measures the scheduler, not the transport.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MC_FORCE_TCP", "1")
os.environ.setdefault("MOONCAKE_PROTOCOL", "tcp")

import torch
import zmq
from sample_stats import summary

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language.buffers import (
    MultimodalBufferConfig,
    RoundStamp,
)
from sglang.srt.disaggregation.encode_language.connection import ConnectionConfig
from sglang.srt.disaggregation.encode_language.manifest import RequestShape
from sglang.srt.disaggregation.encode_language.payload import (
    MultimodalPayload,
    alloc_received,
)
from sglang.srt.disaggregation.encode_language.receiver import LanguageManager
from sglang.srt.disaggregation.encode_language.round_plan import (
    region_base,
    round_segments,
)
from sglang.srt.disaggregation.encode_language.sender import EncodeManager

K, BLOCK = 3, 128
# name -> (hidden size, tokens, image tokens)
PAYLOADS = {
    "30B": (2048, 1024, 1024),
    "235B": (4096, 1024, 1024),
    "1blk": (2048, 16, 8),
}


def payload(hidden: int, total: int, mm: int, device: str = "cpu") -> MultimodalPayload:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(total, dtype=torch.bool)
    mask[(total - mm) // 2 : (total - mm) // 2 + mm] = True
    return MultimodalPayload(
        fill_ids=torch.randint(0, 150000, (total,), generator=g, dtype=torch.int32).to(
            device
        ),
        mrope_positions=torch.randint(
            0, 4096, (3, total), generator=g, dtype=torch.int32
        ).to(device),
        mm_mask=mask.to(device),
        embeddings=torch.randn(mm, hidden, generator=g).to(torch.bfloat16).to(device),
        deepstack=torch.randn(mm, K * hidden, generator=g)
        .to(torch.bfloat16)
        .to(device),
        mrope_delta=-100,
    )


def wire_bytes():
    return {
        k: buffer_config(h).layout().wire_bytes(t, m)
        for k, (h, t, m) in PAYLOADS.items()
    }


def hidden_sizes():
    return sorted({h for h, _, _ in PAYLOADS.values()})


def buffer_config(hidden: int) -> MultimodalBufferConfig:
    return MultimodalBufferConfig(
        hidden_size=hidden,
        deepstack_count=K,
        block_size=BLOCK,
        num_blocks=16,
        embed_dtype="bfloat16",
    )


def conn_config() -> ConnectionConfig:
    return ConnectionConfig(default_reserve_tokens=1024)


def wait_done(transfer, timeout_s: float) -> int:
    """Poll a sender or receiver, as a scheduler does, until Success or Failed (or the
    timeout); its status. Polled every 50 us: that is the resolution of the e2e times.
    """
    deadline = time.monotonic() + timeout_s
    while transfer.poll() not in (KVPoll.Success, KVPoll.Failed):
        if time.monotonic() > deadline:
            break
        time.sleep(50e-6)
    return transfer.poll()


def encoder_process(conn, zmq_ports, payloads):
    """The encode side: staging + raw writes on request, end-to-end sends, ZMQ echo."""
    for key in set(PAYLOADS) - set(payloads.split(",")):
        del PAYLOADS[key]
    mgrs = {h: EncodeManager(buffer_config(h), conn_config()) for h in hidden_sizes()}
    conn.send({h: m.bootstrap_addr for h, m in mgrs.items()})
    dest = conn.recv()  # hidden -> (session id, slot ptrs)
    payloads = {k: payload(h, t, m) for k, (h, t, m) in PAYLOADS.items()}
    senders = {}
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(f"tcp://127.0.0.1:{zmq_ports[0]}")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{zmq_ports[1]}")
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        if cmd[0] == "raw":
            _, key = cmd
            h = PAYLOADS[key][0]
            enc, p = mgrs[h], payloads[key]
            T, M = p.total_tokens, p.mm_tokens
            blocks = list(range(-(-T // BLOCK)))
            t = time.perf_counter()
            enc.buffers.write_range(blocks, p, 0, T, 0, M, checksum=False)
            w = time.perf_counter() - t
            session, ptrs = dest[h]
            segs = round_segments(
                enc.buffers.block_layout,
                enc.buffers.region.data_ptr(),
                blocks,
                region_base(ptrs),
                blocks,
                T,
                M,
            )
            t = time.perf_counter()
            assert enc.engine.batch_transfer_sync(session, *segs) >= 0
            x = time.perf_counter() - t
            conn.send((w, x, sum(segs[2])))
        elif cmd[0] == "create":  # the request arrives: its shape is announced
            _, key, room = cmd
            p = payloads[key]
            shape = RequestShape(p.total_tokens, p.mm_tokens, p.items)
            senders[room] = mgrs[PAYLOADS[key][0]].create_sender(room, shape)
            conn.send("ok")
        elif cmd[0] == "e2e":
            _, key, room = cmd
            s = senders.pop(room)
            deadline = time.monotonic() + 30
            while s.poll() != KVPoll.WaitingForInput:  # every destination reserved
                assert time.monotonic() < deadline and s.poll() != KVPoll.Failed
                time.sleep(0.0005)
            time.sleep(
                0.002
            )  # as in serving (the ViT runs): wake-ups so far are not ours
            t0 = time.perf_counter()
            s.send(payloads[key])
            status = wait_done(s, 60)
            conn.send((t0, int(status)))
        elif cmd[0] == "ping":
            for _ in range(cmd[1]):
                push.send(pull.recv())
            conn.send("ok")
    for m in mgrs.values():
        m.close()
    pull.close()
    push.close()
    ctx.term()


def stats(xs):
    """``sample_stats.summary`` in milliseconds (the keys this benchmark's JSON has used)."""
    s = summary(xs)
    return {f"{k}_ms": s[f"{k}_s"] * 1e3 for k in ("median", "min", "max")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--payloads", default=",".join(PAYLOADS))
    args = ap.parse_args()
    for key in set(PAYLOADS) - set(args.payloads.split(",")):
        del PAYLOADS[key]
    ctx = mp.get_context("spawn")
    zctx = zmq.Context()
    push = zctx.socket(zmq.PUSH)
    pull = zctx.socket(zmq.PULL)
    ports = (push.bind_to_random_port("tcp://127.0.0.1"),)
    ports += (pull.bind_to_random_port("tcp://127.0.0.1"),)
    langs = {
        h: LanguageManager(buffer_config(h), conn_config()) for h in hidden_sizes()
    }
    a, b = ctx.Pipe()
    proc = ctx.Process(target=encoder_process, args=(b, ports, args.payloads))
    proc.start()
    enc_addr = a.recv()
    a.send({h: (m.session_id, m.buffers.slot_ptrs()) for h, m in langs.items()})
    samples = {
        k: {p: [] for p in ("write", "raw", "read", "e2e", "memcpy")} for k in PAYLOADS
    }
    flat = {
        k: (torch.ones(wire, dtype=torch.uint8), torch.empty(wire, dtype=torch.uint8))
        for k, wire in wire_bytes().items()
    }
    rtt = []
    nbytes = {}
    room = 10_000
    load_before = os.getloadavg()
    for it in range(args.warmup + args.iters):
        keep = it >= args.warmup
        for key, (h, T, M) in PAYLOADS.items():
            lang = langs[h]
            a.send(("raw", key))
            w, x, nbytes[key] = a.recv()
            blocks = list(range(-(-T // BLOCK)))
            t = time.perf_counter()
            lang.buffers.read_round(
                blocks,
                T,
                M,
                RoundStamp(0, 0, 0),
                out=alloc_received(lang.layout, T, M),
                verify=False,
            )
            r = time.perf_counter() - t
            t = time.perf_counter()
            flat[key][1].copy_(flat[key][0])
            c = time.perf_counter() - t
            room += 1
            rx = lang.create_receiver(enc_addr[h], room)
            a.send(("create", key, room))
            assert a.recv() == "ok"
            deadline = time.monotonic() + 30
            while rx.poll() != KVPoll.WaitingForInput:  # reserved: not part of e2e
                assert time.monotonic() < deadline and rx.poll() != KVPoll.Failed
                time.sleep(0.0005)
            a.send(("e2e", key, room))
            assert wait_done(rx, 60) == KVPoll.Success, rx.reason
            data = rx.take()
            t1 = time.perf_counter()
            t0, status = a.recv()
            assert status == KVPoll.Success and data.embeddings.shape[0] == M
            # Freed here, not when the next iteration's take() replaces it: unmapping a
            # 32 MiB request costs ~2 ms, which would land in the next payload's e2e.
            del data
            if keep:
                for name, v in (("write", w), ("raw", x), ("read", r), ("memcpy", c)):
                    samples[key][name].append(v)
                samples[key]["e2e"].append(t1 - t0)
        a.send(("ping", 5))
        for _ in range(5):
            t = time.perf_counter()
            push.send(b"p")
            pull.recv()
            if keep:
                rtt.append(time.perf_counter() - t)
        assert a.recv() == "ok"
    load_after = os.getloadavg()
    a.send(None)
    proc.join(30)
    for m in langs.values():
        m.close()
    push.close()
    pull.close()
    zctx.term()

    out = {
        "iters": args.iters,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "zmq_rtt": stats(rtt),
        "payloads": {},
    }
    print(
        f"iters={args.iters} (interleaved; median "
        f"[min, max]); load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(
        "| payload | MiB | write ms | raw TE write ms | read ms | e2e ms | memcpy ms "
        "| e2e/raw | e2e/max(w,raw,r) | e2e/sum | e2e/(raw+2 memcpy) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in PAYLOADS:
        st = {p: stats(v) for p, v in samples[key].items()}
        med = {p: st[p]["median_ms"] for p in st}
        ratios = {
            "e2e_over_raw": med["e2e"] / med["raw"],
            "e2e_over_max": med["e2e"] / max(med["write"], med["raw"], med["read"]),
            "e2e_over_sum": med["e2e"] / (med["write"] + med["raw"] + med["read"]),
            "e2e_over_floor": med["e2e"] / (med["raw"] + 2 * med["memcpy"]),
        }
        out["payloads"][key] = {"bytes": nbytes[key], **st, **ratios}

        def cell(p):
            s = st[p]
            return f"{s['median_ms']:.2f} [{s['min_ms']:.2f}, {s['max_ms']:.2f}]"

        print(
            f"| {key} | {nbytes[key] / 2**20:.2f} | {cell('write')} | {cell('raw')} | "
            f"{cell('read')} | {cell('e2e')} | {cell('memcpy')} | "
            f"{ratios['e2e_over_raw']:.2f} | {ratios['e2e_over_max']:.2f} | "
            f"{ratios['e2e_over_sum']:.2f} | {ratios['e2e_over_floor']:.2f} |"
        )
    z = out["zmq_rtt"]
    one = out["payloads"].get("1blk")
    e = one["e2e"] if one else {"median_ms": 0, "min_ms": 0, "max_ms": 0}
    print(
        f"latency floor: 1-block e2e {e['median_ms'] * 1e3:.0f} us "
        f"[{e['min_ms'] * 1e3:.0f}, {e['max_ms'] * 1e3:.0f}] vs ZMQ ping-pong "
        f"{z['median_ms'] * 1e3:.0f} us [{z['min_ms'] * 1e3:.0f}, {z['max_ms'] * 1e3:.0f}]"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
