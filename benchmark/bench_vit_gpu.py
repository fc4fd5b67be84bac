"""ViT time per 1024x1024 image of a real-size Qwen3-VL-MoE vision tower, and what it implies.

Measured (on the GPU it runs on; transformers alone, random weights, bf16, eager):
  * the vision tower of Qwen3-VL-30B-A3B and 235B-A22B (transformers' ``Qwen3VLMoeVisionModel``,
    config = the checkpoints' ``vision_config``: they differ only in ``out_hidden_size``) on
    batches of 1, 4, 8 images; median / min / max of ``--iters`` calls timed with CUDA events;
  * the two ceilings of the card in the same run: a bf16 8192^3 matrix product and a
    device-to-device copy (bytes read + written).

Estimated (from the numbers above and the assumptions printed with them):
  * the bytes the encode side sends per image request (``LayoutManifest.wire_bytes``, the
    transport's own formula) and their transfer time at 25 and 50 GB/s;
  * the language GPU time per request (prefill FLOPs at an assumed fraction of the measured
    matmul rate; decode bytes at the measured copy rate and an assumed batch), and from it the
    encode:language GPU ratio at which neither side idles for the given image/text mix.

The tower runs as transformers ships it (per-image SDPA calls, no fused kernels, no CUDA
graphs), so the ViT time is an upper bound for SGLang's own vision path.

Run:    python benchmark/bench_vit_gpu.py --out-dir results/vit
Again:  python benchmark/bench_vit_gpu.py --from-json results/vit/vit_gpu.json --text-tokens 500
        (recomputes the estimate for another mix from a saved measurement; needs no GPU)
Where SGLang is not installed, put benchmark/ on PYTHONPATH and msgspec on the path: the
transport's manifest is loaded from this checkout (see bench_encode_language_device.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from sample_stats import summary

BENCH = Path(__file__).resolve().parent
IMAGE_SIDE = 1024
DEEPSTACK = 3
BLOCK = 128
# Qwen/Qwen3-VL-30B-A3B-Instruct and -235B-A22B-Instruct config.json, vision_config (shared).
VISION_CONFIG = dict(
    depth=27,
    hidden_size=1152,
    hidden_act="gelu_pytorch_tanh",
    intermediate_size=4304,
    num_heads=16,
    in_channels=3,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[8, 16, 24],
)


@dataclasses.dataclass(frozen=True)
class TextModel:
    """The language side's shape (config.json text_config), for FLOP and byte counts."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    moe_intermediate: int
    vocab: int = 151936

    def layer_params(self, experts: int) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return (
            attn
            + experts * 3 * self.hidden * self.moe_intermediate
            + self.hidden * self.experts
        )

    @property
    def active_params(self) -> int:
        """Weights one token multiplies with (embedding lookup excluded, LM head included)."""
        return self.layers * self.layer_params(self.top_k) + self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        return (
            self.layers * self.layer_params(self.experts) + 2 * self.vocab * self.hidden
        )

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * 2

    def prefill_flops(self, tokens: int) -> float:
        """Linear layers plus causal attention scores over the prompt."""
        attn = 2 * tokens * tokens * self.heads * self.head_dim * self.layers
        return 2.0 * self.active_params * tokens + attn


MODELS = {
    "Qwen3-VL-30B-A3B": (2048, TextModel(48, 2048, 32, 4, 128, 128, 8, 768)),
    "Qwen3-VL-235B-A22B": (4096, TextModel(94, 4096, 64, 4, 128, 128, 8, 1536)),
}


