"""The rewritten-graph cache: a bounded LRU with ``functools.lru_cache``'s ``cache_info`` / ``cache_clear``.

A hit is a trace or generation step that reused a rewritten graph, a miss one that built it. Every run's
values are compared with the plain HF model edited by ordinary hooks (``tests/reference.py``), so a graph
kept too long or handed to the wrong program would show as wrong logits. Each test builds its own
``LanguageModel``: the session fixtures' counts belong to the other tests.
"""

from __future__ import annotations

import logging
import os
import resource

import pytest
import torch

import fxpatch
from fxpatch import LanguageModel
from fxpatch.errors import InputError
from fxpatch.model import DEFAULT_CACHE_SIZE, CacheInfo
from tests.conftest import PROMPT_1, PROMPT_2, count_checks
from tests.reference import run_alone

PROMPTS = [PROMPT_1, "The Eiffel Tower is in Paris", "_ _ _", PROMPT_2]


def mlp_path(layer: int) -> str:
    return f"transformer.h.{layer}.mlp"


def scaled(lm: LanguageModel, prompt: str, position: int, scale: float, layer: int = 0) -> torch.Tensor:
    """Logits after scaling position ``position`` of layer ``layer``'s MLP output by ``scale``. The layer is
    the program's structure; the position and the scale are data (graph inputs)."""
    with lm.trace(prompt):
        mlp = lm.transformer.h[layer].mlp
        mlp.output[:, position] = mlp.output[:, position] * scale
        logits = lm.lm_head.output.save()
    return logits[0]


def reference(lm: LanguageModel, prompt: str, position: int, scale: float, layer: int = 0) -> torch.Tensor:
    def edit(out):
        out = out.clone()
        out[:, position] = out[:, position] * scale
        return out
    return run_alone(lm, prompt, outputs={mlp_path(layer): edit}).logits


def check(lm: LanguageModel, prompt: str, position: int, scale: float, layer: int = 0) -> None:
    torch.testing.assert_close(scaled(lm, prompt, position, scale, layer),
                               reference(lm, prompt, position, scale, layer), rtol=1e-4, atol=1e-4)


def test_same_program_on_other_prompts_is_a_hit():
    lm = LanguageModel(fxpatch.TINY_GPT2)
    assert lm.cache_info() == CacheInfo(0, 0, DEFAULT_CACHE_SIZE, 0)
    check(lm, PROMPTS[0], 1, 0.5)
    assert lm.cache_info() == CacheInfo(hits=0, misses=1, maxsize=DEFAULT_CACHE_SIZE, currsize=1)
    check(lm, PROMPTS[0], 1, 0.5)
    assert lm.cache_info() == CacheInfo(1, 1, DEFAULT_CACHE_SIZE, 1)
    for prompt in PROMPTS[1:]:  # other lengths, other tokens: the same graph
        check(lm, prompt, 1, 0.5)
    assert lm.cache_info() == CacheInfo(4, 1, DEFAULT_CACHE_SIZE, 1)
    check(lm, PROMPTS[1], 2, 2.0)  # another position and scale: data, the same graph
    assert lm.cache_info() == CacheInfo(5, 1, DEFAULT_CACHE_SIZE, 1)
    check(lm, PROMPTS[1], 1, 0.5, layer=1)  # another module is another program
    assert lm.cache_info() == CacheInfo(5, 2, DEFAULT_CACHE_SIZE, 2)
    assert isinstance(lm.cache_info(), tuple) and lm.cache_info().currsize == 2


def test_other_lengths_and_positions_are_checked_once_with_symbolic_sizes(monkeypatch):
    """A loop over prompts of other lengths and over positions checks its program at the first run's
    shapes, then once with symbolic sizes and positions, whose guards let every later run through
    without a check of its own; every run's values are the hooked model's."""
    lm = LanguageModel(fxpatch.TINY_GPT2)
    calls = count_checks(monkeypatch)
    for prompt in PROMPTS:
        for position in (1, 2, -1):
            check(lm, prompt, position, 0.5)
    # positions from the end are outside the first symbolic check's guards: a second one serves them
    assert calls == ["check_program", "check_program_symbolic", "check_program_symbolic"], calls
    # one rewritten graph for the positions from the start, one for those from the end (its functional
    # form's guards tell them apart)
    assert lm.cache_info().misses == 2


