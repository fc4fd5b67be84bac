"""In-process harness: the disaggregated data path of one request, without servers.

Runs in its own process (``python -m epd_testbed.lm_harness CKPT OUT [case ...]``):

1. loads ``Qwen3MoeForCausalLM`` from a Qwen3-VL-MoE checkpoint into a real SGLang
   ``ModelRunner`` (the architecture overridden as the language server will do), driven the way
   ``sglang.benchmark.one_batch`` drives it: Reqs, ScheduleBatch, ForwardBatch, extend + decode;
2. builds the encode-only construction of ``Qwen3VLMoeForConditionalGeneration``
   (``build_encode_only``: the vision tower only) and loads its weights;
3. per case: Hugging Face's processor (the reference's own inputs) gives prompt ids, pixels and
   grid; SGLang's ``MRotaryEmbedding.get_rope_index`` gives M-RoPE positions and delta (what
   SGLang's processor computes); ``EncodeOnly.encode`` gives the multimodal rows and deepstack
   features; the text rows are the language model's own token embeddings (this harness embeds
   them, as the language server will); the language model prefills with ``input_embeds`` +
   ``input_deepstack_embeds`` + M-RoPE positions and decodes greedily;
4. ``__encode__``: the encode-only construction's rows for an image and a video, next to Hugging
   Face's vision tower output for the same pixels;
5. ``__text_stacks__``: the text stacks of InternS1Pro and Qwen3-Omni (which used upstream's
   removed ``Qwen3MoeLLMModel``), built on the checkpoint's text config, loaded through the
   language-side loader and run on the ``one_image`` prefill in place of ``Qwen3MoeModel``.

It writes ``{case: {"tokens": [...], "logits": Tensor[steps, vocab], "num_deepstack": K, ...},
"__meta__": {...}, "__encode__": {...}, "__text_stacks__": {...}}`` with ``torch.save``.
Deepstack reaches the model through its ``forward(..., input_deepstack_embeds=...)`` argument
for the prefill step (the model runner does not carry it yet: that is the serving issue's job).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from array import array
from pathlib import Path

import torch

LANGUAGE_ARCH = "Qwen3MoeForCausalLM"


def _server_args(model_path: str):
    from sglang.srt.server_args import ServerArgs

    return ServerArgs(
        model_path=model_path, dtype="float32", log_level="error",
        json_model_override_args=json.dumps({"architectures": [LANGUAGE_ARCH]}),
        disable_radix_cache=True, max_total_tokens=4096, mem_fraction_static=0.5,
    )


def _load_language_runner(model_path: str):
    from sglang.benchmark import one_batch as ob
    from sglang.srt.arg_groups.overrides import declare_resolution
    from sglang.srt.entrypoints.engine import _set_envs_and_config
    from sglang.srt.runtime_context import SpawnRanks, publish, spawn_world_rank
    from sglang.srt.server_args import PortArgs

    server_args = _server_args(model_path)
    declare_resolution(server_args, "epd_testbed.lm_harness")
    server_args.resolve_once()
    _set_envs_and_config(server_args)
    port_args = PortArgs.init_new(server_args)
    publish(server_args, role="scheduler",
            ranks=SpawnRanks(world_rank=spawn_world_rank(server_args, tp_rank=0, pp_rank=0), gpu_id=0))
    ob._init_process_global_configs()
    bench_runner, _tok = ob.load_model(server_args, port_args, 0, 0)
    return bench_runner.torch_runner


def _checkpoint_weights(model_path: str):
    from safetensors import safe_open

    for f in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as g:
            for k in g.keys():
                yield k, g.get_tensor(k)


def _load_encoder(model_path: str, hf_config):
    from epd_testbed.encode_only import build_encode_only

    enc = build_encode_only(hf_config)
    enc.model.float().eval()
    enc.load_weights(_checkpoint_weights(model_path))
    return enc


def _mm_items(inputs) -> list:
    """The request's multimodal items as SGLang's processor hands them to the model."""
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    items = []
    if "pixel_values" in inputs:
        item = MultimodalDataItem(modality=Modality.IMAGE, feature=inputs["pixel_values"])
        item.image_grid_thw = inputs["image_grid_thw"]
        items.append(item)
    if "pixel_values_videos" in inputs:
        item = MultimodalDataItem(modality=Modality.VIDEO, feature=inputs["pixel_values_videos"])
        item.video_grid_thw = inputs["video_grid_thw"]
        items.append(item)
    return items


def encode_against_hf(encoder, model_path: str) -> dict:
    """The encode-only rows of an image and of a 4-frame video, and Hugging Face's vision tower
    output (merged rows, deepstack slices concatenated) for the same processor inputs."""
    import numpy as np

    from epd_testbed.hf_reference import _tok_and_proc, load_model
    from epd_testbed.images import make_image

    tok, proc = _tok_and_proc(model_path)
    hf = load_model(model_path)
    frames = np.stack([np.array(make_image(64, 64, seed=10 + s)) for s in range(4)])
    requests = {
        "image": ({"type": "image"}, dict(images=[make_image(96, 64, seed=5)])),
        "video": ({"type": "video"}, dict(videos=[frames], videos_kwargs={"do_sample_frames": False})),
    }
    out = {}
    for kind, (part, media) in requests.items():
        msgs = [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        inputs = proc(text=[text], return_tensors="pt", **media)
        ids = inputs["input_ids"][0]
        encoded = encoder.encode(ids, _mm_items(inputs))
        get = hf.model.get_image_features if kind == "image" else hf.model.get_video_features
        pixels = inputs["pixel_values" if kind == "image" else "pixel_values_videos"]
        grid = inputs["image_grid_thw" if kind == "image" else "video_grid_thw"]
        with torch.no_grad():
            ref = get(pixels, grid)
        token_id = getattr(encoder.config, f"{kind}_token_id")
        out[kind] = {"mm_embeds": encoded.mm_embeds, "deepstack": encoded.deepstack,
                     "mm_positions": encoded.mm_positions,
                     "placeholder_positions": (ids == token_id).nonzero()[:, 0],
                     "hf_mm_embeds": torch.cat(ref.pooler_output),
                     "hf_deepstack": torch.cat([torch.cat(f) for f in ref.deepstack_features], dim=1)}
    return out


def text_stacks(model_runner, encoder, hf_config, model_path: str, case) -> dict:
    """Run ``case`` with the text stacks of InternS1Pro and Qwen3-Omni in place of the language
    model's ``Qwen3MoeModel`` (same text config, same checkpoint)."""
    import copy

    from sglang.srt.model_loader.loader import DefaultModelLoader
    from sglang.srt.models import interns1pro, qwen3_omni_moe
    from sglang.srt.models.deepstack import rope_parameters

    lm = model_runner.model
    original = lm.model
    # InternS1Pro's attention reads rope_theta and rope_scaling (a dict) as attributes, as its
    # checkpoints' configs declare them; transformers 5 keeps both in rope_parameters.
    interns1_config = copy.deepcopy(lm.config)
    interns1_config.rope_scaling = dict(rope_parameters(lm.config))
    interns1_config.rope_theta = interns1_config.rope_scaling["rope_theta"]
    stacks = {
        "interns1pro": (interns1pro.InternS1ProTextModel, interns1_config),
        "qwen3_omni_moe": (qwen3_omni_moe.Qwen3MoeLLMModel, lm.config),
    }
    out = {}
    try:
        for name, (cls, config) in stacks.items():
            lm.model = cls(config=config, quant_config=None, prefix="model")
            lm.load_weights(_checkpoint_weights(model_path))
            DefaultModelLoader.postprocess_weights(lm, torch.device(model_runner.device))
            out[name] = {"class": f"{type(lm.model).__module__}.{type(lm.model).__qualname__}",
                         **run_case(model_runner, encoder, hf_config, model_path, case, max_new_tokens=2)}
    finally:
        lm.model = original
    return out


