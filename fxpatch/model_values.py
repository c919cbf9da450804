"""Module values as NNsight shows them: the model's ``ModelOutput`` and ``model.inputs``.

``model.output`` (and any module whose output is a transformers ``ModelOutput``) reads as a dict of
traced values inside the trace (``out.logits``, ``out["logits"]``, ``out[0]``) and, saved, is the
``ModelOutput`` class itself after the trace (``CausalLMOutputWithCrossAttentions`` for GPT-2).

``model.inputs`` in a trace is what NNsight passes the model: ``input_ids`` and ``attention_mask``,
and ``position_ids`` when the batch is left-padded (NNsight 0.8 then adds positions counted from
each row's first token, as fxpatch does). fxpatch's own ``use_cache=False`` is not shown, and
neither are the ``position_ids`` it passes for a batch with no padding. Inside the block the
batch is known up to the invoke being recorded, so a value read before a later, longer prompt
shows ``position_ids`` only once saved and bound (the whole batch is known then).

Example::

    with model.trace("Hello") as tracer:
        out = model.output.save()
        args, kwargs = model.inputs
    type(out).__name__   # 'CausalLMOutputWithCrossAttentions'
"""

from __future__ import annotations

from typing import Any

from .module_values import SiteDict, SiteTuple
from .proxy import Proxy


class ModelOutputValue(SiteDict):
    """A module's ``ModelOutput`` inside a trace; bound after the trace as that class."""

    def __init__(self, items: Any, container: type):
        super().__init__(items)
        object.__setattr__(self, "_container", container)

    def _bound(self, items: list[tuple[str, Any]]) -> Any:
        """The ``ModelOutput`` holding ``items`` (the saved real values)."""
        return self._container(**dict(items))


def typed_output(tracer, path: str, value: Any) -> Any:
    """``value`` (a module's output as read) as a ``ModelOutputValue`` when the module returns a ``ModelOutput``."""
    if not isinstance(value, SiteDict):
        return value
    container = tracer.module_sites(path, "output", "output")[0].spec.container
    if container is None or container is dict or not hasattr(container, "to_tuple"):
        return value
    return ModelOutputValue(value.items(), container)


# what fxpatch passes the model that NNsight does not (position_ids only when no row is padded)
_ADDED = ("use_cache",)


class ModelKwargs(SiteDict):
    """The model's keyword inputs in a trace; bound with ``position_ids`` if the whole batch turned out
    left-padded after this was read."""

    def __init__(self, items: Any, tracer, later: Any):
        super().__init__(items)
        object.__setattr__(self, "_tracer", tracer)
        object.__setattr__(self, "_later", later)

    def _bound(self, items: list[tuple[str, Any]]) -> SiteDict:
        batch = self._tracer.batch
        if batch is not None and bool((batch.attention_mask == 0).any()):
            items = [*items, ("position_ids", self._later.value)]
        return SiteDict(items)


def visible_inputs(tracer, path: str, value: Any, keep_hidden: bool = True) -> Any:
    """The model's ``(args, kwargs)`` in a trace without the entries NNsight would not pass it.

    With ``keep_hidden``, ``position_ids`` left out because no row is padded *yet* is kept (saved)
    aside, to be bound if a later invoke pads the batch.
    """
    if path or tracer.mode != "forward" or not isinstance(value, tuple) or len(value) != 2:
        return value
    args, kwargs = value
    if not isinstance(kwargs, dict):
        return value
    lengths = {len(row) for invoke in tracer.invokes for row in invoke.rows}
    hidden = set(_ADDED) | ({"position_ids"} if len(lengths) <= 1 else set())
    items = [(k, v) for k, v in kwargs.items() if k not in hidden]
    later = kwargs.get("position_ids") if "position_ids" in hidden else None
    if keep_hidden and isinstance(later, Proxy):
        later.save()
        return SiteTuple((args, ModelKwargs(items, tracer, later)))
    return SiteTuple((args, SiteDict(items)))
