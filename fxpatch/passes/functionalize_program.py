"""Pass: turn a recorded program into a functional graph with eager torch's meaning.

A recorded program is the user's code as written: reads of module values
(``read_site``), assignments (``write_site``), tensor ops, in-place writes
(``x[...] = v``, ``x.add_(1)``) and views. It is *interpreted* in the order
NNsight would run it (each invoke's ops in program order, interleaved with
the model at the site each op waits for) on real-shaped tensors in which a
read of a site is a view (``narrow``) of the tensor flowing there, and sites
that are one tensor in eager PyTorch (a layer's output, the next layer's
input, that layer's norm input) are one tensor here too. So views, aliasing
and in-place writes behave exactly as in eager torch; torch's own
functionalization (``torch.func.functionalize`` under ``make_fx``) then turns
the mutations into ``*_scatter`` ops with view replay.

After it runs, ``FunctionalProgram.graph`` has no mutation. Its placeholders
are the chain roots (``roots``: model nodes whose value the program reads),
then the program's own placeholders (outside tensors, carried values). Its
outputs are the saved values, then one value per *event*: the tensor that
model nodes consuming a set of sites see from a point of the forward pass on
(an assignment, or the state of a tensor after in-place writes).
Programs with no mutation are traced with ``torch.fx`` at the torch level
(fast, shape-generic); programs with one go through ``make_fx`` with fake
tensors of the run's shapes. A failing op raises ``ShapeError`` at its line.
"""

from __future__ import annotations

import functools
import linecache
import logging
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx.traceback as fx_traceback
from torch._C._functorch import _func_decrement_nesting, _func_increment_nesting, _propagate_functional_input_mutation
from torch._dynamo.source import ConstantSource
from torch._functorch.eager_transforms import _unwrap_all_tensors_from_functional, _wrap_all_tensors_to_functional
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx._lazy_graph_module import _LazyGraphModule, _use_lazy_graph_module
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, GuardOnDataDependentSymNode, ShapeEnv
from torch.fx.node import map_aggregate
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._sympy.printers import PythonPrinter

from .diagnostics import FlowError, Location, ShapeError, location_of
from .ops import capture, read_site, scatter, write_site


@dataclass
class Chains:
    """What interpretation needs of a site graph.

    ``position[name]`` is the order of site ``name`` in the graph (the time
    the model reaches it), ``root[name]`` the model node whose value the site
    passes on unchanged (its chain's root: a layer's output, the next
    layer's input and that layer's first module's input share one root),
    ``parent[name]`` the site it is an identity of (``None`` at the root).
    ``aliasing`` maps the roots that are the same tensor as, or a view of, a tensor the model computed
    before them (``x.view(...)``, a no-op ``x.to(dtype)`` in ``.source``, dropout in eval) to what else sees
    that tensor: the sites it passes through, and ``"<model>"`` when the model uses it again. A write into
    one would show there in eager PyTorch, which interpretation does not follow (``_Interpreter`` refuses it).
    ``unbatched`` holds the roots whose first dim is not the batch's rows (OPT's ``fc1`` output, tokens of all
    prompts flattened; Bloom's batch times heads; a weight cast in ``.source``): each invoke reads and writes
    such a tensor whole, as NNsight gives it.
    """

    position: dict[str, int]
    root: dict[str, str]
    parent: dict[str, str | None]
    children: dict[str, list[str]] = field(default_factory=dict)
    aliasing: dict[str, frozenset[str]] = field(default_factory=dict)
    unbatched: frozenset[str] = frozenset()

    def __post_init__(self):
        if not self.children:
            for name, parent in self.parent.items():
                if parent is not None:
                    self.children.setdefault(parent, []).append(name)

    def members(self, root: str) -> list[str]:
        by_root = self.__dict__.get("_members")
        if by_root is None:  # one pass over a deep model's thousands of sites, not one per call
            by_root = self._members = {}
            for n, r in self.root.items():
                by_root.setdefault(r, []).append(n)
        return list(by_root.get(root, ()))

    def descendants(self, name: str) -> list[str]:
        out, todo = [], [name]
        while todo:
            for child in self.children.get(todo.pop(), ()):
                out.append(child)
                todo.append(child)
        return out


ROOT = "<root>"  # member marker: the chain's root node itself


@dataclass
class Event:
    """From ``time`` on, model nodes that consume ``members`` see output ``index``.

    ``first`` is where the program first touched the tensor: a consumer
    between ``first`` and ``time`` would see the tensor before the write
    reached it, which only the order of a thread-interleaved run could
    decide, so it is refused. ``root`` names the chain for ``ROOT`` members.
    """

    obj: int
    time: int
    first: int
    members: frozenset
    root: str
    index: int
    loc: Location | None
    read_loc: Location | None
    assigned: str | None = None  # the site an assignment event writes
    target: str = ""  # the site the program wrote through
    waited_for: tuple | None = None  # (site, line) of the read that made the write wait until ``time``


class _Guarded:
    """A result that holds for the runs whose size symbols and index numbers satisfy ``self.guards``."""

    guards: list

    def holds_for(self, sizes: dict) -> bool:
        """Whether this holds for a run whose export size symbols (and program numbers) have the values
        ``sizes``.

        Answers are remembered per ``sizes`` (sympy's substitution costs milliseconds per run for a program
        with many indices; a sweep asks the same question again and again)."""
        key = frozenset(sizes.items())
        memo = self.__dict__.setdefault("_holds", {})
        answer = memo.get(key)
        if answer is None:
            if len(memo) >= 1024:
                memo.clear()
            answer = memo[key] = self._test(sizes)
        return answer

    def _test(self, sizes: dict) -> bool:
        # sympy takes ~0.2 ms a guard (tens of ms for a program's guards at each new size or position); the
        # guards as one Python expression take microseconds. Its first answer is checked against sympy's,
        # and any doubt (a name it lacks, a different answer) goes back to sympy for good.
        exact = None
        test = self.__dict__.get("_compiled", False)
        if test is False:
            test = self.__dict__["_compiled"] = _compile_guards(self.guards)
            exact = self._exact(sizes)
        if test is not None:
            try:
                fast = bool(test(*[sizes[sym] for sym in test.symbols]))
            except Exception:  # noqa: BLE001 - a function the printer names and Python lacks: sympy decides
                fast = None
            if fast is not None and (exact is None or fast == exact):
                return fast
            self.__dict__["_compiled"] = None
        return exact if exact is not None else self._exact(sizes)

    def _exact(self, sizes: dict) -> bool:
        numbers = sympy_numbers(sizes)
        return all(bool(g.xreplace(numbers)) for g in self.guards)


