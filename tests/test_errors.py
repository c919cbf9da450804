"""Every user mistake fxpatch promises to catch: right error type, located at the user's line, before anything runs.

For each bad input the test checks that the error

- has the documented type (``fxpatch.errors``) and a message starting with this file's ``path:line`` of
  the offending line (found through a ``# line: TAG`` marker, so editing this file never breaks it),
  plus the other lines involved and key words of what is wrong and what to do;
- is raised before the model runs (see ``count_runs``);
- leaves the model as it was (weights, hooks) and later traces unaffected (same logits as before).
"""

from __future__ import annotations

import contextlib
import os
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fxpatch import LanguageModel
from fxpatch.active import active_tracer
from fxpatch.errors import (
    BarrierError,
    ControlFlowError,
    FlowError,
    FxpatchError,
    InputError,
    ModuleNotRunError,
    ModulePathError,
    ProxyScopeError,
    ShapeError,
)
from fxpatch.proxy import Proxy
from tests.conftest import PROMPT_1, PROMPT_2, assert_state_unchanged, count_checks, layers, module_calls, state
from tests.reference import paths, run_alone

SHORT = "_ _ _"  # 3 tokens; PROMPT_1 and PROMPT_2 have 10
_SOURCE = open(__file__, encoding="utf-8").read().splitlines()


# -- helpers -----------------------------------------------------------------------------------------
def line_of(tag: str) -> int:
    """The line number of the one line of this file that ends with the marker ``# line: <tag>``."""
    hits = [i + 1 for i, text in enumerate(_SOURCE) if text.rstrip().endswith("# line: " + tag)]
    assert len(hits) == 1, f"marker {tag!r} found on lines {hits}"
    return hits[0]


def check_message(err: Exception, tag: str, *words: str, also: tuple[str, ...] = ()) -> None:
    """``err`` starts with this file's ``path:line`` of ``tag``, names the ``also`` lines and says ``words``."""
    msg = str(err)
    path, _, lineno = msg.splitlines()[0].split(": ", 1)[0].rpartition(":")
    assert os.path.basename(path) == os.path.basename(__file__) and os.path.samefile(path, __file__), msg
    assert lineno == str(line_of(tag)), f"expected line {line_of(tag)} ({tag}), got:\n{msg}"
    for other in also:
        assert re.search(rf"test_errors\.py:{line_of(other)}\b", msg), f"line of {other!r} missing:\n{msg}"
    for word in words:
        assert word.lower() in msg.lower(), f"{word!r} missing from:\n{msg}"


def embed(lm: LanguageModel):
    """The token-embedding envoy: ``transformer.wte`` (GPT-2) or ``model.embed_tokens`` (Llama)."""
    return lm.transformer.wte if hasattr(lm._model, "transformer") else lm.model.embed_tokens


def reference_logits(lm: LanguageModel) -> tuple[torch.Tensor, torch.Tensor]:
    """A normal two-invoke trace (prompts of different lengths, so padding is involved)."""
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            a = lm.lm_head.output.save()
        with tracer.invoke(SHORT):
            b = lm.lm_head.output.save()
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return a, b


@contextlib.contextmanager
def count_runs():
    """Records every module call while active.

    The exported graph does not call the user's modules, but it runs as ``gm(*inputs)`` through
    ``nn.Module.__call__`` (``module_calls``), and an eager fallback would call the user's modules.
    Checking shapes (FakeTensorProp) interprets the graph node by node and calls no module, and the export
    is done (cached) before this is used, so any recorded call means the model ran.
    ``test_count_runs_sees_a_normal_trace`` shows that it does see a run.
    """
    with module_calls() as calls:
        yield calls


@contextlib.contextmanager
def raises_cleanly(lm: LanguageModel, error_type: type[BaseException]):
    """Like ``pytest.raises(error_type)`` (exact type), and the model neither ran nor changed."""
    before = state(lm)
    logits_before = reference_logits(lm)  # also exports the model before runs are counted
    with count_runs() as runs:
        with pytest.raises(Exception) as info:
            yield info
    assert type(info.value) is error_type, f"expected {error_type.__name__}, got {type(info.value).__name__}: " \
        f"{info.value}"
    assert runs == [], f"the model ran before the error: {[type(m).__name__ for m in runs]}"
    assert active_tracer() is None, "a failed trace is still active"
    assert_state_unchanged(lm, before)
    for after, ref in zip(reference_logits(lm), logits_before):
        torch.testing.assert_close(after, ref, rtol=0, atol=0)


