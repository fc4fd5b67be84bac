"""The tiny-checkpoint generator: deterministic, cached by spec, released expert layout, any K."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from epd_testbed import tiny_ckpt
from epd_testbed.tiny_ckpt import TinyTextMoeSpec, TinyVLMoeSpec, check_expert_layout, ensure_checkpoint


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_same_spec_is_byte_identical_in_two_caches(tmp_path, monkeypatch) -> None:
    spec = TinyVLMoeSpec(text_layers=2, deepstack_visual_indexes=(0, 2))
    monkeypatch.setenv("SGLANG_FORK_CACHE", str(tmp_path / "a"))
    a = ensure_checkpoint(spec)
    monkeypatch.setenv("SGLANG_FORK_CACHE", str(tmp_path / "b"))
    b = ensure_checkpoint(spec)
    assert a != b and _digests(a) == _digests(b)
    assert ensure_checkpoint(spec) == b  # cached: same path, no rebuild
    other = ensure_checkpoint(TinyVLMoeSpec(text_layers=2, deepstack_visual_indexes=(0, 2), seed=1))
    assert other != b and _digests(other)["model.safetensors"] != _digests(b)["model.safetensors"]


@pytest.mark.parametrize("indexes", [(), (0, 1), (0, 2), (0, 1, 2, 3)], ids=lambda i: f"K{len(i)}")
def test_vl_config_and_released_expert_layout(indexes) -> None:
    spec = TinyVLMoeSpec(vision_depth=4, deepstack_visual_indexes=indexes)
    path = ensure_checkpoint(spec)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3VLMoeForConditionalGeneration"]
    assert cfg["vision_config"]["deepstack_visual_indexes"] == list(indexes)
    assert cfg["text_config"]["moe_intermediate_size"] != cfg["text_config"]["hidden_size"]
    check_expert_layout(path)
    for name in ("tokenizer.json", "preprocessor_config.json", "video_preprocessor_config.json", "chat_template.jinja"):
        assert (path / name).is_file(), name


def test_text_checkpoint_per_expert_layout() -> None:
    path = ensure_checkpoint(TinyTextMoeSpec())
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]
    check_expert_layout(path)


def test_wrong_layout_is_caught(tmp_path) -> None:
    """check_expert_layout must fail on the transformers-native [E, out, in] layout."""
    from safetensors.torch import load_file, save_file

    src = ensure_checkpoint(TinyVLMoeSpec())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    tensors = {k: (v.transpose(1, 2).contiguous() if k.endswith("experts.gate_up_proj") else v) for k, v in tensors.items()}
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(AssertionError, match="released layout"):
        check_expert_layout(bad)


@pytest.mark.parametrize("kwargs, message", [
    (dict(deepstack_visual_indexes=(0, 3)), "deepstack"),
    (dict(moe_intermediate=128), "moe_intermediate"),
])
def test_invalid_specs_are_rejected(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        TinyVLMoeSpec(**kwargs).validate()


def test_cli_prints_cached_path(capsys) -> None:
    tiny_ckpt.main(["text"])
    assert Path(capsys.readouterr().out.strip()) == ensure_checkpoint(TinyTextMoeSpec())
