"""Keeping values past the end of a trace: ``.save()``, ``fxpatch.save(...)`` and
binding the saved values to the user's variables when the outermost block exits.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

from .errors import FxpatchError, user_location
from .module_values import SiteContainer, SiteDict
from .proxy import _UNSET, Proxy


def save(value: Any) -> Any:
    """Keep ``value`` after the trace: a proxy, or a list/dict that will collect proxies.

    Example::

        with model.generate("Hello", max_new_tokens=3) as tracer:
            hs = fxpatch.save([])
            for step in tracer.all():
                hs.append(model.transformer.h[-1].output[:, -1])
        # hs is a list of 3 tensors
    """
    if isinstance(value, (Proxy, SiteContainer)):
        return value.save()
    from .tracing import active_tracer

    tracer = active_tracer()
    if tracer is None:
        raise FxpatchError("fxpatch.save() was called outside a trace", at=user_location(),
                           hint="Call it inside `with model.trace(...)` or `with model.generate(...)`.")
    tracer.saved_containers.append(value)
    return value


def _replace_saved(value: Any, seen: set) -> Any:
    if isinstance(value, Proxy):
        return value.value if value.value is not _UNSET else value
    if id(value) in seen:
        return value
    if type(value) is list:
        seen.add(id(value))
        value[:] = [_replace_saved(v, seen) for v in value]
    elif type(value) is dict:
        seen.add(id(value))
        for k in list(value):
            value[k] = _replace_saved(value[k], seen)
    elif type(value) is tuple or isinstance(value, SiteContainer):
        # module values become plain containers of real values
        items = value.items() if isinstance(value, dict) else enumerate(value)
        new = [(k, _replace_saved(v, seen)) for k, v in items]
        if isinstance(value, SiteDict):
            return SiteDict(new)
        return (list if isinstance(value, list) else tuple)(v for _, v in new)
    return value


def bind_saved(frame, saved: list[Proxy]) -> None:
    """Replace saved proxies by their values in the variables of the trace's frame."""
    if frame is None or not saved:
        return
    local_vars = frame.f_locals
    is_module_level = local_vars is frame.f_globals
    changed = {}
    seen: set = set()
    for name, value in list(local_vars.items()):
        new = _replace_saved(value, seen)
        if new is not value:
            changed[name] = new
    if not changed:
        return
    for name, new in changed.items():
        local_vars[name] = new
    if sys.version_info < (3, 13) and not is_module_level:
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
