"""Pass: a linear whose output is only indexed computes only the rows that are read, in one call.

After it runs, no ``aten.linear`` node's users are all reads of dims other than its last (``select``,
``slice``, an invoke's ``capture`` of rows, ``[...]`` with numbers, slices and positions: placeholders
whose ``meta["fxpatch_number"]`` says they are fed ints): each such read takes its rows of the linear's
input instead, and the linear runs on those rows alone.
``linear(x)[..., i, ...] == linear(x[..., i, ...])`` for every index of a leading dim (the linear acts
on the last dim only), so values are the same up to the order in which the GEMM sums (a few float32
ulps); only the graph handed to ``torch.compile`` gets it, where inductor reorders sums anyway. The
reads of one linear (one per invoke) are then one linear of their rows concatenated, split after:
a GEMM of 8 rows reads the weight once, 8 GEMMs of a row read it 8 times. The common case: a
program that reads ``lm_head.output[:, -1]`` in each invoke no longer computes the logits of every
position (GPT-2's vocabulary makes that a third of a forward).
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .ops import capture

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
        made: dict[torch.fx.Node, tuple] = {}  # a linear made here -> (the input of the first, its out features)
        work = [n for n in graph.nodes if n.op == "call_function" and n.target is aten.linear.default]
        while work:  # a read of a read (rows, then a position) moves the linear again
            linear = work.pop()
            rank = _rank(linear, ranks)
            if rank is None or _rank(linear.args[0], ranks) != rank or not linear.users:
                continue
            out_rank = {user: _read_rank(user, linear, rank) for user in linear.users}
            if None in out_rank.values() or not all(_narrows(u, rank, out_rank[u]) for u in linear.users):
                continue  # an invoke's rows read whole: the same rows in pieces, no fewer
            first, features = made.pop(linear, (linear.args[0], _features(linear)))
            for user in list(linear.users):
                with graph.inserting_before(user):
                    rows = graph.call_function(user.target, (linear.args[0], *user.args[1:]), dict(user.kwargs))
                    moved = graph.call_function(aten.linear.default, (rows, *linear.args[1:]), dict(linear.kwargs))
                ranks[rows] = ranks[moved] = out_rank[user]  # rows and moved keep the read's leading dims
                made[moved] = (first, features)
                if isinstance(user.meta.get("val"), torch.Tensor):
                    moved.meta["val"] = user.meta["val"]  # its sizes, for the merge
                user.replace_all_uses_with(moved)
                graph.erase_node(user)
                work.append(moved)
            graph.erase_node(linear)
            changed = True
        if changed:
            _merge_reads(graph, made, ranks)
            graph.lint()
            gm.recompile()
        return PassResult(gm, changed)


def _merge_reads(graph: torch.fx.Graph, made: dict, ranks: dict) -> None:
    """Make the linears moved from one linear one linear of their rows concatenated, split after."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    groups: dict[tuple, list[tuple]] = defaultdict(list)  # -> (a linear made here, the reads it takes)
    for node, (x, features) in made.items():
        chain = _chain(node.args[0], x) if type(features) is int else None
        if chain is not None:
            groups[(x, features, *node.args[1:], *sorted(node.kwargs.items()))].append((node, chain))
    for (x, features, *_), found in groups.items():
        val = x.meta.get("val")
        if len(found) < 2 or not isinstance(val, torch.Tensor) or type(val.shape[-1]) is not int:
            continue
        # the reads use x and the program's inputs only: they can all go right after x (and the inputs),
        # so that one linear there comes before every use of its rows
        anchor = x if x.op != "placeholder" else [n for n in graph.nodes if n.op == "placeholder"][-1]
        needed = [*found[0][0].args[1:], *(a for _, chain in found for n in chain for a in n.all_input_nodes[1:])]
        if any(isinstance(a, torch.fx.Node) and order[a] > order[anchor] for a in needed):
            continue  # a weight or position defined after x: each linear stays where its read is
        found.sort(key=lambda pair: order[pair[0]])
        members = [member for member, _ in found]
        for _, chain in found:
            for node in chain:
                anchor.append(node)
                anchor = node
        first = members[0]
        with graph.inserting_before(anchor.next):  # in order, after the reads
            flat = [graph.call_function(aten.reshape.default, (m.args[0], [-1, val.shape[-1]])) for m in members]
            out = graph.call_function(aten.linear.default, (graph.call_function(aten.cat.default, (flat, 0)),
                                                            *first.args[1:]), dict(first.kwargs))
            sizes = [_rows(graph, m, f) for m, f in zip(members, flat)]
            parts = graph.call_function(aten.split_with_sizes.default, (out, sizes))
            merged = []
            for i, member in enumerate(members):
                lead = [_size(graph, member, d) for d in range(ranks[member] - 1)]
                part = graph.call_function(operator.getitem, (parts, i))
                merged.append(graph.call_function(aten.reshape.default, (part, [*lead, features])))
        for member, value in zip(members, merged):
            member.replace_all_uses_with(value)
            graph.erase_node(member)


