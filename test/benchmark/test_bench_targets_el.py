"""benchmark/bench_targets_el.py without servers: the per-round ratios to (a2), their median
and verdict, the CPU bound of a cell, and the writers, on a synthetic result."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmark"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def targets():
    saved = sys.path[:]
    module = load("bench_targets_el")
    yield module
    sys.path[:] = saved
    for name in ("bench_targets_el", "bench_serving_el"):
        sys.modules.pop(name, None)


def test_rounds_get_new_images(targets) -> None:
    """Every round and every cell of a round has a seed of its own, as has a chat stream at
    a rate other than the full run's; round 0 keeps the full run's seeds."""
    bench = targets.bench
    seeds = [
        bench.Cell(c.stream, c.rate, c.n, rep=rep).seed
        for rep in range(1, 6)
        for c in targets.TARGET_CELLS
    ]
    assert len(seeds) == len(set(seeds))
    full = {c.seed for c in bench.planned_cells("colocated-x2", quick=False)}
    assert not full & set(seeds)
    assert bench.Cell("multiturn", "2", 12).seed in full
    assert bench.Cell("multiturn", "0.5", 12).seed not in full
    assert bench.Cell("image1", "inf", 32, rep=2).key == "image1@inf#r2"
    # every stream at every rate it may run at: a seed of its own
    every = [
        bench.Cell(stream, rate, 1, rep=rep).seed
        for rep in range(3)
        for stream in bench.STREAMS
        for rate in bench.RATES
    ] + [
        bench.Cell(stream, rate, 1, rep=rep).seed
        for rep in range(3)
        for stream, default in bench.CHAT_STREAMS.items()
        for rate in (default, *bench.OTHER_CHAT_RATES)
    ]
    assert len(every) == len(set(every))
    with pytest.raises(ValueError):
        bench.Cell("multiturn", "3", 12).seed


def cell(thr: float, later_ttft: float, busiest: str, share: float) -> dict:
    """A cell of ``thr`` req/s whose ``busiest`` process used ``share`` of a core."""
    return {
        "request_throughput": thr,
        "completed": 32,
        "duration": 32 / thr,
        "turns": {
            "ttft_p50_later_ms": later_ttft,
            "first_turns": 12,
            "later_turns": 38,
        },
        "measured": {"items_sent": 12.0, "items_held": 38.0},
        "background_cpu_s": 0.2,
        "process_cpu_s": {
            busiest: share * 32 / thr,
            busiest.split(":")[0] + ":python": 0.1,
        },
    }


def synthetic(targets) -> dict:
    """Two rounds: (b) at 0.95 and 0.91 of (a2)'s throughput (median 0.93: met), 1.2 and 1.4
    of its later-turn TTFT (median 1.3: missed)."""
    rounds = []
    for rep, (b_thr, b_ttft) in enumerate(((19.0, 60.0), (18.2, 70.0)), 1):
        cells = {}
        for key in targets.TARGETS:
            cells[key] = {
                "colocated-x2": cell(20.0, 50.0, "colocated-0:sglang::schedul", 0.8),
                "el-router": cell(
                    b_thr, b_ttft, "bench-el-language:sglang::schedul", 1.0
                ),
            }
        rounds.append(
            {"rep": rep, "order": ["colocated-x2", "el-router"], "cells": cells}
        )
    return {
        "machine": {"cpu": "x", "cores": 2, "versions": {}},
        "command": "python x",
        "configs": {"colocated-x2": {}, "el-router": {}},
        "rounds": rounds,
        "wall_s": 1.0,
    }


def test_ratios_median_and_verdict(targets) -> None:
    results = synthetic(targets)
    assert targets.ratios(results, "image1@inf", "el-router") == pytest.approx(
        [0.95, 0.91]
    )
    assert targets.ratios(results, "image1@inf", "el-router-2l") == []
    rows = {(r["cell"], r["config"]): r for r in targets.summary(results)}
    assert rows["image1@inf", "el-router"]["median"] == pytest.approx(0.93)
    assert rows["image1@inf", "el-router"]["met"] is True
    assert rows["zipf@inf", "el-router"]["met"] is False  # 0.93 < 1.0
    assert rows["multiturn@2", "el-router"]["median"] == pytest.approx(1.3)
    assert rows["multiturn@2", "el-router"]["met"] is False
    assert ("image1@inf", "el-router-2l") not in rows  # not measured: no row


def test_bound_of_a_cell(targets) -> None:
    """The busiest process bounds a deployment at one core; all its processes at the
    machine's cores (whichever is lower)."""
    used = {"lang:sglang::schedul": 1.6, "enc:sglang::schedul": 1.0}
    record = {"duration": 2.0, "completed": 32, "process_cpu_s": used}
    b = targets.bound(record, cores=2)
    assert b["busiest"] == "lang:sglang::schedul"
    assert b["busiest_core_share"] == pytest.approx(0.8)
    assert b["cores_used"] == pytest.approx(1.3)
    assert b["ceiling_req_s"] == pytest.approx(20.0)  # 32 / 1.6 s < 2 x 32 / 2.6 s
    spread = {f"p{i}:python": 1.0 for i in range(3)}
    record = {"duration": 2.0, "completed": 32, "process_cpu_s": spread}
    assert targets.bound(record, cores=2)["ceiling_req_s"] == pytest.approx(64 / 3)


def test_writers(targets, write_reports) -> None:
    table = write_reports(targets, synthetic(targets), "serving-targets")
    assert (
        "| image1@inf: req/s >= 0.9 x (a2) | (b) | 0.95, 0.91 | **0.93** | 0.91 - 0.95 "
        "| met |" in table
    )
    assert (
        "| multiturn@2: TTFT p50 turns >= 2 (ms) <= 1.1 x (a2) | (b) | 1.20, 1.40 "
        in table
    )
    assert "| image1@inf | (b) | bench-el-language:sglang::schedul | 100% |" in table
    assert "items held 38 = later turns 38 (met)" in table
    # (b)'s language scheduler: 1.0 of a core over 32/19 s and 32/18.2 s, per request
    # 1000/19 and 1000/18.2 ms, median 53.8; its front end 0.1 s / 32 requests
    assert "| image1@inf | (b) | 3.1 | 53.8 | 0.0 | 0.0 | 56.9 |" in table
