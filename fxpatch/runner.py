"""Running a recorded program: rewrite the exported graph, check it, run it once.

Rewritten graphs are cached per model by the program's structure (ops,
sites, invoke row ranges), so runs that differ only in values (other prompts
of the same row counts, other saved tensors) reuse one graph; a program that
writes in place is functionalized, and cached, per shape of its inputs.
"""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Callable
from typing import Any

import torch
from tabulate import tabulate
from torch.fx._lazy_graph_module import _LazyGraphModule

from .control import skipped_module
from .errors import FxpatchError, user_location
from .export import TRACING_LOCK
from .gradients import make_differentiable, mark_requires_grad, run_backwards
from .inputs import left_pad
from .passes import (
    CountFromEnd,
    IndexBeforeLinear,
    IndexToOps,
    InlineProgram,
    OneDNNLinear,
    SpecializeNegativeInts,
    StripSites,
)
from .passes.count_from_end import fed, from_end_uses
from .passes.functionalize_program import (
    Chains,
    TensorSpec,
    _Interpreter,
    check_program,
    check_program_symbolic,
    feed_numbers,
    functionalize_program,
    rebind,
    site_pattern,
)
from .passes.ops import is_site, read_site, write_site
from .segments import narrow_chains, segmented_graph, segments_of


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (node meta shallow-copied)."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    # lazy: the passes that follow change the graph, so Python code is made once, at the first call
    return _LazyGraphModule(gm, graph)


def program_key(program: torch.fx.Graph, sites: dict[str, int] | None = None) -> tuple:
    """The structure of a program: equal keys give the same rewritten graph.

    With ``sites`` (site name -> number), the sites programs read and write count by that number only:
    programs that do the same at other sites get the same key (``site_pattern`` says how those sites
    must relate for them to have the same functional form), and a node's time (the graph position it
    waits for) by its rank among the program's times, the order being what interpretation uses.

    The key is one flat tuple: per node its op, target, invoke and time, then its arguments as type
    tags and values, with brackets around containers (made every trace, a cache hit too, so without a
    tuple per argument)."""
    index = {}
    times = None
    if sites is not None:
        times = {t: i for i, t in enumerate(sorted({n.meta.get("fxpatch_time", -1) for n in program.nodes},
                                                   key=lambda t: -1 if t is None else t))}
    key: list = []
    add = key.append

    for i, node in enumerate(program.nodes):
        index[node] = i
        op, meta = node.op, node.meta
        args = node.args
        if sites is not None and node.target in (read_site, write_site):
            args = (("site", sites[args[0]]), *args[1:])
        add(_NODE_START)
        add(op)
        add("" if op == "placeholder" else _target_key(node.target))
        add(meta.get("fxpatch_invoke"))
        add(meta.get("fxpatch_time") if times is None else times[meta.get("fxpatch_time", -1)])
        _norm(args, add, index)
        if node.kwargs:
            _norm(node.kwargs, add, index)
    return tuple(key)


def _norm(a: Any, add: Callable[[Any], None], index: dict) -> None:
    """``a``'s part of a program key, through ``add``; the common kinds of argument first. (Not a closure
    calling itself: that is a cycle, garbage for a collection to free at every trace.)"""
    t = type(a)
    if t is _Node:
        add(_NODE_TAG)
        add(index[a])
    elif t is int or t is str or t is bool or a is None:
        add(t)
        add(a)
    elif t is tuple or t is list or isinstance(a, (tuple, list)):
        add(t)
        for x in a:
            _norm(x, add, index)
        add(_END)
    elif t is slice:
        add(slice)
        _norm(a.start, add, index)
        _norm(a.stop, add, index)
        _norm(a.step, add, index)
    elif isinstance(a, _Node):
        add(_NODE_TAG)
        add(index[a])
    elif isinstance(a, dict):
        add(dict)
        for k, v in a.items():
            add(k)
            _norm(v, add, index)
        add(_END)
    else:
        add(t)
        add(repr(a))


_Node = torch.fx.Node


