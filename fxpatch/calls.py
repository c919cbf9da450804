"""Which call of a module a read takes, when the forward calls it more than once.

A module the forward calls more than once (a weight-shared block, a module
applied in a loop) has one value per call (``SiteGraph.calls``). fxpatch numbers
them as NNsight 0.8 does: outside ``tracer.iter`` every read is the module's
first call (call 0). In step ``k`` of ``for _ in tracer.iter[...]`` the body's
first read takes call ``k`` of its module; for ``k > 0`` the reads after it in
that step follow the model: each takes the first call of its module at or
after the call read before it (NNsight's relaxed rule; a module run once is
then its only call). At step 0 every read is call 0. A module reached by
several paths (``h[1]`` is ``h[0]``) is one module: any path reads its calls.
Where NNsight would cut the loop short with a warning (a call the model does
not make), fxpatch raises ``FxpatchError`` at the read, before the model runs.

Example::

    with model.trace(prompt) as tracer:      # transformer.h[0] runs twice per forward
        outs = fxpatch.save([])
        for _ in tracer.iter[0:2]:
            outs.append(model.transformer.h[0].output)   # call 0, then call 1
    with model.trace(prompt) as tracer:
        for _ in tracer.iter[1]:
            model.transformer.h[0].mlp.output[:] = 0     # the mlp's second call only
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import FxpatchError, user_location
from .passes.diagnostics import Location

if TYPE_CHECKING:
    from .export import ModuleSites
    from .tracing import Tracer


@dataclass
class Pin:
    """Which call the reads of one ``tracer.iter`` step take (NNsight's mediator ``iteration``)."""

    call: int | None  # the call the next read takes; None once relaxed: reads follow the model
    anchor: int = -1  # position of the call read last in this step (where NNsight's worker is parked)
    anchor_name: str = ""  # that read, for messages
    first: list | None = None  # every call of the module the step read first (ends an open loop)


class CallSelection:
    """``tracer.iter[...]`` in a trace: ``for k in tracer.iter[1]`` reads call ``k`` of a module.

    Takes a call (``[1]``), a slice (``[0:2]``, ``[1:]``: to the last call of the
    module the body reads first) or a list of calls (``[[0, 1]]``).

    Example::

        with model.trace(prompt) as tracer:
            for _ in tracer.iter[1]:
                second = model.transformer.h[0].output.save()
    """

    def __init__(self, tracer: Tracer):
        self.tracer = tracer

    def __getitem__(self, index: int | slice | list[int]) -> CallLoop:
        loc = user_location()
        if isinstance(index, slice) and all(isinstance(i, int) or i is None for i in (index.start, index.stop)):
            if index.step not in (None, 1):
                raise FxpatchError(f"tracer.iter[...] takes no slice step (got {index.step!r}); NNsight ignores it",
                                   at=loc, hint="List the calls instead, e.g. tracer.iter[[0, 2]].")
            start = index.start or 0
            calls = None if index.stop is None else list(range(start, index.stop))
            numbers = [start] + ([] if index.stop is None else [index.stop])
        elif isinstance(index, int) and not isinstance(index, bool):
            start, calls, numbers = index, [index], [index]
        elif isinstance(index, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in index):
            start, calls, numbers = 0, list(index), list(index)
        else:
            raise FxpatchError(f"tracer.iter[...] takes a call, a slice or a list of calls, not {index!r}", at=loc,
                               hint="Use tracer.iter[1], tracer.iter[0:2] or tracer.iter[[0, 1]].")
        if any(i < 0 for i in numbers):
            raise FxpatchError(f"tracer.iter[{_index_text(index)}] counts from the end, but a trace numbers a "
                               "module's calls from 0 and takes no negative index (NNsight refuses it too)", at=loc,
                               hint="Use tracer.iter[k] for call k (0 is the first), or tracer.all() for every call.")
        return CallLoop(self.tracer, start, calls, loc)


class CallLoop:
    """``for k in tracer.iter[...]``: records the body once per call ``k``, the body's first read pinned to it."""

    def __init__(self, tracer: Tracer, start: int, calls: list[int] | None, loc: Location):
        self.tracer, self.start, self.calls, self.loc = tracer, start, calls, loc

    def __iter__(self):
        t = self.tracer
        t._check_recording(self.loc)
        if t.current_invoke is None:
            raise FxpatchError("tracer.iter[...] was used outside an invoke", at=self.loc,
                               hint="Loop inside `with tracer.invoke(...)` (or use model.trace(prompt)); the "
                               "loop picks calls for that invoke's reads.")
        outer = t.pin
        try:
            for k in self.calls if self.calls is not None else itertools.count(self.start):
                pin = t.pin = Pin(k)
                yield k
                # an open loop ends after the last call of the module its body reads first (NNsight's ends
                # there too, by a warning); a body that reads no module would loop forever
                if self.calls is None and (pin.first is None or k + 1 >= len(pin.first)):
                    break
        finally:
            t.pin = outer


def pick_call(tracer: Tracer, path: str, kind: str, per_call: list[ModuleSites], loc: Location | None = None) -> int:
    """Which call of the module at ``path`` a read of its ``kind`` takes now: NNsight's occurrence of it.

    ``per_call`` is ``SiteGraph.calls[path][kind]``; ``loc`` the user's line, when the caller has it.
    """
    if tracer.phase > 0 and len(per_call) > 1:
        sg = tracer.model.site_graph(tracer.mode)
        where, runs = _naming(sg, path, kind, per_call)
        # NNsight counts occurrences across generation steps: its tracer.iter[k] is step k // n, call k % n
        raise FxpatchError(
            f"{where} comes from a module that runs {runs} per generation step; NNsight numbers its calls "
            "across the steps (tracer.iter[k] is not step k for it), which fxpatch does not do",
            at=loc or user_location(),
            hint="Read that module in the prompt pass (outside tracer.iter), or in model.trace(...) with "
            "tracer.iter[k] for its call k.")
    pin = tracer.pin
    if pin.first is None:
        pin.first = per_call
    if pin.call == 0:
        return 0  # outside tracer.iter (or in its step 0) every read is of call 0, and never relaxes to another
    sg = tracer.model.site_graph(tracer.mode)
    where, runs = _naming(sg, path, kind, per_call)
    loc = loc or user_location()
    positions = _positions(tracer, sg, per_call)
    if pin.call is not None:
        call = pin.call
        if call >= len(per_call):
            raise FxpatchError(
                f"tracer.iter asks for call {call} of {where}, but the module runs {runs} in the forward pass "
                "(NNsight would cut the loop short here with a warning)", at=loc,
                hint=f"Loop over calls 0 to {len(per_call) - 1}: tracer.iter[0:{len(per_call)}], or tracer.all().")
        if call > 0:  # NNsight: once a pinned step k > 0 is reached, the step's other reads follow the model
            pin.call = None
    else:
        later = [k for k, p in enumerate(positions) if p is None or p >= pin.anchor]
        if not later:
            raise FxpatchError(
                f"{where} has no call left after {pin.anchor_name}, read before it in this tracer.iter step: the "
                f"module runs {runs}, all earlier (NNsight would cut the loop short here with a warning)", at=loc,
                hint="In a tracer.iter step, read modules in the order the model runs them after the step's "
                "first read, or read this one first in a step of its own.")
        call = later[0]
    if positions[call] is not None:
        pin.anchor, pin.anchor_name = positions[call], f"call {call} of {where}"
    return call


def _naming(sg, path: str, kind: str, per_call: list) -> tuple[str, str]:
    """How errors name a module's value and how often the module runs."""
    where = f"{path}.{kind}" if path else kind
    if path in sg.aliases:
        where += f" (the same module as {sg.aliases[path]})"
    return where, "once" if len(per_call) == 1 else f"{len(per_call)} times"


def _positions(tracer: Tracer, sg, per_call: list) -> list[int | None]:
    """``_position`` of each call, made once per site graph and module value."""
    cache = sg.__dict__.setdefault("_call_positions", {})
    entry = cache.get(id(per_call))
    if entry is None or entry[0] is not per_call:
        entry = cache[id(per_call)] = (per_call, [_position(tracer, sites) for sites in per_call])
    return entry[1]


def _position(tracer: Tracer, sites: ModuleSites) -> int | None:
    """Where one call's inputs or output is in the forward pass (None: it holds no tensor)."""
    names = [n for n, is_site in zip(sites.leaves, sites.is_site) if is_site]
    return min(tracer._position(n) for n in names) if names else None


def _index_text(index: Any) -> str:
    if isinstance(index, slice):
        return ":".join("" if i is None else str(i) for i in (index.start, index.stop))
    return repr(list(index)) if isinstance(index, (list, tuple)) else repr(index)
