"""Qwen3-VL-30B-A3B served disaggregated (encode TP1 + language TP2 behind sglang-router)
answers exactly like the colocated server: same greedy token ids, same per-token logprobs
within a bf16 tolerance, through /generate and /v1/chat/completions (streamed and not).

The colocated reference runs first on the language GPUs, every case sent one at a time on
an empty radix cache; then the disaggregated deployment gets the same requests in the
same way. Same GPUs, same TP, same batch shape (one request), same CUDA graphs: the
transport is the only change, so the token ids must match exactly.
"""

import json
import unittest
from dataclasses import dataclass

import requests
from encode_language_fixture import (
    MODEL,
    EncodeLanguageServerBase,
    flush_cache,
    skip_without_gpus,
)
from transformers import AutoProcessor

from sglang.test.ci.ci_register import register_cuda_ci
from sglang.test.test_utils import DEFAULT_IMAGE_URL
from sglang.test.vlm_utils import (
    IMAGE_MAN_IRONING_URL,
    IMAGE_SGL_LOGO_URL,
    VIDEO_JOBS_URL,
)

register_cuda_ci(est_time=720, stage="extra-b", runner_config="4-gpu-h100")

MAX_NEW_TOKENS = 32
# bf16 on GPU: logits carry ~8 bits of mantissa, so one rounding step in a logit of
# magnitude 16-32 is 0.06-0.125 and a reduction order change anywhere upstream moves a
# logprob by a few hundredths. 6e-2 is upstream's own decode tolerance for bf16
# (test_generation_models.py); a missing deepstack level, wrong M-RoPE positions or a
# corrupted embedding row moves logprobs by tenths to whole units.
LOGPROB_ATOL = 6e-2

# name -> (media [(kind, url)], question); /generate requests, one at a time.
GENERATE_CASES = {
    "one_image": (
        [("image", DEFAULT_IMAGE_URL)],
        "Describe this image in one sentence.",
    ),
    "two_images": (
        [("image", IMAGE_MAN_IRONING_URL), ("image", IMAGE_SGL_LOGO_URL)],
        "What is shown in each of the two images?",
    ),
    "video": ([("video", VIDEO_JOBS_URL)], "What is the person in the video doing?"),
    "text_only": ([], "Name the three primary colours of light."),
}
CHAT_QUESTION = (IMAGE_MAN_IRONING_URL, "What is unusual about this image?")


@dataclass
class Answer:
    """One greedy answer: the generated tokens (ids, or strings from the OpenAI API)
    and the logprob of each."""

    tokens: list
    logprobs: list


def generate(url: str, processor, case: str) -> Answer:
    media, question = GENERATE_CASES[case]
    content = [{"type": kind} for kind, _ in media]
    content.append({"type": "text", "text": question})
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        tokenize=False,
        add_generation_prompt=True,
    )
    body = {
        "text": text,
        "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW_TOKENS},
        "return_logprob": True,
    }
    for kind in ("image", "video"):
        urls = [u for k, u in media if k == kind]
        if urls:
            body[f"{kind}_data"] = urls
    response = requests.post(url + "/generate", json=body, timeout=600)
    assert response.status_code == 200, f"{case}: {response.text}"
    triples = response.json()["meta_info"]["output_token_logprobs"]
    return Answer([t[1] for t in triples], [t[0] for t in triples])


def chat_body(stream: bool) -> dict:
    image_url, question = CHAT_QUESTION
    return {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "temperature": 0,
        "max_tokens": MAX_NEW_TOKENS,
        "logprobs": True,
        "stream": stream,
    }


def chat(url: str) -> Answer:
    response = requests.post(
        url + "/v1/chat/completions", json=chat_body(False), timeout=600
    )
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["logprobs"]["content"]
    return Answer([c["token"] for c in content], [c["logprob"] for c in content])


