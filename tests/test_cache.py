"""``tracer.cache(...)``: every module's (or chosen modules') values, checked against the plain model.

The reference is the plain Hugging Face model run prompt by prompt with forward hooks
(``tests/reference.py``) and, for generation, transformers' ``generate`` with hooks that record each
step. Runs on the tiny GPT-2 and the tiny Llama.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from transformers.utils import ModelOutput

from fxpatch.active import active_tracer
from fxpatch.errors import FxpatchError, InputError, ModulePathError
from tests.conftest import PROMPT_1, assert_state_unchanged, state
from tests.markers import Markers
from tests.reference import paths, run_alone, set_last, token_ids, unpad
from tests.test_differential import envoy as module

ATOL = 1e-5
HELLO = "hello"
MARKS = Markers(__file__)
line_of, check_message = MARKS.line_of, MARKS.check_message


def assert_same(actual: Any, expected: Any, n: int | None = None, where: str = "") -> None:
    """Equal structures; tensors close (with ``n``, only the last ``n`` positions of dim 1 of ``actual``)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), (where, type(actual))
        expected = expected.to(actual.device)  # the cache's values are on the CPU by default, as NNsight's
        if n is not None and actual.dim() >= 2 and actual.shape[1] != expected.shape[1]:
            actual = unpad(actual, 0, n)[None]
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda m: f"{where}: {m}")
    elif isinstance(expected, Mapping):
        assert set(actual.keys()) >= {k for k, v in expected.items() if isinstance(v, torch.Tensor)}, where
        for k, v in expected.items():
            if isinstance(v, torch.Tensor):
                assert_same(actual[k], v, n, f"{where}[{k!r}]")
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), (where, len(actual), len(expected))
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, n, f"{where}[{i}]")
    elif expected is None:
        assert actual is None, where


def all_paths(lm) -> list[str]:
    return [name for name, _ in lm._model.named_modules()]


def test_cache_of_every_module(lm):
    before = state(lm)
    with lm.trace(PROMPT_1) as tracer:
        cache = tracer.cache()
    ref = run_alone(lm, PROMPT_1, capture=all_paths(lm))
    # every module that ran, in the order they returned (the capture hooks' order), the root named "model"
    expected_keys = ["model." + p if p else "model" for p in ref.outputs]
    assert cache.keys() == expected_keys
    for path, output in ref.outputs.items():
        key = "model." + path if path else "model"
        if path == "":  # the model's own output: fxpatch's forward gives the logits only
            assert isinstance(cache[key].output, ModelOutput)   # the model's output class, as NNsight gives it
            assert_same(cache[key].output.logits, output["logits"], where=key)
            continue
        assert_same(cache[key].output, output, where=key)
        assert cache[key].inputs is None and len(cache[key]) == 1
    p = paths(lm)
    # the access forms name one entry: the full path, navigation from the root called "model", and (where the
    # model has no child called "model", as GPT-2) navigation and dotted paths without it
    layer = p.layer(1)
    full = cache["model." + layer].output
    torch.testing.assert_close(module(cache.model, layer).output, full, atol=0, rtol=0)
    if not layer.startswith("model."):
        torch.testing.assert_close(module(cache, layer).output, full, atol=0, rtol=0)
        torch.testing.assert_close(cache[layer].output, full, atol=0, rtol=0)
    assert "model." + layer in cache and "model.no.such.module" not in cache
    assert cache.keys() and all(k.startswith("model") for k in cache.keys())
    assert_state_unchanged(lm, before)


def test_cache_with_stop_holds_the_modules_run_before_it(lm):
    p = paths(lm)
    with lm.trace(PROMPT_1) as tracer:
        cache = tracer.cache()
        _ = module(lm, p.layer(0)).output
        tracer.stop()
    ref = run_alone(lm, PROMPT_1, capture=all_paths(lm))
    order = list(ref.outputs)
    ran = order[:order.index(p.layer(0)) + 1]   # what NNsight 0.8.1 records: the modules finished by then
    assert cache.keys() == ["model." + path for path in ran]
    for path in ran:
        assert_same(cache["model." + path].output, ref.outputs[path], where=path)


