"""Batching invariance: a prompt computes in a left-padded batch what it computes alone.

Prompts of different lengths go through fxpatch in one invoke and in separate
invokes; each row's logits on its real positions must equal the plain Hugging
Face model run on that prompt alone (``tests.reference.run_alone`` with no
hooks). The batch fxpatch built (``tracer.batch``) must be left-padded, with a
mask and position ids counted from each row's first real token.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import PROMPT_1, PROMPT_2
from tests.reference import paths, run_alone, run_on_batch, token_ids, unpad

EIFFEL = "The Eiffel Tower is in Paris"  # 9 tokens
SHORT = "_ _ _"  # 3 tokens
HELLO = "hello"  # 3 tokens
PROMPTS = [PROMPT_1, EIFFEL, SHORT, HELLO, PROMPT_2]


def check_alone(batched: torch.Tensor, prompts: list[str], lm, first_row: int = 0) -> None:
    """Rows of ``batched`` (from ``first_row``) equal each prompt's logits alone, on its real positions."""
    assert isinstance(batched, torch.Tensor)
    for k, prompt in enumerate(prompts):
        ref = run_alone(lm, prompt)
        torch.testing.assert_close(unpad(batched, first_row + k, len(ref.ids)), ref.logits, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, prompt=prompt: f"{prompt!r}: {m}")


def expected_pad_id(lm) -> int:
    tok = lm.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def check_left_padded(batch, prompts: list[str], lm) -> None:
    """``batch`` holds ``prompts`` in order, left-padded to the longest, positions counted from each first token."""
    rows = [token_ids(lm, q) for q in prompts]
    width = max(len(r) for r in rows)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.position_ids.shape == (len(rows), width)
    for i, ids in enumerate(rows):
        n, pad = len(ids), width - len(ids)
        assert batch.input_ids[i, pad:].tolist() == ids, f"row {i} tokens"
        assert batch.input_ids[i, :pad].tolist() == [expected_pad_id(lm)] * pad, f"row {i} pads"
        assert batch.attention_mask[i].tolist() == [0] * pad + [1] * n, f"row {i} mask"
        # Pads' positions are never attended to; the real tokens' must be 0..n-1, as alone.
        assert batch.position_ids[i, pad:].tolist() == list(range(n)), f"row {i} positions"


def test_one_invoke_of_different_lengths(lm):
    """Five prompts (10, 9, 3, 3, 10 tokens) in one invoke: every row's logits equal the prompt alone."""
    with lm.trace() as tracer:
        with tracer.invoke(PROMPTS):
            logits = lm.output.logits.save()
    assert logits.shape[:2] == (5, 10)
    check_alone(logits, PROMPTS, lm)
    check_left_padded(tracer.batch, PROMPTS, lm)


def test_separate_invokes_of_different_lengths(lm):
    """One invoke per prompt, short ones first: each invoke's saved rows equal its prompt alone."""
    order = [HELLO, EIFFEL, SHORT, PROMPT_1]
    saved = []
    with lm.trace() as tracer:
        for prompt in order:
            with tracer.invoke(prompt):
                saved.append(lm.lm_head.output.save())
    for prompt, logits in zip(order, saved):
        assert logits.shape[:2] == (1, 10)
        check_alone(logits, [prompt], lm)
    check_left_padded(tracer.batch, order, lm)


def test_mixed_invokes_hidden_states(lm):
    """A two-prompt invoke beside one-prompt invokes: rows in invoke order; hidden states match too."""
    p = paths(lm)
    last = p.n_layers - 1
    layer = lm.transformer.h[last] if hasattr(lm._model, "transformer") else lm.model.layers[last]
    with lm.trace() as tracer:
        with tracer.invoke([SHORT, PROMPT_1]):
            h_a = layer.output.save()
        with tracer.invoke(EIFFEL):
            h_b = layer.output.save()
        with tracer.invoke():  # every row
            logits = lm.output.logits.save()
    order = [SHORT, PROMPT_1, EIFFEL]
    check_alone(logits, order, lm)
    check_left_padded(tracer.batch, order, lm)
    for hidden, rows in ((h_a, [SHORT, PROMPT_1]), (h_b, [EIFFEL])):
        for r, prompt in enumerate(rows):
            ref = run_alone(lm, prompt, capture=[p.layer(last)])
            torch.testing.assert_close(unpad(hidden, r, len(ref.ids)), ref.outputs[p.layer(last)][0],
                                       atol=1e-5, rtol=1e-5)


