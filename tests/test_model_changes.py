"""The model as the user set it up: changed after its first trace, or spread over several devices.

A change of dtype, device, train/eval mode or module objects makes the next trace export the model again
(results are compared with the plain HF model run directly in its new state); weights edited in place are
used with no new export. A model on several devices is refused when it is wrapped. Each test builds its own
``LanguageModel``: the session fixtures are shared with other tests and must stay as they are.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

import fxpatch
import fxpatch.model
from fxpatch import LanguageModel
from fxpatch.errors import InputError
from fxpatch.model import model_fingerprint
from tests.conftest import PROMPT_1, tiny_llama
from tests.reference import run_alone, token_ids

SHORT = "_ _ _"


def fresh_gpt2() -> LanguageModel:
    return LanguageModel(AutoModelForCausalLM.from_pretrained(fxpatch.TINY_GPT2))


@pytest.fixture
def exports(monkeypatch) -> list[str]:
    """The run modes exported while the test runs."""
    calls: list[str] = []
    export = fxpatch.model.export_sites

    def counting(model, entry, *args, **kwargs):
        calls.append(type(entry).__name__)
        return export(model, entry, *args, **kwargs)

    monkeypatch.setattr(fxpatch.model, "export_sites", counting)
    return calls


def traced(lm: LanguageModel) -> list[torch.Tensor]:
    """Logits of PROMPT_1 and SHORT batched in one trace (SHORT left-padded), padding cut off."""
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            a = lm.lm_head.output.save()
        with tracer.invoke(SHORT):
            b = lm.lm_head.output.save()
    return [a[0], b[0, -len(token_ids(lm, SHORT)):]]


def direct(lm: LanguageModel) -> list[torch.Tensor]:
    """The same logits from the HF model itself, each prompt alone, in whatever state it is now."""
    with torch.no_grad():
        return [lm._model(torch.tensor([token_ids(lm, p)], device=lm.device)).logits[0] for p in (PROMPT_1, SHORT)]


def assert_logits(got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype, tol: float) -> None:
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == dtype
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


# -- dtype, device, modules and modes changed after the first trace ------------------------------------------------
def test_dtype_changes_export_again(exports):
    lm = fresh_gpt2()
    float32 = traced(lm)
    assert_logits(float32, direct(lm), torch.float32, 1e-5)
    assert exports == ["_Forward"]
    # changed behind the wrapper's back, on the HF model itself
    lm._model.to(torch.float64)
    assert_logits(traced(lm), direct(lm), torch.float64, 1e-10)
    assert exports == ["_Forward"] * 2
    # through the wrapper, which returns itself (NNsight's Envoy.to does too)
    assert lm.bfloat16() is lm and lm._model.dtype == torch.bfloat16
    bf16 = traced(lm)
    assert_logits(bf16, direct(lm), torch.bfloat16, 0.1)
    assert lm.half() is lm and lm._model.dtype == torch.float16
    assert_logits(traced(lm), direct(lm), torch.float16, 0.02)
    assert exports == ["_Forward"] * 4
    # the low-precision runs are the float32 model's numbers, roughly
    for low, full in zip(bf16, float32):
        torch.testing.assert_close(low.float(), full, rtol=0.05, atol=0.5)


def test_dtype_change_of_llama_exports_again(tokenizer, exports):
    lm = LanguageModel(tiny_llama(len(tokenizer)), tokenizer=tokenizer)
    assert_logits(traced(lm), direct(lm), torch.float32, 1e-5)
    assert lm.double() is lm
    assert all(b.dtype == torch.float64 for b in lm._model.buffers() if b.is_floating_point())
    assert_logits(traced(lm), direct(lm), torch.float64, 1e-10)
    assert exports == ["_Forward"] * 2


def test_replaced_submodule_is_used(exports):
    lm = fresh_gpt2()
    path = "transformer.h.0.mlp"
    before = traced(lm)
    old = lm._model.transformer.h[0].mlp
    torch.manual_seed(1)
    new = GPT2MLP(4 * lm.config.n_embd, lm.config).eval()
    assert not torch.equal(new.c_fc.weight, old.c_fc.weight)
    lm._model.transformer.h[0].mlp = new
    with lm.trace(PROMPT_1):
        mlp = lm.transformer.h[0].mlp.output.save()
        logits = lm.lm_head.output.save()
    ref = run_alone(lm, PROMPT_1, capture=[path])
    torch.testing.assert_close(mlp, ref.outputs[path], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[0], ref.logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits[0], before[0], atol=1e-2)  # the new module made a difference
    assert exports == ["_Forward"] * 2


def test_weights_edited_in_place_are_used_without_a_new_export(exports):
    lm = fresh_gpt2()
    before = traced(lm)
    mlp = lm._model.transformer.h[0].mlp
    with torch.no_grad():
        mlp.c_fc.weight.mul_(2)
        mlp.c_proj.bias.data = mlp.c_proj.bias.data + 0.5  # a new tensor of the same kind in the same Parameter
    # moves to where the model already is change nothing
    assert lm.to("cpu") is lm and lm.float() is lm and lm.cpu() is lm
    after = traced(lm)
    for got, prompt in zip(after, (PROMPT_1, SHORT)):
        torch.testing.assert_close(got, run_alone(lm, prompt).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after[0], before[0], atol=1e-2)
    assert exports == ["_Forward"]


def test_parameters_and_buffers_reassigned_between_traces_are_the_ones_that_run(tokenizer, exports):
    # the state a run takes is looked up once per model structure; a tensor put in a module's place since
    # (same shape and dtype) must be the one read
    lm = LanguageModel(tiny_llama(len(tokenizer)), tokenizer=tokenizer)
    before = traced(lm)
    rotary = lm._model.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq * 3  # a new buffer tensor under the same name
    buffer_changed = traced(lm)
    assert_logits(buffer_changed, direct(lm), torch.float32, 1e-5)
    assert (buffer_changed[0] - before[0]).abs().max() > 1e-3
    mlp = lm._model.model.layers[0].mlp
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.detach() * 2)  # a new Parameter object
    assert_logits(traced(lm), direct(lm), torch.float32, 1e-5)


def test_train_mode_exports_with_dropout_and_eval_mode_again_without(exports):
    lm = fresh_gpt2()
    assert lm.config.resid_pdrop > 0
    reference = direct(lm)
    lm._model.train()
    torch.manual_seed(0)
    first, second = traced(lm), traced(lm)
    assert not torch.allclose(first[0], second[0], atol=1e-3)  # dropout draws anew each run
    assert not torch.allclose(first[0], reference[0], atol=1e-3)
    lm._model.eval()
    assert_logits(traced(lm), reference, torch.float32, 1e-5)
    assert exports == ["_Forward"] * 2


def test_a_hook_registered_or_removed_after_a_trace_is_followed(exports):
    """A user's hooks run in eager PyTorch (and NNsight) and are traced into the export, with a warning
    that says so (their side effects happen once, at the export): one registered after a trace, on a
    module or for every module, and its removal, make the next trace export again."""
    lm = fresh_gpt2()
    plain = direct(lm)
    assert_logits(traced(lm), plain, torch.float32, 1e-5)
    mlp = lm._model.transformer.h[0].mlp
    handle = mlp.register_forward_hook(lambda m, args, out: out * 2)
    doubled = direct(lm)
    assert (doubled[0] - plain[0]).abs().max() > 0.1
    with pytest.warns(UserWarning, match=r"hooks of your own on transformer\.h\.0\.mlp are traced") as warned:
        assert_logits(traced(lm), doubled, torch.float32, 1e-5)
    assert warned[0].filename == __file__  # the user's line: the trace's first read
    handle.remove()
    assert_logits(traced(lm), plain, torch.float32, 1e-5)
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: out * 2 if m is mlp else None)
    try:
        with pytest.warns(UserWarning, match=r"every module \(a global hook\)"):
            assert_logits(traced(lm), doubled, torch.float32, 1e-5)
    finally:
        handle.remove()
    assert_logits(traced(lm), plain, torch.float32, 1e-5)
    assert exports == ["_Forward"] * 5


def test_transformers_own_output_hooks_change_nothing(tmp_path, exports):
    """A call with ``output_hidden_states`` makes transformers register output-capturing hooks on the
    model's modules, for good. They do nothing outside such a call, so they are not a change: the next
    trace, even one whose block makes that call, uses the same graph, with no word of hooks of the user's;
    and a model that has them is cached on disk under the key of one that has not."""
    lm = LanguageModel(AutoModelForCausalLM.from_pretrained(fxpatch.TINY_GPT2), cache_dir=tmp_path)
    plain = direct(lm)
    ids = torch.tensor([token_ids(lm, PROMPT_1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_logits(traced(lm), plain, torch.float32, 1e-5)
        with torch.no_grad():
            lm._model(ids, output_hidden_states=True, output_attentions=True)
        assert any(m._forward_hooks for m in lm._model.modules())
        assert_logits(traced(lm), plain, torch.float32, 1e-5)
        with torch.no_grad(), lm.trace(PROMPT_1):
            lm._model(ids, output_hidden_states=True)  # inside the block: no refusal either
            logits = lm.lm_head.output.save()
        assert_logits([logits[0]], plain[:1], torch.float32, 1e-5)
        hooked = LanguageModel(AutoModelForCausalLM.from_pretrained(fxpatch.TINY_GPT2), cache_dir=tmp_path)
        with torch.no_grad():
            hooked._model(ids, output_hidden_states=True)
        assert_logits(traced(hooked), plain, torch.float32, 1e-5)
    assert hooked.site_graph().loaded_from is not None
    assert exports == ["_Forward"] * 2  # an export, and a load
    assert len(list((tmp_path / "exports").glob("*.fxg"))) == 1


def test_a_forward_patched_on_a_module_after_a_trace_is_followed(exports):
    lm = fresh_gpt2()
    plain = direct(lm)
    assert_logits(traced(lm), plain, torch.float32, 1e-5)
    mlp = lm._model.transformer.h[1].mlp
    original = mlp.forward
    mlp.forward = lambda hidden: original(hidden) * 2  # an instance-level forward, as some libraries patch
    doubled = direct(lm)
    assert (doubled[0] - plain[0]).abs().max() > 0.1
    assert_logits(traced(lm), doubled, torch.float32, 1e-5)
    del mlp.forward
    assert_logits(traced(lm), plain, torch.float32, 1e-5)
    assert exports == ["_Forward"] * 3


def test_a_module_deleted_then_replaced_runs_even_where_it_takes_the_old_ones_id(tokenizer, exports):
    """``del m.act_fn; m.act_fn = New()``: CPython may give the new module the memory, so the id, of the
    one just freed; the fingerprint keeps its modules alive so that it cannot (it once took the new
    ReLU for the old SiLU and ran the old graph)."""
    model = tiny_llama(len(tokenizer))
    mlp = model.model.layers[1].mlp  # act_fn is the last of its modules, so the rest keeps its order
    mlp.act_fn = torch.nn.SiLU().eval()
    lm = LanguageModel(model, tokenizer=tokenizer)
    silu = direct(lm)
    assert_logits(traced(lm), silu, torch.float32, 1e-5)
    del mlp.act_fn
    mlp.act_fn = torch.nn.ReLU().eval()
    relu = direct(lm)
    assert (relu[0] - silu[0]).abs().max() > 1e-3
    assert_logits(traced(lm), relu, torch.float32, 1e-5)
    assert exports == ["_Forward"] * 2


def test_a_setting_changed_after_a_trace_is_followed_and_keyed_on_disk(tmp_path, exports):
    """A module attribute the forward reads (GPT-2 attention's ``scaling``) set after a trace: the next
    trace exports again, and the export on disk is found only by a model with the same settings."""
    lm = LanguageModel(AutoModelForCausalLM.from_pretrained(fxpatch.TINY_GPT2), cache_dir=tmp_path)
    plain = direct(lm)
    assert_logits(traced(lm), plain, torch.float32, 1e-5)
    for block in lm._model.transformer.h:
        block.attn.scaling = 1.0  # from 1/sqrt(head_dim)
    unscaled = direct(lm)
    assert (unscaled[0] - plain[0]).abs().max() > 1e-2
    assert_logits(traced(lm), unscaled, torch.float32, 1e-5)
    assert exports == ["_Forward"] * 2
    # as a second process would: a new wrapper reads the export from disk, the one of its own settings
    again = LanguageModel(lm._model, cache_dir=tmp_path)
    assert_logits(traced(again), unscaled, torch.float32, 1e-5)
    assert again.site_graph().loaded_from is not None
    fresh = LanguageModel(AutoModelForCausalLM.from_pretrained(fxpatch.TINY_GPT2), cache_dir=tmp_path)
    assert_logits(traced(fresh), plain, torch.float32, 1e-5)
    assert fresh.site_graph().loaded_from is not None


def doubled_mlp(self, hidden_states):
    """``GPT2MLP.forward`` with its output doubled: a monkeypatch of the class, from this file."""
    return _GPT2MLP_FORWARD(self, hidden_states) * 2


_GPT2MLP_FORWARD = GPT2MLP.forward


def no_rotary(q, k, cos, sin, unsqueeze_dim=1):
    """``apply_rotary_pos_emb`` that leaves queries and keys as they are: a patch of Llama's module."""
    return q, k


def test_a_method_monkeypatched_after_a_trace_is_followed_and_keyed_on_disk(tmp_path, exports, monkeypatch):
    """``GPT2MLP.forward = f`` after a trace: the next trace exports again; on disk, a process with the
    patch finds the patched graph and one without it the plain graph (a graph traced with other code
    was found before, silently)."""
    lm = LanguageModel(AutoModelForCausalLM.from_pretrained(fxpatch.TINY_GPT2), cache_dir=tmp_path)
    plain = direct(lm)
    assert_logits(traced(lm), plain, torch.float32, 1e-5)
    with monkeypatch.context() as patch:
        patch.setattr(GPT2MLP, "forward", doubled_mlp)
        doubled = direct(lm)
        assert (doubled[0] - plain[0]).abs().max() > 0.1
        assert_logits(traced(lm), doubled, torch.float32, 1e-5)
        assert len(list((tmp_path / "exports").glob("*.fxg"))) == 2
        again = LanguageModel(AutoModelForCausalLM.from_pretrained(fxpatch.TINY_GPT2), cache_dir=tmp_path)
        assert_logits(traced(again), doubled, torch.float32, 1e-5)
        assert again.site_graph().loaded_from is not None
    fresh = LanguageModel(AutoModelForCausalLM.from_pretrained(fxpatch.TINY_GPT2), cache_dir=tmp_path)
    assert_logits(traced(fresh), plain, torch.float32, 1e-5)
    assert fresh.site_graph().loaded_from is not None
    assert exports == ["_Forward"] * 4  # two exports, two loads


def test_a_module_function_monkeypatched_after_a_trace_is_followed(tokenizer, tmp_path, exports, monkeypatch):
    """``modeling_llama.apply_rotary_pos_emb = f``: a function the forward calls by its module's name."""
    from transformers.models.llama import modeling_llama

    lm = LanguageModel(tiny_llama(len(tokenizer)), tokenizer=tokenizer, cache_dir=tmp_path)
    rotary = direct(lm)
    assert_logits(traced(lm), rotary, torch.float32, 1e-5)
    with monkeypatch.context() as patch:
        patch.setattr(modeling_llama, "apply_rotary_pos_emb", no_rotary)
        flat = direct(lm)
        assert (flat[0] - rotary[0]).abs().max() > 1e-3
        assert_logits(traced(lm), flat, torch.float32, 1e-5)
    assert_logits(traced(lm), rotary, torch.float32, 1e-5)
    assert exports == ["_Forward"] * 3  # the last one a load
    assert lm.site_graph().loaded_from is not None
    assert len(list((tmp_path / "exports").glob("*.fxg"))) == 2


def test_a_monkeypatch_from_a_notebook_is_not_cached(tmp_path, exports, monkeypatch):
    """A function with no file behind it (a notebook cell's) cannot be named in a key: not written."""
    namespace: dict = {}
    exec(compile("def forward(self, x):\n    return MLP_FORWARD(self, x) * 2\n", "<cell 3>", "exec"),
         {"MLP_FORWARD": _GPT2MLP_FORWARD}, namespace)
    monkeypatch.setattr(GPT2MLP, "forward", namespace["forward"])
    lm = LanguageModel(AutoModelForCausalLM.from_pretrained(fxpatch.TINY_GPT2), cache_dir=tmp_path)
    assert_logits(traced(lm), direct(lm), torch.float32, 1e-5)
    assert exports == ["_Forward"] and not list((tmp_path / "exports").glob("*.fxg"))


def test_traces_of_an_unchanged_model_skip_the_fingerprint_walk(monkeypatch):
    """The walk runs once per change (and once after an export, which sets attributes of its own); the
    traces between are vouched for by ``ModelWatch``."""
    walks = []
    walk = fxpatch.model.model_fingerprint
    monkeypatch.setattr(fxpatch.model, "model_fingerprint", lambda *a: walks.append(1) or walk(*a))
    lm = fresh_gpt2()
    for _ in range(4):
        assert_logits(traced(lm), direct(lm), torch.float32, 1e-5)
    assert len(walks) <= 2
    lm._model.transformer.h[0].attn.train()
    lm._model.transformer.h[0].attn.eval()
    before = len(walks)
    traced(lm)
    assert len(walks) == before + 1


def test_generate_after_a_dtype_change(exports):
    lm = fresh_gpt2()
    ids = torch.tensor([token_ids(lm, PROMPT_1)])
    for dtype in (torch.float32, torch.float64):
        lm.to(dtype)
        with lm.generate(PROMPT_1, max_new_tokens=1):  # one new token: the prompt pass alone
            out = lm.generator.output.save()
            logits = lm.lm_head.output.save()
        with torch.no_grad():
            expected = lm._model(ids).logits[:, -1:]
        assert logits.dtype == dtype
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        assert out.tolist() == [ids[0].tolist() + [int(expected[0, -1].argmax())]]
    assert exports == ["Prefill", "Prefill"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_move_to_gpu_after_the_first_trace(exports):
    lm = fresh_gpt2()
    traced(lm)
    assert lm.to("cuda") is lm and lm.device.type == "cuda"
    got = traced(lm)
    assert all(g.device.type == "cuda" for g in got)
    assert_logits(got, direct(lm), torch.float32, 1e-4)
    assert exports == ["_Forward"] * 2


def test_fingerprint_sees_what_an_export_depends_on():
    with torch.device("meta"):  # no weights to fill in
        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12)).eval()
        new_mlp = GPT2MLP(4 * 768, model.config)
    base = model_fingerprint(model)
    assert model_fingerprint(model) == base
    with torch.no_grad():
        model.transformer.h[3].attn.c_attn.weight.add_(1.0)
    assert model_fingerprint(model) == base
    changed = []
    model.transformer.h[3].mlp = new_mlp
    changed.append(model_fingerprint(model))
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied from wte
    changed.append(model_fingerprint(model))
    model.transformer.h[0].attn.train()
    changed.append(model_fingerprint(model))
    model.transformer.h[11].ln_1.to(torch.float64)
    changed.append(model_fingerprint(model))
    handle = model.transformer.h[5].register_forward_pre_hook(lambda m, args: None)
    changed.append(model_fingerprint(model))
    handle.remove()
    assert model_fingerprint(model) == changed[-2]
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    changed.append(model_fingerprint(model))
    handle.remove()
    model.transformer.h[2].mlp.forward = lambda x: x  # an instance-level forward: code the export runs
    changed.append(model_fingerprint(model))
    assert len({base, *changed}) == 8