class _Tag:
    """A marker in a program key that no argument value equals."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


_NODE_TAG, _NODE_START, _END = _Tag("node"), _Tag("start"), _Tag("end")


@functools.lru_cache(maxsize=4096)
def _target_key(target: Any) -> Any:
    """A node's target in a program key. id() tells apart functions that share a name (lambdas,
    closures); the cache's reference keeps the object, so its id is not reused while cached. A
    placeholder's target (its name) is left out: its place in the program is what matters."""
    if isinstance(target, str):
        return target
    return (getattr(target, "__module__", ""), getattr(target, "__qualname__", ""), id(target))


def chains_of(sg) -> Chains:
    """Site positions and identity chains of a site graph (computed once per graph)."""
    chains = getattr(sg, "_chains", None)
    if chains is None:
        position, root, parent, aliasing, unbatched = {}, {}, {}, {}, set()
        rows = _row_sizes(sg)
        for i, n in enumerate(sg.graph_module.graph.nodes):
            if is_site(n) and n.args[1] not in position:
                name, source = n.args[1], n.args[0]
                position[name] = i
                parent[name] = source.args[1] if is_site(source) else None
                while is_site(source):
                    source = source.args[0]
                root[name] = source.name
                if source.name not in aliasing:
                    seen_by = _alias_observers(source)
                    if seen_by is not None:
                        aliasing[source.name] = seen_by
                if not _has_rows(source, rows):
                    unbatched.add(source.name)
        chains = sg._chains = Chains(position, root, parent, aliasing=aliasing, unbatched=frozenset(unbatched))
    return chains


def _row_sizes(sg) -> set:
    """The sizes (export symbols) of the batch's rows: the first dim of every input of two or more dims
    (token ids, mask, positions, a decode step's cache; not a static cache's write position)."""
    placeholders = {n.name: n for n in sg.graph_module.graph.nodes if n.op == "placeholder"}
    sizes = set()
    for name in sg.inputs:
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if isinstance(val, torch.Tensor) and val.dim() >= 2:
            sizes.add(_size_expr(val.shape[0]))
    return sizes


def _has_rows(node: torch.fx.Node, rows: set) -> bool:
    """Whether the value of model node ``node`` has the batch's rows as its first dim, as the export's
    symbolic shapes say (not by its size at a run: a flattened ``(rows * tokens, hidden)`` of one-token
    steps has as many). A value of unknown shape counts as having them."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return True
    return val.dim() > 0 and _size_expr(val.shape[0]) in rows


def _size_expr(size) -> Any:
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def _alias_observers(node: torch.fx.Node) -> frozenset[str] | None:
    """For a model op that returns its input itself or a view of it: what else sees that tensor, so a write
    into the op's value would show there in eager PyTorch. ``None``: nothing does (the op makes a new tensor,
    or its input is a temporary only it uses, as Conv1D's ``addmm(...).view(...)``); else the sites the
    tensor passes through, with ``"<model>"`` among them when the model itself uses it again (a residual,
    a weight)."""
    if not _aliases_its_input(node):
        return None
    sites: set[str] = set()
    prev, base = node, node.args[0]
    while isinstance(base, torch.fx.Node):
        # split()'s other parts (its other users, through getitem) are views of other elements: not this one's
        if base.op == "placeholder" or (len(base.users) > 1 and prev.target is not operator.getitem):
            sites.add("<model>")
        if is_site(base):
            sites.add(base.args[1])
        elif "<model>" in sites or not _aliases_its_input(base):
            break
        prev, base = base, base.args[0]
    return frozenset(sites) or None


def _aliases_its_input(node: torch.fx.Node) -> bool:
    """Whether the model op ``node`` returns its input itself or a view of it: as its schema says
    (``Tensor(a)``), for the ops that alias only when they have nothing to do (``to``, ``contiguous``,
    ``reshape``) as the export's shapes and dtypes say, and dropout outside training."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.target is operator.getitem:  # an element of split()'s or unbind()'s list of views
        return _aliases_its_input(node.args[0])
    packet = getattr(node.target, "overloadpacket", None)
    if packet in _DROPOUTS:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return train is False
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    info = schema.returns[0].alias_info
    if info is None or info.is_write:
        return False
    out, base = node.meta.get("val"), node.args[0].meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(base, torch.Tensor):
        return True
    if packet is torch.ops.aten.to:
        return out.dtype == base.dtype and out.device == base.device
    if packet in (torch.ops.aten.contiguous, torch.ops.aten.reshape):
        return base.is_contiguous()
    return True


