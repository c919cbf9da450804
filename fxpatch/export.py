"""Export a Hugging Face model once into a ``SiteGraph``: an FX graph with a
named ``site`` node at every module's inputs and outputs.

``export_sites(model, entry, example)`` traces ``entry`` (a small wrapper
module around the model, one per run mode: forward now, prefill and decode
steps for generation) with ``torch.export`` (non-strict, dynamic batch and
sequence dims). During the export only, forward hooks pass each tensor that
enters or leaves a module through ``fxpatch::site``; they are removed before it
returns. transformers' own export patches (``transformers.exporters``) are
applied while tracing. With a ``cache_dir`` the site graph is read from, and
written to, a disk cache (``fxpatch/export_cache.py``), so a second process
need not export the same model again.

A module the forward calls more than once (a weight-shared block, a module
applied in a loop) gets sites for every call: call 0 keeps the plain names
(``transformer.h.0.output``), call ``k`` is marked after the kind
(``transformer.h.0.output#1``, ``transformer.h.0.inputs#1[0][0]``), so no two
site nodes share a name. A module reachable by several paths (the same object
at ``transformer.h.0`` and ``transformer.h.1``) is hooked once and its sites are
named after its first path in ``named_modules`` order, as NNsight's envoy tree
names it; the other paths are aliases of it (``SiteGraph.aliases``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim

from .errors import user_location
from .passes.ops import is_site, site
from .source import add_op_sites, module_sources, unpacked_sites
from .structure import Spec, flatten, unflatten
from .watch import own_hooks

_log = logging.getLogger(__name__)


@dataclass
class ModuleSites:
    """What one module's inputs (``(args, kwargs)``) or output look like.

    ``leaves`` holds, in flatten order, a site name for each tensor leaf, the
    value itself for constant leaves (``None``, flags) and an ``Opaque`` marker
    for other objects (a cache), which are not kept from the export.
    """

    module: str
    kind: str  # "inputs" or "output"
    spec: Spec
    leaves: list[Any]
    is_site: list[bool]


@dataclass
class SiteGraph:
    """One exported run mode of a model.

    ``graph_module`` is the lifted ``torch.export`` graph: its placeholders
    are the parameters, buffers and constants (``state``), then ``inputs``.
    ``loaded_from`` is the disk cache entry it was read from (``None``: exported
    in this process); ``export_seconds`` is the time the export, or the read, took.

    ``modules[path][kind]`` is the module's first call; ``calls[path][kind]``
    lists every call in the order the forward made them (``calls[p][k][0]`` is
    ``modules[p][k]``). Both are keyed by every path of a module, an alias path
    (``aliases``: alias -> first path) sharing its first path's entries.

    Example::

        sg = model.site_graph("forward")
        sg.modules["transformer.h.0"]["output"].leaves   # ['transformer.h.0.output']
        [c.leaves for c in sg.calls["transformer.h.0"]["output"]]
        # [['transformer.h.0.output']]; a block run twice adds ['transformer.h.0.output#1']
        sg.owner("transformer.h.0.output#1"), sg.call_of("transformer.h.0.output#1")
        # ('transformer.h.0', 'output'), 1
    """

    graph_module: torch.fx.GraphModule
    state: list[tuple[str, Any]]  # ("param" | "buffer" | "constant", fqn or tensor)
    inputs: list[str]
    outputs: list[str]
    modules: dict[str, dict[str, ModuleSites]]
    export_seconds: float
    input_names: list[str] = field(default_factory=list)
    calls: dict[str, dict[str, list[ModuleSites]]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    loaded_from: str | None = None  # the disk cache entry it was read from (then export_seconds is the read's)
    # module path -> its forward's operations (``module.source``, fxpatch/source.py); the readable ones are in
    # ``calls`` as ``<path>.source.<op>``
    sources: dict[str, Any] = field(default_factory=dict)
    op_paths: list[str] = field(default_factory=list)  # the ``calls`` keys that are operations, not modules

    def cache_parts(self) -> dict[str, Any]:
        """What the disk cache keeps of this site graph: ``fxpatch.export_cache.save``'s ``parts``."""
        ops = set(self.op_paths)
        return {"graph_module": self.graph_module, "state": self.state, "inputs": self.inputs,
                "outputs": self.outputs, "export_seconds": self.export_seconds,
                "calls": {p: k for p, k in self.calls.items() if p not in self.aliases and p not in ops},
                "op_calls": {p: self.calls[p] for p in self.op_paths},
                "sources": {p: [m.why, m.status] for p, m in self.sources.items()}}

    def _site_index(self) -> dict[str, tuple[str, str, int]]:
        if not hasattr(self, "_sites"):
            # built from the first paths only, so a site's owner is the module's name, never an alias
            calls = self.calls or {m: {k: [ms] for k, ms in kinds.items()} for m, kinds in self.modules.items()}
            # an operation of ``.source`` that is a submodule's call lists that module's sites: not its own
            self._sites = {n: (m, k, i) for m, kinds in calls.items() if m not in self.aliases
                           for k, per_call in kinds.items() for i, ms in enumerate(per_call) if ms.module == m
                           for n, is_site in zip(ms.leaves, ms.is_site) if is_site}
        return self._sites

    def owner(self, name: str) -> tuple[str, str]:
        """``(module path, kind)`` of the site called ``name``, whichever call it belongs to."""
        path, kind, _ = self._site_index()[name]
        return path, kind

    def call_of(self, name: str) -> int:
        """Which call of its module (0 for the first) the site called ``name`` belongs to."""
        return self._site_index()[name][2]

    def position(self, name: str) -> int:
        """Where the site called ``name`` is in the graph's (execution) order; an earlier site has a smaller one.

        Tells which call of a module comes next after a given site, as NNsight's
        ``tracer.iter`` picks it for the reads that follow the first one in a step.
        """
        if not hasattr(self, "_positions"):
            self._positions = {n.args[1]: i for i, n in enumerate(self.graph_module.graph.nodes) if is_site(n)}
        return self._positions[name]

    def state_values(self, model: torch.nn.Module) -> list[Any]:
        """The model's current parameters, buffers and constants, in placeholder order."""
        return [table[name] if table is not None else name for table, name in self.state_access(model)]

    def state_access(self, model: torch.nn.Module) -> list[tuple[dict | None, Any]]:
        """Where each state placeholder's value lives in ``model``: ``(module._parameters, "weight")``,
        ``(module._buffers, "bias")``, or ``(None, constant)``. Valid while the module tree stays the same."""
        out: list[tuple[dict | None, Any]] = []
        for kind, ref in self.state:
            if kind in ("param", "buffer"):
                owner, _, name = ref.rpartition(".")
                module = model.get_submodule(owner)
                out.append((module._parameters if kind == "param" else module._buffers, name))
            else:
                out.append((None, ref))
        return out


