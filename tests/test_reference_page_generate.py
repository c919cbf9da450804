"""The ``generate`` code blocks of the reference page, run as written.

NNsight's "Cross-Prompt Intervention and Batching" page (the page fxpatch
reimplements) is the acceptance test: each of its four ``model.generate``
blocks is kept verbatim in ``PAGE_BLOCKS`` and copied into a test below, and
what it prints must be what the page shows in its output comments. The page's
``model = LanguageModel('openai-community/gpt2', device_map='auto')`` is
``LanguageModel(fxpatch.TINY_GPT2)`` here: the session's ``gpt2`` fixture, so
its exported graphs are shared with the other tests.
``test_blocks_are_the_pages`` checks that the tests run the blocks as written.
"""

# The page's blocks bind `invoker` / `tracer` without using them; they stay verbatim.
# ruff: noqa: F841

from __future__ import annotations

import inspect
import textwrap

import pytest
import torch

from fxpatch import LanguageModel

MADISON = "['Madison square garden is located in the city of New York City.']"
PATCHED = "['_ _ _ _ _ _ _ _ _ _ York City.']"
UNDERSCORES = "['_ _ _ _ _ _ _ _ _ _ _ _ _']"

# The page's four generate blocks, verbatim (copied from the page, not read from it, so the
# tests need nothing outside the repository), by the test that runs each.
PAGE_BLOCKS = {
    "test_batching": '''\
with model.generate(max_new_tokens=3) as tracer:
    with tracer.invoke("Madison square garden is located in the city of New") as invoker:
        batch1 = model.generator.output.save()
    with tracer.invoke("_ _ _ _ _ _ _ _ _ _") as invoker:
        batch2 = model.generator.output.save()

print(model.tokenizer.batch_decode(batch1))
print(model.tokenizer.batch_decode(batch2))
# ['Madison square garden is located in the city of New York City.']
# ['_ _ _ _ _ _ _ _ _ _ _ _ _']
''',
    "test_cross_prompt_interventions": '''\
with model.generate(max_new_tokens=3) as tracer:
    # create barrier
    barrier = tracer.barrier(2)
    with tracer.invoke("Madison square garden is located in the city of New") as invoker:
        embeddings = model.transformer.wte.output
        # set barrier after defining output for first invoke
        barrier()
        original = model.generator.output.save()
    with tracer.invoke("_ _ _ _ _ _ _ _ _ _") as invoker:
        # we have to wait for the output from the previous invoke
        barrier()
        model.transformer.wte.output = embeddings
        intervened = model.generator.output.save()

print(model.tokenizer.batch_decode(original))
print(model.tokenizer.batch_decode(intervened))
# ['Madison square garden is located in the city of New York City.']
# ['_ _ _ _ _ _ _ _ _ _ York City.']
''',
    "test_syntax_prior_to_0_5_without_barrier": '''\
with model.generate(max_new_tokens=3) as tracer:
    with tracer.invoke("Madison square garden is located in the city of New") as invoker:
        embeddings = model.transformer.wte.output
        original = model.generator.output.save()
    with tracer.invoke("_ _ _ _ _ _ _ _ _ _") as invoker:
        model.transformer.wte.output = embeddings
        intervened = model.generator.output.save()
''',
    "test_two_separate_runs": '''\
with model.generate("Madison square garden is located in the city of New", max_new_tokens=3) as tracer:
    embeddings = model.transformer.wte.output.save()
    original = model.generator.output.save()
print(model.tokenizer.batch_decode(original))

with model.generate("_ _ _ _ _ _ _ _ _ _", max_new_tokens=3) as tracer:
    model.transformer.wte.output = embeddings
    intervened = model.generator.output.save()
print(model.tokenizer.batch_decode(intervened))
# ['Madison square garden is located in the city of New York City.']
# ['_ _ _ _ _ _ _ _ _ _ York City.']
''',
}


@pytest.fixture(scope="module")
def model(gpt2) -> LanguageModel:
    """The page's ``model``: ``LanguageModel(fxpatch.TINY_GPT2)`` (the session's ``gpt2``)."""
    return gpt2


