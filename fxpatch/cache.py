"""``tracer.cache(...)``: many modules' values at once, as NNsight 0.8's ``tracer.cache()`` records them.

``cache = tracer.cache()`` inside an invoke (or in ``model.trace(prompt)``) records every module's
output for that invoke's rows; after the block ``cache["model.transformer.h.0"].output`` (the full
path, the root module being ``model``) or ``cache.transformer.h[0].output`` (navigating the module
tree, renamed modules included) is the value. A value is what the model went on with: after the
interventions of the whole program, at whatever point of the invoke the cache was declared (fxpatch
records the cache's reads when the invoke's code ends; after ``tracer.stop()`` only the modules the model
finished before the point it stops at). In ``model.generate`` a module has one entry
per step that ran (and per call, for a module the forward calls several times): ``len(cache[path])``
is their number and ``.output`` their list; a single entry is the value itself.

``modules`` (envoys or paths) picks modules; ``include_inputs=True`` adds each module's
``(args, kwargs)`` (``.inputs``; ``.input`` is the first of them), ``include_output=False`` leaves
the outputs out. Each tensor is ``.detach()``ed (``detach=True``) and moved with
``.to(device=device, dtype=dtype)`` (``device`` defaults to the CPU, ``None`` leaves it where it is).

Example::

    with model.trace("The Eiffel Tower is in") as tracer:
        cache = tracer.cache(modules=[model.transformer.h[0], "model.transformer.h.1"], include_inputs=True)
    cache["model.transformer.h.0"].output.shape   # (1, n_tokens, hidden)
    cache.transformer.h[1].input                  # the block's hidden-state input
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .envoy import Envoy
from .errors import FxpatchError, InputError, ModulePathError, user_location
from .model_values import typed_output, visible_inputs
from .module_values import build_container
from .passes.diagnostics import Location
from .structure import unflatten

ROOT = "model"  # the root module's name in cache keys, as NNsight names it


@dataclass
class Entry:
    """One call of a module: its output and/or its ``(args, kwargs)`` (``None`` when not recorded)."""

    output: Any = None
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    @property
    def input(self) -> Any:
        """The first input: the first positional argument, else the first keyword argument."""
        if self.inputs is None:
            return None
        args, kwargs = self.inputs
        values = list(args) + list(kwargs.values())
        return values[0] if values else None


class Cache:
    """The modules one ``tracer.cache(...)`` records, their reads, and after the run their values."""

    def __init__(self, tracer: Any, invoke: Any, paths: list[str] | None, device: Any, dtype: Any, detach: bool,
                 include_output: bool, include_inputs: bool, non_blocking: bool, loc: Location):
        self.tracer, self.invoke, self.paths, self.loc = tracer, invoke, paths, loc
        self.device, self.dtype, self.detach, self.non_blocking = device, dtype, detach, non_blocking
        self.kinds = [k for k, on in (("inputs", include_inputs), ("output", include_output)) if on]
        self._reads: dict[str, list[tuple[int, dict[str, Any]]]] = {}  # path -> [(step, kind -> value)]
        self._entries: dict[str, list[Entry]] | None = None

    # -- recording ------------------------------------------------------------------------------
    def record(self) -> None:
        """Read every chosen module in every step, for the invoke's rows (at the end of its code)."""
        tracer = self.tracer
        steps = range(tracer.max_new_tokens) if hasattr(tracer, "max_new_tokens") else [0]
        outer = tracer.phase
        try:
            for step in steps:
                tracer.phase = step
                self._record_step(step)
        finally:
            tracer.phase = outer

    def _record_step(self, step: int) -> None:
        tracer = self.tracer
        sg = tracer.model.site_graph(tracer.mode)
        ops = set(sg.op_paths)  # a forward's operations (``.source``) are not modules: NNsight's cache has none
        paths = self.paths if self.paths is not None else [p for p in sg.calls if p not in sg.aliases and p not in ops]
        # tracer.stop(): the model computes nothing after the point reached, so modules beyond it have no values
        limit = min((point for point, _, _ in tracer.stops), default=None)
        order = []
        for path in paths:
            kinds = sg.calls.get(sg.aliases.get(path, path), {})
            first = [sites for kind in self.kinds for sites in kinds.get(kind, ())[:1]]
            positions = [tracer._position(n) for s in first for n, on in zip(s.leaves, s.is_site) if on]
            every = [tracer._position(n) for kind in self.kinds for s in kinds.get(kind, ())
                     for n, on in zip(s.leaves, s.is_site) if on]
            if limit is not None and any(p > limit for p in every):
                continue
            if first:
                order.append((min(positions, default=-1), path))
        for _, path in sorted(order, key=lambda o: o[0]):
            real = sg.aliases.get(path, path)
            per_kind = {kind: sg.calls[real].get(kind, []) for kind in self.kinds}
            for call in range(max(len(c) for c in per_kind.values())):
                values = {kind: self._read(path, kind, calls[call])
                          for kind, calls in per_kind.items() if call < len(calls)}
                self._reads.setdefault(path, []).append((step, values))

    def _read(self, path: str, kind: str, sites: Any) -> Any:
        tracer = self.tracer
        leaves = []
        for name, is_site in zip(sites.leaves, sites.is_site):
            if is_site:
                proxy = tracer._read_leaf(name, self.invoke)
                proxy.node.meta["fxpatch_loc"] = self.loc
                proxy.save()
                leaves.append(proxy)
            else:
                leaves.append(name)
        value = unflatten(sites.spec, leaves, build_container)
        return typed_output(tracer, path, value) if kind == "output" else visible_inputs(tracer, path, value)

    # -- after the run ----------------------------------------------------------------------------
    def entries(self) -> dict[str, list[Entry]]:
        """``{"model.<path>": [Entry, ...]}`` in the order the model reaches the modules."""
        if self._entries is None:
            tracer = self.tracer
            if not tracer.finished:
                raise FxpatchError("the cache is read before its trace has run", at=user_location(),
                                   also=[("the cache was made at", self.loc)],
                                   hint="Read the cache after the `with` block; it is filled when the model runs.")
            from .saving import _replace_saved

            graphs = getattr(tracer, "graphs", None)  # a generation's steps that ran
            ran = set(graphs) if isinstance(graphs, dict) else {0}
            entries: dict[str, list[Entry]] = {}
            for path, reads in self._reads.items():
                key = f"{ROOT}.{path}" if path else ROOT
                entries[key] = [Entry(**{kind: self._transform(_replace_saved(v, {}, set()))
                                         for kind, v in values.items()})
                                for step, values in reads if step in ran]
            self._entries = entries
        return self._entries

    def _transform(self, value: Any) -> Any:
        def one(t: torch.Tensor) -> torch.Tensor:
            if self.detach:
                t = t.detach()
            if self.device is not None or self.dtype is not None:
                t = t.to(device=self.device, dtype=self.dtype, non_blocking=self.non_blocking)
            return t
        return _apply(value, one)


