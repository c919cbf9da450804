"""LanguageModel: loading, the one export per run mode, its sites, and proxy arithmetic."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM

import fxpatch
from fxpatch import LanguageModel
from fxpatch.passes.ops import is_site
from tests.conftest import PROMPT_1
from tests.reference import run_alone


@pytest.mark.parametrize("kwargs", [{}, {"device_map": "auto", "dtype": torch.float32}, {"device_map": "cpu"}])
def test_loads_by_path(kwargs):
    lm = LanguageModel(fxpatch.TINY_GPT2, **kwargs)
    # device_map="auto" puts it on the GPU where there is one
    expected = "cuda" if kwargs.get("device_map") == "auto" and torch.cuda.is_available() else "cpu"
    assert type(lm._model).__name__ == "GPT2LMHeadModel" and lm.device.type == expected
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token and lm.tokenizer.padding_side == "left"
    assert not lm._model.training


def test_wraps_a_model_and_leaves_the_users_tokenizer_alone(tokenizer):
    hf = AutoModelForCausalLM.from_pretrained(fxpatch.TINY_GPT2)
    pad, side = tokenizer.pad_token, tokenizer.padding_side
    lm = LanguageModel(hf, tokenizer=tokenizer)
    assert lm._model is hf and lm.tokenizer is tokenizer
    assert (tokenizer.pad_token, tokenizer.padding_side) == (pad, side)
    half = LanguageModel(AutoModelForCausalLM.from_pretrained(fxpatch.TINY_GPT2), dtype="float64")
    assert half._model.dtype == torch.float64


def test_each_mode_is_exported_once_with_a_site_at_every_module(lm, monkeypatch):
    sg = lm.site_graph("forward")
    calls = []
    monkeypatch.setattr("fxpatch.model.export_sites", lambda *a, **k: calls.append(a))
    with lm.trace(PROMPT_1):
        lm.lm_head.output.save()
    assert lm.site_graph("forward") is sg and calls == []
    names = {n.args[1] for n in sg.graph_module.graph.nodes if is_site(n)}
    # the modules a plain forward pass calls, seen by ordinary hooks
    ran = []
    handles = [m.register_forward_hook(lambda m, a, o, p=p: ran.append(p)) for p, m in lm._model.named_modules()]
    try:
        with torch.no_grad():
            lm._model(**lm.tokenizer(PROMPT_1, return_tensors="pt"))
    finally:
        for h in handles:
            h.remove()
    assert set(ran) == set(sg.modules)
    for path in ran:
        outputs = sg.modules[path]["output"]
        assert any(outputs.is_site) and all(name in names for name, s in zip(outputs.leaves, outputs.is_site) if s)
        inputs = sg.modules[path]["inputs"]
        assert all(name in names for name, s in zip(inputs.leaves, inputs.is_site) if s)
    assert "lm_head.output" in names and "output['logits']" in names


def test_proxy_comparison_methods_and_shape(gpt2):
    with gpt2.trace(["hello", PROMPT_1]):
        h = gpt2.transformer.h[1].output
        shape = h.shape.save()
        positive = (h > 0).sum(-1).save()
        top = h.abs().max(dim=-1).values.save()
        normed = (h / h.norm(dim=-1, keepdim=True)).mean().save()
    alone = run_alone(gpt2, PROMPT_1, capture=["transformer.h.1"]).outputs["transformer.h.1"][0]
    assert shape == torch.Size([2, 10, gpt2.config.n_embd])
    assert torch.equal(positive[1], (alone > 0).sum(-1))
    torch.testing.assert_close(top[1], alone.abs().max(dim=-1).values, atol=1e-5, rtol=1e-5)
    assert normed.dim() == 0


def test_a_model_export_cannot_capture_is_reported_at_the_users_line():
    class Branchy(torch.nn.Module):
        """Data-dependent Python control flow: torch.export cannot capture it."""

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.config = type("Config", (), {"vocab_size": 10})()

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            h = self.embed(input_ids)
            if h.sum() > 0:
                h = -h
            return type("Out", (), {"logits": h})()

    lm = LanguageModel(Branchy(), tokenizer=None)
    with pytest.raises(fxpatch.errors.FxpatchError, match="torch.export could not capture Branchy") as info:
        with lm.trace([1, 2, 3]):
            line = inspect.currentframe().f_lineno + 1
            lm.embed.output.save()  # the first module access exports
    assert str(info.value).startswith(f"{__file__}:{line}:")