_DROPOUTS = (torch.ops.aten.dropout, torch.ops.aten.feature_dropout, torch.ops.aten.alpha_dropout,
             torch.ops.aten.feature_alpha_dropout)


def root_specs(sg, model_inputs: list) -> tuple[dict[str, TensorSpec], dict]:
    """Every chain root's ``TensorSpec`` (sizes as the export's symbolic expressions) and the values
    the export's size symbols have for a run on ``model_inputs``."""
    symbols = getattr(sg, "_input_symbols", None)
    if symbols is None:  # once per graph: which dim of which input each size symbol is
        nodes = {n.name: n for n in sg.graph_module.graph.nodes}
        symbols = []
        for i, name in enumerate(sg.inputs):
            val = nodes[name].meta.get("val")
            if isinstance(val, torch.Tensor):
                symbols += [(i, d, dim.node.expr) for d, dim in enumerate(val.shape)
                            if isinstance(dim, torch.SymInt) and dim.node.expr.is_Symbol]
        sg._input_symbols = symbols
    sizes = {}
    for i, d, symbol in symbols:
        value = model_inputs[i] if i < len(model_inputs) else None
        if isinstance(value, torch.Tensor) and d < value.dim():
            sizes[symbol] = value.shape[d]
    specs = getattr(sg, "_root_specs", None)
    if specs is None:
        specs = {}
        nodes = {n.name: n for n in sg.graph_module.graph.nodes}
        for root in set(chains_of(sg).root.values()):
            val = nodes[root].meta["val"]
            shape = tuple(map(_size_expr, val.shape))
            specs[root] = TensorSpec(shape, val.dtype, val.device)
        sg._root_specs = specs
    return specs, sizes