def _apply(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        items = {k: _apply(v, fn) for k, v in value.items()}
        return dict(items) if type(value) is dict else type(value)(**items)
    if isinstance(value, (list, tuple)):
        items = [_apply(v, fn) for v in value]
        return type(value)(items) if type(value) in (list, tuple) else tuple(items)
    return value


def make_cache(tracer: Any, modules: Any, device: Any, dtype: Any, detach: bool, include_output: bool,
               include_inputs: bool, non_blocking: bool) -> CacheView:
    """``tracer.cache(...)``: checks the arguments, and records the reads when the invoke's code ends."""
    loc = user_location()
    invoke = tracer._require_invoke("tracer.cache()")
    if not include_output and not include_inputs:
        raise InputError("tracer.cache(include_output=False, include_inputs=False) records nothing", at=loc,
                         hint="Leave include_output=True, or pass include_inputs=True.")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise InputError(f"tracer.cache(dtype={dtype!r}) is not a torch.dtype", at=loc,
                         hint="Pass a torch.dtype such as torch.float16, or None to keep the model's.")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise InputError(f"tracer.cache(device={device!r}) is not a device", at=loc,
                             hint='Pass a device such as "cpu" or "cuda:0", or None to leave the values where '
                             "they are.") from e
    paths = None if modules is None else [_path_of(tracer.model, m, loc) for m in _as_list(modules)]
    cache = Cache(tracer, invoke, paths, device, dtype, detach, include_output, include_inputs, non_blocking, loc)
    invoke.__dict__.setdefault("caches", []).append(cache)
    return CacheView(cache, None)


def _as_list(modules: Any) -> list:
    return [modules] if isinstance(modules, (str, Envoy)) else list(modules)


def _path_of(model: Any, module: Any, loc: Location) -> str:
    """The module path a ``modules=`` entry names: an envoy, or a path with or without the leading ``model.``."""
    if isinstance(module, Envoy):
        if module._lm._model is not model._model:
            raise InputError("tracer.cache(modules=...) names a module of another model", at=loc,
                             hint="Pass this model's modules (model.transformer.h[0]) or their paths.")
        return module._path
    if not isinstance(module, str):
        raise InputError(f"tracer.cache(modules=...) takes module envoys or paths, not {type(module).__name__}",
                         at=loc, hint='Pass e.g. [model.transformer.h[0], "model.transformer.h.1"].')
    parts = module.split(".") if module else []
    if parts[:1] == [ROOT] and not _has_child(model, ROOT, parts):
        parts = parts[1:]
    envoy = model
    try:
        for part in parts:
            envoy = envoy[int(part)] if part.lstrip("-").isdigit() else getattr(envoy, part)
    except ModulePathError as e:
        raise ModulePathError(f"tracer.cache(modules=...) names {module!r}, which is not a module of the model: "
                              f"{e.message if hasattr(e, 'message') else e}", at=loc,
                              hint='Name modules by their paths, as "model.transformer.h.0" or '
                              '"transformer.h.0".') from None
    if not isinstance(envoy, Envoy):
        raise ModulePathError(f"tracer.cache(modules=...) names {module!r}, which is not a module", at=loc,
                              hint='Name modules by their paths, as "model.transformer.h.0".')
    return envoy._path


def _has_child(model: Any, name: str, parts: list[str]) -> bool:
    """Whether ``parts`` reads as a path from the model's own child ``name`` (Llama's ``model.layers``)
    rather than from the root called ``model``: the root reading wins, as in NNsight, unless only the
    child's fits."""
    if name not in model._model._modules:
        return False
    try:
        model._model.get_submodule(".".join(parts[1:]))
        return False
    except AttributeError:
        return True


class CacheView:
    """What ``tracer.cache()`` returns: the recorded values by path or by navigating the module tree.

    ``cache["model.transformer.h.0"]``, ``cache.transformer.h[0]`` and ``cache.model.transformer.h[0]``
    name one module; ``.output``, ``.inputs`` and ``.input`` are its value (a list of them when it has
    several entries), ``len(view)`` the number of entries, ``cache.keys()`` the recorded paths.

    Example::

        with model.generate("Hello", max_new_tokens=3) as tracer:
            cache = tracer.cache(modules=[model.lm_head])
        [logits.shape for logits in cache.lm_head.output]   # one per step
    """

    def __init__(self, cache: Cache, envoy: Envoy | None, path: str | None = None):
        object.__setattr__(self, "_cache", cache)
        object.__setattr__(self, "_envoy", envoy)
        object.__setattr__(self, "_path", path)

    def _key(self) -> str | None:
        if self._path is not None:
            return self._path
        if self._envoy is None:
            return None
        return f"{ROOT}.{self._envoy._path}" if self._envoy._path else ROOT

    def _entries(self) -> list[Entry]:
        key = self._key()
        if key is None:
            raise KeyError("the cache root is not a module; pick one: cache['model.transformer.h.0']")
        entries = self._cache.entries()
        if key not in entries:
            raise KeyError(f"{key!r} was not cached")
        return entries[key]

    def _values(self, attr: str) -> Any:
        values = [getattr(entry, attr) for entry in self._entries()]
        return values[0] if len(values) == 1 else values

    @property
    def output(self) -> Any:
        """The module's output (a list of outputs when it has several entries)."""
        return self._values("output")

    @property
    def inputs(self) -> Any:
        """The module's ``(args, kwargs)`` (``include_inputs=True``)."""
        return self._values("inputs")

    @property
    def input(self) -> Any:
        """The module's first input (``include_inputs=True``)."""
        return self._values("input")

    def keys(self) -> list[str]:
        """The cached module paths at or below this node (all of them at the root)."""
        prefix = self._key()
        keys = list(self._cache.entries())
        if prefix is None or prefix == ROOT:
            return keys
        return [k for k in keys if k == prefix or k.startswith(prefix + ".")]

    def __getattr__(self, name: str) -> CacheView:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._navigate(self._child(name))

    def __getitem__(self, key: str | int) -> CacheView:
        if isinstance(key, int):
            if self._envoy is None:
                raise KeyError(f"the cache root has no module {key}; start from a module: cache.transformer.h[{key}]")
            return self._navigate(self._envoy[key])
        if "." in key:
            if key in self._cache.entries():
                return CacheView(self._cache, None, path=key)
            view = CacheView(self._cache, None)
            for part in key.split("."):
                view = view._navigate(view._child(part))
            return view
        return self._navigate(self._child(key))

    def __contains__(self, key: str) -> bool:
        try:
            node = self[key]
        except (AttributeError, IndexError, KeyError):
            return False
        return node._key() in self._cache.entries()

    def __len__(self) -> int:
        return len(self._entries())

    def __repr__(self) -> str:
        key = self._key()
        if not self._cache.tracer.finished:
            return f"CacheView({'root' if key is None else repr(key)}, not run yet)"
        return f"CacheView({'root' if key is None else repr(key)}, cached={self.keys()})"

    def _child(self, name: str) -> Any:
        if self._envoy is None:
            model = self._cache.tracer.model
            return model if name == ROOT else getattr(model, name)
        if name.lstrip("-").isdigit():
            return self._envoy[int(name)]
        return getattr(self._envoy, name)

    def _navigate(self, node: Any) -> CacheView:
        if not isinstance(node, Envoy):
            raise AttributeError(f"{node!r} is not a module")
        return CacheView(self._cache, node)


def record_caches(invoke: Any) -> None:
    """Record the reads of the caches made in ``invoke`` (at the end of its code)."""
    for cache in invoke.__dict__.get("caches", ()):
        cache.record()