def test_least_recently_used_graph_goes_first_at_maxsize():
    lm = LanguageModel(fxpatch.TINY_GPT2, cache_size=2)
    a, b, c = (1, 0.5, 0), (2, 0.5, 1), (3, 0.5, 2)  # three layers: three programs
    for cell in (a, b, c):
        check(lm, PROMPT_1, *cell)
    assert lm.cache_info() == CacheInfo(0, 3, 2, 2)  # a went
    check(lm, PROMPTS[1], *b)  # b is now the most recently used
    assert lm.cache_info() == CacheInfo(1, 3, 2, 2)
    check(lm, PROMPT_1, *a)  # built again; c, least recently used, goes
    assert lm.cache_info() == CacheInfo(1, 4, 2, 2)
    check(lm, PROMPTS[2], *b)
    assert lm.cache_info() == CacheInfo(2, 4, 2, 2)
    check(lm, PROMPT_1, *c)
    assert lm.cache_info() == CacheInfo(2, 5, 2, 2)
    assert len(lm._checked) <= 2  # the checked programs are bounded too


def test_an_evicted_graph_leaves_no_generated_source_behind():
    """torch.fx keeps every generated forward's source for the life of the process; the cache drops an
    evicted graph's, and a program's functional form (traced by ``make_fx``, then inlined, never run) keeps
    none. New program shapes one after another leave the number of sources kept where it was."""
    from torch.fx.graph_module import _loader

    def source_kept(module):
        return type(module).forward.__code__.co_filename in _loader.eval_cache

    def scaled_times(lm: LanguageModel, times: int) -> None:  # a new program shape for each ``times``
        with lm.trace(PROMPT_1):
            mlp = lm.transformer.h[0].mlp
            for _ in range(times):
                mlp.output[:, 1] = mlp.output[:, 1] * 0.5
            logits = lm.lm_head.output.save()
        torch.testing.assert_close(logits[0], reference(lm, PROMPT_1, 1, 0.5 ** times), rtol=1e-4, atol=1e-4)

    lm = LanguageModel(fxpatch.TINY_GPT2, cache_size=1)
    check(lm, PROMPT_1, 1, 0.5)
    ((fp, gm),) = [g for graphs in lm._patched._graphs.values() for g in graphs]
    assert source_kept(gm) and not source_kept(fp.graph)  # lazy: its code is never made
    check(lm, PROMPT_1, 1, 0.5, layer=1)
    ((fp2, gm2),) = [g for graphs in lm._patched._graphs.values() for g in graphs]
    assert not source_kept(gm) and source_kept(gm2)
    kept = len(_loader.eval_cache)  # the export's segments' too, each made once at its first call
    for times in (2, 3, 4):
        scaled_times(lm, times)
    assert len(_loader.eval_cache) <= kept


def test_the_same_program_at_other_layers_is_traced_once():
    """A sweep over layers repeats one program at other sites: its functional form is traced (``make_fx``, the
    costly part of a new program) once and rebound to each layer's sites, whose values and inserted-node
    sites are each layer's own."""
    lm = LanguageModel(fxpatch.TINY_GPT2)
    for layer in range(3):
        with lm.trace(PROMPTS[1]) as tracer:
            mlp = lm.transformer.h[layer].mlp
            mlp.output[:, 2] = mlp.output[:, 2] * 0.5
            logits = lm.lm_head.output.save()
        torch.testing.assert_close(logits[0], reference(lm, PROMPTS[1], 2, 0.5, layer), rtol=1e-4, atol=1e-4)
        sites = {row["site"] for row in tracer.inserted if row["role"] in ("capture", "scatter")}
        assert sites == {f"{mlp_path(layer)}.output", "lm_head.output"}, sites
    assert lm._functional.info().misses == 1 and lm._functional.info().hits == 2
    assert lm.cache_info() == CacheInfo(0, 3, DEFAULT_CACHE_SIZE, 3)  # each layer is its own rewritten graph


def test_cache_clear_forgets_graphs_checks_and_counts():
    lm = LanguageModel(fxpatch.TINY_GPT2)
    check(lm, PROMPT_1, 1, 0.5)
    check(lm, PROMPTS[1], 1, 0.5)  # another length: checked again (with symbolic sizes), the same graph
    # checked twice, each kept under the program and under its shape at any sites, and the shape's checks
    assert lm.cache_info() == CacheInfo(1, 1, DEFAULT_CACHE_SIZE, 1) and len(lm._checked) == 5
    lm.cache_clear()
    assert lm.cache_info() == CacheInfo(0, 0, DEFAULT_CACHE_SIZE, 0) and len(lm._checked) == 0
    check(lm, PROMPT_1, 1, 0.5)  # built again, and still right
    assert lm.cache_info() == CacheInfo(0, 1, DEFAULT_CACHE_SIZE, 1)