def sympy_numbers(values: dict) -> dict:
    """``values`` (symbol -> number) with sympy numbers, as ``xreplace`` needs them: torch 2.9's ``Max`` and
    ``Min`` fail on a plain ``int`` (``'int' object has no attribute 'is_Add'``)."""
    return {k: sympy.sympify(v) if type(v) in (int, float) else v for k, v in values.items()}


@dataclass
class FunctionalProgram(_Guarded):
    """A program as a functional graph, ready to inline (see the module docstring)."""

    graph: torch.fx.GraphModule
    roots: list[str]
    n_inputs: int
    n_saved: int
    events: list[Event]
    mutating: bool
    modules: dict[str, torch.nn.Module]
    guards: list = field(default_factory=list)  # sympy conditions on the export's size symbols

    def changes(self, outputs: list, root_value) -> Iterator[tuple[Event, Any]]:
        """The events in time order with their values (``outputs[event.index]``), leaving out those whose
        tensor did not change since its previous event (for a tensor changed in place, the first is
        compared with its chain root's value, ``root_value(root)``). Example::

            for event, value in fp.changes(outputs, lambda root: nodes[root]): ...
        """
        latest: dict = {}
        for ev in sorted(self.events, key=lambda e: e.time):
            value = outputs[ev.index]
            previous = latest.get(ev.obj, root_value(ev.root) if ev.assigned is None else None)
            latest[ev.obj] = value
            if value is not previous:
                yield ev, value


_GUARD_NAMES = {"__builtins__": {}, "math": math, "max": max, "min": min, "abs": abs, "int": int, "float": float,
                "round": round}


def _compile_guards(guards: list):
    """``guards`` as one Python function of their free symbols (in ``.symbols`` order), printed as torch
    prints shape guards; ``None`` where they cannot be printed."""
    try:
        if not all(_integral(g) for g in guards):
            return None  # a fraction or a float would be compared in floating point: sympy's exact answer
        symbols = sorted({sym for g in guards for sym in getattr(g, "free_symbols", ())}, key=str)
        printer = PythonPrinter()
        body = " and ".join(f"({printer.doprint(g)})" for g in guards) or "True"
        names = [str(sym) for sym in symbols]
        if len(set(names)) != len(names) or not all(n.isidentifier() for n in names):
            return None
        test = eval(f"lambda {', '.join(names)}: {body}", dict(_GUARD_NAMES))  # noqa: S307 - torch's guards
    except Exception:  # noqa: BLE001 - an expression the printer does not know: sympy decides
        return None
    test.symbols = symbols
    return test


def _integral(expr) -> bool:
    """Whether ``expr`` has only integer numbers and no division (a power with a negative exponent)."""
    if isinstance(expr, bool) or not isinstance(expr, sympy.Basic):
        return isinstance(expr, bool)
    return (all(n.is_Integer for n in expr.atoms(sympy.Number))
            and all(e.exp.is_Integer and e.exp >= 0 for e in expr.atoms(sympy.Pow)))


@dataclass
class CheckedProgram(_Guarded):
    """What ``check_program_symbolic`` found: the program runs, and writes in place or not (``mutating``),
    in every run whose sizes and index numbers satisfy ``guards``."""

    mutating: bool
    guards: list


class _Obj:
    """One tensor object of the interpreted run that model sites share."""

    def __init__(self, index: int, tensor, members: set, first: int, root: str, read_loc=None,
                 assigned: str | None = None):
        self.index, self.tensor, self.members, self.first = index, tensor, members, first
        self.root, self.read_loc, self.assigned = root, read_loc, assigned
        self.target = assigned or ""
        self.over: tuple | None = None  # an assignment's (tensor before it, start, stop)

    def rows(self, start, stop):
        """The tensor to read rows ``start:stop`` from: in a program that writes nothing in place, rows that
        later assignments of other rows left unchanged are read from before those, so an invoke's value does
        not depend, for autograd, on another invoke's rows (a value one invoke marks requires_grad_() would
        otherwise make every later invoke's read of that site require grad, where a prompt alone does not)."""
        o = self
        while (o.over is not None and type(start) is int and type(stop) is int
               and type(o.over[1]) is int and type(o.over[2]) is int and (stop <= o.over[1] or o.over[2] <= start)):
            o = o.over[0]
        return o.tensor


