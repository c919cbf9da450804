"""NNsight 0.8's run-control and model API: ``tracer.result``, ``model.output``, ``model.inputs``,
``TransformersModel`` / ``LanguageModel``, ``rename=``, ``model.scan``, ``tracer.stop()`` and
``module.skip(value)``.

Each test starts from the example NNsight's docs give for the feature and runs on the tiny GPT-2
and the tiny Llama (``lm``). Values are checked against the plain HF model run prompt by prompt
with ordinary hooks (``tests.reference``); for ``stop`` and ``skip`` the test also counts, in
``tracer.graph``, the ops the export attributes to the stopped-after or skipped modules
(``nn_module_stack``), so a computation that still ran would fail it.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import fxpatch
from fxpatch import LanguageModel, TransformersModel
from fxpatch.errors import FxpatchError, InputError, ModuleNotRunError, ShapeError
from tests.conftest import PROMPT_1, assert_state_unchanged, state
from tests.reference import paths, run_alone, token_ids, unpad
from tests.test_differential import close, envoy

EIFFEL = "The Eiffel Tower is in Paris"  # 9 tokens
HELLO = "hello"  # 3 tokens
_SOURCE = open(__file__, encoding="utf-8").read().splitlines()


def line_of(tag: str) -> int:
    hits = [i + 1 for i, text in enumerate(_SOURCE) if text.rstrip().endswith("# line: " + tag)]
    assert len(hits) == 1, f"marker {tag!r} found on lines {hits}"
    return hits[0]


def check_at(err: Exception, tag: str, *words: str) -> None:
    """``err`` is an ``FxpatchError`` starting with this file's line marked ``tag`` and saying ``words``."""
    assert isinstance(err, FxpatchError), type(err)
    msg = str(err)
    where = msg.splitlines()[0].split(": ", 1)[0]
    path, _, lineno = where.rpartition(":")
    assert os.path.samefile(path, __file__) and lineno == str(line_of(tag)), f"expected line {line_of(tag)}:\n{msg}"
    for word in words:
        assert word.lower() in msg.lower(), f"{word!r} missing from:\n{msg}"


def ops_in(tracer, path: str) -> int:
    """How many ops of ``tracer.graph`` (and of the segments it calls) the export attributes to the module
    at ``path`` or one inside it (computations: the export's dtype asserts on a value the module receives
    are not counted)."""
    count = 0
    gm = tracer.graph
    calls = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    for node in [n for g in [gm, *(s for c in calls for s in getattr(c, "segments", ()))] for n in g.graph.nodes]:
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        if stack and node.target is not torch.ops.aten._assert_tensor_metadata.default:
            where = stack[-1][0].removeprefix("model.")  # the export's wrapper holds the model at .model
            count += where == path or where.startswith(path + ".")
    return count


def hf_output(lm, prompt: str):
    """The plain HF model's output object for ``prompt`` alone (as the trace runs it: no KV cache)."""
    ids = torch.tensor([token_ids(lm, prompt)], device=lm.device)
    with torch.no_grad():
        return lm._model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


# -- tracer.result, model.output, model.inputs ---------------------------------------------------------


def test_tracer_result_is_the_models_output(lm):
    """NNsight: ``with model.trace("...") as tracer: output = tracer.result.save()``. In an invoke it is the
    invoke's rows (as in NNsight), outside every invoke the whole batch."""
    with lm.trace(EIFFEL) as tracer:
        output = tracer.result.save()
    expected = hf_output(lm, EIFFEL)
    assert type(output) is type(expected) and list(output.keys()) == list(expected.keys()) == ["logits"]
    close(output.logits, expected.logits, "tracer.result.logits")
    assert output[0] is output.logits and output["logits"] is output.logits

    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            first = tracer.result.save()
        with tracer.invoke([HELLO, EIFFEL]):
            second = tracer.result.logits.save()
        whole = tracer.result.save()
    refs = [run_alone(lm, p) for p in (PROMPT_1, HELLO, EIFFEL)]
    assert first.logits.shape[0] == 1 and second.shape[0] == 2 and whole.logits.shape[0] == 3
    close(unpad(first.logits, 0, len(refs[0].ids)), refs[0].logits, "invoke 1's result")
    for row, ref in enumerate(refs[1:]):
        close(unpad(second, row, len(ref.ids)), ref.logits, f"invoke 2's result row {row}")
    for row, ref in enumerate(refs):
        close(unpad(whole.logits, row, len(ref.ids)), ref.logits, f"whole result row {row}")


