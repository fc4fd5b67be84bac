"""Where a language request keeps its received rows: the copies that keeping them in pinned host
memory costs (issue 16 item 4; docs/benchmarks-gpu.md, "Received rows").

Torch only (runs on the lent GPU machine without SGLang). For the rows of one 1024x1024 image
(1024 rows of (1+K)*H bf16, K = 3: 16 MiB for Qwen3-VL-30B-A3B, 32 MiB for 235B-A22B), median
[min, max] of --iters after a warm-up, each op timed with CUDA events on its stream unless said:

  d2h_cur      device rows -> pinned host, on the current stream            (rows_to_host)
  d2h_side     the same on a side stream
  h2d          pinned host rows -> device, one contiguous copy              (stage_rows)
  h2d_split    upstream's path for host rows, the before: the embedding and deepstack column
               views of the pinned rows each .to(cuda) (a strided host gather, then a copy from
               pageable memory); host clock, synchronised
  fwd          a stand-in forward (a chain of bf16 matrix products on the forward stream) alone
  fwd+d2h_same the forward, then the D2H queued behind it on the same stream (end to end)
  fwd+d2h_side the forward and the D2H on a side stream, started together (end to end)
  wait_side    host clock: queue the forward, then the D2H on a side stream, then wait for the
               D2H's event (what a scheduler thread would block for if it synchronised)

Run: python3 benchmark/bench_rows_residency.py [--iters 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

MODELS = {"Qwen3-VL-30B-A3B": 2048, "Qwen3-VL-235B-A22B": 4096}
ROWS, K = 1024, 3


def summary(xs):
    return {"median_ms": statistics.median(xs), "min_ms": min(xs), "max_ms": max(xs)}


def event_ms(fn, stream):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
        enable_timing=True
    )
    torch.cuda.synchronize()
    start.record(stream)
    with torch.cuda.stream(stream):
        fn()
    end.record(stream)
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def host_ms(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def run(H: int, iters: int, chain: int) -> dict:
    width = (1 + K) * H
    dev = torch.randn(ROWS, width, device="cuda").to(torch.bfloat16)
    host = torch.empty(ROWS, width, dtype=torch.bfloat16, pin_memory=True)
    host.copy_(dev)
    out = torch.empty_like(dev)
    cur, side, fwd = (
        torch.cuda.current_stream(),
        torch.cuda.Stream(),
        torch.cuda.Stream(),
    )
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def forward():
        y = x
        for _ in range(chain):
            y = torch.tanh(y @ x)
        return y

    def two_streams(same: bool):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
            enable_timing=True
        )
        torch.cuda.synchronize()
        start.record(fwd)
        with torch.cuda.stream(fwd):
            forward()
        if same:
            with torch.cuda.stream(fwd):
                host.copy_(dev, non_blocking=True)
        else:
            side.wait_event(start)
            with torch.cuda.stream(side):
                host.copy_(dev, non_blocking=True)
            fwd.wait_stream(side)
        end.record(fwd)
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def wait_side():
        with torch.cuda.stream(fwd):
            forward()
        t0 = time.perf_counter()
        with torch.cuda.stream(side):
            host.copy_(dev, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        done.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        return ms

    def h2d_split():
        out[:, :H].copy_(host[:, :H].to("cuda"))
        out[:, H:].copy_(host[:, H:].to("cuda"))

    ops = {
        "d2h_cur": lambda: event_ms(lambda: host.copy_(dev, non_blocking=True), cur),
        "d2h_side": lambda: event_ms(lambda: host.copy_(dev, non_blocking=True), side),
        "h2d": lambda: event_ms(lambda: out.copy_(host, non_blocking=True), cur),
        "h2d_split": lambda: host_ms(h2d_split),
        "fwd": lambda: event_ms(forward, fwd),
        "fwd+d2h_same": lambda: two_streams(True),
        "fwd+d2h_side": lambda: two_streams(False),
        "wait_side": wait_side,
    }
    samples = {k: [] for k in ops}
    for i in range(iters + 5):
        for name, fn in ops.items():
            ms = fn()
            if i >= 5:
                samples[name].append(ms)
    # the copies are byte-exact both ways
    back = torch.empty_like(dev)
    host.copy_(dev, non_blocking=True)
    back.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back.view(torch.uint8), dev.view(torch.uint8))
    nbytes = dev.numel() * dev.element_size()
    res = {k: summary(v) for k, v in samples.items()}
    res["bytes"] = nbytes
    for k in ("d2h_cur", "d2h_side", "h2d"):
        res[k]["GBps"] = nbytes / res[k]["median_ms"] / 1e6
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument(
        "--chain", type=int, default=20, help="products in the stand-in forward"
    )
    ap.add_argument("--json")
    args = ap.parse_args()
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "iters": args.iters,
        "chain": args.chain,
        "models": {m: run(H, args.iters, args.chain) for m, H in MODELS.items()},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(results["device"], results["torch"], f"iters={args.iters}")
    names = [k for k in results["models"]["Qwen3-VL-30B-A3B"] if k != "bytes"]
    print(f"{'op':14s}" + "".join(f"{m:>36s}" for m in results["models"]))
    for k in names:
        row = f"{k:14s}"
        for m, r in results["models"].items():
            s = r[k]
            row += f"{s['median_ms']:>12.3f} [{s['min_ms']:.3f}, {s['max_ms']:.3f}] ms"
        print(row)


if __name__ == "__main__":
    main()