def _mrope(hf_config, input_ids: torch.Tensor, grid):
    from sglang.srt.layers.rotary_embedding.mrope import MRotaryEmbedding

    pos, delta = MRotaryEmbedding.get_rope_index(
        spatial_merge_size=hf_config.vision_config.spatial_merge_size,
        image_token_id=hf_config.image_token_id, video_token_id=hf_config.video_token_id,
        vision_start_token_id=hf_config.vision_start_token_id, model_type=hf_config.model_type,
        input_ids=input_ids.unsqueeze(0), image_grid_thw=grid, video_grid_thw=None,
    )
    return pos.squeeze(1), delta


def _forward_with(forward, input_embeds, deepstack, input_ids, positions, forward_batch, **kwargs):
    """The language model's prefill forward with the encode side's rows."""
    assert input_embeds.shape[0] == input_ids.shape[0]
    kwargs["input_embeds"] = input_embeds
    if deepstack is not None:
        kwargs["input_deepstack_embeds"] = deepstack
    return forward(input_ids, positions, forward_batch, **kwargs)


def _split_prefill_logits(model_runner, req, input_embeds, deepstack) -> torch.Tensor:
    """Prefill the same request through the split-prefill path, one decoder layer per call
    (``ForwardMode.SPLIT_PREFILL``, ``ModelRunner.forward(..., split_forward_count=1)``), and
    return its next-token logits."""
    from sglang.benchmark import one_batch as ob
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
    from sglang.srt.runtime_context import get_schedule
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    lm = model_runner.model
    tree_cache = ob.TreeCacheNamespace(page_size=get_schedule().page_size, device=model_runner.device,
                                       token_to_kv_pool_allocator=model_runner.token_to_kv_pool_allocator)
    batch = ScheduleBatch.init_new(reqs=[req], req_to_token_pool=model_runner.req_to_token_pool,
                                   token_to_kv_pool_allocator=model_runner.token_to_kv_pool_allocator,
                                   tree_cache=tree_cache, model_config=model_runner.model_config,
                                   enable_overlap=False, spec_algorithm=SpeculativeAlgorithm.NONE)
    batch.prepare_for_extend()
    if batch.input_ids is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
        batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device)
        batch.prefill_input_ids_cpu = None
    fb = ForwardBatch.init_new(batch, model_runner, return_hidden_states_before_norm=False)
    original = lm.forward_split_prefill
    extra = {"input_embeds": input_embeds}
    if deepstack is not None:
        extra["input_deepstack_embeds"] = deepstack
    lm.forward_split_prefill = functools.partial(original, **extra)
    try:
        ret = None
        fb.forward_mode = ForwardMode.SPLIT_PREFILL
        while fb.split_index < model_runner.model_config.num_hidden_layers:
            ret = model_runner.forward(fb, split_forward_count=1).logits_output
    finally:
        lm.forward_split_prefill = original
    model_runner.req_to_token_pool.clear()
    model_runner.token_to_kv_pool_allocator.clear()
    return ret.next_token_logits[0].float().clone()


