"""Pass: remove every site node and the code nothing uses.

After it runs the graph has no ``fxpatch::site`` node: each site's users use
the site's input directly (the value the model computed, or the scattered
value a write put there), and dead nodes are gone. A graph with no
intervention is the plain exported model.

``StripSites(drop_outputs=n)`` also drops the graph's first ``n`` outputs (the
model's own, when the caller discards them), so the graph ends at the last
value the rest of its outputs need. ``StripSites(stand_ins=[node, ...])``
gives the sites and the program's nodes that use each named model node a
zero tensor of that node's shape instead: for the outputs of a module whose
every row is overwritten (skipped) before anything sees them, so that the
module's own computation becomes dead code.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import sympy
import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .ops import is_site


class StripSites(PassBase):
    """``StripSites(drop_outputs=0, stand_ins=())(gm)``."""

    def __init__(self, drop_outputs: int = 0, stand_ins: Sequence[str] = ()):
        super().__init__()
        self.drop_outputs = drop_outputs
        self.stand_ins = set(stand_ins)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        if self.stand_ins:
            _stand_in(graph, self.stand_ins)
        if self.drop_outputs:
            out = graph.output_node()
            out.args = (tuple(out.args[0])[self.drop_outputs:],)
        for node in list(graph.nodes):
            if is_site(node):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        while graph.eliminate_dead_code(is_impure_node=_is_impure):
            pass  # a tensor whose metadata assert went may itself be dead now
        gm.recompile()
        return PassResult(gm, True)


_ASSERT_METADATA = torch.ops.aten._assert_tensor_metadata.default


def _is_impure(node: torch.fx.Node) -> bool:
    """torch.fx's rule, except that a random op that draws nothing (an eval-mode dropout, attention with
    ``dropout_p=0``) is pure, and so is the export's dtype assert on a tensor nothing else uses, so that
    the code after the last value a program needs is dead."""
    if node.op != "call_function":
        return node.is_impure()
    if node.target is _ASSERT_METADATA:
        checked = node.args[0]
        return any(user.target is not _ASSERT_METADATA for user in checked.users)
    if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags \
            and _draws_nothing(node):
        return False
    return node.is_impure()


def _draws_nothing(node: torch.fx.Node) -> bool:
    """An op whose randomness is switched off by its ``train=False`` or ``dropout_p=0`` argument."""
    for i, arg in enumerate(node.target._schema.arguments):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name, arg.default_value)
        if arg.name == "train":
            return value is False
        if arg.name == "dropout_p":
            return value == 0
    return False


def _stand_in(graph: torch.fx.Graph, names: set[str]) -> None:
    """Give the sites and program nodes using the named nodes zeros of those nodes' shapes."""
    sizes: dict[sympy.Symbol, torch.fx.Node] = {}
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    for value in [n for n in graph.nodes if n.name in names]:
        fake = value.meta.get("val")
        if not isinstance(fake, torch.Tensor):
            continue
        with graph.inserting_before(value):
            shape = [_size(graph, d, inputs, sizes) for d in fake.shape]
            if any(s is None for s in shape):
                continue  # a size fxpatch cannot rebuild: the module runs, its value overwritten
            zeros = graph.call_function(torch.ops.aten.zeros.default, (shape,),
                                        {"dtype": fake.dtype, "device": fake.device})
        zeros.meta["val"] = fake
        for user in list(value.users):
            if is_site(user) or user.meta.get("fxpatch_role") is not None:
                user.replace_input_with(value, zeros)


def _size(graph, dim, inputs, sizes):
    """A graph value for one dimension: an int, or an expression in the inputs' symbolic sizes."""
    if not isinstance(dim, torch.SymInt):
        return int(dim)
    return _expr(graph, dim.node.expr, inputs, sizes)


def _expr(graph, expr, inputs, sizes):
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        if expr not in sizes:
            for ph in inputs:
                val = ph.meta.get("val")
                for i, d in enumerate(getattr(val, "shape", ())):
                    if isinstance(d, torch.SymInt) and d.node.expr == expr:
                        sizes[expr] = graph.call_function(torch.ops.aten.sym_size.int, (ph, i))
                        break
                if expr in sizes:
                    break
        return sizes.get(expr)
    if isinstance(expr, (sympy.Add, sympy.Mul)):
        op = operator.add if isinstance(expr, sympy.Add) else operator.mul
        terms = [_expr(graph, a, inputs, sizes) for a in expr.args]
        if any(t is None for t in terms):
            return None
        out = terms[0]
        for t in terms[1:]:
            out = graph.call_function(op, (out, t))
        return out
    return None
