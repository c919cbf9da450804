"""Exported site graphs kept on disk, so that another process loads them instead of exporting again.

An entry is one file, ``<cache dir>/exports/<sha256 of its key>.fxg``: a zip archive holding
``entry.json`` (the key, the graph, the graph's inputs and outputs, and every module's site
records) and the raw bytes of the export's tensor constants. The key says what the export
depends on besides weight values (weights are graph inputs): the model's classes and their
source, its config, module tree, train/eval modes, parameter and buffer names, shapes, dtypes,
devices and ties, the run mode's entry module and example inputs, and the versions of fxpatch
(and a hash of its source), torch, transformers, sympy and Python. The whole key is stored in
the entry and compared on load; a model with hooks of its own or a patched ``forward`` (code the
key cannot see) is never cached.

Why not ``torch.export.save``/``load``: in torch 2.13 ``torch.export.load`` unpickles what the
archive says to (``torch.load(weights_only=False)`` for tensor-subclass weights and constants and
as the fallback for the sample inputs, ``pickle.loads`` for opaque constants), evaluates the
archive's shape expressions with ``sympy.sympify`` (``eval``) and resolves call targets by
``getattr`` on any ``torch.*`` name; ``save`` writes every weight (500 MB for GPT-2 small); and
its loader takes two thirds of the export's time (GPT-2 small's forward graph: 8 s of CPU
against 12 s; this format: 1.1 s). Here nothing is unpickled or evaluated: nodes are JSON,
call targets resolve only to registered operators (``torch.ops.<namespace>.<op>.<overload>``)
or a fixed list of Python functions, shape
expressions are rebuilt from trees over a fixed list of sympy and torch functions, and tensor
constants are raw bytes with a dtype from torch's own list. Any entry that does not read back
cleanly (truncated, corrupt, stale, from another user) is ignored, exported again and replaced.

Entries are written to a temporary file in the same directory and moved into place with
``os.replace``: readers, and processes writing the same entry at once, see a whole entry or none.
A directory keeps its ``MAX_ENTRIES`` most recently used entries.

Example::

    model = LanguageModel(fxpatch.TINY_GPT2)                    # or cache_dir="/scratch/fxpatch"
    model.site_graph("forward").loaded_from                    # None: exported and written
    LanguageModel(fxpatch.TINY_GPT2).site_graph("forward").loaded_from   # '.../exports/3f2a...fxg'
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
import os
import sys
import tempfile
import time
import zipfile
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import sympy
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._sympy import functions as sympy_functions
from torch.utils._sympy.numbers import int_oo
from torch.utils._sympy.value_ranges import ValueRanges

from .export import ModuleSites, Opaque
from .structure import Spec
from .watch import code_of, function_of, own_hooks, plain_settings

log = logging.getLogger(__name__)

FORMAT = 3  # bump when the entry layout, or what an entry holds, changes (3: sites on every unpacked tuple)
ENV_VAR = "FXPATCH_CACHE_DIR"
MAX_ENTRIES = 200  # entries kept in a directory (0.3 MB for tiny GPT-2's, 1 MB for a 32-layer model's)


class Unsupported(Exception):
    """The graph holds something this format does not write: the export is not cached (never wrong)."""


# -- where -----------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$FXPATCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxpatch``, else ``~/.cache/fxpatch``.

    Example::

        os.environ["FXPATCH_CACHE_DIR"] = "/scratch/me/fxpatch"
        default_cache_dir()   # PosixPath('/scratch/me/fxpatch')
    """
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores a relative one
    return base / "fxpatch"


def entries_dir(cache_dir: str | os.PathLike | bool | None) -> Path | None:
    """The folder entries go in for a ``LanguageModel``'s ``cache_dir`` (``None``: the default; ``False``: none)."""
    if cache_dir is False:
        return None
    return (default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()) / "exports"


