"""Differential tests of ``model.generate``: fxpatch against plain Hugging Face ``generate`` with hooks.

Each test runs one generation program through fxpatch (prompts of different
lengths, left-padded into one batch) and, for every prompt alone, the plain HF
``lm._model.generate`` with ordinary forward hooks that make the same edit at
the same steps. A pre-hook on the root model counts its forward calls: call 0
is the prompt pass, call k decode step k. Token ids must be equal exactly,
saved activations to 1e-5. Every edit is checked to change the HF tokens, so a
program that silently does nothing fails. Every test runs on the tiny GPT-2
and the tiny grouped-query Llama (``lm`` fixture).

The last section is bad input: the error's type, this file's offending line
(found by a ``# line: TAG`` marker), and the model left as it was.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import pytest
import torch

import fxpatch
from fxpatch.active import active_tracer
from fxpatch.errors import FxpatchError, InputError, ShapeError
from tests.conftest import PROMPT_1, assert_state_unchanged, layers, state
from tests.reference import token_ids

HELLO = "hello"  # 3 tokens: 7 left pads beside PROMPT_1's 10
EIFFEL = "The Eiffel Tower is in Paris"  # 9 tokens; GPT-2 ends it with EOS after 2 new tokens
N = 4  # max_new_tokens of most tests
ATOL = 1e-5
_SOURCE = open(__file__, encoding="utf-8").read().splitlines()

Edit = Callable[[torch.Tensor, int], "torch.Tensor | None"]
"""A hook edit: called with a module's output and the step; returns the new output, or None to keep it."""


# -- the plain Hugging Face reference ---------------------------------------------------------------
def hf_generate(lm, prompt: str, n: int, *, edits: list[tuple[torch.nn.Module, Edit]] = (),
                capture: tuple[torch.nn.Module, list] | None = None, **settings) -> list[int]:
    """Token ids (prompt + new) of the plain HF ``generate`` on ``prompt`` alone, greedy unless ``settings`` say.

    ``edits`` are forward hooks that get the step (the root model's forward-call count); ``capture``
    appends a module's ``output[:, -1]`` of each step to the given list. Hooks are always removed.
    """
    model = lm._model
    ids = torch.tensor([token_ids(lm, prompt)], device=lm.device)
    calls: list[None] = []
    handles = [model.register_forward_pre_hook(lambda module, args: calls.append(None))]

    def edit_hook(edit: Edit):
        return lambda module, args, output: edit(output, len(calls) - 1)

    try:
        for module, edit in edits:
            handles.append(module.register_forward_hook(edit_hook(edit)))
        if capture is not None:
            module, values = capture
            handles.append(module.register_forward_hook(
                lambda m, args, output: values.append(output[:, -1].detach().clone())))
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 **{"do_sample": False, "pad_token_id": lm.pad_token_id, **settings})
    finally:
        for h in handles:
            h.remove()
    # one root forward per new token: the step count the edits saw is the real one
    assert len(calls) == out.shape[1] - ids.shape[1], (len(calls), out.shape)
    return out[0].tolist()


def negate_last(steps: set[int]) -> Edit:
    """``x[:, -1] = -x[:, -1]`` at ``steps``."""
    def edit(output, step):
        if step not in steps:
            return None
        output = output.clone()
        output[:, -1] = -output[:, -1]
        return output
    return edit


def add_last(steps: set[int], vector: torch.Tensor) -> Edit:
    """``x[:, -1] += vector`` at ``steps``."""
    def edit(output, step):
        if step not in steps:
            return None
        output = output.clone()
        output[:, -1] = output[:, -1] + vector
        return output
    return edit


def set_last(values: list[torch.Tensor], steps: set[int]) -> Edit:
    """``x[:, -1] = values[step]`` at ``steps``."""
    def edit(output, step):
        if step not in steps:
            return None
        output = output.clone()
        output[:, -1] = values[step]
        return output
    return edit


