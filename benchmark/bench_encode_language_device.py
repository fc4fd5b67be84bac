"""GPU side of the transport benchmark: CUDA payloads through pinned MultimodalDataBuffers.

Runs where SGLang itself cannot be installed (the lent GPU machine: torch, numpy, msgspec only):
the `encode_language` package is loaded from this checkout without importing `sglang/__init__`.
For the 30B-A3B and 235B-A22B payloads of one 1024x1024 image (1024 image tokens, K=3, bf16) it
times, with synchronised host clocks, median [min, max] of --iters, the ops interleaved:

  write       payload -> pinned encode buffers (write_range, checksum=False: a healthy round):
              the rows on the GPU (one D2H copy per slot per run), the token stream on the host
              as the encode scheduler builds it (ids, positions, mask), bitmaps and headers
  read_host   pinned language buffers -> the request's pinned host tensors (read_round(out=
              alloc_received(pin_memory=True), verify=False): stamp checks, one copy per slot)
  read_dev    the same into GPU tensors (alloc_received(device="cuda"): H2D)
  *_ck        the same with block checksums (XXH3 on the host, pieces of PIECE_BLOCKS): a round
              on blocks a late write may reach (released by a fence timeout)
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
import random
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
    """(payload, buffers): encode_language.{payload,buffers}, imported from python/ without
    sglang's package __init__ where SGLang is not installed (with manifest and round_plan,
    which they import)."""
    try:
        import sglang.srt.disaggregation.encode_language.buffers as buffers
        import sglang.srt.disaggregation.encode_language.payload as payload

        return payload, buffers
    except ImportError:
        pass
    parts = PKG.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        mod = types.ModuleType(name)
        mod.__path__ = [str(REPO / "python" / Path(*parts[:i]))]
        sys.modules[name] = mod
    for sub in ("manifest", "payload", "round_plan", "buffers"):
        path = REPO / "python" / Path(*parts) / f"{sub}.py"
        spec = importlib.util.spec_from_file_location(f"{PKG}.{sub}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[f"{PKG}.payload"], sys.modules[f"{PKG}.buffers"]


def timed(ops: dict, iters: int, cuda: bool) -> dict:
    """Median, min and max seconds of each op, the ops interleaved: every iteration runs each
    once (a noisy neighbour slows all of them alike), in a shuffled order (an op never always
    follows the same one: a host-only op leaves the GPU and the PCIe link idle for the next),
    synchronised before and after each."""
    for fn in ops.values():
        for _ in range(3):
            fn()
    samples = {name: [] for name in ops}
    order = list(ops)
    for i in range(iters):
        random.Random(i).shuffle(order)
        for name in order:
            fn = ops[name]
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - t0)
    out = {}
    for name, xs in samples.items():
        out[name] = statistics.median(xs)
        out[f"{name}_min"], out[f"{name}_max"] = min(xs), max(xs)
    return out


def check_exact() -> int:
    """Byte-exact round trips through pinned buffers for every placement the GPU path
    handles: token stream and rows on the GPU or the host, rows read to the GPU or the host,
    with and without checksums, blocks in one run or scattered, a partial last block, a round
    that starts mid-request (the test suite covers the same on the CPU). Returns the cases run.
    """
    carried, buffers = load_transport()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    H, B, cases = 64, 16, 0
    cfg = buffers.MultimodalBufferConfig(
        hidden_size=H, deepstack_count=K, block_size=B, num_blocks=12
    )
    enc, lang = buffers.MultimodalDataBuffers(cfg), buffers.MultimodalDataBuffers(cfg)
    g = torch.Generator().manual_seed(1)
    T, M = 5 * B + 3, 4 * B + 7
    mask = torch.zeros(T, dtype=torch.bool)
    mask[torch.randperm(T, generator=g)[:M]] = True
    rows_e = torch.randn(M, H, generator=g).bfloat16()
    rows_d = torch.randn(M, K * H, generator=g).bfloat16()
    ids = torch.randint(0, 150000, (T,), generator=g)
    pos = torch.randint(0, 4096, (3, T), generator=g)
    for tokens_on, rows_on in (("cpu", dev), (dev, dev), ("cpu", "cpu")):
        p = carried.MultimodalPayload(
            ids.to(tokens_on),
            pos.to(tokens_on),
            mask.to(tokens_on),
            rows_e.to(rows_on),
            rows_d.to(rows_on),
            -3,
        )
        for checksum in (False, True):
            for blocks in ([0, 1, 2, 3, 4, 5], [9, 2, 3, 7, 0, 11]):
                for out_dev, pin in ((dev, False), (None, dev == "cuda")):
                    # two rounds: 4 blocks, then the rest (starts at token 4B, row 4B)
                    dst = carried.alloc_received(lang.layout, T, M, out_dev, pin)
                    for t0, tc, m0, mc, bl in (
                        (0, 4 * B, 0, min(M, 4 * B), blocks[:4]),
                        (4 * B, T - 4 * B, 4 * B, M - 4 * B, blocks[4:]),
                    ):
                        enc.write_range(bl, p, t0, tc, m0, mc, 7, 8, checksum)
                        for s, d in zip(enc.slots(), lang.slots()):
                            d.copy_(s)  # the transfer engine's write, elsewhere
                        stamp = buffers.RoundStamp(7, 8, t0 // B)
                        out = carried.slice_received(dst, t0, tc, m0, mc)
                        lang.read_round(bl, tc, mc, stamp, out=out, verify=checksum)
                    assert torch.equal(dst.fill_ids.long(), ids)
                    assert torch.equal(dst.mrope_positions.long(), pos)
                    assert torch.equal(dst.mm_mask, mask)
                    assert torch.equal(dst.embeddings.cpu(), rows_e)
                    assert torch.equal(dst.deepstack.cpu(), rows_d)
                    cases += 1
    return cases


def run(iters: int) -> list[dict]:
    carried, buffers = load_transport()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    rows = []
    for model, hidden in MODELS.items():
        g = torch.Generator().manual_seed(0)
        T = IMAGE_TOKENS
        # As the encode scheduler builds it: the token stream (int64 ids and positions, mask)
        # on the host, the vision tower's rows on the GPU.
        payload = carried.MultimodalPayload(
            fill_ids=torch.randint(0, 150000, (T,), generator=g),
            mrope_positions=torch.randint(0, 4096, (3, T), generator=g),
            mm_mask=torch.ones(T, dtype=torch.bool),
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

        def read_into(device, pin, verify):
            dst = carried.alloc_received(lang.layout, T, T, device, pin)
            return lang.read_round(
                blocks,
                T,
                T,
                stamp,
                out=carried.slice_received(dst, 0, T, 0, T),
                verify=verify,
            )

        for device, pin in ((None, cuda), (dev, False)):
            for verify in (False, True):
                got = read_into(device, pin, verify)
                assert torch.equal(got.embeddings.to(dev), payload.embeddings)
                assert torch.equal(got.deepstack.to(dev), payload.deepstack)
                assert torch.equal(got.fill_ids.long(), payload.fill_ids)
                assert torch.equal(got.mrope_positions.long(), payload.mrope_positions)
                assert torch.equal(got.mm_mask, payload.mm_mask)
        nbytes = (payload.embeddings.numel() + payload.deepstack.numel()) * 2 + T * 16
        flat_dev = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        flat_pin = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        flat_pin2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        flat_page = torch.empty(nbytes, dtype=torch.uint8)
        flat_pin.fill_(1)
        flat_np = flat_pin.numpy()
        row = {"model": model, "bytes": nbytes}

        ops = {}
        for ck in (False, True):
            tag = "_ck" if ck else ""
            ops[f"write{tag}"] = lambda ck=ck: enc.write_range(
                blocks, payload, 0, T, 0, T, checksum=ck
            )
            ops[f"read_host{tag}"] = lambda ck=ck: read_into(None, cuda, ck)
            ops[f"read_dev{tag}"] = lambda ck=ck: read_into(dev, False, ck)
        ops["d2h_pin"] = lambda: flat_pin.copy_(flat_dev)
        ops["h2d_pin"] = lambda: flat_dev.copy_(flat_pin)
        ops["d2h_page"] = lambda: flat_page.copy_(flat_dev)
        ops["memcpy_pin"] = lambda: flat_pin2.copy_(flat_pin)
        ops["xxh3"] = lambda: xxhash.xxh3_64_intdigest(flat_np)
        row.update(timed(ops, iters, cuda))
        rows.append(row)
        print(f"[{model}] done", file=sys.stderr, flush=True)
    return rows


def table(rows, device_name: str) -> str:
    cols = [
        ("write", "write (staging)"),
        ("read_dev", "read -> GPU"),
        ("read_host", "read -> pinned host"),
        ("write_ck", "write, checksummed"),
        ("read_dev_ck", "read -> GPU, checksummed"),
        ("read_host_ck", "read -> host, checksummed"),
        ("d2h_pin", "pinned D2H"),
        ("h2d_pin", "pinned H2D"),
        ("memcpy_pin", "pinned host memcpy"),
        ("d2h_page", "pageable D2H"),
        ("xxh3", "XXH3 of the bytes"),
    ]
    out = [
        f"Device: {device_name}; median times, GB/s = payload bytes / time",
        "",
        "| payload | MiB | "
        + " | ".join(f"{c} ms (GB/s)" for _, c in cols)
        + " | D2H / write (checksummed) | H2D / read->GPU (checksummed)"
        " | memcpy / read->host (checksummed) |",
        "|---|---:|" + "---:|" * (len(cols) + 3),
    ]
    for r in rows:
        n = r["bytes"]
        cells = [f"{r[k] * 1e3:.2f} ({n / r[k] / 1e9:.1f})" for k, _ in cols]
        ratios = [
            f"{r[limit] / r[op]:.2f} ({r[limit] / r[op + '_ck']:.2f})"
            for limit, op in (
                ("d2h_pin", "write"),
                ("h2d_pin", "read_dev"),
                ("memcpy_pin", "read_host"),
            )
        ]
        out.append(
            f"| {r['model']} | {n / 2**20:.1f} | " + " | ".join(cells + ratios) + " |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--check", action="store_true", help="only the byte-exact round trips"
    )
    args = ap.parse_args()
    cases = check_exact()
    print(f"byte-exact round trips: {cases} cases ok", file=sys.stderr)
    if args.check:
        return
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