def site_name(module: str, kind: str, key: str, call: int = 0) -> str:
    """``transformer.h.3.output``, ``transformer.h.3.inputs[0][0]``, ``output['logits']``; a later call of
    the module is marked after the kind: ``transformer.h.3.output#1``, ``transformer.h.3.inputs#1[0][0]``."""
    kind = f"{kind}#{call}" if call else kind
    return f"{module}.{kind}{key}" if module else f"{kind}{key}"


def sited(module: str, kind: str, call: int, value: Any) -> tuple[Any, ModuleSites]:
    """``value`` with each tensor leaf passed through a site named for ``module``'s ``kind`` (call
    ``call``), and the ``ModuleSites`` that records it. Example::

        out, sites = sited("transformer.h.0", "output", 0, (hidden, None))   # sites.leaves[1] is None
    """
    leaves, spec = flatten(value)
    out, names, flags = [], [], []
    for key, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            name = site_name(module, kind, key, call)
            out.append(site(leaf, name))
            names.append(name)
            flags.append(True)
        else:
            out.append(leaf)
            names.append(leaf if _is_constant(leaf) else Opaque(type(leaf).__name__))
            flags.append(False)
    return unflatten(spec, out), ModuleSites(module, kind, spec, names, flags)


def _site_tree(module: str, kind: str, call: int, value: Any, record: dict) -> Any:
    out, sites = sited(module, kind, call, value)
    record.setdefault(module, {}).setdefault(kind, {})[call] = sites
    return out