def chat_stream(url: str) -> Answer:
    answer = Answer([], [])
    with requests.post(
        url + "/v1/chat/completions", json=chat_body(True), stream=True, timeout=600
    ) as response:
        assert response.status_code == 200, response.text
        for line in response.iter_lines(decode_unicode=True):
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data:") :])
            assert "choices" in chunk, f"stream event without choices: {line}"
            for choice in chunk["choices"]:
                for c in (choice.get("logprobs") or {}).get("content") or []:
                    answer.tokens.append(c["token"])
                    answer.logprobs.append(c["logprob"])
    return answer


@skip_without_gpus
class TestQwen3VLMoeEncodeLanguageGreedy(EncodeLanguageServerBase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.processor = AutoProcessor.from_pretrained(cls.model, trust_remote_code=True)
        cls.reference = cls.with_colocated(cls.answer_everything)
        cls.launch_all()

    @classmethod
    def answer_everything(cls, url: str) -> dict:
        """Every case on the colocated server, plus its resolved server args."""
        answers = {"server_info": requests.get(url + "/server_info", timeout=60).json()}
        for case in GENERATE_CASES:
            flush_cache(url)
            answers[case] = generate(url, cls.processor, case)
        flush_cache(url)
        answers["chat"] = chat(url)
        flush_cache(url)
        answers["chat_stream"] = chat_stream(url)
        return answers

    def assert_same_answer(self, case: str, got: Answer):
        ref = self.reference[case]
        self.assertGreater(len(ref.tokens), 0, f"{case}: empty colocated answer")
        first = next(
            (i for i, (a, b) in enumerate(zip(got.tokens, ref.tokens)) if a != b),
            min(len(got.tokens), len(ref.tokens)),
        )
        self.assertEqual(
            got.tokens,
            ref.tokens,
            f"{case}: disaggregated tokens differ from colocated from position {first}",
        )
        worst = max(abs(a - b) for a, b in zip(got.logprobs, ref.logprobs))
        self.assertLessEqual(
            worst,
            LOGPROB_ATOL,
            f"{case}: max |logprob difference| {worst:.4f} > {LOGPROB_ATOL}\n"
            f"disaggregated {got.logprobs}\ncolocated     {ref.logprobs}",
        )

    def check_generate(self, case: str):
        flush_cache(self.decode_url)
        self.assert_same_answer(case, generate(self.lb_url, self.processor, case))

    def test_deployment_modes(self):
        """The servers run the new modes, on CUDA with graphs on and the attention
        backend upstream resolved for the colocated server."""
        colocated = self.reference["server_info"]
        encode = requests.get(self.prefill_url + "/server_info", timeout=60).json()
        language = requests.get(self.decode_url + "/server_info", timeout=60).json()
        self.assertEqual(encode["disaggregation_mode"], "encode")
        self.assertEqual(encode["tp_size"], 1)
        self.assertEqual(language["disaggregation_mode"], "language")
        self.assertEqual(language["tp_size"], 2)
        self.assertEqual(language["disaggregation_transfer_backend"], "mooncake")
        self.assertEqual(encode["device"], "cuda")
        self.assertEqual(language["device"], "cuda")
        self.assertFalse(language["disable_cuda_graph"])
        self.assertFalse(language["disable_decode_cuda_graph"])
        self.assertEqual(language["attention_backend"], colocated["attention_backend"])

    def test_generate_one_image(self):
        self.check_generate("one_image")

    def test_generate_two_images(self):
        self.check_generate("two_images")

    def test_generate_video(self):
        self.check_generate("video")

    def test_generate_text_only(self):
        self.check_generate("text_only")

    def test_chat_completions(self):
        flush_cache(self.decode_url)
        self.assert_same_answer("chat", chat(self.lb_url))

    def test_chat_completions_stream(self):
        flush_cache(self.decode_url)
        self.assert_same_answer("chat_stream", chat_stream(self.lb_url))


if __name__ == "__main__":
    unittest.main()