def test_cache_of_chosen_modules_with_inputs(lm):
    p = paths(lm)
    chosen = [module(lm, p.layer(0)), "model." + p.mlp(1), p.embed]   # an envoy, a full path, a short path
    with lm.trace(PROMPT_1) as tracer:
        cache = tracer.cache(modules=chosen, include_inputs=True)
    ref = run_alone(lm, PROMPT_1, capture=[p.layer(0), p.mlp(1), p.embed])
    assert cache.keys() == ["model." + p.embed, "model." + p.layer(0), "model." + p.mlp(1)]
    for path in (p.embed, p.layer(0), p.mlp(1)):
        entry = cache["model." + path]
        assert_same(entry.output, ref.outputs[path], where=path)
        args, kwargs = ref.inputs[path]
        first = args[0] if args else next(iter(kwargs.values()))
        assert_same(entry.input, first, where=path + ".input")
        assert isinstance(entry.inputs, tuple) and len(entry.inputs) == 2
    with pytest.raises(KeyError, match="was not cached"):
        _ = cache["model." + p.layer(1)].output


def test_cache_rows_of_its_invoke_after_the_interventions(lm):
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            patched = tracer.cache(modules=[p.layer(0), p.layer(1)])   # declared before the write: sees it
            module(lm, p.layer(0)).output[:, -1] = 0
        with tracer.invoke([HELLO, "The Eiffel Tower is in Paris"]):
            clean = tracer.cache(modules=[p.layer(1)])
    edit = run_alone(lm, PROMPT_1, outputs={p.layer(0): set_last(0.0)}, capture=[p.layer(0), p.layer(1)])
    for path in (p.layer(0), p.layer(1)):
        assert patched["model." + path].output.shape[0] == 1
        assert_same(patched["model." + path].output, edit.outputs[path], where=path)
    out = clean["model." + p.layer(1)].output
    assert out.shape[0] == 2  # that invoke's two rows, left-padded to the batch's width
    for row, prompt in enumerate([HELLO, "The Eiffel Tower is in Paris"]):
        n = len(token_ids(lm, prompt))
        ref = run_alone(lm, prompt, capture=[p.layer(1)]).outputs[p.layer(1)]
        torch.testing.assert_close(unpad(out, row, n), ref[0], atol=ATOL, rtol=0)


def test_dtype_device_and_detach(gpt2):
    p = paths(gpt2)
    ref = run_alone(gpt2, PROMPT_1, capture=[p.layer(0)]).outputs[p.layer(0)]
    with gpt2.trace(PROMPT_1) as tracer:
        half = tracer.cache(modules=[p.layer(0)], dtype=torch.float16)
        here = tracer.cache(modules=[p.layer(0)], device=None, detach=False)
        detached = tracer.cache(modules=[p.layer(0)], device=None, detach=True)
        cpu = tracer.cache(modules=[p.layer(0)], device="cpu")
    value = half.transformer.h[0].output
    assert value.dtype == torch.float16
    torch.testing.assert_close(value, ref.half().to(value.device), atol=1e-3, rtol=1e-3)
    assert here.transformer.h[0].output.device == gpt2.device
    assert cpu.transformer.h[0].output.device == torch.device("cpu")
    # detach=False hands over the tensor the run gave; detach=True a detached tensor of the same storage
    raw = here._cache._reads[p.layer(0)][0][1]["output"].value
    assert here.transformer.h[0].output is raw
    kept = detached.transformer.h[0].output
    raw = detached._cache._reads[p.layer(0)][0][1]["output"].value
    assert kept is not raw and not kept.requires_grad
    assert kept.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr()
    torch.testing.assert_close(kept, ref, atol=ATOL, rtol=0)


