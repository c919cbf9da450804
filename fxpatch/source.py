"""``module.source``: the operations inside a module's ``forward``, named as NNsight 0.8 names them.

NNsight rewrites a module's ``forward`` source so that every call and every
assignment passes through a hook. fxpatch does not touch the source: the
exported graph already records, for each torch-level op, the module it ran in
(``nn_module_stack``) and the line of that module's ``forward`` it came from
(``stack_trace``). ``export_sites`` hands the graph to ``add_op_sites``, which

1. names the operations of each module's ``forward`` exactly as NNsight does
   (``forward_source``): a call is the called expression's dotted path joined
   with ``_`` (``self.c_fc(x)`` -> ``self_c_fc``, ``torch.relu(x)`` ->
   ``torch_relu``, ``x.view(s)`` -> ``x_view``, ``f(x).view(s)`` -> ``view``),
   an assignment is its target's name (``h = ...`` -> ``h``), and a counter
   per name in execution order (inner calls first) ends each name:
   ``self_c_fc_0``, ``hidden_states_1``;
2. finds the value of each name in the graph, per execution of its statement:
   a call of a submodule is that submodule's call (its output and inputs
   sites); a call of a torch function or tensor method is the graph op of the
   same name on that line (``view`` -> ``aten.view``; the k-th such call on a
   line is the k-th such op); any other call that is the whole value of its
   statement (a Python helper: ``y = helper(x)``) is the last op of the
   statement; an assignment is the value it assigns (the call on its right, or
   the last op of the statement); a call whose result its statement unpacks
   (``attn_output, attn_weights = attention_interface(...)``) is that result (a
   tuple), which ``unpacked_sites`` passes through sites while the export traces:
   the forward then runs a copy of its code, compiled from the same lines, in
   which the call's result goes through ``_unpacked_result``;
3. puts a ``fxpatch::site`` after each op that holds such a value, named
   ``<module>.source.<op>.output`` (``#k`` for its later executions), and lists
   each name's sites in ``SiteGraph.calls`` under ``<module>.source.<op>``, so a
   read, a write and ``tracer.iter`` treat an operation as they treat a module.

A name whose value the graph does not show (a branch that did not run, a
value that is not a tensor, an op whose graph ops cannot be told apart from its
neighbours') is listed but cannot be read;
``ModuleSource.status`` says why.

Example::

    print(model.transformer.h[0].mlp.source)
    with model.trace("Hello"):
        act = model.transformer.h[0].mlp.source.self_act_0.output.save()
        model.transformer.h[0].attn.source.shape_q_0.output  # not a tensor: SourceOpError
"""

from __future__ import annotations
import __future__

import ast
import bisect
import contextlib
import inspect
import re
import textwrap
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import torch

from .passes.ops import SITE_OP, is_site
from .structure import LEAF

# --- naming (NNsight 0.8.1's ``Instrument``, without rewriting anything) ---------------------------------------


@dataclass
class SourceOp:
    """One operation of a ``forward``: ``name`` (``self_c_fc_0``), its 1-based ``line`` in ``ForwardSource.text``,
    ``kind`` (``"call"`` or ``"assign"``) and the AST node and statement it comes from."""

    name: str
    line: int
    kind: str
    node: ast.AST
    stmt: int  # index of its statement in ForwardSource.statements
    callee: list[str] = field(default_factory=list)  # a call's dotted path (["self", "c_fc"])
    self_rooted: bool = False  # the callee is an attribute chain on ``self`` with no subscript
    value: ast.AST | None = None  # an assignment's value
    simple_target: bool = False  # an assignment to a name or ``self.x`` (not unpacking, not x[i] = ...)
    whole_value: bool = False  # a call that is the entire value of its statement (nothing applied to its result)
    unpacked: bool = False  # a call whose result its statement unpacks (``a, b = f(x)``)


@dataclass
class ForwardSource:
    """A ``forward``'s text and operations: ``start`` is the file line of the text's first line."""

    filename: str
    start: int
    text: str
    ops: list[SourceOp]
    statements: list[tuple[int, int]]  # file line spans
    line_stmt: dict[int, int]  # file line -> statement index (the innermost one holding it)

    @property
    def names(self) -> list[str]:
        return [op.name for op in self.ops]

    def statement_at(self, file_line: int) -> int | None:
        return self.line_stmt.get(file_line)

    @property
    def last_line(self) -> int:
        return self.start + self.text.count("\n")


