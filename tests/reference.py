"""An independent reference for fxpatch: the plain Hugging Face model, one prompt at a time.

Nothing here uses fxpatch's tracing. ``run_alone`` runs ``lm._model`` (the
wrapped ``PreTrainedModel``, float32, eval mode, under ``torch.no_grad``) on a
single prompt -- a batch of one row, no padding -- with ordinary
``register_forward_hook`` / ``register_forward_pre_hook`` hooks doing the edit,
and removes every hook afterwards, also when the run raises.

Modules are named by dotted paths (``"transformer.h.1.mlp"``) resolved with
``get_submodule``, so the helpers work for any architecture.

Example::

    ref = run_alone(lm, "hello", outputs={"transformer.h.0": lambda o: o * 2},
                    capture=["transformer.h.1"])
    ref.logits                      # (n_tokens, vocab)
    ref.outputs["transformer.h.1"]  # that module's output (batch dim of 1 kept)

Comparing a left-padded batch with this: ``unpad(batched, row, n)`` is row
``row``'s ``n`` real positions (the last ``n`` of the padded width).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

OutputEdit = Callable[[Any], Any]
"""Called with a module's output; returns the output the model goes on with."""

InputEdit = Callable[[tuple, dict], tuple[tuple, dict]]
"""Called with a module's ``(args, kwargs)``; returns the ``(args, kwargs)`` it is called with."""


@dataclass
class Run:
    """What one reference run gave: the logits and the captured module values."""

    logits: torch.Tensor  # (n_tokens, vocab): the single row's logits, batch dim dropped
    ids: list[int]
    outputs: dict[str, Any] = field(default_factory=dict)  # path -> output the model went on with
    inputs: dict[str, tuple[tuple, dict]] = field(default_factory=dict)  # path -> (args, kwargs) used


def token_ids(lm, prompt: str) -> list[int]:
    """The prompt's token ids, tokenized alone (the tokenizer's defaults, special tokens included)."""
    return list(lm.tokenizer(prompt)["input_ids"])


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _check_plain(model: torch.nn.Module) -> None:
    if model.training:
        raise AssertionError("the reference needs the model in eval mode")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise AssertionError(f"the reference needs a float32 model, got {dtypes}")


def run_alone(lm, prompt: str | list[int], *, outputs: Mapping[str, OutputEdit] | None = None,
              inputs: Mapping[str, InputEdit] | None = None, capture: Iterable[str] = ()) -> Run:
    """Run the plain HF model on ``prompt`` alone with hook edits.

    ``outputs`` maps module paths to edits of their output, ``inputs`` to edits
    of their ``(args, kwargs)``. Every path in ``capture`` records its (edited)
    inputs and output in the returned ``Run``. ``""`` names the model itself.
    """
    model = lm._model
    _check_plain(model)
    ids = token_ids(lm, prompt) if isinstance(prompt, str) else list(prompt)
    run = Run(logits=torch.empty(0), ids=ids)
    handles = []

    def output_hook(edit):
        def hook(module, args, output):
            return edit(output)
        return hook

    def input_hook(edit):
        def hook(module, args, kwargs):
            new_args, new_kwargs = edit(args, kwargs)
            return tuple(new_args), dict(new_kwargs)
        return hook

    def capture_hooks(path):
        def pre(module, args, kwargs):
            run.inputs[path] = (_clone(args), _clone(kwargs))

        def post(module, args, output):
            run.outputs[path] = _clone(output)
        return pre, post

    try:
        # Edits are registered first, so the capture hooks (run in registration order) see edited values.
        for path, edit in (inputs or {}).items():
            handles.append(model.get_submodule(path).register_forward_pre_hook(input_hook(edit), with_kwargs=True))
        for path, edit in (outputs or {}).items():
            handles.append(model.get_submodule(path).register_forward_hook(output_hook(edit)))
        for path in capture:
            pre, post = capture_hooks(path)
            module = model.get_submodule(path)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post))
        input_ids = torch.tensor([ids], dtype=torch.long, device=lm.device)
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
        run.logits = out.logits[0].detach().clone()
    finally:
        for h in handles:
            h.remove()
    return run


