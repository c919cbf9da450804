"""``model.edit()``: interventions that apply to every later trace of the edited model.

As in NNsight 0.8, ``with model.edit() as (tracer, edited):`` records a block of interventions
without running anything, and stores it on ``edited``: a new model object (envoy tree) that shares
the wrapped module, its weights, its exported graphs and its graph cache with ``model``, whose own
behaviour does not change. ``with model.edit(inplace=True) as tracer:`` stores it on ``model``
itself. ``model.clear_edits()`` drops a model's stored edits. Edits stack, oldest first.

In fxpatch an edit is a recorded program: every later ``trace``, ``generate`` or ``scan`` of the
edited model starts with the edit's program, as an invoke of all the batch's rows that comes before
the trace's own invokes (NNsight runs edits first), so a trace reads the edited values and its own
writes come after the edit's. The rewritten graph of edit plus trace is cached like any other, so
traces of one program reuse it. In ``generate`` the edit applies to the prompt pass (step 0), as an
edit's interventions without ``tracer.iter`` do in NNsight; with ``tracer.stop()`` in a trace, the edit's
interventions after the stop point do not happen. An edit block has no prompt, its values
cannot be ``.save()``d (NNsight drops them), and ``tracer.stop()``, ``module.skip()`` and
``tracer.cache()`` are refused in it.

Example::

    with model.edit() as (tracer, edited):
        edited.transformer.h[0].output[:, -1] = 0
    with edited.trace("Hello world"):
        h = edited.transformer.h[0].output.save()      # last position zero
    with model.trace("Hello world"):
        h = model.transformer.h[0].output.save()       # unchanged
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx.node import map_arg

from .errors import FxpatchError, user_location
from .inputs import NO_INPUTS
from .passes.diagnostics import Location
from .passes.ops import read_site, write_site
from .saving import unmount_save
from .tracing import Invoker, Tracer


@dataclass
class Edit:
    """One stored edit: the program its block recorded and where the block was."""

    program: torch.fx.Graph
    loc: Location


class _NoSaves(list):
    """The saved values of an edit block: an edit is not run, so nothing it computes can be kept."""

    def append(self, value: Any) -> None:
        raise FxpatchError("a value was saved inside model.edit(); an edit does not run, it stores its "
                           "interventions for later traces, so its values are never computed here",
                           at=user_location(),
                           hint="Read and .save() the value in a trace of the edited model instead.")


def edited_copy(model: Any) -> Any:
    """A new model object over the same wrapped module (weights, exports and graph cache shared) with its
    own list of edits, starting with ``model``'s."""
    copy = object.__new__(type(model))
    copy.__dict__.update(model.__dict__)
    object.__setattr__(copy, "_lm", copy)  # its envoys trace the copy
    object.__setattr__(copy, "_children", {})  # and are its own (Envoy._child keeps them per parent)
    object.__setattr__(copy, "_edits", list(model.__dict__.get("_edits", ())))
    return copy