def test_tracer_result_after_the_block_is_an_error(gpt2):
    with gpt2.trace(HELLO) as tracer:
        gpt2.lm_head.output.save()
    with pytest.raises(FxpatchError) as err:
        _ = tracer.result  # line: result-after
    check_at(err.value, "result-after", "only available inside", "save")


def test_model_output_is_the_hf_output_object(lm):
    """NNsight: ``output = model.output.save()``: the root module's output, its class and fields."""
    p = paths(lm)
    with lm.trace(PROMPT_1):
        envoy(lm, p.layer(0)).output[:, -1] = 0  # the output follows interventions
        output = lm.output.save()
        logits = lm.output.logits[:, -1].save()
    ref = run_alone(lm, PROMPT_1, outputs={p.layer(0): lambda o: torch.cat([o[:, :-1], 0 * o[:, -1:]], 1)})
    expected = hf_output(lm, PROMPT_1)
    assert type(output) is type(expected) and list(output.keys()) == list(expected.keys())
    close(output.logits[0], ref.logits, "model.output.logits")
    close(logits[0], ref.logits[-1], "model.output.logits[:, -1]")
    assert not torch.allclose(output.logits, expected.logits)  # the intervention changed it


def test_model_inputs_as_nnsight_gives_them(lm):
    """NNsight passes ``input_ids`` and ``attention_mask``, and ``position_ids`` counted from each row's first
    token when the batch is left-padded: nothing else (fxpatch's own ``use_cache=False`` is not shown)."""
    with lm.trace(EIFFEL):
        inputs = lm.inputs.save()
        first = lm.input.save()
    args, kwargs = inputs
    ids = torch.tensor([token_ids(lm, EIFFEL)], device=lm.device)
    assert args == () and list(kwargs) == ["input_ids", "attention_mask"]
    assert torch.equal(kwargs["input_ids"], ids) and torch.equal(kwargs["attention_mask"], torch.ones_like(ids))
    assert torch.equal(first, ids)

    with lm.trace() as tracer:
        with tracer.invoke(HELLO):
            short = lm.inputs.save()
        with tracer.invoke(EIFFEL):
            long = lm.inputs.save()
    width = len(token_ids(lm, EIFFEL))
    for (args, kwargs), prompt in ((short, HELLO), (long, EIFFEL)):
        n = len(token_ids(lm, prompt))
        assert args == () and list(kwargs) == ["input_ids", "attention_mask", "position_ids"]
        assert kwargs["input_ids"].shape == (1, width)
        assert kwargs["input_ids"][0, width - n:].tolist() == token_ids(lm, prompt)
        assert kwargs["attention_mask"][0].tolist() == [0] * (width - n) + [1] * n
        assert kwargs["position_ids"][0, width - n:].tolist() == list(range(n))  # as if the prompt ran alone


# -- TransformersModel, LanguageModel, rename ----------------------------------------------------------


def test_transformers_model_and_language_model(lm):
    """``TransformersModel(repo_or_module, task="text-generation")`` is the name; ``LanguageModel`` the alias."""
    assert fxpatch.TransformersModel is TransformersModel and fxpatch.LanguageModel is LanguageModel
    model = TransformersModel(lm._model, tokenizer=lm.tokenizer, task="text-generation")
    old = LanguageModel(lm._model, tokenizer=lm.tokenizer, tokenizer_kwargs={"padding_side": "left"})
    assert isinstance(old, TransformersModel) and model.task == old.task == "text-generation"
    for m in (model, old):
        with m.trace(HELLO) as tracer:
            out = tracer.result.logits.save()
        close(out[0], run_alone(lm, HELLO).logits, f"{type(m).__name__} logits")
    with pytest.raises(InputError) as err:
        TransformersModel(lm._model, tokenizer=lm.tokenizer, task="fill-mask")  # line: task
    check_at(err.value, "task", "task='fill-mask'", "text-generation")


def test_transformers_model_loads_by_path():
    model = TransformersModel(fxpatch.TINY_GPT2, task="text-generation")
    with model.trace(PROMPT_1):
        logits = model.lm_head.output.save()
    assert model.tokenizer.decode(logits[0, -1].argmax()) == " York"


