"""A read at a position computed in the trace (``h[:, logits.argmax()]``), as eager torch reads it.

Eager torch indexes with a 0-d integer tensor as with its int. fxpatch checks and rewrites a program
before the model runs, when that int does not exist yet, so ``select`` at it cannot be checked (torch's
fake tensors call it data-dependent). The same read as ``index_select`` at the position, then
``squeeze``, has shapes that do not depend on the value, and gives the same values: a negative
position counts from the end (``torch.where(p < 0, p + size, p)``), one out of range is an error
when the model runs, as in eager torch.

Example::

    with model.trace("The Eiffel Tower is in"):
        p = model.transformer.h[0].output[0].norm(dim=-1).argmax()   # a traced 0-d position
        h = model.transformer.h[5].output[:, p].save()               # index_select at p, then squeeze
"""

from __future__ import annotations

from typing import Any

import torch

from .data_inputs import INDEX_INTS
from .fake_values import fake_of


def read_at_traced_positions(value, index: Any, is_proxy) -> Any | None:
    """``value[index]`` recorded with ``index_select`` at each traced 0-d integer position of ``index`` (the
    rest: ints and slices of numbers); ``None`` where ``index`` is anything else (recorded as written)."""
    items = index if type(index) is tuple else (index,)
    traced = [k for k, item in enumerate(items) if is_proxy(item)]
    if not traced or not isinstance(fake_of(value), torch.Tensor):  # a module's tuple: recorded as written
        return None
    for k, item in enumerate(items):
        if k in traced:
            fake = fake_of(item)
            if not isinstance(fake, torch.Tensor) or fake.dim() != 0 or fake.dtype not in INDEX_INTS:
                return None
        elif not (type(item) is int or (type(item) is slice
                                          and not any(map(is_proxy, (item.start, item.stop, item.step))))):
            return None
    # the numbers and slices first (the traced dims kept whole), then each traced position from the last,
    # at the dim it has once the ints before it are gone
    rest = tuple(slice(None) if k in traced else item for k, item in enumerate(items))
    out = value[rest if type(index) is tuple else rest[0]]
    for k in reversed(traced):
        dim = sum(1 for item in items[:k] if type(item) is not int)
        position = items[k]
        position = torch.where(position < 0, position + out.size(dim), position)
        out = out.index_select(dim, position.reshape(1)).squeeze(dim)
    return out