def _shape_key(values: list) -> tuple:
    return tuple((tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else
                 _shape_key(v) if isinstance(v, (list, tuple)) else repr(v) for v in values)


def _feed_key(values: list) -> tuple:
    """``_shape_key`` of a program's inputs with numbers (positions, scalars: graph inputs) by type only."""
    return tuple(type(v).__name__ if type(v) in (int, float) else _shape_key([v])[0] for v in values)


def patched_graph(model, mode: str, program: torch.fx.Graph, model_inputs: list,
                  feeds: list) -> torch.fx.GraphModule:
    """The site graph of ``mode`` with ``program`` inlined, from the model's cache if seen before.

    A program is checked once per shape of its inputs (fake tensors, only its
    own ops). One that writes nothing in place is rewritten once for all
    shapes; one that does is functionalized for the shapes of the run.
    """
    with TRACING_LOCK:
        return _patched_graph(model, mode, program, model_inputs, feeds)


def _patched_graph(model, mode, program, model_inputs, feeds):
    sg = model.site_graph(mode)
    key = (mode, program_key(program))
    shapes = _shape_key(list(model_inputs) + list(feeds))
    modules = {n.target: model._model.get_submodule(n.target) for n in program.nodes if n.op == "call_module"}
    chains = chains_of(sg)
    specs, sizes = root_specs(sg, model_inputs)
    shape_of = None  # the program's key with its sites by relation only: made on a miss alone

    def same_shape() -> tuple:
        nonlocal shape_of
        if shape_of is None:
            pattern, names = site_pattern(program, chains, specs)
            shape_of = (mode, program_key(program, {n: i for i, n in enumerate(names)}), pattern)
        return shape_of

    numbers = {**sizes, **feed_numbers(feeds)}
    mutating = model._checked.get((key, shapes))
    if mutating is None:
        # the same program at other sites (a sweep over layers) checks and functionalizes the same way
        mutating = model._checked.get((same_shape(), shapes))
        if mutating is None:
            mutating = model._checked[(same_shape(), shapes)] = _check(model, same_shape(), program, chains,
                                                                       modules, specs, feeds, sizes, numbers)
        model._checked[(key, shapes)] = mutating
    # a program that writes in place is functionalized per feed shapes, for all sizes and index
    # numbers its guards allow
    gkey = (key, _feed_key(feeds)) if mutating else key
    gm = model._patched.find(gkey, lambda fp: fp.holds_for(numbers))  # counts a hit or a miss
    if gm is not None:
        return gm
    if mutating:
        fp = _functional(model, (same_shape(), _feed_key(feeds)), program, chains, modules, specs, feeds, sizes,
                         numbers)
    else:  # traced at the torch level: already cheap
        fp = functionalize_program(program, chains, model._model, modules, specs, feeds, mutating, sizes)
    options = strip_options(sg, mode, program)
    seg = segments_of(sg)
    # the segments the program touches are copied, the others called as they are (fxpatch/segments.py); a
    # trace's graph leaves out the model's outputs, and the segments after the program's last one
    outputs = not options["drop_outputs"]
    # sites are kept on the chains of the tensors the program reads, writes or stands in for
    roots = set(fp.roots) | set(options["stand_ins"])
    gm, positions = segmented_graph(sg, seg, touched_segments(sg, seg, program, fp, options["stand_ins"]), outputs,
                                    sites_of=lambda name: chains.root[name] in roots)
    options["drop_outputs"] = 0
    for p in (InlineProgram(fp, positions), StripSites(**options)):
        gm = p(gm).graph_module
    narrow_chains(gm, sg)
    mark_requires_grad(gm, program, chains.root)
    make_differentiable(gm)
    model._patched.add(gkey, fp, gm)
    return gm


# symbolic checks kept per program shape: a program whose guards pin a size (an op that specializes it)
# would otherwise pay one at each new size
_SYMBOLIC_CHECKS = 2


class _Checks:
    """The checks of one program shape (at any sites) with one kind of inputs: how many ran for sizes of
    their own, and those made with symbolic sizes (``CheckedProgram``), or ``None`` once that failed."""

    def __init__(self):
        self.concrete = 0
        self.symbolic: list | None = []


def _check(model, shape_key, program, chains, modules, specs, feeds, sizes, numbers) -> bool:
    """Whether ``program`` writes in place, once it is known to run on inputs of this run's shapes (it
    raises ``ShapeError`` at the user's line if not).

    The first sizes a program shape meets are checked as they are (fake tensors of those shapes, a few
    milliseconds). From the second on (a loop over prompts of other lengths, a sweep over positions),
    one check with symbolic sizes and index numbers serves every run its guards allow; it costs about
    what a functionalization does, and a check per size costs that again every few sizes."""
    key = ("checks", shape_key, _feed_key(feeds))  # beside the per-shape answers, under the same bound
    state = model._checked.get(key)
    if state is None:
        state = model._checked[key] = _Checks()
    for checked in state.symbolic or ():
        if checked.holds_for(numbers):
            return checked.mutating
    symbolic_failed = False
    if state.concrete and state.symbolic is not None and len(state.symbolic) < _SYMBOLIC_CHECKS:
        checked = check_program_symbolic(program, chains, modules, specs, feeds, sizes)
        if checked is not None and checked.holds_for(numbers):
            state.symbolic.append(checked)
            return checked.mutating
        symbolic_failed = True
    mutating = check_program(program, chains, modules, specs, feeds, sizes)  # raises where the program fails
    state.concrete += 1
    if symbolic_failed:
        state.symbolic = None  # it runs at these sizes, not with symbolic ones: each size is checked as it is
    return mutating


def _functional(model, key, program, chains, modules, specs, feeds, sizes, numbers):
    """``functionalize_program``'s result for a program that writes in place, made from one of the same
    shape at other sites (``key``) when there is one.

    Tracing such a program (``make_fx`` with symbolic sizes) costs 0.1-0.5 s, the most of a new
    program's rewrite, and a sweep over layers repeats the same program at other sites."""
    template = model._functional.find(key, lambda t: t.holds_for(numbers))
    if template is not None:
        return rebind(template, program, chains, modules)
    fp = functionalize_program(program, chains, model._model, modules, specs, feeds, True, sizes)
    model._functional.add(key, fp, fp)  # found by its guards, returned as itself
    return fp


def touched_segments(sg, seg, program: torch.fx.Graph, fp, stand_ins: list[str]) -> set[int]:
    """The segments of ``sg`` a program's rewrite must see node by node: those holding a site it reads or
    writes and that site's chain root, a point of the forward pass it waits for, a module output it gives a
    stand-in, and, for a tensor it changes in place, every site of the tensor the model reaches before the
    change (the model's views of it are checked there, ``InlineProgram``)."""
    chains, index = chains_of(sg), seg.index_of
    points = []
    for n in program.nodes:
        time = n.meta.get("fxpatch_time")
        if isinstance(time, int) and time >= 0:
            points.append(time)
        if n.op == "call_function" and n.target in (read_site, write_site):
            points += [chains.position[n.args[0]], index[chains.root[n.args[0]]]]
    points += [index[name] for name in stand_ins]
    for ev in _changes_in_place(fp):
        points.append(index[ev.root])
        points += [p for m in ev.members if m in chains.position and (p := chains.position[m]) < ev.time]
    return {seg.part_at(p) for p in points} - {None}


def _changes_in_place(fp) -> list:
    """The events of ``fp`` that change a tensor in place (as ``InlineProgram`` sees them: a snapshot of a
    tensor that did not change since its last one is none)."""
    graph = fp.graph.graph
    roots = dict(zip(fp.roots, [n for n in graph.nodes if n.op == "placeholder"]))
    return [ev for ev, _ in fp.changes(graph.output_node().args[0], roots.__getitem__) if ev.assigned is None]


# Run modes whose callers discard the model's own outputs: their graphs end at the last value the program needs.
WITHOUT_MODEL_OUTPUTS = ("forward",)


def strip_options(sg, mode: str, program: torch.fx.Graph) -> dict[str, Any]:
    """What ``StripSites`` removes besides sites: the model's own outputs where the caller discards them
    (a trace), and the computation of modules every invoke skips (the nodes computing their outputs get
    stand-ins, where those nodes are computed inside the module)."""
    skipped = [n.args[0] for n in program.nodes if n.op == "call_function" and n.target is skipped_module]
    return {"drop_outputs": len(sg.outputs) if mode in WITHOUT_MODEL_OUTPUTS else 0,
            "stand_ins": [root for path in skipped for root in _computed_inside(sg, path)]}


def _computed_inside(sg, path: str) -> list[str]:
    """The model nodes whose values leave the module at ``path`` as its outputs and that the module itself
    computes (not a value it passes through unchanged from before it, which others may use)."""
    chains = chains_of(sg)
    out = sg.modules[path]["output"]
    roots = []
    for name, a_site in zip(out.leaves, out.is_site):
        if not a_site:
            continue
        root, start = chains.root[name], chains.position[name]
        if all(chains.position[m] >= start or _inside(sg, m, path) for m in chains.members(root)):
            roots.append(root)
    return roots


def _inside(sg, site: str, path: str) -> bool:
    owner, kind = sg.owner(site)
    return owner.startswith(path + ".") or (owner == path and kind == "output")


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


_COMPILED_PER_GRAPH = 16  # compiled forms kept per rewritten graph, the oldest made dropped first


def compiled(gm: torch.fx.GraphModule, mode: str | None = None, dynamic: bool = True, numbers: tuple = (),
             negative: tuple = (), from_end: tuple = ()):
    """``gm`` through ``torch.compile`` (inductor, dynamic sizes), made once per rewritten graph, mode,
    ``numbers`` (the places of the inputs fed Python ints: positions an index may be moved above a linear
    with, ``IndexBeforeLinear``; a graph fed a tensor there gets its own), ``from_end`` (the places of those
    fed a negative position ``p``, which the run feeds as ``1 - p``: the graph counts it from the end of its
    dim, ``CountFromEnd``) and ``negative`` (pairs ``(place, int)`` of those fed a negative int that is
    not only a position at this run: the compiled graph has the int, ``SpecializeNegativeInts``).

    ``mode`` is torch.compile's (``"reduce-overhead"`` uses CUDA graphs on a GPU). ``dynamic=False``
    compiles for the inputs' fixed sizes (a static-cache decode step), once per set of sizes.
    """
    cache = gm.__dict__.setdefault("_fxpatch_compiled", {})
    key = (mode, dynamic, numbers, negative, from_end)
    fn = cache.get(key)
    if fn is None:
        # Dynamo will not trace a lazy graph module's first forward (torch.fx is on its skip list): a
        # segment called through a Chain would be a graph break and run eagerly, op by op
        for sub in gm.modules():
            if isinstance(sub, _LazyGraphModule):
                _LazyGraphModule.force_recompile(sub)
        target = copy_graph_module(gm)  # the eager graph stays as it is (the copy's nodes have their own meta)
        inputs = [n for n in target.graph.nodes if n.op == "placeholder"]
        for i in numbers:
            inputs[i].meta["fxpatch_number"] = True
        for i, value in negative:
            inputs[i].meta["fxpatch_int"] = value
        for i in from_end:
            inputs[i].meta["fxpatch_from_end"] = True
        for rewrite in (IndexBeforeLinear(), IndexToOps(), CountFromEnd(), OneDNNLinear(), SpecializeNegativeInts()):
            target = rewrite(target).graph_module
        for sub in target.modules():  # a pass's recompile() leaves a graph module lazy again
            if isinstance(sub, _LazyGraphModule):
                _LazyGraphModule.force_recompile(sub)
        if len(cache) >= _COMPILED_PER_GRAPH:  # a loop over negative ints that are not positions: each is its own
            del cache[next(iter(cache))]
        fn = cache[key] = torch.compile(target, dynamic=dynamic, mode=mode)
    return fn


def counted_from_end(gm: torch.fx.GraphModule, numbers: tuple) -> frozenset:
    """Of the inputs at ``numbers`` (fed ints), the places of those used only as positions, which a compiled
    graph takes counted from the end when they are negative (``CountFromEnd``); once per graph and places."""
    known = gm.__dict__.setdefault("_fxpatch_from_end", {})
    if numbers not in known:
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        ints = {inputs[i] for i in numbers}
        known[numbers] = frozenset(i for i in numbers if from_end_uses(inputs[i], ints) is not None)
    return known[numbers]


@functools.cache
def uses_cuda_graphs(mode: str | None) -> bool:
    """Whether torch.compile's ``mode`` records CUDA graphs (``"reduce-overhead"``, ``"max-autotune"``).

    A CUDA graph's outputs live in memory its next replay writes over, so a value saved from one trace would
    change (or refuse to be read) after the next: the runner hands out copies of them.
    """
    return bool(mode) and bool(torch._inductor.list_mode_options(mode).get("triton.cudagraphs", False))


def run_program(model, mode: str, program: torch.fx.Graph, outputs: list[torch.fx.Node],
                model_inputs: list[torch.Tensor], values: dict,
                compile: bool | str = False, grad: bool = False,
                dynamic: bool = True) -> tuple[list[Any], torch.fx.GraphModule]:
    """Run one phase: the site graph of ``mode`` with ``program`` inlined (compiled if ``compile``, for
    fixed sizes if not ``dynamic``).

    ``values`` maps program nodes of earlier phases to their values; the
    values of ``outputs`` are added to it. Returns the model's own outputs
    (none for a mode in ``WITHOUT_MODEL_OUTPUTS``) and the graph that ran.
    ``grad``: run with autograd recording (the outputs keep their ``grad_fn``).
    """
    if program.find_nodes(op="output"):
        raise RuntimeError("a program runs once")
    program.output(tuple(outputs))
    sg = model.site_graph(mode)
    feeds = _feeds(program, values)
    gm = patched_graph(model, mode, program, list(model_inputs), feeds)
    state = model.state_values(mode)
    mode_ = compile if isinstance(compile, str) else None
    run_feeds = feeds
    if compile:
        start = 1 + len(model_inputs)  # the state, the model's inputs, then the program's
        numbers = tuple(start + i for i, v in enumerate(feeds) if type(v) is int)
        below = [place for place in numbers if feeds[place - start] < 0]
        counted = counted_from_end(gm, numbers) if below else frozenset()
        negative = tuple((place, feeds[place - start]) for place in below if place not in counted)
        from_end = tuple(place for place in below if place in counted)
        run = compiled(gm, mode_, dynamic, numbers, negative, from_end)
        if from_end:
            run_feeds = list(feeds)
            for place in from_end:
                run_feeds[place - start] = fed(run_feeds[place - start])
    else:
        run = gm
    graphs = compile and uses_cuda_graphs(mode_) and any(t.is_cuda for t in model_inputs)
    if graphs:
        # a run replays into memory the last run's outputs live in: begin a new step, and give out copies
        torch.compiler.cudagraph_mark_step_begin()
    with torch.set_grad_enabled(grad):
        try:
            out = call_graph(run, (state, *model_inputs, *run_feeds))
        except torch._dynamo.exc.BackendCompilerFailed as e:  # raised while compiling: nothing has run yet
            raise compile_failed(e) from e
        if graphs:
            out = [o.clone() if isinstance(o, torch.Tensor) else o for o in out]
    n = 0 if mode in WITHOUT_MODEL_OUTPUTS else len(sg.outputs)
    values.update(zip(outputs, out[n:]))
    return list(out[:n]), gm


def compile_failed(error: Exception) -> FxpatchError:
    """The error for a rewritten graph that torch.compile's backend could not compile: torch's own failure
    (inductor's generated code that does not build), which the program can avoid only by running eagerly."""
    inner = getattr(error, "inner_exception", None) or error
    first = next((line for line in str(inner).splitlines() if line.strip()), "")
    return FxpatchError(
        f"torch.compile could not compile the rewritten graph: {type(inner).__name__}: {first[:300]}",
        at=user_location(),
        hint="This is a failure of torch's compiler (the full error is chained below), not of the program: run "
        "it with compile=False for the same values eagerly. With torch before 2.13, inductor's C++ code for the "
        "attention masks of generation does not compile on the CPU; torch 2.13 compiles it.")


def call_graph(run: Any, args: tuple) -> Any:
    """Run a rewritten graph (or its compiled form) on ``args``: the graph's own run time, which
    ``python -m bench.overhead`` separates from a trace's Python work by wrapping this."""
    return run(*args)


def run_detached(program: torch.fx.Graph, outputs: list[torch.fx.Node], values: dict) -> None:
    """Run a program that touches no model (ops on generated tokens and earlier values), eagerly."""
    program.output(tuple(outputs))
    feeds = _feeds(program, values)
    check_program(program, Chains({}, {}, {}), {}, {}, feeds)
    interp = _Interpreter(program, Chains({}, {}, {}), snapshots=False, modules={})
    with torch.no_grad():
        out = interp(*feeds)
    values.update(zip(outputs, out))


def bind_values(tracer, values: dict) -> None:
    """Give every saved proxy its value (``None`` for a step that never ran: ``tracer.not_run`` holds the ids
    of those, which lists drop when bound, as NNsight's lists never get them)."""
    not_run = set()
    for proxy in tracer.saved:
        value = values.get(proxy.node, _NOT_RUN)
        if value is _NOT_RUN:
            not_run.add(id(proxy))
            value = None
        object.__setattr__(proxy, "value", value)
    tracer.not_run = not_run


_NOT_RUN = object()


def run_trace(tracer) -> None:
    """Run a trace's program as one batched forward pass and bind the saved values."""
    with tracer.model._lock:  # one run of a model at a time: threads sharing it wait, never mix
        _run_trace(tracer)


def _run_trace(tracer) -> None:
    model = tracer.model
    rows = [r for invoke in tracer.invokes for r in invoke.rows]
    batch = left_pad(rows, model.pad_token_id, model._input_facts()[2])
    tracer.batch = batch
    inputs = [batch.input_ids, batch.attention_mask]
    if "position_ids" in model.site_graph("forward").input_names:
        inputs.append(batch.position_ids)
    values: dict = {}
    # grad mode follows torch's, as NNsight's forward does: saved values keep their grad_fn
    _, gm = run_program(model, "forward", tracer.program_of(0), phase_outputs(tracer, 0), inputs, values,
                        compile=tracer.compile, grad=torch.is_grad_enabled())
    tracer.graph = gm
    run_backwards(tracer, values)
    bind_values(tracer, values)
