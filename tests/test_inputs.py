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


@pytest.mark.parametrize("bad, message", [
    ({"input_ids": [[1, 2], [3]]}, "input_ids cannot be made a tensor"),
    ({"input_ids": torch.zeros(1, 2, 2, dtype=torch.long)}, "input_ids must be 1-D or 2-D"),
    ({"input_ids": torch.zeros(1, 2)}, "input_ids must hold integers"),
    ({"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1]]}, r"attention_mask has shape \(1, 2\) but input_ids has "
     r"shape \(1, 3\)"),
    ({"input_ids": [1, 2, 3], "attention_mask": [[1, 1, 1], [1, 1, 1]]}, r"attention_mask has shape \(2, 3\)"),
    (None, "the inputs are None"),
])
def test_bad_dicts_and_none_are_named(tokenizer, bad, message):
    with pytest.raises(InputError, match=message) as info:
        to_rows(bad, tokenizer, LOC, 128)
    assert str(info.value).startswith("user.py:3:")


@pytest.mark.parametrize("ids, bad, row, position", [
    ([5, 10], 10, 0, 1), ([[1, 2], [3, -4, 5]], -4, 1, 1), (torch.tensor([[9, 10, 11]]), 11, 0, 2),
    ({"input_ids": [[0, 12, 1]], "attention_mask": [[1, 1, 1]]}, 12, 0, 1),
])
def test_token_ids_outside_the_vocabulary(ids, bad, row, position):
    with pytest.raises(InputError, match=rf"prompt {row} of this invoke has token id {bad} at position {position}, "
                       r"outside the model's vocabulary of 10 tokens \(ids 0 to 9\)") as info:
        to_rows(ids, None, LOC, 128, vocab_size=10)
    assert str(info.value).startswith("user.py:3:") and "resize_token_embeddings" in str(info.value)


def test_token_ids_at_the_vocabulary_edges_and_masked_ids_pass():
    assert to_rows([[0, 9], [9]], None, LOC, 128, vocab_size=10) == [[0, 9], [9]]
    # a padded position is dropped before the check: its id never reaches the model
    padded = {"input_ids": [[50, 1, 2]], "attention_mask": [[0, 1, 1]]}
    assert to_rows(padded, None, LOC, 128, vocab_size=10) == [[1, 2]]
    # a float mask of 0s and 1s works as the tokenizer's integer one
    padded["attention_mask"] = torch.tensor([[0.0, 1.0, 1.0]])
    assert to_rows(padded, None, LOC, 128, vocab_size=10) == [[1, 2]]
    assert to_rows([10**6], None, LOC, 128) == [[10**6]]  # no vocabulary known: nothing to check against


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


def _bos_tokenizer():
    """A fast tokenizer of another kind than GPT-2's: a word-level vocabulary, a BOS token added by its
    post-processor and a special token of its own (as Llama's tokenizers add ``<s>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "<sep>", "the", "cat", "sat", "on", "mat", "é"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                  pad_token="<unk>", additional_special_tokens=["<sep>"], model_max_length=6)
    return tok


TEXTS = ["Madison square garden", "hello", " leading space", "tabs\tand\nnewlines", "é ü 東京 🙂",
         "the cat<|endoftext|>sat", "<sep> the <sep>", "the cat sat on the mat", "a" * 40]


def _by_call(tok, texts):
    return [list(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]


@pytest.mark.parametrize("kind", ["gpt2", "bos"])
def test_text_is_tokenized_as_the_tokenizers_own_call(kind):
    """The Rust tokenizer is called directly where the tokenizer's call would do only that, with the same ids;
    where the call would do more (undo truncation or padding an earlier call left on the backend, split
    special tokens, warn of a too long row, a subclass's own encoding), the call is made."""
    from transformers import AutoTokenizer

    import fxpatch
    from fxpatch.inputs import backend_ids

    # a tokenizer of its own: the test leaves its backend truncating and padding
    tok = AutoTokenizer.from_pretrained(fxpatch.TINY_GPT2) if kind == "gpt2" else _bos_tokenizer()
    tok.pad_token = tok.pad_token or tok.eos_token
    limit = tok.model_max_length
    for texts in ([t] for t in TEXTS):
        expected = _by_call(tok, texts)
        fast = backend_ids(tok, texts)
        assert fast == (None if len(expected[0]) > limit else expected), texts
        assert to_rows(texts, tok, LOC, None) == expected
    assert backend_ids(tok, TEXTS[:3]) == _by_call(tok, TEXTS[:3])

    tok(TEXTS[0], truncation=True, max_length=2)  # leaves the backend truncating
    assert tok.backend_tokenizer.truncation is not None
    assert backend_ids(tok, TEXTS[:1]) is None
    assert to_rows(TEXTS[0], tok, LOC, None) == _by_call(tok, TEXTS[:1])  # the call took truncation off
    assert backend_ids(tok, TEXTS[:1]) == _by_call(tok, TEXTS[:1])

    tok(TEXTS[:2], padding="max_length", max_length=5)  # leaves the backend padding
    assert backend_ids(tok, TEXTS[:1]) is None
    assert to_rows(TEXTS[0], tok, LOC, None) == _by_call(tok, TEXTS[:1])

    tok.split_special_tokens = True  # the call encodes special tokens as text
    try:
        assert backend_ids(tok, TEXTS[5:7]) is None
        assert to_rows(TEXTS[5:7], tok, LOC, None) == _by_call(tok, TEXTS[5:7])
    finally:
        tok.split_special_tokens = False
    _by_call(tok, TEXTS[:1])

    class Lower(type(tok)):  # a tokenizer class with its own encoding
        def _encode_plus(self, text, *args, **kwargs):
            return super()._encode_plus([t.lower() for t in text], *args, **kwargs)

    if kind == "gpt2":
        lower = Lower.from_pretrained(fxpatch.TINY_GPT2)
        assert backend_ids(lower, ["Madison"]) is None
        assert to_rows("Madison", lower, LOC, None) == _by_call(tok, ["madison"]) != _by_call(tok, ["Madison"])
