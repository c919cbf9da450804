"""``model.edit()``, ``model.edit(inplace=True)`` and ``model.clear_edits()``: interventions that apply to
every later trace, checked against the plain Hugging Face model with hooks (``tests/reference.py``) and
transformers' ``generate`` with hooks, on the tiny GPT-2 and the tiny Llama.
"""

from __future__ import annotations

import pytest
import torch

from fxpatch.active import active_tracer
from fxpatch.edit import EditTracer
from fxpatch.errors import FxpatchError, ProxyScopeError
from tests.conftest import PROMPT_1, PROMPT_2, assert_state_unchanged, state
from tests.markers import Markers
from tests.reference import paths, run_alone, set_last, token_ids, unpad
from tests.test_differential import envoy as module
from tests.test_generation import hf_generate, negate_last

ATOL = 1e-5
HELLO = "hello"
MARKS = Markers(__file__)
line_of, check_message = MARKS.line_of, MARKS.check_message


def logits_of(lm, prompts: list[str]) -> torch.Tensor:
    with lm.trace() as tracer:
        out = []
        for prompt in prompts:
            with tracer.invoke(prompt):
                out.append(lm.lm_head.output.save())
    return out


def assert_rows(actual: list[torch.Tensor], lm, prompts: list[str], **edits) -> None:
    for logits, prompt in zip(actual, prompts):
        n = len(token_ids(lm, prompt))
        torch.testing.assert_close(unpad(logits, 0, n), run_alone(lm, prompt, **edits).logits, atol=ATOL, rtol=0)


def test_an_edit_applies_to_later_traces_of_the_edited_model_only(lm):
    p = paths(lm)
    prompts = [PROMPT_1, HELLO, "The Eiffel Tower is in Paris"]
    before = state(lm)
    original = module(lm, p.layer(0))  # lm's envoys, made (and kept) before the edit
    with lm.edit() as (tracer, edited):
        module(edited, p.layer(0)).output[:, -1] = 0
    assert isinstance(tracer, EditTracer)
    assert edited is not lm and type(edited) is type(lm) and edited._model is lm._model   # shares the weights
    assert module(edited, p.layer(0))._lm is edited and module(lm, p.layer(0)) is original  # each its own envoys
    edited_rows = logits_of(edited, prompts)    # every invoke's rows are edited
    again = logits_of(edited, [PROMPT_2])       # and every later trace
    plain_rows = logits_of(lm, prompts)         # the original is unchanged
    zeroed = {"outputs": {p.layer(0): set_last(0.0)}}
    assert_rows(edited_rows, lm, prompts, **zeroed)
    assert_rows(again, lm, [PROMPT_2], **zeroed)
    assert_rows(plain_rows, lm, prompts)
    assert not torch.allclose(edited_rows[0], plain_rows[0], atol=1e-3)
    assert_state_unchanged(lm, before)