def test_rename_aliases(lm):
    """NNsight: ``rename={"transformer.h": "layers"}``; one dict serves both architectures (a key that does
    not resolve is skipped), one-component keys bind in every layer, aliases index like names."""
    rename = {"transformer.h": "layers", "model.layers": "layers", "attn": "attention", "self_attn": "attention",
              "0": "first"}
    model = TransformersModel(lm._model, tokenizer=lm.tokenizer, rename=rename)
    p = paths(lm)
    assert model.layers[1]._path == p.layer(1) and model.layers[1].attention._path == p.attn(1)
    assert model.layers["first"]._module is lm._model.get_submodule(p.layer(0))
    assert envoy(model, p.layer(0)).attention._path == p.attn(0)  # aliases bind on the module, whatever the path
    with model.trace(PROMPT_1):
        model.layers.first.output[:, -1] = 0
        attn = model.layers[1].attention.output[0].save()
        logits = model.lm_head.output.save()
    ref = run_alone(lm, PROMPT_1, outputs={p.layer(0): lambda o: torch.cat([o[:, :-1], 0 * o[:, -1:]], 1)},
                    capture=[p.attn(1)])
    close(attn, ref.outputs[p.attn(1)][0], "attention output through the aliases")
    close(logits[0], ref.logits, "logits after a write through an alias")


@pytest.mark.parametrize("rename, words", [
    ({"transformer.h": "generation_config"}, ["'generation_config'", "attribute of the GPT2LMHeadModel"]),
    ({"transformer.h": "output"}, ["'output'", ".output"]),
    ({"transformer.*": "x"}, ["matches 5 modules", "wte"]),
    ({"transformer.wte": "emb", "transformer.wpe": "emb"}, ["already bound", "transformer.wte"]),
    ({"attn.c_proj": "mlp.o_proj"}, ["names no ancestor"]),
])
def test_rename_refuses_what_nnsight_refuses(gpt2, rename, words):
    with pytest.raises(InputError) as err:
        TransformersModel(gpt2._model, tokenizer=gpt2.tokenizer, rename=rename)  # line: rename
    check_at(err.value, "rename", *words)


def test_rename_dotted_alias_and_class_key(gpt2):
    attention = type(gpt2._model.transformer.h[0].attn)
    model = TransformersModel(gpt2._model, tokenizer=gpt2.tokenizer,
                              rename={"attn.c_proj": "attn.o_proj", attention: "A", "*.h": "blocks"})
    assert model.blocks[1].A.o_proj._path == "transformer.h.1.attn.c_proj"
    assert model.transformer.h[0].attn.o_proj._module is gpt2._model.transformer.h[0].attn.c_proj


# -- scan --------------------------------------------------------------------------------------------------


def test_scan_gives_fake_values_of_the_runs_shapes(lm):
    """NNsight: ``with model.scan("Hello World"): hidden = model.transformer.h[0].output.shape``: the values
    are fake tensors with the shapes, dtypes and devices a trace of the same program gives."""
    p = paths(lm)

    def program(ctx):
        with ctx as tracer:
            with tracer.invoke(HELLO):
                hidden = envoy(lm, p.layer(0)).output.save()
                shape = envoy(lm, p.layer(0)).output.shape.save()
            with tracer.invoke([PROMPT_1, EIFFEL]):
                envoy(lm, p.mlp(0)).output = envoy(lm, p.mlp(0)).output * 2
                attn = envoy(lm, p.attn(1)).output.save()
                output = lm.output.save()
        return hidden, shape, attn, output

    before = state(lm)
    fake = program(lm.scan())
    real = program(lm.trace())
    assert_state_unchanged(lm, before)
    hidden, shape, attn, output = fake
    assert isinstance(hidden, FakeTensor) and isinstance(attn[0], FakeTensor) and isinstance(output.logits, FakeTensor)
    assert shape == real[1] == real[0].shape and isinstance(shape, torch.Size)
    for got, want in ((hidden, real[0]), (attn[0], real[2][0]), (output.logits, real[3].logits)):
        assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device)
    assert attn[1] is None and type(output) is type(real[3])
    assert (hidden + 1).shape == hidden.shape  # ops on them give fake tensors again