def test_count_runs_sees_a_normal_trace(gpt2):
    """The no-run check of ``raises_cleanly`` is only meaningful if it sees a run that does happen."""
    reference_logits(gpt2)
    with count_runs() as runs:
        reference_logits(gpt2)
    assert runs


# -- module paths --------------------------------------------------------------------------------------
def test_module_path_that_does_not_exist(lm):
    is_gpt2 = hasattr(lm._model, "transformer")
    with raises_cleanly(lm, ModulePathError) as info:
        with lm.trace(PROMPT_1):
            if is_gpt2:
                lm.transformer.hh[0].output.save()  # line: path-gpt2
            else:
                lm.model.layer[0].output.save()  # line: path-llama
    if is_gpt2:
        check_message(info.value, "path-gpt2", "'hh'", "did you mean", "'h'")
    else:
        check_message(info.value, "path-llama", "'layer'", "did you mean", "'layers'")


def test_module_index_out_of_range(lm):
    envoys, modules = layers(lm)
    with raises_cleanly(lm, ModulePathError) as info:
        with lm.trace(PROMPT_1):
            envoys[99].output.save()  # line: index
    check_message(info.value, "index", "99", "out of range", f"0 to {len(modules) - 1}")


@pytest.fixture(scope="module")
def unused_lm(tokenizer) -> LanguageModel:
    """A tiny GPT-2 of its own with an extra submodule that its forward never calls."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer))
    hf_model = GPT2LMHeadModel(config).eval()
    hf_model.transformer.unused = torch.nn.Linear(32, 32)
    return LanguageModel(hf_model, tokenizer=tokenizer)


def test_module_that_does_not_run(unused_lm):
    with raises_cleanly(unused_lm, ModuleNotRunError) as info:
        with unused_lm.trace(PROMPT_1):
            unused_lm.transformer.unused.output.save()  # line: not-run
    check_message(info.value, "not-run", "transformer.unused", "does not run", "pick a module that runs")


# -- barriers --------------------------------------------------------------------------------------------
def test_barrier_called_by_fewer_invokes(lm):
    with raises_cleanly(lm, BarrierError) as info:
        with lm.trace() as tracer:
            barrier = tracer.barrier(2)  # line: few-make
            with tracer.invoke(PROMPT_1):
                x = embed(lm).output
                barrier()  # line: few-call
            with tracer.invoke(PROMPT_2):
                embed(lm).output = x
    check_message(info.value, "few-make", "made for 2 invokes", "called by 1", "tracer.barrier(1)",
                  also=("few-call",))


def test_barrier_called_by_more_invokes(lm):
    with raises_cleanly(lm, BarrierError) as info:
        with lm.trace() as tracer:
            barrier = tracer.barrier(2)  # line: many-make
            with tracer.invoke(PROMPT_1):
                barrier()  # line: many-call-1
            with tracer.invoke(PROMPT_2):
                barrier()  # line: many-call-2
            with tracer.invoke(SHORT):
                barrier()  # line: many-call-3
    check_message(info.value, "many-call-3", "made for 2 invokes", "tracer.barrier(3)",
                  also=("many-make", "many-call-1", "many-call-2"))


# -- data flow -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_barrier", [True, False], ids=["barrier", "no-barrier"])
def test_value_flowing_backwards_between_invokes(lm, with_barrier):
    envoys, _ = layers(lm)
    with raises_cleanly(lm, FlowError) as info:
        with lm.trace() as tracer:
            barrier = tracer.barrier(2) if with_barrier else (lambda: None)
            with tracer.invoke(PROMPT_1):
                late = envoys[-1].output  # line: back-read
                barrier()
            with tracer.invoke(PROMPT_2):
                barrier()
                envoys[0].output = late  # line: back-write
    check_message(info.value, "back-write", "backwards", "save()", also=("back-read",))


@pytest.mark.parametrize("change", ["iadd", "copy_", "view"])
def test_outside_tensor_changed_in_place_after_its_use_is_refused(lm, change):
    """The block's code runs as it is recorded, the program at its end: a tensor from outside the trace
    changed in place after a line used it (also through a view of it) would give the program the changed
    value, where eager PyTorch and NNsight use the value at that line."""
    envoys, _ = layers(lm)
    v = torch.zeros(lm._model.config.hidden_size)
    with raises_cleanly(lm, FlowError) as info:
        with lm.trace(PROMPT_1):
            envoys[0].output[:, -1] = v  # line: outside-use
            envoys[-1].output.save()
            if change == "iadd":
                v += 1
            elif change == "copy_":
                v.copy_(torch.ones_like(v))
            else:
                v[:4].fill_(2.0)
    check_message(info.value, "outside-use", "changed in place after this line used it", "x.clone()",
                  "after the block")
    assert torch.count_nonzero(v) > 0  # the user's own change stands


@pytest.mark.parametrize("write", ["add_", "copy_"])
def test_a_traced_value_written_in_place_into_an_outside_tensor_is_refused(lm, write):
    """``outside.add_(h)`` in a program that also writes into a module's value: eager PyTorch would change
    the user's tensor at that line, where the program runs at the block's end and hands out new values
    only. Refused at the line (``_drop_snapshot_copies`` finds the write that functionalization copies back
    into the program's input), and the tensor is left as it was."""
    envoys, _ = layers(lm)
    outside = torch.zeros(4)
    with raises_cleanly(lm, ShapeError) as info:
        with lm.trace(PROMPT_1):
            h = envoys[0].output
            h[:, -1] = 0  # a write into a module's value: the program is functionalized
            getattr(outside, write)(h[0, 0, :4])  # line: outside-write
            envoys[-1].output.save()
    check_message(info.value, "outside-write", "in-place write changes a tensor made outside the trace",
                  ".clone()")
    assert torch.count_nonzero(outside) == 0


def test_a_write_at_a_position_computed_from_a_traced_value_is_refused_before_the_model_runs(lm):
    """``h[:, p] = 0`` with ``p`` made in the trace (an argmax): the write's position is a value of the run,
    which the check before the run does not have. Eager torch runs it, so the error says that, and what
    does run: ``index_fill_`` at ``p`` as a tensor, which equals the hooked model's write."""
    envoys, modules = layers(lm)
    with raises_cleanly(lm, ShapeError) as info:
        with lm.trace(PROMPT_1):
            p = envoys[0].output[0].sum(-1).argmax(-1)
            envoys[1].output[:, p] = 0  # line: traced-write
    check_message(info.value, "traced-write", "needs a number computed in the trace", "index_fill_")
    with lm.trace(PROMPT_1):
        envoys[1].output.index_fill_(1, envoys[0].output[0].sum(-1).argmax(-1).reshape(1), 0.0)
        logits = lm.lm_head.output.save()
    first = run_alone(lm, PROMPT_1, capture=[paths(lm).layer(0)]).outputs[paths(lm).layer(0)]
    position = int(first[0].sum(-1).argmax(-1))

    def write(out):
        out = out.clone()
        out[:, position] = 0
        return out

    torch.testing.assert_close(logits[0], run_alone(lm, PROMPT_1, outputs={paths(lm).layer(1): write}).logits,
                               atol=1e-5, rtol=1e-5)


def test_weights_changed_in_place_after_the_blocks_first_use_of_the_model_are_refused(lm):
    """NNsight runs the block interleaved with the forward pass, so a weight changed after a module value
    was read is changed after the modules before it ran; the trace's one pass at the block's end would run
    every module with the changed weight. Refused, at the block's first use of the model, before it runs."""
    envoys, modules = layers(lm)
    weight = next(modules[0].parameters())
    original = weight.detach().clone()
    reference_logits(lm)  # exported before runs are counted
    try:
        with count_runs() as runs:
            with pytest.raises(FlowError) as info:
                with torch.no_grad(), lm.trace(PROMPT_1):
                    h = envoys[1].output.save()  # line: weights-use
                    lm.lm_head(h).save()
                    weight.mul_(0.5)
        assert runs == []
        check_message(info.value, "weights-use", "weights or buffers", "changed in place",
                      "before the block's first use of the model")
    finally:
        with torch.no_grad():
            weight.copy_(original)


def test_a_buffer_replaced_inside_the_block_after_the_blocks_first_use_of_the_model_is_refused(llama):
    """A buffer replaced by another of the same shape (rotary ``inv_freq``, for another RoPE scaling) is no new
    export, but after the block's first use of the model NNsight's forward pass has run the modules before that
    line with the old buffer, which the trace's one pass would not. Refused as an in-place change is; replaced
    before the first use, it is the buffer every module runs with."""
    rotary = llama._model.model.rotary_emb
    original = rotary.inv_freq
    reference_logits(llama)  # exported before runs are counted
    try:
        with count_runs() as runs:
            with pytest.raises(FlowError) as info:
                with torch.no_grad(), llama.trace(PROMPT_1):
                    llama.model.layers[0].output.save()  # line: buffer-use
                    rotary.inv_freq = original * 0.5
        assert runs == []
        check_message(info.value, "buffer-use", "weights or buffers", "replaced")
        rotary.inv_freq = original
        with torch.no_grad(), llama.trace(PROMPT_1):
            rotary.inv_freq = original * 0.5  # before the block's first use of the model
            out = llama.lm_head.output.save()
        want = run_alone(llama, PROMPT_1).logits
        torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-5)
        rotary.inv_freq = original
        assert not torch.allclose(want, run_alone(llama, PROMPT_1).logits, rtol=1e-3, atol=1e-3)
    finally:
        rotary.inv_freq = original


