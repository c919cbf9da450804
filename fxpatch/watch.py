"""Whether the wrapped model may have changed since its exports were made: checked at every trace.

An export captures more than weights: the module objects (their code), their settings and their
config's (train/eval mode, ``eps``, an attention's ``scaling``: values the forward reads), the
user's hooks (traced into it), an instance-level ``forward`` patch, the code of their classes
and of the Python modules defining them (a monkeypatch), and each parameter's and buffer's
dtype, device and shape. ``model_fingerprint`` is all of that as one tuple, made by a
walk of the module tree (0.17 ms for the tiny GPT-2, 0.3 ms for GPT-2 small).

``ModelWatch`` spares most traces that walk. CPython gives every dict a version that changes with
any write to it (PEP 509; torch's dynamo guards read it as ``dict_version``), so a module whose
``__dict__``, parameter, buffer and child dicts keep their versions has had nothing assigned,
added or removed; the same holds for the dicts of its classes and of their Python modules. A hook
dict that held hooks is watched by its version too; one that held none must still hold none,
which is looked at only when a hook was registered anywhere since (``RemovableHandle.next_id``
moved on). A parameter's or buffer's dtype, device and shape (changed under the same
``Parameter`` by ``.to()``, ``.half()`` or ``p.data = ...``) are checked by dynamo's
``TensorGuards`` in C++. Any difference only sends the trace to the full fingerprint, which
decides. For the tiny GPT-2 (60 modules): about 12-15 microseconds, against the walk's 0.17 ms.
"""

from __future__ import annotations

import functools
import gc
import inspect
import sys
import types
from operator import attrgetter
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

try:
    from transformers import PreTrainedConfig
except ImportError:  # its name before transformers 5
    from transformers import PretrainedConfig as PreTrainedConfig

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_WATCHED = ("_parameters", "_buffers", "_modules")


def model_fingerprint(model: torch.nn.Module, kept: list | None = None) -> tuple:
    """What an export of ``model`` depends on besides weight values.

    The module objects, their names, their settings (train/eval mode, and every
    attribute holding a number, string, flag, dtype or tuple of them, which the
    forward may read: ``_settings``), their config's settings, their hooks and the
    global ones (traced into the export), an instance-level ``forward``, every
    parameter's identity (tied weights are one graph input), dtype, device and
    shape, and every buffer's dtype, device and shape. Objects are named by ``id``;
    ``kept`` (a list) receives the modules, configs and ``forward`` patches, and
    whoever compares fingerprints keeps them alive so that no new object can take a
    recorded id (``del m.act; m.act = nn.ReLU()`` may otherwise reuse the old
    one's). Hooks are named by their handles' ids, which torch never reuses. Last,
    the code: every function (and class) in the dicts of the modules' classes and
    their bases and of the Python modules defining them (``code_of``), by id, so
    that a monkeypatch of a method or of a module function is a change too.

    Example::

        before = model_fingerprint(hf_model)
        hf_model.half()
        assert model_fingerprint(hf_model) != before
    """
    global_hooks = torch.nn.modules.module
    items: list = [tuple(_hook_ids(getattr(global_hooks, name, None)) for name in _GLOBAL_HOOKS)]
    add = items.append
    keep = kept.append if kept is not None else None
    configs: set[int] = set()
    modules: list = []
    stack = [model]
    pop, push = stack.pop, stack.append
    while stack:  # every trace a ModelWatch cannot vouch for runs this walk: flat appends
        module = pop()
        d = module.__dict__  # nn.Module keeps its dicts in its instance dict
        params, buffers, children = d["_parameters"], d["_buffers"], d["_modules"]
        add(id(module))
        modules.append(module)
        if keep is not None:
            keep(module)
        add(_settings(d, add, keep, configs))
        if d.get("_forward_hooks") or d.get("_forward_pre_hooks") or d.get("_backward_hooks") \
                or d.get("_backward_pre_hooks"):
            hooks = tuple(_hook_ids(d.get(name)) for name in _HOOKS)
            if any(hooks):
                add(("hooks", *hooks))
        if params:
            add(("parameters", *params))
            for p in params.values():
                if p is None:
                    add(None)
                else:
                    add(id(p)); add(p.dtype); add(p.device); add(p.shape)  # noqa: E702
        if buffers:
            add(("buffers", *buffers))
            for b in buffers.values():
                if b is None:
                    add(None)
                else:
                    add(b.dtype); add(b.device); add(b.shape)  # noqa: E702
        if children:
            add(("modules", *children))
            for child in children.values():
                if child is not None:
                    push(child)
    classes, namespaces = code_of(modules)
    for owner in (*classes, *namespaces):  # methods and module functions by id: a monkeypatch changes one
        entry, values = _code_entry(owner)
        add(entry)
        if keep is not None:
            keep(values)  # the list: it keeps them all alive
    return tuple(items)