def test_unbounded_and_zero_sizes():
    unbounded = LanguageModel(fxpatch.TINY_GPT2, cache_size=None)
    for layer in range(4):
        check(unbounded, PROMPT_1, 1, 0.5, layer)
    assert unbounded.cache_info() == CacheInfo(0, 4, None, 4)
    nothing = LanguageModel(fxpatch.TINY_GPT2, cache_size=0)
    check(nothing, PROMPT_1, 1, 0.5)
    check(nothing, PROMPT_1, 1, 0.5)
    assert nothing.cache_info() == CacheInfo(0, 2, 0, 0)


def test_generation_steps_count_as_lookups():
    """Each step (the prompt pass, every decode step) looks a graph up; the same generation again on other
    prompts builds nothing, and gives transformers' own greedy tokens."""
    lm = LanguageModel(fxpatch.TINY_GPT2)

    def generate(prompt):
        with lm.generate(prompt, max_new_tokens=3):
            out = lm.generator.output.save()
        return out

    def steps(prompt, out):  # the prompt pass and each decode step; a row that ends early ends the loop
        return out.shape[-1] - len(lm.tokenizer(prompt)["input_ids"])

    second = "The Eiffel Tower is in Paris"
    out = generate(PROMPT_1)
    first = lm.cache_info()
    assert first.hits + first.misses == steps(PROMPT_1, out) == 3 and first.misses >= 1
    out2 = generate(second)
    assert lm.cache_info() == CacheInfo(first.hits + steps(second, out2), first.misses, DEFAULT_CACHE_SIZE,
                                        first.currsize)
    for prompt, got in ((PROMPT_1, out), (second, out2)):
        ids = lm.tokenizer(prompt, return_tensors="pt")
        want = lm._model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=lm.pad_token_id)
        assert torch.equal(got, want)


@pytest.mark.parametrize("size", [-1, 2.5, True, "big"])
def test_a_bad_cache_size_is_refused_at_the_users_line(size):
    with pytest.raises(InputError, match=r"test_graph_cache.py:\d+: cache_size=.* is not a number of graphs") as e:
        LanguageModel(fxpatch.TINY_GPT2, cache_size=size)
    assert "None for no bound" in str(e.value)


def rss_mb() -> float:
    """Resident memory now (VmRSS), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover - not Linux


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
def test_memory_stays_flat_over_thousands_of_changing_programs(caplog):
    """2,000 traces cycling through 16 programs (4 layers x 4 positions, the sign of a position and its
    module being structure) with other scales, with room for 8 graphs: every trace is a miss, and after
    warm-up resident memory grows by less than 50 MB; a sample of runs is checked against HF."""
    # PyPI's CUDA builds of torch log each symbolic-shapes step at DEBUG on "torch.__trace"; pytest keeps every
    # record it captures, about 150 MB over this test, which is the harness's memory, not fxpatch's
    caplog.set_level(logging.INFO, logger="torch.__trace")
    lm = LanguageModel(fxpatch.TINY_GPT2, cache_size=8)
    n, warm = 2000, 500
    seen = {}
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)]
        # a cycle of 16 structures: positive and negative positions need graphs of their own
        layer, position, scale = i % 4, (1, -1, 2, -2)[(i // 4) % 4], 1.0 + i / n
        if (i // 4) % 4 > 1:
            with lm.trace(prompt):  # another structure: a write of the whole position's hidden vector
                lm.transformer.h[layer].mlp.output[:, position] *= scale
        elif i % 250 == 0:
            check(lm, prompt, position, scale, layer)
        else:
            scaled(lm, prompt, position, scale, layer)
        if i in (warm, n - 1):
            seen[i] = rss_mb()
    info = lm.cache_info()
    print(f"\nRSS at trace {warm}: {seen[warm]:.1f} MB, at trace {n - 1}: {seen[n - 1]:.1f} MB, "
          f"growth {seen[n - 1] - seen[warm]:.1f} MB; {info}")
    assert info == CacheInfo(0, n, 8, 8) and len(lm._checked) <= 8
    assert seen[n - 1] - seen[warm] < 50