# -- several devices -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device_map, devices", [
    ({"transformer": "cpu", "lm_head": "meta"}, "2 devices (cpu, meta)"),
    ({"transformer": "cpu", "lm_head": 0}, "2 devices (cpu, cuda:0)"),
    ({"transformer.wte": "cuda:0", "transformer.h": 1, "lm_head": "disk"}, "3 devices (cuda:0, cuda:1, disk)"),
])
def test_device_map_over_several_devices_is_refused(device_map, devices, monkeypatch):
    loads = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: loads.append(a))
    with pytest.raises(InputError) as info:
        LanguageModel(fxpatch.TINY_GPT2, device_map=device_map)  # line: device-map
    message = str(info.value)
    assert message.startswith(f"{__file__}:{line_of('device-map')}:"), message
    assert f"device_map puts the model's modules on {devices}" in message
    assert "does not support models split" in message and "Put the model on one device" in message
    assert loads == []  # refused before anything loaded


def test_device_map_strategy_over_several_devices_is_refused():
    with pytest.raises(InputError, match='device_map="balanced" spreads a model over several devices') as info:
        LanguageModel(fxpatch.TINY_GPT2, device_map="balanced")  # line: balanced
    assert str(info.value).startswith(f"{__file__}:{line_of('balanced')}:")


