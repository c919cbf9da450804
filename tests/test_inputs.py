"""Every input form an invoke accepts becomes the same rows, left-padded."""

from __future__ import annotations

import pytest
import torch

from fxpatch.errors import InputError
from fxpatch.inputs import left_pad, to_rows
from fxpatch.passes.diagnostics import Location

LOC = Location("user.py", 3)


def test_input_forms_give_the_same_rows(gpt2):
    tokenizer = gpt2.tokenizer  # loaded by fxpatch, so it has a pad token
    texts = ["Madison square garden", "hello"]
    rows = [tokenizer(t)["input_ids"] for t in texts]
    assert to_rows(texts[0], tokenizer, LOC, 128) == rows[:1]
    assert to_rows(texts, tokenizer, LOC, 128) == rows
    assert to_rows(rows[0], tokenizer, LOC, 128) == rows[:1]
    assert to_rows(rows, tokenizer, LOC, 128) == rows
    assert to_rows(torch.tensor(rows[0]), tokenizer, LOC, 128) == rows[:1]
    # a right-padded BatchEncoding loses its padding
    right = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    assert to_rows(right, tokenizer, LOC, 128) == rows
    assert to_rows(dict(right), tokenizer, LOC, 128) == rows
    same_length = torch.tensor([rows[0], rows[0]])
    assert to_rows(same_length, tokenizer, LOC, 128) == [rows[0], rows[0]]


@pytest.mark.parametrize("bad, message", [
    ("", "empty"), ([], "no prompts"), (torch.zeros(2, 2, 2, dtype=torch.long), "1-D or 2-D"),
    (torch.zeros(3), "integer"), (3.5, "cannot use float"), ({"ids": [1]}, "input_ids"),
])
def test_bad_inputs_are_named(tokenizer, bad, message):
    with pytest.raises(InputError, match=message) as info:
        to_rows(bad, tokenizer, LOC, 128)
    assert str(info.value).startswith("user.py:3:")


def test_too_long_and_no_tokenizer():
    with pytest.raises(InputError, match="5 tokens, more than the model's context of 4"):
        to_rows([1, 2, 3, 4, 5], None, LOC, 4)
    with pytest.raises(InputError, match="need a tokenizer"):
        to_rows("text", None, LOC, 4)


def test_left_pad_positions_count_from_the_first_real_token():
    batch = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch.lengths == [3, 1]
