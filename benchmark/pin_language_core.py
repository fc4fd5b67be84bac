"""Pin every language server of the test bed to core 1, for ``bench_serving_el.py --mixed``.

The CPU test bed runs the encoder, the language server, the router and the clients on 2 shared
cores; a text-decode stall there may be a core taken by the encoder's vision tower rather than
work the language server did (docs/benchmarks.md, "Text decoding under an image burst"). This
mirrors separate machines, the same way for every deployment that has a language server ((b)
``--disaggregation-mode language``, (c) ``--language-only``): run the benchmark under
``taskset -c 0`` and this script beside it; it moves each language server's process tree (every
thread of launch_server, scheduler, detokenizer) to core 1 as it appears, for ``seconds``.
Other processes of the machine still float over both cores::

    taskset -c 0 python benchmark/pin_language_core.py 600 &
    taskset -c 0 python benchmark/bench_serving_el.py --mixed --configs el-router,upstream-epd
"""

import os
import subprocess
import sys
import time

LANGUAGE_FLAGS = ("--disaggregation-mode language", "--language-only")


def processes() -> dict:
    """pid -> (parent pid, command line) of every process that can be read."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(pid)] = (ppid, cmd)
    return out


def language_trees(procs: dict) -> set:
    """The language servers' launch_server processes and all their descendants."""
    tree = {
        p
        for p, (_, cmd) in procs.items()
        if "launch_server" in cmd and any(f in cmd for f in LANGUAGE_FLAGS)
    }
    grew = True
    while grew:
        new = {p for p, (pp, _) in procs.items() if pp in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


def main(seconds: float, core: str = "1") -> None:
    end = time.time() + seconds
    seen = set()
    while time.time() < end:
        for pid in language_trees(processes()):
            # every thread (-a), again each pass: threads started since inherit the mask, but a
            # process spawned between passes starts with its parent's old one
            subprocess.run(
                ["taskset", "-a", "-p", "-c", core, str(pid)], capture_output=True
            )
            if pid not in seen:
                seen.add(pid)
                print(f"{time.strftime('%T')} pinned {pid} to core {core}", flush=True)
        time.sleep(2)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 600)
