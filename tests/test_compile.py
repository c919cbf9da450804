"""``compile=True``: the rewritten graph runs through torch.compile and gives the eager values.

Compiling costs seconds per graph on this CPU, so this file keeps to two small programs; the
whole differential suite compiled is under the ``slow`` marker.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from fxpatch import LanguageModel
from fxpatch.errors import FxpatchError
from fxpatch.runner import compiled
from fxpatch.segments import Chain
from tests.conftest import PROMPT_1, PROMPT_2, assert_state_unchanged, skip_compiled_generation_before_torch_2_13, state
from tests.markers import Markers
from tests.reference import run_alone, run_on_batch, unpad


def patch(model, source, target, compile):
    with model.trace(compile=compile) as tracer:
        with tracer.invoke(source):
            h = model.transformer.h[1].output[:, -1]
        with tracer.invoke(target):
            model.transformer.h[1].output[:, -1] = h * 2
        with tracer.invoke():
            logits = model.lm_head.output.save()
    return tracer, logits


def assert_patch_is_the_hooked_models(lm, source, target, logits) -> None:
    """``patch``'s logits of ``target`` equal the plain model's, alone, with ``source``'s doubled value in a hook."""
    src = run_alone(lm, source, capture=["transformer.h.1"]).outputs["transformer.h.1"][:, -1]

    def edit(out):
        out = out.clone()
        out[:, -1] = src * 2
        return out

    ref = run_alone(lm, target, outputs={"transformer.h.1": edit})
    torch.testing.assert_close(unpad(logits, 1, len(ref.ids)), ref.logits, atol=1e-5, rtol=1e-5)


def test_compiled_trace_equals_eager_and_the_hooked_model(gpt2):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters  # global, counting earlier tests' compiles too
    breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    tracer, compiled = patch(gpt2, PROMPT_1, "hello", compile=True)
    # one graph: the per-layer segments a Chain calls are traced into it, not run eagerly behind a break
    assert any(isinstance(m, Chain) for m in tracer.graph.modules())
    assert sum(counters["graph_break"].values()) == breaks
    assert counters["stats"]["unique_graphs"] == graphs + 1
    eager_tracer, eager = patch(gpt2, PROMPT_1, "hello", compile=False)
    assert tracer.graph is eager_tracer.graph  # one rewritten graph; compiled is how it runs
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert_patch_is_the_hooked_models(gpt2, PROMPT_1, "hello", compiled)
    # another prompt length runs the same compiled graph (dynamic sizes)
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    _, again = patch(gpt2, "The Eiffel Tower is in Paris", PROMPT_2, compile=True)
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames
    _, again_eager = patch(gpt2, "The Eiffel Tower is in Paris", PROMPT_2, compile=False)
    torch.testing.assert_close(again, again_eager, atol=1e-5, rtol=1e-5)


def test_compiled_linears_run_onednns_gemm_on_the_weights_as_they_are_at_each_run(gpt2, monkeypatch):
    """With its size limit at 0, every linear of the tiny GPT-2 runs oneDNN's GEMM when compiled
    (fxpatch/passes/onednn_linear.py): the patch equals the hooked model, and a weight changed through
    ``.data`` (which its version counter does not see) is the one the next run of the same compiled graph
    uses."""
    import copy

    from fxpatch.passes.onednn_linear import available
    from fxpatch.passes.ops import ONEDNN_LINEAR_OP

    if not available():
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr("fxpatch.passes.onednn_linear.MIN_NUMEL", 0)
    torch._dynamo.reset()
    hf = copy.deepcopy(gpt2._model)
    model = LanguageModel(hf, tokenizer=gpt2.tokenizer, compile=True)
    plain = LanguageModel(hf, tokenizer=gpt2.tokenizer)  # the hooked reference runs ``plain._model``: hf

    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    tracer, logits = patch(model, PROMPT_1, "hello", compile=True)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks  # the segments recompiled
    nodes = [n for m in compiled_graph(tracer).modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]
    # every Conv1D and the head (layers of one form share a segment module, looked at once)
    assert sum(n.target is ONEDNN_LINEAR_OP for n in nodes) >= 4 + 1
    assert not [n for n in nodes if n.target in (torch.ops.aten.addmm.default, torch.ops.aten.linear.default)]
    assert_patch_is_the_hooked_models(plain, PROMPT_1, "hello", logits)
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    with torch.no_grad():
        hf.transformer.h[0].mlp.c_fc.weight.data[:, :8] = 0
        hf.lm_head.weight.data.mul_(0.5)  # tied: the token embeddings too
    _, logits = patch(model, PROMPT_1, "hello", compile=True)
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames
    assert_patch_is_the_hooked_models(plain, PROMPT_1, "hello", logits)


