"""The model as the user set it up: a model spread over several devices is refused when it is wrapped."""

from __future__ import annotations

import pytest
import torch

import fxpatch
from fxpatch import LanguageModel
from fxpatch.errors import InputError
from tests.conftest import PROMPT_1, tiny_llama
from tests.reference import token_ids

SHORT = "_ _ _"


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
