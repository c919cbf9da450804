"""Barriers called several times: the k-th calls of the invokes meet, and variables follow them.

NNsight runs each invoke as a thread; a barrier call waits for the other invokes' calls, and a
variable read after it holds what the other invoke had assigned by then. The IOI tutorial relies
on this (a loop over layers assigns ``hidden_state`` and calls a barrier; the patching invoke
reads ``hidden_state`` after its own call). References are the plain HF model with hooks.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import PROMPT_1, layers
from tests.reference import run_alone, unpad
from tests.test_generation import N, assert_tokens, expected_batch, hf_generate, set_last

HELLO = "hello"


def _patch_every_layer_reference(lm, envoys):
    paths = [e._path for e in envoys]
    clean = run_alone(lm, PROMPT_1, capture=paths)

    def setter(path):
        def edit(out):
            out = out.clone()
            out[:, -1] = clean.outputs[path][:, -1]
            return out
        return edit

    return run_alone(lm, HELLO, outputs={p: setter(p) for p in paths})


@pytest.mark.parametrize("one_barrier", [True, False], ids=["one-barrier-per-loop", "a-barrier-per-layer"])
def test_ioi_pattern_a_variable_follows_the_barrier(lm, one_barrier):
    envoys, _ = layers(lm)
    n = len(envoys)
    with lm.trace() as tracer:
        barriers = [tracer.barrier(2)] * n if one_barrier else [tracer.barrier(2) for _ in range(n)]
        with tracer.invoke(PROMPT_1):
            for layer in range(n):
                hidden_state = envoys[layer].output[:, -1]
                barriers[layer]()
        with tracer.invoke(HELLO):
            for layer in range(n):
                barriers[layer]()
                envoys[layer].output[:, -1] = hidden_state
            logits = lm.lm_head.output.save()
    ref = _patch_every_layer_reference(lm, envoys)
    torch.testing.assert_close(unpad(logits, 0, len(ref.ids)), ref.logits, atol=1e-5, rtol=1e-5)


def test_cross_invoke_patch_at_each_generation_step_with_a_barrier_per_step(lm):
    envoys, modules = layers(lm)
    with lm.generate(max_new_tokens=N) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(PROMPT_1):
            for _step in tracer.all():
                h = envoys[1].output[:, -1]
                barrier()
        with tracer.invoke(HELLO):
            for _step in tracer.all():
                barrier()
                envoys[1].output[:, -1] = h
        result = tracer.result.save()
    values: list[torch.Tensor] = []
    first = hf_generate(lm, PROMPT_1, N, capture=(modules[1], values))
    patched = hf_generate(lm, HELLO, N, edits=[(modules[1], set_last(values, set(range(N))))])
    assert patched != hf_generate(lm, HELLO, N), "the copied activation does not change HELLO's tokens"
    assert_tokens(lm, result, expected_batch(lm, [PROMPT_1, HELLO], [first, patched]))