def test_a_graph_the_compiler_cannot_build_is_an_error_at_the_trace_that_says_to_run_eagerly(gpt2, monkeypatch):
    """torch.compile's backend failing on a rewritten graph (as inductor's C++ code for generation's masks does
    on the CPU before torch 2.13) is an FxpatchError at the trace's line, with torch's error chained, and
    the model as it was; the same trace with compile=False gives the hooked model's values."""
    real_compile = torch.compile

    def failing_backend(gm, example_inputs):
        raise RuntimeError("main.cpp:164: error: 'tmp5' was not declared in this scope")

    monkeypatch.setattr(torch, "compile", lambda gm, dynamic=None, mode=None: real_compile(
        gm, dynamic=dynamic, backend=failing_backend))
    torch._dynamo.reset()
    gpt2.cache_clear()  # a graph compiled before would not go to the backend again
    before = state(gpt2)
    try:
        with pytest.raises(FxpatchError) as info:
            with gpt2.trace(PROMPT_1, compile=True):  # line: uncompilable
                logits = gpt2.lm_head.output.save()
    finally:
        monkeypatch.undo()
        gpt2.cache_clear()  # the graph holds the failing compiled form: later tests get a new one
        torch._dynamo.reset()
    message = str(info.value)
    line = Markers(__file__).line_of("uncompilable")
    assert message.startswith(f"{__file__}:{line}: torch.compile could not compile the rewritten graph: "
                              "RuntimeError: main.cpp:164: error: 'tmp5' was not declared in this scope"), message
    assert "run it with compile=False" in message and "torch 2.13" in message
    assert isinstance(info.value.__cause__, torch._dynamo.exc.BackendCompilerFailed)
    assert_state_unchanged(gpt2, before)
    with gpt2.trace(PROMPT_1, compile=False):
        logits = gpt2.lm_head.output.save()
    torch.testing.assert_close(logits[0], run_alone(gpt2, PROMPT_1).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compile_set_on_the_model_applies_to_generate(tokenizer):
    import fxpatch

    skip_compiled_generation_before_torch_2_13(torch.device("cpu"))
    model = LanguageModel(fxpatch.TINY_GPT2, compile=True)
    with model.generate(PROMPT_1, max_new_tokens=3) as tracer:
        model.transformer.h[0].output[:, -1] *= 0.5
        out = tracer.result.save()
    with model.generate(PROMPT_1, max_new_tokens=3, compile=False) as tracer:
        model.transformer.h[0].output[:, -1] *= 0.5
        ref = tracer.result.save()
    assert torch.equal(out, ref)


def test_a_compiled_patch_at_a_negative_position_of_a_reshaped_value_is_the_hooked_models(opt):
    """OPT's layer output is its (rows * tokens, hidden) residual viewed as (rows, tokens, hidden). Compiled,
    inductor used to read ``h[:, -1]`` of it through that view at an offset it computes with C's ``%``: memory
    before the tensor, another wrong value at each run (fxpatch/passes/count_from_end.py). Three runs of
    the compiled patch each equal the plain model with the patch in a hook, on the same batch."""
    torch._dynamo.reset()
    model = LanguageModel(opt._model, tokenizer=opt.tokenizer, compile=True)
    layer = model.model.decoder.layers[0]

    def hook(module, args, output):
        output[1, -1] = output[0, -1] * 2.0

    for _ in range(3):
        with torch.no_grad(), model.trace() as tracer:
            with tracer.invoke(PROMPT_1):
                h = layer.output[:, -1]
            with tracer.invoke("hello"):
                layer.output[:, -1] = h * 2.0
            with tracer.invoke():
                logits = model.lm_head.output.save()
        with torch.no_grad():
            expected = run_on_batch(opt, tracer.batch, [(opt._model.model.decoder.layers[0], hook)])
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


IN_PLACE_THROUGH_VIEWS = {
    "unflatten, transpose, select": "t = h.unflatten(2, (2, -1)).transpose(2, 3)[..., 0]\nt.add_(t * 0.5)",
    "narrow, unflatten, transpose, select": "t = h.narrow(1, h.shape[1] - 1, 1).unflatten(2, (2, -1))"
                                            ".transpose(2, 3)[..., 0]\nt.add_(t * 0.5)",
    "permute, select": "t = h.permute(2, 0, 1)[:, :, -1]\nt.mul_(-1.0)",
    "unfold, select": "t = h[0, -1].unfold(0, 4, 4)[:, 1]\nt.fill_(2.0)",
}


def running(code: str):
    """A hook edit that runs ``code`` on the output as ``h`` and returns ``h`` as the code leaves it."""
    def edit(out):
        scope = {"h": out}
        exec(code, scope)
        return scope["h"]
    return edit


@pytest.mark.parametrize("body", IN_PLACE_THROUGH_VIEWS, ids=list(IN_PLACE_THROUGH_VIEWS))
def test_the_compile_only_passes_keep_in_place_writes_through_views_at_a_position(gpt2, monkeypatch, body):
    """An in-place write through views indexed at a program's position: the functionalized graph writes the
    new values back through the views' inverses, and replays ``view``s that hold only for eager's layout (a
    contiguous copy of the indexed tensor, which a compile-only pass once made, made the ``view`` back to
    ``(1, 1, 96)`` fail: found by the random fuzz, compiled). The compile-only passes' graph runs here
    eagerly (torch.compile replaced by the graph itself, so no inductor) and equals the plain model with the
    same code in a hook."""
    monkeypatch.setattr(torch, "compile", lambda gm, **kwargs: gm)
    model = LanguageModel(gpt2._model, tokenizer=gpt2.tokenizer, compile=True)
    code = IN_PLACE_THROUGH_VIEWS[body]
    with torch.no_grad(), model.trace(PROMPT_1):
        exec(code, {"h": model.transformer.h[1].output})
        logits = model.lm_head.output[:, -1].save()
    with torch.no_grad():
        expected = run_alone(gpt2, PROMPT_1, outputs={"transformer.h.1": running(code)}).logits[-1]
    torch.testing.assert_close(logits[0], expected, atol=1e-5, rtol=1e-5)


def compiled_graph(tracer) -> torch.fx.GraphModule:
    """The graph ``compile=True`` hands torch.compile for the trace's rewritten graph (after its passes); the
    graph itself where a test replaced torch.compile by it."""
    (fn,) = tracer.graph.__dict__["_fxpatch_compiled"].values()
    return getattr(fn, "_orig_mod", fn)


def test_a_compiled_write_of_an_outside_tensor_at_a_position_equals_eager(gpt2):
    """An outside tensor indexed at a program's position (``v[:, p]``) is a graph input: compiled, its read at
    p = -1 fused into the write read memory before it (fxpatch/passes/count_from_end.py). Compiled equals
    eager for p = -1."""
    torch._dynamo.reset()
    compiled = LanguageModel(gpt2._model, tokenizer=gpt2.tokenizer, compile=True)
    v = torch.randn(1, 7, gpt2._model.config.n_embd)

    def run(model):
        with torch.no_grad(), model.trace(PROMPT_1):
            model.transformer.h[0].output[:, -1] = v[:, -1]
            logits = model.lm_head.output.save()
        return logits

    torch.testing.assert_close(run(compiled), run(gpt2), atol=1e-5, rtol=1e-5)


def test_compiled_reads_of_a_few_positions_logits_equal_the_hooked_model_and_compute_no_others(gpt2):
    """Reading ``lm_head.output`` at positions in each invoke, compiled, runs the head once, on those rows
    alone (fxpatch/passes/index_before_linear.py); every read equals the plain model's, alone, with the
    patch in a hook."""
    torch._dynamo.reset()
    model = LanguageModel(gpt2._model, tokenizer=gpt2.tokenizer, compile=True)
    prompts = [PROMPT_1, "hello", "The Eiffel Tower is in Paris"]
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(prompts[0]):
            h = model.transformer.h[1].output[:, -1]
            first = model.lm_head.output[:, -1].save()
        with tracer.invoke(prompts[1]):
            model.transformer.h[1].output[:, -1] = h * 2
            second = model.lm_head.output[:, -1].save()
        with tracer.invoke(prompts[2]):
            third = model.lm_head.output[0][-3:-1].save()
    src = run_alone(gpt2, prompts[0], capture=["transformer.h.1"]).outputs["transformer.h.1"][:, -1]

    def edit(out):
        out = out.clone()
        out[:, -1] = src * 2
        return out

    torch.testing.assert_close(first[0], run_alone(gpt2, prompts[0]).logits[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second[0], run_alone(gpt2, prompts[1], outputs={"transformer.h.1": edit}).logits[-1],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(third, run_alone(gpt2, prompts[2]).logits[-3:-1], atol=1e-5, rtol=1e-5)
    graph = compiled_graph(tracer)
    # one linear on the three reads' rows (concatenated: the weight read once), none over every row and position
    heads = [n for n in graph.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(heads) == 1 and heads[0].args[0].target is torch.ops.aten.cat.default, graph.code
    for flat in heads[0].args[0].args[0]:
        assert flat.args[0].target in (torch.ops.aten.select.int, torch.ops.aten.slice.Tensor), flat.format_node()


def test_a_compiled_program_that_only_reads_runs_the_head_on_its_positions_and_a_tensor_index_on_all(gpt2):
    """A program that only reads keeps an invoke's rows and ``[:, p]`` as they are written; compiled, they move
    above the head where ``p`` is fed an int, and not where a tensor is (it can be a mask reaching the last
    dim): the graph is compiled per set of inputs fed ints. Both equal the plain model alone."""
    torch._dynamo.reset()
    model = LanguageModel(gpt2._model, tokenizer=gpt2.tokenizer, compile=True)
    prompts = [PROMPT_1, "hello", "The Eiffel Tower is in Paris"]

    def run(index):
        outs = []
        with torch.no_grad(), model.trace() as tracer:
            for prompt in prompts:
                with tracer.invoke(prompt):
                    outs.append(model.lm_head.output[:, index].save())
        for prompt, out in zip(prompts, outs):
            torch.testing.assert_close(out.reshape(-1, out.shape[-1])[0], run_alone(gpt2, prompt).logits[-1],
                                       atol=1e-5, rtol=1e-5)
        return tracer.graph

    def head_input(graph, numbers=None):
        fn = compiled(graph, None, True, numbers) if numbers is not None else one(graph._fxpatch_compiled.values())
        (head,) = [n for n in fn._orig_mod.graph.nodes if n.target is torch.ops.aten.linear.default]
        return head.args[0]

    def one(values):
        (value,) = values
        return value

    by_int = run(-1)
    rows = head_input(by_int)
    assert rows.target is torch.ops.aten.cat.default and len(rows.args[0]) == 3
    assert head_input(by_int, ()).target is not torch.ops.aten.cat.default  # compiled as if no input were an int
    assert head_input(run(torch.tensor([-1]))).target is not torch.ops.aten.cat.default


def test_compiled_reads_at_negative_positions_through_a_flattened_view_equal_the_hooked_model(gpt2):
    """Found by the random compiled fuzz: ``split(16, dim=2)[1].flatten(1)[:, p:]`` of a replaced layer output
    gave values near 1e35 for a negative ``p`` (fxpatch/passes/count_from_end.py: inductor took the
    position as a symbol it assumes non-negative). Positions -24, -3 and 5, and the same read stopped at -1,
    each equal the plain model's layer output, replaced in a hook, read the same way. The eager graph is one
    for all three (the program's numbers are data); compiled, it has two forms: one for both negative
    positions, counted from the end of their dim (fxpatch/passes/count_from_end.py), one for 5."""
    torch._dynamo.reset()
    model = LanguageModel(gpt2._model, tokenizer=gpt2.tokenizer, compile=True)
    replaced = run_alone(gpt2, PROMPT_1, outputs={"transformer.h.0": lambda out: torch.relu(out) * -0.25},
                         capture=["transformer.h.0"]).outputs["transformer.h.0"]
    for p in (-24, -3, 5):
        with torch.no_grad(), model.trace(PROMPT_1) as tracer:
            layer = model.transformer.h[0]
            layer.output = torch.relu(layer.output) * -0.25
            value = layer.output.split(16, dim=2)[1].flatten(1)[:, p:][-1].save()
            stopped = layer.output.flatten(1)[:, p:-1].save()
        expected = replaced.split(16, dim=2)[1].flatten(1)[:, p:][-1]
        torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stopped, replaced.flatten(1)[:, p:-1], atol=1e-5, rtol=1e-5)
    forms = tracer.graph.__dict__["_fxpatch_compiled"]
    assert len(forms) == 2 and [len(key[4]) for key in forms] == [3, 1]  # p twice and -1 from the end; then -1


def test_compiled_writes_at_the_same_negative_positions_in_two_invokes_equal_the_hooked_model(gpt2):
    """Found by the random compiled fuzz, when negative positions were fed to the compiled graph negated:
    inductor's code named a symbol it never bound (``NameError: name 's78' is not defined``) for writes
    ``[:, -2:, -8:]`` in two invokes. Each invoke's last logits equal the plain model's, alone, with the same
    code in a hook."""
    torch._dynamo.reset()
    model = LanguageModel(gpt2._model, tokenizer=gpt2.tokenizer, compile=True)
    first = ("h[:, -2:, -8:] = h[:, -2:, :8] * -0.25 + -1.0\nh = h * 1.5 + 0.25")
    second = ("h[:, -2:, -8:] = h[:, -2:, -8:] * 0.5 + 0.25\nu = h.clone()\n"
              "t = u.view(u.shape[0], u.shape[1], 4, -1)[:, :, 1].movedim(-1, 0).movedim(-1, 0)\nt.fill_(0.5)\nh = u")
    layer = model.transformer.h[0]
    logits = []
    with torch.no_grad(), model.trace() as tracer:
        for code in (first, second):
            with tracer.invoke("_ _ _"):
                scope = {"h": layer.output}
                exec(code, scope)
                layer.output = scope["h"]
                logits.append(model.lm_head.output[:, -1].save())
    for code, value in zip((first, second), logits):
        with torch.no_grad():
            expected = run_alone(gpt2, "_ _ _", outputs={"transformer.h.0": running(code)}).logits[-1]
        torch.testing.assert_close(value[0], expected, atol=1e-5, rtol=1e-5)


def test_a_compiled_loop_over_negative_positions_compiles_once_and_reads_each_right(gpt2):
    """A position counted from the end is an input of the compiled graph (as a non-negative one is): a loop
    over -2 ... -11 of a 12-token prompt compiles one graph, whose every read and write equals the plain
    model's with a hook. (At -1 the write's ``h[:, -1:]`` is one position, and torch guards a size of 1
    apart; -12 slices from 0, a guard of its own: each would compile once more.)"""
    torch._dynamo.reset()
    model = LanguageModel(gpt2._model, tokenizer=gpt2.tokenizer, compile=True)
    prompt = [5, 17, 42, 8, 99, 3, 61, 7, 11, 4, 23, 70]  # token ids
    layer = run_alone(gpt2, prompt, capture=["transformer.h.0"]).outputs["transformer.h.0"]
    frames = []
    for p in range(-2, -12, -1):
        with torch.no_grad(), model.trace(prompt):
            h = model.transformer.h[0].output
            value = h[:, p].clone().save()  # a view would see the write below, as in eager torch
            h[:, p:] = h[:, p:] * 2
            doubled = model.transformer.h[0].output.clone().save()
        torch.testing.assert_close(value, layer[:, p], atol=1e-5, rtol=1e-5)
        want = layer.clone()
        want[:, p:] *= 2
        torch.testing.assert_close(doubled, want, atol=1e-5, rtol=1e-5)
        frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert frames[0] >= 1 and frames[-1] == frames[0], frames


def test_a_loop_over_negative_ints_that_are_not_only_positions_keeps_at_most_16_compiled_forms(gpt2, monkeypatch):
    """A negative int the graph cannot count from the end (a position after a tensor index, ``h[rows, p]``)
    is a constant of a compiled form of its own (fxpatch/passes/specialize_negative_ints.py); a loop over 20
    of them keeps the 16 made last, and every read equals the plain model's. torch.compile is replaced by the
    graph itself (no inductor), so the forms are the graphs the compile-only passes make."""
    monkeypatch.setattr(torch, "compile", lambda gm, **kwargs: gm)
    model = LanguageModel(gpt2._model, tokenizer=gpt2.tokenizer, compile=True)
    prompt = " ".join(["word"] * 20)
    layer = run_alone(gpt2, prompt, capture=["transformer.h.0"]).outputs["transformer.h.0"]
    rows = torch.tensor([0])
    for p in range(-1, -21, -1):
        with torch.no_grad(), model.trace(prompt) as tracer:
            value = model.transformer.h[0].output[rows, p].save()
        torch.testing.assert_close(value, layer[rows, p], atol=1e-6, rtol=1e-6)
    forms = tracer.graph.__dict__["_fxpatch_compiled"]
    assert len(forms) == 16
    assert [dict(key[3]).popitem()[1] for key in forms] == list(range(-5, -21, -1))
