"""Pass: a tensor indexed at a program's position is a buffer of its own in a compiled graph.

After it runs, the tensor that every ``select``/``select_scatter`` (and ``slice``/``slice_scatter``)
whose position comes from a graph input (a program's position, fed at each run) indexes, or the
tensor it takes an invoke's rows of, is ``fxpatch::materialize_as_laid_out`` of it, for all its users: a
copy with its layout (its strides where it is dense) that inductor runs as its own kernel. Without
it, inductor fuses the read into what follows and reaches the element through the views before it;
where those undo a reshape (OPT's layer output is ``(rows * tokens, hidden)`` viewed as ``(rows,
tokens, hidden)``), the element's offset is a remainder of the position, which its C++ code takes
with C's ``%``: a negative position (``h[:, -1]``) reads memory before the tensor, a different
wrong value at each run (torch 2.13). Eager runs do not need it; only ``torch.compile`` gets it.
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .ops import MATERIALIZE_OP

aten = torch.ops.aten
# op -> the places of its position arguments
_INDEXED = {aten.select.int: (2,), aten.select_scatter.default: (3,), aten.slice.Tensor: (2, 3),
            aten.slice_scatter.default: (3, 4)}


class MaterializeIndexed(PassBase):
    """``MaterializeIndexed()(gm)``: see the module docstring."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        roots: list[torch.fx.Node] = []
        for node in graph.nodes:
            places = _INDEXED.get(node.target) if node.op == "call_function" else None
            if places and any(_from_input(node.args[i]) for i in places if i < len(node.args)):
                root = _rows_of(node.args[0])
                if root not in roots:
                    roots.append(root)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for root in roots:  # one copy of the whole tensor, not one of each invoke's rows of it
            with graph.inserting_after(placeholders[-1] if root.op == "placeholder" else root):
                copy = graph.call_function(MATERIALIZE_OP, (root,))
            if "val" in root.meta:
                copy.meta["val"] = root.meta["val"]
            root.replace_all_uses_with(copy, delete_user_cb=lambda user, copy=copy: user is not copy)
        if roots:
            graph.lint()
            gm.recompile()
        return PassResult(gm, bool(roots))


def _rows_of(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor that ``node`` is an invoke's rows of (through ``capture``'s slices), or ``node`` itself."""
    while (node.op == "call_function" and node.target in (aten.slice.Tensor, aten.alias.default)
           and isinstance(node.args[0], torch.fx.Node) and node.args[0].op != "placeholder"):
        node = node.args[0]
    return node


def _from_input(arg, depth: int = 0) -> bool:
    """Whether ``arg``, a position, is computed from an input of the program (not from sizes alone)."""
    if not isinstance(arg, torch.fx.Node) or depth > 8:
        return False
    if arg.op == "placeholder":  # the program's inputs (``InlineProgram``), not the model's
        return arg.meta.get("fxpatch_role") == "input"
    if arg.op == "call_function" and arg.target is aten.sym_size.int:
        return False
    return any(_from_input(a, depth + 1) for a in arg.all_input_nodes)
