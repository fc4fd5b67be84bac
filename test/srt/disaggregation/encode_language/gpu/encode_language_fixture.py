"""GPU fixtures for Qwen3-VL-MoE encode/language disaggregation, built on upstream's.

The disaggregated deployment reuses ``PDDisaggregationServerBase`` (port plan, RDMA
device selection, health waits, fail-fast watcher, teardown) and replaces only the three
launch commands: an ``encode`` server (TP1, GPU 0), a ``language`` server (TP2, GPUs 1-2)
and ``sglang-router`` in PD mode with the encoder's bootstrap port. The colocated
reference is upstream's ``MMMUServerBase`` on the language GPUs. Both run upstream's
default GPU attention backend with CUDA graphs on: no CPU test-bed flags.
"""

import os
import sys
import unittest
from typing import Callable, Optional, TypeVar
from urllib.parse import urlparse

import requests
import torch

from sglang.test.server_fixtures.disaggregation_fixture import (
    PDDisaggregationServerBase,
)
from sglang.test.server_fixtures.mmmu_fixture import MMMUServerBase
from sglang.test.test_utils import (
    DEFAULT_TIMEOUT_FOR_SERVER_LAUNCH,
    DEFAULT_URL_FOR_TEST,
    popen_launch_pd_server,
    popen_with_error_check,
    try_cached_model,
)

MODEL = try_cached_model("Qwen/Qwen3-VL-30B-A3B-Instruct")

ENCODE_GPU = 0
LANGUAGE_BASE_GPU = 1
LANGUAGE_TP = 2
GPUS_NEEDED = LANGUAGE_BASE_GPU + LANGUAGE_TP

# Beside the PD fixture's plan (router +0, prefill +100, decode +200, nccl +300/+400,
# bootstrap +500): the colocated reference gets +600.
COLOCATED_URL = "http://{}:{}".format(
    urlparse(DEFAULT_URL_FOR_TEST).hostname, urlparse(DEFAULT_URL_FOR_TEST).port + 600
)

# Set by the CPU transport tests' helpers (imported by the encode_language conftest under
# pytest) to force Mooncake onto TCP; servers launched here must use the runner's fabric.
CPU_TESTBED_ENV = ("MC_FORCE_TCP", "MOONCAKE_PROTOCOL")

T = TypeVar("T")


def gpu_skip_reason(found: Optional[int] = None) -> Optional[str]:
    """Why these tests cannot run on this host, or None when they can."""
    found = torch.cuda.device_count() if found is None else found
    if found >= GPUS_NEEDED:
        return None
    return (
        f"needs {GPUS_NEEDED} CUDA GPUs (encode TP1 on GPU {ENCODE_GPU}, language "
        f"TP{LANGUAGE_TP} on GPUs {LANGUAGE_BASE_GPU}-{GPUS_NEEDED - 1}); found {found}"
    )


def skip_without_gpus(cls):
    """Class decorator: skip the whole class (no server start) without enough GPUs."""
    reason = gpu_skip_reason()
    return unittest.skip(reason)(cls) if reason else cls


class ColocatedQwen3VLMoe(MMMUServerBase):
    """The colocated reference: one upstream server (ViT + LLM), TP2 on the language GPUs.

    ``--mm-enable-dp-encoder`` runs the ViT unsharded on each rank, the same computation
    as the TP1 encode server, so a difference between the deployments is the
    disaggregation's, not a TP-sharded ViT's bf16 rounding.
    """

    __test__ = False  # a launcher, not a test class
    model = MODEL
    base_url = COLOCATED_URL
    server_api_key = None  # the router forwards no key; keep both deployments alike
    other_args = [
        "--tp",
        str(LANGUAGE_TP),
        "--base-gpu-id",
        str(LANGUAGE_BASE_GPU),
        "--mm-enable-dp-encoder",
    ]


