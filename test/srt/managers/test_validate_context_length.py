"""Patch 0009: ``managers/utils.validate_context_length``, the tokenizer manager's context-length
check moved unchanged into a function (the language side of encode/language disaggregation calls
it again with the expanded prompt). Its answers, word for word, and its truncation."""

from __future__ import annotations

import pytest
from sglang.srt.managers.utils import validate_context_length

CONTEXT = 16


def test_fitting_request_is_left_as_it_is() -> None:
    ids, params = list(range(10)), {"max_new_tokens": 6}
    validate_context_length(ids, params, CONTEXT, 0, allow_auto_truncate=False)
    assert (ids, params) == (list(range(10)), {"max_new_tokens": 6})


def test_input_at_the_context_length_is_refused() -> None:
    # reserved tokens count as input: 14 + 2 = 16 >= 16
    with pytest.raises(ValueError) as e:
        validate_context_length(
            list(range(14)), {}, CONTEXT, 2, allow_auto_truncate=False
        )
    assert str(e.value) == (
        "The input (16 tokens) is longer than the model's context length (16 tokens)."
    )


def test_input_and_output_over_the_context_length_is_refused() -> None:
    with pytest.raises(ValueError) as e:
        validate_context_length(
            list(range(10)),
            {"max_new_tokens": 7},
            CONTEXT,
            0,
            allow_auto_truncate=False,
        )
    assert str(e.value) == (
        "Requested token count exceeds the model's maximum context length of 16 tokens. "
        "You requested a total of 17 tokens: 10 tokens from the input messages and 7 tokens "
        "for the completion. Please reduce the number of tokens in the input messages or the "
        "completion to fit within the limit."
    )


def test_auto_truncate_cuts_the_input_in_place_then_the_output() -> None:
    ids, params = list(range(20)), {"max_new_tokens": 4}
    validate_context_length(ids, params, CONTEXT, 0, allow_auto_truncate=True)
    assert ids == list(range(16))
    assert params == {"max_new_tokens": 0}


def test_auto_truncate_cuts_max_new_tokens_to_what_is_left() -> None:
    ids, params = list(range(10)), {"max_new_tokens": 9}
    validate_context_length(ids, params, CONTEXT, 1, allow_auto_truncate=True)
    assert ids == list(range(10))
    assert params == {"max_new_tokens": 5}  # 16 - (10 + 1 reserved)


def test_total_check_can_be_switched_off() -> None:
    params = {"max_new_tokens": 100}
    validate_context_length(
        list(range(10)), params, CONTEXT, 0, False, validate_total_tokens=False
    )
    assert params == {"max_new_tokens": 100}


def test_no_ids_and_no_max_new_tokens() -> None:
    validate_context_length(None, {}, CONTEXT, 0, allow_auto_truncate=False)
