"""The prompts every end-to-end test and benchmark uses, so colocated, disaggregated, upstream
and Hugging Face runs are compared on exactly the same inputs."""
from __future__ import annotations

from dataclasses import dataclass

from epd_testbed import images

MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class Case:
    name: str
    question: str
    images: tuple[tuple[int, int, int], ...] = ()  # (width, height, seed) of generated images

    def messages(self) -> list[dict]:
        parts: list[dict] = [
            {"type": "image_url", "image_url": {"url": str(images.save_image(w, h, seed))}}
            for w, h, seed in self.images
        ]
        if not parts:
            return [{"role": "user", "content": self.question}]
        return [{"role": "user", "content": parts + [{"type": "text", "text": self.question}]}]


VL_CASES = (
    Case("one_image", "What is in this image?", ((64, 64, 1),)),
    Case("two_images", "Compare the two pictures.", ((64, 64, 2), (96, 64, 3))),
    Case("non_square", "Describe the shapes and colors.", ((200, 120, 4),)),
    Case("text_only", "Tell me about red circles and blue squares."),
)
# Larger requests for the tests at production defaults (tiny checkpoint: 4 tokens for 64x64 up
# to 64 for 256x256). ``over_reservation`` is long in text (about 2250 tokens: more than the
# 2048-token reservation, so it holds 16 blocks and its payload, which carries every token's id
# and position, arrives in two rounds); it is long in text, not in images, because on CPU the
# vision tower's attention is dense over every patch of one batched call.
LARGE_CASES = (
    Case("large_image", "What is in this image?", ((256, 256, 40),)),
    Case("four_mixed_images", "Describe each picture.",
         ((64, 64, 41), (256, 256, 42), (200, 120, 43), (128, 96, 44))),
    Case("over_reservation", "Story: " + "red circles and blue squares meet green triangles. " * 200,
         ((128, 96, 45),)),
    Case("over_reservation_b", "Story: " + "blue squares chase red circles past yellow lines. " * 200,
         ((96, 128, 46),)),
    Case("over_reservation_c", "Story: " + "green triangles hide behind red circles and lines. " * 200,
         ((112, 112, 47),)),
)
TEXT_CASES = (
    Case("short", "Hello, what color is the sky?"),
    Case("longer", "Count the shapes: one circle, two squares, three triangles and many more lines."),
)


def check_greedy_equal(server, model_path, case: Case, max_new_tokens: int = MAX_NEW_TOKENS,
                       timeout: float = 300) -> list[int]:
    """Send ``case`` to ``server`` and assert its greedy tokens equal Hugging Face's."""
    from epd_testbed import servers
    from epd_testbed.hf_reference import hf_greedy, render_prompt

    prompt, image_paths = render_prompt(model_path, case.messages())
    expected = hf_greedy(model_path, case.messages(), max_new_tokens, ignore_eos=True)
    out = servers.generate(server, prompt, image_paths, max_new_tokens, ignore_eos=True, timeout=timeout)
    got = out["output_ids"]
    assert got == expected, f"{case.name}: sglang {got} != hf {expected}"
    assert len(set(expected)) > 1, f"{case.name}: degenerate reference {expected}"
    return got