def test_single_prompt_is_not_padded(lm):
    """``model.trace(prompt)``: one row, exactly the prompt's tokens, all attended, positions 0..n-1."""
    with lm.trace(EIFFEL) as tracer:
        logits = lm.output.logits.save()
    ids = token_ids(lm, EIFFEL)
    assert tracer.batch.input_ids.tolist() == [ids]
    assert tracer.batch.attention_mask.tolist() == [[1] * len(ids)]
    assert tracer.batch.position_ids.tolist() == [list(range(len(ids)))]
    check_alone(logits, [EIFFEL], lm)


@pytest.mark.parametrize("form", ["token-lists", "right-padded-encoding"])
def test_token_id_inputs(lm, form):
    """Token ids (lists, or a right-padded encoding with a mask) are re-padded on the left, padding dropped."""
    prompts = [HELLO, EIFFEL]
    rows = [token_ids(lm, q) for q in prompts]
    if form == "token-lists":
        inputs = rows
    else:
        width = max(len(r) for r in rows)
        inputs = {"input_ids": torch.tensor([r + [7] * (width - len(r)) for r in rows]),
                  "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])}
    with lm.trace() as tracer:
        with tracer.invoke(inputs):
            logits = lm.output.logits.save()
    check_left_padded(tracer.batch, prompts, lm)
    check_alone(logits, prompts, lm)


# -- values whose first dim is not the batch's rows ----------------------------------------------------------

def test_a_value_whose_first_dim_is_not_the_batch_is_read_whole_in_every_invoke(opt):
    """OPT's ``fc1`` output is (rows * tokens, 128). Every invoke reads all of it, as NNsight gives it (NNsight
    narrows only a tensor with one row per prompt): rows of it would be tokens of other prompts."""
    fc1 = opt.model.decoder.layers[0].fc1
    with torch.no_grad(), opt.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            first = fc1.output.save()
        with tracer.invoke(SHORT):
            second = fc1.output.save()
            logits = opt.output.logits.save()
    seen = []
    with torch.no_grad():
        expected = run_on_batch(opt, tracer.batch, [(opt._model.model.decoder.layers[0].fc1,
                                                     lambda module, args, output: seen.append(output.clone()))])
    width = tracer.batch.input_ids.shape[1]
    assert first.shape == second.shape == (2 * width, 128)
    torch.testing.assert_close(first, seen[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, seen[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, expected[1:], atol=1e-5, rtol=1e-5)
    check_alone(logits, [SHORT], opt)  # reading changes nothing


@pytest.mark.parametrize("kind", ["in place", "assigned"])
def test_a_write_into_such_a_value_in_one_invoke_reaches_every_prompt_as_in_nnsight(opt, kind):
    """A write in the second invoke into the first rows of ``fc2``'s (rows * tokens, 64) output changes the
    first prompt's tokens: the whole tensor is that invoke's value, as in NNsight. In place, the first invoke's
    saved (not cloned) value is that tensor and shows the write; assigned, it keeps the value from before."""
    fc2 = opt.model.decoder.layers[0].fc2
    with torch.no_grad(), opt.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            before = fc2.output.save()
            first = opt.output.logits.save()
        with tracer.invoke(SHORT):
            if kind == "in place":
                fc2.output[:3] *= 0.5
            else:
                fc2.output = fc2.output * 0.5
            second = opt.output.logits.save()
    seen = []

    def edit(module, args, output):
        seen.append(output.clone())
        if kind == "in place":
            output[:3] *= 0.5
            return output
        return output * 0.5

    with torch.no_grad():
        expected = run_on_batch(opt, tracer.batch, [(opt._model.model.decoder.layers[0].fc2, edit)])
    torch.testing.assert_close(torch.cat([first, second]), expected, atol=1e-5, rtol=1e-5)
    unedited = seen[0]
    if kind == "in place":
        unedited[:3] *= 0.5
    torch.testing.assert_close(before, unedited, atol=1e-5, rtol=1e-5)
    alone = run_alone(opt, PROMPT_1).logits
    assert (unpad(first, 0, alone.shape[0]) - alone).abs().max() > 1e-3  # the write reached the first prompt
