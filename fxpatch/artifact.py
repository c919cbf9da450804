"""A trace's program as a ``torch.nn.Module``: ``tracer.patched_module()``, to ship a steered model.

After a trace ran, ``tracer.patched_module()`` returns a ``PatchedModule``: a plain module whose
``forward(input_ids, attention_mask)`` runs the model with the trace's interventions inlined, on a
left-padded batch with as many rows per invoke as the trace had, and returns
``(logits, *saved values in the order they were saved)``. It holds a copy of the rewritten graph
(the model's exported graph with the program inlined and the model's logits kept), the model's
parameters and buffers (shared with the model, not copied) and the tensors the program took from
outside the trace (copied, as buffers: the module computes what the trace computed even if those
tensors change later). Its graph has no fxpatch op in it, so ``torch.export.export`` of it gives a
program that ``torch.export.load`` runs in a process that never imports fxpatch; ``torch.compile``
works on it as on any module.

Example::

    with model.trace() as tracer:
        with tracer.invoke("I think that"):
            model.transformer.h[1].output[:, -1] += steer   # a steering vector, from outside the trace
    steered = tracer.patched_module()
    logits, = steered(input_ids, attention_mask)            # one row, any prompt
    ep = torch.export.export(steered, (input_ids, attention_mask), dynamic_shapes=steered.dynamic_shapes)
    torch.export.save(ep, "steered.pt2")                    # torch.export.load(...).module() runs it
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import sympy
import torch
import torch.utils._sympy.functions as sympy_functions
from torch.export import Dim

from .errors import FxpatchError, InputError, user_location
from .export import TRACING_LOCK
from .passes import InlineProgram, StripSites
from .passes.functionalize_program import check_program, feed_numbers, functionalize_program, sympy_numbers
from .passes.ops import SITE_NAMESPACE
from .runner import _feeds, chains_of, copy_graph_module, root_specs, strip_options


class PatchedModule(torch.nn.Module):
    """The model with one trace's interventions built in (made by ``tracer.patched_module()``).

    ``forward(input_ids, attention_mask)`` takes a left-padded batch of ``rows`` rows (the first
    ``invoke_rows[0]`` are invoke 0's, and so on, as in the trace) and returns ``(logits, *saved)``.
    Position ids are computed from the mask. A program that writes in place may have been traced for
    some padded widths only (an index computed from the width); other widths are refused with an
    ``InputError``, and the trace's ``width`` always fits. Attributes: ``model`` (the Hugging Face
    model, shared), ``rewritten`` (the rewritten ``GraphModule``), ``invoke_rows``, ``rows``,
    ``width``, ``saved_lines`` (where each saved value was saved), ``dynamic_shapes`` (for
    ``torch.export.export``: the sequence dim dynamic, rows fixed).

    Example::

        steered = tracer.patched_module()
        logits, h = steered(batch.input_ids, batch.attention_mask)
    """

    def __init__(self, model: torch.nn.Module, graph: torch.fx.GraphModule, state: list[tuple[str, Any]],
                 feeds: list[torch.Tensor], invoke_rows: list[int], n_model_outputs: int,
                 saved_index: list[int], saved_lines: list[str], position_ids: bool,
                 guards: tuple[list, sympy.Symbol] = ([], None), width: int | None = None):
        super().__init__()
        self.model = model
        self.rewritten = graph
        self._state = []  # how to get each of the graph's state inputs: ("param"|"buffer", fqn) or a buffer name
        for kind, ref in state:
            if kind == "constant":  # a tensor the export lifted out of the model's code
                name = f"constant_{len(self._state)}"
                self.register_buffer(name, ref, persistent=False)
                self._state.append(("own", name))
            else:
                self._state.append((kind, ref))
        self._feeds = []
        for i, value in enumerate(feeds):
            name = f"feed_{i}"
            if isinstance(value, torch.Tensor):
                self.register_buffer(name, value.detach().clone())
            else:  # a position or a scalar (a graph input of the rewritten graph): a constant here
                setattr(self, name, value)
            self._feeds.append(name)
        self.invoke_rows = list(invoke_rows)
        self.rows = sum(invoke_rows)
        self._n_model_outputs = n_model_outputs
        self._saved_index = list(saved_index)
        self.saved_lines = list(saved_lines)
        self._position_ids = position_ids
        # conditions on the padded width (``tokens``) where a program writing in place was traced for
        # some widths only; the trace's width always fits
        self._guards, self._tokens = guards
        self.width = width
        seq = Dim.AUTO
        self.dynamic_shapes = {"input_ids": {1: seq}, "attention_mask": {1: seq}}

    def _state_values(self) -> list[torch.Tensor]:
        out = []
        for kind, ref in self._state:
            if kind == "param":
                out.append(self.model.get_parameter(ref))
            elif kind == "buffer":
                out.append(self.model.get_buffer(ref))
            else:
                out.append(getattr(self, ref))
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[Any, ...]:
        """``(logits, *saved)`` for a left-padded batch of ``self.rows`` rows."""
        self._check(input_ids, attention_mask)
        input_ids = input_ids.long()
        attention_mask = attention_mask.long()
        inputs = [input_ids, attention_mask]
        if self._position_ids:
            inputs.append((attention_mask.cumsum(-1) - 1).clamp(min=0))
        feeds = [getattr(self, name) for name in self._feeds]
        out = self.rewritten(*self._state_values(), *inputs, *feeds)
        saved = out[self._n_model_outputs:]
        return (out[0], *(saved[i] for i in self._saved_index))

    def _check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if not (isinstance(input_ids, torch.Tensor) and isinstance(attention_mask, torch.Tensor)):
            raise InputError("a patched module takes input_ids and attention_mask as tensors, got "
                             f"{type(input_ids).__name__} and {type(attention_mask).__name__}", at=user_location(),
                             hint="Pass the tokenizer's tensors: tokenizer(prompts, padding=True, "
                             "return_tensors='pt') with tokenizer.padding_side = 'left'.")
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise InputError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                             "must both have shape (rows, tokens)", at=user_location(),
                             hint="Pass one row per prompt, padded on the left, and a mask of the same shape.")
        if input_ids.shape[0] != self.rows:
            per_invoke = ", ".join(f"invoke {i}: {n}" for i, n in enumerate(self.invoke_rows))
            raise InputError(
                f"this patched module runs batches of {self.rows} rows ({per_invoke}), as its trace did; "
                f"got {input_ids.shape[0]} rows", at=user_location(),
                hint=f"Pass {self.rows} rows, in the trace's invoke order ({per_invoke}); for other counts make "
                "another module from a trace with invokes of those sizes.")
        width = input_ids.shape[1]
        for guard in self._guards:
            # a Python bool: a plain check eagerly, a guard (a range or a fixed width) under torch.export
            # and torch.compile
            if not _evaluate(guard, {self._tokens: width}):
                raise InputError(
                    f"this patched module's program writes in place and was traced for batches whose padded width "
                    f"(tokens) satisfies {_describe(self._guards)}; got {int(width)} tokens",
                    at=user_location(),
                    hint=f"Left-pad the batch to {self.width} tokens (the trace's width, which always fits), or "
                    "make the module from a trace of prompts of this width.")


def patched_module(tracer) -> PatchedModule:
    """``tracer.patched_module()``: see ``PatchedModule``; the trace must have run (call it after the block)."""
    loc = user_location()
    _check_tracer(tracer, loc)
    model = tracer.model
    with model._lock, TRACING_LOCK:
        sg = model.site_graph(tracer.mode)
        program = tracer.program_of(0)
        out_node = program.find_nodes(op="output")[0]
        outputs = list(out_node.args[0])
        model_inputs = [tracer.batch.input_ids, tracer.batch.attention_mask]
        position_ids = "position_ids" in sg.input_names
        if position_ids:
            model_inputs.append(tracer.batch.position_ids)
        feeds = _feeds(program, {})
        graph, guards = _graph_with_logits(model, sg, program, model_inputs, feeds)
        guards = _width_guards(sg, guards, model_inputs, feeds)
    # a proxy saved twice is one value; a module's tuple or ModelOutput was saved as its tensors, in order
    nodes = tracer.saved_nodes
    if nodes is None:  # a trace of a session keeps its proxies
        nodes = list({id(p): p.node for p in tracer.saved}.values())
    saved = [n for n in nodes if n.meta["fxpatch_phase"] == 0]
    return PatchedModule(
        model._model, graph, sg.state, feeds, [len(i.rows) for i in tracer.invokes if i.rows], len(sg.outputs),
        [outputs.index(n) for n in saved], [str(n.meta.get("fxpatch_loc")) for n in saved], position_ids,
        guards, tracer.batch.input_ids.shape[1])


def _check_tracer(tracer, loc) -> None:
    if tracer.kind != "trace":
        raise FxpatchError(f"patched_module() is made from model.trace(); this is model.{tracer.kind}()", at=loc,
                           hint="Record the interventions in a `with model.trace(...)` block and call "
                           "tracer.patched_module() after it.")
    if not tracer.finished:
        raise FxpatchError("tracer.patched_module() was called inside the trace block, before the trace ran",
                           at=loc, hint="Call it after the `with model.trace(...)` block.")
    if tracer.graph is None:
        raise FxpatchError("this trace did not run (its block raised), so there is no program to build a module from",
                           at=loc, hint="Fix the error the block raised, run the trace again, then call "
                           "tracer.patched_module().")
    if tracer.stops:
        raise FxpatchError("this trace called tracer.stop(), so its forward pass ends before the logits a "
                           "patched module returns", at=loc,
                           also=[("stopped at", s[2]) for s in tracer.stops],
                           hint="Make the module from a trace without tracer.stop().")


def _graph_with_logits(model, sg, program: torch.fx.Graph, model_inputs: list,
                       feeds: list) -> tuple[torch.fx.GraphModule, list]:
    """The site graph with ``program`` inlined and the model's outputs kept, with no fxpatch op left, and
    the conditions on the export's size symbols where it holds (``FunctionalProgram.guards``).

    A trace's own graph drops the logits (``runner.WITHOUT_MODEL_OUTPUTS``); this one is made apart from
    the model's cache of rewritten graphs, once per module.
    """
    modules = {n.target: model._model.get_submodule(n.target) for n in program.nodes if n.op == "call_module"}
    chains = chains_of(sg)
    specs, sizes = root_specs(sg, model_inputs)
    mutating = check_program(program, chains, modules, specs, feeds, sizes)
    fp = functionalize_program(program, chains, model._model, modules, specs, feeds, mutating, sizes)
    gm = copy_graph_module(sg.graph_module)
    options = {**strip_options(sg, "forward", program), "drop_outputs": 0}
    for p in (InlineProgram(fp), StripSites(**options)):
        gm = p(gm).graph_module
    left = [n.format_node() for n in gm.graph.nodes if _is_fxpatch_op(n)]
    if left:  # a process without fxpatch could not load an export of it
        raise RuntimeError(f"fxpatch ops left in a patched module's graph: {left}")
    return gm, fp.guards


TOKENS = sympy.Symbol("tokens", integer=True, positive=True)


def _width_guards(sg, guards: list, model_inputs: list, feeds: list) -> tuple[list, sympy.Symbol]:
    """``guards`` with the row-count symbols replaced by the trace's rows (a module's row count is fixed),
    the program's numbers (positions, scalars) by their values and every width symbol by ``TOKENS``;
    conditions that always hold are dropped."""
    nodes = {n.name: n for n in sg.graph_module.graph.nodes}
    replace = sympy_numbers(feed_numbers(feeds))
    for name, value in zip(sg.inputs, model_inputs):
        val = nodes[name].meta.get("val")
        for dim, (size, real) in enumerate(zip(getattr(val, "shape", ()), value.shape)):
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                replace[size.node.expr] = sympy.Integer(real) if dim == 0 else TOKENS
    out = []
    for g in guards:
        g = g.xreplace(replace)
        if g is sympy.true:
            continue
        width = int(model_inputs[0].shape[1])
        try:
            if g.free_symbols - {TOKENS} or not _evaluate(g, {TOKENS: width}):
                raise NotImplementedError(g)
        except NotImplementedError:  # a condition fxpatch cannot evaluate: the trace's width only
            g = sympy.Eq(TOKENS, width)
        out.append(g)
    return out, TOKENS


def _evaluate(expr, env: dict) -> Any:
    """A sympy size expression evaluated with Python operators, on ints or on ``SymInt``s."""
    if expr.is_Integer or expr is sympy.true or expr is sympy.false:
        return int(expr) if expr.is_Integer else bool(expr)
    if expr.is_Symbol:
        return env[expr]
    args = [_evaluate(a, env) for a in expr.args]
    op = _OPS.get(type(expr))
    if op is None:
        raise NotImplementedError(f"size expression {expr}")
    return op(*args)


def _fold(fn):
    return lambda *args: functools.reduce(fn, args)


_OPS = {
    sympy.Add: _fold(operator.add), sympy.Mul: _fold(operator.mul), sympy.Pow: operator.pow,
    sympy_functions.FloorDiv: operator.floordiv, sympy_functions.Mod: operator.mod,
    sympy_functions.PythonMod: operator.mod, sympy_functions.PowByNatural: operator.pow,
    sympy_functions.Max: _fold(max), sympy_functions.Min: _fold(min),
    sympy.Eq: operator.eq, sympy.Ne: operator.ne, sympy.Lt: operator.lt, sympy.Le: operator.le,
    sympy.Gt: operator.gt, sympy.Ge: operator.ge,
    sympy.And: lambda *a: all(bool(x) for x in a), sympy.Or: lambda *a: any(bool(x) for x in a),
    sympy.Not: lambda a: not a,
}


def _describe(guards: list) -> str:
    def one(g):
        try:
            return sympy.pycode(g).strip("()")
        except Exception:  # noqa: BLE001 - a function the printer does not know: sympy's own form
            return str(g)
    return " and ".join(one(g) for g in guards)


def _is_fxpatch_op(node: torch.fx.Node) -> bool:
    target = node.target
    return node.op == "call_function" and isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) \
        and target.namespace == SITE_NAMESPACE