# id(class or Python module) -> (it, its dict's version, its entry in fingerprints, the objects named there)
_CODE_ENTRIES: dict[int, tuple] = {}


def _code_entry(owner: type | types.ModuleType) -> tuple[tuple, list]:
    """``owner``'s functions as a fingerprint names them (by id), and those functions. Remade only after
    a write to its dict: the dicts of transformers' classes and modules hold thousands of entries, and a
    walk after a hook registered by hand would otherwise read them all."""
    version = None
    if dict_version_works():
        from torch._C._dynamo.guards import dict_version

        d = type_dict(owner) if isinstance(owner, type) else vars(owner)
        if d is not None:
            version = dict_version(d)
            cached = _CODE_ENTRIES.get(id(owner))
            if cached is not None and cached[0] is owner and cached[1] == version:
                return cached[2], cached[3]
    code = [(name, v) for name, v in vars(owner).items() if _is_code(v)]
    entry, values = (id(owner), *((name, id(v)) for name, v in code)), [v for _, v in code]
    if version is not None:
        _CODE_ENTRIES[id(owner)] = (owner, version, entry, values)
    return entry, values


def code_of(modules: list) -> tuple[list[type], list[types.ModuleType]]:
    """The classes of ``modules`` with their bases (``nn.Module`` and ``object`` left out), and the Python
    modules defining them: where the methods a forward calls live, and the functions it calls by name,
    so where a monkeypatch changes them (``GPT2MLP.forward = f``,
    ``modeling_gpt2.eager_attention_forward = f``).

    Example::

        classes, namespaces = code_of(list(hf_model.modules()))
        GPT2MLP in classes and modeling_gpt2 in namespaces   # True
    """
    classes: list[type] = []
    seen: set[type] = {torch.nn.Module, object}
    for module in {type(m): m for m in modules}.values():
        for cls in type(module).__mro__:
            if cls not in seen:
                seen.add(cls)
                classes.append(cls)
    namespaces = list({id(ns): ns for ns in (sys.modules.get(c.__module__) for c in classes)
                       if isinstance(ns, types.ModuleType)}.values())
    return classes, namespaces


def _is_code(value: Any) -> bool:
    return callable(value) or isinstance(value, (staticmethod, classmethod, property))


def function_of(value: Any) -> types.FunctionType | None:
    """The Python function behind a class or module attribute (a method, a static or class method, a
    property's getter, a partial, a decorated function's innermost), or None for anything else."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    elif isinstance(value, property):
        value = value.fget
    elif isinstance(value, functools.partial):
        value = value.func
    if not isinstance(value, types.FunctionType):
        return None
    try:
        value = inspect.unwrap(value)
    except ValueError:  # a cycle of __wrapped__
        return None
    return value if isinstance(value, types.FunctionType) else None


def type_dict(cls: type) -> dict | None:
    """The dict under a class's read-only ``__dict__`` view (CPython's ``mappingproxy`` refers to it), or None
    where the view refers to something else.

    Example::

        type_dict(list)["append"] is list.__dict__["append"]   # True
    """
    referents = gc.get_referents(vars(cls))
    return referents[0] if len(referents) == 1 and type(referents[0]) is dict else None


_PLAIN = frozenset({bool, int, float, str, type(None), torch.dtype, torch.device, torch.Size})
# what every nn.Module keeps in its dict, read by the walk itself or not read by a forward
_MODULE_STATE = frozenset(torch.nn.Module().__dict__) - {"training"} | {"_output_capturing_hooks_installed"}
# transformers' output-capturing hooks (``own_hooks``) and the flag saying they are there: no-ops in an export
_INERT_HOOKS_MODULE = "transformers.utils.output_capturing"


def _is_own(hook: Any) -> bool:
    """Not one of transformers' inert output-capturing hooks (``own_hooks``)."""
    return getattr(hook, "__module__", None) != _INERT_HOOKS_MODULE


def _hook_ids(hooks: dict | None) -> tuple:
    """The handle ids of ``hooks`` but transformers' inert output-capturing ones."""
    if not hooks:
        return ()
    return tuple(k for k, fn in hooks.items() if _is_own(fn))


def _settings(d: dict, add, keep, configs: set[int]) -> tuple:
    """An object's attributes that a forward may read as Python values: flags, sizes, names and
    tuples of them (``training``, ``scale_attn_weights``, ``eps``, ``normalized_shape``), in order.

    Other objects are left out (a list or dict can change without its owner's dict seeing it, so no
    ``ModelWatch`` could vouch for them), except an instance-level ``forward`` (by id; kept) and a
    transformers config, whose settings ``add`` records once per config (``configs``: ids seen)."""
    out = []
    for name, value in d.items():
        if name in _MODULE_STATE:
            continue
        if _is_plain(value):
            out.append(name)
            out.append(value)
        elif name == "forward" or isinstance(value, PreTrainedConfig):
            out.append(name)
            out.append(id(value))
            if keep is not None:
                keep(value)
            if name != "forward" and id(value) not in configs:
                configs.add(id(value))
                add(("config", id(value), _settings(value.__dict__, add, keep, configs)))
    return tuple(out)


