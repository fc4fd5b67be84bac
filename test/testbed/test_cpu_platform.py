"""The CPU platform plugin activates only on hosts without a GPU (or when forced)."""
from __future__ import annotations

import importlib.metadata as md

import pytest
import torch

import sglang_cpu_platform


def test_entry_point_is_registered() -> None:
    eps = [e for e in md.entry_points(group="sglang.srt.platforms") if e.name == "cpu_native"]
    assert len(eps) == 1 and eps[0].value == "sglang_cpu_platform:activate"


@pytest.mark.parametrize("switch, cuda, expected", [
    (None, False, sglang_cpu_platform.PLATFORM_CLASS),
    (None, True, None),            # a GPU host: never hijack it
    ("1", True, sglang_cpu_platform.PLATFORM_CLASS),
    ("0", False, None),
])
def test_activation(monkeypatch, switch, cuda, expected) -> None:
    if switch is None:
        monkeypatch.delenv("SGLANG_CPU_PLATFORM", raising=False)
    else:
        monkeypatch.setenv("SGLANG_CPU_PLATFORM", switch)
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert sglang_cpu_platform.activate() == expected


def test_sglang_resolves_the_platform_here() -> None:
    from sglang.srt.platforms import current_platform

    assert type(current_platform).__name__ == "TorchNativeCpuPlatform"
    assert current_platform.get_device() == "cpu"
    assert current_platform.get_default_attention_backend() == "torch_native"
