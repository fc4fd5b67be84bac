"""Hugging Face transformers reference (fp32, greedy) that SGLang outputs are compared against.

Prompts are rendered with the checkpoint's own chat template so the SGLang side can send the
identical prompt text plus image files to /generate.
"""
from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .cache import cache_root, ensure_file

Message = dict[str, Any]

_MODELS: dict[str, Any] = {}
_PROCESSORS: dict[str, Any] = {}


def _is_vl(model_path: str | Path) -> bool:
    from .tiny_ckpt import is_vl_checkpoint

    return is_vl_checkpoint(model_path)


def _materialise_image(ref: Any) -> Path:
    """File path for an image reference: a path, file:// URL, base64 data URL or PIL image."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        from .images import to_data_url

        ref = to_data_url(ref)
    ref = str(ref)
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        raw = base64.b64decode(payload) if ";base64" in header else unquote(payload).encode()
        suffix = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}.get(
            header[5:].split(";")[0], ".img")
        target = cache_root() / "images" / f"dataurl-{hashlib.sha256(raw).hexdigest()[:16]}{suffix}"
        return ensure_file(target, lambda tmp: tmp.write_bytes(raw))
    if ref.startswith("file://"):
        return Path(unquote(urlparse(ref).path))
    if "://" in ref:
        raise ValueError(f"only local paths and data URLs are supported (no network): {ref[:60]}")
    return Path(ref)


def _image_refs(messages: list[Message]) -> list[Any]:
    """Image references in prompt order; rejects videos (not supported by this harness)."""
    refs: list[Any] = []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "image_url" or "image_url" in part:
                url = part["image_url"]
                refs.append(url["url"] if isinstance(url, dict) else url)
            elif kind == "image" or "image" in part:
                refs.append(part.get("image") or part.get("url") or part.get("path"))
            elif kind in ("video", "video_url") or "video" in part:
                raise NotImplementedError("hf_reference handles images only, not videos")
    return refs


def _tok_and_proc(model_path: str | Path) -> tuple[Any, Any]:
    from transformers import AutoProcessor, AutoTokenizer

    key = str(model_path)
    if key not in _PROCESSORS:
        _PROCESSORS[key] = (AutoProcessor if _is_vl(model_path) else AutoTokenizer).from_pretrained(key)
    proc = _PROCESSORS[key]
    return getattr(proc, "tokenizer", proc), proc


def render_prompt(model_path: str | Path, messages: list[Message]) -> tuple[str, list[str]]:
    """(prompt text with one <|image_pad|> per image, image file paths in order)."""
    tok, _ = _tok_and_proc(model_path)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, [str(_materialise_image(r)) for r in _image_refs(messages)]


def load_model(model_path: str | Path) -> Any:
    """fp32 eval-mode HF model for the checkpoint, cached per path in this process.

    Released Qwen3-VL-MoE expert layout ([E, in, out]) loads as is: transformers 5's
    qwen3_vl_moe conversion transposes fused experts whose shape differs from the module's.
    """
    import torch

    key = str(model_path)
    if key not in _MODELS:
        if _is_vl(model_path):
            from transformers import Qwen3VLMoeForConditionalGeneration as cls
        else:
            from transformers import AutoModelForCausalLM as cls  # type: ignore[no-redef]
        _MODELS[key] = cls.from_pretrained(key, dtype=torch.float32).eval()
    return _MODELS[key]


def _generate(model_path: str | Path, inputs: dict[str, Any], max_new_tokens: int, ignore_eos: bool) -> list[int]:
    import torch
    from transformers import GenerationConfig

    model = load_model(model_path)
    tok, _ = _tok_and_proc(model_path)
    # A fresh GenerationConfig: greedy, no repetition tweaks; eos stops unless ignore_eos (then
    # eos may still be emitted, as with SGLang's ignore_eos, rather than being masked out).
    gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                           pad_token_id=tok.pad_token_id,
                           eos_token_id=None if ignore_eos else model.generation_config.eos_token_id)
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=gen)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_greedy(model_path: str | Path, messages: list[Message], max_new_tokens: int = 16,
              ignore_eos: bool = False) -> list[int]:
    """Greedy new-token ids for OpenAI-style chat `messages` (images as paths or data URLs)."""
    from PIL import Image

    text, paths = render_prompt(model_path, messages)
    if not _is_vl(model_path):
        if paths:
            raise ValueError("images given to a text-only checkpoint")
        return hf_text_greedy(model_path, text, max_new_tokens, ignore_eos)
    _, proc = _tok_and_proc(model_path)
    images = [Image.open(p).convert("RGB") for p in paths]
    inputs = proc(text=[text], images=images or None, return_tensors="pt")
    return _generate(model_path, dict(inputs), max_new_tokens, ignore_eos)


def hf_text_greedy(model_path: str | Path, prompt_text: str, max_new_tokens: int = 16,
                   ignore_eos: bool = False) -> list[int]:
    """Greedy new-token ids for a raw prompt string (works for text and VL checkpoints)."""
    tok, _ = _tok_and_proc(model_path)
    inputs = tok(prompt_text, return_tensors="pt")
    return _generate(model_path, dict(inputs), max_new_tokens, ignore_eos)


def hf_greedy_logits(model_path: str | Path, messages: list[Message], max_new_tokens: int = 16) -> tuple[list[int], Any]:
    """Greedy new-token ids and the raw next-token logits of every step ([steps, vocab], fp32),
    eos ignored."""
    import torch
    from PIL import Image
    from transformers import GenerationConfig

    text, paths = render_prompt(model_path, messages)
    tok, proc = _tok_and_proc(model_path)
    if _is_vl(model_path):
        images = [Image.open(p).convert("RGB") for p in paths]
        inputs = dict(proc(text=[text], images=images or None, return_tensors="pt"))
    else:
        inputs = dict(tok(text, return_tensors="pt"))
    model = load_model(model_path)
    gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                           pad_token_id=tok.pad_token_id, eos_token_id=None,
                           output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=gen)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens, torch.stack([step[0].float() for step in out.logits])
