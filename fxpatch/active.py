"""Which traces are recording in this thread (and asyncio task).

A stack per context (``contextvars``), innermost last, so that threads tracing
at the same time each see only their own traces.

Example::

    with model.trace("hello"):
        assert fxpatch.active.active_tracer().model is model
"""

from __future__ import annotations

import contextvars
from typing import Any

_ACTIVE: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar("fxpatch_active_traces", default=())


def active_tracer() -> Any | None:
    """The innermost trace being recorded in this thread, if any."""
    active = _ACTIVE.get()
    return active[-1] if active else None


def active_tracers() -> tuple[Any, ...]:
    """Every trace being recorded in this thread, outermost first."""
    return _ACTIVE.get()


def push(tracer: Any) -> None:
    _ACTIVE.set((*_ACTIVE.get(), tracer))


def remove(tracer: Any) -> None:
    _ACTIVE.set(tuple(t for t in _ACTIVE.get() if t is not tracer))
