"""MMMU through the disaggregated Qwen3-VL-30B-A3B deployment (encode TP1 + language TP2
behind sglang-router) scores like the colocated server.

SGLang's own MMMU eval (``python -m sglang.test.run_eval --eval-name mmmu --num-examples
100 --num-threads 64``, called in-process the way upstream's tests call it) runs first
against the colocated server, then through the router. Unlike the greedy test, requests
run 64 at a time, so batching, chunked prefill and CUDA-graph batch sizes all differ
between the two runs.
"""

import unittest
from types import SimpleNamespace

from encode_language_fixture import EncodeLanguageServerBase, skip_without_gpus

from sglang.test.ci.ci_register import register_cuda_ci
from sglang.test.run_eval import run_eval

register_cuda_ci(est_time=1080, suite="nightly-4-gpu", nightly=True)

# The eval's fixed, deterministic 100-question subset (sorted by id across all subjects).
MMMU_EXAMPLES = 100
MMMU_THREADS = 64
# Greedy on both sides, but 64 concurrent requests put each question in different
# batches on the two deployments; in bf16 that flips near-tie tokens of the long
# step-by-step answers, and a few final answers with them, either way. 0.05 is 5 of the
# 100 questions. A broken image path (deepstack lost, rows misaligned, wrong M-RoPE
# positions) leaves the model guessing from text and costs far more than that.
MMMU_SCORE_TOLERANCE = 0.05
# Sanity bound on the reference itself, so two equally broken deployments cannot pass:
# chance on MMMU's 4-option multiple choice is about 0.25.
MMMU_MIN_COLOCATED_SCORE = 0.40


def mmmu_score(base_url: str, model: str) -> float:
    args = SimpleNamespace(
        base_url=base_url,
        model=model,
        eval_name="mmmu",
        num_examples=MMMU_EXAMPLES,
        num_threads=MMMU_THREADS,
    )
    return run_eval(args)["score"]


@skip_without_gpus
class TestQwen3VLMoeEncodeLanguageMMMU(EncodeLanguageServerBase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.colocated_score = cls.with_colocated(lambda url: mmmu_score(url, cls.model))
        cls.launch_all()

    def test_mmmu_matches_colocated(self):
        self.assertGreaterEqual(self.colocated_score, MMMU_MIN_COLOCATED_SCORE)
        score = mmmu_score(self.lb_url, self.model)
        print(f"MMMU colocated {self.colocated_score:.3f} disaggregated {score:.3f}")
        self.assertLessEqual(
            abs(score - self.colocated_score),
            MMMU_SCORE_TOLERANCE,
            f"disaggregated MMMU {score:.3f} vs colocated {self.colocated_score:.3f}",
        )


if __name__ == "__main__":
    unittest.main()