def _size(graph: torch.fx.Graph, member: torch.fx.Node, dim: int):
    """The size at ``dim`` of the read ``member`` replaces: a number where its fake value has one, else a node
    that gives it at run time."""
    val = member.meta.get("val")
    if isinstance(val, torch.Tensor) and type(val.shape[dim]) is int:
        return val.shape[dim]
    return graph.call_function(aten.sym_size.int, (member.args[0], dim))


def _rows(graph: torch.fx.Graph, member: torch.fx.Node, flat: torch.fx.Node):
    """How many rows ``member``'s read is, flattened (``flat``)."""
    val = member.meta.get("val")
    if isinstance(val, torch.Tensor) and all(type(s) is int for s in val.shape[:-1]):
        return math.prod(val.shape[:-1])
    return graph.call_function(aten.sym_size.int, (flat, 0))


def _chain(rows: torch.fx.Node, x: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The reads from ``x`` to ``rows`` (first first), if each reads with numbers and graph inputs alone."""
    chain = []
    node = rows
    while node is not x:
        if not isinstance(node, torch.fx.Node) or node.op != "call_function" or len(node.users) != 1:
            return None
        if any(a is not node.args[0] and a.op != "placeholder" for a in node.all_input_nodes):
            return None
        chain.append(node)
        node = node.args[0]
    return chain[::-1]


def _features(linear: torch.fx.Node) -> int | None:
    val = linear.meta.get("val")
    return val.shape[-1] if isinstance(val, torch.Tensor) and type(val.shape[-1]) is int else None


def _rank(node, ranks: dict) -> int | None:
    if not isinstance(node, torch.fx.Node):
        return None
    if node in ranks:
        return ranks[node]
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def _read_rank(user: torch.fx.Node, linear: torch.fx.Node, rank: int) -> int | None:
    """The rank of ``user``'s result if it reads ``linear``'s output along dims other than its last (its
    last stays whole), else ``None``."""
    if user.op != "call_function" or not user.args or user.args[0] is not linear:
        return None
    if any(a is linear for a in (*user.args[1:], *user.kwargs.values())):  # a tuple index: _basic_index_rank
        return None
    if user.target in _INDEX:
        dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
        if not (isinstance(dim, int) and -rank <= dim < rank and dim % rank != rank - 1):
            return None
        return rank - 1 if user.target is aten.select.int else rank
    if user.target is capture and rank >= 2 and not user.kwargs:  # an invoke's rows
        return rank
    if user.target is operator.getitem and len(user.args) == 2 and not user.kwargs:
        return _basic_index_rank(user.args[1], rank)
    return None


def _narrows(read: torch.fx.Node, rank: int, out_rank: int, depth: int = 0) -> bool:
    """Whether ``read`` (from a tensor of ``rank`` to one of ``out_rank``), or every read of it in turn, takes
    fewer rows than the tensor has: a dim dropped, or a range of a dim after the first (the first is the
    batch, which the invokes' rows partition)."""
    if out_rank < rank:
        return True
    if read.target is aten.slice.Tensor and (read.args[1] if len(read.args) > 1 else 0) % rank != 0:
        return True
    if read.target is operator.getitem:
        items = read.args[1] if type(read.args[1]) is tuple else (read.args[1],)
        if any(type(item) is slice and item != slice(None) for item in items[1:]):
            return True
    if depth > 8 or not read.users:
        return False
    return all((r := _read_rank(u, read, out_rank)) is not None and _narrows(u, out_rank, r, depth + 1)
               for u in read.users)


def _basic_index_rank(index, rank: int) -> int | None:
    """The rank ``t[index]`` has for ``t`` of ``rank``, if ``index`` is numbers, slices and the program's
    positions on dims before the last; else ``None`` (``None``, ``...``, tensors and masks: a mask can
    reach the last dim)."""
    items = index if type(index) is tuple else (index,)
    if len(items) >= rank:
        return None
    kept = rank
    for item in items:
        if type(item) is slice:
            if not all(b is None or type(b) is int or _is_position(b) for b in (item.start, item.stop, item.step)):
                return None
        elif type(item) is int or _is_position(item):
            kept -= 1
        else:
            return None
    return kept


def _is_position(node) -> bool:
    """An input of the graph that is fed a Python int (marked ``fxpatch_number`` by whoever runs the pass)."""
    return isinstance(node, torch.fx.Node) and node.op == "placeholder" and node.meta.get("fxpatch_number") is True