def push_vector(lm) -> torch.Tensor:
    """A fixed random direction of norm ~5 * sqrt(hidden): enough to change tokens, not to saturate them."""
    hidden = lm._model.get_input_embeddings().weight.shape[1]
    return torch.randn(hidden, generator=torch.Generator().manual_seed(0)).to(lm.device) * 5


# -- comparing batches ----------------------------------------------------------------------------------
def expected_batch(lm, prompts: list[str], sequences: list[list[int]], fill: int | None = None) -> list[list[int]]:
    """The left-padded batch of ``prompts`` after generating ``sequences`` (each prompt alone):
    pad tokens, prompt, new tokens, then ``fill`` (default: the pad token) after a row that finished early."""
    pad = lm.pad_token_id
    fill = pad if fill is None else fill
    lengths = [len(token_ids(lm, p)) for p in prompts]
    for seq, k, p in zip(sequences, lengths, prompts):
        assert seq[:k] == token_ids(lm, p)
    width = max(lengths)
    new = max(len(s) - k for s, k in zip(sequences, lengths))
    return [[pad] * (width - k) + s + [fill] * (new - (len(s) - k)) for s, k in zip(sequences, lengths)]


def assert_tokens(lm, actual, expected: list[list[int]], what: str = "tokens") -> None:
    """``actual`` (a tensor of token ids) equals ``expected``; the message shows both decoded."""
    assert isinstance(actual, torch.Tensor), f"{what} is {type(actual).__name__}, not a tensor"
    got = actual.tolist()
    if got != expected:
        lines = [f"{what} differ:"]
        for i, (g, e) in enumerate(zip(got, expected)):
            lines.append(f"  row {i}: got      {g} {lm.tokenizer.decode(g)!r}")
            lines.append(f"  row {i}: expected {e} {lm.tokenizer.decode(e)!r}")
        if len(got) != len(expected):
            lines.append(f"  {len(got)} rows, expected {len(expected)}")
        raise AssertionError("\n".join(lines))


# -- edits at steps -----------------------------------------------------------------------------------------
STEP_CASES = {
    "prompt pass": {0},  # written directly in the invoke
    "iter[1:3]": {1, 2},
    "iter[2]": {2},
    "iter[[0, 3]]": {0, 3},
    "all()": {0, 1, 2, 3},
}


def edit_at(tracer, case: str, edit: Callable[[], None]) -> None:
    """Record ``edit()`` at the steps of ``case``: directly in the invoke, or in a ``for step in ...`` loop."""
    if case == "prompt pass":
        edit()
        return
    loop = {"iter[1:3]": lambda: tracer.iter[1:3], "iter[2]": lambda: tracer.iter[2],
            "iter[[0, 3]]": lambda: tracer.iter[[0, 3]], "all()": tracer.all}[case]()
    for _ in loop:
        edit()


@pytest.mark.parametrize("case1, case2", [("prompt pass", "iter[1:3]"), ("iter[2]", "all()"),
                                          ("iter[[0, 3]]", "prompt pass")])
def test_edits_at_steps(lm, case1, case2):
    """Edits at step 0, at decode steps only, at listed steps and at every step give HF's tokens.

    Two invokes with different edits at different steps: PROMPT_1 negates layer 0's last position,
    the left-padded HELLO adds a vector to layer 1's (a decode step's output has length 1, so there
    ``[:, -1]`` is the new token).
    """
    envoys, modules = layers(lm)
    v = push_vector(lm)

    def negate():
        envoys[0].output[:, -1] = -envoys[0].output[:, -1]

    def push():
        envoys[1].output[:, -1] = envoys[1].output[:, -1] + v

    with lm.generate(max_new_tokens=N) as tracer:
        with tracer.invoke(PROMPT_1):
            edit_at(tracer, case1, negate)
        with tracer.invoke(HELLO):
            edit_at(tracer, case2, push)
        result = tracer.result.save()

    edited = [hf_generate(lm, PROMPT_1, N, edits=[(modules[0], negate_last(STEP_CASES[case1]))]),
              hf_generate(lm, HELLO, N, edits=[(modules[1], add_last(STEP_CASES[case2], v))])]
    plain = [hf_generate(lm, PROMPT_1, N), hf_generate(lm, HELLO, N)]
    for p, e, prompt, case in zip(plain, edited, (PROMPT_1, HELLO), (case1, case2)):
        assert p != e, f"the edit at {case} does not change the tokens of {prompt!r}"
    assert_tokens(lm, result, expected_batch(lm, [PROMPT_1, HELLO], edited))


