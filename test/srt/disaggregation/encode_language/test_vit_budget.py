"""The encode side's ViT batching rule (``encode_scheduler.take_vit_batch``): waiting
requests join one vision-tower call in arrival order while their placeholder tokens fit the
budget (``--max-prefill-tokens``); the first always joins; nobody overtakes."""

from __future__ import annotations

import pytest

from sglang.srt.disaggregation.encode_language.encode_scheduler import take_vit_batch


def _take(sizes, budget):
    batch, rest = take_vit_batch(list(sizes), budget, tokens=lambda n: n)
    return batch, rest


@pytest.mark.parametrize(
    "sizes, budget, batch, rest",
    [
        ([24, 24, 24], 16384, [24, 24, 24], []),  # the default budget takes everyone
        ([24, 24, 24], 48, [24, 24], [24]),  # exactly at the budget still fits
        ([24, 24, 24], 47, [24], [24, 24]),
        ([100, 4], 32, [100], [4]),  # larger than the budget: runs alone
        ([4, 100, 4], 32, [4], [100, 4]),  # no overtaking of the large request
        ([64], 1, [64], []),
        ([], 32, [], []),
    ],
)
def test_take_vit_batch(sizes, budget, batch, rest) -> None:
    assert _take(sizes, budget) == (batch, rest)


def test_every_request_is_taken_exactly_once_in_order() -> None:
    sizes, budget, calls = [5, 30, 1, 1, 40, 2, 2, 2], 32, []
    while sizes:
        batch, sizes = _take(sizes, budget)
        assert batch and (len(batch) == 1 or sum(batch) <= budget)
        calls.append(batch)
    assert [n for call in calls for n in call] == [5, 30, 1, 1, 40, 2, 2, 2]
    assert calls == [[5], [30, 1, 1], [40], [2, 2, 2]]