def run_case(model_runner, encoder, hf_config, model_path: str, case, max_new_tokens: int) -> dict:
    from PIL import Image

    from sglang.benchmark import one_batch as ob
    from sglang.srt.managers.schedule_batch import MultimodalInputs, Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    from epd_testbed.hf_reference import _tok_and_proc, render_prompt

    _, proc = _tok_and_proc(model_path)
    text, paths = render_prompt(model_path, case.messages())
    images = [Image.open(p).convert("RGB") for p in paths]
    inputs = proc(text=[text], images=images or None, return_tensors="pt")
    ids = inputs["input_ids"][0]
    lm = model_runner.model
    embed = lm.model.embed_tokens
    with torch.no_grad():
        text_embeds = embed(ids)  # the language side embeds the prompt's text itself
        if images:
            encoded = encoder.encode(ids, _mm_items(inputs))
            input_embeds, deepstack = encoded.scatter(text_embeds)
            grid = inputs["image_grid_thw"]
        else:
            input_embeds, deepstack, grid = text_embeds.clone(), None, None
    mrope_positions, delta = _mrope(hf_config, ids, grid)

    def make_req() -> Req:
        sp = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
        sp.normalize(None)
        # input_embeds go straight to the model's forward, like deepstack: upstream's model
        # runner casts batch input_embeds to bfloat16 unconditionally
        # (model_runner._extend_forward_kwargs), which would make an fp32 comparison meaningless.
        req = Req(rid=case.name, origin_input_text=text, origin_input_ids=array("q", ids.tolist()),
                  sampling_params=sp)
        req.full_untruncated_fill_ids = req.origin_input_ids
        req.logprob_start_len = -1
        req.extend_end = len(req.origin_input_ids)
        req.multimodal_inputs = MultimodalInputs(mm_items=[], mrope_positions=mrope_positions,
                                                 mrope_position_delta=delta)
        return req

    split_logits = _split_prefill_logits(model_runner, make_req(), input_embeds, deepstack)
    # control: the same prefill with deepstack dropped (it must matter for image prompts)
    without_deepstack = (None if deepstack is None else
                         _split_prefill_logits(model_runner, make_req(), input_embeds, None))
    req = make_req()
    original_forward = lm.forward
    lm.forward = functools.partial(_forward_with, original_forward, input_embeds, deepstack)
    try:
        next_ids, logits, batch = ob.extend([req], model_runner)
    finally:
        lm.forward = original_forward
    tokens, all_logits = [int(next_ids[0])], [logits[0].float().clone()]
    for _ in range(max_new_tokens - 1):
        next_ids, logits = ob.decode(next_ids, batch, model_runner)
        tokens.append(int(next_ids[0]))
        all_logits.append(logits[0].float().clone())
    model_runner.req_to_token_pool.clear()
    model_runner.token_to_kv_pool_allocator.clear()
    return {"tokens": tokens, "logits": torch.stack(all_logits), "split_prefill_logits": split_logits,
            "logits_without_deepstack": without_deepstack,
            "num_deepstack": lm.model.deepstack.num_deepstack,
            "num_image_rows": 0 if deepstack is None else int((deepstack.abs().sum(1) > 0).sum())}