class _Interpreter:
    """Runs a recorded program in NNsight's order, where sites alias as in eager torch.

    With ``graph`` set, it emits the ops into that graph instead of running
    them (the torch-level form of a program that mutates nothing).
    """

    def __init__(self, program: torch.fx.Graph, chains: Chains, snapshots: bool,
                 modules: dict[str, torch.nn.Module], graph: torch.fx.Graph | None = None,
                 bookkeeping: bool = False):
        self.program, self.chains, self.snapshots, self.modules = program, chains, snapshots, modules
        self.graph = graph
        # only which objects sites share and what the events are: no tensor op runs (``rebind``)
        self.bookkeeping = bookkeeping
        nodes = [n for n in program.nodes if n.op not in ("placeholder", "output")]
        self.index = index = {n: i for i, n in enumerate(program.nodes)}
        self.order = sorted(nodes, key=lambda n: (n.meta.get("fxpatch_time", -1), index[n]))
        self.placeholders = [n for n in program.nodes if n.op == "placeholder"]
        self.output = next(iter(program.find_nodes(op="output")), None)
        roots = []
        for n in nodes:
            if n.target in (read_site, write_site):
                root = chains.root[n.args[0]]
                if root not in roots:
                    roots.append(root)
        self.roots = roots
        self.current: Location | None = None
        self.events: list = []
        self.copied: list = []  # (tensor assigned to some rows of a site, its version then, the assignment)
        self.alias_reads: list = []  # (a read of an aliasing site, its version then, the read)

    def _emit(self, op: str, target, args, kwargs, source: torch.fx.Node | None = None, role: str | None = None):
        if self.graph is None:
            if op == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if op == "call_module":
                return self.modules[target](*args, **kwargs)
            return target(*args, **kwargs)
        node = self.graph.create_node(op, target, args, kwargs)
        if source is not None:
            node.meta["custom"] = _custom(source, role, self.index.get(source))
        return node

    def __call__(self, *flat):
        self.copied, self.alias_reads = [], []
        roots = dict(zip(self.roots, flat[:len(self.roots)]))
        env = dict(zip(self.placeholders, flat[len(self.roots):]))
        objs: list[_Obj] = []
        at: dict[str, _Obj] = {}
        chain_obj: dict[str, _Obj] = {}
        events: list = []
        chains = self.chains

        def get(name: str) -> _Obj:
            o = at.get(name)
            if o is None:
                root = chains.root[name]
                o = chain_obj.get(root)
                if o is None:
                    members = {m for m in chains.members(root) if m not in at} | {ROOT}
                    o = _Obj(len(objs), roots[root], members, 1 << 62, root)
                    objs.append(o)
                    chain_obj[root] = o
                    for m in members - {ROOT}:
                        at[m] = o
                else:
                    at[name] = o
            return o

        # a snapshot is a clone of each tensor's value at the end of a time, dropped from the traced graph
        # (``_drop_snapshot_copies``), but each costs a traced op: none is needed where no later op can
        # change a tensor (the value then is the value at the end), and a time whose ops change nothing
        # repeats the tensors' previous snapshots
        changes_from = len(self.order)
        while changes_from and _changes_nothing(self.order[changes_from - 1]):
            changes_from -= 1
        previous: dict[int, Any] = {}

        def snapshot(time: int, writer, unchanged: bool, final: bool):
            loc = location_of(writer) if writer is not None else None
            waited = writer.meta.get("fxpatch_time_source") if writer is not None else None
            with _meta({"fxpatch_loc": loc, "fxpatch_role": "snapshot", "fxpatch_site": "",
                        "fxpatch_index": self.index.get(writer)}):
                for o in objs:
                    if self.bookkeeping:
                        tensor = None
                    elif final:
                        tensor = o.tensor
                    elif unchanged and o.index in previous:
                        tensor = previous[o.index]
                    else:
                        tensor = o.tensor.clone()
                    previous[o.index] = tensor
                    events.append((o, time, frozenset(o.members), tensor, loc, waited))

        # a time's writer (the line its write errors name): its first in-place op, else the first op that may
        # write by what torch alone knows of it (a module's call)
        bucket, writer, may_write, unchanged = None, None, None, True
        for i, node in enumerate(self.order):
            time = node.meta.get("fxpatch_time", -1)
            if self.snapshots and bucket is not None and time != bucket:
                snapshot(bucket, writer or may_write, unchanged, i >= changes_from)
                writer, may_write, unchanged = None, None, True
            bucket = time
            if not _changes_nothing(node):
                unchanged = False
                may_write = may_write or node
            self.current = location_of(node)
            if writer is None and (_is_in_place(node) or "out" in node.kwargs):
                writer = node
            with _meta(_custom(node, index=self.index[node])):
                env[node] = self._run(node, env, get, objs, at, events)
        if self.snapshots and bucket is not None:
            snapshot(bucket, writer or may_write, unchanged, True)
        self._check_aliasing(env)
        out = self.output.args[0] if self.output else ()
        saved = [env[a] if isinstance(a, torch.fx.Node) else a for a in out]
        self.events = [(o, t, members, loc, waited) for o, t, members, _, loc, waited in events]
        return (*saved, *[e[3] for e in events])

    def _check_aliasing(self, env: dict) -> None:
        """At the end of the check's run, refuse what one batched pass cannot give as eager PyTorch does:
        a write into an aliasing site's value that shows elsewhere (see ``Chains.aliasing``); and a tensor
        assigned to some rows of a module's value (the batch holds a copy of it in those rows, where eager
        hands the tensor itself on) then changed in place, or used after a write into the module's value.
        (Assigned to every row, the module's value is the tensor itself.)"""
        written = [entry for entry in self.alias_reads if entry[0]._version != entry[1]]
        sites = {n.args[0] for n in self.order if n.target in (read_site, write_site)} if written else set()
        for _, _, node, seen_by in written:
            # a write shows in eager where the model goes on with the tensor, or where the program reads it
            if "<model>" in seen_by or seen_by & sites:
                raise FlowError(
                    f"{node.args[0]} is a view of (or the same tensor as) a value the model computed before it, "
                    "and it is written in place after this read: in eager PyTorch the write would change that "
                    "value too, which fxpatch does not follow", at=location_of(node),
                    hint="Write into the value it is a view of (the operation's input, or the module value "
                    "before it), or assign a new value to this one (.output = ...), which changes it alone.")
        self._check_lost_writes(env)
        for value, version, node in self.copied:
            if value._version != version:
                raise FlowError(
                    f"a tensor assigned to {node.args[0]} for this invoke's rows is changed in place after the "
                    "assignment: in eager PyTorch the model would go on with the changed tensor, but the "
                    "batched pass holds a copy of it in this invoke's rows", at=location_of(node),
                    hint="Change the tensor before assigning it, or change the module's value after the "
                    "assignment (m.output[...] = ...), which the model goes on with.")

    def _check_lost_writes(self, env: dict) -> None:
        """Refuse ``m.output = x`` for some rows, then an in-place write into ``m.output`` in the same invoke,
        then ``x`` (or a view of it, taken before or after) used or saved: in a prompt's eager run ``x`` is the
        module's value and shows the write, where the batch holds a copy of ``x`` (the write reaches the copy
        alone)."""
        if not self.copied:
            return
        pos = {n: i for i, n in enumerate(self.order)}
        saved = set(self.output.args[0]) if self.output else set()
        for tensor, _, node in self.copied:
            name, value = node.args[0], node.args[3]
            if not isinstance(value, torch.fx.Node):
                continue
            members = {name, *self.chains.descendants(name)}
            invoke = node.meta.get("fxpatch_invoke")
            aliases = None
            for later in self.order[pos[node] + 1:]:
                if not _is_in_place(later) or not later.args or not isinstance(later.args[0], torch.fx.Node):
                    continue
                read = later.args[0]
                for _ in range(8):  # the read it writes into, through the views taken of it
                    if read.target is read_site or not read.args or not isinstance(read.args[0], torch.fx.Node):
                        break
                    read = read.args[0]
                if (read.target is not read_site or read.args[0] not in members or pos[read] < pos[node]
                        or read.meta.get("fxpatch_invoke") != invoke):
                    continue
                if aliases is None:  # what eager's x is seen through: x and every value of this invoke that
                    memory = _memory(tensor)  # shares its memory (a view, a detach)
                    aliases = {value} | {n for n, t in env.items() if isinstance(t, torch.Tensor)
                                         and _memory(t) == memory and n.meta.get("fxpatch_invoke") in (invoke, None)}
                if aliases & saved or any(pos.get(u, -1) > pos[later] for a in aliases for u in a.users):
                    raise FlowError(
                        f"a tensor assigned to {name} for this invoke's rows is used after a write into "
                        f"{name} (at {location_of(later)}): in eager PyTorch it is the module's value and would "
                        "show the write, but the batched pass holds a copy of it in this invoke's rows",
                        at=location_of(node),
                        hint="Use the module's value after the write (m.output) instead of the assigned tensor, or "
                        "assign a .clone() of it.")

    def _run(self, node, env, get, objs, at, events):
        args = map_aggregate(node.args, lambda a: env[a] if isinstance(a, torch.fx.Node) else a)
        kwargs = map_aggregate(node.kwargs, lambda a: env[a] if isinstance(a, torch.fx.Node) else a)
        if node.target is read_site:
            name, start, stop = args
            o = get(name)
            pos = self.chains.position[name]
            if pos < o.first:
                o.first, o.read_loc, o.target = pos, location_of(node), name
            if self.bookkeeping:
                return None
            value = self._emit("call_function", capture, (o.rows(start, stop) if not self.snapshots else o.tensor,
                                                          start, stop), {}, node)
            if self.graph is None and not self.snapshots and self.chains.root[name] in self.chains.aliasing:
                self.alias_reads.append((value, value._version, node, self.chains.aliasing[self.chains.root[name]]))
            return value
        if node.target is write_site:
            name, start, stop, value = args
            old = get(name)
            if self.graph is None and isinstance(value, torch.Tensor):
                _check_fits(value, capture(old.tensor, start, stop), name, node)
            # the invoke's rows are the whole batch: the module's value *is* the assigned tensor, as in eager (a
            # later write into either is seen through the other); else the batch holds a copy in those rows
            whole = (not self.bookkeeping and start == 0 and isinstance(value, torch.Tensor)
                     and (stop is None or stop == old.tensor.shape[0])
                     and value.shape == old.tensor.shape and value.dtype == old.tensor.dtype)
            if self.bookkeeping:
                tensor = None
            elif self.snapshots and whole:
                tensor = value
            else:
                tensor = self._emit("call_function", scatter, (old.tensor, value, start, stop), {}, node)
                if self.graph is None and not self.snapshots and not whole and isinstance(value, torch.Tensor):
                    self.copied.append((value, value._version, node))  # the check's run
            moved = {name} | {d for d in self.chains.descendants(name) if at.get(d, old) is old}
            new = _Obj(len(objs), tensor, moved, self.chains.position[name], old.root, location_of(node), name)
            new.over = (old, start, stop)
            objs.append(new)
            for m in moved:
                at[m] = new
                for o in objs[:-1]:
                    o.members.discard(m)
            if not self.snapshots:  # nothing is written in place: the assigned value is final
                events.append((new, node.meta.get("fxpatch_time", -1), frozenset(moved), tensor, location_of(node),
                               node.meta.get("fxpatch_time_source")))
            return None
        if self.bookkeeping:
            return None
        if node.target is operator.getitem and _symbolic_basic_index(args):
            return _basic_index(*args)
        if node.target is operator.setitem and _symbolic_basic_index(args[:2]):
            _basic_setitem(*args)
            return None
        if self.graph is None:
            value = _eager_alias(node.op, node.target, args, kwargs)
            if value is not None:
                return value
        return self._emit(node.op, node.target, args, kwargs, node)


