"""Running a recorded program: rewrite the exported graph, check it, run it once.

Rewritten graphs are cached per model by the program's structure (ops,
sites, invoke row ranges), so runs that differ only in values (other prompts
of the same row counts, other saved tensors) reuse one graph.
"""

from __future__ import annotations

from typing import Any

import torch
from tabulate import tabulate

from .inputs import left_pad
from .passes import CheckShapes, InlineProgram, StripSites


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (node meta shallow-copied)."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)


def program_key(program: torch.fx.Graph) -> tuple:
    """The structure of a program: equal keys give the same rewritten graph."""
    index = {}
    key = []

    def norm(a):
        if isinstance(a, torch.fx.Node):
            return ("node", index[a])
        if isinstance(a, (tuple, list)):
            return (type(a).__name__, tuple(norm(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, norm(v)) for k, v in a.items()))
        if isinstance(a, slice):
            return ("slice", norm(a.start), norm(a.stop), norm(a.step))
        return (type(a).__name__, repr(a))

    for i, node in enumerate(program.nodes):
        index[node] = i
        target = node.target if isinstance(node.target, str) else (
            getattr(node.target, "__module__", ""), getattr(node.target, "__qualname__", repr(node.target)))
        key.append((node.op, target, norm(node.args), norm(node.kwargs), node.meta.get("fxpatch_invoke")))
    return tuple(key)


def patched_graph(model, mode: str, program: torch.fx.Graph) -> torch.fx.GraphModule:
    """The site graph of ``mode`` with ``program`` inlined, from the model's cache if seen before."""
    key = (mode, program_key(program))
    gm = model._patched.get(key)
    if gm is None:
        gm = copy_graph_module(model.site_graph(mode).graph_module)
        modules = {n.target: model._model.get_submodule(n.target) for n in program.nodes if n.op == "call_module"}
        for p in (InlineProgram(program, modules), StripSites()):
            gm = p(gm).graph_module
        model._patched[key] = gm
    return gm


def inserted_nodes(gm: torch.fx.GraphModule) -> list[dict[str, Any]]:
    """The nodes a rewrite inserted, with the user line each came from."""
    rows = []
    for node in gm.graph.nodes:
        role = node.meta.get("fxpatch_role")
        if role is None:
            continue
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        rows.append({"node": node.name, "role": role, "target": target,
                     "site": node.meta.get("fxpatch_site", ""), "line": str(node.meta.get("fxpatch_loc", ""))})
    return rows


def format_inserted(rows: list[dict[str, Any]]) -> str:
    """``inserted_nodes`` as a table."""
    return tabulate(rows, headers="keys", tablefmt="github") if rows else "(no nodes inserted)"


def run_trace(tracer) -> list[Any]:
    """Run ``tracer``'s program as one batched pass; return the saved values in order."""
    model = tracer.model
    rows = [r for invoke in tracer.invokes for r in invoke.rows]
    batch = left_pad(rows, model.pad_token_id, model.device)
    tracer.batch = batch
    program = tracer.program
    program.output(tuple(p.node for p in tracer.saved))
    sg = model.site_graph(tracer.mode)
    gm = patched_graph(model, tracer.mode, program)
    values = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "position_ids": batch.position_ids}
    consts = [n.meta["fxpatch_value"] for n in program.nodes if n.op == "placeholder"]
    flat = sg.state_values(model._model) + [values[name] for name in sg.inputs] + consts
    shape_key = (id(gm), tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in flat[-len(sg.inputs) - len(consts):]))
    if shape_key not in model._checked:
        CheckShapes(flat)(gm)
        model._checked.add(shape_key)
    tracer.graph = gm
    tracer.inserted = inserted_nodes(gm)
    with torch.no_grad():
        out = gm(*flat)
    return list(out[len(sg.outputs):])
