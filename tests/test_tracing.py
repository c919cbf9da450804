"""Trace contexts: how invokes, barriers and module access may be arranged, and what is said otherwise."""

from __future__ import annotations

import inspect

import pytest
import torch

import fxpatch
from fxpatch.errors import BarrierError, FxpatchError, InputError
from tests.conftest import PROMPT_1, PROMPT_2


def here() -> str:
    """``file:line`` of the caller's next line: where the error below it must point."""
    frame = inspect.currentframe().f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno + 1}"


def test_unused_keyword_arguments_are_refused(gpt2):
    with pytest.raises(InputError, match="does not use: output_attentions") as info:
        where = here()
        with gpt2.trace(PROMPT_1, output_attentions=True):
            pass
    assert str(info.value).startswith(where)
    with pytest.raises(InputError, match="remote=True"):
        with gpt2.trace(PROMPT_1, remote=True):
            pass
    with gpt2.trace(PROMPT_1, scan=False, validate=False, remote=False):  # NNsight's switches are accepted
        out = gpt2.lm_head.output.save()
    assert isinstance(out, torch.Tensor)
    with pytest.raises(InputError, match=r"tracer.invoke\(\) got keyword arguments"):
        with gpt2.trace() as tracer:
            with tracer.invoke(PROMPT_1, max_length=3):
                pass


def test_invokes_do_not_nest_and_a_shortcut_trace_has_one(gpt2):
    with pytest.raises(FxpatchError, match=r"invoke\(\) was opened inside another invoke"):
        with gpt2.trace() as tracer:
            with tracer.invoke(PROMPT_1):
                with tracer.invoke(PROMPT_2):
                    pass
    with pytest.raises(FxpatchError, match=r"model.trace\(inputs\) already makes one invoke"):
        with gpt2.trace(PROMPT_1) as tracer:
            with tracer.invoke(PROMPT_2):
                pass
    with pytest.raises(FxpatchError, match="another trace of the same model"):
        with gpt2.trace(PROMPT_1):
            with gpt2.trace(PROMPT_2):
                pass


def test_barrier_calls_pair_up_and_happen_inside_an_invoke(gpt2):
    with pytest.raises(BarrierError, match="different numbers of times"):
        with gpt2.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(PROMPT_1):
                barrier()
                barrier()
            with tracer.invoke(PROMPT_2):
                barrier()
    with pytest.raises(BarrierError, match="outside an invoke"):
        with gpt2.trace() as tracer:
            tracer.barrier(1)()
    with pytest.raises(BarrierError, match="positive number"):
        with gpt2.trace() as tracer:
            tracer.barrier(0)


def test_module_values_need_an_invoke_and_a_trace(gpt2):
    with pytest.raises(FxpatchError, match="used outside an invoke"):
        with gpt2.trace() as tracer:
            with tracer.invoke(PROMPT_1):
                pass
            gpt2.lm_head.output.save()
    with pytest.raises(FxpatchError, match="used outside a trace of this model"):
        gpt2.lm_head.output  # noqa: B018 - the access itself is the error


def test_a_trace_of_another_model_may_nest(gpt2, llama):
    with gpt2.trace(PROMPT_1):
        outer = gpt2.lm_head.output.save()
        with llama.trace(PROMPT_1):
            inner = llama.lm_head.output.save()
        assert isinstance(inner, torch.Tensor)  # the inner trace ran at its own exit
    assert outer.shape[:2] == inner.shape[:2] == (1, 10)


def test_saved_values_bind_inside_functions_and_closures(gpt2):
    def run():
        collected = []
        with gpt2.trace(PROMPT_1):
            h = gpt2.transformer.h[0].output.save()
            collected.append(gpt2.lm_head.output.save())

            def peek():
                return h
        return h, collected, peek()

    h, collected, peeked = run()
    assert isinstance(h, torch.Tensor) and isinstance(collected[0], torch.Tensor)
    assert peeked is h  # the closure's cell was rebound too


def test_saved_containers_bind_wherever_they_are_and_other_lists_are_left_alone(gpt2):
    class Holder:
        pass

    holder = Holder()
    numbers = list(range(20_000))
    with gpt2.trace(PROMPT_1):
        holder.values = fxpatch.save([])  # reachable only through an attribute
        holder.values.append(gpt2.transformer.h[0].output)
        plain = [gpt2.lm_head.output.save()]  # a plain local list holding a saved value
    assert isinstance(holder.values[0], torch.Tensor) and isinstance(plain[0], torch.Tensor)
    assert numbers == list(range(20_000))


def _freed_without_a_collection(run) -> None:
    """``run()`` traces and returns the saved values it kept; each is freed as soon as the last reference to it
    goes, with the garbage collector off (a value a cycle held would wait for a collection: a full one, for a
    cycle that lived through a younger one)."""
    import gc
    import weakref

    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        values = run()
        assert values and all(isinstance(v, torch.Tensor) for v in values), values
        refs = [weakref.ref(v) for v in values]
        del values
        assert [r() is None for r in refs] == [True] * len(refs)
    finally:
        if enabled:
            gc.enable()


def test_a_saved_value_is_freed_when_the_user_lets_go_of_it(gpt2):
    """A trace's saved values are the user's alone once bound: a loop of traces saving logits holds one
    trace's logits at a time, not those of the traces a collection has not reached yet."""
    def patch():
        with gpt2.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(PROMPT_1):
                x = gpt2.transformer.wte.output
                barrier()
            with tracer.invoke(PROMPT_2):
                barrier()
                gpt2.transformer.wte.output = x
                block = gpt2.transformer.h[0].output.save()  # a module's structured value
                logits = gpt2.lm_head.output.save()
        return [logits, *(v for v in (block if isinstance(block, tuple) else [block]))]

    def generation():
        with gpt2.generate(PROMPT_1, max_new_tokens=3) as tracer:
            hs = fxpatch.save([])
            for _ in tracer.all():
                hs.append(gpt2.transformer.h[1].output[:, -1])
            tokens = gpt2.generator.output.save()
        return [*hs, tokens]

    def gradient():
        try:
            with torch.enable_grad():
                with gpt2.trace(PROMPT_1):
                    h = gpt2.transformer.h[0].output
                    h.requires_grad_(True)
                    loss = gpt2.lm_head.output.sum()
                    with loss.backward():
                        grad = h.grad.save()
        finally:
            for p in gpt2._model.parameters():  # the backward pass filled them: the model is shared by the tests
                p.grad = None
        return [grad]

    for run in (patch, generation, gradient):
        _freed_without_a_collection(run)
