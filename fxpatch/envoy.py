"""``Envoy``: a module of the user's model, seen from inside a trace.

``model.transformer.h[3].mlp`` walks the module tree; ``.output``,
``.input`` and ``.inputs`` read the module's values for the current invoke
and can be assigned; calling an envoy on a traced value applies the module to
it (the logit lens: ``model.lm_head(model.transformer.ln_f(h))``).

Example::

    with model.trace("Hello world"):
        model.transformer.h[0].mlp.output[:, -1] = 0
        out = model.lm_head.output.save()
"""

from __future__ import annotations

import difflib
from typing import Any

import torch

from .active import active_tracer
from .errors import FxpatchError, ModulePathError, user_location
from .model_values import typed_output, visible_inputs
from .module_values import write_element
from .proxy import Proxy
from .structure import flatten

_VALUES = ("output", "input", "inputs")


class Envoy:
    """Wraps one ``torch.nn.Module`` at ``path`` (``""`` for the model itself)."""

    def __init__(self, model, module: torch.nn.Module, path: str):
        object.__setattr__(self, "_lm", model)
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)

    # -- the module tree -------------------------------------------------------------
    def _child(self, name: str) -> Envoy:
        module = self._module._modules[name]
        # kept, as NNsight keeps its envoy tree: every read walks the path again (model.transformer.h[3])
        children = self.__dict__.get("_children")
        if children is None:
            children = {}
            object.__setattr__(self, "_children", children)
        child = children.get(name)
        if child is None or child._module is not module:  # a module replaced since is wrapped anew
            path = f"{self._path}.{name}" if self._path else name
            child = children[name] = Envoy(self._lm, module, path)
        return child

    def _alias(self, name: str) -> Envoy | None:
        """The module ``name`` names here through the model's ``rename=`` aliases, if it does."""
        aliases = self._lm.__dict__.get("_renamed")
        target = aliases.get(self._path, name) if aliases else None
        if target is None:
            return None
        return Envoy(self._lm, self._lm._model.get_submodule(target), target)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self._module._modules and self._module._modules[name] is not None:
            return self._child(name)
        alias = self._alias(name)
        if alias is not None:
            return alias
        try:
            return getattr(self._module, name)
        except AttributeError:
            pass
        where = self._path or "the model"
        children = list(self._module._modules)
        close = difflib.get_close_matches(name, children, n=3, cutoff=0.5)
        all_paths = [p for p, _ in self._lm._model.named_modules() if p]
        close += [p for p in difflib.get_close_matches(
            f"{self._path}.{name}" if self._path else name, all_paths, n=3, cutoff=0.6) if p not in close]
        hint = (f"Did you mean {', '.join(repr(c) for c in close)}? " if close else "") + \
            f"Modules under {where}: {', '.join(children) if children else '(none)'}."
        raise ModulePathError(f"{type(self._module).__name__} at {where!r} has no module or attribute {name!r}",
                              at=user_location(), hint=hint)

    def __getitem__(self, index):
        names = list(self._module._modules)
        if isinstance(index, slice):
            return [self._child(n) for n in names[index]]
        if isinstance(index, int):
            try:
                return self._child(names[index])
            except IndexError:
                raise ModulePathError(
                    f"{self._path or 'the model'} has {len(names)} modules; index {index} is out of range",
                    at=user_location(), hint=f"Use an index from 0 to {len(names) - 1} (or negative).") from None
        if isinstance(index, str) and index in self._module._modules:
            return self._child(index)
        if isinstance(index, str) and self._alias(index) is not None:
            return self._alias(index)
        raise ModulePathError(f"cannot index {self._path or 'the model'} with {index!r}", at=user_location())

    def __iter__(self):
        return (self._child(n) for n in self._module._modules)

    def __len__(self) -> int:
        return len(self._module._modules)

    def __repr__(self) -> str:
        return repr(self._module)

    # -- values inside a trace ------------------------------------------------------------
    def _tracer(self, what: str):
        tracer = active_tracer()
        # an edited copy (model.edit()) shares the wrapped module: either's envoys read its traces
        if tracer is None or tracer.model._model is not self._lm._model:
            raise FxpatchError(f"{self._path or 'model'}.{what} was used outside a trace of this model",
                               at=user_location(), hint="Use it inside `with model.trace(...)` (or generate).")
        return tracer

    @property
    def output(self) -> Any:
        """The module's output for the current invoke (a proxy, or a tuple/dict of them).

        A transformers ``ModelOutput`` (``model.output``: logits) is one again once saved and
        the trace has run, as NNsight gives it.
        """
        tracer = self._tracer("output")
        return typed_output(tracer, self._path, tracer.read(self._path, "output"))

    @property
    def inputs(self) -> Any:
        """``(args, kwargs)`` the module was called with, for the current invoke."""
        tracer = self._tracer("inputs")
        return visible_inputs(tracer, self._path, tracer.read(self._path, "inputs"))

    @property
    def input(self) -> Any:
        """The module's first input: its first positional argument, else its first keyword argument."""
        tracer = self._tracer("input")
        return _first_input(visible_inputs(tracer, self._path, tracer.read(self._path, "inputs")))

    @property
    def source(self) -> Any:
        """The operations of the module's ``forward``, named as NNsight's ``.source`` names them
        (``fxpatch/source_envoy.py``; a child module called ``source`` is reached as ``envoy["source"]``).

        Example::

            print(model.transformer.h[0].mlp.source)
            with model.trace("Hello"):
                act = model.transformer.h[0].mlp.source.self_act_0.output.save()
        """
        from .source_envoy import Source

        return Source(self)

    def skip(self, value: Any) -> None:
        """The module does not run in this invoke: ``value`` is its output (NNsight's ``skip``).

        Reading a value inside the skipped module in the same invoke is an error. When every
        invoke skips it, the module's computation is not in the graph that runs; fxpatch also
        lets a single invoke skip it (NNsight requires all), the other rows computing as usual.

        Example::

            with model.trace("Hello"):
                model.transformer.h[0].skip(model.transformer.h[0].input)   # layer 0 passes its input on
                out = model.lm_head.output.save()
        """
        from .control import skip_module

        skip_module(self._tracer("skip"), self._path, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _VALUES:
            raise FxpatchError(f"cannot set {name!r} on a module envoy", at=user_location(),
                               hint="Assign to .output, .input or .inputs.")
        tracer = self._tracer(name)
        current = tracer.read(self._path, "output" if name == "output" else "inputs")
        if name != "output":
            current = visible_inputs(tracer, self._path, current, keep_hidden=False)
        if name == "input":
            current = _first_input(current)
        _assign_structure(current, value, f"{self._path}.{name}")

    def __call__(self, *args, **kwargs) -> Any:
        tracer = active_tracer()
        if tracer is None or not _has_proxy((args, kwargs)):
            return self._module(*args, **kwargs)
        return tracer.record("call_module", self._path, args, kwargs)


def _first_input(inputs) -> Any:
    args, kwargs = inputs
    return args[0] if len(args) else next(iter(kwargs.values()))


def _has_proxy(value) -> bool:
    leaves, _ = flatten(value)
    return any(isinstance(v, Proxy) for _, v in leaves)


def _assign_structure(current: Any, value: Any, where: str) -> None:
    """Assign ``value`` to a module value whose current proxies are ``current``."""
    if isinstance(current, Proxy):
        write_element(current, value)
        return
    cur_leaves, cur_spec = flatten(current)
    new_leaves, new_spec = flatten(value)
    if len(cur_leaves) != len(new_leaves) or isinstance(value, (Proxy, torch.Tensor)):
        raise FxpatchError(
            f"{where} is a {cur_spec.kind} of {len(cur_leaves)} values, but a "
            f"{'single value' if new_spec.kind == 'leaf' else f'{new_spec.kind} of {len(new_leaves)}'} was assigned",
            at=user_location(),
            hint=f"Assign one element ({where}[0] = ...) or a {cur_spec.kind} of the same structure.")
    for (_, old), (_, new) in zip(cur_leaves, new_leaves):
        if new is old:
            continue
        if isinstance(old, Proxy):
            write_element(old, new)
        elif new != old:
            raise FxpatchError(f"{where} holds a non-tensor value ({old!r}) that cannot be replaced",
                               at=user_location(), hint="Keep that element as it is.")
