"""The ``trace`` context: recording a program of invokes, then running it once.

``Tracer`` is what ``model.trace(...)`` returns. Inside its block,
``tracer.invoke(prompt)`` adds rows to the batch and module accesses record a
program (a ``torch.fx.Graph`` of reads, writes and user ops, each tagged with
the user's line). At the exit of the block the program is checked, rewritten
into the model's exported graph and run as one batched pass; saved values are
then bound to the user's variables.

Example::

    with model.trace() as tracer:
        with tracer.invoke("The Eiffel Tower is in the city of"):
            clean = model.transformer.h[2].output[:, -1].save()
        with tracer.invoke("The Colosseum is in the city of"):
            model.transformer.h[2].output[:, -1] = clean
            logits = model.lm_head.output[:, -1].save()

A module the forward calls more than once is read at its first call;
``for _ in tracer.iter[k]`` addresses call ``k`` (``fxpatch/calls.py``).
"""

from __future__ import annotations

import ctypes
import functools
import operator
import sys
from typing import Any

import torch
from torch.fx.node import map_aggregate

from . import active
from .active import active_tracer
from .calls import CallLoop, CallSelection, Pin, pick_call
from .control import finish_program, is_stop
from .data_inputs import LIFTING_FUNCTIONS as _LIFTING_FUNCTIONS
from .data_inputs import LIFTING_METHODS as _LIFTING_METHODS
from .data_inputs import lift_data
from .errors import (
    BarrierError,
    FlowError,
    FxpatchError,
    InputError,
    ModuleNotRunError,
    ProxyScopeError,
    user_location,
)
from .gradients import check_before_run, refuse_module_access
from .inputs import NO_INPUTS, to_rows
from .module_values import build_container
from .passes.diagnostics import Location
from .passes.ops import read_site, write_site
from .proxy import _UNSET, Proxy
from .runner import chains_of, inserted_nodes, run_trace
from .saving import bind_saved, keep_appended, mount_save, scope_of, unmount_save
from .session import active_session
from .structure import unflatten


class Invoker:
    """One ``tracer.invoke(...)``: the rows of the batch its interventions apply to.

    An invoke with no inputs applies to every row of the batch.
    """

    def __init__(self, tracer: Tracer, inputs: Any, loc: Location):
        self.tracer, self.inputs, self.loc = tracer, inputs, loc
        self.index = len(tracer.invokes)
        self.rows: list[list[int]] = []
        self.start, self.stop = 0, None
        self.clock: dict[int, tuple] = {}  # phase -> (latest point of the forward pass waited for, its read)

    def __enter__(self) -> Invoker:
        t = self.tracer
        t._check_recording(self.loc)
        if t.shortcut and self is not t._shortcut_invoke:
            raise FxpatchError(f"model.{t.kind}(inputs) already makes one invoke of its inputs", at=self.loc,
                               hint=f"Use either model.{t.kind}(prompt) or model.{t.kind}() with "
                               "tracer.invoke(...).")
        if t.current_invoke is not None:
            raise FxpatchError("tracer.invoke() was opened inside another invoke", at=self.loc,
                               hint="Close the first invoke before opening the next; invokes do not nest.")
        if self.inputs is not NO_INPUTS:
            self.rows = to_rows(self.inputs, t.model.tokenizer, self.loc, *t.input_limits())
            self.start = sum(len(i.rows) for i in t.invokes)
            self.stop = self.start + len(self.rows)
        t.invokes.append(self)
        t.current_invoke = self
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if "caches" in self.__dict__ and (exc_type is None or is_stop(exc, self.tracer)):
            # tracer.cache(): read when the invoke's code ends
            from .cache import record_caches

            record_caches(self)
        self.tracer.current_invoke = None
        return False


