"""Where the latency of a small request goes: a timeline of one transfer across two processes.

This process is the language side, a spawned one the encode side (Mooncake TCP on loopback, as
``bench_encode_language_transport.py``); a 1-block payload (16 tokens, 8 image tokens, H=2048,
K=3) is sent --iters times after the language side reserved its blocks. Each step of the path
is wrapped with a timestamp on entry (">") and return ("<"), in both processes
(``time.perf_counter`` is CLOCK_MONOTONIC, shared by the two), and the median time since
``send()`` is printed per step, in time order: the caller's ``send()`` -> the encode worker,
staging, the transfer-engine write (on whichever thread makes it), RoundDone sent -> the
language control thread wakes, copy-out, the language thread that waits sees Success. A step
seen more than once per request counts its first occurrence after ``send()``.

The wrappers cost ~1-3 us each, so the last line (the language side sees Success) sits a little
above the benchmark's e2e; the gaps between steps are what the timeline is for. On the 2-core
CPU test machine the first steps after an idle thread wakes are slow (a 16-element mask sum
takes ~3 us in a loop and ~50-90 us after a 2 ms sleep): a request arriving at 1 req/s pays that
on every thread it wakes, so fewer threads on the path is what shortens it.

Run:  .fork/venv/bin/python benchmark/profile_encode_language_latency.py [--iters 200]
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MC_FORCE_TCP", "1")
os.environ.setdefault("MOONCAKE_PROTOCOL", "tcp")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_encode_language_transport import (
    buffer_config,
    conn_config,
    payload,
    wait_done,
)

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.encode_language import buffers, connection
from sglang.srt.disaggregation.encode_language import payload as carried
from sglang.srt.disaggregation.encode_language import receiver as language
from sglang.srt.disaggregation.encode_language import sender as encode
from sglang.srt.disaggregation.encode_language.manifest import RequestShape

MARKS: list = []

# (class, method, step name); a method this version does not have is skipped.
ENCODE_STEPS = (
    (encode.EncodeManager, "_submit", "E send(): admit + queue"),
    (carried.MultimodalPayload, "validate", "E send(): validate"),
    (encode.EncodeManager, "_run_round", "E worker: round"),
    (encode.EncodeManager, "_tick", "E control thread: timers"),
    (buffers.MultimodalDataBuffers, "write_range", "E staging (write_range)"),
    (encode, "round_segments", "E transfer plan"),  # the name the encoder calls
    (encode.EncodeManager, "_write_inline", "E worker: the write"),
    (encode, "write_segments", "E transfer-engine write"),  # the name the encoder calls
    (connection.ControlChannel, "send", "E RoundDone sent"),
)
LANGUAGE_STEPS = (
    (connection.ControlChannel, "wait", "L control thread: poll"),
    (language.LanguageManager, "_on_round_done", "L RoundDone handled"),
    (buffers.MultimodalDataBuffers, "read_round", "L copy-out (read_round)"),
)


def timestamped(obj, attr: str, name: str) -> None:
    fn = getattr(obj, attr, None)
    if fn is None:
        return

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        MARKS.append((f"{name} >", time.perf_counter()))
        try:
            return fn(*args, **kwargs)
        finally:
            MARKS.append((f"{name} <", time.perf_counter()))

    setattr(obj, attr, wrapper)


def encoder_process(conn) -> None:
    for cls, attr, name in ENCODE_STEPS:
        timestamped(cls, attr, name)
    enc = encode.EncodeManager(buffer_config(2048), conn_config())
    conn.send(enc.bootstrap_addr)
    p = payload(2048, 16, 8)
    shape = RequestShape(p.total_tokens, p.mm_tokens, p.items)
    while True:
        room = conn.recv()
        if room is None:
            break
        s = enc.create_sender(room, shape)  # announced to the language side
        deadline = time.monotonic() + 10
        while s.poll() != KVPoll.WaitingForInput:  # every destination reserved
            assert time.monotonic() < deadline and s.poll() != KVPoll.Failed
            time.sleep(0.0005)
        time.sleep(0.002)  # as in serving (the ViT runs): wake-ups so far are not ours
        MARKS.clear()
        t0 = time.perf_counter()
        s.send(p)
        status = wait_done(s, 30)
        MARKS.append(("E sender sees Success", time.perf_counter()))
        time.sleep(0.005)  # let the last marks of this request land
        conn.send((t0, int(status), list(MARKS)))
    enc.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()
    for cls, attr, name in LANGUAGE_STEPS:
        timestamped(cls, attr, name)
    lang = language.LanguageManager(buffer_config(2048), conn_config())
    a, b = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=encoder_process, args=(b,))
    proc.start()
    enc_addr = a.recv()
    since: dict = {}
    e2e = []
    load = os.getloadavg()
    try:
        for it in range(args.warmup + args.iters):
            room = 5000 + it
            rx = lang.create_receiver(enc_addr, room)
            MARKS.clear()
            a.send(room)  # announced, reserved, then sent: only the send is timed
            assert wait_done(rx, 10) == KVPoll.Success, rx.reason
            MARKS.append(("L waiting thread sees Success", time.perf_counter()))
            rx.take()
            MARKS.append(("L take() returned", time.perf_counter()))
            t0, status, enc_marks = a.recv()
            assert status == KVPoll.Success
            if it < args.warmup:
                continue
            e2e.append((MARKS[-1][1] - t0) * 1e6)
            first: dict = {}
            for name, t in sorted(enc_marks + MARKS, key=lambda m: m[1]):
                if t >= t0 and name not in first:
                    first[name] = (t - t0) * 1e6
            for name, us in first.items():
                since.setdefault(name, []).append(us)
    finally:
        a.send(None)
        proc.join(30)
        lang.close()
    print(
        f"1-block request, two processes, median of {args.iters} (load average "
        f"{load[0]:.2f}): time since send() in us, and the step from the line before"
    )
    rows = sorted(
        (statistics.median(xs), name)
        for name, xs in since.items()
        if len(xs) >= args.iters // 2
    )
    prev = 0.0
    for med, name in rows:
        print(f"  {med:8.0f}  {med - prev:+7.0f}  {name}")
        prev = med
    print(
        f"e2e (send() -> take() returned): median {statistics.median(e2e):.0f} us, "
        f"p10 {sorted(e2e)[len(e2e) // 10]:.0f}, p90 {sorted(e2e)[len(e2e) * 9 // 10]:.0f}"
    )


if __name__ == "__main__":
    main()