def _memory(tensor: torch.Tensor) -> int:
    """Which memory ``tensor`` lives in: equal for a tensor, its views and its detached copies (fake ones too)."""
    return tensor.untyped_storage()._cdata


def _eager_alias(op: str, target: Any, args: tuple, kwargs: dict) -> Any:
    """The eager result of an op that returns its input, or a view of it, where torch's functionalization
    makes a copy (it decomposes these ops into copying ones): ``type_as`` of the same type, ``atleast_nd``,
    ``sum_to_size`` to the same size, ``to_dense`` of a dense tensor, ``broadcast_tensors``. A write into the
    result must reach the input, and one into the input show in the result, as in eager PyTorch. ``None``
    for every other op (and these ops' other uses): it runs as it is.

    Example::

        _eager_alias("call_method", "type_as", (h, h), {}) is h   # True
    """
    if kwargs or not args or not isinstance(args[0], torch.Tensor):
        return None
    name = target if op == "call_method" else _ALIASING_FUNCTIONS.get(target) if op == "call_function" else None
    x = args[0]
    if name == "type_as" and len(args) == 2 and isinstance(args[1], torch.Tensor):
        return x.to(args[1])  # what type_as does; functionalization keeps .to's alias
    if name in _AT_LEAST and len(args) == 1:
        n = _AT_LEAST[name]  # torch's views: () -> (1,) * n; (N,) -> (1, N) [-> (1, N, 1)]; (M, N) -> (M, N, 1)
        if x.dim() == 0:
            x = x.reshape((1,) * n)
        elif x.dim() == 1 and n >= 2:
            x = x.unsqueeze(0)
        if x.dim() == 2 and n == 3:
            x = x.unsqueeze(-1)
        return x
    if name == "sum_to_size" and len(args) >= 2:
        size = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return x if tuple(x.shape) == tuple(size) else None
    if name == "to_dense" and len(args) == 1:
        return x if x.layout == torch.strided else None
    if name == "broadcast_tensors" and all(isinstance(t, torch.Tensor) for t in args):
        shape = torch.broadcast_shapes(*(t.shape for t in args))
        return tuple(t.expand(shape) for t in args)
    return None


