"""Torch-native CPU platform plugin for SGLang (test bed only).

SGLang loads every callable registered in the ``sglang.srt.platforms``
entry-point group and calls it with no arguments. Returning the dotted path of
an ``SRTPlatform`` subclass activates that platform; returning ``None``
declines. Because discovery is automatic, this plugin must decline on hosts
that have a usable CUDA device, or it would take over GPU machines where the
package happens to be installed.

Environment switch ``SGLANG_CPU_PLATFORM``:
  unset -> activate only when ``torch.cuda.is_available()`` is False
           (and SGLang's own Intel CPU engine was not requested)
  ``1`` -> always activate (e.g. to exercise the CPU path on a GPU host)
  ``0`` -> never activate
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

ENV_SWITCH = "SGLANG_CPU_PLATFORM"
PLATFORM_CLASS = "sglang_cpu_platform.platform:TorchNativeCpuPlatform"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def activate() -> str | None:
    """Entry point for the ``sglang.srt.platforms`` group."""
    switch = os.environ.get(ENV_SWITCH, "").strip().lower()
    if switch in _FALSE:
        return None
    if switch in _TRUE:
        return PLATFORM_CLASS
    if switch:
        logger.warning("Ignoring unrecognised %s=%r", ENV_SWITCH, switch)

    # SGLANG_USE_CPU_ENGINE=1 asks for SGLang's in-tree (Intel kernel) CPU
    # platform; stay out of its way unless forced above.
    if os.environ.get("SGLANG_USE_CPU_ENGINE", "0") == "1":
        return None

    import torch

    if torch.cuda.is_available():
        return None
    return PLATFORM_CLASS


def __getattr__(name: str):
    # Lazy, and via SGLang first: importing sglang resolves the current
    # platform, which imports ``sglang_cpu_platform.platform`` by name. So a
    # bare ``import sglang_cpu_platform.platform`` before sglang fails with a
    # circular "cannot import name 'current_platform'"; this accessor (or
    # importing sglang first) avoids that.
    if name == "TorchNativeCpuPlatform":
        import sglang.srt.platforms  # noqa: F401

        from sglang_cpu_platform.platform import TorchNativeCpuPlatform

        return TorchNativeCpuPlatform
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["activate", "ENV_SWITCH", "PLATFORM_CLASS", "TorchNativeCpuPlatform"]
