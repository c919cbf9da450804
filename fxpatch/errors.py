"""The errors fxpatch raises, and how it finds the user's line.

Every error for a user mistake is an ``FxpatchError`` whose message starts
with the user's ``file:line`` and ends with what to do instead::

    try:
        with model.trace("hello"):
            model.transformer.hh[0].output.save()
    except fxpatch.errors.ModulePathError as e:
        print(e)   # demo.py:3: GPT2Model has no module 'hh' ... did you mean 'h'?
"""

from __future__ import annotations

import functools
import linecache
import os
import sys

import torch

from .passes.diagnostics import FlowError, FxpatchError, Location, ShapeError

__all__ = [
    "BarrierError", "ControlFlowError", "FlowError", "FxpatchError", "GradientError", "InputError", "Location",
    "MissingDependencyError", "ModuleNotRunError", "ModulePathError", "ProxyScopeError", "ShapeError", "SourceOpError",
    "user_location",
]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_SKIP_DIRS = (_PACKAGE_DIR, os.path.dirname(os.path.abspath(torch.__file__)))
_USER_FILES = (os.path.join(_PACKAGE_DIR, "cli.py"),)  # the demo is user code


@functools.lru_cache(maxsize=4096)  # every recorded op asks for its frames' files: once per file is enough
def _is_internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return (path.startswith(_SKIP_DIRS) and path not in _USER_FILES) or filename.startswith("<frozen")


class ModulePathError(FxpatchError, AttributeError):
    """A module path that does not exist in the model."""


class SourceOpError(FxpatchError, AttributeError):
    """An operation of ``module.source`` that does not exist, or that fxpatch cannot read or write."""


class ModuleNotRunError(FxpatchError):
    """A module that exists but does not run in the forward pass."""


class BarrierError(FxpatchError):
    """A barrier called by fewer or more invokes than it was made for."""


class ControlFlowError(FxpatchError, TypeError):
    """Python control flow, ``.item()`` or ``len()`` on a value that only exists in the run."""


class ProxyScopeError(FxpatchError, RuntimeError):
    """A traced value used outside the trace it belongs to."""


class InputError(FxpatchError, ValueError):
    """Prompts or inputs that cannot be run."""


class GradientError(FxpatchError, RuntimeError):
    """A ``.grad`` or ``with loss.backward():`` that cannot run as written (order, grad mode, what is read)."""


class MissingDependencyError(FxpatchError, ImportError):
    """An optional package that a feature needs (an extra of fxpatch: ``fxpatch[plot]``) is not installed."""


def user_location(depth: int = 1) -> Location:
    """The innermost calling line outside fxpatch and torch."""
    frame = sys._getframe(depth)
    while frame is not None and _is_internal(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return Location("<unknown>", 0)
    key = (frame.f_code.co_filename, frame.f_lineno)
    loc = _LOCATIONS.get(key)
    if loc is None:  # a program's lines come back every trace of a loop: read each line once
        if len(_LOCATIONS) >= 10_000:
            _LOCATIONS.clear()
        loc = _LOCATIONS[key] = Location(key[0], key[1], linecache.getline(*key).strip())
    return loc


_LOCATIONS: dict[tuple[str, int], Location] = {}  # (file, line) -> its Location (immutable)