def vision_flops_per_image(side: int, out_hidden: int) -> float:
    """Matmul FLOPs of the tower for one side x side image (one temporal patch)."""
    c = VISION_CONFIG
    h, i, p = c["hidden_size"], c["intermediate_size"], (side // c["patch_size"]) ** 2
    embed = (
        2 * p * c["in_channels"] * c["temporal_patch_size"] * c["patch_size"] ** 2 * h
    )
    layer = 2 * p * (4 * h * h + 2 * h * i) + 4 * p * p * h
    merged, wide = p // c["spatial_merge_size"] ** 2, h * c["spatial_merge_size"] ** 2
    mergers = (
        (1 + len(c["deepstack_visual_indexes"]))
        * 2
        * merged
        * wide
        * (wide + out_hidden)
    )
    return embed + c["depth"] * layer + mergers


def merged_tokens(side: int) -> int:
    c = VISION_CONFIG
    return (side // c["patch_size"] // c["spatial_merge_size"]) ** 2


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


class Timer:
    """CUDA events on a GPU, a synchronised host clock on the CPU (smoke runs only)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, iters: int, warmup: int = 3) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        samples = []
        for _ in range(iters):
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
        return samples

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def measure_ceilings(device: torch.device, iters: int) -> dict:
    """bf16 matmul rate and device copy bandwidth of this card, on random data."""
    timer = Timer(device)
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm = summary(timer(lambda: a @ b, iters))
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    cp = summary(timer(lambda: dst.copy_(src), iters))
    assert torch.equal(dst, src), "device copy produced different bytes"
    return {
        "matmul_n": n,
        "matmul_tflops": 2 * n**3 / mm["median_s"] / 1e12,
        "copy_bytes": nbytes,
        "copy_gbps": 2 * nbytes / cp["median_s"] / 1e9,
    }


def vision_outputs(out) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(merged embeddings, deepstack list) from either return style transformers has used."""
    if isinstance(out, tuple):
        return out[0], list(out[1])
    return out.pooler_output, list(out.deepstack_features)


def build_tower(out_hidden: int, attn: str, device: torch.device, depth: int):
    from transformers.models.qwen3_vl_moe import configuration_qwen3_vl_moe as conf
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as modeling

    cfg = conf.Qwen3VLMoeVisionConfig(
        **{**VISION_CONFIG, "depth": depth, "out_hidden_size": out_hidden}
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = modeling.Qwen3VLMoeVisionModel._from_config(
            cfg, attn_implementation=attn, dtype=torch.bfloat16
        )
    return model.eval(), cfg


def measure_tower(name: str, out_hidden: int, args, device: torch.device) -> list[dict]:
    rows = []
    for attn in args.attn:
        try:
            model, cfg = build_tower(out_hidden, attn, device, args.depth)
        except (ImportError, ValueError) as e:
            print(
                f"[{name}] attention {attn!r} unavailable: {str(e).splitlines()[0]}",
                file=sys.stderr,
            )
            rows.append(
                {"model": name, "attn": attn, "unavailable": str(e).splitlines()[0]}
            )
            continue
        params = sum(p.numel() for p in model.parameters())
        c = VISION_CONFIG
        grid_side = args.image_side // c["patch_size"]
        patch_dim = c["in_channels"] * c["temporal_patch_size"] * c["patch_size"] ** 2
        for batch in args.batches:
            pixels = torch.randn(
                batch * grid_side**2, patch_dim, device=device, dtype=torch.bfloat16
            )
            grid = torch.tensor([[1, grid_side, grid_side]] * batch, device=device)
            with torch.inference_mode():
                merged, deepstack = vision_outputs(model(pixels, grid_thw=grid))
                want = (batch * merged_tokens(args.image_side), out_hidden)
                assert (
                    tuple(merged.shape) == want
                ), f"merged {tuple(merged.shape)} != {want}"
                reached = [
                    i for i in cfg.deepstack_visual_indexes if i < cfg.depth
                ]  # all 3 at depth 27
                assert len(deepstack) == len(reached) and all(
                    tuple(d.shape) == want for d in deepstack
                )
                assert torch.isfinite(merged).all(), "non-finite vision output"
                samples = Timer(device)(
                    lambda: model(pixels, grid_thw=grid), args.iters
                )
            s = summary(samples)
            rows.append(
                {
                    "model": name,
                    "attn": attn,
                    "attn_used": cfg._attn_implementation,
                    "vision_params": params,
                    "batch": batch,
                    **s,
                    "per_image_s": s["median_s"] / batch,
                    "tflops": batch
                    * vision_flops_per_image(args.image_side, out_hidden)
                    / s["median_s"]
                    / 1e12,
                }
            )
            print(
                f"[{name}] {attn} batch {batch}: {s['median_s'] * 1e3:.2f} ms",
                file=sys.stderr,
                flush=True,
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def machine(device: torch.device) -> dict:
    import transformers

    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["sdpa_flash"] = torch.backends.cuda.flash_sdp_enabled()
        info["cudnn_sdpa"] = torch.backends.cuda.cudnn_sdp_enabled()
    return info


def measure(args) -> dict:
    device = torch.device(args.device)
    result = {
        "machine": machine(device),
        "image_side": args.image_side,
        "depth": args.depth,
        "ceilings": measure_ceilings(device, args.iters),
        "vit": [],
    }
    for name, (out_hidden, _) in MODELS.items():
        result["vit"] += measure_tower(name, out_hidden, args, device)
    return result


# --------------------------------------------------------------------------------------------
# Estimate
# --------------------------------------------------------------------------------------------


def layout_manifest():
    """The transport's LayoutManifest (its wire_bytes is the formula the transfer plan moves)."""
    try:
        from sglang.srt.disaggregation.encode_language.manifest import LayoutManifest
    except ImportError:
        sys.path.insert(0, str(BENCH))
        from bench_encode_language_device import load_transport

        load_transport()
        from sglang.srt.disaggregation.encode_language.manifest import LayoutManifest
    return LayoutManifest


def estimate(result: dict, args) -> list[dict]:
    LayoutManifest = layout_manifest()
    ceil = result["ceilings"]
    flops_rate = args.prefill_mfu * ceil["matmul_tflops"] * 1e12
    bytes_rate = ceil["copy_gbps"] * 1e9
    side = result["image_side"]
    mm_tokens = args.images_per_request * merged_tokens(side)
    rows = []
    for name, (out_hidden, text) in MODELS.items():
        vit = [r for r in result["vit"] if r["model"] == name and "per_image_s" in r]
        best = min(vit, key=lambda r: r["per_image_s"])
        layout = LayoutManifest(
            hidden_size=out_hidden, deepstack_count=DEEPSTACK, block_size=BLOCK
        )
        prompt = mm_tokens + args.text_tokens
        wire = layout.wire_bytes(prompt, mm_tokens)
        one_image = layout.wire_bytes(merged_tokens(side), merged_tokens(side))
        # GPU-seconds per request on the language side, summed over its TP group.
        prefill = text.prefill_flops(prompt) / flops_rate
        context = prompt + args.output_tokens / 2
        step_bytes = (
            text.total_params * 2 / args.decode_batch
            + text.kv_bytes_per_token * context
        )
        per_token = max(step_bytes / bytes_rate, 2 * text.active_params / flops_rate)
        decode = args.output_tokens * per_token
        text_prefill = text.prefill_flops(args.text_tokens) / flops_rate
        text_req = text_prefill + decode
        share = args.image_request_share
        encode = share * args.images_per_request * best["per_image_s"]
        language = share * (prefill + decode) + (1 - share) * text_req
        language_prefill = share * prefill + (1 - share) * text_prefill
        rows.append(
            {
                "model": name,
                "out_hidden": out_hidden,
                "bytes_one_image": one_image,
                "bytes_per_image_request": wire,
                "transfer_25_s": wire / 25e9,
                "transfer_50_s": wire / 50e9,
                "vit_per_image_s": best["per_image_s"],
                "vit_batch": best["batch"],
                "vit_attn": best["attn"],
                "language_prefill_s": prefill,
                "language_decode_s": decode,
                "encode_gpu_s_per_request": encode,
                "language_gpu_s_per_request": language,
                "language_gpus_per_encode_gpu": language / encode,
                "language_gpus_per_encode_gpu_prefill_only": language_prefill / encode,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def report(result: dict, rows: list[dict] | None, args) -> str:
    m, c = result["machine"], result["ceilings"]
    out = [
        f"Machine: {m.get('gpu', 'CPU')}; torch {m['torch']}, transformers {m['transformers']}, "
        f"CUDA {m.get('cuda')}; image {result['image_side']}x{result['image_side']}, depth {result['depth']}",
        f"Ceilings (measured): bf16 {c['matmul_n']}^3 matmul {c['matmul_tflops']:.0f} TFLOP/s, "
        f"device copy {c['copy_gbps']:.0f} GB/s (read+write)",
        "",
        "ViT (measured, CUDA events; per image = median / batch; TFLOP/s from the tower's matmul FLOPs)",
        "",
        "| model | attention | batch | median ms | min ms | max ms | ms per image | TFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["vit"]:
        if "unavailable" in r:
            out.append(
                f"| {r['model']} | {r['attn']} (unavailable: {r['unavailable'][:60]}) | | | | | | |"
            )
            continue
        out.append(
            f"| {r['model']} | {r['attn']} | {r['batch']} | {r['median_s'] * 1e3:.2f} | {r['min_s'] * 1e3:.2f}"
            f" | {r['max_s'] * 1e3:.2f} | {r['per_image_s'] * 1e3:.2f} | {r['tflops']:.0f} |"
        )
    if rows is None:
        return "\n".join(out)
    out += [
        "",
        f"Capacity (estimated; mix: {args.image_request_share:.0%} of requests carry "
        f"{args.images_per_request} image(s) + {args.text_tokens} text tokens, the rest text only; "
        f"{args.output_tokens} output tokens; prefill at {args.prefill_mfu:.0%} of the measured matmul rate; "
        f"decode batch {args.decode_batch} at the measured copy rate; ViT = best measured per-image time)",
        "",
        "| model | bytes, one image (exact: wire_bytes) | bytes per request (exact) | at 25 GB/s ms | at 50 GB/s ms "
        "| ViT ms/image (measured) | prefill GPU-ms per image request | decode GPU-ms per request | language GPUs per encode GPU "
        "| same, prefill only |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['bytes_one_image']:,} | {r['bytes_per_image_request']:,}"
            f" | {r['transfer_25_s'] * 1e3:.2f} | {r['transfer_50_s'] * 1e3:.2f}"
            f" | {r['vit_per_image_s'] * 1e3:.2f} | {r['language_prefill_s'] * 1e3:.1f}"
            f" | {r['language_decode_s'] * 1e3:.1f} | {r['language_gpus_per_encode_gpu']:.1f}"
            f" | {r['language_gpus_per_encode_gpu_prefill_only']:.1f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out-dir", type=Path, help="write vit_gpu.json and vit_gpu.md here"
    )
    ap.add_argument(
        "--from-json",
        type=Path,
        help="skip measuring; estimate from this saved vit_gpu.json",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--attn", nargs="+", default=["sdpa", "flash_attention_2"])
    ap.add_argument("--image-side", type=int, default=IMAGE_SIDE)
    ap.add_argument(
        "--depth",
        type=int,
        default=VISION_CONFIG["depth"],
        help="fewer layers: smoke runs only",
    )
    ap.add_argument("--images-per-request", type=int, default=1)
    ap.add_argument("--image-request-share", type=float, default=1.0)
    ap.add_argument("--text-tokens", type=int, default=100)
    ap.add_argument("--output-tokens", type=int, default=256)
    ap.add_argument("--prefill-mfu", type=float, default=0.4)
    ap.add_argument("--decode-batch", type=int, default=128)
    ap.add_argument("--no-estimate", action="store_true", help="measure only")
    args = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        result = measure(args)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "vit_gpu.json").write_text(json.dumps(result, indent=1))
    rows = None if args.no_estimate else estimate(result, args)
    if rows is not None:
        result["estimate"] = {
            "args": {k: v for k, v in vars(args).items() if not isinstance(v, Path)},
            "rows": rows,
        }
    text = report(result, rows, args)
    print(text)
    if args.out_dir:
        (args.out_dir / "vit_gpu.json").write_text(json.dumps(result, indent=1))
        (args.out_dir / "vit_gpu.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
