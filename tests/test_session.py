"""``model.session()``: values flow between its traces without ``.save()``; only saved values leave it.

Values are checked against the plain Hugging Face model run prompt by prompt with hooks
(``tests/reference.py``), on the tiny GPT-2 and the tiny Llama. A traced value not saved is, after the
session, an error that names the line using it and says it was not saved (NNsight unbinds it).
"""

from __future__ import annotations

import pytest
import torch

import fxpatch
from fxpatch.active import active_tracer
from fxpatch.errors import FxpatchError, ProxyScopeError
from fxpatch.proxy import Proxy
from fxpatch.session import active_session
from tests.conftest import PROMPT_1, PROMPT_2, assert_state_unchanged, state
from tests.markers import Markers
from tests.reference import paths, run_alone, set_last, token_ids
from tests.test_differential import envoy as module

ATOL = 1e-5
MARKS = Markers(__file__)
line_of, check_message = MARKS.line_of, MARKS.check_message


def test_a_value_of_trace_one_is_used_in_trace_two(lm):
    p = paths(lm)
    layer = module(lm, p.layer(1))
    before = state(lm)
    with lm.session():
        with lm.trace(PROMPT_1):
            h = layer.output                        # not saved
            kept = module(lm, p.layer(0)).output.save()
        assert isinstance(h, torch.Tensor)          # a real tensor between the traces, as in NNsight
        between = h[:, -1] * 2                      # plain Python on it
        with lm.trace(PROMPT_2):
            layer.output[:, -1] = h[:, -1]
            logits = lm.lm_head.output.save()
        with lm.trace(PROMPT_2):
            layer.output[:, -1] = between
            doubled = lm.lm_head.output.save()
    clean = run_alone(lm, PROMPT_1, capture=[p.layer(0), p.layer(1)])
    last = clean.outputs[p.layer(1)][:, -1]
    patched = run_alone(lm, PROMPT_2, outputs={p.layer(1): set_last(last)})
    twice = run_alone(lm, PROMPT_2, outputs={p.layer(1): set_last(last * 2)})
    assert not torch.allclose(patched.logits, run_alone(lm, PROMPT_2).logits, atol=1e-3)  # the patch acts
    torch.testing.assert_close(logits[0], patched.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(doubled[0], twice.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(kept, clean.outputs[p.layer(0)], atol=ATOL, rtol=0)
    assert isinstance(between, torch.Tensor)        # plain values made in the session stay (NNsight drops them)
    assert isinstance(h, Proxy)                     # the traced value, not saved, does not leave the session
    with pytest.raises(ProxyScopeError) as info:
        h.sum()  # line: after-session
    check_message(info.value, "after-session", "after its session ended", "not saved", ".save()")
    assert active_session() is None and active_tracer() is None
    assert_state_unchanged(lm, before)


def _in_a_function(lm, prompts):
    """A session in a function: values kept in a list made by the first trace, summed in later ones."""
    p = paths(lm)
    with lm.session():
        with lm.trace(prompts[0]):
            lasts = [module(lm, p.layer(i)).output[:, -1] for i in range(p.n_layers)]   # a new list, not saved
        total = sum(lasts)                           # a plain tensor made in the session
        first_last = fxpatch.save(lasts[0])          # kept past the session, wherever it is
        with lm.trace() as tracer:
            with tracer.invoke(prompts[1]):
                module(lm, p.layer(0)).output[:, -1] = lasts[0]
                first = lm.lm_head.output[:, -1].save()
            with tracer.invoke(prompts[2]):
                module(lm, p.layer(0)).output[:, -1] = total
                second = lm.lm_head.output[:, -1].save()
    return lasts, total, first_last, first, second


def test_values_in_containers_and_in_a_function(lm):
    p = paths(lm)
    prompts = [PROMPT_1, "hello", "The Eiffel Tower is in Paris"]
    lasts, total, first_last, first, second = _in_a_function(lm, prompts)
    clean = run_alone(lm, prompts[0], capture=[p.layer(i) for i in range(p.n_layers)])
    expected = [clean.outputs[p.layer(i)][:, -1] for i in range(p.n_layers)]
    torch.testing.assert_close(total, sum(expected), atol=ATOL, rtol=0)
    one = run_alone(lm, prompts[1], outputs={p.layer(0): set_last(expected[0])})
    two = run_alone(lm, prompts[2], outputs={p.layer(0): set_last(sum(expected))})
    torch.testing.assert_close(first[0], one.logits[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(second[0], two.logits[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(first_last, expected[0], atol=ATOL, rtol=0)
    assert lasts[0] is first_last                    # fxpatch.save(...) kept it, in the list too
    assert all(isinstance(v, Proxy) for v in lasts[1:])  # the unsaved values did not leave, in a list either
    with pytest.raises(ProxyScopeError, match="after its session ended"):
        lasts[1] + 1


def test_values_saved_into_an_existing_list_leave_the_session(lm):
    p = paths(lm)
    acts = []                                        # made before the session: filled, as in NNsight
    with lm.session():
        for prompt in (PROMPT_1, "hello"):
            with lm.trace(prompt):
                acts.append(module(lm, p.layer(0)).output[:, -1])
    assert all(isinstance(a, torch.Tensor) for a in acts)
    for prompt, act in zip((PROMPT_1, "hello"), acts):
        ref = run_alone(lm, prompt, capture=[p.layer(0)]).outputs[p.layer(0)][:, -1]
        torch.testing.assert_close(act, ref, atol=ATOL, rtol=0)


def test_a_generation_in_a_session(gpt2):
    p = paths(gpt2)
    with gpt2.session():
        with gpt2.trace(PROMPT_1):
            h = gpt2.transformer.h[1].output[:, -1]
        with gpt2.generate(PROMPT_2, max_new_tokens=2):
            gpt2.transformer.h[1].output[:, -1] = h
            tokens = gpt2.generator.output.save()
    ref = run_alone(gpt2, PROMPT_1, capture=[p.layer(1)]).outputs[p.layer(1)][:, -1]
    patched = run_alone(gpt2, PROMPT_2, outputs={p.layer(1): set_last(ref)})
    n = len(token_ids(gpt2, PROMPT_2))
    assert tokens.shape == (1, n + 2)
    assert tokens[0, :n].tolist() == token_ids(gpt2, PROMPT_2)
    assert tokens[0, n].item() == int(patched.logits[-1].argmax())
    assert tokens[0, n].item() != int(run_alone(gpt2, PROMPT_2).logits[-1].argmax())  # the patch acts


def test_a_session_inside_a_trace_is_refused(gpt2):
    before = state(gpt2)
    with pytest.raises(FxpatchError) as info:
        with gpt2.trace(PROMPT_1):
            with gpt2.session():  # line: nested
                pass
    check_message(info.value, "nested", "session was opened inside a trace")
    assert active_session() is None and active_tracer() is None
    assert_state_unchanged(gpt2, before)


def test_a_failing_trace_ends_the_session_cleanly(gpt2):
    with pytest.raises(FxpatchError):
        with gpt2.session():
            with gpt2.trace(PROMPT_1):
                h = gpt2.transformer.h[0].output
            with gpt2.trace(PROMPT_1):
                gpt2.transformer.h[0].output = h[:, :2]   # does not fit: refused before running
    assert active_session() is None and active_tracer() is None
    with gpt2.trace(PROMPT_1):                             # an ordinary trace afterwards: plain rules again
        g = gpt2.transformer.h[0].output
    assert isinstance(g, Proxy)
