"""The CPU platform's vision attention works per image (issue 17 item 4 (i)).

Upstream's CPU fallback (``VisionSdpaAttention``) attends over the whole vision-tower call,
all images packed, under a dense block mask: O(N^2) in the images of a call. The plugin's
``"sdpa"`` attends within each ``cu_seqlens`` segment, as the GPU backends do. Checked on the
encode-only construction of the tiny Qwen3-VL-MoE, in a spawned process (it initialises a
one-rank gloo group and publishes server args, which must not leak into other tests):

  * one call over three images of different sizes gives Hugging Face's vision tower output
    (merged rows and deepstack features, fp32) and upstream's dense-mask path's output;
  * the work is per image: every scaled-dot-product attention of the call spans one image's
    patches, without a mask, one per image and vision block (upstream's: one per block over
    all patches, with a [1, S, S] mask).
"""

from __future__ import annotations

import contextlib
import queue as queue_module

import torch.multiprocessing as mp
from epd_testbed.tiny_ckpt import TinyVLMoeSpec

TOL = 1e-5
SIZES = ((64, 64), (96, 64), (128, 64))  # width x height: 16, 24, 32 patches of 16x16


def _encode_three_images(port: int, queue) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from epd_testbed.hf_reference import _tok_and_proc, load_model
    from epd_testbed.images import make_image
    from epd_testbed.lm_harness import _load_encoder, _mm_items
    from epd_testbed.tiny_ckpt import ensure_checkpoint
    from sglang.srt.arg_groups.overrides import declare_resolution
    from sglang.srt.distributed import (
        init_distributed_environment,
        initialize_model_parallel,
    )
    from sglang.srt.runtime_context import SpawnRanks, publish, spawn_world_rank
    from sglang.srt.server_args import ServerArgs
    from transformers import AutoConfig

    model = str(ensure_checkpoint(TinyVLMoeSpec()))
    args = ServerArgs(model_path=model, dtype="float32", log_level="error")
    declare_resolution(args, "test_cpu_vision_attention")
    args.resolve_once()
    ranks = SpawnRanks(
        world_rank=spawn_world_rank(args, tp_rank=0, pp_rank=0), gpu_id=0
    )
    publish(args, role="scheduler", ranks=ranks)
    init_distributed_environment(
        world_size=1,
        rank=0,
        local_rank=0,
        distributed_init_method=f"tcp://127.0.0.1:{port}",
        backend="gloo",
    )
    initialize_model_parallel(backend="gloo")
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(False)
    encoder = _load_encoder(model, AutoConfig.from_pretrained(model))
    ours_class = type(encoder.model.visual.blocks[0].attn.qkv_backend)

    tok, proc = _tok_and_proc(model)
    images = [make_image(w, h, seed=20 + i) for i, (w, h) in enumerate(SIZES)]
    content = [{"type": "image"} for _ in images] + [
        {"type": "text", "text": "Compare."}
    ]
    text = tok.apply_chat_template(
        [{"role": "user", "content": content}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = proc(text=[text], images=images, return_tensors="pt")
    items = _mm_items(inputs)
    grid = inputs["image_grid_thw"]

    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append(
            (q.shape[-2], None if attn_mask is None else tuple(attn_mask.shape))
        )
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        got = encoder.model.get_image_feature(items)
        ours = list(calls)
        # upstream's class on the same instances: the dense-mask path over the whole call
        from sglang.srt.layers.attention.vision import VisionSdpaAttention as upstream

        for block in encoder.model.visual.blocks:
            block.attn.qkv_backend.__class__ = upstream
        calls.clear()
        dense = encoder.model.get_image_feature(items)
        dense_calls = list(calls)
    finally:
        F.scaled_dot_product_attention = sdpa

    hf = load_model(model)
    ref = hf.model.get_image_features(inputs["pixel_values"], grid)
    hf_rows = torch.cat(
        [torch.cat(ref.pooler_output)] + [torch.cat(f) for f in ref.deepstack_features],
        dim=1,
    )
    queue.put(
        {
            "class": ours_class.__name__,
            "upstream_class": upstream.__name__,
            "patches": [int(t * h * w) for t, h, w in grid.tolist()],
            "depth": len(encoder.model.visual.blocks),
            "calls": ours,
            "dense_calls": dense_calls,
            "shape": tuple(got.shape),
            "hf_shape": tuple(hf_rows.shape),
            "vs_hf": (got - hf_rows).abs().max().item(),
            "vs_dense": (got - dense).abs().max().item(),
        }
    )


def _run_spawned() -> dict:
    from epd_testbed.servers import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_encode_three_images, args=(free_port(), queue))
    proc.start()
    try:
        while True:  # the child's result, or its exit without one
            with contextlib.suppress(queue_module.Empty):
                return queue.get(timeout=5)
            assert proc.is_alive(), f"worker exited with {proc.exitcode} and no result"
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()


def test_vision_attention_is_per_image_and_equals_hf() -> None:
    got = _run_spawned()
    assert got["class"] == "PerImageSdpaAttention"
    assert got["upstream_class"] == "VisionSdpaAttention"
    assert got["patches"] == [16, 24, 32]
    # equal to Hugging Face's vision tower, and to upstream's dense-mask path
    assert (
        got["shape"] == got["hf_shape"] and got["shape"][0] == sum(got["patches"]) // 4
    )
    assert got["vs_hf"] <= TOL, got["vs_hf"]
    assert got["vs_dense"] <= TOL, got["vs_dense"]
    # per image: one unmasked attention per image and block, each over that image's patches
    assert got["calls"] == [(p, None) for p in got["patches"]] * got["depth"]
    # what it replaces: one attention per block over all patches, with a dense mask
    total = sum(got["patches"])
    assert got["dense_calls"] == [(total, (1, total, total))] * got["depth"]
