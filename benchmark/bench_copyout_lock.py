"""How long the scheduler thread is blocked while the language side copies a round out.

The language scheduler calls ``create_receiver`` on every image arrival and ``rx.abort()`` on
every cancellation; both take the manager lock. If the control thread held that lock while
copying a round out of the blocks (``read_round``: 16 MiB for a 1024² image on Qwen3-VL-30B-A3B,
32 MiB on 235B-A22B), every such call waits for the copy: decode-step jitter (issue 16, item 3).

Two processes (this one: language side; a spawned one: encode side), Mooncake between them (TCP
on loopback on the CPU test machine). The main thread receives one-round requests of each
payload (``bench_encode_language_transport.PAYLOADS``: 30B = 16 MiB, 235B = 32 MiB) one after
another, while a *scheduler* thread does what the language scheduler does between its steps:
``create_receiver`` for a request to an encoder that does not answer (it stays waiting: no
transfer, no encoder work), then ``abort()`` it, then sleeps ``--step-ms``; each call is timed.

Modes (interleaved round by round, so load changes hit both alike):

  unlocked  the code as it is: the copy runs outside the manager lock
  locked    the same, with the manager lock taken around ``read_round`` (the copy) by a wrapper
            installed here: what the code did before issue 16 (it held the lock from the
            RoundDone's checks to the commit; the copy is nearly all of that time)

Reported per payload and mode: the copy time (``read_round``), the longest scheduler call that
overlapped each round's copy (median and max over rounds: the scheduler-thread time blocked per
received round), and ``create_receiver`` / ``abort`` latency percentiles of the calls that
overlapped a copy, next to those of calls while nothing copied (idle).

Run:  .fork/venv/bin/python benchmark/bench_copyout_lock.py [--rounds 20] [--json F]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MC_FORCE_TCP", "1")
os.environ.setdefault("MOONCAKE_PROTOCOL", "tcp")

import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_encode_language_transport import (  # noqa: E402
    BLOCK,
    PAYLOADS,
    buffer_config,
    conn_config,
    payload,
    wait_done,
    wire_bytes,
)

from sglang.srt.disaggregation.base.conn import KVPoll  # noqa: E402
from sglang.srt.disaggregation.encode_language.manifest import (  # noqa: E402
    RequestShape,
)
from sglang.srt.disaggregation.encode_language.receiver import (  # noqa: E402
    LanguageManager,
)
from sglang.srt.disaggregation.encode_language.sender import EncodeManager  # noqa: E402

SIZES = ("30B", "235B")
MODES = ("locked", "unlocked")


def encoder_process(conn, keys):
    """The encode side: one EncodeManager per hidden size; sends a payload on request."""
    hidden = sorted({PAYLOADS[k][0] for k in keys})
    mgrs = {h: EncodeManager(buffer_config(h), conn_config()) for h in hidden}
    payloads = {k: payload(*PAYLOADS[k]) for k in keys}
    conn.send({h: m.bootstrap_addr for h, m in mgrs.items()})
    senders = {}
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        op, key, room = cmd
        p = payloads[key]
        if op == "create":  # the request arrives: its shape is announced
            shape = RequestShape(p.total_tokens, p.mm_tokens, p.items)
            senders[room] = mgrs[PAYLOADS[key][0]].create_sender(room, shape)
            conn.send(None)
            continue
        s = senders.pop(room)
        deadline = time.monotonic() + 30
        while s.poll() != KVPoll.WaitingForInput:  # every destination reserved
            assert time.monotonic() < deadline and s.poll() != KVPoll.Failed
            time.sleep(0.0005)
        s.send(p)
        conn.send(int(wait_done(s, 60)))
    for m in mgrs.values():
        m.close()


class Scheduler(threading.Thread):
    """The scheduler's calls into the manager, timed: create_receiver, abort, sleep."""

    def __init__(self, silent_encoder: str, step_s: float):
        super().__init__(daemon=True)
        self.silent_encoder = silent_encoder
        self.step_s = step_s
        self.target = None  # the manager receiving now (set by the main thread)
        self.calls = []  # (manager, "create" | "abort", start, end)
        self.stop = threading.Event()

    def run(self):
        room = 1 << 40
        while not self.stop.is_set():
            mgr = self.target
            room += 1
            t0 = time.perf_counter()
            rx = mgr.create_receiver(self.silent_encoder, room, reserve_tokens=BLOCK)
            t1 = time.perf_counter()
            rx.abort("scheduler: cancelled")
            t2 = time.perf_counter()
            self.calls += [(mgr, "create", t0, t1), (mgr, "abort", t1, t2)]
            time.sleep(self.step_s)


