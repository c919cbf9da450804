"""Pass: inline a recorded program into an exported graph with sites.

After it runs:
- every ``read_site`` of the program is a ``capture`` node (the invoke's rows
  of the site's current value), placed right after the site;
- every ``write_site`` is a ``scatter`` node right after the site, and the
  model nodes that used the site now use the scattered value;
- every other program op is a node placed right after the last value it
  uses, so the graph stays in topological order and nothing is reordered;
- the program's inputs are new placeholders after the graph's own, and the
  values it saved are extra outputs, in the program's output order.
Inserted nodes carry ``meta["fxpatch_loc"]`` (the user's line) and
``meta["fxpatch_role"]``. A value that would flow backwards (read at a later
site than the one it is written to), or a write upstream of a site the same
invoke already read, raises ``FlowError`` naming both lines.
"""

from __future__ import annotations

import torch
from torch.fx.node import map_arg
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .diagnostics import FlowError, location_of
from .ops import capture, is_site, read_site, scatter, write_site


class InlineProgram(PassBase):
    """``InlineProgram(program, modules)(gm)``; ``modules`` maps paths to modules the program calls."""

    def __init__(self, program: torch.fx.Graph, modules: dict[str, torch.nn.Module] | None = None):
        super().__init__()
        self.program = program
        self.modules = modules or {}

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        sites: dict[str, torch.fx.Node] = {}
        for n in graph.nodes:
            if is_site(n) and sites.setdefault(n.args[1], n) is not n:  # a name must say which call it is
                raise ValueError(f"two site nodes are named {n.args[1]!r}: {sites[n.args[1]].name}, {n.name}")
        model_users = {name: list(node.users) for name, node in sites.items()}
        successors = {n: list(n.users) for n in graph.nodes}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        top = placeholders[-1] if placeholders else None

        cursor: dict[torch.fx.Node, torch.fx.Node] = {}
        version: dict[str, torch.fx.Node] = {}
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        anchor: dict[torch.fx.Node, torch.fx.Node] = {}  # program node -> model node it follows
        origin: dict[torch.fx.Node, torch.fx.Node] = {}  # program node -> read that set its anchor
        reads: dict[object, list[tuple[int, torch.fx.Node]]] = {}
        called: dict[str, str] = {}

        def place(after: torch.fx.Node, op, target, args, kwargs, source, role):
            with graph.inserting_after(cursor.get(after, after)):
                new = graph.create_node(op, target, args, kwargs)
            cursor[after] = new
            order.setdefault(new, order[after])
            new.meta["fxpatch_loc"] = location_of(source)
            new.meta["fxpatch_role"] = role
            new.meta["fxpatch_program_node"] = source.name
            if "fxpatch_site" in source.meta:
                new.meta["fxpatch_site"] = source.meta["fxpatch_site"]
            return new

        for pnode in self.program.nodes:
            if pnode.op == "placeholder":
                with graph.inserting_after(cursor.get(top, top)):
                    new = graph.placeholder(f"fxpatch_{pnode.name}")
                new.meta.update(fxpatch_loc=location_of(pnode), fxpatch_role="input")
                cursor[top] = new
                order[new] = order[top] if top is not None else -1
                env[pnode], anchor[pnode] = new, top
                continue
            if pnode.op == "output":
                saved = [env[a] for a in pnode.args[0]]
                out = graph.output_node()
                out.args = (tuple(out.args[0]) + tuple(saved),)
                continue
            inputs = pnode.all_input_nodes
            if pnode.target is read_site:
                name, start, stop = pnode.args
                site = sites[name]
                env[pnode] = place(site, "call_function", capture, (version.get(name, site), start, stop), {},
                                   pnode, "capture")
                anchor[pnode], origin[pnode] = site, pnode
                if pnode.users:  # a read nothing uses (a sibling of a used leaf) constrains nothing
                    reads.setdefault(pnode.meta.get("fxpatch_invoke"), []).append((site, pnode))
                continue
            # an op follows the latest of the values it uses
            after, source_read = top, None
            for a in inputs:
                if after is None or order[anchor[a]] > order[after]:
                    after, source_read = anchor[a], origin.get(a)
            if pnode.target is write_site:
                name, start, stop, value = pnode.args
                site = sites[name]
                self._check_flow(pnode, site, after, source_read, order, reads, successors)
                value = env[value] if isinstance(value, torch.fx.Node) else value
                base = version.get(name, site)
                new = place(site, "call_function", scatter, (base, value, start, stop), {}, pnode, "scatter")
                for user in model_users[name]:
                    user.replace_input_with(base, new)
                version[name] = new
                env[pnode], anchor[pnode] = new, site
                continue
            args = map_arg(pnode.args, lambda a: env[a])
            kwargs = map_arg(pnode.kwargs, lambda a: env[a])
            target = pnode.target
            if pnode.op == "call_module":
                if target not in called:
                    called[target] = f"fxpatch_call_{len(called)}"
                    gm.add_submodule(called[target], self.modules[target])
                target = called[target]
            role = "call" if pnode.op == "call_module" else "op"
            env[pnode] = place(after, pnode.op, target, args, kwargs, pnode, role)
            anchor[pnode] = after
            origin[pnode] = source_read
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    @staticmethod
    def _check_flow(write, site, after, source_read, order, reads, successors):
        if after is not None and order[after] > order[site]:
            raise FlowError(
                f"the value written to {site.args[1]} is computed from {source_read.args[0]}, which the "
                "model computes later in the same pass, so it would have to flow backwards",
                at=location_of(write), also=[("read at", location_of(source_read))],
                hint="Read the value in a separate trace and .save() it, then write it in the next trace; "
                "or write it to a site at or after the one it is read from.")
        earlier = reads.get(write.meta.get("fxpatch_invoke"), [])
        if not earlier:
            return
        downstream, todo = set(), [site]
        while todo:  # what the model computes from this site
            for user in successors[todo.pop()]:
                if user not in downstream:
                    downstream.add(user)
                    todo.append(user)
        for read_site_node, read in earlier:
            if read_site_node in downstream:
                raise FlowError(
                    f"this invoke writes {site.args[1]} after it already read {read.args[0]}, which the model "
                    "computes later; the read would not see the write, and fxpatch does not reorder a program",
                    at=location_of(write), also=[("read at", location_of(read))],
                    hint="Write upstream sites before reading downstream ones in each invoke.")
