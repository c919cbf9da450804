"""Pass: a linear whose output is only indexed computes only the rows that are read.

After it runs, no ``aten.linear`` node's users are all ``select``/``slice`` on dims other than its last:
each such read takes its rows of the linear's input instead, and a linear of its own runs on those
rows alone. ``linear(x)[..., i, ...] == linear(x[..., i, ...])`` holds for every index of a leading
dim (the linear acts on the last dim only), so values are the same up to the order in which the GEMM
sums (a few float32 ulps); only the graph handed to ``torch.compile`` gets it, where inductor
reorders sums anyway. The common case: a program that reads ``lm_head.output[:, -1]`` no longer
computes the logits of every position (GPT-2's vocabulary makes that a third of a forward).
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

aten = torch.ops.aten
_INDEX = (aten.select.int, aten.slice.Tensor)


class IndexBeforeLinear(PassBase):
    """``IndexBeforeLinear()(gm)``: see the module docstring.

    Example::

        gm = IndexBeforeLinear()(gm).graph_module  # lm_head.output[:, -1] is lm_head(h[:, -1])
    """

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        changed = False
        ranks: dict[torch.fx.Node, int] = {}  # of the nodes made here, which have no fake value
        work = [n for n in graph.nodes if n.op == "call_function" and n.target is aten.linear.default]
        while work:  # a read of a read (rows, then a position) moves the linear again
            linear = work.pop()
            rank = _rank(linear, ranks)
            if rank is None or _rank(linear.args[0], ranks) != rank or not linear.users:
                continue
            if not all(_reads_leading_dim(user, linear, rank) for user in linear.users):
                continue
            for user in list(linear.users):
                with graph.inserting_before(user):
                    rows = graph.call_function(user.target, (linear.args[0], *user.args[1:]), dict(user.kwargs))
                    moved = graph.call_function(aten.linear.default, (rows, *linear.args[1:]), dict(linear.kwargs))
                if _rank(user, ranks) is not None:  # rows and moved keep the read's leading dims
                    ranks[rows] = ranks[moved] = _rank(user, ranks)
                user.replace_all_uses_with(moved)
                graph.erase_node(user)
                work.append(moved)
            graph.erase_node(linear)
            changed = True
        if changed:
            graph.lint()
            gm.recompile()
        return PassResult(gm, changed)


def _rank(node, ranks: dict) -> int | None:
    if not isinstance(node, torch.fx.Node):
        return None
    if node in ranks:
        return ranks[node]
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def _reads_leading_dim(user: torch.fx.Node, linear: torch.fx.Node, rank: int) -> bool:
    """Whether ``user`` is a select or slice of ``linear``'s output along a dim other than its last."""
    if user.op != "call_function" or user.target not in _INDEX or user.args[0] is not linear:
        return False
    if any(v is linear for v in (*user.args[1:], *user.kwargs.values())):
        return False
    dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
    return isinstance(dim, int) and -rank <= dim < rank and dim % rank != rank - 1
