"""Test clips and the Hugging Face fp32 reference for prompts with videos.

Clips come from FFmpeg's ``testsrc`` generator (Debian ``ffmpeg``, installed by ``bin/setup``):
no data set needed. The reference feeds Hugging Face the *same frames* SGLang's Qwen-VL loader
samples and resizes (``sglang.srt.multimodal.processors.qwen_vl.preprocess_video``: frame
indices, bilinear resize, metadata for the timestamps), then runs HF's own processor (timestamp
text, per-frame placeholders, M-RoPE) and HF's model. Only frame selection is shared with the
system under test; the model math is HF's.

``neutralise_pin_memory()`` is the CPU test bed's stand-in for a driver: upstream 0.5.23 pins
decoded frames unconditionally, which raises without an NVIDIA driver.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

from .cache import cache_root, ensure_file


def make_clip(
    width: int = 160, height: int = 120, rate: int = 4, seconds: int = 2
) -> Path:
    """An mp4 test pattern (cached by its parameters)."""
    target = (
        cache_root() / "videos" / f"testsrc-{width}x{height}-{rate}fps-{seconds}s.mp4"
    )

    def build(tmp: Path) -> None:
        subprocess.run(
            [
                "ffmpeg",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                f"testsrc=size={width}x{height}:rate={rate}",
                "-t",
                str(seconds),
                "-pix_fmt",
                "yuv420p",
                "-f",
                "mp4",
                str(tmp),
            ],
            check=True,
            timeout=60,
        )

    return ensure_file(target, build)


def neutralise_pin_memory() -> None:
    """Make ``Tensor.pin_memory`` a no-op when no CUDA device exists (test bed only)."""
    import torch

    if not torch.cuda.is_available():
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self  # type: ignore[method-assign]


def sglang_frames(path: str | Path) -> tuple[Any, dict]:
    """(frames ``[T, C, H, W]`` uint8, metadata) exactly as SGLang's Qwen-VL loader prepares
    them for the HF processor."""
    from sglang.srt.multimodal.processors.qwen_vl import preprocess_video
    from sglang.srt.utils.video_decoder import VideoDecoderWrapper

    neutralise_pin_memory()
    return asyncio.run(preprocess_video(VideoDecoderWrapper(str(path))))


def video_refs(messages: list[dict]) -> list[str]:
    """Video paths of ``video_url`` parts, in prompt order."""
    return [
        part["video_url"]["url"]
        for msg in messages
        if isinstance(msg.get("content"), list)
        for part in msg["content"]
        if isinstance(part, dict) and part.get("type") == "video_url"
    ]


def hf_inputs(model_path: str | Path, messages: list[dict]) -> dict:
    """HF processor output for chat ``messages`` with images and videos (parts in any order)."""
    from PIL import Image

    from .hf_reference import _image_refs, _materialise_image, _tok_and_proc

    tok, proc = _tok_and_proc(model_path)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_msgs = [
        (
            {**m, "content": [p for p in m["content"] if p.get("type") != "video_url"]}
            if isinstance(m.get("content"), list)
            else m
        )
        for m in messages
    ]
    images = [
        Image.open(_materialise_image(r)).convert("RGB")
        for r in _image_refs(image_msgs)
    ]
    videos = [sglang_frames(p) for p in video_refs(messages)]
    kwargs: dict = {}
    if videos:
        kwargs = dict(
            videos=[v for v, _ in videos],
            video_metadata=[m for _, m in videos],
            do_sample_frames=False,
        )
    return dict(proc(text=[text], images=images or None, return_tensors="pt", **kwargs))


def hf_greedy_logprobs(
    model_path: str | Path, messages: list[dict], max_new_tokens: int
) -> tuple[list[int], list[float], int]:
    """(greedy token ids, their log-probabilities, prompt length) from HF fp32, eos ignored."""
    import torch
    from transformers import GenerationConfig

    from .hf_reference import _tok_and_proc, load_model

    tok, _ = _tok_and_proc(model_path)
    inputs = hf_inputs(model_path, messages)
    gen = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.inference_mode():
        out = load_model(model_path).generate(**inputs, generation_config=gen)
    prompt_len = inputs["input_ids"].shape[1]
    tokens = out.sequences[0, prompt_len:].tolist()
    logprobs = torch.log_softmax(
        torch.stack([s[0] for s in out.logits]).double(), dim=-1
    )
    return tokens, [float(logprobs[i, t]) for i, t in enumerate(tokens)], prompt_len
