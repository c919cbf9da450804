"""The reference page's trace examples, run as written on the embedded tiny GPT-2.

The first two code blocks of NNsight's "Cross-Prompt Intervention and Batching"
page (the ``model.trace()`` ones) are kept here verbatim, as ``BLOCK_BATCHING`` and
``BLOCK_BARRIER``, and run as written in test functions; only the page's setup
lines change (``from fxpatch import LanguageModel`` and the embedded model
instead of the GPT-2 download). Assertions follow each block.
The page's blocks bind ``x`` and ``y`` without ``.save()``: as in NNsight, such
values are not kept, and using them after the block is a clear error. With
``.save()`` added, the names hold real tensors with the values the plain HF
model gives (``tests.reference``), inside a function and at module level (a
script run through ``exec`` with fresh globals); the barrier example really
patches prompt 2.
"""

from __future__ import annotations

import inspect
import textwrap

import pytest
import torch

import fxpatch
from fxpatch import LanguageModel  # the page: from nnsight import LanguageModel
from fxpatch.errors import ProxyScopeError
from tests.reference import run_alone, token_ids

model = LanguageModel(fxpatch.TINY_GPT2)  # the page: LanguageModel('openai-community/gpt2', device_map='auto')

# The page's first two code blocks, verbatim (copied from the page, not read from it, so the
# tests need nothing outside the repository).
BLOCK_BATCHING = '''\
with model.trace() as tracer:
    with tracer.invoke("Prompt 1"):
        # capture output
        x = model.transformer.wte.output
    with tracer.invoke("Prompt 2"):
        # capture second output
        y = model.transformer.wte.output
'''

BLOCK_BARRIER = '''\
with model.trace() as tracer:
    # initialize barrier
    barrier = tracer.barrier(2)
    with tracer.invoke("Prompt 1"):
        # capture output
        x = model.transformer.wte.output
        # call barrier after collecting output
        barrier()
    with tracer.invoke("Prompt 2"):
        # call barrier before setting output in second invoke
        barrier()
        # set the collected output for the second prompt
        model.transformer.wte.output = x
'''

SCRIPT_SETUP = '''\
import fxpatch
from fxpatch import LanguageModel
model = LanguageModel(fxpatch.TINY_GPT2)
'''

HIDDEN = model._model.config.n_embd


def embeddings(prompt: str) -> torch.Tensor:
    """``transformer.wte``'s output for ``prompt`` alone, from a plain forward hook."""
    return run_alone(model, prompt, capture=["transformer.wte"]).outputs["transformer.wte"]


def check_embeddings(value, prompt: str) -> None:
    assert isinstance(value, torch.Tensor), f"expected a torch.Tensor after the block, got {type(value).__name__}"
    assert value.shape == (1, len(token_ids(model, prompt)), HIDDEN)
    torch.testing.assert_close(value, embeddings(prompt), atol=1e-5, rtol=1e-5)


def check_not_kept(value) -> None:
    """An unsaved value: using it after its trace says to .save() it."""
    with pytest.raises(ProxyScopeError, match=r"not saved[\s\S]*\.save\(\)"):
        value + 1


def body(function) -> str:
    """A test function's source without its ``def`` line, dedented."""
    return textwrap.dedent("".join(inspect.getsource(function).splitlines(keepends=True)[1:]))


def test_blocks_are_the_pages():
    """The tests below run the page's blocks character for character: each body starts with one."""
    assert body(test_batching_block).startswith(BLOCK_BATCHING)
    assert body(test_barrier_block).startswith(BLOCK_BARRIER)


def test_batching_block():
    with model.trace() as tracer:
        with tracer.invoke("Prompt 1"):
            # capture output
            x = model.transformer.wte.output
        with tracer.invoke("Prompt 2"):
            # capture second output
            y = model.transformer.wte.output

    assert tracer.batch.input_ids.shape == (2, 5)  # both prompts ran in one pass
    check_not_kept(x)
    check_not_kept(y)


def test_batching_block_saved():
    """The batching block with .save() on each capture: x and y are the prompts' embeddings."""
    with model.trace() as tracer:
        with tracer.invoke("Prompt 1"):
            # capture output
            x = model.transformer.wte.output.save()
        with tracer.invoke("Prompt 2"):
            # capture second output
            y = model.transformer.wte.output.save()

    check_embeddings(x, "Prompt 1")
    check_embeddings(y, "Prompt 2")


def test_barrier_block():
    with model.trace() as tracer:
        # initialize barrier
        barrier = tracer.barrier(2)
        with tracer.invoke("Prompt 1"):
            # capture output
            x = model.transformer.wte.output
            # call barrier after collecting output
            barrier()
        with tracer.invoke("Prompt 2"):
            # call barrier before setting output in second invoke
            barrier()
            # set the collected output for the second prompt
            model.transformer.wte.output = x

    assert tracer.batch.input_ids.shape == (2, 5)
    check_not_kept(x)


def test_barrier_block_patches_prompt_2():
    """The barrier block, plus one line per invoke saving the logits: prompt 2 now computes prompt 1."""
    with model.trace() as tracer:
        # initialize barrier
        barrier = tracer.barrier(2)
        with tracer.invoke("Prompt 1"):
            # capture output
            x = model.transformer.wte.output
            # call barrier after collecting output
            barrier()
            original = model.lm_head.output.save()  # added
        with tracer.invoke("Prompt 2"):
            # call barrier before setting output in second invoke
            barrier()
            # set the collected output for the second prompt
            model.transformer.wte.output = x
            intervened = model.lm_head.output.save()  # added

    # The same patch done with a hook on prompt 2 alone.
    prompt_1 = embeddings("Prompt 1")
    patched = run_alone(model, "Prompt 2", outputs={"transformer.wte": lambda out: prompt_1.clone()})
    plain_2 = run_alone(model, "Prompt 2")
    torch.testing.assert_close(original[0], run_alone(model, "Prompt 1").logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(intervened[0], patched.logits, atol=1e-5, rtol=1e-5)
    # The patch changed prompt 2's prediction (the prompts differ in their last token).
    assert not torch.allclose(intervened[0, -1], plain_2.logits[-1], atol=1e-3)


def test_batching_block_at_module_level():
    """A script: setup and the first block (with .save()) run by ``exec`` with fresh globals."""
    namespace: dict = {"__name__": "__main__"}
    block = BLOCK_BATCHING.replace("wte.output\n", "wte.output.save()\n")
    assert block.count(".save()") == 2
    exec(compile(SCRIPT_SETUP + block, "<reference page script>", "exec"), namespace)
    assert namespace["tracer"].batch.input_ids.shape == (2, 5)
    check_embeddings(namespace["x"], "Prompt 1")
    check_embeddings(namespace["y"], "Prompt 2")
