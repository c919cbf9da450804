"""NNsight's run control in a trace: ``tracer.result``, ``tracer.stop()`` and ``module.skip(value)``.

In fxpatch the graph that runs computes only what the program needs: a trace drops the model's own
outputs (logits), so dead-code elimination removes every op after the last value the program
reads or writes. The model's output is computed when ``model.output``, ``lm_head.output`` or
``tracer.result`` is read, and not otherwise. ``tracer.stop()`` adds NNsight's contract on top:
the code after it in the block does not run, and a value the model would compute after the point
the stopping invoke reached is an error to read anywhere.

``module.skip(value)``: the module's output, for the invoke's rows, is ``value``, and sites inside
the module are errors to read or write in that invoke. When every invoke skips the module (as
NNsight requires), the runner gives the module's output sites a stand-in of the right shape (see
``passes/strip_sites.py``), so the module's own computation is dead code and does not run. fxpatch
also accepts a skip in some invokes only: those rows get ``value``, the others the module's
output, and the module still runs for the batch.

Example::

    with model.trace("The Eiffel Tower is in") as tracer:
        model.transformer.h[0].skip(model.transformer.h[0].input)
        h1 = model.transformer.h[1].output.save()
        tracer.stop()
"""

from __future__ import annotations

from typing import Any

from .errors import FxpatchError, Location, ModuleNotRunError, user_location
from .model_values import typed_output
from .module_values import build_container
from .passes.ops import read_site, write_site
from .proxy import Proxy
from .structure import flatten, unflatten


class StopTrace(Exception):  # noqa: N818 - control flow, not an error: NNsight's EarlyStopException
    """Raised by ``tracer.stop()``; the invoke and the trace that made it end their code quietly."""

    def __init__(self, tracer):
        super().__init__("tracer.stop()")
        self.tracer = tracer


def is_stop(exc: BaseException | None, tracer) -> bool:
    """Whether ``exc`` is ``tracer``'s own ``tracer.stop()``."""
    return isinstance(exc, StopTrace) and exc.tracer is tracer


def skipped_module(path: str) -> None:
    """Program marker: every invoke skips the module at ``path`` (runs as a no-op)."""
    return None


def trace_result(tracer) -> Any:
    """``tracer.result`` of a trace: the model's output, the invoke's rows or the whole batch."""
    loc = user_location()
    if tracer.finished:
        raise FxpatchError("tracer.result is only available inside the trace block", at=loc,
                           hint="Read tracer.result inside the block and .save() it.")
    tracer._check_recording(loc)
    if tracer.current_invoke is not None:
        value = tracer.read("", "output")
    else:
        sites = tracer.module_sites("", "output", "output")[0]
        leaves = [_whole_batch(tracer, name) if is_site else name for name, is_site in zip(sites.leaves, sites.is_site)]
        value = unflatten(sites.spec, leaves, build_container)
    return typed_output(tracer, "", value)


def _whole_batch(tracer, name: str) -> Proxy:
    proxy = tracer.record("call_function", read_site, (name, 0, None), {}, phase=tracer.phase,
                          at=tracer._position(name))
    proxy.node.meta["fxpatch_site"] = name
    return proxy


def stop(tracer) -> None:
    """``tracer.stop()``: note where the forward pass ends and end the code of the block (or invoke)."""
    loc = user_location()
    tracer._check_recording(loc)
    if tracer.mode != "forward":
        raise FxpatchError(f"tracer.stop() ends a forward pass; model.{tracer.kind}() does not support it", at=loc,
                           hint="Use it in model.trace(...); in generate, max_new_tokens sets how far it runs.")
    invoke = tracer.current_invoke
    if invoke is not None:
        point, source = invoke.clock.get(tracer.phase, (-1, None))
        tracer.stops.append((point, source, loc))
    raise StopTrace(tracer)