class Barrier:
    """``tracer.barrier(n)``: a point where ``n`` invokes meet, once per call.

    Each participating invoke may call it several times; their k-th calls
    meet (NNsight's semantics). fxpatch orders a program by its data flow, so
    the barrier does not change what runs, but it does what NNsight's threads
    do with shared variables: after an invoke's k-th call, a local variable
    that holds a value another invoke computed holds the value it had at that
    invoke's k-th call (the IOI pattern: a loop over layers assigns
    ``hidden_state`` and calls a barrier; the patching invoke reads
    ``hidden_state`` after its own call of it).
    """

    def __init__(self, tracer: Tracer, n: int, loc: Location):
        if not isinstance(n, int) or n < 1:
            raise BarrierError(f"a barrier needs a positive number of invokes, got {n!r}", at=loc,
                               hint="Create it as tracer.barrier(2) for two invokes.")
        self.tracer, self.n, self.loc = tracer, n, loc
        self.calls: list[tuple[int, Location]] = []
        self.rounds: dict[int, dict[int, dict[str, Proxy]]] = {}  # call k -> invoke -> its traced locals then

    def __call__(self) -> None:
        loc = user_location()
        invoke = self.tracer.current_invoke
        if invoke is None:
            raise BarrierError("barrier() was called outside an invoke", at=loc,
                               hint="Call the barrier inside each `with tracer.invoke(...)` block that takes part.")
        invokes = list(dict.fromkeys(i for i, _ in self.calls))
        if invoke.index not in invokes and len(invokes) >= self.n:
            raise BarrierError(
                f"barrier() made for {self.n} invokes is called by one more invoke ({len(invokes) + 1} in all)",
                at=loc,
                also=[("barrier created at", self.loc)] + [("called at", c) for _, c in self.calls],
                hint=f"Create it with tracer.barrier({len(invokes) + 1}), or remove this call.")
        k = sum(1 for i, _ in self.calls if i == invoke.index)
        self.calls.append((invoke.index, loc))
        frame = sys._getframe(1)
        while frame is not None and _is_internal_frame(frame):
            frame = frame.f_back
        if frame is None:
            return
        traced = {name: v for name, v in frame.f_locals.items()
                  if isinstance(v, Proxy) and v.tracer is self.tracer}
        self.rounds.setdefault(k, {})[invoke.index] = traced
        rebound = {}
        for other, values in self.rounds[k].items():
            if other == invoke.index:
                continue
            for name, then in values.items():
                now = traced.get(name)
                if now is not None and now is not then and now.node.meta.get("fxpatch_invoke") == other:
                    rebound[name] = then
        if rebound:
            set_frame_locals(frame, rebound)

    def check(self) -> None:
        counts: dict[int, int] = {}
        for i, _ in self.calls:
            counts[i] = counts.get(i, 0) + 1
        if len(counts) != self.n:
            raise BarrierError(
                f"barrier made for {self.n} invokes was called by {len(counts)}", at=self.loc,
                also=[("called at", c) for _, c in self.calls],
                hint=f"Call barrier() in {self.n} invokes, or create it with tracer.barrier({len(counts)}).")
        if len(set(counts.values())) > 1:
            raise BarrierError(
                "the invokes call this barrier different numbers of times "
                f"({', '.join(f'invoke {i}: {c}' for i, c in counts.items())}), so some call has no partner",
                at=self.loc, also=[("called at", c) for _, c in self.calls],
                hint="Call it the same number of times in every invoke that takes part (once per loop step).")


def _is_internal_frame(frame) -> bool:
    from .errors import _is_internal

    return _is_internal(frame.f_code.co_filename)


def set_frame_locals(frame, values: dict) -> None:
    """Rebind local variables of a running frame (a function's locals or module globals)."""
    local_vars = frame.f_locals
    for name, value in values.items():
        local_vars[name] = value
    if sys.version_info < (3, 13) and local_vars is not frame.f_globals:
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))