def test_scan_checks_shapes_without_running(lm):
    p = paths(lm)
    with pytest.raises(ShapeError) as err:
        with lm.scan(PROMPT_1) as tracer:
            envoy(lm, p.layer(0)).output = torch.zeros(3, 4, device=lm.device)  # line: scan-shape
    check_at(err.value, "scan-shape", "does not fit")
    assert tracer.graph is None
    # a scan runs on fake tensors: an outside tensor changed after its use is no reason to refuse it, as a
    # trace is refused (its program would see the changed value)
    v = torch.zeros(lm._model.config.hidden_size)
    with lm.scan(PROMPT_1):
        envoy(lm, p.layer(0)).output[:, -1] = v
        shape = envoy(lm, p.layer(0)).output.shape.save()
        v += 1
    assert shape[-1] == v.shape[0]


# -- stop ------------------------------------------------------------------------------------------------


def test_stop_ends_the_forward_pass(lm):
    """NNsight: ``hidden = model.transformer.h[0].output.save(); tracer.stop()``: the value is the model's, the
    code after the stop does not run, and nothing after layer 0 is in the graph that ran."""
    p = paths(lm)
    before = state(lm)
    ran_after = False
    with lm.trace(PROMPT_1) as tracer:
        hidden = envoy(lm, p.layer(0)).output.save()
        tracer.stop()
        ran_after = True
    assert not ran_after
    close(hidden, run_alone(lm, PROMPT_1, capture=[p.layer(0)]).outputs[p.layer(0)], "layer 0 output")
    assert ops_in(tracer, p.layer(0)) > 0
    assert ops_in(tracer, p.layer(1)) == 0 and ops_in(tracer, p.head) == 0
    assert_state_unchanged(lm, before)

    # the same without stop(): the graph ends at the last value used, too; reading the output runs it all
    with lm.trace(PROMPT_1) as plain:
        envoy(lm, p.layer(0)).output.save()
    assert ops_in(plain, p.layer(1)) == 0 and ops_in(plain, p.head) == 0
    with lm.trace(PROMPT_1) as full:
        envoy(lm, p.layer(0)).output.save()
        lm.output.save()
    assert ops_in(full, p.layer(1)) > 0 and ops_in(full, p.head) > 0


def test_stop_in_one_invoke(lm):
    """NNsight runs the other invokes' code up to the point the model stopped at: a value computed before
    it is read, one after it is an error (NNsight: OutOfOrderError), at that invoke's line."""
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            late = envoy(lm, p.layer(1)).output.save()
            tracer.stop()
        with tracer.invoke(EIFFEL):
            early = envoy(lm, p.layer(0)).output.save()
    close(unpad(late, 0, 10), run_alone(lm, PROMPT_1, capture=[p.layer(1)]).outputs[p.layer(1)][0], "invoke 1")
    close(unpad(early, 0, 9), run_alone(lm, EIFFEL, capture=[p.layer(0)]).outputs[p.layer(0)][0], "invoke 2")
    assert ops_in(tracer, p.head) == 0

    with pytest.raises(FxpatchError) as err:
        with lm.trace() as tracer:
            with tracer.invoke(PROMPT_1):
                envoy(lm, p.layer(0)).output.save()
                tracer.stop()
            with tracer.invoke(EIFFEL):
                envoy(lm, p.layer(1)).output.save()  # line: after-stop
    check_at(err.value, "after-stop", "stops", "tracer.stop()")


def test_stop_is_refused_in_generate(gpt2):
    with pytest.raises(FxpatchError) as err:
        with gpt2.generate(HELLO, max_new_tokens=2) as tracer:
            tracer.stop()  # line: gen-stop
    check_at(err.value, "gen-stop", "stop")


# -- skip ------------------------------------------------------------------------------------------------


def _input_of(lm, path: str, prompt: str) -> torch.Tensor:
    args, kwargs = run_alone(lm, prompt, capture=[path]).inputs[path]
    return args[0] if args else next(iter(kwargs.values()))


