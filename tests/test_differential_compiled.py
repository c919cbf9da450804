"""The whole differential suite with every trace compiled (``LanguageModel(..., compile=True)``).

Each test of ``tests/test_differential.py`` runs again here on models that compile every rewritten
graph with torch.compile (inductor, dynamic sizes), checked against the same hook reference with the
same tolerance (1e-5 in float32). Compiling costs seconds per graph on a CPU, so this file is under the
``slow`` marker: ``python -m pytest -q -m slow tests/test_differential_compiled.py``.
"""

from __future__ import annotations

import pytest

import fxpatch
from fxpatch import LanguageModel
from tests.conftest import DEVICE, tiny_llama
from tests.test_differential import *  # noqa: F403 - the tests to run again, compiled

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpt2() -> LanguageModel:
    return LanguageModel(fxpatch.TINY_GPT2, compile=True).to(DEVICE)


@pytest.fixture(scope="module")
def llama(tokenizer) -> LanguageModel:
    return LanguageModel(tiny_llama(len(tokenizer)), tokenizer=tokenizer, compile=True).to(DEVICE)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request) -> LanguageModel:
    model = request.getfixturevalue(request.param)
    assert model._compile is True
    return model