class Tracer:
    """``model.trace(inputs=None, **kwargs)``: record interventions, run once at exit.

    Attributes after the block: ``graph`` (the rewritten ``GraphModule`` that
    ran), ``inserted`` (a table of the nodes the rewrite inserted) and
    ``batch`` (the padded inputs).
    """

    mode = "forward"
    kind = "trace"

    def __init__(self, model, inputs: Any = NO_INPUTS, **kwargs: Any):
        self.model = model
        self.loc = user_location(2)
        compile = kwargs.pop("compile", None)
        # run through torch.compile: True, or a torch.compile mode ("reduce-overhead": CUDA graphs)
        self.compile: bool | str = model._compile if compile is None else compile
        _no_model_kwargs(f"model.{self.kind}()", kwargs, self.loc)
        self.graph = None
        self.programs: dict[int, torch.fx.Graph] = {}
        self.phase = 0
        self.carries: dict[int, list[torch.fx.Node]] = {}
        self.saved_containers: list[Any] = []
        self.invokes: list[Invoker] = []
        self.barriers: list[Barrier] = []
        self.saved: list[Proxy] = []
        self.proxies: list[Proxy] = []  # every Proxy made while recording (saving.keep_appended)
        self.saved_nodes: list[torch.fx.Node] | None = None  # the saved proxies' nodes, once they are let go
        self.current_invoke: Invoker | None = None
        self.finished = False
        self.shortcut = inputs is not NO_INPUTS
        self._shortcut_invoke = Invoker(self, inputs, self.loc) if self.shortcut else None
        self._constants: dict[tuple[int, int], tuple[Any, torch.fx.Node]] = {}
        self._inputs = 0  # placeholders made, for their names
        # at the block's first use of the model: (line, mode, what its graph takes, the tensors, their versions)
        self._weights: tuple | None = None
        self._model_state = getattr(model, "_fingerprint", None)  # the model as the block begins (watch.py)
        self.batch = None
        self.pin = Pin(0)  # outside tracer.iter every read is a module's first call
        self.iter = CallSelection(self)
        self.skips: dict[tuple[int, str], list[tuple[int, Location]]] = {}  # (phase, module) -> skipping invokes
        self.stops: list[tuple[int, tuple | None, Location]] = []  # tracer.stop(): (point reached, its read, line)
        self.backwards: list = []  # `loss.backward()` blocks, in order (fxpatch/gradients.py)
        self.backward_open = None  # the `with loss.backward():` block being recorded
        self.not_run: set[int] = set()  # ids of saved proxies of generation steps that never ran (bind_values)

    # -- context -----------------------------------------------------------------
    @property
    def inserted(self) -> list[dict[str, Any]] | None:
        """The nodes the rewrite inserted into the graph that ran (``tracer.graph``), with the user line each
        came from; made when first read, so a trace that never looks pays nothing for it."""
        if self.graph is None:
            return None
        rows = self.graph.__dict__.get("_fxpatch_inserted")
        if rows is None:
            rows = self.graph.__dict__["_fxpatch_inserted"] = inserted_nodes(self.graph)
        return rows

    def __enter__(self) -> Tracer:
        # A trace of another model may nest (it runs at its own exit); one of the same model may not.
        if any(t.model is self.model for t in active.active_tracers()) or self.finished:
            raise FxpatchError("a trace was opened inside another trace of the same model", at=self.loc,
                               hint="Use several tracer.invoke(...) blocks in one trace instead.")
        active.push(self)
        self._grad = torch.is_grad_enabled()  # the program runs in one grad mode: this one (see record)
        self._scope = scope_of(sys._getframe(1))  # its containers are filled in after the run (NNsight's idiom)
        mount_save(self)  # x.save() on any object while recording
        try:
            from .edit import replay_edits

            replay_edits(self)  # model.edit()'s stored interventions come first
            if self._shortcut_invoke is not None:
                self._shortcut_invoke.__enter__()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        unmount_save(self)
        if self._shortcut_invoke is not None:
            self._shortcut_invoke.__exit__(exc_type, exc, tb)
        stopped = is_stop(exc, self)  # tracer.stop() ends the block's code, and the trace runs
        if exc_type is not None and not stopped:
            self._close()
            return False
        frame = sys._getframe(1)  # the frame running the `with` statement
        kept, untouched = keep_appended(self, self._scope, frame)
        session = active_session()
        if session is not None:  # in a session every value the block's variables hold flows on
            session.keep(self, frame)
        try:
            self._execute()
        finally:
            self._close()
        bind_saved(frame, self.saved, [*self.saved_containers, *kept], untouched, self.not_run)
        if session is None:
            self._release_values()
        return stopped

    def _release_values(self) -> None:
        """Let go of the saved proxies (and through them their values) once they are bound.

        A saved proxy refers to its trace, and the trace to it: a cycle, which CPython frees only at a garbage
        collection, and one that lives through a collection waits for a full one, hundreds of traces later.
        Its value would outlive the user's last reference to it by that long: in a loop of traces saving
        logits, a score of batches' logits in memory at once. The same for the containers ``fxpatch.save``
        registered. The proxies the user still holds keep their values; the trace keeps the nodes its saved
        values came from (``patched_module``)."""
        self.saved_nodes = list({id(p): p.node for p in self.saved}.values())
        self.saved = []
        self.saved_containers = []  # fxpatch.save([]): the user's lists, filled in
        for barrier in self.barriers:
            barrier.rounds.clear()

    def _close(self) -> None:
        self.finished = True
        self._scope = []
        self.proxies = []
        self.__dict__.pop("_fake_values", None)  # fake tensors of the recording (fake_values.py)
        unmount_save(self)
        active.remove(self)

    # -- API ---------------------------------------------------------------------
    def invoke(self, inputs: Any = NO_INPUTS, **kwargs: Any) -> Invoker:
        """Add ``inputs`` as rows of the batch; interventions inside apply to those rows."""
        loc = user_location()
        _no_model_kwargs("tracer.invoke()", kwargs, loc)
        return StoppableInvoker(self, inputs, loc)

    def all(self) -> CallLoop:
        """``for k in tracer.all()``: every call of the module the loop body reads first."""
        return CallLoop(self, 0, None, user_location())

    def barrier(self, n: int) -> Barrier:
        """A barrier that ``n`` invokes call, to share values between them."""
        b = Barrier(self, n, user_location())
        self.barriers.append(b)
        return b

    def cache(self, modules: Any = None, device: Any = "cpu", dtype: torch.dtype | None = None,
              detach: bool = True, include_output: bool = True, include_inputs: bool = False,
              non_blocking: bool = False):
        """Record many modules' values for this invoke's rows (NNsight's ``tracer.cache()``; ``fxpatch/cache.py``).

        Example::

            with model.trace("Hello") as tracer:
                cache = tracer.cache(modules=[model.transformer.h[0]], include_inputs=True)
            cache["model.transformer.h.0"].output, cache.transformer.h[0].input
        """
        from .cache import make_cache

        return make_cache(self, modules, device, dtype, detach, include_output, include_inputs, non_blocking)

    @property
    def result(self) -> Any:
        """The model's output (a ``ModelOutput``: ``.logits``), as NNsight's ``tracer.result``: inside an
        invoke that invoke's rows, outside every invoke the whole batch. Read it in the block and
        ``.save()`` it; the model's output is computed only when something uses it.

        Example::

            with model.trace("Hello") as tracer:
                out = tracer.result.save()
            out.logits.shape   # (1, n_tokens, vocab)
        """
        from .control import trace_result

        return trace_result(self)

    def stop(self) -> None:
        """End the forward pass here, as NNsight's ``tracer.stop()``: the code after it in the block does
        not run, and the graph that runs ends at the last value the program needs (sites the model
        computes after the point this invoke reached are not computed; reading one in another invoke
        is an error).

        Example::

            with model.trace("Hello") as tracer:
                h0 = model.transformer.h[0].output.save()
                tracer.stop()   # layers 1.. and the head do not run
        """
        from .control import stop

        stop(self)

    def patched_module(self) -> torch.nn.Module:
        """After the block: the model with this trace's interventions built in, as a ``torch.nn.Module``
        whose ``forward(input_ids, attention_mask)`` takes a left-padded batch with the trace's rows per
        invoke and returns ``(logits, *saved values)``; it works with ``torch.compile`` and
        ``torch.export`` (see ``fxpatch/artifact.py``).

        Example::

            with model.trace("I think that") as tracer:
                model.transformer.h[1].output[:, -1] += steer
            steered = tracer.patched_module()
            logits, = steered(input_ids, attention_mask)   # one row, any prompt
        """
        from .artifact import patched_module

        return patched_module(self)

    # -- recording ---------------------------------------------------------------------
    def input_limits(self) -> tuple[int | None, int | None]:
        """The model's context length and vocabulary size, which every invoke checks its prompts against (kept
        by the model until it changes: ``_input_facts``)."""
        return self.model._input_facts()[:2]

    def program_of(self, phase: int) -> torch.fx.Graph:
        """The program of one phase (step of a run): 0 for a trace or a generation's prompt pass."""
        if phase not in self.programs:
            self.programs[phase] = torch.fx.Graph()
        return self.programs[phase]

    def _check_recording(self, loc: Location) -> None:
        if self.finished:
            raise ProxyScopeError("this trace has already ended", at=loc,
                                  hint="Start a new `with model.trace(...)` block.")
        if active_tracer() is not self:
            raise ProxyScopeError("a value of one trace was used inside another model's trace", at=loc,
                                  also=[("its trace started at", self.loc)],
                                  hint=".save() it in its own trace; the saved tensor can be used anywhere.")

    def check_live(self, proxy: Proxy, loc: Location | None = None) -> Any:
        """``proxy`` as something this trace's program can use: a node, or the saved value. ``loc``: the
        user's line for an error (found when one is raised, if not given)."""
        if proxy.tracer is self and not self.finished:
            return proxy.node
        if proxy.value is not _UNSET:
            return proxy.value
        loc = loc or user_location()
        if proxy.tracer.finished:
            session = proxy.tracer.__dict__.get("session_loc")  # set by model.session() when it ends
            raise ProxyScopeError(
                f"a traced value was used after its {'session' if session else 'trace'} ended, but it was not "
                "saved", at=loc, also=[("it was recorded at", proxy.node.meta["fxpatch_loc"])]
                + ([("the session started at", session)] if session else []),
                hint=f"Call .save() on it inside the {'session' if session else 'trace'} to keep its value.")
        raise ProxyScopeError(
            "a value of one trace was used inside another trace", at=loc,
            also=[("it was recorded at", proxy.node.meta["fxpatch_loc"])],
            hint=".save() it in its own trace; once that trace ends the saved tensor can be used anywhere.")

    def _graph_arg(self, value: Any, loc: Location, phase: int) -> Any:
        def convert(v):
            if isinstance(v, Proxy):
                v = self.check_live(v, loc)
                if isinstance(v, torch.fx.Node):
                    if v.meta["fxpatch_phase"] == phase:
                        return v
                    return self._input(phase, v, loc, carry=v)
            if isinstance(v, torch.Tensor):
                return self._input(phase, v, loc, value=v)
            return v
        return map_aggregate(value, convert)

    def _graph_args(self, args: tuple, loc: Location, phase: int) -> tuple:
        """``_graph_arg`` of each argument, with numbers, strings and proxies of this phase handled in
        place: most recorded ops take nothing else, and a callback per leaf costs more than the op."""
        out = []
        for v in args:
            t = type(v)
            if t in _PLAIN:
                out.append(v)
            elif t is Proxy and v.tracer is self and not self.finished and v.node.meta["fxpatch_phase"] == phase:
                out.append(v.node)
            elif (t is tuple and _is_plain_index(v, phase)) or (t is torch.fx.Node and _is_plain(v, phase)):
                out.append(v)  # an index of numbers, or a number lifted to an input
            else:
                out.append(self._graph_arg(v, loc, phase))
        return tuple(out)

    def _input(self, phase: int, key: Any, loc: Location, value: Any = None, carry=None) -> torch.fx.Node:
        """A placeholder of ``phase``'s program for an outside tensor or an earlier phase's value (one per
        ``key`` and phase).

        Tensors from outside are program inputs, not baked-in constants, so a
        rewritten graph can be reused for runs that differ only in values.
        """
        entry = self._constants.get((phase, id(key)))
        if entry is None:
            node = self._placeholder(phase, loc)
            if carry is not None:
                node.meta["fxpatch_carry"] = carry
                self.carries.setdefault(carry.meta["fxpatch_phase"], []).append(carry)
            else:
                node.meta["fxpatch_value"], node.meta["fxpatch_version"] = _as_used(value)
            entry = self._constants[(phase, id(key))] = (key, node)
        return entry[1]

    def _placeholder(self, phase: int, loc: Location) -> torch.fx.Node:
        name = f"input_{self._inputs}"  # given as the name too: fx would snake_case the target
        self._inputs += 1
        node = self.program_of(phase).create_node("placeholder", name, name=name)
        meta = node.meta
        meta["fxpatch_loc"], meta["fxpatch_invoke"], meta["fxpatch_phase"] = loc, None, phase
        return node

    def _lift(self, phase: int, loc: Location):
        """A number that is data (``data_inputs.py``) as a placeholder of its own, fed its value at each run."""
        def lift(value):
            node = self._placeholder(phase, loc)
            node.meta["fxpatch_value"], node.meta["fxpatch_version"] = value, None
            return node
        return lift

    def record(self, op: str, target: Any, args: tuple, kwargs: dict, *, site=None,
               phase: int | None = None, at: int = -1, loc: Location | None = None) -> Proxy:
        """Add one operation to the program and return its ``Proxy``.

        It goes into the latest phase among the values it uses (or the current
        phase); a read or write of a module always goes into the current phase.
        Its time (``meta["fxpatch_time"]``) is when NNsight would run it: once
        the model has reached ``at`` (a site's position) and every value it
        uses, and not before the invoke's previous op. ``loc``: the user's line, when the caller has it.
        """
        loc = loc or user_location()
        if self.finished:
            return self._after_trace(op, target, args, kwargs, loc)
        if active_tracer() is not self:
            self._check_recording(loc)
        if self.backward_open is not None and target in (read_site, write_site):
            refuse_module_access(self, "the model's output" if site is not None else "a module value")
        if torch.is_grad_enabled() is not self._grad and target is not read_site:
            _refuse_grad_mode_change(self._grad, loc)
        if phase is None:
            if self.phase == 0 and len(self.programs) <= 1:  # a trace: every value is of phase 0
                phase = 0
            else:
                phase = max([self.phase] + [_phase_of(v) for v in _proxies((args, kwargs))])
        if target in _LIFTING_FUNCTIONS if op == "call_function" else target in _LIFTING_METHODS:
            args, kwargs = lift_data(op, target, args, kwargs, _is_proxy, self._lift(phase, loc))
        # arguments set after creation: create_node's own walk over them (torch 2.13 looks for raw SymInts,
        # which recorded values never are) costs ~45 us a node, most of a recorded op's time
        args = self._graph_args(args, loc, phase)  # inputs go first
        kwargs = self._graph_arg(kwargs, loc, phase) if kwargs else kwargs
        node = self.program_of(phase).create_node(op, target, name=_node_name(target))
        # through the properties' setters: Node.__setattr__ would also re-file the node in the graph's
        # lookup table, which is keyed by op and target alone (a third of the assignment's cost)
        if args:
            _SET_ARGS(node, args)
        if kwargs:
            _SET_KWARGS(node, kwargs)
        invoke = self.current_invoke
        meta = node.meta
        meta["fxpatch_loc"] = loc
        meta["fxpatch_invoke"] = invoke.index if invoke is not None else None
        meta["fxpatch_phase"] = phase
        # the time, and the read that set it (for errors that name why an op runs where it does): the
        # latest of the site's position, the values used and the invoke's previous op
        time, source = at, (site[0], loc) if site is not None else None
        for a in node.all_input_nodes:
            m = a.meta
            t = m.get("fxpatch_time", -1)
            if t > time:
                time, source = t, m.get("fxpatch_time_source")
        if invoke is not None:
            t, s = invoke.clock.get(phase, (-1, None))
            if t > time:
                time, source = t, s
            invoke.clock[phase] = (time, source)
        meta["fxpatch_time"] = time
        meta["fxpatch_time_source"] = source
        return Proxy(node, self, site=site)

    def _after_trace(self, op: str, target: Any, args: tuple, kwargs: dict, loc: Location) -> Any:
        """An op on this ended trace's values: saved ones act as their tensors, unsaved ones fail."""
        resolved = map_aggregate((args, kwargs), lambda v: self.check_live(v, loc) if isinstance(v, Proxy) else v)
        current = active_tracer()
        if current is not None:
            return current.record(op, target, *resolved)
        args, kwargs = resolved
        if op == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if op == "call_function":
            return target(*args, **kwargs)
        self._check_recording(loc)

    def _require_invoke(self, what: str, loc: Location | None = None) -> Invoker:
        loc = loc or user_location()
        self._check_recording(loc)
        if self.current_invoke is None:
            raise FxpatchError(f"{what} was used outside an invoke", at=loc,
                               hint="Use it inside `with tracer.invoke(...)`; an empty tracer.invoke() "
                               "covers every row of the batch.")
        return self.current_invoke

    def module_sites(self, path: str, kind: str, what: str):
        """The recorded structure of a module's ``inputs`` or ``output``, one per call, checked to exist."""
        sites = self.model.site_graph(self.mode).calls.get(path, {}).get(kind)
        if sites is None:
            name = path or "the model"
            raise ModuleNotRunError(
                f"module {name!r} does not run in the model's forward pass, so it has no {what}",
                at=user_location(),
                hint="Pick a module that runs (print(model) shows the tree; the demo's table lists sites).")
        return sites

    def read(self, path: str, kind: str) -> Any:
        """A module's ``output`` or ``inputs`` for the current invoke, as proxies, of the call ``tracer.iter``
        picks (an alias path of a shared module reads the module)."""
        if self.backward_open is not None:
            refuse_module_access(self, f"module {path or 'model'}.{kind}")
        loc = user_location()  # one walk up the stack for the checks and the reads below
        invoke = self.current_invoke
        if invoke is None or self.finished or active_tracer() is not self:  # the message only when it is needed
            invoke = self._require_invoke(f"module {path or 'model'}.{kind}", loc)
        per_call = self.module_sites(path, kind, kind)
        if self._weights is None:
            self._note_weights(loc)
        sites = per_call[pick_call(self, path, kind, per_call, loc)]
        leaves = [self._read_leaf(name, invoke, loc) if is_site else name
                  for name, is_site in zip(sites.leaves, sites.is_site)]
        return unflatten(sites.spec, leaves, build_container)

    def _position(self, name: str) -> int:
        return chains_of(self.model.site_graph(self.mode)).position[name]

    def _read_leaf(self, name: str, invoke: Invoker, loc: Location | None = None) -> Proxy:
        chains = chains_of(self.model.site_graph(self.mode))
        ref = self.site_ref(name, invoke, chains)
        proxy = self.record("call_function", read_site, ref, {}, site=ref, phase=self.phase,
                            at=chains.position[name], loc=loc)
        proxy.node.meta["fxpatch_site"] = name
        return proxy

    def site_ref(self, name: str, invoke: Invoker, chains=None) -> tuple[str, int, int | None]:
        """What ``invoke`` reads and writes of site ``name``: its rows, or the whole tensor where the first dim
        is not the batch's rows (``Chains.unbatched``), as NNsight narrows only a tensor with one row per
        prompt."""
        chains = chains or chains_of(self.model.site_graph(self.mode))
        if chains.root[name] in chains.unbatched:
            return (name, 0, None)
        return (name, invoke.start, invoke.stop)

    def write_site(self, ref: tuple[str, int, int | None], value: Any) -> None:
        """Record that the rows ``ref`` names of a site now hold ``value``."""
        refuse_module_access(self, "a module assignment")
        loc = user_location()
        invoke = self._require_invoke("a module assignment", loc)
        name, start, stop = ref
        if self._weights is None:  # a module's .skip(value) writes with no read before it
            self._note_weights(loc)
        chains = chains_of(self.model.site_graph(self.mode))
        if (start, stop) != self.site_ref(name, invoke, chains)[1:]:
            raise FxpatchError("a module value read in one invoke was assigned in another", at=loc,
                               hint="Read the value again in this invoke (m.output) and assign to that.")
        if isinstance(value, Proxy) and value.tracer is self and _phase_of(value) > self.phase:
            raise FlowError(f"a value computed at step {_phase_of(value)} is written at step {self.phase}, "
                            "which runs before it", at=loc,
                            also=[("it was recorded at", value.node.meta["fxpatch_loc"])],
                            hint="Write it at the same or a later step (tracer.iter[...]).")
        node = self.record("call_function", write_site, (name, start, stop, value), {}, phase=self.phase,
                           at=chains.position[name], loc=loc).node
        node.meta["fxpatch_site"] = name

    # -- running -----------------------------------------------------------------------

    def _execute(self) -> None:
        """Check what can be checked without the model, then run."""
        if torch.is_grad_enabled() is not self._grad:
            _refuse_grad_mode_change(self._grad, user_location())
        for b in self.barriers:
            b.check()
        if not any(i.rows for i in self.invokes):
            raise InputError(f"the {self.kind} has no inputs: no invoke was given a prompt", at=self.loc,
                             hint=f"Pass a prompt to model.{self.kind}(...) or to a tracer.invoke(...).")
        for container in self.saved_containers:
            for proxy in _proxies(container):
                if not proxy.saved:
                    proxy.save()
        from .edit import drop_edits_after_stop

        drop_edits_after_stop(self)  # model.edit()'s ops past a tracer.stop() never run
        self._check_changes_after_use()
        finish_program(self)
        check_before_run(self)
        self._run()

    def _note_weights(self, loc: Location) -> None:
        """The block's first use of the model (``loc``): note the version counters of the tensors its graph
        takes (parameters, buffers), so that ``_check_changes_after_use`` can refuse an in-place change of them
        after it. Before that line a change is the same for eager PyTorch and the trace (the whole forward
        pass runs with it); after, NNsight's forward pass has already used the weights of the modules it ran."""
        mode = self.mode  # a generation's mode is the step being recorded: the same one is compared
        values = self.model.state_values(mode)
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        self._weights = (loc, mode, values, tensors, _versions(tensors))

    def _check_changes_after_use(self) -> None:
        """Refuse a tensor from outside the trace, or one of the model's weights, that the block changed in
        place after using it (the model: after its first use).

        The block's code runs as it is recorded and the program at its end, so the program would see
        the tensor as the block left it; eager PyTorch (and NNsight, interleaved with the model) uses
        the value it had at the line that used it. Each use notes the tensor's version counter."""
        for program in self.programs.values():
            for node in program.find_nodes(op="placeholder"):
                version = node.meta.get("fxpatch_version")
                if version is not None and node.meta["fxpatch_value"]._version != version:
                    raise FlowError(
                        "a tensor from outside the trace was changed in place after this line used it: the "
                        "trace runs when its block ends, so it would use the changed value, not the one it "
                        "had here", at=node.meta["fxpatch_loc"],
                        hint="Use a copy of it here (x.clone()) to keep the value it has at this line, or "
                        "change it after the block.")
        changed = getattr(self.model, "_changed_since", None)
        if changed is not None and changed(self._model_state):
            raise FlowError(
                "the model was changed inside the block (a module, a hook, a setting such as an attention's "
                "scaling, a dtype or device): the trace runs its block's program when the block ends, on "
                "the model as it was when the block began", at=self.loc,
                hint="Change the model before the `with` block, or after it.")
        if self._weights is not None:
            loc, mode, values, tensors, versions = self._weights
            # a buffer replaced by one of the same shape (rotary inv_freq) leaves the model's fingerprint as it was
            now = self.model.state_values(mode)
            if (len(now) != len(values) or any(map(operator.is_not, now, values))
                    or versions is not None and _versions(tensors) != versions):
                raise FlowError(
                    "the model's weights or buffers were changed in place or replaced inside the block after "
                    "this line used the model: the trace runs when its block ends, so every module would run "
                    "with the changed weights, also those the forward pass had already run by then", at=loc,
                    hint="Change them before the block's first use of the model, or after the block "
                    "(model.edit() keeps an intervention for every later trace).")

    def _run(self) -> None:
        run_trace(self)