@pytest.mark.parametrize("every_step, with_barrier", [(False, True), (True, False)],
                         ids=["step0-barrier", "every-step-no-barrier"])
def test_cross_invoke_edit(lm, every_step, with_barrier):
    """PROMPT_1's layer-1 output at the last position, written into HELLO's at the same step(s)."""
    envoys, modules = layers(lm)
    with lm.generate(max_new_tokens=N) as tracer:
        barrier = tracer.barrier(2) if with_barrier else None
        with tracer.invoke(PROMPT_1):
            if every_step:
                # plain list: one proxy per step, used by the next invoke at the same step
                source = [envoys[1].output[:, -1] for _ in tracer.all()]
            else:
                source = envoys[1].output[:, -1]
            if barrier:
                barrier()
        with tracer.invoke(HELLO):
            if barrier:
                barrier()
            if every_step:
                for step in tracer.all():
                    envoys[1].output[:, -1] = source[step]
            else:
                envoys[1].output[:, -1] = source
        result = tracer.result.save()

    steps = set(range(N)) if every_step else {0}
    values: list[torch.Tensor] = []
    first = hf_generate(lm, PROMPT_1, N, capture=(modules[1], values))
    assert len(values) == N  # PROMPT_1 alone runs every step, so each step has a value to copy
    patched = hf_generate(lm, HELLO, N, edits=[(modules[1], set_last(values, steps))])
    assert patched != hf_generate(lm, HELLO, N), "the copied activation does not change HELLO's tokens"
    assert_tokens(lm, result, expected_batch(lm, [PROMPT_1, HELLO], [first, patched]))


def test_values_saved_per_step(lm):
    """``hs.append(...)`` in a step loop keeps one value per step, each equal to HF's at that step alone."""
    envoys, modules = layers(lm)
    with lm.generate(max_new_tokens=N) as tracer:
        with tracer.invoke(PROMPT_1):
            hs1 = fxpatch.save([])
            for _ in tracer.all():
                hs1.append(envoys[1].output[:, -1])
        with tracer.invoke(HELLO):
            seen = []
            hs2 = fxpatch.save([])
            for step in tracer.iter[1:3]:
                seen.append(step)
                envoys[0].output[:, -1] = -envoys[0].output[:, -1]  # values after an edit, through the cache
                hs2.append(envoys[1].output[:, -1])
            last = envoys[1].output[:, -1].save()  # outside a loop: step 0

    assert seen == [1, 2]
    ref1: list[torch.Tensor] = []
    hf_generate(lm, PROMPT_1, N, capture=(modules[1], ref1))
    ref2: list[torch.Tensor] = []
    hf_generate(lm, HELLO, N, edits=[(modules[0], negate_last({1, 2}))], capture=(modules[1], ref2))
    assert len(ref1) == len(ref2) == N
    assert isinstance(hs1, list) and len(hs1) == N, hs1
    assert isinstance(hs2, list) and len(hs2) == 2, hs2
    for step, (got, ref) in enumerate(zip(hs1, ref1)):
        assert isinstance(got, torch.Tensor), f"step {step}: {got!r}"
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=ATOL, msg=lambda m, s=step: f"PROMPT_1 step {s}: {m}")
    for step, got in zip([1, 2], hs2):
        torch.testing.assert_close(got, ref2[step], atol=ATOL, rtol=ATOL,
                                   msg=lambda m, s=step: f"HELLO step {s}: {m}")
    torch.testing.assert_close(last, ref2[0], atol=ATOL, rtol=ATOL)
    # per step means different values: the steps see different tokens
    assert not torch.allclose(hs1[0], hs1[1])


