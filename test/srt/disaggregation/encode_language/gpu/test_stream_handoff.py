"""Device tensors the transport hands between threads and CUDA streams arrive intact
(issue: blockers item 1; the hand-offs are listed in docs/transport.md, "Device tensor
hand-offs").

* Encode staging: the rows are produced on a non-default stream (the encode scheduler loop runs
  in upstream's ``schedule_stream``) by a deliberately slow chain of matrix products, the payload
  goes to a transfer thread at once, and that thread stages it with ``write_range`` (the
  encoder's worker does exactly this). What lands in the blocks, and what the language side
  reads out of them (``read_round`` to the GPU on another thread), must be byte for byte the
  producer's final rows: without the producer's event the copies read the rows before the
  producer's stream wrote them.
* Language rows on the GPU: ``read_round`` fills a device tensor on the manager's thread; the
  scheduler thread reads it on another stream (the forward's), marks that use as ``_attach``
  does (``use_on_streams``) and drops it while that read is still queued; the next request's
  rows are read into a new tensor of the same size. The forward must still see the first
  request's rows: without the mark the caching allocator hands their memory to the next
  request while the read is queued.

Runs where SGLang cannot be installed (the lent GPU machine): the transport modules come from
this checkout through ``benchmark/bench_encode_language_device.py``'s loader, and
``--noconftest`` keeps the suite's conftest files (which import SGLang) out::

    python3 -m pytest --noconftest -q test/srt/disaggregation/encode_language/gpu/test_stream_handoff.py

``EL_TEST_NO_FENCE=1`` is a switch of this test, not of the code under test: it removes the two
fences the fix added (``MultimodalPayload.record_ready`` and ``use_on_streams`` become no-ops),
which is the code before the fix, to show that the tests then fail.
"""

import concurrent.futures
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[5]
sys.path.insert(0, str(REPO / "benchmark"))
from bench_encode_language_device import load_transport  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the hand-offs under test are between CUDA streams",
)

carried, buffers = load_transport()
NO_FENCE = os.environ.get("EL_TEST_NO_FENCE") == "1"
REPS = 30
# Qwen3-VL-30B-A3B rows (H = 2048, K = 3 deepstack levels, bf16): 1024 image tokens of 1100.
H, K, B = 2048, 3, 128
T, M = 1100, 1024
# The slow producer: 12 products of 8192x8192 bf16 matrices (~20 ms).
N, CHAIN = 8192, 12


@pytest.fixture
def fences(monkeypatch):
    if NO_FENCE:
        # raising=False: also runs against the buffers.py before the fix (no such names)
        monkeypatch.setattr(
            carried.MultimodalPayload, "record_ready", lambda p: None, raising=False
        )
        monkeypatch.setattr(
            buffers, "use_on_streams", lambda t, streams: None, raising=False
        )


@pytest.fixture(scope="module")
def pools():
    cfg = buffers.MultimodalBufferConfig(
        hidden_size=H, deepstack_count=K, block_size=B, num_blocks=12
    )
    enc, lang = buffers.MultimodalDataBuffers(cfg), buffers.MultimodalDataBuffers(cfg)
    assert enc.pinned and lang.pinned
    # persistent threads, as the encoder's transfer workers and the language control thread
    with concurrent.futures.ThreadPoolExecutor(
        1
    ) as encode_worker, concurrent.futures.ThreadPoolExecutor(1) as language_control:
        yield enc, lang, encode_worker, language_control


