"""Patch 0006: a model's ``skip_checkpoint_tensor`` makes the safetensors iterators skip tensors
from their header, never reading them (the language side skips the whole vision tower)."""
from __future__ import annotations

import math

import pytest
import safetensors
import torch
from safetensors.torch import load_file

from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint
from sglang.srt.model_loader import weight_utils
from sglang.srt.models.qwen3_vl_moe_language import is_vision_weight, vision_tensor_skipper


_REAL_SAFE_OPEN = safetensors.safe_open


class _RecordingSafeOpen:
    """safetensors.safe_open that records which tensors were actually read."""

    read: list[str] = []

    def __init__(self, *args, **kwargs):
        self._f = _REAL_SAFE_OPEN(*args, **kwargs)

    def __enter__(self):
        self._inner = self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def keys(self):
        return self._inner.keys()

    def get_slice(self, name):
        return self._inner.get_slice(name)

    def get_tensor(self, name):
        _RecordingSafeOpen.read.append(name)
        return self._inner.get_tensor(name)


@pytest.fixture()
def checkpoint(monkeypatch):
    path = ensure_checkpoint(TinyVLMoeSpec())
    monkeypatch.setattr(weight_utils.safetensors, "safe_open", _RecordingSafeOpen)
    _RecordingSafeOpen.read = []
    files = sorted(str(p) for p in path.glob("*.safetensors"))
    reference = {k: v for f in files for k, v in load_file(f).items()}  # independent full read
    return files, reference


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float32))


@pytest.mark.parametrize("iterator", ["single", "multi_thread"])
def test_vision_tensors_are_never_read(checkpoint, iterator) -> None:
    files, reference = checkpoint
    model = _Model()
    skip = vision_tensor_skipper(model)
    if iterator == "single":
        it = weight_utils.safetensors_weights_iterator(files, skip_tensor=skip)
    else:
        it = weight_utils.buffered_multi_thread_safetensors_weights_iterator(files, max_workers=2, skip_tensor=skip)
    got = dict(it)
    vision = sorted(k for k in reference if is_vision_weight(k))
    assert vision and len(vision) < len(reference)
    assert sorted(got) == sorted(k for k in reference if not is_vision_weight(k))
    assert not [n for n in _RecordingSafeOpen.read if is_vision_weight(n)]
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name]), name
    counted = model.vision_weights_skipped
    assert counted.tensors == len(vision)
    assert counted.parameters == sum(reference[k].numel() for k in vision)
    assert counted.bytes == counted.parameters * 4  # the model's fp32 parameters


def test_without_skipper_every_tensor_is_read(checkpoint) -> None:
    files, reference = checkpoint
    got = dict(weight_utils.safetensors_weights_iterator(files))
    assert sorted(got) == sorted(reference) == sorted(_RecordingSafeOpen.read)
    assert math.prod(got[next(iter(got))].shape) > 0
