"""GPU side of the transport benchmark: CUDA payloads through pinned MultimodalDataBuffers.

Runs where SGLang itself cannot be installed (the lent GPU machine: torch, numpy, msgspec only):
the `encode_language` package is loaded from this checkout without importing `sglang/__init__`.
For the 30B-A3B and 235B-A22B payloads of one 1024x1024 image (1024 image tokens, K=3, bf16) it
times, with CUDA events / synchronised host clocks, median of --iters:

  write       GPU payload -> pinned encode buffers (write_request: D2H + bitmap + checksums)
  read_host   pinned language buffers -> the request's pinned host tensors (read_round(out=
              alloc_received(pin_memory=True)): stamp checks, copy, checksums)
  read_dev    the same into GPU tensors (alloc_received(device="cuda"): H2D)
  (each with PIECE_BLOCKS = 2, the default, and 0 = one copy per slot for the whole run)
  d2h_pin     one contiguous D2H copy of the same bytes into pinned memory   (physical limit)
  h2d_pin     one contiguous H2D copy of the same bytes from pinned memory   (physical limit)
  memcpy_pin  pinned host-to-host copy of the same bytes                     (CPU limit)
  d2h_page    the same D2H copy into pageable memory                         (what pinning buys)
  xxh3        XXH3-64 of the same bytes on the host                          (checksum cost)

The Mooncake transfer between hosts is measured by bench_encode_language_transport.py.
Run: python benchmark/bench_encode_language_device.py [--iters 20] [--out results.md] [--json r.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import xxhash

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


def run(iters: int) -> list[dict]:
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

        def read_into(device, pin):
            dst = buffers.alloc_received(lang.layout, T, T, device, pin)
            return lang.read_round(
                blocks, T, T, stamp, out=buffers.slice_received(dst, 0, T, 0, T)
            )

        for device, pin in ((None, cuda), (dev, False)):
            got = read_into(device, pin)
            assert torch.equal(got.embeddings.to(dev), payload.embeddings)
            assert torch.equal(got.deepstack.to(dev), payload.deepstack)
            assert torch.equal(got.fill_ids.to(dev), payload.fill_ids)
            assert torch.equal(got.mrope_positions.to(dev), payload.mrope_positions)
        nbytes = (payload.embeddings.numel() + payload.deepstack.numel()) * 2 + T * 16
        flat_dev = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        flat_pin = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        flat_pin2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        flat_page = torch.empty(nbytes, dtype=torch.uint8)
        flat_pin.fill_(1)
        flat_np = flat_pin.numpy()
        row = {"model": model, "bytes": nbytes}

        def copies(prefix: str, pieces) -> None:
            """Staging and read (into pinned host / device) for each piece size."""
            for piece in pieces:
                buffers.PIECE_BLOCKS = piece
                tag = f"{prefix}p{piece}"
                row[f"write_{tag}"] = timed(
                    lambda: enc.write_request(blocks, payload), iters, cuda
                )
                row[f"read_host_{tag}"] = timed(
                    lambda: read_into(None, cuda), iters, cuda
                )
                row[f"read_dev_{tag}"] = timed(
                    lambda: read_into(dev, False), iters, cuda
                )

        copies("", (buffers.PIECE_BLOCKS, 0))
        # The same with the checksum switched off on both sides: what the copies alone cost.
        real = buffers.MultimodalDataBuffers._checksum
        buffers.MultimodalDataBuffers._checksum = lambda *a: 0
        enc.write_request(blocks, payload)
        for s, d in zip(enc.slots(), lang.slots()):
            d.copy_(s)
        copies("nock_", (2, 0))
        buffers.MultimodalDataBuffers._checksum = real
        buffers.PIECE_BLOCKS = 2
        row["d2h_pin"] = timed(lambda: flat_pin.copy_(flat_dev), iters, cuda)
        row["h2d_pin"] = timed(lambda: flat_dev.copy_(flat_pin), iters, cuda)
        row["d2h_page"] = timed(lambda: flat_page.copy_(flat_dev), iters, cuda)
        row["memcpy_pin"] = timed(lambda: flat_pin2.copy_(flat_pin), iters, False)
        row["xxh3"] = timed(lambda: xxhash.xxh3_64_intdigest(flat_np), iters, False)
        rows.append(row)
        print(f"[{model}] done", file=sys.stderr, flush=True)
    return rows


def table(rows, device_name: str) -> str:
    cols = [
        ("write_p2", "write (staging)"),
        ("read_host_p2", "read -> pinned host"),
        ("read_dev_p2", "read -> GPU"),
        ("write_p0", "write, whole runs"),
        ("read_dev_p0", "read -> GPU, whole runs"),
        ("write_nock_p2", "write, no checksum"),
        ("read_host_nock_p2", "read -> host, no checksum"),
        ("read_dev_nock_p2", "read -> GPU, no checksum"),
        ("write_nock_p0", "write, no checksum, whole runs"),
        ("read_dev_nock_p0", "read -> GPU, no checksum, whole runs"),
        ("d2h_pin", "pinned D2H"),
        ("h2d_pin", "pinned H2D"),
        ("memcpy_pin", "pinned host memcpy"),
        ("d2h_page", "pageable D2H"),
        ("xxh3", "XXH3 of the bytes"),
    ]
    out = [
        f"Device: {device_name}; median times, GB/s = payload bytes / time; pieces of "
        f"2 blocks unless 'whole runs'",
        "",
        "| payload | MiB | "
        + " | ".join(f"{c} ms (GB/s)" for _, c in cols)
        + " | write / D2H (no checksum) | read->GPU / H2D (no checksum) | read->host / memcpy"
        " (no checksum) |",
        "|---|---:|" + "---:|" * (len(cols) + 3),
    ]
    for r in rows:
        n = r["bytes"]
        cells = [f"{r[k] * 1e3:.2f} ({n / r[k] / 1e9:.1f})" for k, _ in cols]
        out.append(
            f"| {r['model']} | {n / 2**20:.1f} | "
            + " | ".join(cells)
            + f" | {r['d2h_pin'] / r['write_p2']:.2f} ({r['d2h_pin'] / r['write_nock_p2']:.2f})"
            f" | {r['h2d_pin'] / r['read_dev_p2']:.2f} ({r['h2d_pin'] / r['read_dev_nock_p2']:.2f})"
            f" | {r['memcpy_pin'] / r['read_host_p2']:.2f}"
            f" ({r['memcpy_pin'] / r['read_host_nock_p2']:.2f}) |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    name = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else "CPU (no CUDA: pageable buffers)"
    )
    rows = run(args.iters)
    text = table(rows, name)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(
            json.dumps({"device": name, "iters": args.iters, "rows": rows})
        )


if __name__ == "__main__":
    main()
