"""Reading an fx node's ``t[index]`` argument: the nodes in it, and where its ``...`` is.

Shared by ``IndexToOps`` and ``CountFromEnd``, which both walk a basic index item by item.

Example::

    nodes_in((slice(None), p))     # [p]
    ellipsis_at((0, ..., p))       # 1; len(index) when there is none
"""

from __future__ import annotations

from typing import Any

import torch


def nodes_in(value: Any) -> list[torch.fx.Node]:
    """The fx nodes anywhere in ``value`` (tuples, lists, dicts and slices looked through), in order."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(value, found.append)
    return found


def ellipsis_at(index: tuple) -> int:
    """The place of the ``...`` in ``index``, or ``len(index)`` where it has none (``is``: an item may be a node)."""
    return next((k for k, item in enumerate(index) if item is Ellipsis), len(index))