def test_an_outside_tensor_changed_between_steps(gpt2):
    """``v += direction`` after each step's write: with ``v.clone()`` at the write each step writes ``v``'s
    value at that step, as NNsight's interleaved steps do (HF ``generate`` with a hook writing it gives the
    same tokens, which differ from writing step 0's value throughout); without the copy the program would
    see only the last value, so the generation is refused before it runs."""
    envoys, modules = layers(gpt2)
    direction = torch.linspace(-3.0, 3.0, gpt2._model.config.hidden_size)  # not constant: LayerNorm keeps it

    def run(copy: bool):
        v = torch.zeros_like(direction)
        with gpt2.generate(PROMPT_1, max_new_tokens=N) as tracer:
            tokens = gpt2.generator.output.save()
            for _ in tracer.all():
                envoys[0].output[:, -1] = v.clone() if copy else v  # line: step-use
                v += direction
        return tokens

    def set_step(output, step):
        output = output.clone()
        output[:, -1] = step * direction
        return output

    got = run(copy=True)
    want = hf_generate(gpt2, PROMPT_1, N, edits=[(modules[0], set_step)])
    assert got[0].tolist() == want, (got, want)
    assert want != hf_generate(gpt2, PROMPT_1, N, edits=[(modules[0], lambda out, step: set_step(out, 0))])
    with pytest.raises(FxpatchError) as info:
        run(copy=False)
    check_message(info.value, "step-use", "changed in place after this line used it", "x.clone()")


def test_result_and_generator_output(lm):
    """``tracer.result`` is the whole left-padded batch, prompt + new tokens; each invoke's
    ``model.generator.output``, and ``tracer.result`` read in an invoke, is its rows of it (an empty
    ``tracer.invoke()`` has every row). No intervention: HF's greedy tokens per prompt."""
    with lm.generate(max_new_tokens=N) as tracer:
        with tracer.invoke(PROMPT_1):
            out1 = lm.generator.output.save()
        with tracer.invoke([HELLO, EIFFEL]):  # one invoke, two rows
            out2 = lm.generator.output.save()
            result2 = tracer.result.save()  # inside an invoke: its rows, as NNsight gives
        with tracer.invoke():  # no inputs: every row
            every = tracer.result.save()
        result = tracer.result.save()

    prompts = [PROMPT_1, HELLO, EIFFEL]
    expected = expected_batch(lm, prompts, [hf_generate(lm, p, N) for p in prompts])
    assert_tokens(lm, result, expected, "tracer.result")
    assert_tokens(lm, every, expected, "tracer.result in an invoke of every row")
    assert_tokens(lm, out1, expected[:1], "generator.output of invoke 1")
    assert_tokens(lm, out2, expected[1:], "generator.output of invoke 2")
    assert_tokens(lm, result2, expected[1:], "tracer.result in invoke 2")
    width = max(len(token_ids(lm, p)) for p in prompts)
    assert result.shape[1] > width  # new tokens after the prompt


def test_sampling_with_a_seed(lm):
    """Sampling without intervention: with the same seed, the same tokens as HF's sampling."""
    settings = {"do_sample": True, "top_k": 50, "temperature": 1.5}
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with lm.generate(HELLO, max_new_tokens=5, **settings):
            out = lm.generator.output.save()
        torch.manual_seed(seed)
        expected = hf_generate(lm, HELLO, 5, **settings)
        assert_tokens(lm, out, [expected], f"sampled with seed {seed}")
        outputs.append(expected)
    assert outputs[0] != outputs[1], "two seeds gave the same tokens: the test would not see sampling"