def _is_plain(value: Any) -> bool:
    t = type(value)
    return t in _PLAIN or t is tuple and all(type(x) in _PLAIN for x in value)


def plain_settings(module: torch.nn.Module) -> list[list]:
    """A module's settings as ``_settings`` finds them, as JSON values (``[name, value]`` pairs; a
    dtype or device as its string): what a key of an export on disk names of the module.

    Example::

        plain_settings(torch.nn.LayerNorm(8))   # [["training", True], ["normalized_shape", [8]], ...]
    """
    def json_value(v):
        return [json_value(x) for x in v] if isinstance(v, tuple) else \
            str(v) if isinstance(v, (torch.dtype, torch.device)) else v

    return [[name, json_value(value)] for name, value in module.__dict__.items()
            if name not in _MODULE_STATE and _is_plain(value)]


def own_hooks(module: torch.nn.Module | None = None) -> list:
    """The hooks of ``module`` (of every module, with ``None``) that code outside transformers registered.

    transformers registers forward hooks of its own on a model called once with ``output_attentions`` or
    ``output_hidden_states``; they do nothing unless such a call is running, so an export (which makes
    no such call) runs them as no-ops: they are neither the user's code nor a reason not to cache.

    Example::

        handle = hf_model.transformer.h[0].register_forward_hook(lambda m, args, out: out * 2)
        len(own_hooks(hf_model.transformer.h[0]))   # 1
    """
    if module is None:
        dicts = [getattr(torch.nn.modules.module, name, None) for name in _GLOBAL_HOOKS]
    else:
        dicts = [getattr(module, name, None) for name in _HOOKS]
    return [fn for d in dicts if d for fn in d.values() if _is_own(fn)]


def _dict_version_works() -> bool:
    """Whether ``dict_version`` sees the writes a module gets, on this Python and torch."""
    try:
        from torch._C._dynamo.guards import dict_version

        module = torch.nn.Module()
        dicts = [module.__dict__, module._forward_hooks, torch.nn.modules.module._global_forward_hooks]
        probe = type("_Probe", (torch.nn.Module,), {"forward": lambda self, x: x})
        namespace = types.ModuleType("_fxpatch_probe")
        dicts += [type_dict(probe), vars(namespace)]
        before = list(map(dict_version, dicts))
        handle_id = RemovableHandle.next_id
        module.training = False  # through Module.__setattr__, as .eval() does
        module.register_forward_hook(lambda *args: None).remove()
        torch.nn.modules.module.register_module_forward_hook(lambda *args: None).remove()
        probe.forward = lambda self, x: 2 * x  # a monkeypatch
        namespace.helper = len
        return RemovableHandle.next_id != handle_id and all(a != b for a, b in zip(before, map(dict_version, dicts)))
    except Exception:  # noqa: BLE001 - a private API: whatever fails, the full walk is always right
        return False


def version_guard(dicts: list[dict]) -> Any:
    """A guard of dynamo's (``RootGuardManager``) whose ``check(dicts)`` is ``True`` only while none of ``dicts``
    was written since: the comparison of ``dict_version``'s, in C++ (2 us for a small model's 284 dicts, against
    8 us in Python). ``None`` where torch's guard API differs from what this expects (the caller compares in
    Python)."""
    if not _version_guard_works():
        return None
    try:
        return _make_version_guard(dicts)
    except Exception:  # noqa: BLE001 - a private API
        return None


def _make_version_guard(dicts: list[dict]) -> Any:
    from torch._C._dynamo.guards import RootGuardManager
    from torch._dynamo.guards import GuardManagerType

    root = RootGuardManager()
    for i, d in enumerate(dicts):
        manager = root.list_getitem_manager(i, f"dicts[{i}]", d, GuardManagerType.GUARD_MANAGER)
        manager.add_dict_version_guard(d, [f"dict_version(dicts[{i}])"], *_GUARD_EXTRA)
    if not root.check(dicts):
        raise RuntimeError("the guard fails the dicts it was made from")
    return root


_GUARD_EXTRA: tuple = (None,)  # add_dict_version_guard's arguments after the code parts