class StoppableInvoker(Invoker):
    """An invoke of ``model.trace``: ``tracer.stop()`` in it ends its code, and the trace's code goes on
    with the next invoke, as NNsight's invokes (each its own worker) do."""

    def __exit__(self, exc_type, exc, tb) -> bool:
        super().__exit__(exc_type, exc, tb)
        return is_stop(exc, self.tracer)


# NNsight's own tracing switches: fxpatch always checks (fake-tensor shapes) and runs locally.
_NNSIGHT_FLAGS = {"scan", "validate", "debug"}


def _no_model_kwargs(where: str, kwargs: dict, loc: Location) -> None:
    if kwargs.get("remote"):
        raise InputError("fxpatch runs models locally; remote=True (NDIF) is not supported", at=loc,
                         hint="Drop remote=True.")
    kwargs = {k: v for k, v in kwargs.items() if k not in _NNSIGHT_FLAGS and k != "remote"}
    if kwargs:
        raise InputError(
            f"{where} got keyword arguments it does not use: {', '.join(sorted(kwargs))}", at=loc,
            hint="fxpatch builds input_ids, attention_mask and position_ids itself; pass prompts, token ids or a "
            "BatchEncoding as the inputs.")


@functools.lru_cache(maxsize=1024)
def _node_name(target: Any) -> str | None:
    """The name fx gives a node of ``target`` (made once per target, not at each of a trace's nodes)."""
    try:
        return torch.fx.Graph._target_to_str(None, target)
    except Exception:  # noqa: BLE001 - torch's private helper changed: let create_node name it
        return None