def first_input(edit: Callable[[torch.Tensor], torch.Tensor]) -> InputEdit:
    """An ``InputEdit`` that replaces the module's first input (positional, else first keyword)."""
    def apply(args, kwargs):
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: edit(kwargs[key])}
    return apply


def element(index: int, edit: Callable[[torch.Tensor], torch.Tensor]) -> OutputEdit:
    """An ``OutputEdit`` that replaces element ``index`` of a tuple output (an attention module's)."""
    def apply(output):
        items = list(output)
        items[index] = edit(items[index])
        return tuple(items)
    return apply


def set_last(value: torch.Tensor | float) -> Callable[[torch.Tensor], torch.Tensor]:
    """An edit that sets the last position (``x[:, -1] = value``) on a copy."""
    def apply(x):
        x = x.clone()
        x[:, -1] = value
        return x
    return apply


def unpad(batched: torch.Tensor, row: int, n: int) -> torch.Tensor:
    """Row ``row`` of a left-padded ``(rows, width, ...)`` tensor, its ``n`` real positions only."""
    return batched[row, batched.shape[1] - n:]



@dataclass(frozen=True)
class Paths:
    """Dotted module paths of a decoder-only architecture (GPT-2 or Llama naming)."""

    layers: str  # the ModuleList of decoder layers
    attn_name: str  # attention module's name inside a layer
    embed: str
    norm: str  # final norm before the head
    head: str
    n_layers: int

    def layer(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def attn(self, i: int) -> str:
        return f"{self.layers}.{i}.{self.attn_name}"

    def mlp(self, i: int) -> str:
        return f"{self.layers}.{i}.mlp"


def paths(lm) -> Paths:
    """The module paths of ``lm``'s architecture."""
    model = lm._model
    if hasattr(model, "transformer"):
        return Paths("transformer.h", "attn", "transformer.wte", "transformer.ln_f", "lm_head",
                     len(model.transformer.h))
    return Paths("model.layers", "self_attn", "model.embed_tokens", "model.norm", "lm_head", len(model.model.layers))


def left_padded(lm, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` left-padded with the pad token, as fxpatch batches them, and the attention mask."""
    rows = [token_ids(lm, p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[lm.pad_token_id] * (width - len(r)) + r for r in rows], device=lm.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=lm.device)
    return ids, mask


def run_on_batch(lm, batch, hooks=()) -> torch.Tensor:
    """The plain HF model's logits on the batch fxpatch ran (``tracer.batch``: token ids, mask and, where the
    model takes them, positions), with ``hooks`` (``(module, forward hook)`` pairs) registered for the run, in
    the caller's grad mode."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    positions = {"position_ids": batch.position_ids} if "position_ids" in lm.site_graph().input_names else {}
    try:
        return lm._model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **positions).logits
    finally:
        for handle in handles:
            handle.remove()


def hf_run(lm, prompts: list[str], n: int, *, edits=(), capture=None, **settings):
    """HF ``generate`` on ``prompts`` left-padded into one batch (one prompt: no padding), greedy unless
    ``settings`` say; ``edits`` are ``(module, edit(output, step))`` forward hooks, ``capture`` is
    ``(module, list)`` collecting ``output[:, -1]`` per step. Returns what HF's generate returns."""
    model = lm._model
    ids, mask = left_padded(lm, prompts)
    calls: list[None] = []
    handles = [model.register_forward_pre_hook(lambda module, args: calls.append(None))]
    try:
        for module, edit in edits:
            handles.append(module.register_forward_hook(
                lambda m, args, output, edit=edit: edit(output, len(calls) - 1)))
        if capture is not None:
            module, values = capture
            handles.append(module.register_forward_hook(
                lambda m, args, output: values.append(output[:, -1].detach().clone())))
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n,
                                 **{"do_sample": False, "pad_token_id": lm.pad_token_id, **settings})
    finally:
        for h in handles:
            h.remove()
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    assert len(calls) == sequences.shape[1] - ids.shape[1], (len(calls), sequences.shape)
    return out


def kv(output) -> Any:
    """A ``GenerateDecoderOnlyOutput``'s KV cache (the field is ``past_key_values`` before transformers 5.2x)."""
    from fxpatch.generation import result_cache_field

    return getattr(output, result_cache_field())