# -- the key ---------------------------------------------------------------------------------------------------------
@cache
def _package_digest() -> str:
    """A hash of fxpatch's own source: an edited fxpatch may export differently under the same version."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@lru_cache(maxsize=2048)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _source_digest(cls: type) -> str | None:
    """A hash of the file defining ``cls`` (a model edited in place, remote code), or None if it has none."""
    return _path_digest(_defining_file(cls))


def _defining_file(cls: type) -> str | None:
    return getattr(sys.modules.get(cls.__module__), "__file__", None)


def _name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _path_digest(path: str | None) -> str | None:
    """A hash of the file at ``path``, or None when there is none (a notebook's code, a frozen module)."""
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None
    return _file_digest(path, st.st_mtime_ns, st.st_size)


def _code_key(modules: list) -> list | None:
    """The functions held by the model's classes (and their bases) and by the Python modules defining
    them that come from another file than their holder's, each with a hash of that file; None when one
    has no file to hash (defined in a notebook). A monkeypatch (``GPT2MLP.forward = f``,
    ``modeling_gpt2.eager_attention_forward = f``) changes this, so a graph traced with other code is
    not found; an import (a function of another transformers file) is named the same every process."""
    classes, namespaces = code_of(modules)
    out = []
    for owner in (*classes, *namespaces):
        if isinstance(owner, type):
            name, own = _name(owner), _defining_file(owner)
        else:
            name, own = owner.__name__, getattr(owner, "__file__", None)
        for attr, value in vars(owner).items():
            f = function_of(value)
            if f is None or f.__code__.co_filename == own:
                continue
            digest = _path_digest(f.__code__.co_filename)
            if digest is None and (f.__module__ or "").partition(".")[0] in sys.stdlib_module_names:
                digest = "stdlib"  # frozen (``<frozen abc>``): the Python version is in the key
            if digest is None:
                return None
            out.append([name, attr, f"{f.__module__}:{f.__qualname__}", digest])
    return out


def _has_own_code(module: torch.nn.Module) -> bool:
    """Hooks or an instance-level ``forward``: code that runs in the export and that no key can name."""
    return bool(own_hooks(module) or "forward" in module.__dict__)


def _tensor_facts(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        return [list(t.shape), str(t.dtype), str(t.device)]
    if isinstance(t, (list, tuple)):
        return [_tensor_facts(x) for x in t]
    return repr(t)


def cache_key(model: torch.nn.Module, entry: torch.nn.Module, example: dict[str, Any], dynamic_shapes: Any,
              prefix: str) -> str | None:
    """What an export of ``entry`` (holding ``model``) depends on besides weight values, as canonical JSON;
    None when it depends on code no key can name (a hook, a patched ``forward``), so it must not be cached.

    Example::

        key = cache_key(hf_model, _Forward(hf_model, True), example, None, "model.")
        hashlib.sha256(key.encode()).hexdigest()   # the entry's file name
    """
    if own_hooks():
        return None
    modules, classes = [], {}
    for path, module in entry.named_modules(remove_duplicate=False):
        if _has_own_code(module):
            return None
        # the settings a forward reads (scale_attn_weights, eps, ...), training among them: set by the config
        # as a rule, but a user may change them, and a graph traced with others must not be found
        modules.append([path, _name(type(module)), plain_settings(module)])
        if _name(type(module)) not in classes:
            classes[_name(type(module))] = _source_digest(type(module))
            if classes[_name(type(module))] is None:
                return None  # a class with no source file (made in a notebook): its code may change unseen
    code = _code_key([module for _, module in entry.named_modules()])
    if code is None:
        return None  # a function with no file behind it (a notebook's patch): its code may change unseen
    first: dict[int, str] = {}
    params = [[name, list(p.shape), str(p.dtype), str(p.device), p.requires_grad, first.setdefault(id(p), name)]
              for name, p in entry.named_parameters(remove_duplicate=False)]
    buffers = []
    for path, module in entry.named_modules(remove_duplicate=False):
        for name, b in module._buffers.items():
            if b is not None:
                full = f"{path}.{name}" if path else name
                buffers.append([full, list(b.shape), str(b.dtype), str(b.device),
                                name not in module._non_persistent_buffers_set, first.setdefault(id(b), full)])
    config = getattr(model, "config", None)
    config_json = None
    if config is not None:
        try:
            config_json = json.loads(config.to_json_string(use_diff=False))
        except (TypeError, ValueError, AttributeError):
            return None
        config_json.pop("_name_or_path", None)  # where it was loaded from does not change the graph
        config_json["private"] = {k: v for k, v in sorted(vars(config).items()) if k.startswith("_")
                                  and k not in ("_name_or_path", "_commit_hash")
                                  and isinstance(v, (str, int, float, bool, type(None)))}
    import transformers

    from . import __version__

    key = {
        "format": FORMAT,
        "versions": {"fxpatch": __version__, "fxpatch_source": _package_digest(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "sympy": sympy.__version__,
                     "python": list(sys.version_info[:3])},
        "model": _name(type(model)),
        "entry": [_name(type(entry)), {k: v for k, v in sorted(vars(entry).items()) if not k.startswith("_")
                                       and isinstance(v, (str, int, float, bool, type(None)))}],
        "prefix": prefix,
        "config": config_json,
        "modules": modules,
        "sources": classes,
        "code": code,
        "parameters": params,
        "buffers": buffers,
        "example": {k: _tensor_facts(v) for k, v in example.items()},
        "dynamic_shapes": repr(dynamic_shapes),
    }
    try:
        return json.dumps(key, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return None


def entry_path(directory: Path, key: str) -> Path:
    return directory / f"{hashlib.sha256(key.encode()).hexdigest()}.fxg"


# -- values: JSON-tagged, decoded only into the types listed here ---------------------------------------------------
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_LAYOUTS = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_MEMORY_FORMATS = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.memory_format)}

# Python-level call targets an exported graph may hold (size arithmetic, tuple indexing)
_FUNCTIONS = {f"operator.{n}": getattr(operator, n) for n in (
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt", "le",
    "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift")}
_FUNCTIONS.update({f"math.{n}": getattr(math, n) for n in ("ceil", "floor", "trunc", "sqrt")})
_FUNCTIONS.update({f"torch.{n}": getattr(torch, n) for n in (
    "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum", "_sym_sqrt") if hasattr(torch, n)})
_FUNCTION_NAMES = {id(f): name for name, f in _FUNCTIONS.items()}

# sympy and torch functions shape expressions are built from
_EXPR_FUNCTIONS = {f"{c.__module__}.{c.__name__}": c for c in (
    sympy.Add, sympy.Mul, sympy.Pow, sympy.Max, sympy.Min, sympy.Eq, sympy.Ne, sympy.Lt, sympy.Le, sympy.Gt, sympy.Ge,
    sympy.And, sympy.Or, sympy.Not, sympy.Mod, sympy.floor, sympy.ceiling, sympy.Abs)}
_EXPR_FUNCTIONS.update({f"{c.__module__}.{c.__name__}": c for c in vars(sympy_functions).values()
                        if isinstance(c, type) and issubclass(c, sympy.Basic)
                        and c.__module__ == sympy_functions.__name__})


def _enc_expr(e: sympy.Basic, symbols: dict) -> Any:
    if e in (int_oo, -int_oo, sympy.oo, -sympy.oo):
        return {"inf": ("-" if e.is_extended_negative else "+") + ("int" if e in (int_oo, -int_oo) else "real")}
    if isinstance(e, sympy.Integer):
        return int(e)
    if isinstance(e, sympy.Symbol):
        symbols.setdefault(e.name, e)
        return {"s": e.name}
    if isinstance(e, sympy.Rational):
        return {"q": [int(e.p), int(e.q)]}
    if isinstance(e, sympy.Float):
        return {"fl": repr(float(e))}
    if e is sympy.true or e is sympy.false:
        return {"b": bool(e)}
    name = f"{type(e).__module__}.{type(e).__name__}"
    if _EXPR_FUNCTIONS.get(name) is not type(e):
        raise Unsupported(f"shape expression {e} uses {name}")
    return {"e": name, "a": [_enc_expr(a, symbols) for a in e.args]}


def _dec_expr(d: Any, symbols: dict[str, sympy.Symbol]) -> sympy.Basic:
    if isinstance(d, int) and not isinstance(d, bool):
        return sympy.Integer(d)
    if not isinstance(d, dict):
        raise ValueError(f"bad expression {d!r}")
    if "e" in d:
        return _EXPR_FUNCTIONS[d["e"]](*(_dec_expr(a, symbols) for a in d["a"]))
    (tag, v), = d.items()
    if tag == "s":
        return symbols[v]
    if tag == "inf":
        return {"+int": int_oo, "-int": -int_oo, "+real": sympy.oo, "-real": -sympy.oo}[v]
    if tag == "q":
        return sympy.Rational(int(v[0]), int(v[1]))
    if tag == "fl":
        return sympy.Float(float(v))
    if tag == "b":
        return sympy.true if v is True else sympy.false
    raise ValueError(f"unknown expression tag {tag!r}")


def _hints_of(env: ShapeEnv) -> dict:
    """A shape env's symbol -> hint table (``backed_var_to_val`` in torch 2.11 on, ``var_to_val`` in 2.9)."""
    table = getattr(env, "backed_var_to_val", None)
    return env.var_to_val if table is None else table


def _add_hint(env: ShapeEnv, symbol: sympy.Symbol, hint: int) -> None:
    """Give ``symbol`` its hint in ``env`` (``add_backed_var_to_val`` in torch 2.11 on, ``add_var_to_val`` in 2.9)."""
    add = getattr(env, "add_backed_var_to_val", None) or env.add_var_to_val
    add(symbol, hint)


class _Writer:
    """Encodes one graph; shape expressions are checked to decode to themselves."""

    def __init__(self):
        self.symbols: dict[str, sympy.Symbol] = {}
        self.hints: dict[str, int] = {}
        self.exprs: dict[sympy.Basic, Any] = {}

    def expr(self, e: sympy.Basic) -> Any:
        out = self.exprs.get(e)
        if out is None:
            out = _enc_expr(e, self.symbols)
            table = {n: sympy.Symbol(n, **s._assumptions_orig) for n, s in self.symbols.items()}
            if _dec_expr(out, table) != e:
                raise Unsupported(f"shape expression {e} does not decode to itself")
            self.exprs[e] = out
        return out

    def sym(self, s: Any) -> Any:
        if isinstance(s, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            node = s.node
            for free in node.expr.free_symbols:
                hint = _hints_of(node.shape_env).get(free)
                if hint is not None:
                    self.hints[free.name] = int(hint)
            tag = {torch.SymInt: "si", torch.SymFloat: "sf", torch.SymBool: "sb"}[type(s)]
            return {tag: self.expr(node.expr)}
        return self.value(s)

    def val(self, v: Any) -> Any:
        """A node's ``meta["val"]``."""
        if isinstance(v, torch.Tensor):
            if type(v).__name__ != "FakeTensor" or v.layout != torch.strided or v.is_sparse:
                raise Unsupported(f"a node value of type {type(v).__name__}")
            return {"T": [[self.sym(d) for d in v.shape], [self.sym(d) for d in v.stride()], str(v.dtype).removeprefix(
                "torch."), str(v.device), v.requires_grad]}
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return self.sym(v)
        if isinstance(v, (list, tuple)):
            return {"l" if isinstance(v, list) else "t": [self.val(x) for x in v]}
        return self.value(v)

    def value(self, a: Any, nodes: dict | None = None) -> Any:
        """An argument (``nodes`` given) or a plain constant."""
        if a is None or isinstance(a, (bool, int, str)):
            return a
        if isinstance(a, float):
            return a if math.isfinite(a) else {"f": repr(a)}
        if isinstance(a, torch.fx.Node):
            if nodes is None or a not in nodes:
                raise Unsupported("a node outside the graph")
            return {"n": a.name}
        if isinstance(a, (list, tuple)) and not hasattr(a, "_fields"):
            return {"l" if isinstance(a, list) else "t": [self.value(x, nodes) for x in a]}
        if isinstance(a, dict) and all(isinstance(k, str) for k in a):
            return {"d": [[k, self.value(v, nodes)] for k, v in a.items()]}
        if isinstance(a, torch.dtype):
            return {"dtype": str(a).removeprefix("torch.")}
        if isinstance(a, torch.device):
            return {"device": str(a)}
        if isinstance(a, torch.layout):
            return {"layout": str(a).removeprefix("torch.")}
        if isinstance(a, torch.memory_format):
            return {"mf": str(a).removeprefix("torch.")}
        raise Unsupported(f"an argument of type {type(a).__name__}")

    def target(self, node: torch.fx.Node) -> Any:
        t = node.target
        if node.op in ("placeholder", "output"):
            return t
        if node.op != "call_function":
            raise Unsupported(f"a {node.op} node")
        if isinstance(t, torch._ops.OpOverload):
            ns, name = t._schema.name.split("::")
            return {"op": [ns, name, t._overloadname]}
        name = _FUNCTION_NAMES.get(id(t))
        if name is None or _FUNCTIONS[name] is not t:
            raise Unsupported(f"a call to {t}")
        return {"fn": name}


_META_KEYS = ("stack_trace", "nn_module_stack", "torch_fn", "custom")  # besides "val", kept when JSON-able


def encode_graph(gm: torch.fx.GraphModule) -> dict:
    """``gm`` (an export's lifted graph) as JSON-able data; raises ``Unsupported`` for what the format lacks."""
    if type(gm.graph._codegen) is not torch.fx.graph.CodeGen or gm.meta.get("inline_constraints"):
        raise Unsupported("a graph with its own code generator or inline constraints")
    if any(True for _ in gm.named_children()) or any(True for _ in gm.named_buffers()) or \
            any(True for _ in gm.named_parameters()):
        raise Unsupported("a graph module holding modules or tensors")
    w = _Writer()
    seen: set = set()
    nodes = []
    for node in gm.graph.nodes:
        meta = {}
        if "val" in node.meta:
            meta["val"] = w.val(node.meta["val"])
        for k in _META_KEYS:
            if k in node.meta:
                try:
                    meta[k] = w.value(node.meta[k])
                except Unsupported:
                    pass  # descriptive only: fxpatch reads none of these
        nodes.append([node.op, node.name, w.target(node), w.value(node.args, seen), w.value(node.kwargs, seen), meta])
        seen.add(node)
    env = None
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor) and getattr(v, "fake_mode", None) is not None:
            env = v.fake_mode.shape_env
            break
    symbols = {}
    for name, s in w.symbols.items():
        vr = env.var_to_range.get(s) if env is not None else None
        symbols[name] = {"assumptions": s._assumptions_orig, "hint": w.hints.get(name),
                         "range": None if vr is None else [w.expr(vr.lower), w.expr(vr.upper)]}
    return {"nodes": nodes, "symbols": symbols}


class _Reader:
    """Decodes one graph: its symbols live in a new ShapeEnv and its values are fake tensors of it."""

    def __init__(self, symbols: dict):
        self.env = ShapeEnv(assume_static_by_default=True)
        self.mode = FakeTensorMode(allow_fallback_kernels=False, allow_non_fake_inputs=True, shape_env=self.env)
        self.symbols: dict[str, sympy.Symbol] = {}
        self.hints: dict[sympy.Symbol, int] = {}
        for name, facts in symbols.items():
            assumptions = facts["assumptions"]
            if not (isinstance(name, str) and name.isidentifier() and isinstance(assumptions, dict)
                    and all(k.isidentifier() and isinstance(v, bool) for k, v in assumptions.items())):
                raise ValueError(f"bad symbol {name!r}")
            s = self.symbols[name] = sympy.Symbol(name, **assumptions)
            if facts["hint"] is not None:
                self.hints[s] = sympy.Integer(int(facts["hint"]))
                _add_hint(self.env, s, int(facts["hint"]))
        for name, facts in symbols.items():
            if facts["range"] is not None:
                lo, hi = (_dec_expr(x, self.symbols) for x in facts["range"])
                # what constrain_symbol_range records, without its source-line lookup (which imports torch.export)
                self.env.var_to_range[self.symbols[name]] = ValueRanges(lo, hi)
        self.made: dict[str, Any] = {}

    def sym(self, d: Any) -> Any:
        if not isinstance(d, dict) or set(d) - {"si", "sf", "sb"}:
            return self.value(d)
        key = json.dumps(d, sort_keys=True)
        out = self.made.get(key)
        if out is None:
            (tag, enc), = d.items()
            expr = _dec_expr(enc, self.symbols)
            try:
                hint = expr.xreplace(self.hints)
                hint = (int if tag == "si" else float if tag == "sf" else bool)(hint) if hint.is_number or \
                    hint in (sympy.true, sympy.false) else None
            except (TypeError, ValueError):
                hint = None
            if tag == "si":
                out = int(expr) if expr.is_Integer else self.env.create_symintnode(expr, hint=hint)
            elif tag == "sf":
                out = self.env.create_symfloatnode(expr, hint=hint)
            else:
                out = self.env.create_symboolnode(expr)
            self.made[key] = out
        return out

    def val(self, d: Any) -> Any:
        if isinstance(d, dict) and "T" in d:
            sizes, strides, dtype, device, requires_grad = d["T"]
            # What FakeTensorMode makes for torch.empty_strided, without its dispatch: half the time
            meta = torch.empty_strided([self.sym(x) for x in sizes], [self.sym(x) for x in strides],
                                       dtype=_DTYPES[dtype], device="meta", requires_grad=bool(requires_grad))
            return FakeTensor(self.mode, meta, torch.device(device))
        if isinstance(d, dict) and set(d) & {"si", "sf", "sb"}:
            return self.sym(d)
        if isinstance(d, dict) and set(d) & {"l", "t"}:
            (tag, items), = d.items()
            out = [self.val(x) for x in items]
            return out if tag == "l" else tuple(out)
        return self.value(d)

    def value(self, d: Any, nodes: dict | None = None) -> Any:
        if d is None or isinstance(d, (bool, int, str, float)):
            return d
        (tag, v), = d.items()
        if tag == "n":
            return nodes[v]
        if tag in ("l", "t"):
            items = [self.value(x, nodes) for x in v]
            return items if tag == "l" else tuple(items)
        if tag == "d":
            return {str(k): self.value(x, nodes) for k, x in v}
        if tag == "f":
            return float({"inf": "inf", "-inf": "-inf", "nan": "nan"}[v])
        if tag == "dtype":
            return _DTYPES[v]
        if tag == "device":
            return torch.device(v)
        if tag == "layout":
            return _LAYOUTS[v]
        if tag == "mf":
            return _MEMORY_FORMATS[v]
        raise ValueError(f"unknown value tag {tag!r}")

    def target(self, op: str, t: Any) -> Any:
        if op in ("placeholder", "output"):
            if not isinstance(t, str):
                raise ValueError("bad target")
            return t
        if op != "call_function":
            raise ValueError(f"unknown node kind {op!r}")
        if "fn" in t:
            return _FUNCTIONS[t["fn"]]
        ns, name, overload = t["op"]
        if not all(isinstance(x, str) and x.isidentifier() for x in (ns, name, overload)) or ns.startswith("__"):
            raise ValueError(f"bad operator name {t['op']!r}")
        found = getattr(getattr(getattr(torch.ops, ns), name), overload)
        if not isinstance(found, torch._ops.OpOverload) or found._schema.name != f"{ns}::{name}" \
                or found._overloadname != overload:
            raise ValueError(f"{t['op']!r} is not a registered operator")
        return found


def decode_graph(data: dict) -> torch.fx.GraphModule:
    """The GraphModule ``encode_graph`` wrote: same nodes, names, targets and arguments, and fake-tensor values
    over the same symbols (sizes, hints and ranges) in a ShapeEnv of its own."""
    r = _Reader(data["symbols"])
    graph = torch.fx.Graph()
    nodes: dict[str, torch.fx.Node] = {}
    for op, name, target, args, kwargs, meta in data["nodes"]:
        node = graph.create_node(op, r.target(op, target), r.value(args, nodes), r.value(kwargs, nodes), name=name)
        if node.name != name:
            raise ValueError(f"node {name!r} came back as {node.name!r}")
        nodes[name] = node
        if "val" in meta:
            node.meta["val"] = r.val(meta["val"])
        for k in _META_KEYS:
            if k in meta:
                node.meta[k] = r.value(meta[k])
    graph.lint()
    gm = _LazyGraphModule(torch.nn.Module(), graph)
    gm.meta = {"inline_constraints": {}}
    return gm


# -- site records ---------------------------------------------------------------------------------------------------
def _enc_type(t: type | None) -> str | None:
    if t is None:
        return None
    if t in (tuple, list, dict):
        return t.__name__
    if "<" in t.__qualname__:
        raise Unsupported(f"container type {t.__qualname__}")
    return _name(t)


def _dec_type(name: str | None) -> type | None:
    if name is None:
        return None
    if name in ("tuple", "list", "dict"):
        return {"tuple": tuple, "list": list, "dict": dict}[name]
    module, qualname = name.split(":")
    obj: Any = sys.modules[module]  # only classes already imported (the model's own output types)
    for part in qualname.split("."):
        if part.startswith("_"):
            raise ValueError(f"bad type name {name!r}")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, (tuple, list, dict))):
        raise ValueError(f"{name!r} is not a container type")
    return obj


