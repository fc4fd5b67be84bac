"""Patch 0006: a model's ``skip_checkpoint_tensor`` makes the safetensors iterators skip tensors
from their header, never reading them (the language side skips the whole vision tower), memory-
mapped or with ``disable_mmap`` (sglang/srt/model_loader/checkpoint_skip.py)."""
from __future__ import annotations

import json
import math
import os
import struct

import pytest
import safetensors
import torch
from safetensors.torch import load_file

from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint
from sglang.srt.model_loader import checkpoint_skip, weight_utils
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


class _CountingFile:
    """A file opened by checkpoint_skip without mmap, counting the bytes read from it."""

    read_bytes = 0

    def __init__(self, *args, **kwargs):
        self._f = open(*args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def seek(self, *args):
        return self._f.seek(*args)

    def read(self, *args):
        data = self._f.read(*args)
        _CountingFile.read_bytes += len(data)
        return data


def _kept_bytes(files) -> int:
    """From the shards' headers: the 8-byte length, the header and the data of non-vision
    tensors, i.e. what reading everything but the vision tensors costs."""
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += 8 + n + sum(info["data_offsets"][1] - info["data_offsets"][0]
                             for name, info in header.items()
                             if name != "__metadata__" and not is_vision_weight(name))
    return total


@pytest.mark.parametrize("disable_mmap", [False, True], ids=["mmap", "disable_mmap"])
@pytest.mark.parametrize("iterator", ["single", "multi_thread"])
def test_vision_tensors_are_never_read(checkpoint, iterator, disable_mmap, monkeypatch) -> None:
    """issue 7 item 7 (the disable_mmap cases): both iterators skip vision tensors unread, also
    when the loader reads shards without mmap (there, only the kept tensors' bytes are read)."""
    files, reference = checkpoint
    monkeypatch.setattr(checkpoint_skip, "open", _CountingFile, raising=False)
    _CountingFile.read_bytes = 0
    model = _Model()
    skip = vision_tensor_skipper(model)
    if iterator == "single":
        it = weight_utils.safetensors_weights_iterator(files, disable_mmap=disable_mmap, skip_tensor=skip)
    else:
        it = weight_utils.buffered_multi_thread_safetensors_weights_iterator(
            files, max_workers=2, disable_mmap=disable_mmap, skip_tensor=skip)
    got = dict(it)
    vision = sorted(k for k in reference if is_vision_weight(k))
    assert vision and len(vision) < len(reference)
    assert sorted(got) == sorted(k for k in reference if not is_vision_weight(k))
    assert not [n for n in _RecordingSafeOpen.read if is_vision_weight(n)]
    if disable_mmap:
        assert _CountingFile.read_bytes == _kept_bytes(files)
        assert _CountingFile.read_bytes < sum(os.path.getsize(f) for f in files)
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
    unmapped = dict(weight_utils.safetensors_weights_iterator(files, disable_mmap=True))
    assert sorted(unmapped) == sorted(reference)
    assert all(torch.equal(unmapped[k], reference[k]) for k in reference)