def test_top_p_sampling_and_stop_strings_are_transformers(gpt2):
    """top_p sampling and stop strings come from transformers' processors and criteria."""
    torch.manual_seed(3)
    with gpt2.generate(PROMPT_1, max_new_tokens=5, do_sample=True, top_p=0.9, temperature=1.2):
        sampled = gpt2.generator.output.save()
    torch.manual_seed(3)
    assert_tokens(gpt2, sampled, [hf_generate(gpt2, PROMPT_1, 5, do_sample=True, top_p=0.9, temperature=1.2)])
    with gpt2.generate(PROMPT_1, max_new_tokens=5, stop_strings=[" York"]):
        stopped = gpt2.generator.output.save()
    expected = hf_generate(gpt2, PROMPT_1, 5, stop_strings=[" York"], tokenizer=gpt2.tokenizer)
    assert gpt2.tokenizer.decode(stopped[0]).endswith("New York") and stopped[0].tolist() == expected


def test_decode_steps_feed_one_token_and_the_cache(lm):
    """The prompt is computed once: each later step sees one new token per row, the cache one longer."""
    embed = lm._model.get_input_embeddings()
    path = next(p for p, m in lm._model.named_modules() if m is embed)
    envoy = lm
    for part in path.split("."):
        envoy = getattr(envoy, part)
    with lm.generate(max_new_tokens=N) as tracer:
        with tracer.invoke([PROMPT_1, HELLO]):
            shapes = fxpatch.save([])
            masks = fxpatch.save([])
            for _step in tracer.all():
                shapes.append(envoy.output.shape)
                masks.append(lm.inputs[1]["attention_mask"].shape)  # the model's own mask input
    width = len(token_ids(lm, PROMPT_1))
    hidden = embed.weight.shape[1]
    assert shapes == [torch.Size([2, width, hidden])] + [torch.Size([2, 1, hidden])] * (N - 1)
    # the mask covers the cache and the new token: one longer each step
    assert masks == [torch.Size([2, width + step]) for step in range(N)]


def _eos_for(lm) -> int:
    """The id of PROMPT_1's second new token (not the pad token on either model): as EOS, it ends
    PROMPT_1's row after 2 new tokens."""
    return hf_generate(lm, PROMPT_1, N)[len(token_ids(lm, PROMPT_1)) + 1]


def _finishes_first(lm, prompts: list[str], alone: list[list[int]], eos: int) -> None:
    """The premise: the first row (PROMPT_1) ends with EOS after 2 tokens, and another row goes on longer."""
    assert prompts[0] == PROMPT_1
    new = [len(seq) - len(token_ids(lm, p)) for seq, p in zip(alone, prompts)]
    assert new[0] == 2 and alone[0][-1] == eos and max(new[1:]) > 2, new


def test_rows_that_finish_early(lm):
    """A row that generates EOS stops; it is filled as transformers' batched generate fills it
    (with the pad token of the generation config, else EOS), while the other rows go on."""
    eos = _eos_for(lm)
    prompts = [PROMPT_1, EIFFEL, HELLO]
    with lm.generate(max_new_tokens=N, eos_token_id=eos) as tracer:
        for p in prompts:
            with tracer.invoke(p):
                pass
        result = tracer.result.save()

    alone = [hf_generate(lm, p, N, eos_token_id=eos) for p in prompts]
    _finishes_first(lm, prompts, alone, eos)
    # transformers' own batched generate on the same left-padded batch, same settings: the fill token
    rows = [token_ids(lm, p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[lm.pad_token_id] * (width - len(r)) + r for r in rows], device=lm.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=lm.device)
    with torch.no_grad():
        hf_batch = lm._model.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False, eos_token_id=eos)
    fill = hf_batch[0, -1].item()
    assert_tokens(lm, hf_batch, expected_batch(lm, prompts, alone, fill=fill), "HF batched (test premise)")
    assert_tokens(lm, result, hf_batch.tolist())


