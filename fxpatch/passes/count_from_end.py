"""Pass: a compiled graph takes a program's negative positions as their distance from the end.

After it runs, every placeholder marked ``meta["fxpatch_from_end"]`` (an int input its runner feeds
as ``m = fed(p) = 1 - p`` for a program's negative position ``p``: ``h[:, -1]`` is fed 2,
``h[:, -24:]`` 25) is used only through ``size + 1 - m``, computed in the graph from the size of
the dim it indexes: as an index (``select``, ``select_scatter``, ``t[..., p]``) that non-negative
position, checked ``>= 0``; as a slice bound (``slice``, ``slice_scatter``, ``t[..., p:]``)
``max(size + 1 - m, 0)``, Python's clamp of a negative bound. Each is the element eager torch takes
for ``p``, now written with the non-negative number inductor assumes its int inputs are (torch 2.13
takes them as symbols ``>= 0`` and simplifies ``x.reshape(-1)[n:]`` to a read at ``(n + i) % numel``
in C's ``%``, which with a negative ``n`` reads memory before the tensor). One compiled graph then
serves every negative value of a position, as it does every non-negative one; ``m`` is at least 2
because torch makes an int input of 0 or 1 a constant of the graph, which would set ``-1`` apart.
``from_end_uses`` says which placeholders the pass can rewrite: one used in any other way (an
argument of a nested graph, an op not above) is left to ``SpecializeNegativeInts``. Only the graph
handed to ``torch.compile`` gets it.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .indexing import ellipsis_at, nodes_in

aten = torch.ops.aten
# op -> (the argument holding the indexed tensor, the dim's, and each position's with what it is)
_POSITION_OPS = {
    aten.select.int: (0, 1, {2: "index"}),
    aten.select_scatter.default: (0, 2, {3: "index"}),
    aten.slice.Tensor: (0, 1, {2: "bound", 3: "bound"}),
    aten.slice_scatter.default: (0, 2, {3: "bound", 4: "bound"}),
}


def fed(p: int) -> int:
    """The int a negative position ``p`` is fed as (and, the same function, the position an int fed stands for).

    Example::

        fed(-1), fed(-24), fed(fed(-3))   # 2, 25, -3
    """
    return 1 - p


class Use(NamedTuple):
    """A position's use: ``user``'s argument ``slot`` (an int: that argument; a pair ``(k, field)``: the
    ``k``-th item of a ``[...]`` index tuple, ``field`` ``None`` for the item, ``"start"``/``"stop"`` for a
    slice's bound), a position in ``dim`` of ``tensor``, as an ``"index"`` or a slice ``"bound"``."""

    user: torch.fx.Node
    slot: int | tuple[int, str | None]
    tensor: torch.fx.Node
    dim: int
    kind: str


def from_end_uses(node: torch.fx.Node, ints: set[torch.fx.Node] = frozenset()) -> list[Use] | None:
    """Every use of ``node`` as a position, or ``None`` when it has another use (the pass cannot rewrite it).
    ``ints``: the graph's other inputs fed ints (in a ``[...]`` index each is a position of one dim).

    Example::

        uses = from_end_uses(placeholder)   # [Use(user=select_int, slot=2, tensor=h, dim=1, kind="index")]
    """
    uses = []
    for user in node.users:
        if user.op != "call_function" or node in nodes_in(user.kwargs):
            return None
        if user.target in _POSITION_OPS:
            found = _positions_in_args(user, node)
        elif user.target is operator.getitem and len(user.args) == 2 and type(user.args[1]) is tuple \
                and user.args[0] is not node:
            found = _positions_in_index(user, node, ints)
        else:
            found = None
        if found is None:
            return None
        uses += found
    return uses


def _positions_in_args(user: torch.fx.Node, node: torch.fx.Node) -> list[Use] | None:
    tensor_at, dim_at, slots = _POSITION_OPS[user.target]
    if user.kwargs or len(user.args) <= dim_at and user.target is not aten.slice.Tensor:
        return None
    dim = user.args[dim_at] if len(user.args) > dim_at else 0
    uses = []
    for i, a in enumerate(user.args):
        if a is node and i in slots and type(dim) is int:
            uses.append(Use(user, i, user.args[tensor_at], dim, slots[i]))
        elif node in nodes_in(a):
            return None
    return uses


def _positions_in_index(user: torch.fx.Node, node: torch.fx.Node, ints: set[torch.fx.Node]) -> list[Use] | None:
    """The uses of ``node`` in ``t[index]``: dims counted over ints, slices, ``None`` and the program's
    positions, from the left, and after a ``...`` from the right (negative dims); across any other item (a
    tensor) the dim is not known here."""
    index = user.args[1]
    split = ellipsis_at(index)
    left = _positions_counted(user, node, ints, index[:split], range(split), 1)
    right = _positions_counted(user, node, ints, index[split + 1:][::-1], range(len(index) - 1, split, -1), -1)
    return None if left is None or right is None else left + right


def _positions_counted(user, node, ints, items, places, step: int) -> list[Use] | None:
    uses, dim = [], 0 if step == 1 else -1
    for k, item in zip(places, items):
        if item is node:
            uses.append(Use(user, (k, None), user.args[0], dim, "index"))
        elif type(item) is slice:
            if node in nodes_in(item.step):
                return None
            uses += [Use(user, (k, field), user.args[0], dim, "bound")
                     for field in ("start", "stop") if getattr(item, field) is node]
        elif item is None:
            continue  # a new dim of size 1: it indexes none of the tensor's
        elif not (type(item) is int or item in ints):
            return None if node in nodes_in(items) else uses  # a tensor or another ``...``
        dim += step
    return uses


class CountFromEnd(PassBase):
    """``CountFromEnd()(gm)``: see the module docstring.

    Example::

        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs[3].meta["fxpatch_from_end"] = True   # fed 25 for the program's h.flatten(1)[:, -24:]
        gm = CountFromEnd()(gm).graph_module
    """

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        marked = [n for n in inputs if n.meta.get("fxpatch_from_end")]
        ints = {n for n in inputs if n.meta.get("fxpatch_number") or n.meta.get("fxpatch_from_end")}
        for node in marked:
            uses = from_end_uses(node, ints)
            if uses is None:
                raise ValueError(f"{node.name} is marked to count from the end, but it has a use that is not a "
                                 "position (see from_end_uses)")
            for use in uses:
                with graph.inserting_before(use.user):
                    size = graph.call_function(aten.sym_size.int, (use.tensor, use.dim))
                    end = graph.call_function(operator.add, (size, 1))  # fed 1 - p: size + p is end - m
                    position = graph.call_function(operator.sub, (end, node))
                    if use.kind == "bound":
                        position = graph.call_function(torch.sym_max, (position, 0))
                    else:  # checked before the run too: a negative index here would wrap to a wrong element
                        graph.call_function(torch._check, (graph.call_function(operator.ge, (position, 0)),))
                _replace(use, position)
        if marked:
            graph.lint()
            gm.recompile()
        return PassResult(gm, bool(marked))


def _replace(use: Use, position: torch.fx.Node) -> None:
    args = list(use.user.args)
    if type(use.slot) is int:
        args[use.slot] = position
    else:
        k, field = use.slot
        index = list(args[1])
        if field is None:
            index[k] = position
        else:
            item = index[k]
            index[k] = slice(position if field == "start" else item.start,
                             position if field == "stop" else item.stop, item.step)
        args[1] = tuple(index)
    use.user.args = tuple(args)
