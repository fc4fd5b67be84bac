"""Where the latency of a small request goes: a timeline of one transfer, in one process.

An encode and a language manager in this process (Mooncake TCP on loopback), a 1-block payload
(16 tokens, 8 image tokens, H=2048, K=3) sent --iters times; each step of the path is wrapped
with a timestamp (on entry ">" and return "<"), and the median time since ``send()`` is printed
per step: caller -> encode worker, staging, writer thread, the transfer-engine write, RoundDone to
the language control thread, copy-out, ``take()``. Profiling aid for docs/transport.md; the
numbers are in-process (both sides share the GIL), so they sit below the two-process benchmark.

Run:  .fork/venv/bin/python benchmark/profile_encode_language_latency.py [--iters 50]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MC_FORCE_TCP", "1")
os.environ.setdefault("MOONCAKE_PROTOCOL", "tcp")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_encode_language_transport import buffer_config, conn_config, payload
from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language import buffers, connection
from sglang.srt.disaggregation.encode_language import receiver as language
from sglang.srt.disaggregation.encode_language import sender as encode

MARKS: list = []
STEPS = (
    (encode.EncodeManager, "_run_round", "encode worker: round"),
    (buffers.MultimodalDataBuffers, "write_range", "staging (write_range)"),
    (buffers.MultimodalDataBuffers, "round_segments", "transfer plan"),
    (encode.EncodeManager, "_write_chunks", "writer thread: TE write"),
    (encode.EncodeManager, "_await_write", "worker waits for the write"),
    (connection.ControlChannel, "send", "control message sent"),
    (language.LanguageManager, "_on_round_done", "language: RoundDone"),
    (buffers.MultimodalDataBuffers, "read_round", "copy-out (read_round)"),
)


def timestamped(cls, attr: str, name: str) -> None:
    fn = getattr(cls, attr)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        MARKS.append((f"{name} >", time.perf_counter()))
        try:
            return fn(*args, **kwargs)
        finally:
            MARKS.append((f"{name} <", time.perf_counter()))

    setattr(cls, attr, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    for cls, attr, name in STEPS:
        timestamped(cls, attr, name)
    enc = encode.EncodeManager(buffer_config(2048), conn_config())
    lang = language.LanguageManager(buffer_config(2048), conn_config())
    p = payload(2048, 16, 8)
    since: dict = {}
    try:
        for it in range(args.warmup + args.iters):
            rx = lang.create_receiver(enc.bootstrap_addr, 1000 + it)
            deadline = time.monotonic() + 10
            while rx.poll() != KVPoll.WaitingForInput:  # reserved: not part of the path
                assert time.monotonic() < deadline
                time.sleep(0.0005)
            time.sleep(0.002)
            MARKS.clear()
            sender = enc.create_sender(1000 + it)
            t0 = time.perf_counter()
            sender.send(p)
            assert rx.wait(10) == KVPoll.Success, rx.reason
            rx.take()
            MARKS.append(("take() returned", time.perf_counter()))
            if it >= args.warmup:
                for name, t in MARKS:
                    since.setdefault(name, []).append((t - t0) * 1e6)
    finally:
        enc.close()
        lang.close()
    print(f"1-block request, median of {args.iters}: time since send() in us")
    for name, xs in since.items():
        if len(xs) == args.iters:  # steps taken once per request
            print(f"  {statistics.median(xs):8.0f}  {name}")


if __name__ == "__main__":
    main()
