"""Pass: a compiled graph's int inputs fed a negative value are that constant.

After it runs, every placeholder marked ``meta["fxpatch_int"]`` (an int, negative: one a program's
position is fed at this run, which its runner keys the compiled graph by) has no users; they use the int
itself, as the graph of a program written with that literal would. Inductor takes a graph's int inputs as
symbols it assumes are non-negative and simplifies its index arithmetic by that: ``x.reshape(-1)[n:]`` of
a computed ``x`` becomes a read at ``(n + i) % numel``, which its C++ code takes with C's ``%``, so a
negative ``n`` reads memory before the tensor (values near 1e35 that change from run to run; torch 2.13,
CPU). A position used only as a position is counted from the end instead (``CountFromEnd``: one compiled
graph for all its negative values); this pass is for the rest (a position after a tensor index,
``h[rows, -1]``), each negative value a compiled graph of its own. Feeding ``-n`` and negating it in the
graph (``[:, -m:]``) meets another fault of the same torch: code that names a symbol it never binds, for a
write after a tensor op. Only the graph handed to ``torch.compile`` gets it.
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult


class SpecializeNegativeInts(PassBase):
    """``SpecializeNegativeInts()(gm)``: see the module docstring.

    Example::

        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs[3].meta["fxpatch_int"] = -24  # the program's position at this run
        gm = SpecializeNegativeInts()(gm).graph_module
    """

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        baked = [n for n in graph.nodes if n.op == "placeholder" and "fxpatch_int" in n.meta]
        for node in baked:
            value = node.meta["fxpatch_int"]
            if type(value) is not int or value >= 0:
                raise ValueError(f"{node.name} is marked with {value!r}: only a negative int is made a constant")

            def constant(a, node=node, value=value):
                return value if a is node else a

            for user in list(node.users):
                user.args, user.kwargs = torch.fx.node.map_arg((user.args, user.kwargs), constant)
        if baked:
            graph.lint()
            gm.recompile()
        return PassResult(gm, bool(baked))
