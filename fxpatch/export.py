"""Export a Hugging Face model once into a ``SiteGraph``: an FX graph with a
named ``site`` node at every module's inputs and outputs.

``export_sites(model, entry, example)`` traces ``entry`` (a small wrapper
module around the model, one per run mode: forward now, prefill and decode
steps for generation) with ``torch.export`` (non-strict, dynamic batch and
sequence dims). During the export only, forward hooks pass each tensor that
enters or leaves a module through ``fxpatch::site``; they are removed before it
returns. transformers' own export patches (``transformers.exporters``) are
applied while tracing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim

from .passes.ops import site
from .structure import Spec, flatten, unflatten


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

    Example::

        sg = model.site_graph("forward")
        sg.modules["transformer.h.0"]["output"].leaves   # ['transformer.h.0.output']
    """

    graph_module: torch.fx.GraphModule
    state: list[tuple[str, Any]]  # ("param" | "buffer" | "constant", fqn or tensor)
    inputs: list[str]
    outputs: list[str]
    modules: dict[str, dict[str, ModuleSites]]
    export_seconds: float
    input_names: list[str] = field(default_factory=list)

    def owner(self, name: str) -> tuple[str, str]:
        """``(module path, kind)`` of the site called ``name``."""
        if not hasattr(self, "_owners"):
            self._owners = {n: (m, k) for m, kinds in self.modules.items() for k, ms in kinds.items()
                            for n, is_site in zip(ms.leaves, ms.is_site) if is_site}
        return self._owners[name]

    def state_values(self, model: torch.nn.Module) -> list[Any]:
        """The model's current parameters and buffers, in placeholder order."""
        params = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers(remove_duplicate=False))
        out = []
        for kind, ref in self.state:
            if kind == "param":
                out.append(params[ref])
            elif kind == "buffer":
                out.append(buffers[ref])
            else:
                out.append(ref)
        return out


def site_name(module: str, kind: str, key: str) -> str:
    """``transformer.h.3.output``, ``transformer.h.3.inputs[0][0]``, ``output['logits']``."""
    return f"{module}.{kind}{key}" if module else f"{kind}{key}"


def _site_tree(module: str, kind: str, value: Any, record: dict) -> Any:
    leaves, spec = flatten(value)
    out, names, flags = [], [], []
    for key, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            name = site_name(module, kind, key)
            out.append(site(leaf, name))
            names.append(name)
            flags.append(True)
        else:
            out.append(leaf)
            names.append(leaf if _is_constant(leaf) else Opaque(type(leaf).__name__))
            flags.append(False)
    sites = ModuleSites(module, kind, spec, names, flags)
    record.setdefault(module, {}).setdefault(kind, sites)
    return unflatten(spec, out)


def _is_constant(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device))


@dataclass(frozen=True)
class Opaque:
    """A non-tensor argument that is not a plain constant (a cache, a config): shown, never kept."""

    type_name: str

    def __repr__(self) -> str:
        return f"<{self.type_name}>"


@contextlib.contextmanager
def _site_hooks(model: torch.nn.Module, record: dict):
    handles = []
    try:
        for path, module in model.named_modules(remove_duplicate=False):
            def pre(mod, args, kwargs, path=path):
                return _site_tree(path, "inputs", (args, kwargs), record)

            def post(mod, args, kwargs, output, path=path):
                return _site_tree(path, "output", output, record)

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
                 dynamic_shapes: dict[str, Any] | None = None, prefix: str = "model.") -> SiteGraph:
    """Export ``entry`` (which holds ``model`` at attribute ``prefix``) with sites.

    ``example`` holds keyword inputs (tensors or lists of tensors); without
    ``dynamic_shapes`` every dim is ``Dim.AUTO``. Returns a ``SiteGraph``; the
    model is left as it was.
    """
    with TRACING_LOCK:
        return _export_sites(model, entry, example, dynamic_shapes, prefix)


# torch.export, make_fx and transformers' export patches change process-wide state while they
# trace; threads take turns through them.
TRACING_LOCK = threading.RLock()


def _export_sites(model, entry, example, dynamic_shapes, prefix) -> SiteGraph:
    record: dict[str, dict[str, ModuleSites]] = {}
    dynamic = dynamic_shapes or {k: _all_dynamic(v) for k, v in example.items()}
    start = time.perf_counter()
    with torch.no_grad(), _transformers_export_patches(model), _site_hooks(model, record):
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
    return SiteGraph(ep.graph_module, state, inputs, outputs, record, seconds, list(example))
