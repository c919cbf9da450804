"""A site graph cut into layer-sized segments, so that rewriting it for a new program costs what the
program touches, not the whole model.

The site graph of a mode is flat, functional and in topological order, so any cut into contiguous
segments is valid; fxpatch cuts it where each child of the model's longest module list (its decoder
layers) starts, and where the list ends. A segment's interface is in site-graph nodes: the values
defined before it that it uses (``Part.inputs``) and those it defines that later nodes or the graph's
output use (``Part.outputs``). Its *base* form, made once per site graph, is a ``GraphModule`` of its
nodes with every site replaced by its argument (sites are identities).

A program's rewritten graph (``segmented_graph``) holds the nodes of the segments the program touches,
copied with their sites and names, and each run of other segments as one call of a ``Chain`` of their
base forms (plus a ``getitem`` per value the run passes on). The rewrite passes (``InlineProgram``,
``StripSites``) run on it as on the flat graph: a write at a site redirects the site's later users,
chain calls included, so later segments compute on the written value; dead-code elimination drops
the chains whose values nothing needs (the layers after a trace's last read), and ``narrow_chains``
the segments of a chain that none of its used values needs (the layers below a patch that replaces
a layer's output whole). Its inputs are the tuple of the site graph's state
values (parameters, buffers, constants), then the model's inputs, then the program's::

    gm(model.state_values("forward"), *model_inputs, *feeds)

Example::

    sg = model.site_graph("forward")
    seg = segments_of(sg)
    len(seg.parts)                      # the decoder layers, and what comes before and after them
    gm, positions = segmented_graph(sg, seg, touched={3})
"""

from __future__ import annotations

import bisect
import operator
import re
from collections.abc import Callable, Iterable

import torch
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.node import map_arg

from .gradients import make_differentiable
from .passes.ops import is_site
from .passes.strip_sites import _ASSERT_METADATA, _is_impure

STATE = "fxpatch_state"  # the rewritten graph's first input: the tuple of the site graph's state values


class Part:
    """One segment of a site graph: its ``nodes`` (in order) from position ``start``.

    ``inputs``: the nodes before it whose values its computation uses (a site used through its own
    sites is followed back to the first node outside); ``outputs``: its nodes that later nodes use, each
    with the node computing its value (``value``, which may lie before the segment: a site that only
    passes a value on).
    """

    def __init__(self, index: int, start: int, nodes: list[torch.fx.Node]):
        self.index, self.start, self.nodes = index, start, nodes
        self.inputs: list[torch.fx.Node] = []
        self.outputs: list[torch.fx.Node] = []
        self.value: dict[torch.fx.Node, torch.fx.Node] = {}
        self.state: list[torch.fx.Node] = []  # the state placeholders its nodes use
        self.attrs: list[str] = []  # get_attr targets of its nodes
        self._base: BaseSegment | None = None

    def base(self, sg) -> BaseSegment:
        """The base form (made once)."""
        if self._base is None:
            self._base = _base_segment(sg, self)
        return self._base


