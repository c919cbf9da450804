"""Pass: a compiled graph is fed no negative int; the inputs that held one are negated back inside it.

After it runs, every placeholder marked ``meta["fxpatch_negated"]`` (one its runner feeds ``-n`` for a
program's negative position ``n``, as in ``h[:, -24:]``) is used only through ``operator.neg`` of it, so
the graph computes what it computed before with ``n`` fed as it was. Inductor takes the int inputs of a
graph compiled with dynamic sizes as symbols it assumes are non-negative, and simplifies its index
arithmetic by that: ``x.reshape(-1)[n:]`` of a computed ``x`` becomes a read at ``(n + i) % numel``, which
its C++ code takes with C's ``%``, so a negative ``n`` reads memory before the tensor (values near 1e35
that change from run to run; torch 2.13, CPU). A negative position written as the negation of a
non-negative symbol, ``-m``, is indexed right. Only the graph handed to ``torch.compile`` gets it.
"""

from __future__ import annotations

import operator

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult


class NonNegativeInputs(PassBase):
    """``NonNegativeInputs()(gm)``: see the module docstring.

    Example::

        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs[3].meta["fxpatch_negated"] = True  # fed 24 where the program's position is -24
        gm = NonNegativeInputs()(gm).graph_module
    """

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        negated = [n for n in inputs if n.meta.get("fxpatch_negated")]
        for node in negated:
            with graph.inserting_after(inputs[-1]):
                back = graph.call_function(operator.neg, (node,))
            node.replace_all_uses_with(back, delete_user_cb=lambda user, back=back: user is not back)
        if negated:
            graph.lint()
            gm.recompile()
        return PassResult(gm, bool(negated))