def _enc_spec(s: Spec) -> Any:
    if not all(type(k) in (int, str) for k in s.keys):
        raise Unsupported("a container key that is not an int or a str")
    return {"k": s.kind, "keys": list(s.keys), "c": [_enc_spec(c) for c in s.children], "ty": _enc_type(s.container)}


def _dec_spec(d: dict) -> Spec:
    if d["k"] not in ("leaf", "tuple", "list", "dict") or not all(type(k) in (int, str) for k in d["keys"]):
        raise ValueError("bad spec")
    return Spec(d["k"], tuple(d["keys"]), tuple(_dec_spec(c) for c in d["c"]), _dec_type(d["ty"]))


def _enc_leaf(leaf: Any, is_site: bool, w: _Writer) -> Any:
    if is_site:
        return leaf
    if isinstance(leaf, Opaque):
        return {"opaque": leaf.type_name}
    return {"c": w.value(leaf)}


def _dec_leaf(d: Any, is_site: bool, r: _Reader) -> Any:
    if is_site:
        if not isinstance(d, str):
            raise ValueError("a site leaf is its name")
        return d
    if "opaque" in d:
        return Opaque(str(d["opaque"]))
    return r.value(d["c"])


def encode_calls(calls: dict[str, dict[str, list[ModuleSites]]]) -> list:
    w = _Writer()
    return [[path, kind, [[_enc_spec(ms.spec), [_enc_leaf(x, f, w) for x, f in zip(ms.leaves, ms.is_site)],
                           list(ms.is_site), ms.module] for ms in per_call]]
            for path, kinds in calls.items() for kind, per_call in kinds.items()]