class EditTracer(Tracer):
    """``model.edit(inplace=False)``: records interventions into an edit instead of running them.

    Entering it gives ``(tracer, edited)``, or the tracer alone with ``inplace=True``; the block is
    written as a trace's body with no invoke (its interventions cover every row). See ``fxpatch/edit.py``.

    Example::

        with model.edit(inplace=True) as tracer:
            model.transformer.h[1].mlp.output *= 0.5
        model.clear_edits()
    """

    kind = "edit"

    def __init__(self, model: Any, inplace: bool = False):
        self.inplace = bool(inplace)
        super().__init__(model if self.inplace else edited_copy(model))
        self.saved = _NoSaves()
        self.saved_containers = _NoSaves()
        self._edit_invoke = Invoker(self, NO_INPUTS, self.loc)

    def __enter__(self) -> Any:
        super().__enter__()
        self._edit_invoke.__enter__()
        return self if self.inplace else (self, self.model)

    def __exit__(self, exc_type, exc, tb) -> bool:
        unmount_save(self)
        self.current_invoke = None
        if exc_type is not None:
            self._close()
            return False
        try:
            self._store()
        finally:
            self._close()
        return False

    def _store(self) -> None:
        for b in self.barriers:
            b.check()
        refused = [("tracer.stop()", loc) for _, _, loc in self.stops]
        refused += [(f"{module}.skip()", loc) for (_, module), skips in self.skips.items() for _, loc in skips]
        if refused:
            what, loc = refused[0]
            raise FxpatchError(f"{what} is not supported in model.edit(): an edit changes values, it does not "
                               "change which modules run", at=loc,
                               hint="Use it in the trace itself, or assign the module's output in the edit.")
        if "caches" in self._edit_invoke.__dict__:
            raise FxpatchError("tracer.cache() is not supported in model.edit(): an edit's values are never "
                               "kept", at=self._edit_invoke.__dict__["caches"][0].loc,
                               hint="Call tracer.cache() in a trace of the edited model.")
        edits = self.model.__dict__.get("_edits")
        if edits is None:
            edits = []
            object.__setattr__(self.model, "_edits", edits)
        edits.append(Edit(self.program_of(0), self.loc))

    def invoke(self, inputs: Any = NO_INPUTS, **kwargs: Any) -> Invoker:
        raise FxpatchError("model.edit() has no invokes: its interventions apply to every row of every later "
                           "trace", at=user_location(), hint="Write the interventions directly in the edit block.")


def replay_edits(tracer: Tracer) -> None:
    """Record ``tracer.model``'s stored edits at the start of ``tracer``'s prompt-pass program, each as
    an invoke of every row (called when the trace starts recording)."""
    edits = tracer.model.__dict__.get("_edits")
    if not edits or isinstance(tracer, EditTracer):
        return
    outer = tracer.current_invoke
    try:
        for k, edit in enumerate(edits):
            invoke = Invoker(tracer, NO_INPUTS, edit.loc)
            invoke.index = -1 - k  # not one of the trace's own invokes
            tracer.current_invoke = invoke
            _replay(tracer, edit.program)
    finally:
        tracer.current_invoke = outer


def _replay(tracer: Tracer, program: torch.fx.Graph) -> None:
    """Record ``program``'s ops into ``tracer``'s phase 0, each timed as the trace times its own
    (the point of the forward pass it waits for is the site's position in the trace's graph)."""
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in program.nodes:
        loc = node.meta.get("fxpatch_loc")
        if node.op == "placeholder":  # a tensor from outside the edit block
            value = node.meta["fxpatch_value"]
            env[node] = tracer._input(0, value, loc, value=value)
            continue
        at = -1
        if node.target in (read_site, write_site):
            try:
                at = tracer._position(node.args[0])
            except KeyError:
                raise FxpatchError(f"the edit reads or writes {node.args[0]}, which the model's "
                                   f"{tracer.mode} pass does not compute", at=loc,
                                   hint="Edit values of modules that run in this pass.") from None
        args = map_arg(node.args, env.__getitem__)
        kwargs = map_arg(node.kwargs, env.__getitem__)
        new = tracer.record(node.op, node.target, args, kwargs, phase=0, at=at).node
        for key in ("fxpatch_loc", "fxpatch_site"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
        new.meta["fxpatch_edit"] = True
        env[node] = new


def drop_edits_after_stop(tracer: Tracer) -> None:
    """With ``tracer.stop()``, the edits' ops that would wait for a point of the forward pass after the stop
    never run (in NNsight the edit waits for a value the model never computes), so they are removed."""
    if not tracer.stops or 0 not in tracer.programs:
        return
    point = min(p for p, _, _ in tracer.stops)
    program = tracer.programs[0]
    for node in reversed(list(program.nodes)):  # users first: an op's users come after it and are no earlier
        if node.meta.get("fxpatch_edit") and node.meta.get("fxpatch_time", -1) > point and not node.users:
            program.erase_node(node)
