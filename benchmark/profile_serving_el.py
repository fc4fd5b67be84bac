"""Where the time of one benchmark cell goes, per process: CPU seconds and py-spy stacks.

Launches one deployment of ``bench_serving_el.py`` (same flags, same warm-up, same client and
cold cell), and while one cell runs it records, for every process of the deployment (server
front ends = tokenizer managers, schedulers, detokenizers, the router), the CPU time it used
(``/proc/PID/stat``, exact) and, for each scheduler and front end, a py-spy profile (100 Hz,
on-CPU samples only), and the forward passes of each server that runs the language model
(prefill and decode, from its ``/metrics``). The summary lists CPU ms per request per process
and, per profiled process, the frames that hold the most samples (own time) and the functions
below the event loop (inclusive); the raw py-spy files stay in the work directory.

    .fork/venv/bin/python benchmark/profile_serving_el.py --config el-router   # image1 at 1 req/s
    .fork/venv/bin/python benchmark/profile_serving_el.py --config colocated --rate inf
    .fork/venv/bin/python benchmark/profile_serving_el.py --config el-router --stream multiturn \
        --rate 0.25 --no-py-spy --json F   # conversations at 0.25/s: first and later turns' TTFT
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving_el as bench  # noqa: E402
from epd_testbed.servers import stat_cpu_seconds  # noqa: E402


def py_spy() -> str:
    for candidate in (
        shutil.which("py-spy"),
        Path(sys.base_prefix) / "bin" / "py-spy",
        Path(sys.prefix) / "bin" / "py-spy",
    ):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    # the checkout venv has no packages of its own: py-spy is in the shared environment's bin/,
    # above its site-packages (sglang itself resolves to the checkout's overlay)
    import torch

    root = Path(torch.__file__).resolve()
    for parent in root.parents:
        if (parent / "bin" / "py-spy").is_file():
            return str(parent / "bin" / "py-spy")
    raise SystemExit("py-spy not found")


def rate_arg(text: str) -> str:
    """A client rate: ``inf`` or a positive number (kept as the client's text)."""
    if text != "inf" and not float(text) > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive rate or inf")
    return text


def fmt_ms(value) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def group_processes(pgid: int) -> dict[int, str]:
    out = subprocess.run(
        ["ps", "-eo", "pid=,pgid=,comm="], capture_output=True, text=True
    ).stdout
    procs = {}
    for line in out.splitlines():
        pid, group, comm = line.split(None, 2)
        if int(group) == pgid:
            procs[int(pid)] = comm.strip()
    return procs


def cpu_seconds(pid: int) -> float:
    return stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text())


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of one process (``/proc/PID/task``; threads of one name,
    e.g. a pool's workers or a native library's, are summed): which thread a process's CPU
    time is, including native threads no Python profiler sees (Mooncake's transport)."""
    out: dict[str, float] = collections.Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        out[text[text.index("(") + 1 : text.rindex(")")]] += stat_cpu_seconds(text)
    return out


FORWARD_PASSES = "sglang:cuda_graph_passes_total"  # every forward pass, by mode


def forward_passes(dep: bench.Deployment) -> dict[str, dict[str, float]]:
    """Forward passes so far of each server that runs the language model, by kind (upstream's
    ``sglang:cuda_graph_passes_total``, counted per pass with or without a graph)."""
    from epd_testbed import servers as srv

    return {
        s.spec.name: {
            kind: sum(
                srv.metric_sum(s, FORWARD_PASSES, mode=f"{kind}_{graph}")
                for graph in ("none", "cuda_graph")
            )
            for kind in ("prefill", "decode")
        }
        for s in dep.lm
    }


def transfer_gauges(dep: bench.Deployment) -> dict[str, float]:
    """(b): each server's last-request transfer latency (encode: send to Success; language:
    receiver created to rows taken, i.e. how long the language side waited for the encoder).
    """
    if dep.name != "el-router":
        return {}
    from epd_testbed import servers as srv

    return {
        s.spec.name: srv.encode_language_metrics(s).get(
            "transfer_seconds", float("nan")
        )
        for s in dep.servers
        if s.spec.name.endswith(("-encode", "-language"))
    }


def summarize(raw: Path, top: int = 12) -> list[str]:
    own, incl, total = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        frames, n = stack.split(";"), int(n)
        total += n
        own[frames[-1]] += n
        for frame in dict.fromkeys(f.split(" (")[0] for f in frames):
            incl[frame] += n
    lines = [f"    samples: {total}; own time:"]
    lines += [
        f"    {100 * v / total:5.1f}%  {k[:140]}" for k, v in own.most_common(top)
    ]
    lines.append("    inclusive:")
    lines += [
        f"    {100 * v / total:5.1f}%  {k[:140]}" for k, v in incl.most_common(3 * top)
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=list(bench.CONFIGS), default="el-router")
    ap.add_argument("--stream", choices=list(bench.ALL_STREAMS), default="image1")
    ap.add_argument(
        "--rate",
        type=rate_arg,
        default=None,
        help="requests (multiturn: conversations) per second, or inf (default: the full "
        "run's rate of a chat stream, else 1)",
    )
    ap.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="default: the full run's count for the rate",
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="also write the summary here"
    )
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the cell's result (bench_serving_el.py's record of a cell) here",
    )
    ap.add_argument(
        "--el-encode-args",
        default=None,
        help=f"replace the encode server's extra flags of el-router (default: {' '.join(bench.EL_ENCODE_ARGS)!r})",
    )
    ap.add_argument(
        "--server-threads",
        type=int,
        default=bench.SERVER_THREADS,
        help="OMP_NUM_THREADS of every server; 0: torch's default (default %(default)s)",
    )
    ap.add_argument(
        "--no-py-spy",
        dest="py_spy",
        action="store_false",
        help="CPU times only (py-spy pauses the processes it samples)",
    )
    args = ap.parse_args()
    if args.el_encode_args is not None:
        bench.EL_ENCODE_ARGS = tuple(shlex.split(args.el_encode_args))
    if args.rate is None:
        args.rate = bench.CHAT_STREAMS.get(args.stream, bench.RATES[0])
    n = args.num_prompts or (
        bench.CHAT_PROMPTS[args.stream]
        if args.stream in bench.CHAT_STREAMS
        else bench.PROMPTS.get(args.rate, bench.PROMPTS["1"])
    )
    bench.stop_servers_on_sigterm()

    from epd_testbed.tiny_ckpt import TinyVLMoeSpec, ensure_checkpoint

    model = ensure_checkpoint(TinyVLMoeSpec())
    work = Path(tempfile.mkdtemp(prefix="profile-serving-el-"))
    dep = bench.launch_deployment(
        args.config, model, work / "logs", args.server_threads
    )
    try:
        bench.warm_up(dep, model, work)
        procs = {}
        for server in dep.servers:
            for pid, comm in group_processes(server.pid).items():
                procs[pid] = (
                    f"{server.spec.name}:{'front end' if pid == server.pid else comm}"
                )
        spied = {
            pid: name
            for pid, name in procs.items()
            if args.py_spy and ("schedul" in name or "front end" in name)
        }
        duration = int(60 + 3 * n / (1 if args.rate == "inf" else float(args.rate)))
        spies = {
            pid: subprocess.Popen(
                [
                    py_spy(),
                    "record",
                    "-p",
                    str(pid),
                    "-r",
                    "100",
                    "-f",
                    "raw",
                    "-d",
                    str(duration),
                    "-o",
                    str(work / f"spy-{pid}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pid in spied
        }
        time.sleep(2)
        before = {pid: cpu_seconds(pid) for pid in procs}
        threads_before = {pid: thread_cpu_seconds(pid) for pid in procs}
        passes_before = forward_passes(dep)
        t0 = time.time()
        cell = bench.run_cell(dep, model, bench.Cell(args.stream, args.rate, n), work)
        wall = time.time() - t0
        gauges = transfer_gauges(dep)
        passes_after = forward_passes(dep)
        after = {pid: cpu_seconds(pid) for pid in procs}
        threads_after = {pid: thread_cpu_seconds(pid) for pid in procs}
        for spy in spies.values():
            spy.send_signal(2)  # SIGINT: py-spy writes what it has
        for spy in spies.values():
            spy.wait(60)
    finally:
        dep.stop()
    done = cell["completed"] or 1  # requests; a multi-turn conversation is several
    lines = [
        f"# {args.config} ({bench.CONFIGS[args.config]}), cell {args.stream}@{args.rate}, {n} "
        f"{'conversations' if args.stream == 'multiturn' else 'requests'} ({done} requests "
        "completed), "
        f"encode extra flags {' '.join(bench.EL_ENCODE_ARGS) if args.config == 'el-router' else '-'}, "
        f"OMP_NUM_THREADS per server {args.server_threads or 'unset (torch default)'}, "
        f"wall {wall:.1f} s, load {os.getloadavg()[0]:.1f}",
        f"TTFT mean / p50 {cell['mean_ttft_ms']:.0f} / {cell['median_ttft_ms']:.0f} ms, TPOT p50 "
        f"{cell['median_tpot_ms']:.1f} ms, E2E mean {cell['mean_e2e_latency_ms']:.0f} ms, "
        f"{cell['request_throughput']:.2f} req/s",
        *(
            [
                f"turns: TTFT p50 of the {t['first_turns']} first turns "
                f"{fmt_ms(t['ttft_p50_first_ms'])}, of the {t['later_turns']} later turns "
                f"{fmt_ms(t['ttft_p50_later_ms'])} (p99 {fmt_ms(t['ttft_p99_later_ms'])})"
            ]
            if (t := cell.get("turns"))
            else []
        ),
        "",
        "CPU ms per request (from /proc, whole cell):",
    ]
    total = 0.0
    for pid, name in sorted(procs.items(), key=lambda kv: kv[1]):
        ms = 1000 * (after[pid] - before[pid]) / done
        total += ms
        lines.append(f"  {name:45s} {ms:8.1f}")
        for thread, seconds in sorted(
            threads_after[pid].items(), key=lambda kv: -kv[1]
        ):
            t_ms = 1000 * (seconds - threads_before[pid].get(thread, 0.0)) / done
            if t_ms >= 0.5:
                lines.append(f"      thread {thread:35s} {t_ms:8.1f}")
    lines.append(f"  {'total':45s} {total:8.1f}")
    for name, after_passes in passes_after.items():
        delta = {k: v - passes_before[name][k] for k, v in after_passes.items()}
        lines.append(
            f"{name}: forward passes {delta['prefill']:.0f} prefill + {delta['decode']:.0f} "
            f"decode over the cell, {(delta['prefill'] + delta['decode']) / done:.2f} per request"
        )
    for name, seconds in gauges.items():
        lines.append(
            f"{name}: sglang:encode_language_transfer_seconds of the last request "
            f"{1000 * seconds:.1f} ms"
        )
    for pid, name in spied.items():
        raw = work / f"spy-{pid}.txt"
        lines += ["", f"py-spy {name} (pid {pid}, 100 Hz, on-CPU samples):"]
        lines += summarize(raw) if raw.is_file() else ["    (no profile written)"]
    text = "\n".join(lines) + "\n"
    print(text)
    print(f"raw profiles and logs: {work}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(cell, indent=1, default=str))


if __name__ == "__main__":
    main()