def decode_calls(data: list) -> dict[str, dict[str, list[ModuleSites]]]:
    r = _Reader({})
    calls: dict[str, dict[str, list[ModuleSites]]] = {}
    for path, kind, per_call in data:
        if kind not in ("inputs", "output"):
            raise ValueError("bad kind")
        calls.setdefault(str(path), {})[kind] = [
            ModuleSites(str(module), kind, _dec_spec(spec), [_dec_leaf(x, bool(f), r) for x, f in zip(leaves, flags)],
                        [bool(f) for f in flags])
            for spec, leaves, flags, module in per_call]
    return calls


# -- entries --------------------------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def save(directory: Path, key: str, parts: dict[str, Any]) -> Path | None:
    """Write an entry for ``key``: ``parts`` are ``graph_module``, ``state`` (``(kind, fqn or tensor)``),
    ``inputs``, ``outputs``, ``calls`` (first paths only), ``op_calls`` and ``sources`` (``.source``: each
    module's operations' sites, and ``path -> [why, status]``) and ``export_seconds``. Returns its path, or
    None when the graph holds something the format does not write (then nothing is written)."""
    try:
        constants, state = [], []
        for kind, ref in parts["state"]:
            if kind == "constant":
                if type(ref) not in (torch.Tensor, torch.nn.Parameter) or ref.layout != torch.strided:
                    raise Unsupported(f"a constant of type {type(ref).__name__}")
                state.append([kind, len(constants)])
                constants.append(ref)
            else:
                state.append([kind, ref])
        entry = {
            "format": FORMAT, "key": key, "graph": encode_graph(parts["graph_module"]), "state": state,
            "inputs": parts["inputs"], "outputs": parts["outputs"], "calls": encode_calls(parts["calls"]),
            "op_calls": encode_calls(parts["op_calls"]), "sources": parts["sources"],
            "export_seconds": parts["export_seconds"],
            "constants": [[list(t.shape), str(t.dtype).removeprefix("torch."), str(t.device)] for t in constants],
        }
        body = json.dumps(entry, separators=(",", ":")).encode()
    except Unsupported as e:
        log.info("fxpatch: not caching this export on disk: it holds %s", e)
        return None
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = entry_path(directory, key)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:16]}-", suffix=".tmp", dir=directory)  # 0600, this user's
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
                z.writestr("entry.json", body)
                for i, t in enumerate(constants):
                    z.writestr(f"constants/{i}", _tensor_bytes(t))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a reader sees the old entry or this one, never a part
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise
    prune(directory, MAX_ENTRIES)
    return path