def test_min_new_tokens(lm):
    """``min_new_tokens`` keeps EOS away until then, as in transformers."""
    eos = _eos_for(lm)
    prompts = [PROMPT_1, HELLO]
    settings = {"eos_token_id": eos, "min_new_tokens": 3}
    with lm.generate(max_new_tokens=N, **settings) as tracer:
        with tracer.invoke(PROMPT_1):
            pass
        with tracer.invoke(HELLO):
            pass
        result = tracer.result.save()

    alone = [hf_generate(lm, p, N, **settings) for p in prompts]
    _finishes_first(lm, prompts, [hf_generate(lm, p, N, eos_token_id=eos) for p in prompts], eos)
    assert alone[0] != hf_generate(lm, PROMPT_1, N, eos_token_id=eos), "min_new_tokens changes nothing here"
    assert_tokens(lm, result, expected_batch(lm, prompts, alone))


def test_repetition_penalty(lm):
    """``repetition_penalty`` changes the tokens as in transformers."""
    repeat = "_ _ _ _ _ _ _ _ _ _"  # 10 tokens, so no left padding in its row: the penalty sees only the prompt
    prompts = [repeat, HELLO]
    with lm.generate(max_new_tokens=N, repetition_penalty=3.0) as tracer:
        with tracer.invoke(repeat):
            pass
        with tracer.invoke(HELLO):
            pass
        result = tracer.result.save()

    alone = [hf_generate(lm, p, N, repetition_penalty=3.0) for p in prompts]
    assert alone[0] != hf_generate(lm, repeat, N), "the penalty changes nothing here"
    assert_tokens(lm, result, expected_batch(lm, prompts, alone))


# -- bad input ---------------------------------------------------------------------------------------------
def line_of(tag: str) -> int:
    """The line number of the one line of this file that ends with the marker ``# line: <tag>``."""
    hits = [i + 1 for i, text in enumerate(_SOURCE) if text.rstrip().endswith("# line: " + tag)]
    assert len(hits) == 1, f"marker {tag!r} found on lines {hits}"
    return hits[0]


def check_message(err: Exception, tag: str, *words: str) -> None:
    """``err``'s message starts with this file's ``path:line`` of ``tag`` and says ``words``."""
    msg = str(err)
    first = msg.splitlines()[0]
    match = re.match(r"(.+?):(\d+): ", first)
    assert match, f"no file:line at the start of:\n{msg}"
    assert os.path.samefile(match.group(1), __file__), msg
    assert int(match.group(2)) == line_of(tag), f"expected line {line_of(tag)} ({tag}), got:\n{msg}"
    for word in words:
        assert word.lower() in msg.lower(), f"{word!r} missing from:\n{msg}"


def check_clean(lm, before: dict) -> None:
    """After an error: no trace left open, no hook or weight changed."""
    assert active_tracer() is None
    assert_state_unchanged(lm, before)


def test_step_beyond_max_new_tokens(lm):
    envoys, _ = layers(lm)
    before = state(lm)
    with pytest.raises(FxpatchError) as info:
        with lm.generate(PROMPT_1, max_new_tokens=3) as tracer:
            for _ in tracer.iter[5]:  # line: iter-5
                envoys[0].output[:, -1] = 0
    check_message(info.value, "iter-5", "5", "max_new_tokens")
    with pytest.raises(FxpatchError) as info:
        with lm.generate(PROMPT_1, max_new_tokens=3) as tracer:
            for _ in tracer.iter[[0, 3]]:  # line: iter-list
                envoys[0].output[:, -1] = 0
    check_message(info.value, "iter-list", "3", "max_new_tokens")
    check_clean(lm, before)


def test_generator_output_in_a_trace(lm):
    before = state(lm)
    with pytest.raises(FxpatchError) as info:
        with lm.trace(PROMPT_1):
            lm.generator.output.save()  # line: generator-in-trace
    check_message(info.value, "generator-in-trace", "generate")
    check_clean(lm, before)