def main(argv: list[str] | None = None) -> None:
    from epd_testbed.cases import MAX_NEW_TOKENS, VL_CASES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_path")
    ap.add_argument("out")
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cases = [c for c in VL_CASES if not args.cases or c.name in args.cases]
    torch.set_grad_enabled(False)
    runner = _load_language_runner(args.model_path)
    # The encode-only model is built outside SGLang's loader: build it in fp32.
    torch.set_default_dtype(torch.float32)
    lm = runner.model
    assert type(lm).__name__ == LANGUAGE_ARCH, type(lm)
    assert not any(n.startswith(("visual", "model.visual")) for n, _ in lm.named_parameters())
    hf_config = runner.model_config.hf_config
    encoder = _load_encoder(args.model_path, hf_config)
    enc_params = dict(encoder.model.named_parameters())
    results = {"__meta__": {"vision_weights_skipped": dict(vars(lm.vision_weights_skipped)),
                            "language_params": sum(p.numel() for p in lm.parameters()),
                            "language_config_flags": [f for f in ("encoder_only", "language_only")
                                                      if hasattr(lm.config, f)],
                            "encoder_params": sum(p.numel() for p in enc_params.values()),
                            "encoder_modules": sorted({n.split(".")[0] for n in enc_params}),
                            "encoder_non_vision_params": sorted(n for n in enc_params
                                                                if not n.startswith("visual."))}}
    for case in cases:
        results[case.name] = run_case(runner, encoder, hf_config, args.model_path, case, args.max_new_tokens)
        print(case.name, results[case.name]["tokens"], flush=True)
    results["__encode__"] = encode_against_hf(encoder, args.model_path)
    one_image = next(c for c in VL_CASES if c.name == "one_image")
    results["__text_stacks__"] = text_stacks(runner, encoder, hf_config, args.model_path, one_image)
    torch.save(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
