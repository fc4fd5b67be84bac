"""Received rows are kept in pinned host memory, not on the device, and reach the forward byte
for byte (issue: issue 16 item 4).

The language server's TP broadcast leaves each request's rows ``[M, (1+K)*H]`` on the device;
``_attach`` copies each item's rows to pinned host memory (``rows_to_host``, queued on the
scheduler's stream) and drops the device rows; each extend forward copies the rows its chunk
covers back to the device on the forward stream (``stage_rows``), and puts the host rows back
after embedding (``restore_rows``). Here, on one GPU:

* 30 requests are "received" (rows produced on the scheduler stream by a slow chain of matrix
  products, as a broadcast still in flight would leave them; one item a view, one a gather) and
  attached while the next request's rows already reuse the memory; every one is kept. The device
  memory allocated after they are attached must not grow with the requests held (before the
  fix the items were views of the device rows: 16 MiB per request).
* The forward (another stream, which waits for the scheduler stream as upstream's
  ``run_batch`` does) stages the first chunk of each request, reads the rows, and must see the
  producer's final bytes; the items keep their host tensors afterwards.

Runs where SGLang cannot be installed (the lent GPU machine): ``language_mm_inputs.py`` is
loaded from this checkout with a stand-in for ``sglang.srt.multimodal.modality`` (it only
needs two enum names), and ``--noconftest`` keeps the suite's conftest files out::

    python3 -m pytest --noconftest -q test/srt/disaggregation/encode_language/gpu/test_rows_host_residency.py

``EL_TEST_KEEP_ON_DEVICE=1`` is a switch of this test, not of the code under test: it makes
``rows_to_host`` return the device rows (the code before the fix), to show the test then fails.
"""

import enum
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[5]
PKG = "sglang.srt.disaggregation.encode_language"

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the rows move between the device and pinned host memory",
)


def load_language_mm_inputs():
    try:
        from sglang.srt.disaggregation.encode_language import language_mm_inputs

        return language_mm_inputs
    except ImportError:
        pass
    parts = PKG.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        mod = sys.modules.setdefault(name, types.ModuleType(name))
        mod.__path__ = [str(REPO / "python" / Path(*parts[:i]))]
    modality = types.ModuleType("sglang.srt.multimodal.modality")
    modality.Modality = enum.Enum("Modality", "IMAGE VIDEO")
    sys.modules.setdefault("sglang.srt.multimodal", types.ModuleType("x"))
    sys.modules.setdefault("sglang.srt.multimodal.modality", modality)
    path = REPO / "python" / Path(*parts) / "language_mm_inputs.py"
    spec = importlib.util.spec_from_file_location(f"{PKG}.language_mm_inputs", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


lmi = load_language_mm_inputs()
KEEP_ON_DEVICE = os.environ.get("EL_TEST_KEEP_ON_DEVICE") == "1"
REPS = 30
# Qwen3-VL-30B-A3B rows (H = 2048, K = 3, bf16): two items of 512 rows, 16 MiB a request.
H, K, M = 2048, 3, 1024
N, CHAIN = 8192, 8  # the slow producer: ~10 ms of products


class Item(types.SimpleNamespace):
    """The two fields of ``MultimodalDataItem`` that stage_rows reads and sets."""


@pytest.fixture
def to_host(monkeypatch):
    if KEEP_ON_DEVICE:
        monkeypatch.setattr(lmi, "rows_to_host", lambda rows: rows)
    return lmi.rows_to_host


def attach(rows, to_host):
    """``_attach`` on a received request: item 0 a view, item 1 a gather (every other row of
    the second half), each copied to the host; the device rows are dropped after."""
    idx = torch.arange(M // 2, M, device=rows.device)
    return types.SimpleNamespace(
        mm_items=[
            Item(
                offsets=[(10, 10 + M // 2 - 1)],
                precomputed_embeddings=to_host(rows[: M // 2]),
            ),
            Item(
                offsets=[(700, 700 + M // 2 - 1)],
                precomputed_embeddings=to_host(rows[idx]),
            ),
        ]
    )


def test_rows_live_on_the_host_and_reach_the_forward_intact(to_host):
    sched, forward = torch.cuda.Stream(), torch.cuda.Stream()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, N, device="cuda", dtype=torch.bfloat16, generator=g) / 64
    torch.cuda.set_stream(sched)  # the scheduler thread's current stream
    try:
        held, want = [], []
        torch.tanh(x @ x)  # cuBLAS's workspace for this stream, before the baseline
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        for rep in range(REPS):
            y = x
            for _ in range(CHAIN):
                y = torch.tanh(y @ x)  # rows still being written when attached
            rows = y[:M, : (1 + K) * H].clone()  # [M, (1+K)*H]: 16 MiB
            want.append((rows[: M // 2].clone(), rows[M // 2 :].clone()))
            held.append(attach(rows, to_host))
            del rows, y
            # the next request's rows take the freed memory at once
            torch.empty(M, (1 + K) * H, device="cuda", dtype=torch.bfloat16).fill_(
                float(rep)
            )
        torch.cuda.synchronize()
        grown = (
            torch.cuda.memory_allocated()
            - base
            - sum(
                a.numel() * a.element_size() + b.numel() * b.element_size()
                for a, b in want
            )
        )
        # the forward: waits for the scheduler stream (upstream's run_batch), then stages the
        # first chunk of every request (covers item 0 only: tokens [0, 600))
        forward.wait_stream(sched)
        seen = []
        with torch.cuda.stream(forward):
            hosts = [[i.precomputed_embeddings for i in mm.mm_items] for mm in held]
            staged = lmi.stage_rows(
                held, [0] * REPS, [600] * REPS, torch.device("cuda", 0)
            )
            seen = [mm.mm_items[0].precomputed_embeddings.clone() for mm in held]
            lmi.restore_rows(staged)
        # a second chunk of the first request covers item 1 only
        with torch.cuda.stream(forward):
            staged2 = lmi.stage_rows(held[:1], [600], [700], torch.device("cuda", 0))
            seen1 = held[0].mm_items[1].precomputed_embeddings.clone()
            lmi.restore_rows(staged2)
        torch.cuda.synchronize()
    finally:
        torch.cuda.set_stream(torch.cuda.default_stream())
    assert grown < 1 << 20, (
        f"{grown / 2**20:.1f} MiB of device memory held by {REPS} attached requests "
        f"(their rows belong in pinned host memory)"
    )
    for mm, h in zip(held, hosts):
        assert [
            i.precomputed_embeddings for i in mm.mm_items
        ] == h  # the same host tensors
        assert all(t.device.type == "cpu" and t.is_pinned() for t in h)
    assert [len(staged), len(staged2)] == [REPS, 1]  # only the items the chunks cover
    bad = [
        r
        for r in range(REPS)
        if not torch.equal(seen[r].view(torch.uint8), want[r][0].view(torch.uint8))
    ]
    assert bad == [], f"the forward read wrong rows in {len(bad)} of {REPS} runs {bad}"
    assert torch.equal(seen1.view(torch.uint8), want[0][1].view(torch.uint8))