class Segments:
    """The segments of one site graph (``segments_of``)."""

    def __init__(self, sg):
        nodes = list(sg.graph_module.graph.nodes)
        self.nodes = nodes
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        n_state = len(sg.state)
        self.state_index = {n: i for i, n in enumerate(self.placeholders[:n_state])}
        self.inputs = self.placeholders[n_state:]
        self.output = nodes[-1]
        first = len(self.placeholders)
        self.bounds = sorted({first} | {b for b in _layer_bounds(sg) if first < b < len(nodes) - 1})
        self.parts = [Part(i, b, nodes[b:end]) for i, (b, end) in
                      enumerate(zip(self.bounds, self.bounds[1:] + [len(nodes) - 1]))]
        self.index = {n: i for i, n in enumerate(nodes)}
        self.index_of = {n.name: i for i, n in enumerate(nodes)}  # by node name
        self.part_of = {n: p.index for p in self.parts for n in p.nodes}
        self._interfaces()
        self._chains: dict[tuple, Chain] = {}
        self.sg = sg

    def part_at(self, position: int) -> int | None:
        """The segment holding the node at ``position`` (``None`` for a placeholder or the output)."""
        if position < self.bounds[0] or position >= len(self.nodes) - 1:
            return None
        return bisect.bisect_right(self.bounds, position) - 1

    def _interfaces(self) -> None:
        part_of, end = self.part_of, len(self.parts)
        self.last_use: dict[torch.fx.Node, int] = {}  # node -> the last segment using it (end: the output)
        for p in self.parts:
            value = p.value
            inputs: dict[torch.fx.Node, None] = {}
            for n in p.nodes:
                if is_site(n):
                    a = n.args[0]
                    value[n] = value.get(a, a)
                    continue
                value[n] = n
                if n.op == "get_attr":
                    p.attrs.append(n.target)
                for a in n.all_input_nodes:
                    v = value.get(a, a)
                    if part_of.get(v) != p.index:
                        inputs[v] = None
            p.inputs = list(inputs)
            p.state = [v for v in p.inputs if v in self.state_index]
            for n in p.nodes:
                uses = [part_of.get(u, end) for u in n.users if part_of.get(u) != p.index]
                if uses:
                    p.outputs.append(n)
                    self.last_use[n] = max(uses)

    def chain(self, span: tuple[int, int], parts: tuple[int, ...] | None = None,
              outputs: tuple[torch.fx.Node, ...] | None = None) -> Chain:
        """``Chain(self, sg, span, parts, outputs)``, made once."""
        key = (span, parts, outputs)
        chain = self._chains.get(key)
        if chain is None:
            chain = self._chains[key] = Chain(self, self.sg, span, parts, outputs)
        return chain


def segments_of(sg) -> Segments:
    """The segments of ``sg`` (made once per site graph)."""
    seg = getattr(sg, "_segments", None)
    if seg is None:
        seg = sg._segments = Segments(sg)
    return seg


def _layer_bounds(sg) -> list[int]:
    """Positions where each child of the longest module list starts (its first site), and of the first
    site after the list."""
    counts: dict[str, set[int]] = {}
    for path in sg.modules:
        m = re.fullmatch(r"(.+)\.(\d+)", path)
        if m and path not in sg.aliases:
            counts.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not counts:
        return []
    prefix = max(counts, key=lambda k: len(counts[k]))
    if len(counts[prefix]) < 2:
        return []
    inside = re.compile(re.escape(prefix) + r"\.(\d+)(?:[.\[#]|$)")
    sites = [(i, n.args[1]) for i, n in enumerate(sg.graph_module.graph.nodes) if is_site(n)]
    first: dict[int, int] = {}
    last = -1
    for i, name in sites:
        m = inside.match(name)
        if m:
            first.setdefault(int(m.group(1)), i)
            last = i
    after = next((i for i, name in sites if i > last and not inside.match(name)), None)
    return sorted(set(first.values()) | ({after} if after is not None else set()))


class BaseSegment:
    """A segment's base form: ``gm(*part.inputs) -> tuple(values of part.outputs)``, no sites left."""

    def __init__(self, gm: torch.fx.GraphModule, impure: bool):
        self.gm, self.impure = gm, impure


def _base_segment(sg, part: Part) -> BaseSegment:
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in part.inputs:
        env[n] = graph.placeholder(n.name)
        env[n].meta["val"] = n.meta.get("val")
    original = {}
    for n in part.nodes:
        if is_site(n):
            continue
        new = graph.node_copy(n, lambda a: env[part.value.get(a, a)])
        env[n] = new
        original[new] = n
    graph.output(tuple(env[part.value[n]] for n in part.outputs))

    def impure(node):
        if node.op == "call_function" and node.target is _ASSERT_METADATA:
            checked = original[node].args[0]  # as in the whole graph: kept while the tensor has other users
            return any(u.target is not _ASSERT_METADATA for u in checked.users)
        return _is_impure(node)

    while graph.eliminate_dead_code(is_impure_node=impure):
        pass
    gm = _LazyGraphModule({t: _attr(sg.graph_module, t) for t in part.attrs}, graph)
    make_differentiable(gm)
    # a segment whose values nothing needs is dead code, unless it does more than compute them
    return BaseSegment(gm, any(_is_impure(n) and n.target is not _ASSERT_METADATA
                               for n in graph.nodes if n.op == "call_function"))