_AT_LEAST = {"atleast_1d": 1, "atleast_2d": 2, "atleast_3d": 3}
_ALIASING_FUNCTIONS = {torch.Tensor.type_as: "type_as", torch.atleast_1d: "atleast_1d", torch.atleast_2d: "atleast_2d",
                       torch.atleast_3d: "atleast_3d", torch.Tensor.sum_to_size: "sum_to_size",
                       torch.Tensor.to_dense: "to_dense", torch.broadcast_tensors: "broadcast_tensors"}


def _symbolic_basic_index(args: tuple) -> bool:
    """Whether ``args`` index a tensor with ints, slices, ``None`` and ``...`` only, some of them symbolic."""
    if len(args) != 2 or not isinstance(args[0], torch.Tensor) or not isinstance(args[1], tuple):
        return False
    parts = [p for i in args[1] for p in ((i.start, i.stop, i.step) if isinstance(i, slice) else (i,))]
    return (any(isinstance(p, torch.SymInt) for p in parts)
            and all(p is None or p is Ellipsis or type(p) is int or isinstance(p, torch.SymInt) for p in parts))


def _basic_setitem(x: torch.Tensor, index: tuple, value) -> None:
    """``x[index] = value`` for basic indexing, as torch's ``__setitem__`` does it (its ``copy_to``):
    a tensor is copied in, broadcast, after dropping leading size-1 dims it has beyond the view's; a
    number fills the view."""
    view = _basic_index(x, index)
    if isinstance(value, torch.Tensor):
        while value.dim() > view.dim() and value.shape[0] == 1:
            value = value[0]
        view.copy_(value)
    else:
        view.fill_(value)


def _basic_index(x: torch.Tensor, index: tuple) -> torch.Tensor:
    """``x[index]`` for basic indexing, as the ops Python's indexing dispatches to (``select``, ``slice``,
    ``unsqueeze``). Python's ``__getitem__`` turns a symbolic int index into a constant; these ops
    keep it symbolic, so the traced graph takes the position as an input.

    A ``:`` that takes a whole dim is no op, as in eager indexing (``h[:, p]`` is ``select`` alone; a
    tuple of such ``:`` alone is ``alias``): under tracing, torch would record a slice for each, and
    every one of them is an op more to trace again wherever a write replays the views."""
    dim = 0
    base = x
    for k, i in enumerate(index):
        if i is Ellipsis:
            dim = x.dim() - sum(1 for j in index[k + 1:] if j is not None and j is not Ellipsis)
        elif i is None:
            x = x.unsqueeze(dim)
            dim += 1
        elif isinstance(i, slice):
            if not (i.start is None and i.stop is None and i.step in (None, 1)):
                x = torch.ops.aten.slice.Tensor(x, dim, i.start, i.stop, 1 if i.step is None else i.step)
            dim += 1
        else:
            # eager's bound check, as a guard on the symbolic sizes and positions: torch 2.13's fake select
            # records it too, 2.11's leaves it to the real run
            size = x.shape[dim]
            if not (-size <= i < size):
                raise IndexError(f"index {i} is out of bounds for dimension {dim} with size {size}")
            x = x.select(dim, i)
    return torch.ops.aten.alias.default(x) if x is base else x


def _check_fits(value: torch.Tensor, rows: torch.Tensor, name: str, node: torch.fx.Node) -> None:
    """A tensor assigned as a module's value (``m.output = value``) has the shape (up to broadcasting), dtype
    and device of the rows it replaces. In eager PyTorch the module would hand ``value`` itself on: the
    layers after it would compute in its dtype, or fail on its device, for this invoke's rows only,
    which one batched pass cannot do; a 0-dim tensor acts as a number there and is converted."""
    if value.dim() and (value.device != rows.device or value.dtype != rows.dtype):
        what, have, want = (("on", value.device, rows.device) if value.device != rows.device
                            else ("of dtype", value.dtype, rows.dtype))
        raise ShapeError(f"a value {what} {have} is assigned to {name}, whose values for this invoke are "
                         f"{what} {want}: eager PyTorch would carry it into the layers after it as it is",
                         at=location_of(node),
                         hint=f"Convert it first: value.to({_repr_target(want)}) (or assign into the module's "
                         f"value, m.output[:] = value, which converts as a copy does).")
    try:
        fits = torch.broadcast_shapes(tuple(value.shape), tuple(rows.shape)) == tuple(rows.shape)
    except RuntimeError:
        fits = False
    if not fits:
        raise ShapeError(f"a value of shape {tuple(value.shape)} does not fit {name}, whose rows for this invoke "
                         f"have shape {tuple(rows.shape)}", at=location_of(node),
                         hint="Assign a value of that shape (or one that broadcasts to it).")


def _repr_target(target) -> str:
    return f'"{target}"' if isinstance(target, torch.device) else str(target)


_IN_PLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


# ops that never change a tensor in place, whatever their arguments: the reads and writes of sites (a write
# makes a new value of the site) and Python's indexing and out-of-place arithmetic
_CHANGING_NOTHING = frozenset((read_site, write_site, operator.getitem, operator.add, operator.sub, operator.mul,
                               operator.truediv, operator.floordiv, operator.neg, operator.pow, operator.matmul))


def _changes_nothing(node: torch.fx.Node) -> bool:
    """Whether ``node`` surely changes no tensor in place (anything not known to be so may: a module, an
    ``inplace=True``, an ``out=``)."""
    return node.op == "placeholder" or (node.op == "call_function" and node.target in _CHANGING_NOTHING)


