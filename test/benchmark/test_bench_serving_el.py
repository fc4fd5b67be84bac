"""benchmark/bench_serving_el.py without servers: argument parsing, the cell plan, and the
writers (markdown table, ratios, PNG, the generated block of a doc) on a synthetic result."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmark" / "bench_serving_el.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serving_el", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_arguments(bench, tmp_path) -> None:
    args = bench.parse_args(
        ["--quick", "--configs", "el-router,colocated", "--out-dir", str(tmp_path)]
    )
    assert args.configs == ["el-router", "colocated"]
    assert args.json == tmp_path / "serving-cpu-quick.json"
    assert (
        bench.parse_args(["--out-dir", str(tmp_path)]).json
        == tmp_path / "serving-cpu.json"
    )
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "nope"])


def test_cell_plan_and_seeds(bench) -> None:
    cells = bench.planned_cells("el-router", quick=False)
    keys = [c.key for c in cells]
    cold = len(bench.STREAMS) * len(bench.RATES) + len(bench.CHAT_STREAMS)
    assert len(keys) == len(set(keys)) == cold + 1
    # the repeated run follows its cold twin directly (no cache flush in between)
    twin = keys.index(bench.cell_key(*bench.REPEATED))
    assert keys[twin + 1] == bench.cell_key(*bench.REPEATED, True)
    seeds = {c.seed for c in cells}
    assert len(seeds) == cold  # the repeated run re-sends its twin's seed
    assert bench.WARMUP_SEED not in seeds
    # (b2): the repeated-image streams only, every router policy, images of its own per policy
    b2 = bench.planned_cells("el-global-cache", quick=False)
    assert {c.stream for c in b2} == set(bench.CHAT_STREAMS)
    assert {c.policy for c in b2} == set(bench.B2_POLICIES)
    assert len({c.seed for c in b2}) == len(b2)
    argv = bench.client_argv(
        "http://h:1", Path("/m"), "image3", "inf", 7, 5, Path("/o.jsonl")
    )
    assert argv[argv.index("--image-count") + 1] == "3"
    assert argv[argv.index("--warmup-requests") + 1] == "0"
    assert argv[argv.index("--seed") + 1] == "7"


def synthetic(bench) -> dict:
    def cell(thr: float, ttft: float, transfer: dict | None = None) -> dict:
        c = {k: 1.0 for k in bench.RESULT_KEYS}
        c.update(
            request_throughput=thr,
            median_ttft_ms=ttft,
            mean_ttft_ms=ttft,
            cache_hit_rate_pct=4.0,
            load1_after=1.0,
            transfer=transfer,
            command="python -m sglang.benchmark.serving --base-url http://h:1 --model /m",
        )
        return c

    measured = {
        "source": "measured: x",
        "bytes_per_request": 1000.0,
        "resume_rounds_per_request": 1.0,
    }
    configs = {}
    for name, (thr, ttft) in {
        "colocated": (10.0, 100.0),
        "el-router": (12.0, 110.0),
        "upstream-epd": (8.0, 120.0),
    }.items():
        cells = {
            bench.cell_key(s, r): cell(
                thr, ttft, measured if name == "el-router" else None
            )
            for s in bench.STREAMS
            for r in bench.RATES
        }
        configs[name] = {"cells": cells, "startup": {"ready_s": {name: 30.0}}}
    return {
        "configs": configs,
        "machine": {"cores": 2, "versions": {}},
        "command": "python x",
        "model": {"dir": "/m"},
    }


def test_ratios_and_table(bench) -> None:
    results = synthetic(bench)
    r = bench.ratios(results)[0]
    assert r["ttft_p50_b_over_a_low"] == pytest.approx(1.1)
    assert r["throughput_b_over_c_sat"] == pytest.approx(1.5)
    table = bench.render_markdown(results)
    assert "| (b) el-router | inf | 12.00 | 110 / 110 / 1 |" in table
    assert "1000 (measured)" in table
    assert "TTFT p50 (b) within 15% of (a) | met | ratio 1.10 |" in table
    assert "throughput (b) >= (c) | met | ratio 1.50 |" in table
    # (a2) was not part of the synthetic result: its targets are not measured, not met
    assert "(b) >= 0.9x (a2) | not measured | ratio - |" in table
    assert "python -m sglang.benchmark.serving --base-url $URL --model $MODEL" in table
    # the repeated run was not part of the synthetic result
    assert "| (a) colocated | inf | not run |" in table
    assert "| (a2) colocated-x2 | inf | not run |" in table
    # (b3) not measured: no target rows of its own
    assert "(b3)" not in "".join(row[0] for row in bench.targets(results))


def test_targets_of_b3_against_a2(bench) -> None:
    """With (a2) and (b3) measured, (b3) gets its own rows of issue 17's targets."""
    results = synthetic(bench)
    configs = results["configs"]
    for name, thr in (("colocated-x2", 20.0), ("el-router-2l", 19.0)):
        configs[name] = {
            "cells": {
                key: dict(c, request_throughput=thr)
                for key, c in configs["el-router"]["cells"].items()
            }
        }
    rows = {what: (met, value) for what, met, value in bench.targets(results)}
    assert rows["one-image saturation throughput (b3) >= 0.9x (a2)"] == (
        True,
        "ratio 0.95",
    )
    assert rows["one-image saturation throughput (b) >= 0.9x (a2)"] == (
        False,
        "ratio 0.60",
    )


def test_writers(bench, write_reports) -> None:
    table = write_reports(bench, synthetic(bench), "serving-cpu")
    assert "| (b) el-router | inf | 12.00 |" in table


def test_upstream_bytes_are_the_image_rows(bench) -> None:
    shape = {
        "hidden": 128,
        "deepstack": 3,
        "dtype_bytes": 4,
        "patch_size": 16,
        "spatial_merge_size": 2,
    }
    # 224x224 -> (224 / 32)^2 = 49 image tokens, each (1 + 3) x 128 fp32 values
    assert (
        bench.upstream_transfer("image1", shape)["bytes_per_request"]
        == 49 * 4 * 128 * 4
    )
    assert (
        bench.upstream_transfer("image3", shape)["bytes_per_request"]
        == 3 * 49 * 4 * 128 * 4
    )
    assert bench.upstream_transfer("text", shape)["bytes_per_request"] == 0