def copy_windows(mgr, mode: dict, windows: list) -> None:
    """Time every ``read_round`` of ``mgr`` (benchmark-only wrapper on the instance); in mode
    "locked" take the manager lock around it, as the code before issue 16 did."""
    read = mgr.buffers.read_round

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            if mode["now"] == "locked":
                with mgr.lock:
                    return read(*args, **kwargs)
            return read(*args, **kwargs)
        finally:
            windows.append((mgr, mode["now"], t0, time.perf_counter()))

    mgr.buffers.read_round = timed


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--rounds", type=int, default=20, help="rounds per payload and mode"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--step-ms", type=float, default=1.0)
    ap.add_argument("--payloads", default=",".join(SIZES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    keys = args.payloads.split(",")
    modes = args.modes.split(",")
    zctx = zmq.Context()
    silent = zctx.socket(zmq.PULL)  # an encoder that never answers
    silent_addr = f"127.0.0.1:{silent.bind_to_random_port('tcp://127.0.0.1')}"
    # no heartbeat verdict on the silent encoder during the run
    cfg = conn_config()
    cfg.heartbeat_interval_s = 3600.0
    hidden = sorted({PAYLOADS[k][0] for k in keys})
    langs = {h: LanguageManager(buffer_config(h), cfg) for h in hidden}
    mode = {"now": modes[0]}
    windows = []
    for m in langs.values():
        copy_windows(m, mode, windows)
    a, b = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=encoder_process, args=(b, keys))
    proc.start()
    enc = a.recv()
    sched = Scheduler(silent_addr, args.step_ms / 1e3)
    sched.target = langs[hidden[0]]
    sched.start()
    rounds = []  # (key, mode, window index)
    room = 10_000
    load_before = os.getloadavg()
    try:
        for it in range(args.warmup + args.rounds):
            for key in keys:
                for md in modes:
                    h = PAYLOADS[key][0]
                    lang = langs[h]
                    mode["now"] = md
                    sched.target = lang
                    room += 1
                    rx = lang.create_receiver(enc[h], room)
                    a.send(("create", key, room))
                    a.recv()
                    deadline = time.monotonic() + 30
                    while rx.poll() != KVPoll.WaitingForInput:
                        assert (
                            time.monotonic() < deadline and rx.poll() != KVPoll.Failed
                        )
                        time.sleep(0.0005)
                    n = len(windows)
                    a.send(("send", key, room))
                    assert wait_done(rx, 60) == KVPoll.Success, rx.reason
                    assert a.recv() == KVPoll.Success
                    del rx  # the received tensors (32 MiB) go now, not mid-round later
                    if it >= args.warmup:
                        assert len(windows) == n + 1
                        rounds.append((key, md, n))
                    time.sleep(0.005)  # idle calls between rounds
    finally:
        sched.stop.set()
        sched.join(10)
        load_after = os.getloadavg()
        a.send(None)
        proc.join(30)
        for m in langs.values():
            m.close()
        silent.close()
        zctx.term()

    all_windows = [(m, t0, t1) for m, _, t0, t1 in windows]

    def overlaps(call, w):
        return call[0] is w[0] and call[2] < w[3] and call[3] > w[2]

    idle = {"create": [], "abort": []}
    for c in sched.calls:
        if not any(c[0] is m and c[2] < t1 and c[3] > t0 for m, t0, t1 in all_windows):
            idle[c[1]].append(c[3] - c[2])
    ms = lambda x: round(x * 1e3, 3)  # noqa: E731
    out = {
        "rounds": args.rounds,
        "step_ms": args.step_ms,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "idle": {
            k: {"p50_ms": ms(pct(v, 50)), "p99_ms": ms(pct(v, 99))}
            for k, v in idle.items()
        },
        "results": {},
    }
    wire = wire_bytes()
    print(
        f"rounds={args.rounds} per payload and mode, scheduler step {args.step_ms} ms; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(
        "idle (no copy running): create_receiver p50 "
        f"{out['idle']['create']['p50_ms']:.2f} ms, p99 {out['idle']['create']['p99_ms']:.2f}"
        f" ms; abort p50 {out['idle']['abort']['p50_ms']:.2f} ms, p99 "
        f"{out['idle']['abort']['p99_ms']:.2f} ms"
    )
    print(
        "| payload | MiB | copy under the lock | copy ms (median) | blocked per round ms "
        "(median / max) | create_receiver during copy ms (p50 / p99 / max) | abort during "
        "copy ms (p50 / p99 / max) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for key in keys:
        for md in modes:
            copy, blocked, during = [], [], {"create": [], "abort": []}
            for k, m_, i in rounds:
                if (k, m_) != (key, md):
                    continue
                w = windows[i]
                copy.append(w[3] - w[2])
                hits = [c for c in sched.calls if overlaps(c, w)]
                blocked.append(max((c[3] - c[2] for c in hits), default=0.0))
                for c in hits:
                    during[c[1]].append(c[3] - c[2])
            r = {
                "copy_ms": ms(statistics.median(copy)),
                "blocked_per_round_ms": {
                    "median": ms(statistics.median(blocked)),
                    "max": ms(max(blocked)),
                },
                **{
                    f"{k}_during_copy_ms": {
                        "p50": ms(pct(v, 50)),
                        "p99": ms(pct(v, 99)),
                        "max": ms(max(v, default=0.0)),
                        "n": len(v),
                    }
                    for k, v in during.items()
                },
            }
            out["results"][f"{key}/{md}"] = r
            cr, ab = r["create_during_copy_ms"], r["abort_during_copy_ms"]
            print(
                f"| {key} | {wire[key] / 2**20:.2f} | {'yes' if md == 'locked' else 'no'} | "
                f"{r['copy_ms']:.1f} | {r['blocked_per_round_ms']['median']:.1f} / "
                f"{r['blocked_per_round_ms']['max']:.1f} | {cr['p50']:.2f} / {cr['p99']:.2f} / "
                f"{cr['max']:.1f} | {ab['p50']:.2f} / {ab['p99']:.2f} / {ab['max']:.1f} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
