"""The module tree as envoys: attribute access, ModuleList indexing, printing, calling."""

from __future__ import annotations

import torch

from tests.conftest import PROMPT_1, module_calls


def test_attribute_access_mirrors_the_module_tree(gpt2):
    hf = gpt2._model
    assert gpt2.transformer.h[3].mlp._module is hf.transformer.h[3].mlp
    assert gpt2.transformer.h[-1]._module is hf.transformer.h[-1]
    assert [e._module for e in gpt2.transformer.h[1:3]] == list(hf.transformer.h[1:3])
    assert [e._path for e in gpt2.transformer.h] == [f"transformer.h.{i}" for i in range(len(hf.transformer.h))]
    assert len(gpt2.transformer.h) == hf.config.n_layer
    # non-module attributes are the module's own
    assert gpt2.transformer.wte.weight is hf.transformer.wte.weight
    assert gpt2.config is hf.config


def test_print_shows_the_module_tree(gpt2):
    assert repr(gpt2) == repr(gpt2._model)
    assert "(wte): Embedding" in repr(gpt2.transformer)


def test_calling_an_envoy_outside_a_trace_runs_the_module(gpt2):
    x = torch.randn(1, 2, gpt2.config.n_embd, device=gpt2.device)
    torch.testing.assert_close(gpt2.transformer.ln_f(x), gpt2._model.transformer.ln_f(x))


def test_no_hook_runs_on_the_users_model_during_a_trace(gpt2):
    gpt2.site_graph("forward")  # export first: its hooks are the only ones fxpatch ever adds
    modules = set(gpt2._model.modules())
    with module_calls() as calls:
        with gpt2.trace(PROMPT_1):
            gpt2.transformer.h[0].output[:, -1] = 0
            out = gpt2.lm_head.output.save()
    assert calls and not modules.intersection(calls)  # the rewritten graph ran, not the user's modules
    assert out.shape[0] == 1