def skip_module(tracer, path: str, value: Any) -> None:
    """``module.skip(value)``: in the current invoke the module does not run and ``value`` is its output."""
    loc = user_location()
    name = path or "the model"
    if tracer.mode != "forward":
        raise FxpatchError(f"{name}.skip() is supported in model.trace() and model.scan(), not in "
                           f"model.{tracer.kind}()", at=loc,
                           hint="Skip the module in a trace; in generate, assign its output instead "
                           "(module.output = value), which keeps its key/value cache.")
    invoke = tracer._require_invoke(f"{name}.skip()")
    if not path:
        raise FxpatchError("the model itself cannot be skipped", at=loc, hint="Skip one of its modules.")
    sg = tracer.model.site_graph(tracer.mode)
    sites = tracer.module_sites(path, "output", "output")[0]
    module = sg.aliases.get(path, path)
    if len(sg.calls.get(module, {}).get("output", ())) > 1:
        raise FxpatchError(f"{path} runs more than once in the forward pass; fxpatch skips only modules that run "
                           "once", at=loc, hint="Assign its output instead (module.output = value).")
    key = (tracer.phase, module)
    if any(i == invoke.index for i, _ in tracer.skips.get(key, ())):
        raise FxpatchError(f"{path} is skipped twice in this invoke", at=loc, hint="Call .skip() once per invoke.")
    start = _first_inside(sg, module)
    point, source = invoke.clock.get(tracer.phase, (-1, None))
    if point >= start:
        site, read_at = source if source is not None else ("", None)
        raise FxpatchError(
            f"{path}.skip() comes after this invoke waited for {site or 'a value'}, which the model computes "
            f"once {path} has started running", at=loc, also=[("read at", read_at)] if read_at else [],
            hint=f"Call {path}.skip(...) before reading values inside or after {path} in this invoke.")
    leaves, spec = flatten(value)
    for _, leaf in leaves:
        if isinstance(leaf, Proxy) and leaf.tracer is tracer and not tracer.finished \
                and leaf.node.meta.get("fxpatch_time", -1) >= start:
            where = leaf.node.meta.get("fxpatch_time_source") or ("a later value", None)
            raise FxpatchError(
                f"the value given to {path}.skip() is computed from {where[0]}, which exists only once {path} has "
                "run", at=loc, also=[("read at", where[1])] if where[1] else [],
                hint=f"Skip {path} with a value computed before it (its .input, an earlier module's output, or a "
                "tensor).")
    targets = list(zip(sites.leaves, sites.is_site))
    if sites.spec.kind == "leaf":
        values = [value]
    elif spec.kind != sites.spec.kind or len(leaves) != len(targets):
        raise FxpatchError(
            f"{path}'s output is a {sites.spec.kind} of {len(targets)} values, but .skip() was given a "
            f"{'single value' if spec.kind == 'leaf' else f'{spec.kind} of {len(leaves)}'}", at=loc,
            hint=f"Give a value of the output's structure (read {path}.output in another trace to see it).")
    else:
        values = [leaf for _, leaf in leaves]
    for (target, is_site), new in zip(targets, values):
        if is_site:
            tracer.write_site(tracer.site_ref(target, invoke), new)
        elif new is not target and new != target:
            raise FxpatchError(f"{path}'s output holds {target!r} there, which .skip() cannot replace by {new!r}",
                               at=loc, hint="Keep that element as it is.")
    tracer.skips.setdefault(key, []).append((invoke.index, loc))


def _first_inside(sg, module: str) -> int:
    """The position of the first site the model computes once ``module`` runs: its own outputs and every
    value of a module inside it."""
    from .runner import chains_of

    position = chains_of(sg).position
    inside = [n for n in position if _owner(sg, n) == module and _kind(sg, n) == "output"
              or _owner(sg, n).startswith(module + ".")]
    return min(position[n] for n in inside)


def _owner(sg, name: str) -> str:
    try:
        return sg.owner(name)[0]
    except KeyError:
        return ""


def _kind(sg, name: str) -> str:
    try:
        return sg.owner(name)[1]
    except KeyError:
        return ""


def finish_program(tracer) -> None:
    """Before the run: refuse values the program needs past a ``tracer.stop()`` or inside a skipped
    module, and mark the modules every invoke skips."""
    sg = tracer.model.site_graph(tracer.mode) if (tracer.stops or tracer.skips) else None
    if tracer.stops:
        point, source, stop_loc = min(tracer.stops, key=lambda s: s[0])
        for node in tracer.program_of(0).nodes:
            if node.target in (read_site, write_site) and tracer._position(node.args[0]) > point:
                what = "read" if node.target is read_site else "written"
                reached = f" at {source[0]}" if source else " before the model computes anything"
                raise FxpatchError(
                    f"{node.args[0]} is {what}, but the forward pass stops{reached} (tracer.stop() at the line "
                    "below), before the model computes it", at=node.meta["fxpatch_loc"],
                    also=[("stopped at", stop_loc)],
                    hint="Read it in the invoke before tracer.stop(), or call tracer.stop() after the last value "
                    "you need.")
    for (phase, module), skips in tracer.skips.items():
        skipping = {i for i, _ in skips}
        for node in tracer.program_of(phase).nodes:
            if node.target not in (read_site, write_site) or node.meta.get("fxpatch_invoke") not in skipping:
                continue
            if _owner(sg, node.args[0]).startswith(module + "."):
                skip_loc = next(loc for i, loc in skips if i == node.meta["fxpatch_invoke"])
                raise ModuleNotRunError(
                    f"{node.args[0]} is inside {module}, which this invoke skips, so it is never computed",
                    at=node.meta["fxpatch_loc"], also=[("skipped at", skip_loc)],
                    hint=f"Read it in an invoke that does not skip {module}, or remove the skip.")
        if skipping >= {invoke.index for invoke in tracer.invokes}:
            _mark(tracer.program_of(phase), module, phase, skips[0][1])


def _mark(program, module: str, phase: int, loc: Location) -> None:
    node = program.create_node("call_function", skipped_module, (module,), {})
    node.meta.update(fxpatch_loc=loc, fxpatch_invoke=None, fxpatch_phase=phase, fxpatch_time=-1,
                     fxpatch_time_source=None)
