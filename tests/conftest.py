"""Shared fixtures: the embedded tiny GPT-2, a tiny random Llama (grouped-query attention) and a tiny random OPT
(whose decoder layers flatten the batch: their ``fc1``/``fc2`` values are (rows * tokens, features))."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import fxpatch
from fxpatch import LanguageModel

# Exported graphs go to a temporary disk cache, never the user's ~/.cache: set before any test makes a model.
# Processes a test spawns import this file too; they inherit the session's directory rather than make their own.
# The process that made it removes it at exit (also when this file is imported outside pytest).
SESSION_CACHE_DIR = os.environ.get("FXPATCH_TEST_SESSION_CACHE_DIR")
if SESSION_CACHE_DIR is None:
    SESSION_CACHE_DIR = tempfile.mkdtemp(prefix="fxpatch-test-cache-")
    atexit.register(shutil.rmtree, SESSION_CACHE_DIR, ignore_errors=True)
os.environ["FXPATCH_TEST_SESSION_CACHE_DIR"] = os.environ["FXPATCH_CACHE_DIR"] = SESSION_CACHE_DIR


@pytest.fixture(scope="session")
def session_cache_dir() -> str:
    """The session's export cache directory (``$FXPATCH_CACHE_DIR``)."""
    return SESSION_CACHE_DIR


PROMPT_1 = "Madison square garden is located in the city of New"
PROMPT_2 = "_ _ _ _ _ _ _ _ _ _"
PROMPTS = [PROMPT_1, "The Eiffel Tower is in Paris", "_ _ _", PROMPT_2]


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(fxpatch.TINY_GPT2)


# FXPATCH_TEST_DEVICE=cuda runs the shared models' tests on a GPU (the reference runs there too)
DEVICE = os.environ.get("FXPATCH_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def gpt2() -> LanguageModel:
    return LanguageModel(fxpatch.TINY_GPT2).to(DEVICE)


@pytest.fixture(scope="session")
def llama(tokenizer) -> LanguageModel:
    return LanguageModel(tiny_llama(len(tokenizer)), tokenizer=tokenizer).to(DEVICE)


@pytest.fixture(scope="session")
def opt(tokenizer) -> LanguageModel:
    """A 2-layer random OPT (CPU only: its tests compare with the plain model run by hand)."""
    torch.manual_seed(0)
    config = OPTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
                       max_position_embeddings=128, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0,
                       pad_token_id=0)
    return LanguageModel(OPTForCausalLM(config).eval(), tokenizer=tokenizer)


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def lm(request) -> LanguageModel:
    """Each test using ``lm`` runs on both architectures."""
    return request.getfixturevalue(request.param)


def layers(lm: LanguageModel):
    """The decoder layers' envoys and modules, whatever the architecture calls them."""
    if hasattr(lm._model, "transformer"):
        return lm.transformer.h, lm._model.transformer.h
    return lm.model.layers, lm._model.model.layers


def skip_compiled_generation_before_torch_2_13(device: torch.device) -> None:
    """Skip a compiled generation on the CPU with torch before 2.13: inductor's C++ code for the attention masks
    does not build there (seen on 2.9.1 and 2.11.0: a bounds check names a variable before defining it), which
    fxpatch reports as an error (``tests/test_compile.py``)."""
    if torch.device(device).type == "cpu" and torch.torch_version.TorchVersion(torch.__version__) < (2, 13):
        pytest.skip("inductor's C++ code for generation's attention masks does not build on the CPU before "
                    "torch 2.13 ('tmp5' was not declared in this scope)")


def state(lm: LanguageModel) -> dict:
    """Everything a trace must leave as it was: weights and every module's hooks."""
    model = lm._model
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hooks": {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                  for name, m in model.named_modules()},
        "global": (dict(torch.nn.modules.module._global_forward_hooks),
                   dict(torch.nn.modules.module._global_forward_pre_hooks)),
    }


def assert_state_unchanged(lm: LanguageModel, before: dict) -> None:
    after = state(lm)
    assert after["hooks"] == before["hooks"]
    assert after["global"] == before["global"]
    assert after["weights"].keys() == before["weights"].keys()
    for k, v in before["weights"].items():
        torch.testing.assert_close(after["weights"][k], v, rtol=0, atol=0)


@contextlib.contextmanager
def module_calls():
    """Every module called while active (an exported or rewritten graph too: it runs through
    ``nn.Module.__call__``), without a hook: a hook the user registers is traced into the export, so a
    new one, even a global one, makes the next trace export again, and an export calls every module."""
    calls: list[torch.nn.Module] = []
    call = torch.nn.Module.__call__

    def counting(module, *args, **kwargs):
        calls.append(module)
        return call(module, *args, **kwargs)

    torch.nn.Module.__call__ = counting
    try:
        yield calls
    finally:
        torch.nn.Module.__call__ = call


def count_checks(monkeypatch) -> list[str]:
    """The shape checks traces run from now on, in order, by kind: ``check_program`` (at the run's own
    sizes) or ``check_program_symbolic`` (with symbolic sizes and positions)."""
    import fxpatch.runner as runner

    calls: list[str] = []
    for name in ("check_program", "check_program_symbolic"):
        real = getattr(runner, name)
        monkeypatch.setattr(runner, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls
