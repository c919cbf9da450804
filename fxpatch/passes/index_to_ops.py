"""Pass: a tensor indexed at a program's position is indexed by aten ops, which take the position as it is.

After it runs, no ``t[index]`` (``operator.getitem``) has in its index a placeholder marked
``meta["fxpatch_number"]`` (an int input: a program's position, ``h[:, p]``, ``h[:, a:b]``) where
the index is ints, slices, ``None`` and at most one ``...``: it is ``aten.select.int``,
``aten.slice.Tensor`` and ``aten.unsqueeze`` calls, one per item that is not ``:``, the items
after a ``...`` counted from the last dim. That is how torch itself carries out such an index, so
the values are the same. Dynamo traces ``t[index]`` with a symbolic int in it by making the int a
constant of the graph and guarding on its value (torch 2.13): a compiled graph read ``h[:, p]``
for one ``p`` and compiled again for the next. The aten ops keep it a symbol, so one compiled graph
serves every position. An index with a tensor or a bool in it is left as it is. Only the graph
handed to ``torch.compile`` gets it.
"""

from __future__ import annotations

import operator

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .indexing import ellipsis_at, nodes_in

aten = torch.ops.aten
_FULL = slice(None, None, None)


class IndexToOps(PassBase):
    """``IndexToOps()(gm)``: see the module docstring.

    Example::

        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs[3].meta["fxpatch_number"] = True   # fed the program's p of h[:, p]
        gm = IndexToOps()(gm).graph_module        # h[:, p] is aten.select.int(h, 1, p)
    """

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        ints = {n for n in graph.nodes if n.op == "placeholder" and n.meta.get("fxpatch_number")}
        changed = False
        for node in list(graph.nodes):
            if not (ints and node.op == "call_function" and node.target is operator.getitem
                    and len(node.args) == 2 and not node.kwargs and type(node.args[1]) is tuple):
                continue
            index = node.args[1]
            if not any(n in ints for n in nodes_in(index)) or not _basic(index, ints):
                continue
            with graph.inserting_before(node):
                value = _as_ops(graph, node.args[0], index)
            value.meta.update(node.meta)
            node.replace_all_uses_with(value)
            graph.erase_node(node)
            changed = True
        if changed:
            graph.lint()
            gm.recompile()
        return PassResult(gm, changed)


def _basic(index: tuple, ints: set) -> bool:
    """Whether ``index`` is ints, slices of ints, ``None`` and at most one ``...`` (the graph's ints among them)."""
    def number(v):
        return type(v) is int or isinstance(v, torch.fx.Node) and v in ints

    return sum(item is Ellipsis for item in index) <= 1 and all(
        all(v is None or number(v) for v in (item.start, item.stop, item.step)) if type(item) is slice
        else item is None or item is Ellipsis or number(item)
        for item in index)


def _as_ops(graph: torch.fx.Graph, value: torch.fx.Node, index: tuple) -> torch.fx.Node:
    split = ellipsis_at(index)
    dim = 0
    for item in index[:split]:
        value, dim = _item(graph, value, item, dim, 1)
    dim = -1
    for item in reversed(index[split + 1:]):
        value, dim = _item(graph, value, item, dim, -1)
    return value


def _item(graph: torch.fx.Graph, value: torch.fx.Node, item, dim: int, step: int) -> tuple[torch.fx.Node, int]:
    """``value`` indexed by ``item`` at ``dim``, and the dim the next item (``step`` away) indexes: a
    selected dim is gone, so the next item from the left indexes the same dim, and from the right too."""
    if item is None:  # a new dim of size 1 where the item is
        return graph.call_function(aten.unsqueeze.default, (value, dim)), dim + step
    if type(item) is slice:
        if item != _FULL:
            args = (value, dim, item.start, item.stop) + (() if item.step is None else (item.step,))
            value = graph.call_function(aten.slice.Tensor, args)
        return value, dim + step
    return graph.call_function(aten.select.int, (value, dim, item)), dim

