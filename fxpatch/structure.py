"""Flattening module inputs and outputs into tensor leaves, and rebuilding them.

Only plain containers are opened (tuple, list, dict and transformers'
``ModelOutput``, which is a dict); anything else (a cache, ``None``, a flag) is
one opaque leaf. Keys make site names: ``transformer.h.0.attn.output[0]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _is_plain_tuple(obj: Any) -> bool:
    return isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields")


def key_str(key: Any) -> str:
    """``[0]`` for a position, ``['name']`` for a mapping key."""
    return f"[{key}]" if isinstance(key, int) else f"[{key!r}]"


@dataclass(frozen=True)
class Spec:
    """Shape of a nested structure: ``kind`` is ``leaf``, ``tuple``, ``list`` or ``dict``."""

    kind: str
    keys: tuple = ()
    children: tuple = ()
    container: type | None = None

    @property
    def num_leaves(self) -> int:
        return 1 if self.kind == "leaf" else sum(c.num_leaves for c in self.children)


LEAF = Spec("leaf")


def flatten(obj: Any) -> tuple[list[tuple[str, Any]], Spec]:
    """Leaves as ``(key path, value)`` in order, and the structure's ``Spec``."""
    if isinstance(obj, dict):
        keys = tuple(obj.keys())
        kind, values = "dict", [obj[k] for k in keys]
    elif _is_plain_tuple(obj):
        keys = tuple(range(len(obj)))
        kind, values = ("list" if isinstance(obj, list) else "tuple"), list(obj)
    else:
        return [("", obj)], LEAF
    leaves: list[tuple[str, Any]] = []
    children = []
    for key, value in zip(keys, values):
        sub, spec = flatten(value)
        leaves.extend((key_str(key) + path, leaf) for path, leaf in sub)
        children.append(spec)
    return leaves, Spec(kind, keys, tuple(children), type(obj))


def unflatten(spec: Spec, leaves: list[Any], build: Callable[[Spec, list], Any] | None = None) -> Any:
    """Rebuild a structure from ``leaves``; ``build(spec, items)`` makes each container."""
    return _rebuild(spec, iter(leaves), build)


def _rebuild(s: Spec, it: Any, build: Callable[[Spec, list], Any] | None) -> Any:
    # a module-level function, not a closure calling itself: that is a cycle, which would keep ``leaves`` (a
    # trace's values) alive until a garbage collection
    if s.kind == "leaf":
        return next(it)
    items = [_rebuild(c, it, build) for c in s.children]
    if build is not None:
        return build(s, items)
    if s.kind == "dict":
        return s.container(zip(s.keys, items)) if s.container is dict else s.container(**dict(zip(s.keys, items)))
    return s.container(items)
