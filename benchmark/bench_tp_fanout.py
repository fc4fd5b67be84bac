"""The language side's TP fan-out, measured: one broadcast of a payload across the TP group.

A language server receives each request's multimodal payload once (rank 0) and fans it out over
its TP group, instead of the encode side sending one copy per rank. This times that fan-out
(one process per rank, torch.distributed) against the network time it saves:
``bytes x (N - 1) / NIC rate`` (the encode NIC sends one copy instead of N).

Paths (each one: barrier, then the broadcast; per iteration the slowest rank's time;
median / min / max over ``--iters``; every iteration poisons the receivers' buffers and the last
one checks the received bytes against the sender's, byte for byte):

  nccl       device tensor -> device tensors over NCCL (the device group)          [GPU]
  gloo_h2d   pinned host tensor -> host tensors over gloo, then H2D on every rank
             (the host round trip the device group avoids)                          [GPU]
  h2d        the H2D copy alone, rank 0 (pinned; reference)                         [GPU]
  gloo       host tensor -> host tensors over gloo                                  [CPU]

Run:  python benchmark/bench_tp_fanout.py --out-dir results/fanout   (GPU: nccl, gloo_h2d, h2d)
      python benchmark/bench_tp_fanout.py --paths gloo --out-dir results/fanout_cpu
NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 is set unless the caller set it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sample_stats import summary

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def payload(nbytes: int) -> torch.Tensor:
    """The sender's bytes, reproducible on every rank for the byte-for-byte check."""
    g = torch.Generator().manual_seed(nbytes)
    return torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8)


class Group:
    """One rank's view: its device, the NCCL group (GPU) and a gloo group (always)."""

    def __init__(self, rank: int, world: int, port: int, cuda: bool):
        self.rank, self.world, self.cuda = rank, world, cuda
        self.device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=120),
            **({"device_id": self.device} if cuda else {}),
        )
        self.gloo = dist.new_group(backend="gloo") if cuda else dist.group.WORLD

    def barrier(self):
        if self.cuda:
            dist.barrier(device_ids=[self.rank])
            torch.cuda.synchronize()
        else:
            dist.barrier()

    def slowest(self, seconds: list[float]) -> list[float]:
        t = torch.tensor(seconds, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.gloo)
        return t.tolist()


def time_nccl(
    g: Group, src: torch.Tensor, iters: int
) -> tuple[list[float], torch.Tensor]:
    buf = src.to(g.device) if g.rank == 0 else torch.empty_like(src, device=g.device)
    samples = []
    for _ in range(iters):
        if g.rank:
            buf.fill_(0xA5)
        g.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
            enable_timing=True
        )
        start.record()
        dist.broadcast(buf, 0)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return samples, buf.cpu()


def time_gloo(
    g: Group, src: torch.Tensor, iters: int, h2d: bool
) -> tuple[list[float], torch.Tensor]:
    host = src.clone() if g.rank == 0 else torch.empty_like(src)
    if h2d:
        host = host.pin_memory()
        dev = torch.empty_like(src, device=g.device)
    samples = []
    for _ in range(iters):
        if g.rank:
            host.fill_(0xA5)
        g.barrier()
        t0 = time.perf_counter()
        dist.broadcast(host, 0, group=g.gloo)
        if h2d:
            dev.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return samples, (dev.cpu() if h2d else host)


def time_h2d(
    g: Group, src: torch.Tensor, iters: int
) -> tuple[list[float], torch.Tensor]:
    host = src.pin_memory()
    dev = torch.empty_like(src, device=g.device)
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
            enable_timing=True
        )
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return samples, dev.cpu()


def worker(rank: int, args, port: int, queue) -> None:
    g = Group(rank, args.world_size, port, cuda=any(p != "gloo" for p in args.paths))
    rows = []
    for mib in args.sizes_mib:
        nbytes = int(mib * MiB)
        src = payload(nbytes)
        for path in args.paths:
            if path == "h2d" and rank:
                continue
            fn = {
                "nccl": lambda: time_nccl(g, src, args.warmup + args.iters),
                "gloo": lambda: time_gloo(g, src, args.warmup + args.iters, h2d=False),
                "gloo_h2d": lambda: time_gloo(
                    g, src, args.warmup + args.iters, h2d=True
                ),
                "h2d": lambda: time_h2d(g, src, args.warmup + args.iters),
            }[path]
            samples, got = fn()
            assert torch.equal(
                got, src
            ), f"rank {rank}: {path} delivered different bytes ({mib} MiB)"
            samples = samples[args.warmup :]
            if path != "h2d":
                samples = g.slowest(samples)
            rows.append({"path": path, "bytes": nbytes, **summary(samples)})
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def machine(cuda: bool) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    info["cpus"] = os.cpu_count()
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return info


def report(result: dict) -> str:
    m, a = result["machine"], result["args"]
    saves = f"network time saved = bytes x (TP-1) / {a['nic_gbps']:g} GB/s at TP={a['tp']} (estimated)"
    out = [
        f"Machine: {m.get('gpu', 'CPU')} x{a['world_size']} ranks; torch {m['torch']}, NCCL {m.get('nccl')}; "
        f"{m['cpus']} CPUs",
        f"Broadcast from rank 0 across {a['world_size']} ranks (measured; slowest rank per iteration); {saves}",
        "",
        "| path | MiB | median ms | min ms | max ms | GB/s (bytes / median) | network time saved ms | saved / fan-out |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        saved = r["bytes"] * (a["tp"] - 1) / (a["nic_gbps"] * 1e9)
        out.append(
            f"| {r['path']} | {r['bytes'] / MiB:g} | {r['median_s'] * 1e3:.3f} | {r['min_s'] * 1e3:.3f}"
            f" | {r['max_s'] * 1e3:.3f} | {r['bytes'] / r['median_s'] / 1e9:.1f} | {saved * 1e3:.2f}"
            f" | {saved / r['median_s']:.1f}x |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", nargs="+", choices=["nccl", "gloo_h2d", "h2d", "gloo"])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--sizes-mib", type=float, nargs="+", default=[16, 32])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument(
        "--tp", type=int, default=8, help="TP size whose network fan-out is saved"
    )
    ap.add_argument("--nic-gbps", type=float, default=25.0, help="GB/s per NIC")
    ap.add_argument("--out-dir", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    cuda = torch.cuda.is_available()
    if args.paths is None:
        args.paths = ["nccl", "gloo_h2d", "h2d"] if cuda else ["gloo"]
    if any(p != "gloo" for p in args.paths) and not cuda:
        ap.error(f"paths {args.paths} need CUDA; on this machine use --paths gloo")
    if cuda and torch.cuda.device_count() < args.world_size:
        ap.error(
            f"--world-size {args.world_size} needs as many GPUs; {torch.cuda.device_count()} visible"
        )

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        worker,
        args=(args, free_port(), queue),
        nprocs=args.world_size,
        start_method="spawn",
    )
    result = {
        "machine": machine(cuda),
        "args": {k: v for k, v in vars(args).items() if not isinstance(v, Path)},
        "rows": queue.get(),
    }
    text = report(result)
    print(text)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "tp_fanout.json").write_text(json.dumps(result, indent=1))
        (args.out_dir / "tp_fanout.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
