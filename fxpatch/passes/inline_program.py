"""Pass: inline a functional program (``FunctionalProgram``) into an exported graph with sites.

After it runs:
- the program's chain-root placeholders are the model's own nodes (a read is
  an op on the value the model computed there, e.g. ``capture``: the
  invoke's rows), its other placeholders are new graph inputs after the
  graph's own, and every program op is a node placed right after the last
  value it uses, so the graph stays in topological order and the model is
  never reordered;
- for every event (an assignment, or a tensor changed in place), the model
  nodes that consume the event's sites after the event's point of the
  forward pass use the event's value (the ``scatter``); nodes before it do
  not, exactly as in an eager run with hooks;
- the values the program saved are extra outputs, in the program's order.
Inserted nodes carry ``meta["fxpatch_loc"]`` (the user's line) and
``meta["fxpatch_role"]``. A write that a model node would consume before the
write could be computed (a value flowing backwards through the network) raises
``FlowError`` naming both lines; so does an in-place write to a tensor the
model also holds through a view of its own, which fxpatch refuses rather
than follow.
"""

from __future__ import annotations

import torch
from torch.fx.node import map_arg
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .diagnostics import FlowError
from .functionalize_program import ROOT, FunctionalProgram
from .ops import is_site


class InlineProgram(PassBase):
    """``InlineProgram(functional, positions=None)(gm)``; ``functional`` comes from ``functionalize_program``.

    ``positions``: each node's position in the site graph, where ``gm`` holds only part of its nodes
    (``fxpatch/segments.py``; by default a node's index in ``gm``). A program's times are positions.
    """

    def __init__(self, functional: FunctionalProgram, positions: dict[torch.fx.Node, int] | None = None):
        super().__init__()
        self.fp = functional
        self.positions = positions

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        fp, graph = self.fp, gm.graph
        order = dict(self.positions) if self.positions is not None else {n: i for i, n in enumerate(graph.nodes)}
        original = set(order)
        by_name = {n.name: n for n in graph.nodes}
        sites: dict[str, torch.fx.Node] = {}
        for n in graph.nodes:
            if is_site(n) and sites.setdefault(n.args[1], n) is not n:  # a name must say which call it is
                raise ValueError(f"two site nodes are named {n.args[1]!r}: {sites[n.args[1]].name}, {n.name}")
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        top = placeholders[-1]
        cursor: dict[torch.fx.Node, torch.fx.Node] = {}
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        anchor: dict[torch.fx.Node, torch.fx.Node] = {}
        called: dict[str, str] = {}

        def place(after, op, target, args, kwargs, source):
            with graph.inserting_after(cursor.get(after, after)):
                new = graph.create_node(op, target, args, kwargs)
            cursor[after] = new
            order.setdefault(new, order[after])
            custom = source.meta.get("custom", {})
            new.meta["fxpatch_loc"] = custom.get("fxpatch_loc")
            new.meta["fxpatch_role"] = custom.get("fxpatch_role", "op")
            if custom.get("fxpatch_site"):
                new.meta["fxpatch_site"] = custom["fxpatch_site"]
            for key in ("val", "tensor_meta"):
                if key in source.meta:
                    new.meta[key] = source.meta[key]
            return new

        inputs = [n for n in fp.graph.graph.nodes if n.op == "placeholder"]
        n_roots = len(fp.roots)
        for pnode in fp.graph.graph.nodes:
            if pnode.op == "placeholder":
                i = inputs.index(pnode)
                if i < n_roots:
                    env[pnode] = anchor[pnode] = by_name[fp.roots[i]]
                    continue
                with graph.inserting_after(cursor.get(top, top)):
                    new = graph.placeholder(f"fxpatch_{pnode.name}")
                new.meta.update(fxpatch_loc=None, fxpatch_role="input")
                cursor[top] = new
                order[new] = order[top]
                env[pnode], anchor[pnode] = new, top
                continue
            if pnode.op == "output":
                outputs = list(map_arg(tuple(pnode.args[0]), lambda a: env[a]))  # nested: a saved shape
                continue
            if pnode.op == "get_attr":
                name = f"fxpatch_const_{len(called)}_{pnode.target}"
                setattr(gm, name, getattr(fp.graph, pnode.target))
                called[name] = name
                env[pnode] = place(top, "get_attr", name, (), {}, pnode)
                anchor[pnode] = top
                continue
            after = top
            for a in pnode.all_input_nodes:
                if order[anchor[a]] > order[after]:
                    after = anchor[a]
            target = pnode.target
            if pnode.op == "call_module":
                if target not in called:
                    called[target] = f"fxpatch_call_{len(called)}"
                    gm.add_submodule(called[target], fp.graph.get_submodule(target))
                target = called[target]
            args = map_arg(pnode.args, lambda a: env[a])
            kwargs = map_arg(pnode.kwargs, lambda a: env[a])
            env[pnode] = place(after, pnode.op, target, args, kwargs, pnode)
            anchor[pnode] = after

        saved = outputs[:fp.n_saved]
        self._rewire(graph, fp, outputs, order, original, sites, by_name)
        out = graph.output_node()
        out.args = (tuple(out.args[0]) + tuple(saved),)
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    @staticmethod
    def _rewire(graph, fp: FunctionalProgram, outputs, order, original, sites, by_name):
        """Point each model consumer of an event's sites, after the event, at the event's value."""
        chosen: dict[tuple[torch.fx.Node, torch.fx.Node], torch.fx.Node] = {}
        for ev, value in fp.changes(outputs, by_name.__getitem__):  # a tensor unchanged since its last point: none
            # a site left out of a graph that holds part of the model (fxpatch/segments.py) is an identity of
            # a member it holds, through which the left-out site's users get the value
            members = [by_name[ev.root] if m == ROOT else sites[m] for m in ev.members if m == ROOT or m in sites]
            time = ev.time
            for m in members:
                for user in m.users:
                    if user not in original or is_site(user):
                        continue
                    if ev.first < order[user] < time:
                        _flow_error(ev, m, user)
                    if order[user] > time:
                        chosen[(user, m)] = value
                        value.meta["fxpatch_role"] = "scatter"
                        value.meta.setdefault("fxpatch_site", ev.target)
            if ev.assigned is None:
                _check_model_views(ev, members, time, order, original)
        for (user, m), value in chosen.items():
            user.replace_input_with(m, value)


