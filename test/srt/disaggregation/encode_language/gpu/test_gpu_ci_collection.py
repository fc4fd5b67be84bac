"""The GPU CI files import, collect and register here, and skip with a clear reason.

They cannot run on this CPU host; this test keeps them from rotting: a syntax or import
error, a renamed test, a lost CUDA registration or a skip that would start servers first
fails here instead of on the user's GPU runner. Collection and the skipping run happen in
a pytest subprocess, as on a runner.
"""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from sglang.test.ci.ci_register import HWBackend, collect_tests, ut_parse_one_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[4]
GREEDY = HERE / "test_el_qwen3_vl_moe_greedy.py"
MMMU = HERE / "test_el_qwen3_vl_moe_mmmu.py"
GPU_FILES = [GREEDY, MMMU]

# file -> (suite, nightly) it must be registered for
EXPECTED_REGISTRATION = {
    GREEDY: ("extra-b-test-4-gpu-h100", False),
    MMMU: ("nightly-4-gpu", True),
}
GREEDY_CLASS = "TestQwen3VLMoeEncodeLanguageGreedy"
MMMU_CLASS = "TestQwen3VLMoeEncodeLanguageMMMU"
EXPECTED_IDS = {
    f"{GREEDY.relative_to(ROOT)}::{GREEDY_CLASS}::{name}"
    for name in (
        "test_chat_completions",
        "test_chat_completions_stream",
        "test_deployment_modes",
        "test_generate_one_image",
        "test_generate_text_only",
        "test_generate_two_images",
        "test_generate_video",
    )
} | {f"{MMMU.relative_to(ROOT)}::{MMMU_CLASS}::test_mmmu_matches_colocated"}
SKIP_REASON_HERE = (
    "needs 3 CUDA GPUs (encode TP1 on GPU 0, language TP2 on GPUs 1-2); found 0"
)


def run_pytest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", *args, *map(str, GPU_FILES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


@pytest.mark.parametrize("path", GPU_FILES, ids=lambda p: p.name)
def test_cuda_registration(path):
    registries, has_main_entry = ut_parse_one_file(str(path))
    assert has_main_entry, f"{path.name}: `python3 {path.name}` would run nothing"
    assert [r.backend for r in registries] == [HWBackend.CUDA]
    (reg,) = registries
    suite, nightly = EXPECTED_REGISTRATION[path]
    assert (reg.effective_suite, reg.nightly, reg.disabled) == (suite, nightly, None)
    assert reg.est_time > 0
    assert collect_tests([str(path)], sanity_check=True) == registries


def test_collects_expected_ids():
    result = run_pytest("--collect-only", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    ids = {line for line in result.stdout.splitlines() if "::" in line}
    assert ids == EXPECTED_IDS, result.stdout


@pytest.mark.skipif(
    torch.cuda.device_count() > 0, reason="a GPU host gives another skip reason"
)
def test_skip_here_with_reason(tmp_path):
    report = tmp_path / "report.xml"
    result = run_pytest(f"--junitxml={report}", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        path = case.get("classname").rsplit(".", 1)[0].replace(".", "/") + ".py"
        skipped = case.find("skipped")
        outcomes[
            f"{path}::{case.get('classname').rsplit('.', 1)[1]}::{case.get('name')}"
        ] = (None if skipped is None else skipped.get("message"))
    assert set(outcomes) == EXPECTED_IDS
    assert all(m == SKIP_REASON_HERE for m in outcomes.values()), outcomes