def test_assignment_that_fits_only_the_prompt_pass(lm):
    """Embeddings of 10 tokens fit the prompt pass of a 10-token prompt, not a decode step (1 token)."""
    envoys, _ = layers(lm)
    embed = lm.transformer.wte if hasattr(lm._model, "transformer") else lm.model.embed_tokens
    with torch.no_grad():
        embeddings = lm._model.get_input_embeddings()(torch.tensor([token_ids(lm, PROMPT_1)], device=lm.device))
    assert embeddings.shape[1] == 10 == len(token_ids(lm, "_ _ _ _ _ _ _ _ _ _"))
    before = state(lm)
    with pytest.raises(ShapeError) as info:
        with lm.generate("_ _ _ _ _ _ _ _ _ _", max_new_tokens=3) as tracer:
            for _ in tracer.all():
                embed.output = embeddings  # line: decode-shape
    check_message(info.value, "decode-shape", "shape")
    check_clean(lm, before)
    # the prompt pass may have run before the error: a later generation is unaffected
    with lm.generate(HELLO, max_new_tokens=N):
        out = lm.generator.output.save()
    assert_tokens(lm, out, [hf_generate(lm, HELLO, N)])


@pytest.mark.parametrize("kwargs", [{}, {"max_new_tokens": 0}, {"max_new_tokens": -2}, {"max_new_tokens": None}],
                         ids=["missing", "zero", "negative", "none"])
def test_max_new_tokens_missing_or_below_one(lm, kwargs):
    before = state(lm)
    with pytest.raises(InputError) as info:
        with lm.generate(PROMPT_1, **kwargs):  # line: max-new-tokens
            lm.generator.output.save()
    check_message(info.value, "max-new-tokens", "max_new_tokens")
    check_clean(lm, before)


@pytest.mark.parametrize("settings", [{"do_sample": True, "temperature": -1.0}, {"no_such_setting": 1}],
                         ids=["negative-temperature", "unknown-kwarg"])
def test_generation_settings_transformers_rejects(lm, settings):
    """The error carries transformers' own message (from its plain generate) and the user's line."""
    ids = torch.tensor([token_ids(lm, PROMPT_1)], device=lm.device)
    with pytest.raises((ValueError, TypeError)) as hf_info:
        lm._model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, **settings)
    hf_message = str(hf_info.value).strip()
    assert hf_message
    before = state(lm)
    with pytest.raises(FxpatchError) as info:
        with lm.generate(PROMPT_1, max_new_tokens=3, **settings):  # line: bad-settings
            lm.generator.output.save()
    check_message(info.value, "bad-settings", hf_message)
    check_clean(lm, before)


def test_decode_graph_touches_the_cache_only_through_the_models_own_update(lm):
    """No per-step copy of the cache beyond transformers' own: each incoming key/value tensor
    feeds exactly one concatenation (the model's cache update), and nothing clones or copies."""
    sg = lm.site_graph("decode")
    graph = sg.graph_module.graph
    cache = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith(("keys_", "values_"))]
    assert len(cache) == 2 * len(layers(lm)[1])
    for node in cache:
        uses = [u.target for u in node.users if u.target is not torch.ops.aten.sym_size.int]
        assert uses == [torch.ops.aten.cat.default], (node.name, uses)
    assert not [n for n in graph.nodes if "clone" in str(n.target) or "copy" in str(n.target)]


def test_negative_step_is_counted_from_the_end(gpt2):
    with gpt2.generate(PROMPT_1, max_new_tokens=3) as tracer:
        for _step in tracer.iter[-1]:
            last = gpt2.lm_head.output[:, -1].argmax(dim=-1).save()
        out = gpt2.generator.output.save()
    assert last.tolist() == out[:, -1].tolist()  # the token chosen at the last step


