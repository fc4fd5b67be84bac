"""GPU side of the transport benchmark: CUDA payloads through pinned MultimodalDataBuffers.

Runs where SGLang itself cannot be installed (the lent GPU machine: torch, numpy, msgspec only):
the `encode_language` package is loaded from this checkout without importing `sglang/__init__`.
For the 30B-A3B and 235B-A22B payloads of one 1024x1024 image (1024 image tokens, K=3, bf16) it
times, with CUDA events / synchronised host clocks, median of --iters:

  write      GPU payload -> pinned encode buffers (MultimodalDataBuffers.write_request: D2H)
  read+h2d   pinned language buffers -> fresh GPU tensors (read_round(device="cuda"))
  d2h_pin    one contiguous D2H copy of the same bytes into pinned memory   (physical limit)
  h2d_pin    one contiguous H2D copy of the same bytes from pinned memory   (physical limit)
  d2h_page   the same D2H copy into pageable memory                         (what pinning buys)
  memcpy     host-to-host copy of the same bytes                            (CPU limit)

The Mooncake transfer between hosts is measured by bench_encode_language_transport.py.
Run: python benchmark/bench_encode_language_device.py [--iters 20] [--out results.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PKG = "sglang.srt.disaggregation.encode_language"
MODELS = {"Qwen3-VL-30B-A3B": 2048, "Qwen3-VL-235B-A22B": 4096}
IMAGE_TOKENS, K, BLOCK = 1024, 3, 128


def load_transport():
    """Import encode_language.{manifest,buffers} from python/ without sglang's package __init__."""
    try:
        import sglang.srt.disaggregation.encode_language.buffers as buffers  # noqa: F401

        return buffers
    except ImportError:
        pass
    parts = PKG.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        mod = types.ModuleType(name)
        mod.__path__ = [str(REPO / "python" / Path(*parts[:i]))]
        sys.modules[name] = mod
    for sub in ("manifest", "buffers"):
        path = REPO / "python" / Path(*parts) / f"{sub}.py"
        spec = importlib.util.spec_from_file_location(f"{PKG}.{sub}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[f"{PKG}.buffers"]


def timed(fn, iters: int, cuda: bool) -> float:
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def run(iters: int) -> list[tuple]:
    buffers = load_transport()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    rows = []
    for model, hidden in MODELS.items():
        g = torch.Generator().manual_seed(0)
        T = IMAGE_TOKENS
        payload = buffers.MultimodalPayload(
            fill_ids=torch.randint(0, 150000, (T,), generator=g, dtype=torch.int32).to(
                dev
            ),
            mrope_positions=torch.randint(
                0, 4096, (3, T), generator=g, dtype=torch.int32
            ).to(dev),
            mm_mask=torch.ones(T, dtype=torch.bool, device=dev),
            embeddings=torch.randn(T, hidden, generator=g).to(torch.bfloat16).to(dev),
            deepstack=torch.randn(T, K * hidden, generator=g)
            .to(torch.bfloat16)
            .to(dev),
            mrope_delta=-100,
        )
        cfg = buffers.MultimodalBufferConfig(
            hidden_size=hidden,
            deepstack_count=K,
            block_size=BLOCK,
            num_blocks=T // BLOCK,
            embed_dtype="bfloat16",
            pin_memory=cuda,
        )
        enc, lang = buffers.MultimodalDataBuffers(cfg), buffers.MultimodalDataBuffers(
            cfg
        )
        blocks = list(range(T // BLOCK))
        enc.write_request(blocks, payload)
        for s, d in zip(enc.slots(), lang.slots()):
            d.copy_(s)  # stands in for the Mooncake write (measured elsewhere)
        stamp = buffers.RoundStamp(room=0, generation=0, first_block=0)
        got = lang.read_round(blocks, T, T, stamp)
        assert torch.equal(got.embeddings, payload.embeddings.cpu())
        assert torch.equal(got.deepstack, payload.deepstack.cpu())
        assert torch.equal(got.fill_ids, payload.fill_ids.cpu())
        assert torch.equal(got.mrope_positions, payload.mrope_positions.cpu())
        nbytes = (payload.embeddings.numel() + payload.deepstack.numel()) * 2 + T * 16

        def read_h2d():
            got = lang.read_round(blocks, T, T, stamp, device=dev)
            got.mrope_positions.to(dev)

        flat_dev = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        flat_pin = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        flat_page = torch.empty(nbytes, dtype=torch.uint8)
        flat_page2 = torch.empty(nbytes, dtype=torch.uint8)
        flat_page.fill_(1)
        row = [
            model,
            nbytes,
            timed(lambda: enc.write_request(blocks, payload), iters, cuda),
            timed(read_h2d, iters, cuda),
            timed(lambda: flat_pin.copy_(flat_dev), iters, cuda),
            timed(lambda: flat_dev.copy_(flat_pin), iters, cuda),
            timed(lambda: flat_page.copy_(flat_dev), iters, cuda),
            timed(lambda: flat_page2.copy_(flat_page), iters, False),
        ]
        rows.append(tuple(row))
        print(f"[{model}] done", file=sys.stderr, flush=True)
    return rows


def table(rows, device_name: str) -> str:
    cols = ["write", "read+h2d", "d2h_pin", "h2d_pin", "d2h_page", "memcpy"]
    out = [
        f"Device: {device_name}; median times, GB/s = payload bytes / time; ratio = write or read vs the pinned copy",
        "",
        "| payload | MiB | "
        + " | ".join(f"{c} ms (GB/s)" for c in cols)
        + " | write efficiency (d2h_pin / write) | read efficiency (h2d_pin / read+h2d) |",
        "|---|---:|" + "---:|" * (len(cols) + 2),
    ]
    for model, nbytes, *ts in rows:
        cells = [f"{t * 1e3:.2f} ({nbytes / t / 1e9:.1f})" for t in ts]
        out.append(
            f"| {model} | {nbytes / 2**20:.1f} | "
            + " | ".join(cells)
            + f" | {ts[2] / ts[0]:.2f} | {ts[3] / ts[1]:.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    name = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else "CPU (no CUDA: pageable buffers)"
    )
    text = table(run(args.iters), name)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