def token_stream(seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[torch.randperm(T, generator=g)[:M]] = True
    ids = torch.randint(0, 150000, (T,), generator=g)
    pos = torch.randint(0, 4096, (3, T), generator=g)
    return ids, pos, mask


def slow_payload(seed, stream):
    """On ``stream``: a chain of products, then the payload's rows from its result (split
    and made contiguous, as ``_payload`` does), then ``record_ready`` there."""
    ids, pos, mask = token_stream(seed)
    with torch.cuda.stream(stream):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(N, N, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(CHAIN):
            x = torch.tanh(x @ x)
        rows = x[:M, : (1 + K) * H]
        payload = carried.MultimodalPayload(
            ids, pos, mask, rows[:, :H].contiguous(), rows[:, H:].contiguous(), -7
        )
        payload.record_ready()
    return payload


def same_bytes(a, b):
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def staged_rows(buf, blocks, width_slot):
    return width_slot[blocks].reshape(len(blocks) * B, -1)[:M]


def mooncake_stand_in(enc, lang):
    """The transfer engine's write (tested in the transport tests): blocks, byte for byte."""
    for s, d in zip(enc.slots(), lang.slots()):
        d.copy_(s)


def test_staging_waits_for_the_producer_stream(pools, fences):
    enc, lang, encode_worker, language_control = pools
    producer = torch.cuda.Stream()  # the encode scheduler's schedule_stream
    blocks = [3, 4, 5, 6, 7, 8, 9, 10, 11]  # ceil(1100 / 128) = 9
    slow_payload(0, producer)  # warm-up: cuBLAS handles, allocator pools
    torch.cuda.synchronize()
    stale, stale_read = [], []
    for rep in range(REPS):
        checksum = bool(rep % 2)
        payload = slow_payload(1000 + rep, producer)
        # Handed to the transfer thread at once, as send() hands it to the worker.
        encode_worker.submit(
            enc.write_range, blocks, payload, 0, T, 0, M, 5, rep, checksum
        ).result()
        mooncake_stand_in(enc, lang)
        dst = carried.alloc_received(lang.layout, T, M, device="cuda")
        got = language_control.submit(
            lang.read_round,
            blocks,
            T,
            M,
            buffers.RoundStamp(5, rep, 0),
            out=carried.slice_received(dst, 0, T, 0, M),
            verify=checksum,
        ).result()
        torch.cuda.synchronize()  # the producer's final rows, read after everything ran
        want_e, want_d = payload.embeddings.cpu(), payload.deepstack.cpu()
        if not (
            same_bytes(staged_rows(enc, blocks, enc.embeddings), want_e)
            and same_bytes(staged_rows(enc, blocks, enc.deepstack), want_d)
        ):
            stale.append(rep)
        if not (
            same_bytes(got.embeddings.cpu(), want_e)
            and same_bytes(got.deepstack.cpu(), want_d)
        ):
            stale_read.append(rep)
        ids, pos, mask = token_stream(1000 + rep)
        assert torch.equal(got.fill_ids.long(), ids)
        assert torch.equal(got.mrope_positions.long(), pos)
        assert torch.equal(got.mm_mask, mask)
    assert (stale, stale_read) == ([], []), (
        f"rows staged before the producer wrote them in {len(stale)} of {REPS} runs "
        f"{stale}; read out on the language side in {len(stale_read)} of {REPS} runs"
    )


def host_payload(seed):
    ids, pos, mask = token_stream(seed)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(M, (1 + K) * H, generator=g).to(torch.bfloat16)
    return carried.MultimodalPayload(
        ids, pos, mask, rows[:, :H].contiguous(), rows[:, H:].contiguous(), -7
    )


def test_rows_on_the_gpu_outlive_the_forward_reading_them(pools, fences):
    enc, lang, _, language_control = pools
    forward = torch.cuda.Stream()  # the language scheduler's forward_stream
    blocks = list(range(9))
    requests = [host_payload(2000 + i) for i in range(REPS + 1)]

    def receive(i):
        """The manager thread: stage request i, copy it over, read it to the GPU."""
        enc.write_range(blocks, requests[i], 0, T, 0, M, 6, i, checksum=bool(i % 2))
        mooncake_stand_in(enc, lang)
        dst = carried.alloc_received(lang.layout, T, M, device="cuda")
        lang.read_round(
            blocks,
            T,
            M,
            buffers.RoundStamp(6, i, 0),
            out=carried.slice_received(dst, 0, T, 0, M),
            verify=bool(i % 2),
        )
        return dst

    x = torch.randn(N, N, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    overwritten = []
    for i in range(REPS):
        data = language_control.submit(receive, i).result()  # take()
        rows = data.rows
        # _attach: the rows are read on this stream and on the forward stream
        buffers.use_on_streams(rows, (torch.cuda.current_stream(), forward))
        forward.wait_stream(torch.cuda.current_stream())  # upstream's run_batch
        with torch.cuda.stream(forward):  # a forward still busy when the rows are freed
            y = x  # (longer than the next request's staging, copy and read on the host)
            for _ in range(4 * CHAIN):
                y = torch.tanh(y @ y)
            seen = rows.clone()
        del data, rows  # the request leaves the scheduler
        language_control.submit(receive, i + 1).result()  # the next request's rows
        torch.cuda.synchronize()
        want = torch.cat([requests[i].embeddings, requests[i].deepstack], dim=1)
        if not same_bytes(seen.cpu(), want):
            overwritten.append(i)
    assert overwritten == [], (
        f"the forward read another request's rows in {len(overwritten)} of {REPS} runs "
        f"{overwritten}"
    )