_SET_ARGS, _SET_KWARGS = torch.fx.Node.args.fset, torch.fx.Node.kwargs.fset

# argument types recorded as they are: numbers, strings, None and torch's small value types
_PLAIN = frozenset((int, float, str, bool, type(None), torch.dtype, torch.device, torch.layout,
                    torch.memory_format))


def _refuse_grad_mode_change(at_start: bool, loc: Location) -> None:
    """An op recorded (or the run begun) in another grad mode than the block's: eager PyTorch would record no
    autograd graph for the ops under ``torch.no_grad()`` only, where the whole program runs in one mode."""
    now = "off" if at_start else "on"
    raise FxpatchError(
        f"gradients are {now} here but were {'on' if at_start else 'off'} when the trace began "
        "(torch.no_grad(), torch.enable_grad() or torch.inference_mode() inside the block): fxpatch runs the "
        "whole program in the grad mode the block began in, so this op would get gradients where eager "
        "PyTorch gives it none, or the other way round", at=loc,
        hint="Put the grad-mode context around the whole `with model.trace(...)` block; inside it, .detach() "
        "a value to stop gradients through it. Reading module values (m.output) is fine in either mode.")


def _is_plain_index(index: tuple, phase: int) -> bool:
    """Whether a tuple argument holds only numbers, slices of numbers and this phase's placeholders (an index
    ``h[:, -1]`` after its numbers were lifted): it goes into the program as it is."""
    for x in index:
        for part in (x.start, x.stop, x.step) if type(x) is slice else (x,):
            if not _is_plain(part, phase):
                return False
    return True