def _attr(module: torch.nn.Module, target: str):
    for name in target.split("."):
        module = getattr(module, name)
    return module


class Chain(torch.nn.Module):
    """Some of the segments ``span[0]`` to ``span[1] - 1`` run one after the other:
    ``chain(state, *inputs) -> tuple(outputs)``.

    ``inputs``: the values from before the span it needs (state comes from the ``state`` tuple instead);
    ``outputs``: the nodes, computed in its segments, whose values it returns (by default those that
    segments after the span or the graph's output use); ``passed``: sites after the span uses whose value
    is one of ``outputs`` or from before the span (a site inside the span is the value it passes on).
    A plain module, not a ``GraphModule``: torch.fx regenerates the code of a ``GraphModule``'s
    ``GraphModule`` children whenever it makes its own.
    """

    def __init__(self, seg: Segments, sg, span: tuple[int, int], parts: tuple[int, ...] | None = None,
                 outputs: tuple[torch.fx.Node, ...] | None = None):
        super().__init__()
        i, j = span
        self.span = span
        self.parts = parts = tuple(range(i, j)) if parts is None else parts
        part_of = seg.part_of

        def resolve(n):
            while is_site(n) and i <= part_of.get(n, -1) < j:
                n = n.args[0]
            return n

        self.passed: dict[torch.fx.Node, torch.fx.Node] = {}
        if outputs is None:
            computed: dict[torch.fx.Node, None] = {}
            for p in seg.parts[i:j]:
                for n in p.outputs:
                    if seg.last_use[n] >= j:
                        r = resolve(n)
                        if i <= part_of.get(r, -1) < j:
                            computed[r] = None
                        if r is not n:
                            self.passed[n] = r
            outputs = tuple(computed)
        self.outputs = outputs
        # the values by slot, in the order the chain comes to them
        slot: dict[torch.fx.Node, int] = {}
        inputs: list[torch.fx.Node] = []
        self.input_slots: list[int] = []
        self.steps = []
        for k in parts:
            p = seg.parts[k]
            plan = []
            for v in p.inputs:
                if v in seg.state_index:
                    plan.append((True, seg.state_index[v]))
                    continue
                r = resolve(v)
                if r not in slot:  # not computed by the chain: an input
                    slot[r] = len(slot)
                    inputs.append(r)
                    self.input_slots.append(slot[r])
                plan.append((False, slot[r]))
            outs = []
            for n in p.outputs:
                v = p.value[n]
                if v not in slot:
                    slot[v] = len(slot)
                outs.append(slot[v])
            self.steps.append((plan, outs))
        self.inputs = inputs
        n_slots = len(slot)
        self.n_slots = n_slots
        self.result = [slot[n] for n in outputs]
        self.segments = torch.nn.ModuleList(seg.parts[k].base(sg).gm for k in parts)
        self._is_impure = any(seg.parts[k].base(sg).impure for k in parts)  # what dead-code elimination asks

    def forward(self, state, *inputs):
        values = [None] * self.n_slots
        for k, v in zip(self.input_slots, inputs):
            values[k] = v
        for gm, (plan, outs) in zip(self.segments, self.steps):
            out = gm(*[state[k] if is_state else values[k] for is_state, k in plan])
            for k, v in zip(outs, out):
                values[k] = v
        return tuple(values[k] for k in self.result)

    def needed(self, seg: Segments, outputs: Iterable[torch.fx.Node]) -> tuple[int, ...]:
        """The segments of the chain that computing ``outputs`` needs (and those that must run anyway)."""
        i, j = self.span
        want = set(outputs)
        keep = []
        for k in reversed(self.parts):
            p = seg.parts[k]
            if self._is_impure and p._base.impure or any(p.value[n] in want for n in p.outputs):
                keep.append(k)
                for v in p.inputs:
                    while is_site(v) and i <= seg.part_of.get(v, -1) < j:
                        v = v.args[0]
                    want.add(v)
        return tuple(reversed(keep))