def hf_steps(lm, prompt: str, n: int, paths_: list[str]) -> tuple[list[int], dict[str, list[torch.Tensor]]]:
    """transformers' greedy ``generate`` on ``prompt`` alone with hooks recording each step's outputs."""
    model = lm._model
    ids = torch.tensor([token_ids(lm, prompt)], device=lm.device)
    seen: dict[str, list[torch.Tensor]] = {path: [] for path in paths_}
    handles = [model.get_submodule(path).register_forward_hook(
        lambda m, a, out, path=path: seen[path].append(out.detach().clone())) for path in paths_]
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 pad_token_id=lm.pad_token_id)
    finally:
        for h in handles:
            h.remove()
    return out[0].tolist(), seen


def test_cache_per_generation_step(lm):
    p = paths(lm)
    with lm.generate(max_new_tokens=3) as tracer:
        with tracer.invoke(PROMPT_1):
            pass
        with tracer.invoke(HELLO):
            cache = tracer.cache(modules=[p.layer(0), p.head], include_inputs=True)
            tokens = lm.generator.output.save()
    expected_tokens, seen = hf_steps(lm, HELLO, 3, [p.layer(0), p.head])
    n = len(token_ids(lm, HELLO))
    assert unpad(tokens, 0, n + 3).tolist() == expected_tokens
    layer = cache["model." + p.layer(0)]
    assert len(layer) == 3 and len(cache["model." + p.head]) == 3
    outputs, inputs = layer.output, layer.input
    assert [o.shape[1] for o in outputs] == [tokens.shape[1] - 3, 1, 1]   # the prompt pass, then one token a step
    for step in range(3):
        assert_same(outputs[step], seen[p.layer(0)][step], n, where=f"step {step}")
        # the head's output in the prompt pass is the last position's logits only (transformers' logits_to_keep)
        torch.testing.assert_close(cache["model." + p.head].output[step][:, -1], seen[p.head][step][:, -1],
                                   atol=ATOL, rtol=0)
        assert inputs[step].shape == outputs[step].shape
    embed = run_alone(lm, HELLO, capture=[p.layer(0)]).inputs[p.layer(0)]
    first = embed[0][0] if embed[0] else next(iter(embed[1].values()))
    torch.testing.assert_close(unpad(inputs[0], 0, n)[None], first, atol=ATOL, rtol=0)


def test_a_generation_that_stops_early_has_an_entry_per_step_run(gpt2):
    prompt = "The Eiffel Tower is in Paris"  # the tiny GPT-2 ends it with EOS after 2 new tokens
    with gpt2.generate(prompt, max_new_tokens=4) as tracer:
        cache = tracer.cache(modules=["model.lm_head"])
    expected, seen = hf_steps(gpt2, prompt, 4, ["lm_head"])
    assert len(seen["lm_head"]) < 4  # it does stop early
    assert len(cache.lm_head) == len(seen["lm_head"])
    for step, logits in enumerate(cache.lm_head.output):
        torch.testing.assert_close(logits[:, -1], seen["lm_head"][step][:, -1].to(logits.device), atol=ATOL, rtol=0)


def test_bad_caches(gpt2):
    before = state(gpt2)
    with pytest.raises(FxpatchError) as info:
        with gpt2.trace() as tracer:
            tracer.cache()  # line: no-invoke
            with tracer.invoke(PROMPT_1):
                pass
    check_message(info.value, "no-invoke", "tracer.cache()", "outside an invoke")
    with pytest.raises(ModulePathError) as info:
        with gpt2.trace(PROMPT_1) as tracer:
            tracer.cache(modules=["model.transformer.h.9"])  # line: bad-path
    check_message(info.value, "bad-path", "model.transformer.h.9", "not a module")
    with pytest.raises(InputError) as info:
        with gpt2.trace(PROMPT_1) as tracer:
            tracer.cache(include_output=False)  # line: nothing
    check_message(info.value, "nothing", "records nothing")
    with pytest.raises(FxpatchError) as info:
        with gpt2.trace(PROMPT_1) as tracer:
            cache = tracer.cache()
            _ = cache.transformer.h[0].output  # line: too-early
    check_message(info.value, "too-early", "before its trace has run", "after the `with` block")
    assert active_tracer() is None
    assert_state_unchanged(gpt2, before)