def _is_constant(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device))


@dataclass(frozen=True)
class Opaque:
    """A non-tensor argument that is not a plain constant (a cache, a config): shown, never kept."""

    type_name: str

    def __repr__(self) -> str:
        return f"<{self.type_name}>"


def module_paths(model: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """``(modules, aliases)``: each module object once, under its first path in ``named_modules``
    order (``""`` is the model), and every other path of one of them mapped to that first path.

    Example::

        model.transformer.h[1] = model.transformer.h[0]
        module_paths(model)[1]["transformer.h.1.mlp"]   # 'transformer.h.0.mlp'
    """
    first: dict[int, str] = {}
    modules: dict[str, torch.nn.Module] = {}
    aliases: dict[str, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if id(module) in first:
            aliases[path] = first[id(module)]
        else:
            first[id(module)] = path
            modules[path] = module
    return modules, aliases


@contextlib.contextmanager
def _site_hooks(model: torch.nn.Module, record: dict):
    handles = []
    try:
        # One pair of hooks per module object: hooking it once per path would wrap each of its calls in one
        # site per path, all carrying the same value.
        for path, module in module_paths(model)[0].items():
            started: list[int] = []  # calls begun and not yet returned; pairs a call's output with its inputs

            def pre(mod, args, kwargs, path=path, started=started):
                call = len(record.get(path, {}).get("inputs", ()))
                started.append(call)
                return _site_tree(path, "inputs", call, (args, kwargs), record)

            def post(mod, args, kwargs, output, path=path, started=started):
                return _site_tree(path, "output", started.pop(), output, record)

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _transformers_export_patches(model: torch.nn.Module):
    """transformers' reversible export patches, where this version has them."""
    try:
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model, reset_model_state
        from transformers.exporters.utils import apply_patches
    except ImportError:  # older transformers: plain torch.export
        yield
        return
    register_cache_pytrees_for_model(model)
    with apply_patches("dynamo"), reset_model_state(model):
        yield


def _all_dynamic(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return dict.fromkeys(range(value.dim()), Dim.AUTO)
    if isinstance(value, (list, tuple)):
        return type(value)(_all_dynamic(v) for v in value)
    return None


def export_sites(model: torch.nn.Module, entry: torch.nn.Module, example: dict[str, Any],
                 dynamic_shapes: dict[str, Any] | None = None, prefix: str = "model.",
                 cache_dir: str | os.PathLike | bool | None = False) -> SiteGraph:
    """Export ``entry`` (which holds ``model`` at attribute ``prefix``) with sites.

    ``example`` holds keyword inputs (tensors or lists of tensors); without
    ``dynamic_shapes`` every dim is ``Dim.AUTO``. Returns a ``SiteGraph``; the
    model is left as it was. With a ``cache_dir`` (``None``: the default one) the
    site graph is loaded from there when an earlier process exported the same model
    for the same mode, and written there after an export (``fxpatch.export_cache``).

    Example::

        sg = export_sites(hf_model, _Forward(hf_model, True), example, cache_dir=None)
        sg.loaded_from   # the cache entry's path, or None when it was exported
    """
    with TRACING_LOCK:
        from . import export_cache

        directory = export_cache.entries_dir(cache_dir)
        key = None
        if directory is not None:
            try:
                key = export_cache.cache_key(model, entry, example, dynamic_shapes, prefix)
            except Exception as e:  # noqa: BLE001 - a model the key cannot describe is exported, not cached
                _log.warning("fxpatch: not caching this export on disk: %s: %s", type(e).__name__, e)
        if key is not None:
            start = time.perf_counter()
            parts = export_cache.load(directory, key)
            if parts is not None:
                sources = module_sources(model, parts["sources"])
                return _site_graph(model, parts["graph_module"], parts["state"], parts["inputs"], parts["outputs"],
                                   parts["calls"], parts["op_calls"], sources, time.perf_counter() - start,
                                   list(example), parts["path"])
        sg = _export_sites(model, entry, example, dynamic_shapes, prefix)
        if key is not None:
            try:
                export_cache.save(directory, key, sg.cache_parts())
            except Exception as e:  # noqa: BLE001 - a full disk, a read-only folder: the next process exports
                _log.warning("fxpatch: could not write the export cache in %s: %s: %s", directory,
                             type(e).__name__, e)
        return sg


# torch.export, make_fx and transformers' export patches change process-wide state while they
# trace; threads take turns through them.
TRACING_LOCK = threading.RLock()


def _warn_of_user_hooks(model: torch.nn.Module) -> None:
    """Say, at the user's line, that the model's own hooks are being traced into the export: NNsight
    runs them at every forward pass, fxpatch runs the graph they were traced into."""
    hooked = [path or "the model" for path, m in model.named_modules(remove_duplicate=False) if own_hooks(m)]
    if own_hooks():
        hooked.insert(0, "every module (a global hook)")
    if not hooked:
        return
    loc = user_location()
    where = ", ".join(hooked[:3]) + (f" and {len(hooked) - 3} more" if len(hooked) > 3 else "")
    warnings.warn_explicit(
        f"hooks of your own on {where} are traced into fxpatch's export of the model: what they do to values "
        "is part of the graph every trace runs; anything else they do (keeping a tensor, counting calls) "
        "happened once, now, on fake tensors. Read values with .save() inside a trace instead, or remove the "
        "hooks (handle.remove()): the next trace then exports the model again without them.",
        UserWarning, loc.filename, loc.lineno)


def _export_sites(model, entry, example, dynamic_shapes, prefix) -> SiteGraph:
    _warn_of_user_hooks(model)
    record: dict[str, dict[str, dict[int, ModuleSites]]] = {}  # path -> kind -> call -> sites
    dynamic = dynamic_shapes or {k: _all_dynamic(v) for k, v in example.items()}
    start = time.perf_counter()
    unpacked: dict = {}  # tuples that forwards unpack (``.source``; fxpatch/source.py)
    with torch.no_grad(), _transformers_export_patches(model), _site_hooks(model, record), \
            unpacked_sites(module_paths(model)[0], unpacked):
        ep = torch.export.export(entry, (), dict(example), dynamic_shapes=dynamic, strict=False)
    seconds = time.perf_counter() - start

    sig = ep.graph_signature
    state, inputs = [], []
    for spec in sig.input_specs:
        kind = spec.kind.name
        if kind == "USER_INPUT":
            inputs.append(spec.arg.name)
        elif kind == "PARAMETER":
            state.append(("param", spec.target.removeprefix(prefix)))
        elif kind == "BUFFER":
            state.append(("buffer", spec.target.removeprefix(prefix)))
        else:
            state.append(("constant", ep.constants[spec.target]))
    outputs = [o.arg.name for o in sig.output_specs]
    # by call number: a call made inside another call of the same module returns (is recorded) first
    calls = {path: {kind: [per_call[i] for i in range(len(per_call))] for kind, per_call in kinds.items()}
             for path, kinds in record.items()}
    sources, op_calls = add_op_sites(ep.graph_module, model, prefix, calls, module_paths(model)[0], unpacked)
    return _site_graph(model, ep.graph_module, state, inputs, outputs, calls, op_calls, sources, seconds,
                       list(example))


def _site_graph(model, graph_module, state, inputs, outputs, calls, op_calls, sources, seconds, input_names,
                loaded_from=None) -> SiteGraph:
    """The ``SiteGraph`` of an exported (or loaded) graph: every module path, aliases included, gets its
    first path's site records; a forward's operations (``op_calls``, ``sources``: ``.source``) are read
    through their module's first path."""
    calls = {path: dict(kinds) for path, kinds in calls.items()}
    modules = {path: {kind: per_call[0] for kind, per_call in kinds.items()} for path, kinds in calls.items()}
    aliases = module_paths(model)[1]
    for table in (calls, modules):
        table.update({alias: table[path] for alias, path in aliases.items() if path in table})
    calls.update(op_calls)
    return SiteGraph(graph_module, state, inputs, outputs, modules, seconds, input_names, calls, aliases,
                     loaded_from, sources, list(op_calls))