def _is_in_place(node: torch.fx.Node) -> bool:
    """Whether ``node`` writes into its first argument (``h.add_(1)``, ``h[0] = 1``, ``relu(h, inplace=True)``)."""
    if node.target in _IN_PLACE_FUNCTIONS or node.kwargs.get("inplace") is True:
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def _custom(node: torch.fx.Node, role: str | None = None, index: int | None = None) -> dict:
    """What a node made for program node ``node`` (its ``index``-th) carries: its user's line and site."""
    return {"fxpatch_loc": location_of(node), "fxpatch_role": role or _role(node),
            "fxpatch_site": node.args[0] if node.target in (read_site, write_site) else "", "fxpatch_index": index}


def _meta(custom: dict):
    """Nodes ``make_fx`` traces while this is active carry ``custom`` (the user's line) as ``meta["custom"]``."""
    holder = torch.fx.Graph().placeholder("_")
    holder.meta["custom"] = custom
    return fx_traceback.set_current_meta(holder)


def _role(node: torch.fx.Node) -> str:
    if node.target is read_site:
        return "capture"
    if node.target is write_site:
        return "scatter"
    return "call" if node.op == "call_module" else "op"


class _MutationProbe(TorchDispatchMode):
    """Notes whether any op writes into an existing tensor."""

    def __init__(self):
        super().__init__()
        self.mutated = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = getattr(func, "_schema", None)
        if schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            self.mutated = True
        return func(*args, **(kwargs or {}))


def check_program(program: torch.fx.Graph, chains: Chains, modules: dict, fake_roots: dict[str, Any],
                  feeds: list, sizes: dict | None = None) -> bool:
    """Run ``program`` on fake tensors of the run's shapes: raise ``ShapeError`` at the line of an op
    that would fail, and return whether the program writes into a tensor in place."""
    interp = _Interpreter(program, chains, snapshots=False, modules=modules)
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    probe = _MutationProbe()
    flat, _ = _fake_inputs(mode, interp, fake_roots, feeds, sizes or {}, symbolic=False)
    with _quiet_fake_log(), mode, probe, torch.no_grad():
        try:
            interp(*flat)
        except (ShapeError, FlowError):
            raise
        except Exception as e:  # noqa: BLE001 - any failure is the user's op, reported at its line
            _raise_at(interp.current, e)
    return probe.mutated


def check_program_symbolic(program: torch.fx.Graph, chains: Chains, modules: dict, fake_roots: dict[str, Any],
                           feeds: list, sizes: dict) -> CheckedProgram | None:
    """``check_program`` once for many runs: on fake tensors whose sizes, and the program's index numbers
    and scalars, are symbols (with this run's values as hints). Every size-dependent decision on the way
    (an index in range, shapes that broadcast, a value that fits its rows) becomes a guard, so the program
    runs in every run that satisfies them (``CheckedProgram.holds_for``). ``None`` where the program does
    not run this way (an op without symbolic sizes, or one that fails): ``check_program`` then tells.

    Example::

        checked = check_program_symbolic(program, chains, modules, specs, feeds, sizes)
        if checked is not None and checked.holds_for({**other_sizes, **feed_numbers(other_feeds)}):
            ...   # that run needs no check of its own
    """
    interp = _Interpreter(program, chains, snapshots=False, modules=modules)
    env = ShapeEnv(duck_shape=False, specialize_zero_one=False)
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    mode.cache_enabled = False  # results filed on this shape env alone: see _make_functional
    probe = _MutationProbe()
    try:
        flat, symbols = _fake_inputs(mode, interp, fake_roots, feeds, sizes, symbolic=True)
        with _quiet_fake_log(), mode, probe, torch.no_grad():
            interp(*flat)
    except Exception:  # noqa: BLE001 - whatever stops it, the check for this run's sizes raises or passes
        return None
    return CheckedProgram(probe.mutated, _guards(env, symbols))


def functionalize_program(program: torch.fx.Graph, chains: Chains, root_module: torch.nn.Module,
                          modules: dict, fake_roots: dict[str, Any], feeds: list,
                          mutating: bool, sizes: dict | None = None) -> FunctionalProgram:
    """The functional form of ``program`` (see the module docstring).

    ``root_module`` holds the modules the program calls (at their paths);
    ``fake_roots`` maps chain roots to ``TensorSpec``s whose symbolic sizes
    (the export's batch and sequence symbols) have the values ``sizes`` in
    this run, and ``feeds`` are the values of the program's placeholders;
    they are only used when ``mutating``. The graph is traced with those sizes
    symbolic, so it serves every run that satisfies ``FunctionalProgram.guards``.
    """
    guards: list = []
    n_in = len([n for n in program.nodes if n.op == "placeholder"])
    if mutating:
        interp = _Interpreter(program, chains, snapshots=True, modules=modules)
        try:
            gm, guards = _make_functional(interp, fake_roots, feeds, sizes or {}, symbolic=True)
        except Exception:  # noqa: BLE001 - some ops lack symbolic-shape support: trace for these sizes only
            gm, guards = _make_functional(interp, fake_roots, feeds, sizes or {}, symbolic=False)
    else:
        graph = torch.fx.Graph()
        interp = _Interpreter(program, chains, snapshots=False, modules=modules, graph=graph)
        names = [f"root_{i}" for i in range(len(interp.roots))] + [p.name for p in interp.placeholders]
        flat = [graph.placeholder(name) for name in names]
        graph.output(tuple(interp(*flat)))
        gm = _LazyGraphModule(root_module, graph)
    n_saved = len(interp.output.args[0]) if interp.output else 0
    return FunctionalProgram(gm, interp.roots, n_in, n_saved, _events(interp, n_saved), mutating, modules, guards)


def _events(interp: _Interpreter, n_saved: int) -> list[Event]:
    return [Event(o.index, t, o.first, members, o.root, n_saved + i, loc, o.read_loc, o.assigned, o.target, waited)
            for i, (o, t, members, loc, waited) in enumerate(interp.events)]