def test_a_trace_sees_the_edit_and_its_own_writes_come_after_it(lm):
    p = paths(lm)
    vector = torch.randn(lm._model.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(lm.device)
    with lm.edit() as (_, edited):
        module(edited, p.layer(0)).output[:, -1] += vector        # a tensor from outside the block
    with edited.trace(PROMPT_1):
        seen = module(edited, p.layer(0)).output[:, -1].clone().save()   # the edited value
        module(edited, p.layer(0)).output[:, -1] *= 2             # on top of the edit
        logits = edited.lm_head.output.save()
    clean = run_alone(lm, PROMPT_1, capture=[p.layer(0)]).outputs[p.layer(0)][:, -1]
    torch.testing.assert_close(seen, clean + vector, atol=ATOL, rtol=0)
    ref = run_alone(lm, PROMPT_1, outputs={p.layer(0): set_last((clean + vector) * 2)})
    torch.testing.assert_close(logits[0], ref.logits, atol=1e-4, rtol=0)


def test_inplace_edits_stack_and_clear_edits_restores(lm):
    p = paths(lm)
    before = state(lm)
    try:
        with lm.edit() as (_, copy):              # an edited copy made before: keeps its own edit
            module(copy, p.mlp(1)).output[:] = 0
        with lm.edit(inplace=True) as tracer:
            module(lm, p.layer(0)).output[:, -1] = 0
        assert isinstance(tracer, EditTracer)
        with lm.edit(inplace=True):
            module(lm, p.mlp(1)).output *= 0.5
        edited = logits_of(lm, [PROMPT_1, HELLO])
        assert_rows(edited, lm, [PROMPT_1, HELLO],
                    outputs={p.layer(0): set_last(0.0), p.mlp(1): lambda o: o * 0.5})
        with lm.edit() as (_, both):             # a copy of an edited model starts with its edits
            module(both, p.layer(1)).output[:, 0] = 0
        first_zero = {p.layer(0): set_last(0.0), p.mlp(1): lambda o: o * 0.5,
                      p.layer(1): lambda o: torch.cat([torch.zeros_like(o[:, :1]), o[:, 1:]], 1)}
        assert_rows(logits_of(both, [PROMPT_1]), lm, [PROMPT_1], outputs=first_zero)
        lm.clear_edits()
        assert_rows(logits_of(lm, [PROMPT_1, HELLO]), lm, [PROMPT_1, HELLO])       # as before the edits
        assert_rows(logits_of(copy, [PROMPT_1]), lm, [PROMPT_1], outputs={p.mlp(1): lambda o: o * 0})
        assert_rows(logits_of(both, [PROMPT_1]), lm, [PROMPT_1], outputs=first_zero)  # its own list of edits
        both.clear_edits()
        assert_rows(logits_of(both, [PROMPT_1]), lm, [PROMPT_1])
    finally:
        lm.clear_edits()
    assert_state_unchanged(lm, before)


def test_an_edit_applies_to_the_prompt_pass_of_a_generation(lm):
    p = paths(lm)
    with lm.edit() as (_, edited):
        layer = module(edited, p.layer(0))
        layer.output[:, -1] = -layer.output[:, -1]
    with edited.generate(PROMPT_1, max_new_tokens=3):
        tokens = edited.generator.output.save()
    layer0 = lm._model.get_submodule(p.layer(0))
    expected = hf_generate(lm, PROMPT_1, 3, edits=[(layer0, negate_last({0}))])
    assert expected != hf_generate(lm, PROMPT_1, 3), "the edit changes nothing here"
    assert tokens[0].tolist() == expected


def test_an_edit_past_a_trace_stop_does_not_happen(lm):
    p = paths(lm)
    with lm.edit() as (_, edited):
        module(edited, p.layer(0)).output[:, -1] = 0                  # before the stop: applies
        module(edited, p.layer(p.n_layers - 1)).output[:, -1] = 0     # after it: the model never gets there
    with edited.trace(PROMPT_1) as tracer:
        h = module(edited, p.layer(0)).output.save()
        tracer.stop()
    ref = run_alone(lm, PROMPT_1, outputs={p.layer(0): set_last(0.0)}, capture=[p.layer(0)])
    torch.testing.assert_close(h, ref.outputs[p.layer(0)], atol=ATOL, rtol=0)


def test_the_rewritten_graph_of_an_edited_program_is_reused(gpt2):
    with gpt2.edit() as (_, edited):
        edited.transformer.h[0].output[:, -1] = 0
    with edited.trace(PROMPT_1):
        edited.lm_head.output.save()
    hits = gpt2.cache_info().hits
    with edited.trace(PROMPT_2):                 # the same program on another prompt of the same length
        logits = edited.lm_head.output.save()
    assert gpt2.cache_info().hits == hits + 1
    torch.testing.assert_close(logits[0], run_alone(gpt2, PROMPT_2, outputs={"transformer.h.0": set_last(0.0)}).logits,
                               atol=ATOL, rtol=0)


def test_bad_edits(gpt2):
    before = state(gpt2)
    with pytest.raises(FxpatchError) as info:
        with gpt2.edit() as (_, edited):
            edited.transformer.h[0].output.save()  # line: save
    check_message(info.value, "save", "saved inside model.edit()", "trace of the edited model")
    with pytest.raises(FxpatchError) as info:
        with gpt2.edit(inplace=True) as tracer:
            with tracer.invoke(PROMPT_1):  # line: invoke
                pass
    check_message(info.value, "invoke", "no invokes")
    with pytest.raises(FxpatchError) as info:
        with gpt2.edit(inplace=True):
            gpt2.transformer.h[0].skip(gpt2.transformer.h[0].input)  # line: skip
    check_message(info.value, "skip", "skip()", "not supported in model.edit()")
    with gpt2.edit() as (_, edited):
        h = edited.transformer.h[0].output
    with pytest.raises(ProxyScopeError):
        with edited.trace(PROMPT_1):
            edited.transformer.h[1].output = h  # an edit's values are never computed
    assert gpt2.__dict__.get("_edits", []) == []      # nothing stored on the model by the failed edits
    assert active_tracer() is None
    assert_state_unchanged(gpt2, before)
