"""``model.generate(..., cache_implementation="static")``: a preallocated KV cache, fixed decode shapes.

The reference is transformers' own ``generate`` with ``cache_implementation="static"`` on each
prompt alone, with ordinary forward hooks making the same edit at the same steps (as in
``test_generation.py``). Token ids must be equal, saved activations and the cache's keys and
values equal to 1e-5. Every edit is checked to change HF's tokens, so an edit that silently does
nothing fails. The compiled test checks that the decode graph compiles once for a maximum length:
not again per step, nor for prompts of another width.
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
import torch._dynamo

import fxpatch
from fxpatch.errors import InputError
from fxpatch.generation import result_cache_field
from tests.conftest import PROMPT_1, assert_state_unchanged, layers, skip_compiled_generation_before_torch_2_13, state
from tests.reference import hf_run, kv, token_ids
from tests.test_generation import HELLO, add_last, assert_tokens, expected_batch, negate_last, push_vector

N = 4
ATOL = 1e-5
EIFFEL = "The Eiffel Tower is in Paris"
_SOURCE = open(__file__, encoding="utf-8").read().splitlines()


def scale_all(factor: float):
    """The hook edit ``output * factor`` at every step."""
    return lambda output, step: output * factor


def hf_static(lm, prompt: str, n: int, *, edits=(), capture=None, **settings):
    """transformers' ``generate`` with a static cache on ``prompt`` alone, greedy, with forward hooks
    (``hf_run``'s ``edits`` and ``capture``). Returns the ``GenerateDecoderOnlyOutput`` (its ``cache`` is
    transformers' ``StaticCache``)."""
    # on a GPU transformers compiles static-cache decoding by itself (CUDA graphs, whose next replay writes over
    # the outputs the hooks keep): the reference runs eagerly
    out = hf_run(lm, [prompt], n, edits=edits, capture=capture, cache_implementation="static",
                 return_dict_in_generate=True, disable_compile=True, **settings)
    # transformers 5.14 and older keep one StaticCache on the model and reset it at the next generate: the
    # reference keeps a copy of what this run wrote
    setattr(out, result_cache_field(), copy.deepcopy(kv(out)))
    return out


def assert_cache_rows(ours, theirs, row: int, pad: int) -> None:
    """Row ``row`` of our static cache (its prompt after ``pad`` left pads) holds transformers' cache of the
    prompt alone at the positions transformers wrote; nothing is written after our cache's length so far."""
    for layer, (a, b) in enumerate(zip(ours.layers, theirs.layers)):
        written = int(b.cumulative_length)
        for what, x, y in (("keys", a.keys, b.keys), ("values", a.values, b.values)):
            torch.testing.assert_close(x[row, :, pad:pad + written], y[0, :, :written], atol=ATOL, rtol=ATOL,
                                       msg=lambda m, w=what, i=layer: f"layer {i} {w}: {m}")
            assert not x[row, :, int(a.cumulative_length):].any(), f"layer {layer} {what}: written too far"


@pytest.mark.parametrize("max_cache_len", [None, 24])
def test_static_generation_with_edits_equals_hf_static_generate(lm, max_cache_len):
    """A step-0 edit in one invoke, an edit at every step (``tracer.all()``) in another, values saved per
    step: tokens, saved values and the returned StaticCache equal transformers' static-cache generate
    with hooks, prompt by prompt (HELLO is left-padded by 7)."""
    envoys, modules = layers(lm)
    v = push_vector(lm)
    extra = {} if max_cache_len is None else {"max_cache_len": max_cache_len}
    with lm.generate(max_new_tokens=N, cache_implementation="static", return_dict_in_generate=True,
                     **extra) as tracer:
        with tracer.invoke(PROMPT_1):
            envoys[0].output[:, -1] = -envoys[0].output[:, -1]  # the prompt pass only
        with tracer.invoke(HELLO):
            hs = fxpatch.save([])
            for _ in tracer.all():
                envoys[0].output[:, -1] = envoys[0].output[:, -1] + v
                envoys[1].output[:] = envoys[1].output * 1.5
                hs.append(envoys[1].output[:, -1])
        result = tracer.result.save()

    edits = [(modules[1], scale_all(1.5)), (modules[0], add_last(set(range(N)), v))]
    values: list[torch.Tensor] = []
    first = hf_static(lm, PROMPT_1, N, edits=[(modules[0], negate_last({0}))], **extra)
    second = hf_static(lm, HELLO, N, edits=edits, capture=(modules[1], values), **extra)
    for ref, prompt in ((first, PROMPT_1), (second, HELLO)):
        plain = hf_static(lm, prompt, N, **extra).sequences
        assert not torch.equal(plain, ref.sequences), f"the edit does not change the tokens of {prompt!r}"
    assert_tokens(lm, result.sequences, expected_batch(lm, [PROMPT_1, HELLO], [first.sequences[0].tolist(),
                                                                              second.sequences[0].tolist()]))
    assert len(hs) == len(values) == N
    for step, (got, ref) in enumerate(zip(hs, values)):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=ATOL, msg=lambda m, s=step: f"step {s}: {m}")

    # the cache is transformers' StaticCache, preallocated to the maximum length and written as theirs
    width = len(token_ids(lm, PROMPT_1))
    length = max(width + N - 1, max_cache_len or 0)
    assert type(kv(result)).__name__ == "StaticCache"
    for ours, theirs in zip(kv(result).layers, kv(first).layers):
        for x, y in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            assert x.shape == (2, y.shape[1], length, y.shape[3]), (x.shape, y.shape, length)
    # every token fed is written: the prompt, then one per decode step (the last new token is not fed)
    fed = result.sequences.shape[1] - 1
    assert [int(layer.cumulative_length) for layer in kv(result).layers] == [fed] * len(modules)
    assert_cache_rows(kv(result), kv(first), 0, 0)
    assert_cache_rows(kv(result), kv(second), 1, width - len(token_ids(lm, HELLO)))


