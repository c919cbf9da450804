"""``model.session()``: several traces that share values without ``.save()``.

As in NNsight 0.8, the session, not each trace, is where values must be saved to be kept:
inside ``with model.session():`` a traced value a trace leaves in a variable (or in a list,
dict or tuple held by one) is a real tensor once that trace has run, so Python code between
the traces and later traces use it as any tensor. When the session ends, the variables of the
block that hold such a value and were not ``.save()``d hold the traced value again, whose use
is a ``ProxyScopeError`` that says it was not saved (NNsight unbinds them: a ``NameError``).
fxpatch runs each trace at its own exit, as NNsight runs a local session; plain Python values
made in the block (``n = 5``, a tensor computed between traces) stay, where NNsight drops every
unsaved variable.

Example::

    with model.session():
        with model.trace("The Eiffel Tower is in"):
            h = model.transformer.h[0].output            # no .save()
        with model.trace("_ _ _ _ _ _"):
            model.transformer.h[0].output[:, -1] = h[:, -1]
            logits = model.lm_head.output.save()
    logits.shape   # kept; h is not
"""

from __future__ import annotations

import contextvars
import sys
from typing import Any

from . import active
from .errors import FxpatchError, user_location
from .passes.diagnostics import Location
from .proxy import _UNSET, Proxy
from .saving import _SCAN_LIMIT, proxies_in  # larger containers are not searched for traced values

_SESSIONS: contextvars.ContextVar[tuple[Session, ...]] = contextvars.ContextVar("fxpatch_sessions", default=())


def active_session() -> Session | None:
    """The innermost session open in this thread, if any."""
    sessions = _SESSIONS.get()
    return sessions[-1] if sessions else None


class Session:
    """``model.session()``: a block whose traces pass values to each other without ``.save()``.

    Only values ``.save()``d in a trace (or passed to ``fxpatch.save``) are kept after the block;
    the others it unbinds (see the module docstring). Traces of any model may be in one session.

    Example::

        with model.session() as session:
            with model.trace(prompt):
                h = model.transformer.h[1].output
            with model.trace(prompt):
                model.transformer.h[1].output = h * 2
                out = model.lm_head.output.save()
    """

    def __init__(self, model: Any = None):
        self.model = model
        self.loc: Location = user_location(2)
        self.kept: list[Proxy] = []  # values kept for the session only
        self.saved_ids: dict[int, Any] = {}  # values fxpatch.save(...) kept past the session (held, so ids stay theirs)
        self._frame = None
        self._token = None

    def __enter__(self) -> Session:
        if active.active_tracer() is not None:
            raise FxpatchError("a session was opened inside a trace", at=self.loc,
                               hint="Open `with model.session():` first and the traces inside it.")
        if self._token is not None:
            raise FxpatchError("this session is already open", at=self.loc,
                               hint="Open a new one: `with model.session():`.")
        self._frame = sys._getframe(1)
        self._token = _SESSIONS.set((*_SESSIONS.get(), self))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self._unbind_unsaved()
        finally:
            _SESSIONS.reset(self._token)
            self._frame = None
        return False

    # -- what the traces keep ----------------------------------------------------------------
    def keep(self, tracer: Any, frame: Any) -> None:
        """Keep every value of ``tracer`` that ``frame``'s variables reach (called at the trace's exit,
        before it runs): they get real values when it has run, as saved values do."""
        if frame is None:
            return
        seen: set[int] = set()
        for name, value in list(frame.f_locals.items()):
            if name.startswith("__"):
                continue
            for proxy in proxies_in(value, seen, _SCAN_LIMIT):
                if proxy.tracer is tracer and not proxy.saved and proxy.value is _UNSET:
                    proxy.save()
                    self.kept.append(proxy)

    def note_saved(self, value: Any) -> None:
        """``fxpatch.save(value)`` in the session: ``value`` stays after it."""
        self.saved_ids[id(value)] = value

    def _unbind_unsaved(self) -> None:
        frame = self._frame
        kept = {id(p) for p in self.kept}
        tracers = {id(p.tracer): p.tracer for p in self.kept}
        # a value that a .save()d proxy holds too is saved
        saved = {id(p.value) for t in tracers.values() for p in t.saved if id(p) not in kept}
        unbind: dict[int, Proxy] = {}
        for proxy in self.kept:
            value = proxy.value
            if value is _UNSET or id(value) in self.saved_ids or id(value) in saved:
                continue
            unbind[id(value)] = proxy
        for proxy in unbind.values():
            object.__setattr__(proxy, "value", _UNSET)
            object.__setattr__(proxy, "saved", False)
            proxy.tracer.__dict__["session_loc"] = self.loc  # its use says the session ended
        if frame is None or not unbind:
            return
        local_vars = frame.f_locals
        changed = {}
        seen: set[int] = set()
        for name, value in list(local_vars.items()):
            new = _replace(value, unbind, seen)
            if new is not value:
                changed[name] = new
        if changed:
            from .tracing import set_frame_locals

            set_frame_locals(frame, changed)


def _replace(value: Any, unbind: dict[int, Proxy], seen: set[int]) -> Any:
    """``value`` with the session's unsaved values put back as their proxies (lists and dicts in place)."""
    proxy = unbind.get(id(value))
    if proxy is not None:
        return proxy
    if not isinstance(value, (list, dict, tuple)) or id(value) in seen:
        return value
    seen.add(id(value))
    if isinstance(value, dict):
        for k, v in list(value.items()):
            new = _replace(v, unbind, seen)
            if new is not v:
                value[k] = new
        return value
    new = [_replace(v, unbind, seen) for v in value]
    if all(a is b for a, b in zip(new, value)):
        return value
    if isinstance(value, tuple):
        return type(value)(new) if type(value) is tuple else value
    value[:] = new
    return value