def printed(capsys) -> list[str]:
    """The lines printed since the last call."""
    return capsys.readouterr().out.splitlines()


def test_batching(model, capsys):
    with model.generate(max_new_tokens=3) as tracer:
        with tracer.invoke("Madison square garden is located in the city of New") as invoker:
            batch1 = model.generator.output.save()
        with tracer.invoke("_ _ _ _ _ _ _ _ _ _") as invoker:
            batch2 = model.generator.output.save()

    print(model.tokenizer.batch_decode(batch1))
    print(model.tokenizer.batch_decode(batch2))
    # ['Madison square garden is located in the city of New York City.']
    # ['_ _ _ _ _ _ _ _ _ _ _ _ _']

    assert printed(capsys) == [MADISON, UNDERSCORES]
    # one row each, prompt (10 tokens) + 3 new tokens
    assert isinstance(batch1, torch.Tensor) and batch1.shape == (1, 13)
    assert isinstance(batch2, torch.Tensor) and batch2.shape == (1, 13)


def test_cross_prompt_interventions(model, capsys):
    with model.generate(max_new_tokens=3) as tracer:
        # create barrier
        barrier = tracer.barrier(2)
        with tracer.invoke("Madison square garden is located in the city of New") as invoker:
            embeddings = model.transformer.wte.output
            # set barrier after defining output for first invoke
            barrier()
            original = model.generator.output.save()
        with tracer.invoke("_ _ _ _ _ _ _ _ _ _") as invoker:
            # we have to wait for the output from the previous invoke
            barrier()
            model.transformer.wte.output = embeddings
            intervened = model.generator.output.save()

    print(model.tokenizer.batch_decode(original))
    print(model.tokenizer.batch_decode(intervened))
    # ['Madison square garden is located in the city of New York City.']
    # ['_ _ _ _ _ _ _ _ _ _ York City.']

    assert printed(capsys) == [MADISON, PATCHED]


def test_syntax_prior_to_0_5_without_barrier(model, capsys):
    with model.generate(max_new_tokens=3) as tracer:
        with tracer.invoke("Madison square garden is located in the city of New") as invoker:
            embeddings = model.transformer.wte.output
            original = model.generator.output.save()
        with tracer.invoke("_ _ _ _ _ _ _ _ _ _") as invoker:
            model.transformer.wte.output = embeddings
            intervened = model.generator.output.save()

    # the page prints nothing here; it is the barrier example without the barrier, so the same output
    print(model.tokenizer.batch_decode(original))
    print(model.tokenizer.batch_decode(intervened))
    assert printed(capsys) == [MADISON, PATCHED]


def test_two_separate_runs(model, capsys):
    with model.generate("Madison square garden is located in the city of New", max_new_tokens=3) as tracer:
        embeddings = model.transformer.wte.output.save()
        original = model.generator.output.save()
    print(model.tokenizer.batch_decode(original))

    with model.generate("_ _ _ _ _ _ _ _ _ _", max_new_tokens=3) as tracer:
        model.transformer.wte.output = embeddings
        intervened = model.generator.output.save()
    print(model.tokenizer.batch_decode(intervened))
    # ['Madison square garden is located in the city of New York City.']
    # ['_ _ _ _ _ _ _ _ _ _ York City.']

    assert printed(capsys) == [MADISON, PATCHED]
    # the saved embeddings are a real tensor after the first block: one row, 10 tokens
    assert isinstance(embeddings, torch.Tensor) and embeddings.shape[:2] == (1, 10)


def body(function) -> str:
    """A test function's source without its ``def`` line, dedented."""
    return textwrap.dedent("".join(inspect.getsource(function).splitlines(keepends=True)[1:]))


def test_blocks_are_the_pages():
    """Each page block is the start of the test that runs it, character for character."""
    for name, block in PAGE_BLOCKS.items():
        assert body(globals()[name]).startswith(block), f"{name} no longer starts with the page's block:\n{block}"
