"""Tiny random Qwen3-VL-MoE and Qwen3-MoE checkpoints in the *released* on-disk layout.

No hub access exists, so the test bed generates its own checkpoints: a locally trained byte-level
BPE tokenizer with Qwen's special tokens and chat template, seeded random weights scaled so that
greedy decoding is not degenerate, and expert tensors rewritten to the layout that released
checkpoints (and SGLang's loaders) use. Results are cached by spec (see cache.py).

CLI: ``python -m epd_testbed.tiny_ckpt vl|text [--seed N ...]`` prints the checkpoint path.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import ensure_dir, keyed_dir

# Qwen's special tokens, appended after the BPE vocab in Qwen's order.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen-style chat template. Content is a string or a list of OpenAI-style parts; SGLang's
# serving layer normalises image_url parts to {"type": "image"}, HF callers may pass either.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part is string -%}{{- part -}}"
    "{%- elif part['type'] is defined and part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif (part['type'] is defined and part['type'] in ['image', 'image_url'])"
    " or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif (part['type'] is defined and part['type'] in ['video', 'video_url'])"
    " or 'video' in part or 'video_url' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Image processor pixel budget: factor 32 (patch 16 x merge 2). 64x64 -> 4 tokens,
# 200x120 -> 128x192 -> 24 tokens; at most 64 tokens per image.
MIN_PIXELS = 4 * 32 * 32
MAX_PIXELS = 64 * 32 * 32


@dataclass(frozen=True)
class TinyVLMoeSpec:
    """Shape and seed of a tiny Qwen3-VL-MoE checkpoint (Qwen3VLMoeForConditionalGeneration)."""

    text_hidden: int = 128
    text_layers: int = 4
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate: int = 48
    head_dim: int = 32
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 3
    vision_hidden: int = 64
    vision_heads: int = 4
    vision_intermediate: int = 128
    vision_out_hidden: int = 128
    deepstack_visual_indexes: tuple[int, ...] = (0, 1, 2)
    vocab_size: int | None = None  # None: exactly the tokenizer's length
    seed: int = 0
    mrope_section: tuple[int, int, int] = (6, 5, 5)
    mrope_interleaved: bool = True
    rope_theta: float = 5_000_000.0
    max_position_embeddings: int = 8192
    tokenizer_vocab: int = 1500

    def validate(self) -> None:
        _check_moe(self.text_hidden, self.moe_intermediate, self.num_heads, self.num_kv_heads)
        ds = self.deepstack_visual_indexes
        if self.vision_out_hidden != self.text_hidden:
            raise ValueError("vision_out_hidden must equal text_hidden (merger output feeds the LLM)")
        if len(set(ds)) != len(ds) or any(not 0 <= i < self.vision_depth for i in ds):
            raise ValueError(f"deepstack_visual_indexes {ds} must be distinct and < vision_depth")
        if len(ds) > self.text_layers:
            raise ValueError("deepstack injects into the first K LLM layers: need K <= text_layers")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError("2 * sum(mrope_section) must equal head_dim")
        if self.vision_hidden % self.vision_heads:
            raise ValueError("vision_hidden must be divisible by vision_heads")


# Deepstack counts other than the default K=3, shared by the tests that serve them: K=2 with
# non-contiguous indexes (fewer slices than upstream's former hard-coded three), and K=4 with
# non-contiguous indexes of a 6-block vision tower on a 4-layer text model, i.e. shallower than
# K+1 layers (a slice is added after the last decoder layer).
DEEPSTACK_K2_NONCONTIG = TinyVLMoeSpec(deepstack_visual_indexes=(0, 2))
DEEPSTACK_K4_NONCONTIG_SHALLOW = TinyVLMoeSpec(
    deepstack_visual_indexes=(0, 2, 3, 5), vision_depth=6, text_layers=4)


@dataclass(frozen=True)
class TinyTextMoeSpec:
    """Shape and seed of a tiny plain Qwen3-MoE text checkpoint (Qwen3MoeForCausalLM)."""

    hidden: int = 128
    layers: int = 4
    experts: int = 8
    top_k: int = 2
    moe_intermediate: int = 48
    head_dim: int = 32
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int | None = None
    seed: int = 0
    rope_scaling: dict[str, Any] | None = None  # extra rope_parameters, e.g. yarn
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 8192
    tokenizer_vocab: int = 1500

    def validate(self) -> None:
        _check_moe(self.hidden, self.moe_intermediate, self.num_heads, self.num_kv_heads)


def _check_moe(hidden: int, inter: int, heads: int, kv_heads: int) -> None:
    # HF reloads the released expert layout by transposing only when shapes mismatch, so a
    # square expert tensor would load silently wrong: keep I, 2I and hidden all distinct.
    if inter == hidden or 2 * inter == hidden:
        raise ValueError("moe_intermediate and 2*moe_intermediate must differ from hidden size")
    if heads % kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")


# ----------------------------------------------------------------------------- tokenizer

_WORDS = {
    "color": "red green blue yellow orange purple black white gray pink brown cyan magenta violet "
             "golden silver beige navy teal maroon olive crimson amber indigo",
    "shape": "circle square triangle rectangle star line dot ellipse cube sphere hexagon polygon "
             "arrow curve spiral cross heart diamond oval cylinder cone pyramid grid stripe",
    "noun": "image picture photo video frame scene corner center edge background pixel camera "
            "window table chair house tree river mountain cloud street garden kitchen bottle book "
            "screen clock flower animal person child dog cat bird horse car boat train road sky "
            "ocean beach forest city building bridge field wall door floor light shadow mirror",
    "verb": "shows contains has depicts holds displays reveals includes features presents covers "
            "surrounds touches follows crosses reflects hides frames fills splits marks",
    "adj": "small large bright dark round sharp smooth striped tiny huge blurry clear noisy soft "
           "heavy light narrow wide tall short old new empty full quiet busy warm cold",
    "adv": "clearly slowly quickly almost nearly partly mostly rarely often always never",
    "prep": "above below beside behind inside outside near under over between across along",
    "num": "zero one two three four five six seven eight nine ten eleven twelve twenty thirty "
           "forty fifty hundred thousand first second third last half quarter",
}
_W = {k: v.split() for k, v in _WORDS.items()}
_QUESTIONS = (
    "What is in the image?", "Describe the picture.", "How many shapes are there?",
    "What color is the circle?", "Where is the square?", "Is there a star in the photo?",
    "Compare the two images.", "What happens in the video?", "Please answer briefly.",
)


def _corpus(seed: int = 0, sentences: int = 4000) -> list[str]:
    """Deterministic English text about colors, shapes, images and numbers (~250 KB)."""
    rng = random.Random(seed)
    w = {k: (lambda v=v: rng.choice(v)) for k, v in _W.items()}
    forms = (
        "The {noun} {verb} a {adj} {color} {shape} {prep} the {noun}.",
        "There are {k} {color} {shape}s in the {noun}, and {k2} of them are {adj}.",
        "A {shape} at ({k}, {k2}) is {color}; its size is {f} units and it is {adv} {adj}.",
        "Q: {q} A: The {color} {shape} is {prep} the {adj} {noun}.",
        "User asked about {noun} number {k}. The assistant said it {verb} {num} {shape}s!",
        "In {year}, the {adj} {noun} was {color} and the {noun2} was {adv} {color2}.",
        "{Num} {adj} {noun}s stood {prep} a {color} {shape}, which {verb} {num} {noun2}s.",
        "Is the {noun} {adj}? Yes, it is {adv} {adj} and {color}, about {k}% of the {noun2}.",
    )
    lines: list[str] = list(_QUESTIONS)
    for i in range(sentences):
        k = rng.randrange(1, 1000)
        num = w["num"]()
        lines.append(forms[i % len(forms)].format(
            noun=w["noun"](), noun2=w["noun"](), verb=w["verb"](), adj=w["adj"](), adv=w["adv"](),
            color=w["color"](), color2=w["color"](), shape=w["shape"](), prep=w["prep"](),
            num=num, Num=num.capitalize(), q=rng.choice(_QUESTIONS), k=k, k2=rng.randrange(1000),
            f=f"{k / 8:.2f}", year=1800 + k % 300))
    return lines


def _build_tokenizer(out: Path, vocab_target: int) -> None:
    """Train a byte-level BPE with Qwen2's exact pipeline and save it as a Qwen2Tokenizer.

    Qwen2Tokenizer (transformers 5) rebuilds its backend from vocab/merges with a fixed
    normaliser/pre-tokeniser, so training must use the same pipeline for tokenizer.json and the
    transformers object to agree.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(_corpus(), trainer=trainer)
    model_json = json.loads(raw.to_str())["model"]
    tok = Qwen2Tokenizer(
        vocab=model_json["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                           for m in model_json["merges"]],
        unk_token=None, bos_token=None, eos_token=None, pad_token=None, model_max_length=32768,
    )
    # Add in Qwen's order first (ids follow the BPE vocab), then name eos/pad among them.
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in SPECIAL_TOKENS]})
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def ensure_tokenizer(vocab_target: int = 1500) -> Path:
    """Cached tokenizer dir, shared by all checkpoints with the same vocab target."""
    return ensure_dir(keyed_dir("tokenizer", {"vocab_target": vocab_target}),
                      lambda tmp: _build_tokenizer(tmp, vocab_target))