class EncodeLanguageServerBase(PDDisaggregationServerBase):
    """Encode TP1 + language TP2 behind ``sglang-router --pd-disaggregation``.

    The launch commands are the documented ones (``--disaggregation-mode
    encode|language``, ``--disaggregation-transfer-backend mooncake``, the bootstrap port
    on the encode server, ``--tp 2`` on the language server) plus the test harness's
    placement flags (GPU ids, pinned nccl ports, RDMA devices in CI).
    """

    model = MODEL
    prefill_tp_size = 1  # the encode server
    decode_tp_size = LANGUAGE_TP  # the language server
    decode_base_gpu_id = LANGUAGE_BASE_GPU

    @classmethod
    def setUpClass(cls):
        cls.cpu_testbed_env = {}
        if "el_helpers" in sys.modules:
            cls.cpu_testbed_env = {
                k: os.environ.pop(k) for k in CPU_TESTBED_ENV if k in os.environ
            }
        super().setUpClass()
        # The new modes speak only Mooncake (its mooncake_tcp alias aside).
        cls.transfer_backend = ["--disaggregation-transfer-backend", "mooncake"]

    @classmethod
    def tearDownClass(cls):
        try:
            super().tearDownClass()
        finally:
            os.environ.update(getattr(cls, "cpu_testbed_env", {}))

    @classmethod
    def launch_worker(cls, url: str, mode_args: list, nccl_port: str, gpus: range):
        # No SGLANG_HOST_IP: the encoder's control socket binds --host (the URL's host, where
        # the router sends the language side), whatever address discovery advertises.
        return popen_launch_pd_server(
            cls.model,
            url,
            timeout=DEFAULT_TIMEOUT_FOR_SERVER_LAUNCH,
            other_args=[
                "--trust-remote-code",
                *mode_args,
                "--nccl-port",
                nccl_port,
                "--base-gpu-id",
                str(gpus[0]),
                *cls.transfer_backend,
                *cls.rdma_devices_for(gpus),
            ],
        )

    @classmethod
    def start_prefill(cls):
        cls.process_prefill = cls.launch_worker(
            cls.prefill_url,
            [
                "--disaggregation-mode",
                "encode",
                "--disaggregation-bootstrap-port",
                cls.bootstrap_port,
            ],
            cls.prefill_nccl_port,
            range(ENCODE_GPU, ENCODE_GPU + 1),
        )

    @classmethod
    def start_decode(cls):
        cls.process_decode = cls.launch_worker(
            cls.decode_url,
            ["--disaggregation-mode", "language", "--tp", str(LANGUAGE_TP)],
            cls.decode_nccl_port,
            range(LANGUAGE_BASE_GPU, LANGUAGE_BASE_GPU + LANGUAGE_TP),
        )

    @classmethod
    def launch_lb(cls):
        """The unchanged Rust router, told the encoder's bootstrap port.

        Retries are off: a retried pair re-encodes and would hide a failed transfer.
        """
        cls.process_lb = popen_with_error_check(
            [
                sys.executable,
                "-m",
                "sglang_router.launch_router",
                "--pd-disaggregation",
                "--prefill",
                cls.prefill_url,
                cls.bootstrap_port,
                "--decode",
                cls.decode_url,
                "--host",
                cls.base_host,
                "--port",
                cls.lb_port,
                "--disable-retries",
            ]
        )
        cls.wait_server_ready(cls.lb_url + "/health", process=cls.process_lb)

    @classmethod
    def with_colocated(cls, run: Callable[[str], T]) -> T:
        """Start the colocated reference, ``run(url)`` against it, stop it (GPUs freed)."""
        ColocatedQwen3VLMoe.setUpClass()
        try:
            return run(ColocatedQwen3VLMoe.base_url)
        finally:
            ColocatedQwen3VLMoe.tearDownClass()


def flush_cache(*urls: str) -> None:
    """Empty the radix cache of each LLM server (colocated, language), so that every case
    prefills from scratch on both deployments."""
    for url in urls:
        response = requests.post(url + "/flush_cache", timeout=60)
        assert response.status_code == 200, f"{url}/flush_cache: {response.text}"
