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


_SCAN_LIMIT = 10_000  # containers larger than this are searched only if fxpatch.save() registered them


def _replace_saved(value: Any, seen: set, registered: set) -> Any:
    """``value`` with saved proxies replaced by their values; lists and dicts are changed in place."""
    if isinstance(value, Proxy):
        return value.value if value.value is not _UNSET else value
    if isinstance(value, SiteContainer):  # a module's tuple/dict value becomes a plain one of real values
        items = value.items() if isinstance(value, dict) else enumerate(value)
        new = [(k, _replace_saved(v, seen, registered)) for k, v in items]
        if isinstance(value, SiteDict):
            return getattr(value, "_bound", SiteDict)(new)  # a ModelOutput is bound as its own class
        return (list if isinstance(value, list) else tuple)(v for _, v in new)
    if type(value) not in (list, dict, tuple) or id(value) in seen:
        return value
    if len(value) > _SCAN_LIMIT and id(value) not in registered:
        return value
    seen.add(id(value))
    if type(value) is dict:
        for k, v in value.items():
            new = _replace_saved(v, seen, registered)
            if new is not v:
                value[k] = new
        return value
    new = [_replace_saved(v, seen, registered) for v in value]
    if all(a is b for a, b in zip(new, value)):
        return value
    if type(value) is tuple:
        return tuple(new)
    value[:] = new
    return value


def bind_saved(frame, saved: list[Proxy], containers: list[Any] = ()) -> None:
    """Replace saved proxies by their values in the variables of the trace's frame.

    ``containers`` (registered with ``fxpatch.save``) get their values wherever they are.
    """
    seen: set = set()
    registered = {id(c) for c in containers}
    for container in containers:
        _replace_saved(container, seen, registered)
    if frame is None or not saved:
        return
    local_vars = frame.f_locals
    is_module_level = local_vars is frame.f_globals
    changed = {}
    for name, value in list(local_vars.items()):
        new = _replace_saved(value, seen, registered)
        if new is not value:
            changed[name] = new
    if not changed:
        return
    for name, new in changed.items():
        local_vars[name] = new
    if sys.version_info < (3, 13) and not is_module_level:
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