def _token_ids(tok_dir: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    ids["__len__"] = len(tok)
    return ids


# ----------------------------------------------------------------------------- weights


def _init_weights(model: Any, seed: int) -> None:
    """Seeded, order-independent init scaled like 1/sqrt(fan_in).

    HF's default init (std 0.02, zero norms) gives nearly flat logits (std ~0.2) and greedy
    decoding that mostly repeats one token; unit-scale activations give varied outputs. Each tensor gets its own
    generator keyed by (seed, name) so adding a layer does not reshuffle the others.
    """
    import torch

    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        with torch.no_grad():
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # biases
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "pos_embed" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1] if p.dim() <= 3 else int(torch.tensor(p.shape[1:]).prod())
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def _muted_token_ids(tok_dir: Path) -> list[int]:
    """Ids the tiny models should never emit: special tokens except <|im_end|>, and tokens
    that do not decode to printable ASCII (or newline), e.g. lone bytes of UTF-8 sequences.

    A random model would otherwise emit <|image_pad|> or half a UTF-8 character now and then,
    making decoded text, streaming detokenisation and multi-turn replays awkward to compare.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    muted = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS if t != "<|im_end|>"]
    for i in range(len(tok)):
        text = tok.decode([i])
        if i not in muted and text not in SPECIAL_TOKENS and not all(
                c == "\n" or (c.isascii() and c.isprintable()) for c in text):
            muted.append(i)
    return sorted(muted)


def _mute_tokens(model: Any, muted: list[int]) -> None:
    """Zero their lm_head rows: a logit of exactly 0 never wins the argmax against ~1000
    unit-scale logits, while ordinary tokens and <|im_end|> (a rare stop) stay possible."""
    import torch

    with torch.no_grad():
        model.get_output_embeddings().weight[muted] = 0.0


def _rewrite_safetensors(ckpt: Path, convert: Any) -> None:
    """Apply `convert(tensors) -> tensors` to every shard, keeping file metadata and index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = ckpt / "model.safetensors.index.json"
    files = sorted({f for f in json.loads(index_path.read_text())["weight_map"].values()}) \
        if index_path.exists() else ["model.safetensors"]
    weight_map: dict[str, str] = {}
    for fname in files:
        with safe_open(ckpt / fname, framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors = {k: v.contiguous() for k, v in convert(tensors).items()}
        save_file(tensors, ckpt / fname, metadata=metadata)
        weight_map.update({k: fname for k in tensors})
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _to_released_vl(tensors: dict[str, Any]) -> dict[str, Any]:
    """HF 5 saves fused experts as [E, out, in]; released Qwen3-VL-MoE uses [E, in, out]."""
    return {k: v.transpose(-1, -2) if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")) else v
            for k, v in tensors.items()}


def _to_released_text(tensors: dict[str, Any]) -> dict[str, Any]:
    """Split fused [E, 2I, H] / [E, H, I] experts into released per-expert nn.Linear weights."""
    out: dict[str, Any] = {}
    for k, v in tensors.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            base, inter = k[: -len("gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = v[e, :inter].clone()
                out[f"{base}{e}.up_proj.weight"] = v[e, inter:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v
    return out


def check_expert_layout(ckpt: str | Path) -> None:
    """Assert the on-disk experts use the released layout, reading the safetensors header.

    HF's reload cannot be trusted to catch a wrong layout (it transposes mismatching fused
    experts by itself), while SGLang's loader transposes unconditionally, so check the file.
    """
    from safetensors import safe_open

    ckpt = Path(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    e = text.get("num_experts") or text["num_local_experts"]
    h, i = text["hidden_size"], text["moe_intermediate_size"]
    vl = "vision_config" in cfg
    want = {"gate_up_proj": [e, h, 2 * i], "down_proj": [e, i, h]} if vl else \
        {"gate_proj.weight": [i, h], "up_proj.weight": [i, h], "down_proj.weight": [h, i]}
    seen = 0
    for fname in sorted(ckpt.glob("*.safetensors")):
        with safe_open(fname, framework="pt") as f:
            for k in f.keys():
                if ".mlp.experts." in k:
                    suffix = k.rsplit(".mlp.experts.", 1)[1].split(".", 1)[-1] if not vl else k.rsplit(".", 1)[1]
                    shape = f.get_slice(k).get_shape()
                    if want.get(suffix) != shape:
                        raise AssertionError(f"{fname.name}:{k} is {shape}, released layout: {want.get(suffix)}")
                    if vl and not k.startswith("model.language_model.layers."):
                        raise AssertionError(f"unexpected expert key {k}")
                    seen += 1
    expected = text["num_hidden_layers"] * (2 if vl else 3 * e)
    if seen != expected:
        raise AssertionError(f"found {seen} expert tensors, expected {expected}")


def _copy_tokenizer(tok_dir: Path, out: Path) -> None:
    for f in sorted(tok_dir.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            shutil.copyfile(f, out / f.name)


def _save_generation_config(out: Path, ids: dict[str, int]) -> None:
    from transformers import GenerationConfig

    GenerationConfig(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                     pad_token_id=ids["<|endoftext|>"]).save_pretrained(out)


def _vocab_size(spec_vocab: int | None, ids: dict[str, int]) -> int:
    if spec_vocab is not None and spec_vocab < ids["__len__"]:
        raise ValueError(f"vocab_size {spec_vocab} < tokenizer length {ids['__len__']}")
    return spec_vocab if spec_vocab is not None else ids["__len__"]


def vl_config(spec: TinyVLMoeSpec, ids: dict[str, int]) -> Any:
    """The transformers Qwen3VLMoeConfig for `spec`, with token ids from the tokenizer."""
    from transformers import Qwen3VLMoeConfig

    text = dict(
        vocab_size=_vocab_size(spec.vocab_size, ids), hidden_size=spec.text_hidden,
        intermediate_size=3 * spec.text_hidden, num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        hidden_act="silu", max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-6,
        tie_word_embeddings=False, attention_bias=False, decoder_sparse_step=1,
        moe_intermediate_size=spec.moe_intermediate, num_experts_per_tok=spec.top_k,
        num_experts=spec.num_experts, mlp_only_layers=[],
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta,
                         "mrope_section": list(spec.mrope_section),
                         "mrope_interleaved": spec.mrope_interleaved},
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=spec.vision_depth, hidden_size=spec.vision_hidden, hidden_act="gelu_pytorch_tanh",
        intermediate_size=spec.vision_intermediate, num_heads=spec.vision_heads, in_channels=3,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=spec.vision_out_hidden,
        num_position_embeddings=576, deepstack_visual_indexes=list(spec.deepstack_visual_indexes),
    )
    return Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def _save_processor(out: Path) -> None:
    """Qwen3VLProcessor (Qwen2VL image processor + Qwen3VL video processor) beside the weights."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    common = dict(patch_size=16, temporal_patch_size=2, merge_size=2,
                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image_proc = Qwen2VLImageProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, **common)
    video_proc = Qwen3VLVideoProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": 4 * MAX_PIXELS},
                                       fps=2, **common)
    proc = Qwen3VLProcessor(image_processor=image_proc, tokenizer=AutoTokenizer.from_pretrained(out),
                            video_processor=video_proc, chat_template=CHAT_TEMPLATE)
    proc.save_pretrained(out)  # transformers 5: one processor_config.json with both sub-configs
    image_proc.save_pretrained(out)  # preprocessor_config.json, for loaders that want it split out
    video_proc.save_pretrained(out)  # video_preprocessor_config.json
    # transformers 5 reads chat_template.jinja; older readers (and some servers) chat_template.json.
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")


def _build(spec: TinyVLMoeSpec | TinyTextMoeSpec, out: Path, model_cls: Any, make_config: Any,
           to_released: Any) -> None:
    """Seeded random model -> released on-disk layout -> tokenizer and generation config beside it."""
    import torch

    tok_dir = ensure_tokenizer(spec.tokenizer_vocab)
    ids = _token_ids(tok_dir)
    torch.manual_seed(spec.seed)
    model = model_cls(make_config(spec, ids)).float().eval()
    _init_weights(model, spec.seed)
    _mute_tokens(model, _muted_token_ids(tok_dir))
    model.save_pretrained(out)
    _rewrite_safetensors(out, to_released)
    check_expert_layout(out)
    _copy_tokenizer(tok_dir, out)
    _save_generation_config(out, ids)


def _build_vl(spec: TinyVLMoeSpec, out: Path) -> None:
    from transformers import Qwen3VLMoeForConditionalGeneration

    _build(spec, out, Qwen3VLMoeForConditionalGeneration, vl_config, _to_released_vl)
    _save_processor(out)


def text_config(spec: TinyTextMoeSpec, ids: dict[str, int]) -> Any:
    """The transformers Qwen3MoeConfig for `spec`."""
    from transformers import Qwen3MoeConfig

    rope = {"rope_type": "default", "rope_theta": spec.rope_theta, **(spec.rope_scaling or {})}
    return Qwen3MoeConfig(
        vocab_size=_vocab_size(spec.vocab_size, ids), hidden_size=spec.hidden,
        intermediate_size=3 * spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, hidden_act="silu",
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters=rope, attention_bias=False, use_sliding_window=False, decoder_sparse_step=1,
        moe_intermediate_size=spec.moe_intermediate, num_experts_per_tok=spec.top_k, num_experts=spec.experts,
        norm_topk_prob=True, mlp_only_layers=[], bos_token_id=None,
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )


def _build_text(spec: TinyTextMoeSpec, out: Path) -> None:
    from transformers import Qwen3MoeForCausalLM

    _build(spec, out, Qwen3MoeForCausalLM, text_config, _to_released_text)


def spec_params(spec: TinyVLMoeSpec | TinyTextMoeSpec) -> dict[str, Any]:
    """JSON-able identity of a spec (the cache key)."""
    return {"class": type(spec).__name__, **dataclasses.asdict(spec)}


def ensure_checkpoint(spec: TinyVLMoeSpec | TinyTextMoeSpec) -> Path:
    """Cached checkpoint dir for `spec`, generated (atomically) on first use."""
    spec.validate()
    if isinstance(spec, TinyVLMoeSpec):
        kind, build = "qwen3vlmoe", _build_vl
    else:
        kind, build = "qwen3moe", _build_text
    return ensure_dir(keyed_dir(kind, spec_params(spec)), lambda tmp: build(spec, tmp))  # type: ignore[arg-type]


def is_vl_checkpoint(path: str | Path) -> bool:
    """True when the checkpoint at `path` is a Qwen3-VL-MoE (has a vision config)."""
    return "vision_config" in json.loads((Path(path) / "config.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["vl", "text"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, help="text layers")
    parser.add_argument("--experts", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--vision-depth", type=int, help="vl only")
    parser.add_argument("--deepstack", type=str, help="vl only: comma-separated indexes, '' for none")
    args = parser.parse_args(argv)
    if args.kind == "vl":
        kw: dict[str, Any] = {"seed": args.seed}
        for src, dst in (("layers", "text_layers"), ("experts", "num_experts"), ("top_k", "top_k"),
                         ("vision_depth", "vision_depth")):
            if getattr(args, src) is not None:
                kw[dst] = getattr(args, src)
        if args.deepstack is not None:
            kw["deepstack_visual_indexes"] = tuple(int(x) for x in args.deepstack.split(",") if x.strip())
        spec: TinyVLMoeSpec | TinyTextMoeSpec = TinyVLMoeSpec(**kw)
    else:
        kw = {"seed": args.seed}
        for src in ("layers", "experts", "top_k"):
            if getattr(args, src) is not None:
                kw[src] = getattr(args, src)
        spec = TinyTextMoeSpec(**kw)
    print(ensure_checkpoint(spec))


if __name__ == "__main__":
    main()