def test_static_cache_stops_at_eos_as_hf_does(gpt2):
    """EIFFEL ends with EOS after 2 new tokens on the tiny GPT-2: its row is filled with pad afterwards, the
    other row goes on, and each equals transformers' static-cache generate alone. An invoke's
    ``model.generator.output`` holds its rows of the StaticCache, with a length count of its own."""
    with gpt2.generate(max_new_tokens=N, cache_implementation="static", return_dict_in_generate=True) as tracer:
        with tracer.invoke(EIFFEL):
            pass
        with tracer.invoke(PROMPT_1):
            mine = gpt2.generator.output.save()
        result = tracer.result.save()
    refs = [hf_static(gpt2, p, N) for p in (EIFFEL, PROMPT_1)]
    assert len(refs[0].sequences[0]) < len(token_ids(gpt2, EIFFEL)) + N, "EIFFEL no longer stops early"
    assert_tokens(gpt2, result.sequences, expected_batch(gpt2, [EIFFEL, PROMPT_1],
                                                         [r.sequences[0].tolist() for r in refs]))
    assert torch.equal(mine.sequences, result.sequences[1:])
    assert_cache_rows(kv(mine), kv(refs[1]), 0, 0)
    for part, whole in zip(kv(mine).layers, kv(result).layers):
        assert torch.equal(part.keys, whole.keys[1:]) and torch.equal(part.values, whole.values[1:])
        assert part.cumulative_length is not whole.cumulative_length
        assert int(part.cumulative_length) == int(whole.cumulative_length) == result.sequences.shape[1] - 1


def _compile_counts() -> tuple[int, int]:
    counters = torch._dynamo.utils.counters
    return counters["stats"]["unique_graphs"], counters["frames"]["ok"]


def generate_scaled(lm, prompts, compile, **settings):
    """A static-cache generation of ``prompts``, each an invoke scaling layer 1's output by 1.5 at every step
    and saving its last position: ``(tracer, the sequences, the last invoke's saved values)``."""
    h = lm.transformer.h
    with lm.generate(max_new_tokens=N, cache_implementation="static", compile=compile, **settings) as tracer:
        for p in prompts:
            with tracer.invoke(p):
                hs = fxpatch.save([])
                for _ in tracer.all():
                    h[1].output[:] = h[1].output * 1.5
                    hs.append(h[1].output[:, -1])
        out = tracer.result.save()
    return tracer, out, hs


@pytest.mark.slow  # about a minute (compiling / two spawned exporting processes): run with -m slow
def test_compiled_static_generation_compiles_once_per_maximum_length(gpt2):
    """Under compile=True the static decode graph is compiled once for its sizes: not again at the next
    decode steps, nor for two prompts of another width with the same max_cache_len. Tokens equal the
    eager run's and transformers'; the values saved at every step equal the eager run's."""
    skip_compiled_generation_before_torch_2_13(gpt2.device)

    def run(prompts, compile):
        return generate_scaled(gpt2, prompts, compile, max_cache_len=16)

    torch._dynamo.reset()
    before = _compile_counts()
    tracer, compiled, hs = run([PROMPT_1, HELLO], True)
    decode = {id(tracer.graphs[s]) for s in range(1, N)}
    assert len(decode) == 1, "the decode steps ran different graphs"
    graphs = _compile_counts()[0] - before[0]
    assert graphs == 2, f"{graphs} graphs compiled: expected one prefill and one decode graph"
    _, eager, eager_hs = run([PROMPT_1, HELLO], False)
    assert torch.equal(compiled, eager)
    for step, (a, b) in enumerate(zip(hs, eager_hs)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=ATOL, msg=lambda m, s=step: f"step {s}: {m}")

    # prompts of another width (9 tokens, not 10), the same maximum length: nothing is compiled again
    seen = _compile_counts()
    _, again, _ = run([EIFFEL, "hello world"], True)
    assert _compile_counts() == seen, "the static decode (or the prefill) graph was compiled again"
    _, again_eager, _ = run([EIFFEL, "hello world"], False)
    assert torch.equal(again, again_eager)
    refs = [hf_static(gpt2, p, N, edits=[(gpt2._model.transformer.h[1], scale_all(1.5))], max_cache_len=16)
            .sequences[0].tolist() for p in (EIFFEL, "hello world")]
    assert_tokens(gpt2, again, expected_batch(gpt2, [EIFFEL, "hello world"], refs))


