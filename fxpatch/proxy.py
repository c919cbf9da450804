"""``Proxy``: a value recorded inside a trace.

Inside a ``with model.trace(...)`` block nothing runs: indexing, arithmetic,
tensor methods and ``torch.*`` functions on a proxy add nodes to the trace's
program. After the outermost block exits, every proxy that was ``.save()``d is
replaced, in the user's variables, by its real value.

Example::

    with model.trace("The Eiffel Tower is in") :
        h = model.transformer.h[-1].output          # Proxy
        top = h[:, -1].norm(dim=-1).save()          # Proxy, saved
    print(top)                                      # tensor([...])
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx.node import map_aggregate

from .errors import ControlFlowError, ProxyScopeError, user_location
from .fake_values import iterate, length_of

_UNSET = object()


class Proxy:
    """A recorded value: a node of a trace's program.

    ``site`` is ``(site name, start, stop)`` when the proxy is a read of a
    module's value, so that assigning to that element of a module's tuple
    output replaces it. Everything else (views, in-place writes, aliasing)
    is recorded as written and given torch's own meaning when the program
    is functionalized.
    """

    __slots__ = ("node", "tracer", "site", "saved", "value", "_owner", "__weakref__")

    def __init__(self, node: torch.fx.Node, tracer, site=None):
        # through the slots' own setters: a recorded op makes one proxy, and object.__setattr__ costs
        # twice as much
        _NODE_SET(self, node)
        _TRACER_SET(self, tracer)
        _SITE_SET(self, site)
        _SAVED_SET(self, False)
        _VALUE_SET(self, _UNSET)
        _OWNER_SET(self, None)
        if not tracer.finished:  # every proxy of a recording trace, for saving.keep_appended's count of references
            tracer.proxies.append(self)

    # -- recording -----------------------------------------------------------------
    def _record(self, op: str, target: Any, args: tuple, kwargs: dict | None = None, **extra) -> Proxy:
        return self.tracer.record(op, target, args, kwargs or {}, **extra)

    def save(self) -> Proxy:
        """Keep this value: after the trace, the variable holding it is the real value."""
        self.tracer.check_live(self)
        object.__setattr__(self, "saved", True)
        self.tracer.saved.append(self)
        return self

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        tracer = _find_tracer(args, kwargs)
        if func is torch.Tensor.__setitem__:
            raise ProxyScopeError(
                "a traced value was assigned into a real tensor, which would need its value now",
                at=user_location(), hint="Do the assignment on a traced value (a module's .output or a "
                "value computed from it), or .save() the value and assign after the trace.")
        return tracer.record("call_function", func, tuple(args), dict(kwargs or {}))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if name in _TENSOR_METHODS and not self.tracer.finished:
            return MethodProxy(self, name, user_location())
        attribute = self._record("call_function", getattr, (self, name))
        object.__setattr__(attribute, "_owner", self)  # so h.add_(1) can write back into h
        return attribute

    def __call__(self, *args, **kwargs) -> Proxy:
        # ``h.sum`` is recorded as getattr(h, "sum"); calling it becomes a method call.
        node = self.node
        if node.target is getattr and len(node.args) == 2:
            owner = self._owner
            if not node.users:
                node.graph.erase_node(node)
            name = node.args[1]
            if owner is not None:
                return owner._method_call(name, args, kwargs)
            return self._record("call_method", name, (Proxy(node.args[0], self.tracer), *args), kwargs)
        return self._record("call_function", operator.call, (self, *args), kwargs)

    def _method_call(self, name: str, args: tuple, kwargs: dict) -> Proxy:
        """``self.name(*args, **kwargs)`` recorded as a method call; an in-place one (``add_``) writes into
        this value and returns it."""
        if name.endswith("_") and not name.endswith("__"):
            return self._in_place(name, args, kwargs)
        return self._record("call_method", name, (self, *args), kwargs)

    def _in_place(self, name: str, args: tuple, kwargs: dict) -> Proxy:
        """``h.add_(1)``, ``h.zero_()``: recorded as the in-place op it is; returns ``h``, as torch does."""
        self._record("call_method", name, (self, *args), kwargs)
        return self

    # -- gradients (fxpatch/gradients.py) ------------------------------------------------
    @property
    def grad(self) -> Proxy:
        """Inside ``with loss.backward():``, the gradient reaching this value (a module value: its invoke's
        rows; a value computed in the trace: its own tensor's); assigning it replaces the gradient that flows
        on. Module values' are read in the reverse of the forward order."""
        from .gradients import read_grad

        return read_grad(self)

    @grad.setter
    def grad(self, value: Any) -> None:
        from .gradients import write_grad

        write_grad(self, value)

    def requires_grad_(self, requires_grad: bool = True) -> Proxy:
        """Autograd records the uses of this value from here on, as torch's ``requires_grad_`` (on a module
        value, the model's use of it: a frozen model's activations then get gradients; on a value computed
        in the trace and written into the model, integrated gradients' form); returns the value."""
        from .gradients import record_requires_grad

        return record_requires_grad(self, requires_grad)

    @property
    def requires_grad(self) -> Proxy:
        """The value's ``requires_grad`` (a traced bool); assigning it follows torch (leaves only)."""
        return self._record("call_function", getattr, (self, "requires_grad"))

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        from .gradients import record_set_requires_grad

        record_set_requires_grad(self, value)

    def retain_grad(self) -> None:
        """As torch's: backward passes fill this value's ``.grad`` (read it on the saved value after the
        trace); on a value computed in the trace."""
        from .gradients import record_retain_grad

        record_retain_grad(self)

    def backward(self, gradient: Any = None, retain_graph: bool | None = None, create_graph: bool = False,
                 inputs: Any = None):
        """``with loss.backward():`` records a backward pass of this value, run after the forward pass;
        its block may read and assign ``.grad`` of module values (torch's arguments, NNsight's syntax)."""
        if self.tracer.finished:
            return self.tracer.check_live(self, user_location()).backward(gradient, retain_graph, create_graph,
                                                                          inputs)
        from .gradients import BackwardBlock

        return BackwardBlock(self, gradient, retain_graph, create_graph, inputs, user_location())

    def __getitem__(self, index) -> Proxy:
        if type(index) is Proxy or (type(index) is tuple and Proxy in map(type, index)):
            from .traced_index import read_at_traced_positions

            read = read_at_traced_positions(self, index, lambda v: type(v) is Proxy)
            if read is not None:
                return read
        return self._record("call_function", operator.getitem, (self, index))

    def __setitem__(self, index, value) -> None:
        """``h[index] = value`` writes into ``h`` (and so into every tensor it is a view of)."""
        self._record("call_function", operator.setitem, (self, index, value))

    # -- values that only exist when the model runs -------------------------------------
    def _no_python_value(self, what: str, hint: str):
        raise ControlFlowError(
            f"{what} needs the value of a traced tensor, which does not exist until the model runs "
            "after the `with` block", at=user_location(), hint=hint)

    def __bool__(self):
        self._no_python_value(
            "Python control flow (if/while/and/or/not) on a traced value",
            "Use tensor operations instead (torch.where(cond, a, b), masks), or .save() the value "
            "and branch on it after the trace.")

    def item(self):
        self._no_python_value(".item()", "Keep it a tensor inside the trace (x.sum(), x[..., 0]), "
                              "or .save() it and call .item() after the trace.")

    def tolist(self):
        self._no_python_value(".tolist()", ".save() the value and call .tolist() after the trace.")

    def __int__(self):
        self._no_python_value("int()", "Keep it a tensor inside the trace, or .save() it and convert after "
                              "the trace.")

    def __float__(self):
        self._no_python_value("float()", "Keep it a tensor inside the trace, or .save() it and convert after "
                              "the trace.")

    def __index__(self):
        self._no_python_value("Using a traced value as a Python index",
                              "Index with tensors (torch.gather, x[idx_tensor]) or constants.")

    # -- lengths known while recording --------------------------------------------------
    def __len__(self) -> int:
        """The length when it is known while recording: of a module's tuple output, a ``torch.Size``
        (the rank), a ``split`` / ``chunk`` / ``unbind``, or dim 0 of a tensor (an invoke's rows)."""
        if self.tracer.finished:
            return len(self.tracer.check_live(self, user_location()))
        return length_of(self, "len()")

    def __iter__(self):
        """Unpacking a value of known length: ``q, k, v = x.split(n, dim=2)``, ``values, indices = x.max(-1)``,
        ``B, S, H = x.shape`` (plain ints where known now; the padded width stays a traced int, which
        is an int in your variables after the trace)."""
        if self.tracer.finished:
            return iter(self.tracer.check_live(self, user_location()))
        return iterate(self)

    def __repr__(self) -> str:
        if self.value is not _UNSET:
            return repr(self.value)
        return f"Proxy({self.node.name}{' saved' if self.saved else ''})"

    def __hash__(self):
        return id(self)


class MethodProxy(Proxy):
    """``h.sum``, a tensor method read from a traced value: calling it (``h.sum(-1)``) records one method
    call, as reading the attribute and then calling it would after the read is dropped. The attribute
    itself (a ``getattr``) is recorded only if it is used as a value, at its line.
    """

    __slots__ = ("_name", "_loc")

    def __init__(self, owner: Proxy, name: str, loc):
        for slot, value in (("tracer", owner.tracer), ("site", None), ("saved", False), ("value", _UNSET),
                            ("_owner", owner), ("_name", name), ("_loc", loc)):
            object.__setattr__(self, slot, value)

    @property
    def node(self) -> torch.fx.Node:
        try:
            return _NODE.__get__(self)
        except AttributeError:  # first used as a value: the attribute read is recorded now
            node = self.tracer.record("call_function", getattr, (self._owner, self._name), {}, loc=self._loc).node
            _NODE.__set__(self, node)
            return node

    def __call__(self, *args, **kwargs) -> Proxy:
        try:
            _NODE.__get__(self)
        except AttributeError:
            return self._owner._method_call(self._name, args, kwargs)
        return super().__call__(*args, **kwargs)


_NODE = Proxy.node  # the slot holding a proxy's node
_NODE_SET, _TRACER_SET, _SITE_SET, _SAVED_SET, _VALUE_SET, _OWNER_SET = (
    vars(Proxy)[slot].__set__ for slot in ("node", "tracer", "site", "saved", "value", "_owner"))


def _tensor_methods() -> frozenset[str]:
    """Names of ``torch.Tensor``'s methods (not its properties), less those a proxy defines itself and the
    fields of torch's named tuples (``x.max(-1).values`` reads a field, though ``Tensor.values`` is a method)."""
    import inspect
    import types

    names = set()
    for name in dir(torch.Tensor):
        if name.startswith("__"):
            continue
        static = inspect.getattr_static(torch.Tensor, name, None)
        if isinstance(static, (types.FunctionType, types.MethodDescriptorType, types.BuiltinFunctionType,
                               types.WrapperDescriptorType, types.BuiltinMethodType)):
            names.add(name)
    fields = {name for kind in vars(torch.return_types).values() if isinstance(kind, type) and issubclass(kind, tuple)
              for name in dir(kind) if not name.startswith(("_", "n_")) and not hasattr(tuple, name)}
    return frozenset(names - set(dir(Proxy)) - fields)


_TENSOR_METHODS = _tensor_methods()


def _find_tracer(args, kwargs):
    found = []
    map_aggregate((args, kwargs or {}), lambda v: found.append(v) if isinstance(v, Proxy) else None)
    if found:
        return found[0].tracer
    raise ProxyScopeError("a torch function was called with traced values it cannot find", at=user_location())


def _binary(op, reflected=False):
    def method(self, other):
        args = (other, self) if reflected else (self, other)
        return self._record("call_function", op, args)
    return method


def _unary(op):
    def method(self):
        return self._record("call_function", op, (self,))
    return method


def _augmented(method: str):
    def in_place(self, other):
        return self._in_place(method, (other,), {})
    return in_place


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
              "lshift", "rshift"):
    _op = getattr(operator, _name if _name not in ("and", "or") else _name + "_")
    setattr(Proxy, f"__{_name}__", _binary(_op))
    setattr(Proxy, f"__r{_name}__", _binary(_op, reflected=True))
# ``h += 1`` changes h in place (and the model, when h is a module's value), as on a tensor
for _name, _method in (("add", "add_"), ("sub", "sub_"), ("mul", "mul_"), ("truediv", "div_"),
                       ("pow", "pow_"), ("and", "bitwise_and_"), ("or", "bitwise_or_")):
    setattr(Proxy, f"__i{_name}__", _augmented(_method))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(Proxy, f"__{_name}__", _binary(getattr(operator, _name)))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(Proxy, f"__{_name}__", _unary(getattr(operator, _name)))