def rebind(template: FunctionalProgram, program: torch.fx.Graph, chains: Chains,
           modules: dict) -> FunctionalProgram:
    """``template``'s functional graph for ``program``, a program of the same shape at other sites.

    Two programs whose keys from ``site_pattern`` are equal (the same ops, on sites in
    the same relations, of the same shapes) functionalize to the same graph; only
    which sites it reads and writes differ, and the events and user lines that
    go with them. Those are found by running ``program``'s reads and writes
    without any tensor op, far cheaper than tracing it again. Example::

        fp = rebind(functionalize_program(p0, ...), p5, chains, modules)   # p5: p0 at layer 5
    """
    interp = _Interpreter(program, chains, template.mutating, modules, bookkeeping=True)
    interp(*([None] * (len(interp.roots) + len(interp.placeholders))))
    nodes = list(program.nodes)
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(template.graph.graph, {}))
    for node in graph.nodes:
        custom = node.meta.get("custom")
        if custom and custom.get("fxpatch_index") is not None:
            source = nodes[custom["fxpatch_index"]]
            node.meta["custom"] = {**custom, "fxpatch_loc": location_of(source),
                                   "fxpatch_site": source.args[0] if custom["fxpatch_site"] else ""}
    gm = _LazyGraphModule(template.graph, graph)
    n_saved = template.n_saved
    return FunctionalProgram(gm, interp.roots, template.n_inputs, n_saved, _events(interp, n_saved),
                             template.mutating, modules, template.guards)


def site_pattern(program: torch.fx.Graph, chains: Chains, specs: dict) -> tuple[tuple, tuple]:
    """What of ``program``'s sites its functional graph depends on: per site it reads or writes (in order of
    first use), its chain root's shape and dtype, and per pair of them whether they share a chain and whether
    a write to the first moves the second. Returns that and the sites, in that order."""
    names = tuple(dict.fromkeys(n.args[0] for n in program.nodes if n.target in (read_site, write_site)))
    below = {a: set(chains.descendants(a)) for a in names}
    relations = tuple((chains.root[a] == chains.root[b], b in below[a]) for a in names for b in names)
    return (tuple(specs[chains.root[a]] for a in names), relations), names


def _make_functional(interp: _Interpreter, fake_roots: dict, feeds: list, sizes: dict, symbolic: bool):
    """``make_fx(functionalize(interp))`` on fake inputs; returns the graph and the guards it needs."""
    env = ShapeEnv(duck_shape=False, specialize_zero_one=False)
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    # the dispatch cache files symbolic results under this fresh shape env only: no later trace can hit
    # them, and filing each costs more than the op (a quarter of a new program's functionalization)
    mode.cache_enabled = not symbolic
    flat, symbols = _fake_inputs(mode, interp, fake_roots, feeds, sizes, symbolic)
    # a lazy module: its graph is edited and inlined, so the Python code make_fx would generate is never run
    with _quiet_fake_log(), fx_traceback.preserve_node_meta(), _use_lazy_graph_module(True), mode:
        try:
            gm = make_fx(_functionalize(interp, len(interp.roots)), tracing_mode="real")(*flat)
        except ShapeError:
            raise
        except Exception as e:
            if symbolic:
                raise
            _raise_at(interp.current, e)
    gm = _drop_snapshot_copies(gm, len(interp.roots), interp.placeholders)
    if not symbolic:  # valid for exactly these sizes and numbers
        return gm, [sympy.Eq(sym, value) for sym, value in {**sizes, **feed_numbers(feeds)}.items()]
    return gm, _guards(env, symbols)


def _functionalize(fn, n_roots: int):
    """``torch.func.functionalize(fn, remove="mutations")``, except that a write into one of the first
    ``n_roots`` inputs (the chain roots) is not copied back into it at the end.

    The functional graph hands out each root's new value as an output (the events'
    snapshots), and ``_drop_snapshot_copies`` would erase the copies into the roots;
    replaying the writes onto them costs a seventh of a new program's trace. Writes
    into the program's other inputs are copied back, as torch does: that copy is how
    ``_drop_snapshot_copies`` finds a write into a tensor from outside the trace."""

    def functional(*args):
        level = _func_increment_nesting(True)  # remove="mutations": views are replayed as views
        try:
            wrapped = _wrap_all_tensors_to_functional(args, level)
            outputs = _unwrap_all_tensors_from_functional(fn(*wrapped), reapply_views=True)
            for i, (arg, inner) in enumerate(zip(args, wrapped)):
                if isinstance(inner, torch.Tensor):
                    torch._sync(inner)  # pending writes applied, as torch's functionalize does
                    if i >= n_roots and isinstance(arg, torch.Tensor):
                        _propagate_functional_input_mutation(arg, inner)
            return outputs
        finally:
            _func_decrement_nesting()

    return functional


def _fake_inputs(mode: FakeTensorMode, interp: _Interpreter, fake_roots: dict, feeds: list, sizes: dict,
                 symbolic: bool) -> tuple[list, dict]:
    """The interpreter's inputs as fake tensors (and numbers) of ``mode``; with ``symbolic``, the roots'
    size symbols and the program's index numbers and scalars are symbols of its shape env. Returns them
    and the symbols (export or feed symbol -> the shape env's)."""
    env, symbols = mode.shape_env, {}
    flat = [_fake(mode, fake_roots[r], symbols if symbolic else None, sizes) for r in interp.roots]
    numbers = feed_numbers(feeds)
    for i, v in enumerate(feeds):
        sym = _feed_symbol(i, v)
        if symbolic and sym in numbers:  # an index or a scalar: a graph input, not a constant
            symbols[sym] = env.create_symbol(v, ConstantSource(str(sym)), dynamic_dim=DimDynamic.DYNAMIC,
                                             positive=None)
            flat.append(env.create_symintnode(symbols[sym], hint=v) if type(v) is int
                        else env.create_symfloatnode(symbols[sym], hint=v))
        else:
            flat.append(_fake(mode, v))
    return flat, symbols