def _flow_error(ev, member, user):
    site = ev.target or (member.args[1] if is_site(member) else ev.root)
    if ev.waited_for is not None:
        later, read_loc = ev.waited_for
        problem = (f"{site} is written after the model has already used it, because the write waits for {later} "
                   f"(already read at the line below), which the model computes later: the value would have to "
                   "flow backwards, and fxpatch does not reorder a program")
    else:
        later, read_loc = None, None
        problem = f"{site} is written after the model has already used it, so the value would have to flow backwards"
    also = [("read at", read_loc)] if read_loc is not None and read_loc != ev.loc else []
    raise FlowError(problem, at=ev.loc, also=also,
                    hint="Write upstream sites before reading downstream ones in each invoke. To move a value "
                    "backwards, read it in a separate trace, .save() it, and write it in the next trace.")


def _is_view(node: torch.fx.Node) -> bool:
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is None:
        return False
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def _check_model_views(ev, members, time, order, original):
    """An in-place write reaches every view of the tensor; fxpatch follows the sites, not the model's own views."""
    todo = list(members)
    seen = set()
    while todo:
        node = todo.pop()
        for user in node.users:
            if user in seen or user not in original:
                continue
            seen.add(user)
            view = _is_view(user) or (user.target.__name__ == "getitem" if callable(user.target) else False)
            if not view:
                continue
            if order[user] <= time and any(order[u] > time for u in user.users if u in original):
                raise FlowError(
                    f"this in-place write changes {ev.root}, which the model also holds as a view ({user.name}) "
                    "that it uses after the write; fxpatch does not follow a write into the model's own views",
                    at=ev.loc, hint="Assign a new value instead (module.output = value), or write at a site "
                    "the model uses directly.")
            todo.append(user)