def _is_plain(value: Any, phase: int) -> bool:
    """A number (string, dtype, ...) or a placeholder of ``phase``'s program (a number lifted to an input)."""
    t = type(value)
    return t in _PLAIN or t is torch.fx.Node and value.meta["fxpatch_phase"] == phase


def _versions(tensors: list[torch.Tensor]) -> list | None:
    """The version counters of ``tensors`` (``None`` if one is an inference tensor, which has none: such a model
    cannot be changed in place outside inference mode)."""
    try:
        return list(map(_VERSION, tensors))
    except RuntimeError:
        return None


_VERSION = operator.attrgetter("_version")


def _as_used(value: Any) -> tuple[Any, int | None]:
    """A value from outside the trace as the program will take it, and the version counter to check it by
    (``Tracer._check_changes_after_use``). An inference tensor has no version counter (and can only be
    changed in place in inference mode): a copy of it is taken at its use."""
    if not isinstance(value, torch.Tensor):
        return value, None
    if value.is_inference():
        return value.clone(), None
    return value, value._version


def _is_proxy(value: Any) -> bool:
    return isinstance(value, Proxy)


def _proxies(value: Any) -> list[Proxy]:
    found = []
    map_aggregate(value, lambda v: found.append(v) if isinstance(v, Proxy) else None)
    return found


def _phase_of(proxy: Proxy) -> int:
    return proxy.node.meta["fxpatch_phase"] if not proxy.tracer.finished else 0
