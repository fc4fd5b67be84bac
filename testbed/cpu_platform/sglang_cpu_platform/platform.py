"""The platform class handed to SGLang by ``sglang_cpu_platform.activate``."""

from __future__ import annotations

import logging
import os

from sglang.srt.platforms.cpu import CpuDeviceMixin
from sglang.srt.platforms.interface import (
    PlatformCapabilities,
    PlatformEnum,
    SRTPlatform,
)
from sglang_cpu_platform.vision_attention import (
    install as install_per_image_vision_attention,
)

logger = logging.getLogger(__name__)

# KV-cache budget used when the user gives no --max-total-tokens. Small on
# purpose: the test bed runs several servers on one 2-core / 24 GiB machine,
# and without a cap SGLang sizes the pool from free host RAM.
DEFAULT_MAX_TOTAL_TOKENS = int(
    os.environ.get("SGLANG_CPU_PLATFORM_MAX_TOTAL_TOKENS", "16384")
)


def _pageable_pin_memory(self, *args, **kwargs):
    return self


def neutralise_pin_memory() -> None:
    """Make ``Tensor.pin_memory`` return the tensor itself (pinning needs a CUDA driver).

    Upstream 0.5.23 pins decoded video frames unconditionally (``utils/video_decoder.py``,
    ``processors/qwen_vl.preprocess_video``), which raises "Found no NVIDIA driver" here.
    """
    import torch

    torch.Tensor.pin_memory = _pageable_pin_memory


# Loaded in every process of a server on this platform (the HTTP/tokenizer process decodes
# videos), and only when the plugin activated, i.e. on a host without CUDA.
neutralise_pin_memory()
# Same processes: the vision towers get per-image attention (vision_attention.py).
install_per_image_vision_attention()

# Backends that need Intel's CPU build of sgl-kernel, which this plugin avoids.
_INTEL_ONLY_ATTENTION = {"intel_amx"}


class TorchNativeCpuPlatform(CpuDeviceMixin, SRTPlatform):
    """CPU, eager PyTorch only: no sgl-kernel, Triton, graphs or pinned memory."""

    # OOT rather than CPU: PlatformEnum.CPU makes is_cpu() true throughout
    # SGLang and switches on the Intel-kernel (sgl_kernel.cpu / AMX) paths.
    _enum = PlatformEnum.OOT
    device_name = "cpu"
    device_type = "cpu"

    # Everything off (the conservative defaults), spelled out: no Triton
    # (torch-native allocator and req-to-token writers), no decode graph
    # capture, no piecewise compile, no HiCache device kernels, no PyNccl.
    capabilities = PlatformCapabilities(
        supports_triton=False,
        graph_capture=False,
        piecewise_graph=False,
        hicache_device_kernels=False,
        supports_pynccl=False,
    )

    # -- device identity -------------------------------------------------

    def get_device(self, device_id: int | None = 0) -> str:
        # sglang.srt.utils.common.get_device() falls through to this hook when
        # no in-tree accelerator exists, and the result becomes
        # server_args.device, which is then `.split(":")`-ed: it must be a
        # str. (CpuDeviceMixin returns torch.device("cpu").)
        return "cpu"

    def is_pin_memory_available(self, device=None) -> bool:
        # Pinning needs a CUDA driver; keep every staging tensor pageable.
        return False

    # -- subsystem choices -----------------------------------------------

    def get_default_attention_backend(self) -> str:
        # Asked by get_default_attn_backend() for out-of-tree platforms.
        return "torch_native"

    def get_default_speculative_draft_attention_backend(self, algorithm: str) -> str:
        return "torch_native"

    def get_dispatch_key_name(self) -> str:
        # BaseFusedOp picks forward_<key>(); "native" = the pure-PyTorch path.
        return "native"

    # -- lifecycle -------------------------------------------------------

    def apply_server_args_defaults(self, server_args) -> None:
        """Defaults that make a bare ``launch_server --model-path M`` work.

        ``server_args`` is a recorder over the arguments resolved so far: reads
        see earlier decisions, writes become declarations. This runs after
        SGLang's own ``handle_cpu_backends`` (which picked ``intel_amx`` on
        x86) and before memory sizing and attention-backend validation.
        Explicit user choices are kept, except Intel-only ones that cannot
        work without Intel's sgl-kernel.
        """
        if server_args.device != "cpu":
            server_args.device = "cpu"

        for field in (
            "attention_backend",
            "prefill_attention_backend",
            "decode_attention_backend",
        ):
            value = getattr(server_args, field)
            if field == "attention_backend" and value is None:
                server_args.attention_backend = "torch_native"
            elif value in _INTEL_ONLY_ATTENTION:
                logger.info(
                    "cpu platform: %s=%s needs Intel's sgl-kernel; using torch_native",
                    field,
                    value,
                )
                setattr(server_args, field, "torch_native")

        if server_args.sampling_backend in (None, "flashinfer"):
            server_args.sampling_backend = "pytorch"

        # Overlap scheduling buys nothing on 2 eager CPU cores and its fast
        # paths are written for CUDA streams/events (they are CUDA-guarded in
        # 0.5.23, and a text smoke test passes with it on). Off by default so
        # runs are sequential and easy to reason about; SGLang has no flag to
        # turn it back on, hence the env switch.
        if (
            os.environ.get("SGLANG_CPU_PLATFORM_OVERLAP", "0") != "1"
            and not server_args.disable_overlap_schedule
        ):
            server_args.disable_overlap_schedule = True

        if server_args.max_total_tokens is None:
            server_args.max_total_tokens = DEFAULT_MAX_TOTAL_TOKENS

        # PD decode: the default "host_pool" retraction backup allocates a
        # pinned (cudaHostRegister) HiCache host pool; per-request CPU tensors
        # work anywhere. Host receive (threshold < 1) requires host_pool, so
        # leave that combination to SGLang's own validation.
        if (
            server_args.disaggregation_mode == "decode"
            and server_args.disaggregation_decode_retraction_backup is None
            and server_args.disaggregation_decode_host_receive_threshold >= 1
        ):
            server_args.disaggregation_decode_retraction_backup = "cpu_tensor"

    def init_backend(self) -> None:
        """Runs once per worker process when model_runner is imported."""
        _disable_mooncake_host_index_fast_path()


def _disable_mooncake_host_index_fast_path() -> None:
    """PD prefill: skip Mooncake's pinned-buffer + torch.cuda.Event D2H path.

    ``disaggregation/prefill.py`` takes that path when the sender class has
    ``supports_host_tensor_indices``; with it off the prefill side converts the
    KV indices to page indices synchronously, which is all a CPU needs.
    """
    try:
        from sglang.srt.disaggregation.mooncake.conn import MooncakeKVSender
    except Exception as exc:  # Mooncake support is optional here.
        logger.debug("cpu platform: Mooncake sender not importable (%s)", exc)
        return
    MooncakeKVSender.supports_host_tensor_indices = False
