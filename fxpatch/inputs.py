"""Turning what users pass to ``trace`` / ``invoke`` into rows of one batch.

Each invoke's input becomes a list of token-id rows (padding removed); the
batch is all invokes' rows in invoke order, left-padded, with an attention
mask and position ids counted from the first real token of each row, so that
every row computes what it computes alone.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import InputError
from .passes.diagnostics import Location


class _NoInputs:
    """The default of ``model.trace`` / ``tracer.invoke``: no argument given (an explicit ``None`` is an error)."""

    def __repr__(self) -> str:
        return "<no inputs>"


NO_INPUTS = _NoInputs()


def to_rows(inputs, tokenizer, loc: Location, max_length: int | None,
            vocab_size: int | None = None) -> list[list[int]]:
    """Token-id rows for one invoke's ``inputs``.

    Accepts a string, a list of strings, token ids (``list[int]``, a list of
    such lists, a 1-D or 2-D ``LongTensor``) or a tokenizer's ``BatchEncoding``
    / a dict with ``input_ids`` (and optionally ``attention_mask`` of the same
    shape). Every token id must lie in ``range(vocab_size)`` when it is given.

    Example::

        rows = to_rows(["Hello world", "Hi"], tokenizer, user_location(), 1024, 1024)   # one list per prompt
    """
    if inputs is None:
        raise InputError("the inputs are None: there is no prompt to run", at=loc,
                         hint="Pass a prompt (a string, a list of strings, token ids or a BatchEncoding). To batch "
                         "several invokes, leave the argument out: model.trace() with tracer.invoke(prompt) blocks; "
                         "tracer.invoke() with no argument covers every row.")
    rows = _rows(inputs, tokenizer, loc)
    if not rows:
        raise InputError("no prompts were given to this invoke", at=loc,
                         hint="Pass a prompt (a string, a list of strings or token ids), or use an empty "
                         "tracer.invoke() only beside invokes that have prompts.")
    for i, row in enumerate(rows):
        if not row:
            raise InputError(f"prompt {i} of this invoke is empty (it has no tokens)", at=loc,
                             hint="Give every prompt at least one token.")
        if max_length is not None and len(row) > max_length:
            raise InputError(
                f"prompt {i} of this invoke has {len(row)} tokens, more than the model's context of "
                f"{max_length}", at=loc, hint=f"Shorten the prompt to at most {max_length} tokens.")
        if vocab_size is not None:
            _check_vocab(row, i, vocab_size, loc)
    return rows


def _check_vocab(row: list[int], i: int, vocab_size: int, loc: Location) -> None:
    """An id outside the embedding would fail inside the run, or on some devices read garbage."""
    low, high = min(row), max(row)
    if low >= 0 and high < vocab_size:
        return
    bad = low if low < 0 else high
    raise InputError(
        f"prompt {i} of this invoke has token id {bad} at position {row.index(bad)}, outside the model's "
        f"vocabulary of {vocab_size} tokens (ids 0 to {vocab_size - 1})", at=loc,
        hint=f"Pass token ids from 0 to {vocab_size - 1}; if the tokenizer has more tokens than the model's "
        "embedding, call model.resize_token_embeddings(len(tokenizer)) first.")


def _rows(inputs, tokenizer, loc: Location) -> list[list[int]]:
    if isinstance(inputs, str):
        return [_tokenize([inputs], tokenizer, loc)[0]]
    if isinstance(inputs, torch.Tensor):
        if inputs.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"token ids must be an integer tensor, got dtype {inputs.dtype}", at=loc,
                             hint="Pass token ids as a LongTensor, or pass the prompt text.")
        if inputs.dim() == 1:
            return [inputs.tolist()]
        if inputs.dim() == 2:
            return [r.tolist() for r in inputs]
        raise InputError(f"token ids must be 1-D or 2-D, got shape {tuple(inputs.shape)}", at=loc)
    if isinstance(inputs, (list, tuple)):  # before Mapping: an ABC's isinstance costs more
        if not inputs:
            return []
        if all(isinstance(x, str) for x in inputs):
            return _tokenize(list(inputs), tokenizer, loc)
        if all(isinstance(x, int) for x in inputs):
            return [list(inputs)]
        if all(isinstance(x, (list, tuple)) and all(isinstance(t, int) for t in x) for x in inputs):
            return [list(x) for x in inputs]
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise InputError(f"a dict of inputs needs 'input_ids'; it has {sorted(inputs)}", at=loc)
        ids = _dict_tensor(inputs, "input_ids", loc)
        mask = inputs.get("attention_mask")
        if mask is None:
            return [r.tolist() for r in ids]
        mask = _dict_tensor(inputs, "attention_mask", loc)
        if mask.shape != ids.shape:
            raise InputError(
                f"attention_mask has shape {tuple(mask.shape)} but input_ids has shape {tuple(ids.shape)}", at=loc,
                hint="Pass an attention_mask of the same shape as input_ids (as the tokenizer returns them), or "
                "leave it out.")
        return [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    raise InputError(f"cannot use {type(inputs).__name__} as model input", at=loc,
                     hint="Pass a string, a list of strings, token ids (list[int] or a LongTensor) or a "
                     "tokenizer's BatchEncoding.")


def _dict_tensor(inputs: Mapping, key: str, loc: Location) -> torch.Tensor:
    """``inputs[key]`` as a 2-D integer tensor (a 1-D one is one row)."""
    try:
        value = torch.as_tensor(inputs[key])
    except (ValueError, TypeError, RuntimeError) as e:
        raise InputError(f"{key} cannot be made a tensor: {e}", at=loc,
                         hint=f"Pass {key} as a tensor or as lists of equal length (use the tokenizer with "
                         "padding=True, return_tensors='pt').") from None
    if key == "input_ids" and (value.dtype.is_floating_point or value.dtype.is_complex):
        raise InputError(f"{key} must hold integers, got dtype {value.dtype}", at=loc,
                         hint=f"Pass {key} as a LongTensor.")
    if value.dim() not in (1, 2):
        raise InputError(f"{key} must be 1-D or 2-D, got shape {tuple(value.shape)}", at=loc,
                         hint="Pass one row per prompt: shape (prompts, tokens).")
    return value[None] if value.dim() == 1 else value


def _tokenize(texts: list[str], tokenizer, loc: Location) -> list[list[int]]:
    if tokenizer is None:
        raise InputError("text prompts need a tokenizer, and this model has none", at=loc,
                         hint="Pass tokenizer=... to LanguageModel, or give token ids.")
    rows = backend_ids(tokenizer, texts)
    if rows is not None:
        return rows
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def backend_ids(tokenizer, texts: list[str]) -> list[list[int]] | None:
    """``tokenizer(texts, add_special_tokens=True)["input_ids"]`` from the Rust tokenizer behind it, where that
    is what the call would do; else ``None`` (the call is made).

    transformers' call of a fast tokenizer sets the backend's truncation, padding and special-token
    splitting and calls its ``encode_batch``: with no truncation or padding asked for, it takes them off
    and keeps the tokenizer's own ``split_special_tokens``. Where the backend is already so, the ids are
    the backend's, without the ~10 us of Python around them per call (a trace tokenizes each invoke). A
    tokenizer of another class, a backend left truncating or padding by an earlier call, a seq2seq
    tokenizer's target mode, or a row longer than the tokenizer's maximum (the call warns) take the call.
    """
    if not _plain_fast_tokenizer(type(tokenizer)) or "_encode_plus" in tokenizer.__dict__:
        return None
    backend = tokenizer.__dict__.get("_tokenizer")
    try:
        if (backend is None or backend.truncation is not None or backend.padding is not None
                or backend.encode_special_tokens != bool(tokenizer.split_special_tokens)
                or tokenizer._in_target_context_manager):
            return None
        # one ``encode`` per text: ``encode_batch`` hands even one text to the backend's thread pool, whose
        # wake-up costs more than the text (~25 us against ~4 us, and the pool warns after a fork)
        rows = [backend.encode(text, add_special_tokens=True).ids for text in texts]
    except Exception:  # noqa: BLE001 - another backend or a transformers that differs: its own call decides
        return None
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and any(len(r) > limit for r in rows):
        return None
    return rows


@functools.cache
def _plain_fast_tokenizer(cls: type) -> bool:
    """Whether ``cls`` tokenizes as transformers' fast tokenizer does (its call, strategies and encoding are
    transformers' own, and it has no input/target modes)."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    return (issubclass(cls, TokenizersBackend) and cls.__call__ is PreTrainedTokenizerBase.__call__
            and cls._encode_plus is TokenizersBackend._encode_plus
            and cls._get_padding_truncation_strategies is PreTrainedTokenizerBase._get_padding_truncation_strategies
            and cls.set_truncation_and_padding is TokenizersBackend.set_truncation_and_padding
            and cls._convert_encoding is TokenizersBackend._convert_encoding
            and not hasattr(cls, "_switch_to_input_mode"))


@dataclass
class Batch:
    """A left-padded batch: ``input_ids``, ``attention_mask``, ``position_ids``, shape (rows, width)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    @property
    def lengths(self) -> list[int]:
        return self.attention_mask.sum(-1).tolist()


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> Batch:
    """One batch from token rows, padded on the left with ``pad_id``."""
    width = max(len(r) for r in rows)
    # padded as Python lists and made tensors in one call each: a copy per row costs ~30 us of dispatch
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    position_ids = torch.tensor([[0] * (width - len(r)) + list(range(len(r))) for r in rows], dtype=torch.long)
    return Batch(ids.to(device), mask.to(device), position_ids.to(device))