# -- bad settings ------------------------------------------------------------------------------------------------
def line_of(tag: str) -> int:
    hits = [i + 1 for i, text in enumerate(_SOURCE) if text.rstrip().endswith("# line: " + tag)]
    assert len(hits) == 1, f"marker {tag!r} found on lines {hits}"
    return hits[0]


def refused(lm, settings: dict) -> str:
    """The message of the InputError ``lm.generate(**settings)`` raises at its own line, before its body runs;
    the model is left as it was."""
    before = state(lm)
    ran = []
    with pytest.raises(InputError) as info:
        with lm.generate(PROMPT_1, max_new_tokens=2, **settings):  # line: refused
            ran.append(True)
    assert not ran, "the block ran: the setting was not refused at the generate() call"
    assert_state_unchanged(lm, before)
    msg = str(info.value)
    match = re.match(r"(.+?):(\d+): ", msg)
    assert match and os.path.samefile(match.group(1), __file__) and int(match.group(2)) == line_of("refused"), msg
    return msg


@pytest.mark.parametrize("settings, words", [
    ({"max_cache_len": 32}, ["max_cache_len=32", "static", "cache_implementation='static'"]),
    ({"max_cache_len": 32, "cache_implementation": "dynamic"}, ["max_cache_len=32", "dynamic"]),
    ({"max_cache_len": 0, "cache_implementation": "static"}, ["max_cache_len", ">= 1"]),
    ({"cache_implementation": "offloaded_static"}, ["cache_implementation='offloaded_static'", "'static'"]),
])
def test_refused_cache_settings(gpt2, settings, words):
    msg = refused(gpt2, settings)
    for word in words:
        assert word.lower() in msg.lower(), f"{word!r} missing from:\n{msg}"


def test_static_cache_refused_for_sliding_window_layers(tokenizer):
    """A model whose StaticCache would have sliding-window layers (Mistral with a window) is refused at the
    generate line; its dynamic cache still works."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=len(tokenizer), sliding_window=4,
                           max_position_embeddings=64)
    lm = fxpatch.LanguageModel(MistralForCausalLM(config).eval(), tokenizer=tokenizer)
    msg = refused(lm, {"cache_implementation": "static"})
    assert "StaticSlidingWindowLayer" in msg and "Drop cache_implementation" in msg, msg


@pytest.mark.slow  # compiles a prefill and a decode graph
def test_compiled_generation_through_onednns_gemm_equals_transformers(gpt2, monkeypatch):
    """With its size limit at 0, every linear of the compiled prefill and static decode graphs runs oneDNN's
    GEMM (fxpatch/passes/onednn_linear.py); the tokens of an edited generation equal transformers'
    static-cache ``generate`` with the edit in a hook, prompt by prompt, and the values saved at each step
    equal the eager run's."""
    from fxpatch.passes.onednn_linear import available
    from fxpatch.passes.ops import ONEDNN_LINEAR_OP

    skip_compiled_generation_before_torch_2_13(gpt2.device)
    if not available():
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr("fxpatch.passes.onednn_linear.MIN_NUMEL", 0)
    torch._dynamo.reset()
    lm = fxpatch.LanguageModel(copy.deepcopy(gpt2._model), tokenizer=gpt2.tokenizer)

    tracer, compiled, hs = generate_scaled(lm, [PROMPT_1, HELLO], True)
    for step in (0, 1):  # the prefill graph and the decode graph
        (fn,) = tracer.graphs[step]._fxpatch_compiled.values()
        nodes = [n for m in fn._orig_mod.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]
        assert any(n.target is ONEDNN_LINEAR_OP for n in nodes), f"graph of step {step}"
        assert not [n for n in nodes if n.target in (torch.ops.aten.addmm.default, torch.ops.aten.linear.default)]
    _, eager, eager_hs = generate_scaled(lm, [PROMPT_1, HELLO], False)
    edits = [(lm._model.transformer.h[1], scale_all(1.5))]
    refs = [hf_static(lm, p, N, edits=edits).sequences[0].tolist() for p in (PROMPT_1, HELLO)]
    assert_tokens(lm, compiled, expected_batch(lm, [PROMPT_1, HELLO], refs))
    assert torch.equal(compiled, eager)
    for step, (a, b) in enumerate(zip(hs, eager_hs)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=ATOL, msg=lambda m, s=step: f"step {s}: {m}")
