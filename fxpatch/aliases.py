"""``rename=``: extra names for modules, with NNsight 0.8's rules.

``TransformersModel(..., rename={"transformer.h": "layers", "attn": ["self_attn", "att"]})`` gives
modules extra attribute names: ``model.layers[0].self_attn`` is ``model.transformer.h[0].attn``.
The rules are NNsight's (``nnsight/intervention/aliasing.py``), applied to module paths once, when
the model is wrapped:

- every module (children before parents, in module order) tries every key, relative to itself: a
  one-component key (``"attn"``) binds on each module that has such a child, a dotted key
  (``"transformer.h"``) only on the module it resolves from; a ``*`` component stands for any one
  child (``"*.h"``), and a key may be a module class (the one direct child of that class);
- a key may walk through aliases bound before it (``{"transformer.h": "layers", "layers.0": "first"}``);
- a dotted alias (``{"attn.c_proj": "attn.o_proj"}``) binds its last name on the module its prefix
  names, and that prefix must start the key's path;
- a key that resolves nowhere is skipped (one ``rename`` serves several architectures);
- a key matching two modules from one place, or an alias that would hide a child, another alias,
  an attribute of the model wrapper (``output``, ``trace``, ...) or of the module is refused.

Example::

    model = TransformersModel(fxpatch.TINY_GPT2, rename={"transformer.h": "layers"})
    with model.trace("Hello"):
        h = model.layers[0].output.save()      # transformer.h.0's output
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .errors import InputError, Location


class Aliases:
    """The alias table: ``table[host path][alias] = target path`` (target: the module's first path)."""

    def __init__(self, table: dict[str, dict[str, str]] | None = None):
        self.table = table or {}

    def get(self, host: str, name: str) -> str | None:
        """The path ``name`` names on the module at ``host``, if it is an alias there."""
        return self.table.get(host, {}).get(name)

    def __bool__(self) -> bool:
        return bool(self.table)


def bind_aliases(model: torch.nn.Module, rename: Mapping | None, reserved: set[str], reserved_root: set[str],
                 loc: Location) -> Aliases:
    """The aliases ``rename`` gives ``model``'s modules (see the module docstring).

    ``reserved`` are the names an envoy answers to on every module (``output``, ``skip``, ...),
    ``reserved_root`` those the model wrapper answers to (``trace``, ``tokenizer``, ...); no alias
    may take them.
    """
    if not rename:
        return Aliases()
    if not isinstance(rename, Mapping):
        raise InputError(f"rename must be a dict of module path (or class) -> alias name(s), got "
                         f"{type(rename).__name__}", at=loc, hint='Pass e.g. rename={"transformer.h": "layers"}.')
    first: dict[int, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        first.setdefault(id(module), path)
    modules = {path: module for path, module in model.named_modules()}
    table: dict[str, dict[str, str]] = {}
    bound_from: dict[tuple[str, str], str] = {}

    def join(a: str, b: str) -> str:
        return f"{a}.{b}" if a else b

    def step(path: str, part: str) -> str | None:
        """The module ``part`` names on the module at ``path``: a child (by its first path) or an alias."""
        child = modules[path]._modules.get(part)
        if child is not None:
            return first[id(child)]
        return table.get(path, {}).get(part)

    def named(path: str, key: Any) -> list[tuple[str, str]]:
        if isinstance(key, type):
            found = [(name, first[id(child)]) for name, child in modules[path]._modules.items()
                     if child is not None and isinstance(child, key)]
        else:
            found = [("", path)]
            for part in str(key).lstrip(".").split("."):
                nxt = []
                for rel, p in found:
                    if part == "*":
                        nxt += [(join(rel, name), first[id(child)]) for name, child in modules[p]._modules.items()
                                if child is not None]
                        continue
                    target = step(p, part)
                    if target is not None:
                        nxt.append((join(rel, part), target))
                found = nxt
        unique: dict[str, tuple[str, str]] = {}
        for rel, target in reversed(found):  # one module under two names is one match, at its first name
            unique[target] = (rel, target)
        return list(reversed(unique.values()))

    def refuse(problem: str) -> None:
        raise InputError(problem, at=loc, hint="Pick a different alias, or key the module by its full path.")

    def bind(path: str) -> None:
        for key, aliases in rename.items():
            matches = named(path, key)
            key_name = key.__name__ if isinstance(key, type) else repr(key)
            if len(matches) > 1:
                refuse(f"rename key {key_name} matches {len(matches)} modules under {path or 'the model'!r} "
                       f"({', '.join(rel for rel, _ in matches)}); an alias names one module")
            if not matches:
                continue
            relative, target = matches[0]
            for alias in [aliases] if isinstance(aliases, str) else list(aliases):
                host, rel = path, relative
                if "." in alias:
                    prefix, _, alias = alias.rpartition(".")
                    if not relative.startswith(f"{prefix}."):
                        refuse(f"rename alias {prefix + '.' + alias!r} for {relative!r} names no ancestor of it on "
                               f"{path or 'the model'!r}: a dotted alias binds on the module its prefix names, so "
                               "the prefix must spell the start of the key's path")
                    host = path
                    for part in prefix.split("."):
                        host = step(host, part)
                    rel = relative[len(prefix) + 1:]
                module = modules[host]
                child = module._modules.get(alias)
                if (child is not None and first[id(child)] == target) or table.get(host, {}).get(alias) == target:
                    continue  # already this module's name there: nothing is hidden
                where = host or "the model"
                if (host, alias) in bound_from:
                    displaced = f"the alias already bound there from {bound_from[host, alias]!r}"
                elif child is not None or alias in module._modules:
                    displaced = "a child module of that name"
                elif alias in reserved:
                    displaced = f"the envoy attribute .{alias} that fxpatch serves on every module"
                elif host == "" and alias in reserved_root:
                    displaced = f"the model wrapper's attribute .{alias}"
                elif hasattr(module, alias):
                    displaced = f"an attribute of the {type(module).__name__} module"
                else:
                    displaced = None
                if displaced is not None:
                    refuse(f"rename alias {alias!r} for {rel!r} would hide {displaced} on {where!r}")
                table.setdefault(host, {})[alias] = target
                bound_from[host, alias] = rel

    def visit(path: str, module: torch.nn.Module, seen: set[int]) -> None:
        for name, child in module._modules.items():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                visit(join(path, name), child, seen)
        bind(path)

    visit("", model, {id(model)})
    return Aliases(table)