def _guards(env: ShapeEnv, symbols: dict) -> list:
    """``env``'s guards, and its runtime asserts, on the export's size symbols and the feed symbols."""
    inverse = {new: old for old, new in symbols.items()}
    asserts = [ra.expr for ras in env.deferred_runtime_asserts.values() for ra in ras]
    return [g.expr.xreplace(inverse) for g in env.guards] + [a.xreplace(inverse) for a in asserts]


def _drop_snapshot_copies(gm: torch.fx.GraphModule, n_roots: int,
                          inputs: list[torch.fx.Node] = ()) -> torch.fx.GraphModule:
    """Snapshots are clones of a functional value: the value itself. Writes back into inputs go; one into an
    input of the program (``inputs``: its placeholders, after the ``n_roots`` site roots) is refused.
    Returns the graph in a lazy module: it is inlined into the model's graph, and its own code, if ever
    wanted, is made at its first call."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in list(graph.nodes):
        if node.target is torch.ops.aten.copy_.default and node.args[0] in placeholders:
            i = placeholders.index(node.args[0]) - n_roots
            if i >= 0:
                source = inputs[i] if i < len(inputs) else None
                loc = node.meta.get("custom", {}).get("fxpatch_loc") or (source and location_of(source))
                carry = source.meta.get("fxpatch_carry") if source is not None else None
                if carry is not None:  # a value of an earlier generation step (or of the forward pass)
                    raise ShapeError(
                        "a value computed at an earlier step is changed in place at a later one: each step runs "
                        "as its own graph, which takes that value as an input and cannot change it for the "
                        "steps after", at=loc, also=[("it was computed at", location_of(carry))],
                        hint="Make it a new value instead: acc = acc + h (not acc += h), or .clone() it at "
                        "this step first.")
                raise ShapeError("an in-place write changes a tensor made outside the trace", at=loc,
                                 hint="Write into a .clone() of it, or into a module's value.")
            graph.erase_node(node)
        elif (node.target is torch.ops.aten.clone.default
              and node.meta.get("custom", {}).get("fxpatch_role") == "snapshot"):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.lint()
    forget_source(gm)  # make_fx generated it; the graph is inlined, not called
    return _LazyGraphModule(gm, graph)


def forget_source(module: torch.nn.Module) -> None:
    """Drop the source torch.fx generated for ``module``'s ``forward`` (if it did).

    torch.fx keeps the source of every ``forward`` it generates, for tracebacks, as long as the
    process lives (``torch.fx.graph_module._loader`` and ``linecache``), so a long run of changing
    programs would grow without bound. The module keeps working; its tracebacks show no source lines.

    Example::

        forget_source(gm)   # gm: a GraphModule no longer cached
    """
    from torch.fx.graph_module import _loader

    code = getattr(type(module).__dict__.get("forward"), "__code__", None)
    if code is not None and code.co_filename in _loader.eval_cache:
        del _loader.eval_cache[code.co_filename]
        linecache.cache.pop(code.co_filename, None)


def _feed_symbol(i: int, v) -> sympy.Symbol:
    return _symbol(i, type(v) is int)


@functools.lru_cache(maxsize=1024)  # asked every run (a cache hit too); making a sympy symbol costs ~10 us
def _symbol(i: int, integer: bool) -> sympy.Symbol:
    return sympy.Symbol(f"fxpatch_feed_{i}", integer=True) if integer else sympy.Symbol(f"fxpatch_feed_{i}")


def feed_numbers(feeds: list) -> dict:
    """The program inputs that are Python ints (index positions, slice bounds), by their symbol in a
    ``FunctionalProgram``'s guards: a mutating program's graph takes them as symbolic ints, so one
    graph serves every value its guards allow (``holds_for({**sizes, **feed_numbers(feeds)})``)."""
    return {_feed_symbol(i, v): v for i, v in enumerate(feeds) if type(v) in (int, float)}


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and device of a tensor the run will have (a chain root's value)."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device


def _fake(mode: FakeTensorMode, value, symbols: dict | None = None, sizes: dict | None = None):
    """A fake tensor for ``value``; a ``TensorSpec``'s symbolic sizes are symbols of ``mode``'s shape
    env when ``symbols`` (export symbol -> new symbol, filled in here) is given, else their ``sizes``."""
    if isinstance(value, TensorSpec):
        shape = []
        numbers = sympy_numbers(sizes) if sizes is not None else None
        for d in value.shape:
            if isinstance(d, int):
                shape.append(d)
                continue
            hint = int(d.xreplace(numbers))
            if symbols is None:
                shape.append(hint)
                continue
            for sym in d.free_symbols:
                if sym not in symbols:
                    symbols[sym] = mode.shape_env.create_symbol(
                        int(sizes[sym]), ConstantSource(str(sym)), dynamic_dim=DimDynamic.DYNAMIC)
            shape.append(mode.shape_env.create_symintnode(d.xreplace(symbols), hint=hint))
        with mode:
            return torch.empty(shape, dtype=value.dtype, device=value.device)
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value, static_shapes=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_fake(mode, v) for v in value)
    return value


def _raise_at(loc: Location | None, e: Exception):
    if isinstance(e, GuardOnDataDependentSymNode):  # eager torch runs it: what it needs is a value of the run
        raise ShapeError(
            "this operation needs a number computed in the trace (a position or size from a traced value, as in "
            "h[:, p] = v or h[:, :p] with p = logits.argmax()); fxpatch checks and rewrites a program before the "
            "model runs, so such numbers must not come from the run's values", at=loc,
            hint="Read at a traced position as h[:, p] (it runs as index_select); write with "
            "h.index_fill_(1, p.reshape(1), value) or h.index_copy_(1, p.reshape(1), v.unsqueeze(1)); or compute "
            "the number outside the trace.") from e
    raise ShapeError(f"this operation fails on values of the shapes the run will have: "
                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", at=loc,
                     hint="Check the shapes (save .shape and print it after a trace) and index or reshape "
                     "to match.") from e


class _quiet_fake_log:
    """A failing op is reported as a ShapeError; torch's own log of it would only repeat it."""

    def __enter__(self):
        self.log = logging.getLogger("torch._subclasses.fake_tensor")
        self.level = self.log.level
        self.log.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self.log.setLevel(self.level)
