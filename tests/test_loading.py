"""Loading a model by name draws no weight-loading progress bar unless asked, and leaves
transformers' progress-bar settings as they were."""

from __future__ import annotations

import importlib

import pytest
import torch
from huggingface_hub.utils import are_progress_bars_disabled
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import fxpatch
from fxpatch import LanguageModel

BAR = "Loading weights"  # the description transformers gives the weight-loading bar


@pytest.fixture(autouse=True)
def bars_on(monkeypatch):
    """transformers' bars enabled, as in a fresh process without HF_HUB_DISABLE_PROGRESS_BARS.

    Set through the flag transformers reads, so the runner's environment does not decide
    what these tests see; monkeypatch puts everything back afterwards.
    """
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(hf_logging, "_tqdm_active", True)


def current_hook():
    hook = hf_logging.set_tqdm_hook(None)
    hf_logging.set_tqdm_hook(hook)
    return hook


def settings() -> tuple:
    """transformers' and huggingface_hub's global progress-bar settings."""
    return hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled(), current_hook()


def assert_loaded(model: LanguageModel) -> None:
    """The weights are the checkpoint's (compared with a plain from_pretrained)."""
    plain = AutoModelForCausalLM.from_pretrained(fxpatch.TINY_GPT2).state_dict()
    loaded = model._model.state_dict()
    assert loaded.keys() == plain.keys()
    for name, value in plain.items():
        torch.testing.assert_close(loaded[name], value, atol=0, rtol=0, msg=name)


def test_loading_draws_no_bar_and_changes_no_setting(capfd):
    before = settings()
    model = LanguageModel(fxpatch.TINY_GPT2)
    err = capfd.readouterr().err
    assert BAR not in err and "%|" not in err, f"a progress bar was drawn on stderr:\n{err}"
    assert settings() == before
    # transformers' own loading still draws its bar afterwards: the setting is really as it was.
    assert_loaded(model)
    assert BAR in capfd.readouterr().err


def test_progress_true_draws_the_bar(capfd):
    before = settings()
    model = LanguageModel(fxpatch.TINY_GPT2, progress=True)
    assert BAR in capfd.readouterr().err
    assert settings() == before
    assert not hasattr(model._model.config, "progress")  # fxpatch's keyword, not passed to from_pretrained


def test_progress_false_wins_over_the_environment(capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    LanguageModel(fxpatch.TINY_GPT2, progress=False)
    assert BAR not in capfd.readouterr().err


def test_environment_variable_leaves_transformers_in_charge(capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    LanguageModel(fxpatch.TINY_GPT2)
    assert BAR in capfd.readouterr().err


def test_bars_switched_off_by_the_user_stay_off(capfd, monkeypatch):
    monkeypatch.setattr(hf_logging, "_tqdm_active", False)
    LanguageModel(fxpatch.TINY_GPT2, progress=None)
    assert BAR not in capfd.readouterr().err
    assert not hf_logging.is_progress_bar_enabled()


def test_a_users_tqdm_hook_stays_in_charge():
    descriptions = []

    def hook(factory, args, kwargs):
        descriptions.append(kwargs.get("desc"))
        return factory(*args, **{**kwargs, "disable": True})

    previous = hf_logging.set_tqdm_hook(hook)
    try:
        LanguageModel(fxpatch.TINY_GPT2)
        assert BAR in descriptions
        assert current_hook() is hook
    finally:
        hf_logging.set_tqdm_hook(previous)


def test_without_tqdm_hooks_the_bars_are_switched_off_and_on(capfd, monkeypatch):
    """transformers releases without ``set_tqdm_hook``: disable, load, enable."""
    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module, not its tqdm class
    monkeypatch.setattr(hub_tqdm, "progress_bar_states", dict(hub_tqdm.progress_bar_states))
    monkeypatch.delattr(hf_logging, "set_tqdm_hook")
    model = LanguageModel(fxpatch.TINY_GPT2)
    assert BAR not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    assert_loaded(model)
    assert BAR in capfd.readouterr().err