@functools.cache
def _version_guard_works() -> bool:
    """Whether a guard made by ``_make_version_guard`` sees a write to a module's dict, and only that."""
    global _GUARD_EXTRA
    try:
        try:
            _make_version_guard([{}])
        except TypeError:  # torch before 2.13: no user stack argument
            _GUARD_EXTRA = ()
        module = torch.nn.Module()
        dicts = [module.__dict__, module._parameters, {}]
        seen = []
        for write in (lambda: setattr(module, "training", False),
                      lambda: module.register_parameter("probe", torch.nn.Parameter(torch.zeros(1)))):
            guard = _make_version_guard(dicts)
            same = guard.check(dicts)
            write()
            seen.append(same and not guard.check(dicts))
        return all(seen)
    except Exception:  # noqa: BLE001 - a private API
        return False


_DICT_VERSION_WORKS: bool | None = None
_META = attrgetter("dtype", "device", "shape")


def dict_version_works() -> bool:
    """``_dict_version_works()``, asked once a process."""
    global _DICT_VERSION_WORKS
    if _DICT_VERSION_WORKS is None:
        _DICT_VERSION_WORKS = _dict_version_works()
    return _DICT_VERSION_WORKS


class ModelWatch:
    """A few-microsecond answer to "has anything an export depends on possibly changed?", for the
    modules of one fingerprint walk (``modules``, in any order).

    ``unchanged()`` is ``False`` after any write to one of their dicts or any change of a
    parameter's or buffer's dtype, device or shape; ``True`` means the fingerprint is the same.
    Where the private APIs it uses are missing or behave otherwise, it never vouches.

    Example::

        kept = []
        fingerprint = model_fingerprint(hf_model, kept)
        watch = ModelWatch([m for m in kept if isinstance(m, torch.nn.Module)])
        hf_model.transformer.h[0].register_forward_hook(hook)
        assert not watch.unchanged()
    """

    def __init__(self, modules: list[torch.nn.Module], configs: list = ()):
        self._check = None
        if not dict_version_works():
            return
        from torch._C._dynamo.guards import dict_version

        global_hooks = torch.nn.modules.module
        hook_dicts = [d for d in (getattr(global_hooks, name, None) for name in _GLOBAL_HOOKS) if isinstance(d, dict)]
        dicts = [d for d in hook_dicts if d]
        empty = [d for d in hook_dicts if not d]  # hook dicts with no hook: no hook there while still empty
        dicts += [config.__dict__ for config in configs]
        classes, namespaces = code_of(modules)
        code = [type_dict(c) for c in classes] + [vars(ns) for ns in namespaces]
        if any(d is None for d in code):
            return  # a class whose dict cannot be watched: never vouch
        dicts += code
        tensors = []
        for module in modules:
            d = module.__dict__
            dicts.append(d)
            dicts += [w for w in map(d.get, _WATCHED) if isinstance(w, dict)]
            hooks = [w for w in map(d.get, _HOOKS) if isinstance(w, dict)]
            dicts += [w for w in hooks if w]
            empty += [w for w in hooks if not w]
            tensors += [t for t in (*d["_parameters"].values(), *d["_buffers"].values()) if t is not None]
        tensors = list({id(t): t for t in tensors}.values())  # a tied weight once: TensorGuards fails repeats
        try:
            from torch._C._dynamo.guards import TensorGuards

            guards = TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                                  dynamic_dims_strides=[list(t.stride()) for t in tensors])
            if not guards.check(*tensors):
                raise RuntimeError("TensorGuards fails the tensors it was made from")

            def same_tensors() -> bool:
                return guards.check(*tensors)
        except Exception:  # noqa: BLE001 - a private API: fall back to reading the three facts
            metas = list(map(_META, tensors))

            def same_tensors() -> bool:
                return list(map(_META, tensors)) == metas

        handle_id = [RemovableHandle.next_id]
        guard = version_guard(dicts)
        if guard is not None:
            def same_versions() -> bool:
                return guard.check(dicts)
        else:
            versions = list(map(dict_version, dicts))

            def same_versions() -> bool:
                return list(map(dict_version, dicts)) == versions

        def check() -> bool:
            if not same_versions() or not same_tensors():
                return False
            if RemovableHandle.next_id != handle_id[0]:
                # a hook was registered since, somewhere (another model, a tensor, or a hook registered and
                # removed again, as a hook-based tool does at every call): none is where none was
                if any(map(len, empty)):
                    return False
                handle_id[0] = RemovableHandle.next_id
            return True

        self._check = check

    def unchanged(self) -> bool:
        """``True`` only if nothing the fingerprint covers can have changed since the watch was made."""
        return self._check is not None and self._check()


def watch_of(kept: list) -> ModelWatch:
    """The ``ModelWatch`` of the modules a ``model_fingerprint`` walk kept."""
    return ModelWatch([m for m in kept if isinstance(m, torch.nn.Module)],
                      [c for c in kept if isinstance(c, PreTrainedConfig)])


__all__ = ["ModelWatch", "code_of", "function_of", "model_fingerprint", "own_hooks", "plain_settings", "type_dict",
           "watch_of"]

