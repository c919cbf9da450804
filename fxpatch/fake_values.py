"""What is known of a traced value's shape while its trace records: ``len()`` and unpacking.

Nothing runs inside a ``with model.trace(...)`` block, but the shape of a
recorded value is often known: a module's tuple output has two elements, a
hidden state has the invoke's row count in dim 0 and the hidden size in dim
-1, ``split`` into three parts makes three. ``FakeValues`` works it out by
running the trace's program, in recording order, on fake tensors
(``FakeTensorMode``): a read of a module's value is a fake tensor of the shape
the export recorded for that site (``meta["val"]``), with the invoke's row
count in dim 0 and one *unbacked* symbol per other size of the export (the
padded sequence width, a cache length), since the padded width is only known
once every invoke is recorded. So whatever depends on the width (splitting
the sequence dim, its length) stays unknown, and torch says so by raising
``GuardOnDataDependentSymNode``, rather than being specialized to a guess.

The fake values are computed only when asked for (``len()``, iteration) and
then incrementally: each op once, in the order it was recorded, so in-place
ops (``h.unsqueeze_(0)``) change the shape of the values they write into, as
in eager torch.

Example::

    with model.trace("The Eiffel Tower is in"):
        q, k, v = model.transformer.h[0].attn.c_attn.output.split(768, dim=2)
        B, S, H = model.transformer.h[0].output.shape   # 1, <traced int>, 768
    print(S)                                            # 7
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import sympy
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, ShapeEnv
from torch.fx.node import map_aggregate

from .errors import ControlFlowError, user_location
from .passes.functionalize_program import _fake, _is_in_place, _quiet_fake_log
from .passes.ops import is_site, read_site, write_site


class Unknown:
    """A value whose shape cannot be known while recording, and why (a phrase)."""

    __slots__ = ("why",)

    def __init__(self, why: str):
        self.why = why


WIDTH_WHY = ("it depends on the padded sequence width (or the batch size of an invoke without inputs), "
             "which is only known when every invoke is recorded")


class FakeValues:
    """The fake values of one trace's recorded program nodes (all phases), computed on demand."""

    def __init__(self, tracer):
        self.tracer = tracer
        self.mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
        self.values: dict[torch.fx.Node, Any] = {}
        self.symbols: dict[tuple, torch.SymInt] = {}  # (phase, export symbol) -> unbacked size
        self.site_vals: dict[str, dict[str, Any]] = {}  # mode -> site name -> the export's fake value

    def of(self, node: torch.fx.Node) -> Any:
        """``node``'s fake value (a fake tensor, a ``torch.Size``, a tuple, ...) or an ``Unknown``."""
        phase = node.meta.get("fxpatch_phase", 0)
        program = self.tracer.programs.get(phase)
        if program is not None:
            with _quiet_fake_log(), torch.no_grad():
                for n in program.nodes:  # everything recorded so far: later in-place ops change earlier values
                    if n not in self.values:
                        self.values[n] = self._evaluate(n, phase)
        return self.values.get(node, Unknown("it was not recorded in this trace"))

    # -- one node ----------------------------------------------------------------------------------
    def _evaluate(self, node: torch.fx.Node, phase: int) -> Any:
        if node.op == "output":
            return None
        if node.op == "placeholder":
            return self._placeholder(node)
        if node.target is read_site:
            return self._site(*node.args, phase)
        if node.target is write_site:
            return None
        unknown: list[Unknown] = []

        def value(a):
            if isinstance(a, torch.fx.Node):
                v = self.values.get(a, Unknown("it uses a value recorded after it"))
                if isinstance(v, Unknown):
                    unknown.append(v)
                return v
            return a

        args, kwargs = map_aggregate(node.args, value), map_aggregate(node.kwargs, value)
        if unknown:
            return unknown[0]
        try:
            with self.mode:
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                if node.op == "call_module":
                    return self.tracer.model._model.get_submodule(node.target)(*args, **kwargs)
                return node.target(*args, **kwargs)
        except GuardOnDataDependentSymNode:
            result = Unknown(WIDTH_WHY)
        except Exception as e:  # noqa: BLE001 - the run's own check reports a failing op at its line
            loc = node.meta.get("fxpatch_loc")
            result = Unknown(f"the operation at {loc} fails on the shapes it will have "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        first = node.args[0] if node.args else None
        if _is_in_place(node) and isinstance(first, torch.fx.Node):
            self.values[first] = result  # the value it writes into is unknown from here on
        return result

    def _placeholder(self, node: torch.fx.Node) -> Any:
        if "fxpatch_carry" in node.meta:  # a value of an earlier step
            return self.of(node.meta["fxpatch_carry"])
        if "fxpatch_value" in node.meta:  # a tensor from outside the trace
            with self.mode:
                return _fake(self.mode, node.meta["fxpatch_value"])
        return Unknown("it exists only after generation")

    def _site(self, name: str, start: int, stop: int | None, phase: int) -> Any:
        mode = self._mode_of(phase)
        vals = self.site_vals.get(mode)
        sg = self.tracer.model.site_graph(mode)
        if vals is None:
            vals = self.site_vals[mode] = {n.args[1]: n.meta.get("val") for n in sg.graph_module.graph.nodes
                                           if is_site(n)}
        val = vals.get(name)
        if not isinstance(val, torch.Tensor):
            return Unknown(f"the export recorded no tensor for {name}")
        batch = _batch_symbol(sg)
        with self.mode:
            try:
                shape = [self._size(d, phase, batch, start, stop) for d in val.shape]
            except _NotAnExpression:
                return Unknown(f"the export's size of {name} is an expression fxpatch does not evaluate")
            return torch.empty(shape, dtype=val.dtype, device=val.device)

    def _size(self, d, phase: int, batch, start: int, stop: int | None):
        if not isinstance(d, torch.SymInt):
            return int(d)

        def symbol(sym):
            if sym == batch and stop is not None:
                return stop - start  # the invoke's row count
            key = (None, sym) if sym == batch else (phase, sym)  # one batch size for the whole trace
            if key not in self.symbols:
                size = self.mode.shape_env.create_unbacked_symint()
                torch._check(size >= 1)
                self.symbols[key] = size
            return self.symbols[key]

        return _evaluate_expr(d.node.expr, symbol)

    def _mode_of(self, phase: int) -> str:
        """The run mode (site graph) of ``phase``, as the tracer itself names it."""
        tracer = self.tracer
        current = tracer.phase
        tracer.phase = phase
        try:
            return tracer.mode
        finally:
            tracer.phase = current


class _NotAnExpression(Exception):
    pass


def _evaluate_expr(expr: sympy.Expr, symbol):
    """``expr`` (a size of the export) with each symbol replaced by ``symbol(sym)`` (an int or SymInt)."""
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        return symbol(expr)
    args = [_evaluate_expr(a, symbol) for a in expr.args]
    if expr.is_Add:
        return sum(args[1:], args[0])
    if expr.is_Mul:
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    name = type(expr).__name__
    if name == "FloorDiv":
        return args[0] // args[1]
    if name in ("Mod", "PythonMod"):
        return args[0] % args[1]
    raise _NotAnExpression(name)


def _batch_symbol(sg):
    """The export's symbol for the batch size: dim 0 of the first model input."""
    nodes = {n.name: n for n in sg.graph_module.graph.nodes if n.op == "placeholder"}
    val = nodes[sg.inputs[0]].meta.get("val")
    d = val.shape[0] if isinstance(val, torch.Tensor) and val.dim() else None
    return d.node.expr if isinstance(d, torch.SymInt) else None


# -- what proxies use -----------------------------------------------------------------------------------
def fake_of(proxy) -> Any:
    """The fake value of a proxy of a trace being recorded (``Unknown`` when it cannot be known)."""
    tracer = proxy.tracer
    values = tracer.__dict__.get("_fake_values")
    if values is None:
        values = tracer.__dict__["_fake_values"] = FakeValues(tracer)
    return values.of(proxy.node)


def _known(d) -> int | None:
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        return d.node.maybe_as_int()
    return None


def length_of(proxy, what: str) -> int:
    """The length of a recorded value: of a tuple or ``torch.Size``, or dim 0 of a tensor.

    Raises ``ControlFlowError`` (naming ``what``: ``len()``, unpacking) when it is not known
    while recording.
    """
    fake = fake_of(proxy)
    why = None
    if isinstance(fake, Unknown):
        why = fake.why
    elif isinstance(fake, (tuple, list)):
        return len(fake)
    elif isinstance(fake, torch.Tensor):
        if fake.dim() == 0:
            why = "it is a 0-d tensor, which has no length"
        else:
            n = _known(fake.shape[0])
            if n is not None:
                return n
            why = WIDTH_WHY
    else:
        why = f"it is a {type(fake).__name__}, which has no length"
    raise ControlFlowError(
        f"{what} needs the length of a traced value, which is not known until the model runs after the "
        f"`with` block: {why}", at=user_location(),
        hint="Index it explicitly (x[0], x[-1], x.unbind(dim) of a dim of known size), use .shape / .size(dim) "
        "(traced values) in later operations, or split into a fixed number of parts (x.chunk(n, dim)).")


def iterate(proxy) -> Iterator:
    """The elements of a recorded value of known length: ``x[i]`` proxies, and for a
    ``torch.Size``, plain ints for the sizes known now (the others are traced ints that are
    kept: after the trace the user's variables hold them as ints)."""
    n = length_of(proxy, "Iterating over (or unpacking)")
    fake = fake_of(proxy)
    if isinstance(fake, torch.Size):
        items = []
        for i, d in enumerate(fake):
            size = _known(d)
            if size is None:
                size = proxy[i]
                size.save()
            items.append(size)
        return iter(items)
    return (operator.getitem(proxy, i) for i in range(n))

