"""Proxies: in-place tensor methods write back, unsupported Python use fails clearly."""

from __future__ import annotations

import pytest
import torch

from fxpatch.errors import ControlFlowError
from tests.conftest import PROMPT_1, layers
from tests.reference import run_alone, unpad

PROMPTS = [PROMPT_1, "hello"]


@pytest.mark.parametrize("method, edit", [
    ("zero_", lambda h: torch.zeros_like(h)),
    ("add_", lambda h: h + 0.5),
    ("mul_", lambda h: h * 3.0),
    ("fill_", lambda h: torch.full_like(h, 0.25)),
    ("clamp_", lambda h: h.clamp(-0.1, 0.1)),
])
def test_in_place_methods_change_the_model(lm, method, edit):
    envoys, _ = layers(lm)
    args = {"zero_": (), "add_": (0.5,), "mul_": (3.0,), "fill_": (0.25,), "clamp_": (-0.1, 0.1)}[method]
    with lm.trace(PROMPTS):
        h = envoys[0].output
        same = getattr(h, method)(*args)
        assert same is h  # in-place methods return the tensor itself, as torch's do
        logits = lm.lm_head.output.save()
    layer = f"{envoys[0]._path}"
    for row, prompt in enumerate(PROMPTS):
        ref = run_alone(lm, prompt, outputs={layer: edit})
        torch.testing.assert_close(unpad(logits, row, len(ref.ids)), ref.logits, atol=1e-5, rtol=1e-5)


def test_augmented_assignment_changes_the_model(lm):
    envoys, _ = layers(lm)
    with lm.trace(PROMPTS):
        h = envoys[0].output
        h *= 2.0
        h += 0.5
        logits = lm.lm_head.output.save()
    for row, prompt in enumerate(PROMPTS):
        ref = run_alone(lm, prompt, outputs={envoys[0]._path: lambda x: x * 2.0 + 0.5})
        torch.testing.assert_close(unpad(logits, row, len(ref.ids)), ref.logits, atol=1e-5, rtol=1e-5)


def test_in_place_method_on_a_slice_writes_through(gpt2):
    with gpt2.trace(PROMPT_1):
        gpt2.transformer.h[1].output[:, -1].zero_()
        after = gpt2.transformer.h[1].output.save()
    assert after[0, -1].abs().sum() == 0 and after[0, 0].abs().sum() > 0


def test_unpacking_says_what_to_do_instead(lm):
    """``values, indices = x.max(-1)`` unpacks (max returns a named tuple of 2); a split of the
    sequence dim has a length only the run knows, and says so."""
    with lm.trace(PROMPT_1):
        values, indices = lm.lm_head.output.max(-1)
        values, indices = values.save(), indices.save()
    ref = run_alone(lm, PROMPT_1)
    assert torch.equal(indices[0], ref.logits.argmax(-1))
    torch.testing.assert_close(values[0], ref.logits.max(-1).values, atol=1e-5, rtol=1e-5)
    with pytest.raises(ControlFlowError, match=r"unpacking[\s\S]*padded sequence width[\s\S]*chunk"):
        with lm.trace(PROMPT_1):
            first, second = lm.lm_head.output.split(4, dim=1)


def test_methods_called_and_held_as_values(lm):
    """``h.norm(dim=-1)`` records one method call; a method held in a variable (``f = h.softmax``) and
    called after an in-place change of ``h`` sees the change, as the bound method does in eager PyTorch."""
    envoys, _ = layers(lm)
    with lm.trace(PROMPT_1) as tracer:
        h = envoys[0].output
        before = len(tracer.program_of(0).nodes)
        norm = h.norm(dim=-1).save()
        assert len(tracer.program_of(0).nodes) == before + 1  # the call alone, no attribute read
        softmax = h.softmax          # bound to h: it sees the change below when called
        h.mul_(2.0)
        doubled = softmax(-1).save()
        unused = lm.lm_head.output.argmax  # a method read and never called records nothing
        # norm, mul_ and its 2.0 (a graph input), softmax, the read of lm_head's output
        assert len(tracer.program_of(0).nodes) == before + 5 and callable(unused)
        top = lm.lm_head.output.max(-1).values.save()  # a named tuple's field, though Tensor.values is a method
    ref = run_alone(lm, PROMPT_1, capture=[envoys[0]._path], outputs={envoys[0]._path: lambda x: x * 2.0})
    plain = run_alone(lm, PROMPT_1, capture=[envoys[0]._path])
    torch.testing.assert_close(norm, plain.outputs[envoys[0]._path].norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(doubled, ref.outputs[envoys[0]._path].softmax(-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(top[0], ref.logits.max(-1).values, atol=1e-5, rtol=1e-5)
