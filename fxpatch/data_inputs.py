"""Which Python numbers in a program are data (graph inputs) and which are structure.

A rewritten graph is cached by its program's structure (``runner.program_key``), so a number
baked into the program makes every new value a new graph. The numbers a researcher sweeps are
data: token positions and row ranges in a tensor index (``h[:, p]``, ``h[:, a:b]``,
``h[0, p] = v``) and scalars used as values (``h * scale``, ``h + 1.5``, ``h.fill_(v)``). Those
become placeholders of the program whose values are fed at run time, so traces that differ
only in them reuse one rewritten (and compiled) graph. The op still receives the same Python
number when it runs, so its meaning is exactly eager PyTorch's (an int index selects a view,
a float scalar does not promote the tensor's dtype).

Everything else stays structure: dims, sizes and shapes passed to ``view``/``reshape``/
``sum(dim=...)``, ``k`` of ``topk``, the element of a module's tuple output (``output[0]``), a
bare int or slice index (``h[3]``, ``h[1:3]``: on a tuple value these choose elements),
booleans, and ints in arithmetic (they may size things, as ``S - 1`` does).

Example::

    for p in range(10):                    # one rewritten graph for all ten traces
        with model.trace(prompt):
            model.transformer.h[3].output[:, p] = 0
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

# ops whose float arguments are values: positions in args that may hold one (kwargs by name)
_VALUE_OPS: dict[Any, tuple[tuple[int, ...], tuple[str, ...]]] = {}
for _op in (operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.iadd,
            operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
            torch.pow, torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.div,
            torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__sub__, torch.Tensor.__rsub__,
            torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__truediv__, torch.Tensor.__rtruediv__):
    _VALUE_OPS[_op] = ((0, 1), ("other", "alpha"))
_VALUE_METHODS = {name: ((1,), ("other", "alpha", "value")) for name in (
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "fill_", "masked_fill", "masked_fill_")}
_VALUE_METHODS.update({"masked_fill": ((2,), ("value",)), "masked_fill_": ((2,), ("value",))})
_VALUE_OPS[torch.full_like] = ((1,), ("fill_value",))
_VALUE_OPS[torch.Tensor.fill_] = ((1,), ("value",))
_VALUE_OPS[torch.Tensor.masked_fill] = ((2,), ("value",))
_VALUE_OPS[torch.Tensor.masked_fill_] = ((2,), ("value",))


# what may lift a number: the rest are recorded as they are without asking (most ops of a program)
LIFTING_FUNCTIONS = frozenset((operator.getitem, operator.setitem, *_VALUE_OPS))
LIFTING_METHODS = frozenset(_VALUE_METHODS)


def _is_float(v: Any) -> bool:
    return type(v) is float


def _is_int(v: Any) -> bool:
    return type(v) is int


def lift_data(op: str, target: Any, args: tuple, kwargs: dict, is_traced: Callable[[Any], bool],
              lift: Callable[[Any], Any]) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with the numbers that are data replaced by ``lift(number)``.

    ``is_traced(v)`` tells a traced value; ``lift`` makes the placeholder a number becomes.
    """
    if op == "call_function" and target in (operator.getitem, operator.setitem):
        if len(args) >= 2 and is_traced(args[0]) and isinstance(args[1], tuple):
            return (args[0], tuple(_lift_index(i, lift) for i in args[1]), *args[2:]), kwargs
        if len(args) >= 2 and isinstance(args[1], torch.Tensor) and is_traced(args[0]):  # a bare index: structure
            return (args[0], _as_int(args[1]), *args[2:]), kwargs
        return args, kwargs
    if op == "call_method":
        positions, names = _VALUE_METHODS.get(target, ((), ()))
    elif op == "call_function":
        positions, names = _VALUE_OPS.get(target, ((), ()))
    else:
        return args, kwargs
    # ``float in map(type, ...)``: the test in C, as most arithmetic is of two traced values (nothing to lift)
    if not positions or not (float in map(type, args) or (kwargs and float in map(type, kwargs.values()))):
        return args, kwargs
    if not any(is_traced(a) for a in (*args, *kwargs.values())):
        return args, kwargs
    args = tuple(lift(a) if i in positions and _is_float(a) else a for i, a in enumerate(args))
    kwargs = {k: lift(v) if k in names and _is_float(v) else v for k, v in kwargs.items()}
    return args, kwargs


def _as_int(i: Any) -> Any:
    """``i``, or the int a 0-d integer tensor of the user's holds, which eager torch indexes with as with that
    int (``h[:, torch.tensor(-1)]`` is ``h[:, -1]``); its value now, when the line runs, as NNsight reads it."""
    if isinstance(i, torch.Tensor) and i.dim() == 0 and i.dtype in INDEX_INTS:
        return int(i)
    return i


INDEX_INTS = frozenset((torch.int64, torch.int32, torch.int16, torch.int8))  # uint8 and bool index as masks


def _lift_index(i: Any, lift: Callable[[Any], Any]) -> Any:
    if _is_int(i):
        return lift(i)
    if isinstance(i, slice):
        if isinstance(i.start, torch.Tensor) or isinstance(i.stop, torch.Tensor) or isinstance(i.step, torch.Tensor):
            i = slice(_as_int(i.start), _as_int(i.stop), _as_int(i.step))
        if i.step is None:
            return slice(lift(i.start) if _is_int(i.start) else i.start,
                         lift(i.stop) if _is_int(i.stop) else i.stop)
        return i
    if isinstance(i, torch.Tensor):  # the ints and slices above first: most indices are those
        i = _as_int(i)
        return lift(i) if _is_int(i) else i
    return i