def test_skip_layer(lm):
    """NNsight: ``model.transformer.h[0].skip(model.transformer.h[0].input); output = model.output.save()``.
    Every invoke skips layer 0 (NNsight's requirement), so none of its ops is in the graph."""
    p = paths(lm)
    layer0 = envoy(lm, p.layer(0))
    before = state(lm)
    with lm.trace(PROMPT_1) as tracer:
        layer0.skip(layer0.input)
        skipped = layer0.output.save()
        output = lm.output.save()
    x = _input_of(lm, p.layer(0), PROMPT_1)
    ref = run_alone(lm, PROMPT_1, outputs={p.layer(0): lambda o: x})
    close(skipped, x, "the skipped layer's output is the value")
    close(output.logits[0], ref.logits, "logits")
    assert not torch.allclose(ref.logits, run_alone(lm, PROMPT_1).logits)
    assert ops_in(tracer, p.layer(0)) == 0 and ops_in(tracer, p.layer(1)) > 0
    assert_state_unchanged(lm, before)

    with lm.trace() as tracer:  # two invokes, each its own value
        with tracer.invoke(PROMPT_1):
            layer0.skip(layer0.input)
            first = lm.output.logits.save()
        with tracer.invoke(EIFFEL):
            layer0.skip(layer0.input * 0.5)
            second = lm.output.logits.save()
    y = _input_of(lm, p.layer(0), EIFFEL)
    close(unpad(first, 0, 10), ref.logits, "invoke 1")
    close(unpad(second, 0, 9), run_alone(lm, EIFFEL, outputs={p.layer(0): lambda o: y * 0.5}).logits, "invoke 2")
    assert ops_in(tracer, p.layer(0)) == 0


def test_skip_in_one_invoke_only(lm):
    """NNsight refuses a skip that not every invoke makes; fxpatch gives the skipping invoke's rows the value
    and lets the other rows compute as usual (the module then runs for the batch)."""
    p = paths(lm)
    mlp = envoy(lm, p.mlp(1))
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            mlp.skip(mlp.input * 0)
            first = lm.lm_head.output.save()
        with tracer.invoke(EIFFEL):
            second = lm.lm_head.output.save()
    close(unpad(first, 0, 10), run_alone(lm, PROMPT_1, outputs={p.mlp(1): lambda o: o * 0}).logits, "skipping rows")
    close(unpad(second, 0, 9), run_alone(lm, EIFFEL).logits, "other rows")
    assert ops_in(tracer, p.mlp(1)) > 0


def test_skip_attention_tuple_output(lm):
    """A module whose output is a tuple is skipped with a value of the same structure."""
    p = paths(lm)
    attn = envoy(lm, p.attn(0))
    with lm.trace(PROMPT_1) as tracer:
        hidden = envoy(lm, p.layer(0)).input
        attn.skip((hidden * 0, None))
        logits = lm.lm_head.output.save()
    ref = run_alone(lm, PROMPT_1, outputs={p.attn(0): lambda o: (o[0] * 0, *o[1:])})
    close(logits[0], ref.logits, "logits")
    assert ops_in(tracer, p.attn(0)) == 0 and ops_in(tracer, p.mlp(0)) > 0
    with pytest.raises(FxpatchError) as err:
        with lm.trace(PROMPT_1):
            attn.skip(envoy(lm, p.layer(0)).input)  # line: skip-structure
    check_at(err.value, "skip-structure", "tuple of 2")


def test_skip_errors(lm):
    p = paths(lm)
    layer0 = envoy(lm, p.layer(0))
    with pytest.raises(ModuleNotRunError) as err:
        with lm.trace(PROMPT_1):
            layer0.skip(layer0.input)
            envoy(lm, p.mlp(0)).output.save()  # line: inside-skipped
    check_at(err.value, "inside-skipped", p.mlp(0), "skips", "never computed")
    with pytest.raises(FxpatchError) as err:
        with lm.trace(PROMPT_1):
            envoy(lm, p.layer(1)).output.save()
            layer0.skip(layer0.input)  # line: skip-late
    check_at(err.value, "skip-late", "after", p.layer(1))
    with pytest.raises(FxpatchError) as err:
        with lm.trace(PROMPT_1):
            layer0.skip(envoy(lm, p.layer(1)).output)  # line: skip-value-late
    check_at(err.value, "skip-value-late", "after", p.layer(1))
    with pytest.raises(FxpatchError) as err:
        with lm.trace() as tracer:
            with tracer.invoke(PROMPT_1):
                later = envoy(lm, p.layer(1)).output
            with tracer.invoke(PROMPT_1):
                layer0.skip(later)  # line: skip-value-other-invoke
    check_at(err.value, "skip-value-other-invoke", "computed from", p.layer(1))
    with pytest.raises(FxpatchError) as err:
        with lm.generate(PROMPT_1, max_new_tokens=2):
            layer0.skip(layer0.input)  # line: skip-generate
    check_at(err.value, "skip-generate", "model.trace()")