def test_a_generation_config_object_is_used(gpt2):
    from transformers import GenerationConfig

    york = gpt2.tokenizer(" York")["input_ids"]
    config = GenerationConfig(do_sample=False, bad_words_ids=[york])
    with gpt2.generate(PROMPT_1, max_new_tokens=4, generation_config=config):
        out = gpt2.generator.output.save()
    assert_tokens(gpt2, out, [hf_generate(gpt2, PROMPT_1, 4, bad_words_ids=[york])])
    assert out[0].tolist() != hf_generate(gpt2, PROMPT_1, 4)  # the config's ban changed the tokens


def test_each_step_names_the_graph_it_ran(gpt2):
    with gpt2.generate(PROMPT_1, max_new_tokens=4) as tracer:
        for _step in tracer.iter[2:4]:
            gpt2.transformer.h[0].output[:, -1] = 0
    graphs = tracer.graphs
    assert sorted(graphs) == [0, 1, 2, 3] and tracer.graph is graphs[0]
    assert graphs[2] is graphs[3] and graphs[1] is not graphs[2]  # same program, one rewritten graph
    assert [r["role"] for r in fxpatch.runner.inserted_nodes(graphs[2])].count("scatter") == 1
    assert not fxpatch.runner.inserted_nodes(graphs[1])


def test_an_earlier_steps_value_changed_in_place_at_a_later_step_is_refused_at_its_line(gpt2):
    """``acc += h`` at step 1 on a value of step 0: each step's graph takes it as an input it cannot change for
    the steps after, so it is refused at that line, naming where the value was computed and how to write it
    (``acc = acc + h``, which gives eager's sum)."""
    h1 = gpt2.transformer.h[1]
    with pytest.raises(ShapeError) as info:
        with gpt2.generate(PROMPT_1, max_new_tokens=3) as tracer:
            acc = h1.output[0, -1].clone()  # line: step-0-value
            for _ in tracer.iter[1:3]:
                acc += h1.output[0, -1]  # line: later-in-place
            acc.save()
    msg = str(info.value)
    assert msg.startswith(f"{__file__}:{line_of('later-in-place')}: a value computed at an earlier step"), msg
    assert f"{__file__}:{line_of('step-0-value')}" in msg and "acc = acc + h" in msg, msg
    with gpt2.generate(PROMPT_1, max_new_tokens=3) as tracer:
        acc = h1.output[0, -1].clone()
        for _ in tracer.iter[1:3]:
            acc = acc + h1.output[0, -1]
        total = acc.save()
    seen: list = []
    hf_generate(gpt2, PROMPT_1, 3, capture=(gpt2._model.transformer.h[1], seen))
    torch.testing.assert_close(total, sum(s[0] for s in seen), rtol=1e-5, atol=1e-5)


def test_lists_filled_per_step_hold_only_the_steps_that_ran(gpt2):
    """A generation that ends at EOS before ``max_new_tokens``: a list filled in ``tracer.all()`` (made before
    the block, NNsight's idiom, or saved inside it) holds one value per step that ran, as NNsight's loop
    appends only then and HF's forward runs only then; values are those of HF ``generate`` with a hook."""
    h1 = gpt2.transformer.h[1]
    acts = []
    with gpt2.generate(EIFFEL, max_new_tokens=6) as tracer:
        saved = list().save()
        for _ in tracer.all():
            acts.append(h1.output[:, -1])
            saved.append(h1.output[0, -1].save())
    seen: list = []
    hf_generate(gpt2, EIFFEL, 6, capture=(gpt2._model.transformer.h[1], seen))
    assert 1 < len(seen) < 6  # it did end early
    assert len(acts) == len(saved) == len(seen)
    for step, (a, s, want) in enumerate(zip(acts, saved, seen)):
        torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        torch.testing.assert_close(s, want[0], rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert torch.stack(acts).shape == (len(seen), 1, gpt2.config.n_embd)
