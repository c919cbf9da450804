"""Running a recorded program: rewrite the exported graph, check it, run it once.

Rewritten graphs are cached per model by the program's structure (ops,
sites, invoke row ranges), so runs that differ only in values (other prompts
of the same row counts, other saved tensors) reuse one graph.
"""

from __future__ import annotations

import os
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
        # id() tells apart functions that share a name (lambdas, closures)
        target = node.target if isinstance(node.target, str) else (
            getattr(node.target, "__module__", ""), getattr(node.target, "__qualname__", ""), id(node.target))
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
                     "site": node.meta.get("fxpatch_site", ""), "line": _short(node.meta.get("fxpatch_loc"))})
    return rows


def _short(loc) -> str:
    """``file:line`` with the file relative to the working directory when it is below it."""
    if loc is None:
        return ""
    path = os.path.relpath(loc.filename) if os.path.isabs(loc.filename) else loc.filename
    return f"{path if not path.startswith('..') else os.path.basename(loc.filename)}:{loc.lineno}"


def format_inserted(rows: list[dict[str, Any]]) -> str:
    """``inserted_nodes`` as a table."""
    return tabulate(rows, headers="keys", tablefmt="github") if rows else "(no nodes inserted)"


def phase_outputs(tracer, phase: int) -> list[torch.fx.Node]:
    """The program nodes a phase must return: values saved in it and values later phases use."""
    nodes = [p.node for p in tracer.saved if p.node.meta["fxpatch_phase"] == phase]
    nodes += tracer.carries.get(phase, [])
    return list(dict.fromkeys(nodes))


def _feeds(program: torch.fx.Graph, values: dict) -> list[Any]:
    feeds = []
    for node in program.nodes:
        if node.op != "placeholder":
            continue
        if "fxpatch_carry" in node.meta:
            feeds.append(values[node.meta["fxpatch_carry"]])
        elif node in values:  # a value the runner provides (generated tokens)
            feeds.append(values[node])
        else:
            feeds.append(node.meta["fxpatch_value"])
    return feeds


def run_program(model, mode: str, program: torch.fx.Graph, outputs: list[torch.fx.Node],
                model_inputs: list[torch.Tensor], values: dict) -> tuple[list[Any], torch.fx.GraphModule]:
    """Run one phase: the site graph of ``mode`` with ``program`` inlined.

    ``values`` maps program nodes of earlier phases to their values; the
    values of ``outputs`` are added to it. Returns the model's own outputs
    and the graph that ran.
    """
    if program.find_nodes(op="output"):
        raise RuntimeError("a program runs once")
    empty = len(program.nodes) == 0
    program.output(tuple(outputs))
    sg = model.site_graph(mode)
    gm = patched_graph(model, mode, program)
    flat = sg.state_values(model._model) + list(model_inputs) + _feeds(program, values)
    if not empty:  # the plain model needs no check; a patched graph once per shape of its inputs
        user_inputs = flat[len(sg.state):]
        if mode == "decode":
            # decode steps differ only in the cache length; checking the first is enough
            user_inputs = [t for name, t in zip(sg.input_names, user_inputs) if name == "input_ids"] + \
                user_inputs[len(model_inputs):]
        shape_key = (id(gm), tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else repr(t) for t in user_inputs))
        if shape_key not in model._checked:
            CheckShapes(flat)(gm)
            model._checked.add(shape_key)
    with torch.no_grad():
        out = gm(*flat)
    n = len(sg.outputs)
    values.update(zip(outputs, out[n:]))
    return list(out[:n]), gm


def run_detached(program: torch.fx.Graph, outputs: list[torch.fx.Node], values: dict) -> None:
    """Run a program that touches no model (ops on generated tokens and earlier values)."""
    program.output(tuple(outputs))
    gm = torch.fx.GraphModule(torch.nn.Module(), program)
    flat = _feeds(program, values)
    CheckShapes(flat)(gm)
    with torch.no_grad():
        out = gm(*flat)
    values.update(zip(outputs, out))


def bind_values(tracer, values: dict) -> None:
    """Give every saved proxy its value (``None`` for a step that never ran)."""
    for proxy in tracer.saved:
        object.__setattr__(proxy, "value", values.get(proxy.node))


def run_trace(tracer) -> None:
    """Run a trace's program as one batched forward pass and bind the saved values."""
    model = tracer.model
    rows = [r for invoke in tracer.invokes for r in invoke.rows]
    batch = left_pad(rows, model.pad_token_id, model.device)
    tracer.batch = batch
    inputs = [batch.input_ids, batch.attention_mask]
    if "position_ids" in model.site_graph("forward").input_names:
        inputs.append(batch.position_ids)
    values: dict = {}
    _, gm = run_program(model, "forward", tracer.program_of(0), phase_outputs(tracer, 0), inputs, values)
    tracer.graph = gm
    tracer.inserted = inserted_nodes(gm)
    bind_values(tracer, values)