def prune(directory: Path, keep: int) -> None:
    """Remove all but the ``keep`` most recently used entries (a load marks an entry used), and temporary
    files more than an hour old (a writer that died). An entry removed under another process's feet costs
    that process an export.

    Example::

        prune(entries_dir(None), 50)
    """
    now, entries = time.time(), []
    for p in directory.iterdir():
        with _suppress():
            st = p.stat()
            if p.suffix == ".fxg":
                entries.append((st.st_mtime_ns, p))
            elif p.suffix == ".tmp" and p.name.startswith(".") and now - st.st_mtime > 3600:
                p.unlink()
    for _, p in sorted(entries, reverse=True)[keep:]:
        with _suppress():
            p.unlink()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def _trusted(f) -> bool:
    """An entry this user wrote and no one else can change (the ssh rule): anything else is not read."""
    if not hasattr(os, "getuid"):
        return True
    st = os.fstat(f.fileno())
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def load(directory: Path, key: str) -> dict[str, Any] | None:
    """The parts ``save`` wrote for ``key`` (``graph_module``, ``state`` with constants as tensors, ``inputs``,
    ``outputs``, ``calls``, ``path``), or None when there is no entry or it does not read back cleanly:
    missing, truncated, corrupt, written for another key or format, or not this user's."""
    path = entry_path(directory, key)
    try:
        f = open(path, "rb")
    except OSError:
        return None
    try:
        with f:
            if not _trusted(f):
                log.warning("fxpatch: ignoring cache entry %s: it is not owned by this user or is writable by others",
                            path)
                return None
            with zipfile.ZipFile(f) as z:
                entry = json.loads(z.read("entry.json"))
                if entry.get("format") != FORMAT or entry.get("key") != key:
                    return None  # a stale entry, or (not seen yet) a hash collision: export again
                constants = []
                for i, (shape, dtype, device) in enumerate(entry["constants"]):
                    data = z.read(f"constants/{i}")
                    dt = _DTYPES[dtype]
                    t = (torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dt) if data
                         else torch.empty(0, dtype=dt))
                    constants.append(t.reshape([int(s) for s in shape]).to(torch.device(device)))
            state = []
            for kind, ref in entry["state"]:
                if kind == "constant":
                    state.append((kind, constants[ref]))
                elif kind in ("param", "buffer") and isinstance(ref, str):
                    state.append((kind, ref))
                else:
                    raise ValueError(f"bad state entry {kind!r}")
            gm = decode_graph(entry["graph"])
            placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
            inputs, outputs = [str(x) for x in entry["inputs"]], [str(x) for x in entry["outputs"]]
            returned = next(n for n in gm.graph.nodes if n.op == "output").args[0]
            if len(placeholders) != len(state) + len(inputs) or placeholders[len(state):] != inputs \
                    or len(returned) != len(outputs):
                raise ValueError("the graph's inputs or outputs do not match its signature")
            with _suppress():
                os.utime(path)  # used now: pruning keeps the most recently used entries
            return {"graph_module": gm, "state": state, "inputs": inputs, "outputs": outputs,
                    "calls": decode_calls(entry["calls"]), "op_calls": decode_calls(entry["op_calls"]),
                    "sources": {str(p): (str(why), {str(k): str(v) for k, v in status.items()})
                                for p, (why, status) in entry["sources"].items()},
                    "export_seconds": float(entry["export_seconds"]),
                    "path": str(path)}
    except Exception as e:  # noqa: BLE001 - whatever is wrong with it, the entry is rebuilt
        log.warning("fxpatch: cache entry %s is unreadable (%s: %s); exporting again", path, type(e).__name__, e)
        return None
