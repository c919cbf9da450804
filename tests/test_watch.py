"""``ModelWatch``: it vouches for a model only while nothing its fingerprint covers can have changed.

Each change is made to a fresh small GPT-2 (meta tensors: the checks read no values) after a watch is
taken; the watch must stop vouching, and the fingerprint must agree that something changed, or be the
same (a write the fingerprint does not cover may still end the watch: it only costs a walk).
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

import fxpatch.watch
from fxpatch.watch import ModelWatch, model_fingerprint, watch_of


def small_gpt2() -> GPT2LMHeadModel:
    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).eval()


def watched(model: torch.nn.Module) -> tuple[tuple, ModelWatch]:
    kept: list = []
    fingerprint = model_fingerprint(model, kept)
    return fingerprint, watch_of(kept)


def remove_later(handles: list):
    def register(handle):
        handles.append(handle)
    return register


CHANGES = {
    "train mode": lambda m, keep: m.transformer.h[0].attn.train(),
    "dtype through .to()": lambda m, keep: m.transformer.h[1].ln_2.to(torch.float64),
    "half()": lambda m, keep: m.half(),
    "a parameter's data of another shape": lambda m, keep: setattr(
        m.transformer.h[0].mlp.c_fc.bias, "data", torch.zeros(3, device="meta")),
    "a parameter replaced": lambda m, keep: setattr(
        m.lm_head, "weight", torch.nn.Parameter(m.lm_head.weight.detach().clone())),
    "a buffer registered": lambda m, keep: m.transformer.h[0].ln_1.register_buffer("scale", torch.ones(2)),
    "a submodule replaced": lambda m, keep: setattr(m.transformer.h[1], "mlp", GPT2MLP(128, m.config)),
    "a submodule deleted": lambda m, keep: delattr(m.transformer.h[1].mlp, "dropout"),
    "a block appended": lambda m, keep: m.transformer.h.append(m.transformer.h[0]),
    "a forward hook": lambda m, keep: keep(m.transformer.h[0].register_forward_hook(lambda *a: None)),
    "a forward pre-hook with kwargs": lambda m, keep: keep(
        m.transformer.ln_f.register_forward_pre_hook(lambda *a: None, with_kwargs=True)),
    "a full backward hook": lambda m, keep: keep(m.lm_head.register_full_backward_hook(lambda *a: None)),
    "a global forward hook": lambda m, keep: keep(
        torch.nn.modules.module.register_module_forward_hook(lambda *a: None)),
    "a patched forward": lambda m, keep: setattr(m.transformer.h[0], "forward", lambda *a, **k: a[0]),
    "a flag a forward reads": lambda m, keep: setattr(m.transformer.h[1].attn, "scale_attn_weights", False),
    "a number a forward reads": lambda m, keep: setattr(m.transformer.ln_f, "eps", 1e-3),
    "a config setting": lambda m, keep: setattr(m.config, "scale_attn_weights", False),
}


@pytest.mark.parametrize("compare", ["dynamo's guard", "Python"])
@pytest.mark.parametrize("change", CHANGES)
def test_a_change_an_export_depends_on_ends_the_watch(change, compare, monkeypatch):
    """Dict versions are compared by a guard of dynamo's (C++) where torch has the API, else in Python: both
    see every change."""
    if compare == "Python":
        monkeypatch.setattr(fxpatch.watch, "version_guard", lambda dicts: None)
    else:
        assert fxpatch.watch.version_guard([{}]) is not None  # torch 2.9 to 2.13 have it
    model = small_gpt2()
    fingerprint, watch = watched(model)
    assert watch.unchanged()
    handles: list = []
    try:
        CHANGES[change](model, remove_later(handles))
        assert not watch.unchanged()
        assert model_fingerprint(model) != fingerprint
    finally:
        for h in handles:
            h.remove()


def test_removing_a_hook_that_was_there_ends_the_watch():
    model = small_gpt2()
    handle = model.transformer.h[1].attn.register_forward_hook(lambda *a: None)
    fingerprint, watch = watched(model)
    handle.remove()
    assert not watch.unchanged()
    assert model_fingerprint(model) != fingerprint


def test_a_hook_registered_and_removed_again_or_elsewhere_keeps_the_watch():
    """A hook-based tool registers hooks and removes them at every call, and tensors take hooks too:
    neither leaves a hook on the model, so the watch still vouches (no walk for them)."""
    model = small_gpt2()
    fingerprint, watch = watched(model)
    model.transformer.h[0].register_forward_hook(lambda *a: None).remove()
    torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None).remove()
    torch.zeros(2, requires_grad=True).register_hook(lambda grad: grad)
    other = small_gpt2()
    other.transformer.h[0].register_forward_hook(lambda *a: None)
    assert watch.unchanged()
    assert model_fingerprint(model) == fingerprint
    handle = model.transformer.ln_f.register_forward_hook(lambda *a: None)  # and one left there is seen
    try:
        assert not watch.unchanged()
    finally:
        handle.remove()


def test_what_an_export_does_not_depend_on_keeps_or_ends_the_watch_without_changing_the_fingerprint():
    model = small_gpt2()
    fingerprint, watch = watched(model)
    model.transformer.h[0].mlp.c_fc.weight.data.mul_(2)  # weights in place: read at each run
    assert watch.unchanged()
    model.transformer.h[0].attn.notes = ["a label"]  # not a setting: a walk, the same answer
    assert not watch.unchanged()
    assert model_fingerprint(model) == fingerprint


def test_without_dict_versions_the_watch_never_vouches(monkeypatch):
    monkeypatch.setattr(fxpatch.watch, "_DICT_VERSION_WORKS", False)
    model = small_gpt2()
    _, watch = watched(model)
    assert not watch.unchanged()


def test_without_tensor_guards_dtype_and_shape_are_still_seen(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("no TensorGuards here")

    monkeypatch.setattr(torch._C._dynamo.guards, "TensorGuards", refuse)
    model = small_gpt2()
    _, watch = watched(model)
    assert watch.unchanged()
    model.transformer.h[1].ln_1.to(torch.float64)
    assert not watch.unchanged()
    model = small_gpt2()
    _, watch = watched(model)
    model.transformer.wte.weight.data = torch.zeros(3, 32, device="meta")
    assert not watch.unchanged()


def test_kept_objects_hold_the_ids_the_fingerprint_names():
    model = small_gpt2()
    mlp = model.transformer.h[1].mlp
    kept: list = []
    fingerprint = model_fingerprint(model, kept)
    dropout_id = id(mlp.dropout)
    del mlp.dropout
    mlp.dropout = torch.nn.Identity().eval()  # may take the freed module's memory, unless it is kept
    assert id(mlp.dropout) != dropout_id
    assert model_fingerprint(model) != fingerprint