def test_a_setting_changed_inside_the_block_is_refused(lm):
    """NNsight runs the forward pass as the block runs, so a module setting changed in the block applies
    to the modules the pass reaches after that line; the trace's one pass at the block's end would run the
    graph of the model as it was when the block began. Refused at the block's line, before the model runs."""
    envoys, modules = layers(lm)
    try:
        with raises_cleanly(lm, FlowError) as info:
            with lm.trace(PROMPT_1):  # line: changed-setting
                envoys[0].output.save()
                modules[1].scale_in_my_experiment = 2.0
                envoys[1].output.save()
        check_message(info.value, "changed-setting", "model was changed inside the block",
                      "before the `with` block")
    finally:
        del modules[1].scale_in_my_experiment


def test_a_hook_registered_inside_the_block_is_refused(lm):
    envoys, modules = layers(lm)
    reference_logits(lm)  # exported before runs are counted
    handle = None
    try:
        with count_runs() as runs, pytest.raises(FlowError) as info:
            with lm.trace(PROMPT_1):  # line: changed-hook
                envoys[0].output.save()
                handle = modules[1].register_forward_hook(lambda module, args, out: out)
                envoys[1].output.save()
        assert runs == []
        check_message(info.value, "changed-hook", "model was changed inside the block", "a hook")
    finally:
        if handle is not None:
            handle.remove()
    with lm.trace(PROMPT_1):  # the hook gone, the model is as it was: no error
        out = lm.lm_head.output.save()
    torch.testing.assert_close(out[0], run_alone(lm, PROMPT_1).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("write", ["relu-inplace", "out"])
def test_a_write_after_the_model_used_a_value_is_refused_when_only_torch_knows_it_is_in_place(lm, write):
    """A layer's output changed by an op that writes by its arguments alone (``inplace=True``, ``out=``),
    once the next layer's norm has used it: refused as a flow backwards, as ``h[...] = 0`` there is.
    (A functional run's value of a site at each point is not reused past an op that could change it.)"""
    envoys, _ = layers(lm)
    norm = "ln_1" if hasattr(lm._model, "transformer") else "input_layernorm"
    with raises_cleanly(lm, FlowError) as info:
        with lm.trace(PROMPT_1):
            h = envoys[0].output  # line: late-read
            getattr(envoys[1], norm).output.save()
            if write == "relu-inplace":
                torch.nn.functional.relu(h, inplace=True)  # line: late-relu
            else:
                torch.mul(h, 2.0, out=h)  # line: late-out
            envoys[1].output.mean().save()  # an op after it, at a later point, that torch alone knows writes nothing
    check_message(info.value, f"late-{write.split('-')[0]}", "already used it", "backwards")


def test_write_upstream_of_a_site_already_read(lm):
    envoys, _ = layers(lm)
    with raises_cleanly(lm, FlowError) as info:
        with lm.trace(PROMPT_1):
            envoys[-1].output.save()  # line: order-read
            envoys[0].output[:, -1] = 0  # line: order-write
    check_message(info.value, "order-write", "already read", "does not reorder", "write upstream sites before",
                  also=("order-read",))


# -- shapes ------------------------------------------------------------------------------------------------
def test_saved_value_of_other_length_assigned_to_site(lm):
    # Prompt 1 has 10 tokens, the later prompt 3: the saved embeddings cannot fit.
    with lm.trace(PROMPT_1):
        embeddings = embed(lm).output.save()
    width = embeddings.shape[-1]
    with raises_cleanly(lm, ShapeError) as info:
        with lm.trace(SHORT) as tracer:
            embed(lm).output = embeddings  # line: shape-later
    check_message(info.value, "shape-later", f"(1, 10, {width})", f"(1, 3, {width})", "does not fit",
                  "assign a value of that shape")
    assert tracer.graph is None  # set only once the shape check passed, right before the real run


@pytest.mark.parametrize("what", ["position", "length"])
def test_a_run_outside_the_symbolic_checks_guards_is_refused(lm, monkeypatch, what):
    """After a program shape has run at two sizes or positions, one check with symbolic ones stands for
    the later runs its guards allow. A position past the end of the prompt (or a prompt too short for
    the position) is outside them: that run is checked at its own shapes and refused before the model runs,
    at the user's line, as on a first run."""
    envoys, _ = layers(lm)
    calls = count_checks(monkeypatch)
    runs = [(PROMPT_1, 3), (PROMPT_2, 4), (PROMPT_1, 5)] if what == "position" else \
        [(PROMPT_1, 5), ("one two three four five six seven", 5), (PROMPT_2, 5)]
    for prompt, position in runs:
        calls.clear()
        with lm.trace(prompt):
            envoys[0].output[:, position] = 0
    # the third run was let through by a check with symbolic sizes (made by the second run, or by an
    # earlier test with this model), not checked at its own
    assert "check_program" not in calls, calls
    assert any(getattr(v, "symbolic", None) for v in lm._checked.values())
    prompt, position = (PROMPT_1, 12) if what == "position" else (SHORT, 5)
    calls.clear()
    with raises_cleanly(lm, ShapeError) as info:
        with lm.trace(prompt):
            envoys[0].output[:, position] = 0  # line: shape-guards
    assert calls[-1] == "check_program", calls
    check_message(info.value, "shape-guards", "fails on values of the shapes the run will have",
                  f"index {position} is out of bounds")


def test_value_of_other_rows_assigned_between_invokes(lm):
    # Two rows of invoke 1 into the one row of invoke 2 (same padded width): found before the run too.
    with raises_cleanly(lm, ShapeError) as info:
        with lm.trace() as tracer:
            with tracer.invoke([PROMPT_1, PROMPT_2]):
                embeddings = embed(lm).output
            with tracer.invoke(SHORT):
                embed(lm).output = embeddings  # line: shape-rows
    width = lm.config.hidden_size
    check_message(info.value, "shape-rows", f"(2, 10, {width})", f"(1, 10, {width})", "does not fit")
    assert tracer.graph is None


@pytest.mark.parametrize("other", ["dtype", "device"])
def test_value_of_other_dtype_or_device_assigned_to_site(lm, other):
    """``m.output = value`` hands ``value`` on as it is in eager PyTorch: in float64 (the layers after it
    would compute in float64 for this prompt) or on another device (they would fail) it is refused before
    the run, not converted."""
    width = lm.config.hidden_size
    elsewhere = "meta" if lm.device.type == "cpu" else "cpu"  # on a GPU run: a CPU tensor, the usual slip
    value = (torch.zeros(1, 10, width, dtype=torch.float64, device=lm.device) if other == "dtype"
             else torch.zeros(1, 10, width, device=elsewhere))
    with raises_cleanly(lm, ShapeError) as info:
        with lm.trace(PROMPT_1) as tracer:
            embed(lm).output = value  # line: other-dtype
    want = ("of dtype torch.float64", "of dtype torch.float32", "value.to(torch.float32)") if other == "dtype" \
        else (f"on {elsewhere}", f"on {lm.device}", f'value.to("{lm.device}")')
    check_message(info.value, "other-dtype", *want)
    assert tracer.graph is None
    # converted by the user, or written into the module's value (a copy converts), it runs
    with lm.trace(PROMPT_1):
        embed(lm).output[:] = torch.zeros(1, 10, width, dtype=torch.float64, device=lm.device)
        zeroed = embed(lm).output.save()
    assert zeroed.dtype == torch.float32 and not zeroed.any()


# -- Python values of proxies ------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["if", "item", "len", "int"])
def test_python_value_of_a_proxy(lm, what):
    envoys, _ = layers(lm)
    with raises_cleanly(lm, ControlFlowError) as info:
        with lm.trace(PROMPT_1):
            h = envoys[0].output
            if what == "if":
                if h.sum() > 0:  # line: control-if
                    h.save()
            elif what == "item":
                h.sum().item()  # line: control-item
            elif what == "len":
                len(h[0])  # line: control-len
            else:
                int(h[0, -1, 0])  # line: control-int
    words = {"if": ("control flow", "torch.where", ".save()"), "item": (".item()", ".save()"),
             "len": ("len()", "padded sequence width", ".shape"), "int": ("int()", ".save()")}[what]
    check_message(info.value, f"control-{what}", "until the model runs", *words)


# -- proxies out of their trace ------------------------------------------------------------------------------
def test_unsaved_proxy_used_in_a_later_trace(lm):
    envoys, _ = layers(lm)
    with lm.trace(PROMPT_1):
        h = envoys[0].output  # line: unsaved-record
    assert isinstance(h, Proxy)  # not saved, so not replaced by a value
    with raises_cleanly(lm, ProxyScopeError) as info:
        with lm.trace(PROMPT_2):
            envoys[1].output = h  # line: unsaved-use
    check_message(info.value, "unsaved-use", "not saved", ".save()", also=("unsaved-record",))


def test_unsaved_proxy_used_after_its_trace(lm):
    envoys, _ = layers(lm)
    with lm.trace(PROMPT_1):
        h = envoys[0].output
    with raises_cleanly(lm, ProxyScopeError) as info:
        h + 1  # line: unsaved-after
    check_message(info.value, "unsaved-after", "ended", ".save()")


def test_unsaved_proxy_of_one_model_used_in_another_models_trace(gpt2, llama):
    with gpt2.trace(PROMPT_1):
        h = gpt2.transformer.h[0].output  # line: other-record
    with raises_cleanly(llama, ProxyScopeError) as info:
        with llama.trace(PROMPT_1):
            llama.model.layers[0].output = h  # line: other-use
    check_message(info.value, "other-use", "not saved", ".save()", also=("other-record",))


def test_proxy_used_inside_another_models_trace(gpt2, llama):
    # Both models' state and later traces are checked: the outer trace fails too.
    before = state(gpt2)
    gpt2_logits = reference_logits(gpt2)
    with raises_cleanly(llama, ProxyScopeError) as info:
        with gpt2.trace(PROMPT_1):
            h = gpt2.transformer.h[0].output
            with llama.trace(PROMPT_1):  # line: nested-trace
                llama.model.layers[0].output = h  # line: nested-use
    # The offending line is the use of gpt2's value; fxpatch may also stop at the nested trace itself.
    tag = "nested-use" if str(info.value).split(": ", 1)[0].endswith(f":{line_of('nested-use')}") else "nested-trace"
    check_message(info.value, tag, "another", "trace")
    assert_state_unchanged(gpt2, before)
    for after, ref in zip(reference_logits(gpt2), gpt2_logits):
        torch.testing.assert_close(after, ref, rtol=0, atol=0)


# -- inputs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["invoke", "trace"])
def test_empty_prompt(lm, where):
    with raises_cleanly(lm, InputError) as info:
        if where == "invoke":
            with lm.trace() as tracer:
                with tracer.invoke(""):  # line: empty-invoke
                    lm.lm_head.output.save()
        else:
            with lm.trace(""):  # line: empty-trace
                lm.lm_head.output.save()
    check_message(info.value, f"empty-{where}", "empty", "no tokens", "at least one token")


def test_prompt_longer_than_the_context(lm):
    context = lm.max_length
    assert context == (lm.config.n_positions if hasattr(lm.config, "n_positions") else
                       lm.config.max_position_embeddings)
    text = " the" * (context + 1)
    n = len(lm.tokenizer(text)["input_ids"])
    assert n > context
    with raises_cleanly(lm, InputError) as info:
        with lm.trace() as tracer:
            with tracer.invoke(text):  # line: too-long
                lm.lm_head.output.save()
    check_message(info.value, "too-long", f"{n} tokens", f"context of {context}", f"at most {context} tokens")


def test_trace_without_inputs(lm):
    with raises_cleanly(lm, InputError) as info:
        with lm.trace():  # line: no-inputs
            pass
    check_message(info.value, "no-inputs", "no inputs", "pass a prompt")


@pytest.mark.parametrize("where", ["trace", "invoke", "dict", "negative"])
def test_token_id_outside_the_vocabulary(lm, where):
    vocab = lm._model.get_input_embeddings().num_embeddings
    ids = lm.tokenizer(SHORT)["input_ids"]
    with raises_cleanly(lm, InputError) as info:
        if where == "trace":
            with lm.trace(ids + [vocab]):  # line: vocab-trace
                lm.lm_head.output.save()
        elif where == "invoke":
            with lm.trace() as tracer:
                with tracer.invoke(PROMPT_1):
                    lm.lm_head.output.save()
                with tracer.invoke(torch.tensor([ids, ids[:-1] + [vocab + 7]])):  # line: vocab-invoke
                    lm.lm_head.output.save()
        elif where == "dict":
            with lm.trace({"input_ids": [[vocab] + ids], "attention_mask": [[1] * (len(ids) + 1)]}):  # line: vocab-dict
                lm.lm_head.output.save()
        else:
            with lm.trace([ids[0], -1] + ids[1:]):  # line: vocab-negative
                lm.lm_head.output.save()
    bad, row, position = {"trace": (vocab, 0, len(ids)), "invoke": (vocab + 7, 1, len(ids) - 1),
                          "dict": (vocab, 0, 0), "negative": (-1, 0, 1)}[where]
    check_message(info.value, f"vocab-{where}", f"prompt {row}", f"token id {bad} at position {position}",
                  f"vocabulary of {vocab} tokens", f"token ids from 0 to {vocab - 1}")


def test_largest_token_id_runs(lm):
    """The vocabulary check stops at the embedding's last row, not before: that id runs as the HF model runs it."""
    vocab = lm._model.get_input_embeddings().num_embeddings
    ids = [0, vocab - 1, 5]
    with lm.trace(ids):
        logits = lm.lm_head.output.save()
    torch.testing.assert_close(logits[0], run_alone(lm, ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mask", ["shorter", "more rows"])
def test_attention_mask_of_another_shape(lm, mask):
    encoding = lm.tokenizer([PROMPT_1], return_tensors="pt")
    n = encoding["input_ids"].shape[1]
    encoding["attention_mask"] = torch.ones((1, n - 1) if mask == "shorter" else (2, n), dtype=torch.long)
    with raises_cleanly(lm, InputError) as info:
        with lm.trace() as tracer:
            with tracer.invoke(encoding):  # line: mask-shape
                lm.lm_head.output.save()
    shape = (1, n - 1) if mask == "shorter" else (2, n)
    check_message(info.value, "mask-shape", f"attention_mask has shape {shape}", f"input_ids has shape (1, {n})",
                  "same shape as input_ids")


@pytest.mark.parametrize("where", ["trace", "invoke", "generate"])
def test_explicit_none_as_inputs(lm, where):
    """``None`` is refused as a prompt; leaving the argument out keeps the multi-invoke form."""
    with raises_cleanly(lm, InputError) as info:
        if where == "trace":
            with lm.trace(None):  # line: none-trace
                lm.lm_head.output.save()
        elif where == "invoke":
            with lm.trace() as tracer:
                with tracer.invoke(PROMPT_1):
                    lm.lm_head.output.save()
                with tracer.invoke(None):  # line: none-invoke
                    lm.lm_head.output.save()
        else:
            with lm.generate(None, max_new_tokens=2):  # line: none-generate
                lm.generator.output.save()
    check_message(info.value, f"none-{where}", "inputs are None", "pass a prompt", "leave the argument out")


def test_a_step_loop_used_as_a_block_says_to_loop(gpt2):
    """NNsight before 0.5 wrote ``with tracer.all():``; 0.8's (and fxpatch's) is ``for step in tracer.all():``."""
    with raises_cleanly(gpt2, FxpatchError) as info:
        with gpt2.generate(PROMPT_1, max_new_tokens=2) as tracer:
            with tracer.all():  # line: all-block
                gpt2.transformer.h[0].output.save()
    check_message(info.value, "all-block", "loops, not blocks", "for step in tracer.all():")


def test_trace_with_only_an_empty_invoke(lm):
    with raises_cleanly(lm, InputError) as info:
        with lm.trace() as tracer:  # line: empty-only
            with tracer.invoke():
                lm.lm_head.output.save()
    check_message(info.value, "empty-only", "no inputs", "pass a prompt")


# -- the user's own exceptions -----------------------------------------------------------------------------------
def test_user_exception_propagates_unchanged(lm):
    envoys, _ = layers(lm)
    boom = KeyError("boom")
    with raises_cleanly(lm, KeyError) as info:
        with lm.trace(PROMPT_1):
            h = envoys[0].output.save()
            raise boom
    assert info.value is boom
    assert isinstance(h, Proxy)  # nothing ran, so nothing was bound


def test_a_tensor_assigned_to_one_invokes_rows_and_changed_after_is_refused(lm):
    """``m.output = x`` in an invoke of some rows puts a copy of ``x`` into the batch, where a prompt run alone
    goes on with ``x`` itself: a later in-place write into ``x`` would be lost. Refused at the assignment."""
    envoys, _ = layers(lm)
    with raises_cleanly(lm, FlowError) as info:
        with lm.trace() as tracer:
            with tracer.invoke(PROMPT_1):
                x = envoys[1].output * 2
                envoys[1].output = x  # line: assigned-rows
                x[:, -1] = 0
            with tracer.invoke(SHORT):
                lm.lm_head.output.save()
    check_message(info.value, "assigned-rows", "changed in place after the assignment", "copy",
                  "before assigning")


@pytest.mark.parametrize("context", ["no_grad", "enable_grad", "inference_mode"])
def test_an_op_under_another_grad_mode_than_the_blocks_is_refused(lm, context):
    """One program runs in one grad mode; eager PyTorch records no autograd graph for the ops under
    ``torch.no_grad()`` only. An op recorded in another mode than the block's is refused at its line; reading
    a module value there is fine (it records nothing autograd would)."""
    envoys, _ = layers(lm)
    outer = torch.no_grad() if context == "enable_grad" else contextlib.nullcontext()
    inner = {"no_grad": torch.no_grad, "enable_grad": torch.enable_grad, "inference_mode": torch.inference_mode}
    with raises_cleanly(lm, FxpatchError) as info:
        with outer, lm.trace(PROMPT_1):
            with inner[context]():
                h = envoys[1].output
                h[:, -1] *= 2  # line: other-grad-mode
            lm.lm_head.output.save()
    check_message(info.value, "other-grad-mode", "grad mode", "around the whole", ".detach()")


def test_an_in_place_write_into_a_no_op_to_of_the_residual_stream_is_refused(llama):
    """In a float32 Llama, ``hidden_states.to(torch.float32)`` in the norm's forward returns the residual stream
    itself: a write into that ``.source`` value writes the residual in eager PyTorch (and NNsight), which the
    model adds again after attention. fxpatch's sites hold it apart, so the write is refused at its read."""
    norm = llama.model.layers[0].input_layernorm
    with raises_cleanly(llama, FlowError) as info:
        with llama.trace(PROMPT_1):
            norm.source.hidden_states_to_0.output[:, -1] = 0  # line: no-op-to
            llama.lm_head.output.save()
    check_message(info.value, "no-op-to", "same tensor as", "would change that value too", "assign a new value")


def test_an_in_place_write_into_a_dropouts_output_with_its_input_read_is_refused(gpt2):
    """Dropout outside training returns its input itself: writing into GPT-2's ``mlp.output`` writes
    ``mlp.c_proj.output`` in eager PyTorch. Where the program reads that value too, the write is refused;
    where it does not, the write runs and matches eager (nothing else sees the tensor)."""
    mlp = gpt2.transformer.h[0].mlp
    with raises_cleanly(gpt2, FlowError) as info:
        with gpt2.trace(PROMPT_1):
            mlp.c_proj.output.save()
            mlp.output[:, -1] = 1.0  # line: dropout-write
            gpt2.lm_head.output.save()
    check_message(info.value, "dropout-write", "mlp.output", "same tensor as")
    with gpt2.trace(PROMPT_1):
        mlp.output[:, -1] = 1.0
        logits = gpt2.lm_head.output[:, -1].save()

    def last_to_one(out):
        out[:, -1] = 1.0
        return out

    want = run_alone(gpt2, PROMPT_1, outputs={"transformer.h.0.mlp": last_to_one}).logits[-1]
    torch.testing.assert_close(logits[0], want, rtol=1e-5, atol=1e-5)


def test_a_tensor_assigned_to_one_invokes_rows_and_read_after_a_write_into_the_module_is_refused(lm):
    """After ``m.output = x`` in an invoke of some rows, a prompt's eager run has ``x`` as the module's value, so
    a write into ``m.output`` shows in ``x``; the batch holds a copy. ``x`` used after such a write is refused
    at the assignment."""
    envoys, _ = layers(lm)
    with raises_cleanly(lm, FlowError) as info:
        with lm.trace() as tracer:
            with tracer.invoke(PROMPT_1):
                x = envoys[1].output * 2
                envoys[1].output = x  # line: assigned-then-written
                envoys[1].output[:, -1] = 0  # line: module-written
                x.save()
            with tracer.invoke(SHORT):
                lm.lm_head.output.save()
    check_message(info.value, "assigned-then-written", "used after a write", "holds a copy", "m.output",
                  also=("module-written",))


@pytest.mark.parametrize("alias", ["view", "detach"])
def test_a_view_of_a_tensor_assigned_to_one_invokes_rows_used_after_a_write_into_the_module_is_refused(lm, alias):
    """The same through a view (or a detached tensor) taken before the assignment: in eager PyTorch
    ``v = x[:, -1]`` shares ``x``'s memory, so after the write into the module's value (which is ``x``) ``v`` is
    0 there; the batch's copy would leave ``v`` as it was (``v + 1`` off by up to 5.9 on the tiny GPT-2)."""
    envoys, _ = layers(lm)
    with raises_cleanly(lm, FlowError) as info:
        with lm.trace() as tracer:
            with tracer.invoke(PROMPT_1):
                x = envoys[1].output * 2
                v = x[:, -1] if alias == "view" else x.detach()
                envoys[1].output = x  # line: view-assigned
                envoys[1].output[:, -1] = 0  # line: view-module-written
                (v + 1).save()
            with tracer.invoke(SHORT):
                lm.lm_head.output.save()
    check_message(info.value, "view-assigned", "used after a write", "holds a copy", also=("view-module-written",))