class _Namer(ast.NodeVisitor):
    """Names calls and assignments in NNsight's execution order (arguments before the call, a value before
    its targets), one counter per name shared by calls and assignments."""

    def __init__(self, stmt_of):
        self.counts: dict[str, int] = {}
        self.ops: list[SourceOp] = []
        self.stmt_of = stmt_of
        self.call_label: dict[int, str] = {}

    @staticmethod
    def dotted(expr: ast.expr) -> tuple[list[str], bool, bool]:
        """``(parts, rooted in a name, crossed a subscript)``, as NNsight's ``Instrument.dotted``."""
        parts, subscript = [], False
        while True:
            if isinstance(expr, ast.Attribute):
                parts.append(expr.attr)
                expr = expr.value
            elif isinstance(expr, ast.Subscript):
                subscript = True
                expr = expr.value
            elif isinstance(expr, ast.Name):
                parts.append(expr.id)
                return parts[::-1], True, subscript
            else:
                return parts[::-1], False, subscript

    def _label(self, name: str, node: ast.AST, kind: str, **extra) -> SourceOp:
        n = self.counts.get(name, 0)
        self.counts[name] = n + 1
        op = SourceOp(f"{name}_{n}", node.lineno, kind, node, self.stmt_of(node.lineno), **extra)
        self.ops.append(op)
        return op

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id == "super" and not (node.args or node.keywords):
            return  # NNsight leaves a zero-argument super() alone (and does not look inside it)
        self.generic_visit(node)
        parts, rooted, subscript = self.dotted(node.func)
        op = self._label("_".join(parts) or "call", node, "call", callee=parts,
                         self_rooted=rooted and not subscript and parts[:1] == ["self"])
        self.call_label[id(node)] = op.name

    def _bound(self, target: ast.expr, value: ast.expr, node: ast.AST) -> None:
        if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)):
            elements = [*target.elts, *value.elts]
            if len(target.elts) == len(value.elts) and not any(isinstance(e, ast.Starred) for e in elements):
                for t, v in zip(target.elts, value.elts):
                    self._bound(t, v, node)
            return
        parts, rooted, _ = self.dotted(target)
        if not rooted:
            return
        simple = isinstance(target, ast.Name) or (isinstance(target, ast.Attribute) and parts[:1] == ["self"]
                                                  and len(parts) == 2)
        self._label("_".join(parts), node, "assign", value=value, simple_target=simple)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for target in node.targets:
            self.visit(target)
        if len(node.targets) == 1:
            self._bound(node.targets[0], node.value, node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
            self._bound(node.target, node.value, node)


def _statements(tree: ast.AST, offset: int) -> tuple[list[tuple[int, int]], dict[int, int]]:
    """Every statement's file line span, and each line's innermost statement (a compound statement owns
    its header lines: an ``if`` test, a ``for`` iterable)."""
    spans: list[tuple[int, int]] = []
    line_stmt: dict[int, int] = {}

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                body = [s for f in ("body", "orelse", "finalbody", "handlers") for s in getattr(child, f, []) or []
                        if isinstance(s, (ast.stmt, ast.excepthandler))]
                end = min((s.lineno for s in body), default=child.end_lineno + 1) - 1 if body else child.end_lineno
                index = len(spans)
                spans.append((child.lineno + offset, end + offset))
                for line in range(child.lineno, end + 1):
                    line_stmt[line + offset] = index
            visit(child)

    visit(tree)
    return spans, line_stmt


_FORWARDS: dict[types.CodeType, ForwardSource | str] = {}


def forward_function(module: torch.nn.Module) -> Any:
    """The function ``module.source`` lists, as NNsight picks it: the ``forward`` with each decorator peeled
    whose wrapper calls the one Python function it closes over (a dispatcher that calls something else,
    like transformers' ``dynamic_rope_update``, is listed itself)."""
    fn = module.__dict__.get("forward") or type(module).forward
    fn = getattr(fn, "__func__", fn)
    seen = {fn}
    while (index := _peel_index(fn)) is not None:
        fn = fn.__closure__[index].cell_contents
        if fn in seen:
            break
        seen.add(fn)
    return fn


def _peel_index(wrapper: Any) -> int | None:
    """The closure cell holding the function a decorator's wrapper calls (NNsight's ``peel_index``)."""
    code = getattr(wrapper, "__code__", None)
    if code is None or not code.co_freevars:
        return None
    try:
        tree = ast.parse(textwrap.dedent("".join(inspect.getsourcelines(code)[0])))
    except (OSError, TypeError, SyntaxError):
        return None
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    candidates = [i for i, (name, cell) in enumerate(zip(code.co_freevars, wrapper.__closure__))
                  if name in called and isinstance(getattr(cell, "cell_contents", None), types.FunctionType)]
    return candidates[0] if len(candidates) == 1 else None


_BY_FORWARD: dict[Any, ForwardSource | str] = {}  # by the module's (unpeeled) forward: peeling reads source


def forward_source(module: torch.nn.Module) -> ForwardSource | str:
    """The parsed ``forward`` of ``module``, or why there is none (a string)."""
    key = module.__dict__.get("forward") or type(module).forward
    try:
        return _BY_FORWARD[key]
    except (KeyError, TypeError):
        pass
    found = _forward_source(module)
    try:
        _BY_FORWARD[key] = found
    except TypeError:  # an unhashable callable
        pass
    return found


def _forward_source(module: torch.nn.Module) -> ForwardSource | str:
    fn = forward_function(module)
    code = getattr(fn, "__code__", None)
    if code is None:
        return f"{type(module).__name__}.forward has no Python source"
    if code not in _FORWARDS:
        _FORWARDS[code] = _parse(code)
    return _FORWARDS[code]


def _parse(code: types.CodeType) -> ForwardSource | str:
    try:
        lines, start = inspect.getsourcelines(code)
    except (OSError, TypeError):
        return f"the source of {code.co_name} is not available"
    text = textwrap.dedent("".join(lines))
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return f"the source of {code.co_name} does not parse"
    definition = tree.body[0]
    if not isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return f"{code.co_name} is not a plain function"
    definition.decorator_list = []  # NNsight drops them before naming
    offset = start - 1
    spans, line_stmt = _statements(definition, offset)
    namer = _Namer(lambda line: line_stmt.get(line + offset))
    namer.visit(tree)
    holder: dict[int, ast.stmt] = {}  # node -> innermost statement holding it (ast.walk goes outer to inner)
    for node in ast.walk(definition):
        if isinstance(node, ast.stmt) and node is not definition:
            for inner in ast.walk(node):
                holder[id(inner)] = node
    for op in namer.ops:
        stmt_node = holder.get(id(op.node))
        if op.kind == "call" and stmt_node is not None:
            value = getattr(stmt_node, "value", None)
            targets = getattr(stmt_node, "targets", None) or ([stmt_node.target] if isinstance(
                stmt_node, ast.AnnAssign) else [])
            unpacked = any(isinstance(t, (ast.Tuple, ast.List)) for t in targets)
            op.unpacked = value is op.node and unpacked
            op.whole_value = value is op.node and not unpacked and isinstance(
                stmt_node, (ast.Assign, ast.AnnAssign, ast.Return, ast.Expr))
    return ForwardSource(code.co_filename, start, text, namer.ops, spans, line_stmt)


# --- a tuple a call returns and its statement unpacks: a site on each tensor of it, while the export traces ---
#
# ``attn_output, attn_weights = attention_interface(...)``: the graph has the two tensors but not which name
# (or tuple position) each is, nor that the second is ``None``. While a model is exported, the forward runs
# a copy of its own code in which each such call's result passes through ``_unpacked_result`` (a site on
# each tensor in it); the copy is compiled from the same file, with the same line numbers, so the graph's
# ``stack_trace`` and everything else about the forward are unchanged. The original code is put back when
# the export returns.

_WRAPPED: dict[types.CodeType, types.CodeType | str] = {}  # a forward's code -> its copy, or why there is none


def _future_flags(code: types.CodeType) -> int:
    flags = 0
    for name in __future__.all_feature_names:
        flag = getattr(__future__, name).compiler_flag
        if code.co_flags & flag:
            flags |= flag
    return flags


def _wrapped_code(code: types.CodeType, fs: ForwardSource, ops: list[SourceOp]) -> types.CodeType | str:
    """``code`` with each of ``ops``' calls ``f(...)`` replaced by ``_unpacked_result(self, name, f(...))``,
    or why that cannot be done."""
    tree = ast.parse(fs.text)
    definition = tree.body[0]
    definition.decorator_list = []
    params = [*definition.args.posonlyargs, *definition.args.args]
    if not params:
        return "its forward takes no self argument"
    me = params[0].arg
    wanted = {(op.node.lineno, op.node.col_offset, op.node.end_lineno, op.node.end_col_offset): op.name
              for op in ops}
    found: set[str] = set()

    class Wrap(ast.NodeTransformer):
        def visit_Call(self, node: ast.Call) -> ast.AST:
            self.generic_visit(node)
            name = wanted.get((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset))
            if name is None:
                return node
            found.add(name)
            # reached through __import__ (a builtin): a new global or free variable would change the code's
            # free variables, and then it could not replace the function's code
            helper = ast.Attribute(ast.Call(ast.Name("__import__", ast.Load()), [ast.Constant(__name__)], [
                ast.keyword("fromlist", ast.List([ast.Constant("_unpacked_result")], ast.Load()))]),
                "_unpacked_result", ast.Load())
            wrapped = ast.Call(helper, [ast.Name(me, ast.Load()), ast.Constant(name), node], [])
            return ast.fix_missing_locations(ast.copy_location(wrapped, node))  # all of it on the call's lines

        def visit_FunctionDef(self, node: ast.AST) -> ast.AST:  # a nested function's ``self`` is another
            return self.generic_visit(node) if node is definition else node

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Lambda(self, node: ast.AST) -> ast.AST:
            return node

        def visit_ClassDef(self, node: ast.AST) -> ast.AST:
            return node

    Wrap().visit(definition)
    if not found:
        return "its call is inside a function nested in the forward"
    ast.increment_lineno(definition, fs.start - 1)
    # the forward's free variables (``__class__`` for ``super()``) are an enclosing function's locals here
    outer = ast.FunctionDef("_fxpatch_outer", ast.arguments([], [], None, [], [], None, []),
                            [*(ast.Assign([ast.Name(v, ast.Store())], ast.Constant(None)) for v in code.co_freevars),
                             definition], [], None, None)
    ast.copy_location(outer, definition)
    module = ast.fix_missing_locations(ast.Module([outer], []))
    try:
        compiled = compile(module, code.co_filename, "exec", flags=_future_flags(code), dont_inherit=True)
    except (SyntaxError, ValueError, TypeError) as e:
        return f"its wrapped forward does not compile ({type(e).__name__}: {e})"
    outer_code = next(c for c in compiled.co_consts if isinstance(c, types.CodeType))
    inner = next((c for c in outer_code.co_consts if isinstance(c, types.CodeType) and c.co_name == code.co_name),
                 None)
    if inner is None or inner.co_freevars != code.co_freevars or inner.co_argcount != code.co_argcount:
        return "its wrapped forward does not have the forward's free variables and arguments"
    return inner.replace(co_qualname=code.co_qualname) if hasattr(code, "co_qualname") else inner


@dataclass
class _Recording:
    first: dict[int, str]
    record: dict
    thread: int
    counts: dict = field(default_factory=dict)


_RECORDING: _Recording | None = None


def _unpacked_result(module: Any, name: str, value: Any) -> Any:
    """The result of the call ``name`` of ``module``'s forward, with a site on each tensor in it while an
    export records (``<module>.source.<name>.output[i]``; ``output#k[i]`` for its later executions), else
    ``value`` itself."""
    rec = _RECORDING
    if rec is None or rec.thread != threading.get_ident():  # a forward run by another thread meanwhile
        return value
    path = rec.first.get(id(module))
    if path is None:
        return value
    from .export import sited

    e = rec.counts.get((path, name), 0)
    rec.counts[(path, name)] = e + 1
    out, sites = sited(f"{path}.source.{name}" if path else f"source.{name}", "output", e, value)
    rec.record.setdefault((path, name), []).append(sites)
    return out if any(sites.is_site) else value


def _unpacked_calls(fs: ForwardSource, module: torch.nn.Module) -> list[SourceOp]:
    """The calls of ``fs`` whose result its statement unpacks, other than submodules' calls (those have the
    submodule's sites)."""
    return [op for op in fs.ops if op.unpacked and not isinstance(_callee(op, module), torch.nn.Module)]


@contextlib.contextmanager
def unpacked_sites(modules: dict[str, torch.nn.Module], record: dict):
    """While the export traces, each call whose result its statement unpacks (``a, b = f(...)``, ``f`` not a
    submodule) in the forwards of ``modules`` passes its result through sites, so that the tuple NNsight gives
    as the call's ``.output`` can be read and written. ``record[(module path, op)]`` lists each execution's
    ``ModuleSites``. The forwards' functions run the wrapped copy of their code (``_wrapped_code``) only
    inside this block.
    """
    global _RECORDING
    swapped: list[tuple[Any, types.CodeType]] = []
    for module in modules.values():
        fn = forward_function(module)
        code = getattr(fn, "__code__", None)
        if code is None or any(f is fn for f, _ in swapped):
            continue
        if code not in _WRAPPED:
            fs = forward_source(module)
            ops = _unpacked_calls(fs, module) if isinstance(fs, ForwardSource) else []
            _WRAPPED[code] = _wrapped_code(code, fs, ops) if ops else "nothing to wrap"
        if isinstance(_WRAPPED[code], types.CodeType):
            swapped.append((fn, code))
    if not swapped:
        yield
        return
    previous = _RECORDING
    _RECORDING = _Recording({id(m): p for p, m in modules.items()}, record, threading.get_ident())
    try:
        for fn, code in swapped:
            fn.__code__ = _WRAPPED[code]
        yield
    finally:
        for fn, code in swapped:
            fn.__code__ = code
        _RECORDING = previous


def _unwrapped_why(module: torch.nn.Module) -> str | None:
    """Why the unpacked calls of ``module``'s forward could not be wrapped, if they could not."""
    why = _WRAPPED.get(getattr(forward_function(module), "__code__", None))
    return why if isinstance(why, str) else None


# --- finding the names' values in the exported graph ------------------------------------------------------------

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in ')
# a tensor method or torch function whose graph op has another name
_OP_ALIASES = {"float": "to", "double": "to", "half": "to", "bfloat16": "to", "type_as": "to", "type": "to",
               "cuda": "to", "cpu": "to", "long": "to", "int": "to", "bool": "to", "matmul": "matmul",
               "mm": "mm", "bmm": "bmm"}


def _op_name(node: torch.fx.Node) -> str | None:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    return schema.name.split("::")[-1].lstrip("_")


def _torch_name(name: str) -> bool:
    """Whether ``name`` is a tensor method or a torch function (whose graph op shares its name)."""
    return hasattr(torch.Tensor, name) or hasattr(torch, name) or hasattr(torch.nn.functional, name)


@dataclass
class ModuleSource:
    """What ``module.source`` shows and reads: the parsed ``forward`` (or ``why`` there is none) and, for each
    name that cannot be read, the reason (``status``)."""

    path: str
    forward: ForwardSource | None
    why: str = ""
    status: dict[str, str] = field(default_factory=dict)

    def addressable(self) -> list[str]:
        return [n for n in (self.forward.names if self.forward else []) if n not in self.status]


def _is_tensor_node(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def add_op_sites(gm: torch.fx.GraphModule, model: torch.nn.Module, prefix: str, calls: dict,
                 modules: dict[str, torch.nn.Module], unpacked: dict | None = None,
                 ) -> tuple[dict[str, ModuleSource], dict[str, dict[str, list]]]:
    """Put a site after each op of a module's own ``forward`` that holds a named operation's value.

    ``calls`` is the export's ``path -> kind -> [ModuleSites]`` of the modules (first paths), ``modules`` the
    first paths' modules, ``unpacked`` what ``unpacked_sites`` recorded.
    Returns ``(sources, op_calls)``: each module's ``ModuleSource`` and, for each
    readable operation, ``{"output": [...], "inputs": [...]}`` by execution (``inputs`` only for a call
    of a submodule), keyed ``<module>.source.<name>``.
    """
    from .export import ModuleSites, site_name

    graph = gm.graph
    first = {id(m): p for p, m in modules.items()}
    stack_paths: dict[str, str | None] = {}

    def first_path(fqn: str) -> str | None:
        if fqn not in stack_paths:
            rel = "" if fqn == prefix.rstrip(".") else fqn.removeprefix(prefix)
            try:
                stack_paths[fqn] = first.get(id(model.get_submodule(rel)))
            except AttributeError:
                stack_paths[fqn] = None
        return stack_paths[fqn]

    owner: dict[str, tuple[str, str, int]] = {}
    for path, kinds in calls.items():
        for kind, per_call in kinds.items():
            for j, ms in enumerate(per_call):
                for name, s in zip(ms.leaves, ms.is_site):
                    if s:
                        owner[name] = (path, kind, j)
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    site_pos = {n.args[1]: i for i, n in enumerate(nodes) if is_site(n)}
    # where each call of a module ends: its first output site (the ops before it, after the previous end, are its)
    ends: dict[str, list[int]] = {}
    for path, kinds in calls.items():
        per_call = kinds.get("output", [])
        pos = [min((site_pos[n] for n, s in zip(ms.leaves, ms.is_site) if s), default=None) for ms in per_call]
        if all(p is not None for p in pos) and pos == sorted(pos):
            ends[path] = pos

    sources: dict[str, ModuleSource] = {}

    def source_of(path: str) -> ModuleSource:
        if path not in sources:
            fs = forward_source(modules[path])
            sources[path] = ModuleSource(path, fs, "") if isinstance(fs, ForwardSource) else \
                ModuleSource(path, None, fs)
        return sources[path]

    def line_in(fs: ForwardSource, node: torch.fx.Node) -> int | None:
        frames = _FRAME.findall(node.meta.get("stack_trace") or "")
        for filename, line in reversed(frames):
            line = int(line)
            if filename == fs.filename and fs.start <= line <= fs.last_line:
                return line
        return None

    # events: (module, call of it, statement, ("own", node) | ("child", path, call)), in graph order
    events: dict[str, list[tuple[int, int, tuple]]] = {}
    seen_child: set[tuple[str, int]] = set()
    for node in nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack or node.op != "call_function":
            continue
        paths = [first_path(fqn) for fqn, _ in stack.values()]
        if is_site(node):
            site = owner.get(node.args[1])
            if site is None or len(paths) < 2 or paths[-2] is None:
                continue
            child, _, j = site
            where, what = paths[-2], ("child", child, j)
            if (child, j) in seen_child:
                continue
            seen_child.add((child, j))
        else:
            if paths[-1] is None:
                continue
            where, what = paths[-1], ("own", node)
        src = source_of(where)
        if src.forward is None:
            continue
        line = line_in(src.forward, node)
        stmt = src.forward.statement_at(line) if line is not None else None
        if stmt is None:
            continue
        call = bisect.bisect_left(ends[where], position[node]) if where in ends else 0
        events.setdefault(where, []).append((call, stmt, what))

    op_calls: dict[str, dict[str, list]] = {}
    for (path, name), per_execution in (unpacked or {}).items():
        op_calls[f"{path}.source.{name}" if path else f"source.{name}"] = {"output": per_execution}
    op_site: dict[torch.fx.Node, str] = {}  # op node -> the site name put after it
    inserts: list[tuple[torch.fx.Node, str]] = []
    for path, module in modules.items():
        src = source_of(path) if path in events else None
        if src is None:
            fs = forward_source(module)
            if isinstance(fs, ForwardSource):
                sources[path] = ModuleSource(path, fs, "", {op.name: "its statement runs no tensor op in the "
                                                            "exported forward pass" for op in fs.ops})
            else:
                sources[path] = ModuleSource(path, None, fs)
            continue
        if src.forward is None:
            continue
        # executions: runs of consecutive events of one statement in one call
        runs: dict[int, list[list[tuple]]] = {}
        last = None
        for call, stmt, what in events[path]:
            if (call, stmt) != last:
                runs.setdefault(stmt, []).append([])
                last = (call, stmt)
            runs[stmt][-1].append(what)
        by_stmt: dict[int, list[SourceOp]] = {}
        for op in src.forward.ops:
            by_stmt.setdefault(op.stmt, []).append(op)
        for stmt, ops in by_stmt.items():  # a loop running one statement of module calls: its runs touch
            n = sum(op.kind == "call" and not isinstance(_callee(op, module), str) for op in ops)
            split = []
            for run in runs.get(stmt, []):
                if n and all(w[0] == "child" for w in run) and len(run) > n and len(run) % n == 0:
                    split += [run[i:i + n] for i in range(0, len(run), n)]
                else:
                    split.append(run)
            if stmt in runs:
                runs[stmt] = split
        for stmt, ops in by_stmt.items():
            executions = runs.get(stmt)
            ops = [op for op in ops if (path, op.name) not in (unpacked or {})]
            if not executions:
                for op in ops:
                    src.status[op.name] = "its statement did not run (or ran no tensor op) in the exported " \
                                          "forward pass"
                continue
            resolved = [_resolve(ops, run, module, first) for run in executions]
            for op in ops:
                values = [r.get(op.name) for r in resolved]
                reasons = [v for v in values if isinstance(v, str)]
                if reasons or any(v is None for v in values):
                    src.status[op.name] = reasons[0] if reasons else "fxpatch cannot tell its value apart in " \
                                                                     "the exported graph"
                    continue
                key = f"{path}.source.{op.name}" if path else f"source.{op.name}"
                outputs, inputs = [], []
                for e, v in enumerate(values):
                    if v[0] == "child":
                        _, child, j = v
                        outputs.append(calls[child]["output"][j])
                        inputs.append(calls[child].get("inputs", [None] * (j + 1))[j])
                    else:
                        node = v[1]
                        name = op_site.get(node)
                        if name is None:
                            name = op_site[node] = site_name(key, "output", "", e)
                            inserts.append((node, name))
                        outputs.append(ModuleSites(name.rsplit(".output", 1)[0], "output", LEAF, [name], [True]))
                        inputs.append(None)
                op_calls[key] = {"output": outputs}
                if op.kind == "call" and all(i is not None for i in inputs):
                    op_calls[key]["inputs"] = inputs
    for node, name in inserts:
        with graph.inserting_after(node):
            new = graph.call_function(SITE_OP, (node, name))
        for k in ("val", "tensor_meta", "nn_module_stack", "stack_trace"):
            if k in node.meta:
                new.meta[k] = node.meta[k]
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    if inserts:
        graph.lint()
        gm.recompile()
    return sources, op_calls


def _resolve(ops: list[SourceOp], run: list[tuple], module: torch.nn.Module, first: dict[int, str]) -> dict:
    """The value of each of a statement's operations in one execution of it: ``("child", path, call)``,
    ``("own", node)``, or why it has none (a string)."""
    out: dict[str, Any] = {}
    children = [(w[1], w[2]) for w in run if w[0] == "child"]
    own = [w[1] for w in run if w[0] == "own"]
    tensors = [n for n in own if _is_tensor_node(n)]
    last_event = run[-1]
    last_own = last_event[1] if last_event[0] == "own" and _is_tensor_node(last_event[1]) else None
    if last_own is None and last_event[0] == "own":  # a trailing assert on a dtype is no value
        for w in reversed(run):
            if w[0] == "child":
                break
            if _is_tensor_node(w[1]):
                last_own = w[1]
                break
    calls = [op for op in ops if op.kind == "call"]
    definite, maybe, torch_level = [], [], []
    for op in calls:
        target = _callee(op, module)
        if isinstance(target, torch.nn.Module):
            definite.append((op, first.get(id(target))))
        elif target is None and not op.self_rooted and not _torch_name(op.callee[-1] if op.callee else ""):
            maybe.append(op)
        else:
            torch_level.append(op)
    left = list(children)
    for op, path in definite:
        match = next((c for c in left if c[0] == path), None)
        if match is None:
            out[op.name] = f"{'.'.join(op.callee)} is not called here in the exported forward pass"
            continue
        left.remove(match)
        out[op.name] = ("child", *match)
    if maybe and len(left) == len(maybe):
        for op, match in zip(maybe, left):
            out[op.name] = ("child", *match)
        maybe = []
    elif left:
        for op in maybe:
            out[op.name] = "fxpatch cannot tell which module call on its line it is"
        maybe = []
    torch_level += maybe
    claimed = set()
    by_name: dict[str, list[SourceOp]] = {}
    unmatched = []
    for op in torch_level:
        name = (op.callee[-1] if op.callee else "").lstrip("_")
        name = _OP_ALIASES.get(name, name)
        graph_ops = [n for n in tensors if _op_name(n) == name]
        if graph_ops:
            by_name.setdefault(name, []).append(op)
        else:
            unmatched.append(op)
    for name, same in by_name.items():
        graph_ops = [n for n in tensors if _op_name(n) == name]
        if len(graph_ops) != len(same):
            for op in same:
                out[op.name] = f"its line has {len(graph_ops)} {name} ops in the graph for {len(same)} calls"
            continue
        for op, n in zip(same, graph_ops):
            out[op.name] = ("own", n)
            claimed.add(n)
    for op in unmatched:
        name = op.callee[-1] if op.callee else ""
        receiver = op.node.func.value if isinstance(op.node.func, ast.Attribute) else None
        inner = next((c.name for c in calls if c.node is receiver), None)
        if inner is not None and _torch_name(name) and not any(_op_name(n) == name.lstrip("_") for n in own):
            out[op.name] = out.get(inner, "its value is not readable")  # a no-op (x.contiguous()): its receiver
        elif any(_op_name(n) == _OP_ALIASES.get(name.lstrip("_"), name.lstrip("_")) for n in own):
            out[op.name] = "its value is not one tensor (a tuple or list), which fxpatch does not address"
        elif _torch_name(name):
            out[op.name] = f"no {name} op of its line is in the exported graph (it changed nothing)"
        elif len(unmatched) == 1 and op.whole_value and last_own is not None and last_own not in claimed:
            out[op.name] = ("own", last_own)  # a Python helper: its result is the statement's last op
        elif op.unpacked:
            out[op.name] = ("it returns a tuple that its line unpacks, and fxpatch could not wrap the call while "
                            f"exporting: {_unwrapped_why(module) or 'its result was not seen'}")
        else:
            out[op.name] = "a Python function call whose result fxpatch cannot single out in the graph"
    for op in ops:
        if op.kind != "assign":
            continue
        if isinstance(op.value, ast.Call):
            label = next((c.name for c in calls if c.node is op.value), None)
            out[op.name] = out.get(label, "its value is not readable")
        elif op.simple_target and last_own is not None:
            out[op.name] = ("own", last_own)
        else:
            out[op.name] = "its value is not a tensor op of the exported graph"
    return out


def _callee(op: SourceOp, module: torch.nn.Module) -> Any:
    """What ``self.a.b`` names on ``module`` (``None`` when the callee is not such a chain or is missing)."""
    if not op.self_rooted:
        return None
    obj: Any = module
    for part in op.callee[1:]:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            return None
    return obj if isinstance(obj, torch.nn.Module) else "not a module"


# --- showing it -----------------------------------------------------------------------------------------------


def format_source(src: ModuleSource) -> str:
    """NNsight's listing of a ``forward``: each line with the operations on it, ``->`` for those fxpatch
    reads and writes, ``-x`` for those it cannot (``ModuleSource.status`` says why)."""
    fs = src.forward
    if fs is None:
        return f"{src.path or 'model'}: {src.why}"
    names = fs.names
    width = max((len(n) for n in names), default=0)
    lines = fs.text.split("\n")
    by_line: dict[int, list[str]] = {}
    for op in fs.ops:  # NNsight numbers the lines after the first from 0
        by_line.setdefault(op.line - 2, []).append(op.name)
    out = [" " * (width + 6) + "* " + lines[0]]
    for i, line in enumerate(lines[1:]):
        ops = by_line.get(i)
        if not ops:
            out.append(" " * (width + 4) + f"{i:3d} {line}")
            continue
        for k, name in enumerate(ops):
            arrow = "-x" if name in src.status else "->"
            if k == 0:
                out.append(f" {name:{width}} {arrow}{i:3d} {line}")
            else:
                indent = " " * (len(line) - len(line.lstrip()))
                out.append(f" {name:{width}} {arrow}  + {indent}...")
    if src.status:
        out.append(f"(-x: fxpatch cannot read or write this operation; {len(src.status)} of {len(names)})")
    return "\n".join(out)


def module_sources(model: torch.nn.Module, saved: dict[str, tuple[str, dict[str, str]]]) -> dict[str, ModuleSource]:
    """The ``ModuleSource``s of a site graph read back from the disk cache: ``saved`` is ``path -> (why,
    status)`` as ``add_op_sites`` found them; the forwards' text is parsed again from the model's code (the
    cache key holds that code's digest, so it is the code the graph was exported from)."""
    from .export import module_paths

    modules = module_paths(model)[0]
    out = {}
    for path, (why, status) in saved.items():
        fs = forward_source(modules[path]) if not why and path in modules else why or "no such module"
        out[path] = (ModuleSource(path, fs, "", dict(status)) if isinstance(fs, ForwardSource)
                     else ModuleSource(path, None, fs))
    return out