def test_device_map_of_one_device_loads_there():
    lm = LanguageModel(fxpatch.TINY_GPT2, device_map={"transformer": "cpu", "lm_head": torch.device("cpu")})
    assert lm.device.type == "cpu"
    assert_logits(traced(lm), direct(lm), torch.float32, 1e-5)


def test_loaded_model_dispatched_over_several_devices_is_refused(tokenizer):
    hf = tiny_llama(len(tokenizer))
    hf.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "model.norm": 1, "lm_head": "cpu"}
    with pytest.raises(InputError) as info:
        LanguageModel(hf, tokenizer=tokenizer)  # line: hf-map
    message = str(info.value)
    assert message.startswith(f"{__file__}:{line_of('hf-map')}:"), message
    assert "hf_device_map) on 3 devices (cpu, cuda:0, cuda:1)" in message and "one device" in message
    hf.hf_device_map = {"": "cpu"}  # one device is fine
    lm = LanguageModel(hf, tokenizer=tokenizer)
    assert_logits(traced(lm), direct(lm), torch.float32, 1e-5)


def test_part_of_the_model_moved_after_the_first_trace_is_refused(tokenizer):
    lm = LanguageModel(tiny_llama(len(tokenizer)), tokenizer=tokenizer)
    before = traced(lm)
    head = lm._model.lm_head.weight
    lm._model.lm_head.to("meta")
    with pytest.raises(InputError) as info:
        with lm.trace(PROMPT_1):  # line: moved
            lm.lm_head.output.save()
    message = str(info.value)
    assert message.startswith(f"{__file__}:{line_of('moved')}:"), message
    assert "parameters and buffers are on 2 devices (cpu, meta)" in message
    lm._model.lm_head.weight = head  # back on one device: runs again, as before
    for got, want in zip(traced(lm), before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_loaded_model_with_tensors_on_several_devices_is_refused(tokenizer):
    hf = tiny_llama(len(tokenizer))
    hf.lm_head.to("meta")  # Llama's head is not tied to the embedding
    with pytest.raises(InputError) as info:
        LanguageModel(hf, tokenizer=tokenizer)  # line: tensors
    message = str(info.value)
    assert message.startswith(f"{__file__}:{line_of('tensors')}:"), message
    assert "parameters and buffers are on 2 devices (cpu, meta)" in message


def line_of(tag: str) -> int:
    """The line of this file that ends with ``# line: <tag>``."""
    with open(__file__, encoding="utf-8") as f:
        hits = [i + 1 for i, text in enumerate(f) if text.rstrip().endswith("# line: " + tag)]
    assert len(hits) == 1, hits
    return hits[0]


def test_the_vocabulary_and_context_a_trace_checks_inputs_against_follow_the_model():
    """A trace checks token ids against the model's vocabulary and context, which it reads once per state of
    the model: a resized embedding and a changed context length are the next trace's limits."""
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=40, n_positions=16)).eval()
    lm = LanguageModel(hf, cache_dir=False)

    def last_logits(ids):
        with lm.trace(ids):
            out = lm.lm_head.output[:, -1].save()
        return out

    last_logits([1, 2, 39])
    with pytest.raises(InputError, match="outside the model's vocabulary of 40 tokens"):
        last_logits([1, 2, 45])
    hf.resize_token_embeddings(48)
    got = last_logits([1, 2, 45])
    with torch.no_grad():
        want = hf(torch.tensor([[1, 2, 45]])).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="outside the model's vocabulary of 48 tokens"):
        last_logits([1, 2, 48])
    with pytest.raises(InputError, match="more than the model's context of 16"):
        last_logits(list(range(17)))
    hf.config.n_positions = 8  # a setting of the config: the next trace's context
    with pytest.raises(InputError, match="more than the model's context of 8"):
        last_logits(list(range(9)))