def narrow_chains(gm: torch.fx.GraphModule, sg) -> None:
    """Drop from each chain call the segments that none of the values the graph uses from it needs
    (dead-code elimination drops whole calls only), then the code that fed only them."""
    seg = segments_of(sg)
    changed = True
    while changed:
        changed = False
        for node in reversed(gm.graph.nodes):
            if node.op != "call_module" or not node.target.startswith("segments_"):
                continue
            chain = gm.get_submodule(node.target)
            used = sorted({u.args[1] for u in node.users})
            outputs = tuple(chain.outputs[k] for k in used)
            parts = chain.needed(seg, outputs)
            if parts == chain.parts and len(outputs) == len(chain.outputs):
                continue
            new = seg.chain(chain.span, parts, outputs)
            given = dict(zip(chain.inputs, node.args[1:]))
            node.args = (node.args[0], *(given[n] for n in new.inputs))
            for u in list(node.users):
                u.args = (node, used.index(u.args[1]))
            gm.add_submodule(node.target, new)
            changed = True
        if changed:
            while gm.graph.eliminate_dead_code(is_impure_node=_is_impure):
                pass
    gm.recompile()


def segmented_graph(sg, seg: Segments, touched: Iterable[int], model_outputs: bool = True,
                    sites_of: Callable[[str], bool] | None = None
                    ) -> tuple[torch.fx.GraphModule, dict[torch.fx.Node, int]]:
    """A graph that computes what ``sg`` computes, with the nodes of the ``touched`` segments copied
    (same names) and each run of other segments one call of a ``Chain``. A copied segment keeps the
    sites for whose names ``sites_of`` is true (default: all), the others are replaced by their
    arguments.

    Returns it and each node's position in ``sg`` (of a chain call: its first segment's position),
    which ``InlineProgram`` compares with a program's times. ``model_outputs=False``: its output holds
    no model output, and the segments after the last touched one are left out (nothing needs them).
    """
    touched = set(touched)
    graph = torch.fx.Graph()
    positions: dict[torch.fx.Node, int] = {}
    root: dict[str, object] = {}
    state = graph.placeholder(STATE)
    positions[state] = 0
    index = seg.index

    class Env(dict):
        def __missing__(self, n):  # a state value, taken out of the state tuple where first used
            new = self[n] = graph.create_node("call_function", operator.getitem, (state, seg.state_index[n]), {},
                                              name=n.name)
            new.meta["val"] = n.meta.get("val")
            positions[new] = index[n]
            return new

    env = Env()
    for n in seg.inputs:
        env[n] = new = graph.node_copy(n)
        positions[new] = index[n]
    for p in seg.parts:  # the state the copied segments use comes right after the inputs
        if p.index in touched:
            for v in p.state:
                env[v]
    end = len(seg.parts)
    if not model_outputs:
        end = max(touched, default=-1) + 1
        impure = [p.index for p in seg.parts[end:] if p.base(sg).impure]
        end = max([end] + [k + 1 for k in impure])
    lookup = env.__getitem__
    k = 0
    while k < end:
        p = seg.parts[k]
        if k in touched:
            for n in p.nodes:
                if sites_of is not None and is_site(n) and not sites_of(n.args[1]):
                    env[n] = env[n.args[0]]
                    continue
                env[n] = new = graph.node_copy(n, lookup)
                positions[new] = index[n]
            for t in p.attrs:
                root[t] = _attr(sg.graph_module, t)
            k += 1
            continue
        j = k + 1
        while j < end and j not in touched:
            j += 1
        chain = seg.chain((k, j))
        target = f"segments_{k}_{j - 1}"
        root[target] = chain
        call = graph.create_node("call_module", target, (state, *(env[n] for n in chain.inputs)), {}, name=target)
        positions[call] = p.start
        for m, n in enumerate(chain.outputs):
            env[n] = new = graph.create_node("call_function", operator.getitem, (call, m), {}, name=n.name)
            new.meta["val"] = n.meta.get("val")
            positions[new] = p.start
        for n, v in chain.passed.items():
            env[n] = env[v]
        k = j
    out = graph.output(map_arg(seg.output.args[0], lookup) if model_outputs else ())
    positions[out] = index[seg.output]
    return _LazyGraphModule(root, graph), positions
