"""Gradients inside a trace: ``with loss.backward():`` and ``.grad``, as in NNsight 0.8.

A trace runs with gradients when torch's grad mode is on at its exit (as NNsight's forward does), so
saved values keep their ``grad_fn`` and ``loss.backward()`` after the trace works; under
``torch.no_grad()`` it runs without. Inside the block, ``with loss.backward(...):`` records a backward
pass of a traced ``loss``: it runs after the forward pass, with torch's own ``Tensor.backward``
arguments (``gradient``, ``retain_graph``, ``create_graph``, ``inputs``), and parameters' ``.grad``
accumulate as torch accumulates them. In its block, ``x.grad`` of a value of the forward pass is the
gradient reaching it, as NNsight's hook on the tensor gives it: for a module value
(``x = model.transformer.h[1].output``) that invoke's rows of the gradient reaching the model's tensor,
for a value the trace computed (``scaled = emb * alpha``, written into the model) the gradient reaching
that tensor. ``x.grad = v`` (or ``x.grad[...] = v``) replaces it in the gradient that flows on to
earlier layers. As in NNsight, module values' ``.grad`` is read in the reverse of the forward order
(later layers first), and modules' ``.output`` / ``.input`` are read before the backward block.

``x.requires_grad_()``, ``x.requires_grad = flag`` and ``x.retain_grad()`` follow torch: on a value that
already requires grad ``requires_grad_()`` changes nothing; on one that does not (a frozen model's) it
makes the value a leaf that requires grad; setting ``requires_grad`` on a non-leaf, or ``retain_grad()``
on a value without gradients, is torch's error (a ``GradientError`` at the line).

Example (integrated gradients, one step)::

    with model.trace("The Eiffel Tower is in") as tracer:
        emb = model.transformer.wte.output
        scaled = emb * 0.5
        scaled.requires_grad_()
        model.transformer.wte.output = scaled
        loss = model.lm_head.output[:, -1, 11].sum()
        with loss.backward():
            g = scaled.grad.save()

How it runs: each backward block is a phase of the trace's program. The forward graph returns the
loss and the values whose ``.grad`` the block reads; these are the graph's own tensors in an eager
run, so a tensor hook on each (a module value's: on its batch tensor, the invoke's rows taken out of
the gradient by the read's geometry, as NNsight does) runs the block's recorded code when autograd
reaches it. ``requires_grad_()`` and the like are applied in the graph right after the node computing
the value (``mark_requires_grad``); an op of the program that used the value before the call would then
record gradients where torch's does not, so that case is refused when the value did not already require
grad. ``.grad`` needs the graph's tensors and so an eager run: with ``compile=True`` it is refused before
anything runs (``GradientError``); a compiled trace is differentiable and ``loss.backward()`` without
``.grad`` reads works there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx.node import map_arg

from .errors import GradientError, user_location
from .passes.diagnostics import Location
from .passes.ops import read_site, write_site


def grad_of(value: torch.Tensor) -> torch.Tensor:
    """Program marker: the gradient reaching ``value`` (a module value read in the trace).

    The backward run serves it from a tensor hook; called directly (on fake tensors, to learn shapes)
    it gives a tensor of the gradient's shape.
    """
    return torch.empty_like(value)


def set_grad(value: torch.Tensor, new: Any) -> None:
    """Program marker: replace the gradient reaching ``value`` by ``new`` (broadcast to its shape)."""
    return None


def requires_grad_mark(value: torch.Tensor) -> torch.Tensor:
    """Program marker of ``x.requires_grad_()`` on a module value; the rewrite puts ``require_grad`` on the
    value's batch tensor in the model's graph (``mark_requires_grad``). Here an identity."""
    return value


@torch.fx.node.has_side_effect  # kept in the patched graph although nothing uses its result
def require_grad(tensor: torch.Tensor) -> torch.Tensor:
    """From this point of the forward pass autograd records the model's use of ``tensor`` (a frozen model's
    activations do not require grad otherwise), as ``tensor.requires_grad_()`` does in eager torch.

    Example::

        require_grad(torch.zeros(2)).requires_grad   # True (under grad mode)
    """
    if torch.is_grad_enabled() and not tensor.requires_grad:
        tensor.requires_grad_(True)
    return tensor


def mark_requires_grad(gm: torch.fx.GraphModule, program: torch.fx.Graph, root_of: dict[str, str]) -> None:
    """Apply the program's gradient marks in the model's graph: ``require_grad`` right after the model node
    computing each site the program calls ``.requires_grad_()`` on (``root_of``: site -> that node's name),
    so every later use is recorded; ``apply_grad_mark`` right after the node computing each value a
    ``grad_mark`` names (a module value's batch tensor, or a value the program computes, which is among
    the program's outputs and so the graph's)."""
    marks = [n for n in program.nodes if n.target in (requires_grad_mark, grad_mark)]
    if not marks:
        return
    nodes = {n.name: n for n in gm.graph.nodes}
    outputs = list(program.find_nodes(op="output")[0].args[0])
    graph_outputs = list(gm.graph.output_node().args[0])
    first = len(graph_outputs) - len(outputs)  # the model's own outputs (if kept) come first
    cursor: dict[torch.fx.Node, torch.fx.Node] = {}
    done = set()
    for mark in marks:
        value = mark.args[0]
        if value.target is read_site:
            node = nodes.get(root_of[value.args[0]])
            if node is None:  # the model never computes it in this graph (it ends before)
                continue
        else:
            node = graph_outputs[first + outputs.index(value)]
        if mark.target is requires_grad_mark:
            if (node, "require") in done:
                continue
            done.add((node, "require"))
            target, args, role = require_grad, (node,), "requires_grad"
        else:
            target, args, role = apply_grad_mark, (node, *mark.args[1:]), mark.args[1]
        with gm.graph.inserting_after(cursor.get(node, node)):  # in the program's order
            new = cursor[node] = gm.graph.call_function(target, args)
        new.meta.update(fxpatch_role=role, fxpatch_site=value.args[0] if value.target is read_site else "",
                        fxpatch_loc=mark.meta.get("fxpatch_loc"))
    gm.recompile()


def differentiable_copy(base: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """``aten.copy(base, src)`` (functionalization's form of ``base.copy_(src)``: ``src`` broadcast into a
    tensor of ``base``'s shape, dtype and layout), written with ops autograd differentiates.

    Example::

        differentiable_copy(torch.zeros(2, 3), torch.ones(3))   # ones of shape (2, 3), grad flows to src
    """
    out = torch.empty_like(base)
    out.copy_(src, non_blocking)
    return out


def make_differentiable(gm: torch.fx.GraphModule) -> None:
    """Replace the ops functionalization emits that autograd has no derivative for (``aten.copy``), so a
    patched graph can be run backward, eagerly and through ``torch.compile``.

    Example::

        make_differentiable(gm)   # gm: a rewritten GraphModule; its aten.copy nodes now differentiate
    """
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.copy.default:
            node.target = differentiable_copy
            changed = True
    if changed:
        gm.recompile()


def record_requires_grad(proxy, requires_grad: bool = True):
    """``proxy.requires_grad_()`` inside a trace (returns ``proxy``, as torch returns the tensor)."""
    loc = user_location(2)
    if proxy.tracer.finished:  # a saved value after its trace: the tensor itself
        return proxy.tracer.check_live(proxy, loc).requires_grad_(requires_grad)
    node = proxy.node
    if node.target is not read_site:
        _record_value_mark(proxy, "requires_grad_", requires_grad, loc)
        return proxy
    if not requires_grad:
        raise GradientError(
            ".requires_grad_(False) on a module value: the model's activations are not leaves, and torch allows "
            "this only on leaves", at=loc, hint="Use .detach() for a value without gradients.")
    proxy.tracer.record("call_function", requires_grad_mark, (proxy,), {})
    return proxy


def record_set_requires_grad(proxy, requires_grad: bool) -> None:
    """``proxy.requires_grad = flag`` inside a trace: torch's attribute, allowed on leaves only (checked when
    the value exists, as torch checks it)."""
    loc = user_location(2)
    if proxy.tracer.finished:
        proxy.tracer.check_live(proxy, loc).requires_grad = requires_grad
        return
    _record_value_mark(proxy, "requires_grad", bool(requires_grad), loc)


def record_retain_grad(proxy) -> None:
    """``proxy.retain_grad()`` inside a trace: the tensor's ``.grad`` is filled by backward passes, as torch
    fills it (read it after the trace on the saved value; in a backward block ``.grad`` is served either way)."""
    loc = user_location(2)
    if proxy.tracer.finished:
        proxy.tracer.check_live(proxy, loc).retain_grad()
        return
    if proxy.node.target is read_site:
        raise GradientError(
            ".retain_grad() on a module value: fxpatch's module values are views of the batch's tensor (this "
            "invoke's rows), so torch would never fill their .grad", at=loc,
            hint="Read h.grad inside `with loss.backward():` (the gradient reaching the module value), or "
            ".retain_grad() a value computed in the trace.")
    _record_value_mark(proxy, "retain_grad", True, loc)


def _record_value_mark(proxy, action: str, flag: bool, loc: Location) -> None:
    """Record ``grad_mark`` on ``proxy``; the rewrite applies it to the tensor where the forward pass computes
    the value (``mark_requires_grad``)."""
    tracer = proxy.tracer
    tracer._check_recording(loc)
    what = {"requires_grad_": ".requires_grad_()", "requires_grad": "setting .requires_grad",
            "retain_grad": ".retain_grad()"}[action]
    if tracer.backward_open is not None:
        raise GradientError(
            f"{what} inside a `with loss.backward():` block: the forward pass that computed the value is over",
            at=loc, also=[("the backward block opens at", tracer.backward_open.loc)],
            hint="Call it in the forward part of the trace, before computing the loss.")
    if tracer.compile:
        raise GradientError(
            f"{what} in a compiled trace (compile=True): fxpatch applies it to the eager graph's own tensor",
            at=loc, hint="Run this trace with model.trace(..., compile=False).")
    node = proxy.node
    # Ops recorded before this call that already use the value: torch records them only if the value required
    # grad then, which the run checks (apply_grad_mark). Writing it into the model is not such a use: the
    # model goes on with it after the invoke's code at that point has run.
    earlier = [u for u in node.users if u.target not in (write_site, grad_mark, requires_grad_mark)
               and not (u.target is getattr and u.args[1] in _METADATA)
               and not (u.op == "call_method" and u.target in _METADATA)]
    tracer.record("call_function", grad_mark, (proxy, action, flag, location_tuple(loc),
                                               location_tuple(earlier[0].meta.get("fxpatch_loc")) if earlier
                                               else None), {})
    if node.target is not read_site:  # a forward output, so the rewrite finds the node computing it
        carries = tracer.carries.setdefault(node.meta["fxpatch_phase"], [])
        if node not in carries:
            carries.append(node)


_METADATA = {"shape", "dtype", "device", "requires_grad", "is_leaf", "grad_fn", "ndim", "size", "dim", "numel"}


def location_tuple(loc: Location | None) -> tuple | None:
    """A ``Location`` as plain values (a graph argument must be printable as Python)."""
    return None if loc is None else (loc.filename, loc.lineno, loc.source)


def grad_mark(value: torch.Tensor, action: str, flag: bool, at: tuple, earlier: tuple | None) -> torch.Tensor:
    """Program marker of ``.requires_grad_(flag)``, ``.requires_grad = flag`` or ``.retain_grad()`` (``action``)
    at the user's line ``at``; the rewrite puts ``apply_grad_mark`` on the value's tensor. Here an identity."""
    return value


@torch.fx.node.has_side_effect  # kept in the patched graph although nothing uses its result
def apply_grad_mark(tensor: torch.Tensor, action: str, flag: bool, at: tuple, earlier: tuple | None) -> torch.Tensor:
    """``tensor.requires_grad_(flag)`` (``action="requires_grad_"``), ``tensor.requires_grad = flag``
    (``"requires_grad"``) or ``tensor.retain_grad()`` (``"retain_grad"``) with torch's rules, raising a
    ``GradientError`` at the user's line ``at`` where torch raises. ``earlier``: the line of an op that used
    the value before the call. The graph applies the call where the value is computed, so that op would
    record gradients where torch's does not: refused unless the value already required grad (then the call
    changes nothing, in torch too).

    Example::

        x = torch.zeros(2)
        apply_grad_mark(x, "requires_grad_", True, ("demo.py", 3, ""), None).requires_grad   # True
    """
    loc = Location(*at)
    if action == "retain_grad":
        if not tensor.requires_grad:
            raise GradientError(
                ".retain_grad() on a value that does not require grad (torch: can't retain_grad on Tensor that "
                "has requires_grad=False)", at=loc,
                hint="Call .requires_grad_() on it (or on a value it is computed from) first.")
        tensor.retain_grad()
        return tensor
    if tensor.grad_fn is not None and (action == "requires_grad" or not flag):
        raise GradientError(
            "requires_grad can be changed only on leaf tensors, and this value is computed from values that "
            "require grad (torch: you can only change requires_grad flags of leaf variables)", at=loc,
            hint="It already requires grad: leave it as it is (.requires_grad_() on it changes nothing), or use "
            ".detach() for a value without gradients.")
    if earlier is not None and flag and not tensor.requires_grad:
        raise GradientError(
            "this value was used by an operation before this call: in torch that operation records no gradient "
            "(the value did not require grad yet), but fxpatch applies the call where the value is computed, so "
            "it would", at=loc, also=[("the earlier use is at", Location(*earlier))],
            hint="Call .requires_grad_() (or set .requires_grad) right after computing the value, before using it.")
    if action == "requires_grad_":
        tensor.requires_grad_(flag)
    else:
        tensor.requires_grad = flag
    return tensor


class BackwardBlock:
    """``loss.backward(...)`` on a traced ``loss``: a backward pass run after the forward pass.

    As ``with loss.backward():`` its block may read and replace ``.grad`` of module values read
    before it; called bare (``loss.backward()``) it runs the backward pass with no interventions.

    Example::

        with model.trace("Hello") as tracer:
            h = model.transformer.h[-1].output
            with model.lm_head.output.sum().backward():
                g = h.grad.save()
    """

    def __init__(self, loss, gradient: Any = None, retain_graph: bool | None = None, create_graph: bool = False,
                 inputs: Any = None, loc: Location | None = None):
        tracer = loss.tracer
        loc = loc or user_location()
        tracer._check_recording(loc)
        if tracer.mode != "forward":
            raise GradientError(
                f"loss.backward() inside model.{tracer.kind}(): generation runs without gradients (transformers' "
                "generate is decorated with torch.no_grad(), so NNsight has no gradients there either)", at=loc,
                hint="Compute the loss in a model.trace(...) of the prompt (or of the generated tokens) instead.")
        if tracer.backward_open is not None:
            raise GradientError("loss.backward() inside another `with ... .backward():` block", at=loc,
                                also=[("that block opens at", tracer.backward_open.loc)],
                                hint="Close the first backward block before the next one (with retain_graph=True "
                                "on the first, as torch needs for a second backward pass).")
        invoke = tracer.current_invoke
        self.invoke = invoke.index if invoke is not None else None
        for earlier in tracer.backwards:
            if earlier.invoke == self.invoke and not earlier.keeps_graph:
                raise GradientError(
                    "a second backward pass through this invoke's forward pass after one without "
                    "retain_graph=True: in eager PyTorch it fails (the first pass freed the graph)", at=loc,
                    also=[("the first backward pass is at", earlier.loc)],
                    hint="Pass retain_graph=True to the first .backward().")
        self.tracer, self.loc = tracer, loc
        self.phase = max([0, *tracer.programs]) + 1
        self.program = tracer.program_of(self.phase)
        self.loss_node = tracer._input(self.phase, loss.node, loc, carry=tracer.check_live(loss, loc))
        self.args = tracer._graph_arg((gradient, inputs), loc, self.phase)
        self.retain_graph, self.create_graph = retain_graph, create_graph
        self.last: tuple[int, str, Location] | None = None  # the previous .grad: (order, site, line)
        self._phase_before = tracer.phase
        tracer.backwards.append(self)

    @property
    def keeps_graph(self) -> bool:
        """Whether this pass leaves the forward graph for another: ``retain_graph``, by torch's default
        ``create_graph``."""
        return self.retain_graph if self.retain_graph is not None else self.create_graph

    def __enter__(self) -> BackwardBlock:
        self._phase_before = self.tracer.phase
        self.tracer.phase = self.phase
        self.tracer.backward_open = self
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.tracer.phase = self._phase_before
        self.tracer.backward_open = None
        return False


# -- recording ---------------------------------------------------------------------------------------

def _grad_target(proxy, what: str):
    """Check that ``proxy.grad`` can be recorded here; returns the open backward block."""
    loc = user_location(3)
    tracer = proxy.tracer
    tracer._check_recording(loc)
    block = tracer.backward_open
    if block is None:
        raise GradientError(
            f"{what} outside a `with loss.backward():` block: inside a trace, gradients exist only in the "
            "backward pass that such a block runs", at=loc,
            hint="Compute a loss in the trace and use .grad inside `with loss.backward():` (NNsight's syntax); "
            "or .save() values and call loss.backward() on the saved loss after the trace.")
    node = proxy.node
    if node.meta.get("fxpatch_phase") != 0:
        raise GradientError(
            f"{what} of a value computed in the backward block: .grad is served on values of the forward pass",
            at=loc, also=[("the value was recorded at", node.meta["fxpatch_loc"])],
            hint="Take .grad of a value computed before the block (a module value, or a value computed from "
            "one) and apply your operation to the gradient (h.grad[:, -1]).")
    if tracer.compile:
        raise GradientError(
            f"{what} in a compiled trace (compile=True): the gradient hooks need the eager graph's own tensors",
            at=loc, hint="Run this trace with model.trace(..., compile=False); a compiled trace is differentiable "
            "and loss.backward() without .grad runs there.")
    if node.target is not read_site:
        # A value the trace computes: a hook on its own tensor, as NNsight's .grad on a tensor. Its place in
        # the backward order is not known while recording; the run serves it whenever autograd reaches it.
        return block
    site = node.args[0]
    order = _order_of(tracer, site)
    if block.last is not None and order > block.last[0]:
        raise GradientError(
            f"{site}.grad is used after {block.last[1]}.grad, which the backward pass reaches first: gradients "
            "arrive in the reverse of the forward order, so this one has already been passed on "
            "(NNsight: OutOfOrderError)", at=loc, also=[("the earlier .grad is at", block.last[2])],
            hint="Use .grad of later modules first (for layer in reversed(layers): ...).")
    block.last = (order, site, loc)
    return block


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _name(placeholder: torch.fx.Node) -> str:
    """How errors name the forward value a backward block's placeholder carries."""
    value = placeholder.meta["fxpatch_carry"]
    if value.target is read_site:
        return value.args[0]
    loc = value.meta.get("fxpatch_loc")
    return f"the value computed at line {loc.lineno}" if loc is not None else "a value computed in the trace"


def _order_of(tracer, site: str) -> int:
    """Where the forward pass computes the tensor at ``site`` (sites that are one tensor share it)."""
    from .runner import chains_of

    sg = tracer.model.site_graph(tracer.mode)
    order = getattr(sg, "_node_order", None)
    if order is None:
        order = sg._node_order = {n.name: i for i, n in enumerate(sg.graph_module.graph.nodes)}
    return order[chains_of(sg).root[site]]


def read_grad(proxy):
    """``proxy.grad`` inside a trace: the gradient reaching a module value, as a traced value."""
    if proxy.tracer.finished:
        return proxy.tracer.check_live(proxy, user_location()).grad
    _grad_target(proxy, ".grad")
    return proxy.tracer.record("call_function", grad_of, (proxy,), {})


def write_grad(proxy, value: Any) -> None:
    """``proxy.grad = value`` inside a trace: replace the gradient flowing on from a module value."""
    if proxy.tracer.finished:
        proxy.tracer.check_live(proxy, user_location()).grad = value
        return
    _grad_target(proxy, "assigning .grad")
    proxy.tracer.record("call_function", set_grad, (proxy, value), {})


def refuse_module_access(tracer, what: str) -> None:
    """Module values are read in the forward pass; a backward block has only ``.grad`` (NNsight's rule)."""
    block = tracer.backward_open
    if block is not None:
        raise GradientError(
            f"{what} inside a `with loss.backward():` block: the forward pass is over when the backward pass "
            "runs, so only .grad is available there (as in NNsight)", at=user_location(),
            also=[("the backward block opens at", block.loc)],
            hint="Read the module value before the block (h = model.transformer.h[1].output) and use h.grad "
            "inside it.")


def check_before_run(tracer) -> None:
    """Refuse backward passes that cannot run, before the forward pass runs."""
    if tracer.backwards and not torch.is_grad_enabled():
        block = tracer.backwards[0]
        raise GradientError(
            "loss.backward() in a trace that runs without gradients (torch.no_grad() or "
            "torch.inference_mode() is active), so the loss has no graph to run backward through", at=block.loc,
            hint="Run the trace with gradients enabled (outside torch.no_grad()).")


# -- running -----------------------------------------------------------------------------------------

def run_backwards(tracer, values: dict) -> None:
    """Run each backward block of ``tracer`` in order, after its forward pass; values go into ``values``.

    Example::

        run_backwards(tracer, values)   # values: program node -> value, the forward pass's outputs in it
    """
    blocks = tracer.backwards
    for i, block in enumerate(blocks):
        # invokes share one batched forward graph where each prompt alone has its own: a later invoke's
        # backward pass needs the graph an earlier one's would free
        keep = True if any(later.invoke != block.invoke for later in blocks[i + 1:]) else block.retain_graph
        _BackwardRun(block, values, keep).run()


class _BackwardRun:
    """One backward pass: the block's program runs as autograd's hooks hand it the gradients it reads."""

    def __init__(self, block: BackwardBlock, values: dict, retain_graph: bool | None = None):
        self.block, self.values, self.retain_graph = block, values, retain_graph
        self.env: dict[torch.fx.Node, Any] = {}
        for node in block.program.nodes:
            if node.op == "placeholder":
                self.env[node] = values[node.meta["fxpatch_carry"]] if "fxpatch_carry" in node.meta \
                    else node.meta["fxpatch_value"]
        self.nodes = [n for n in block.program.nodes if n.op not in ("placeholder", "output")]
        self.next = 0
        self.serving: dict[int, torch.Tensor] = {}  # tensor id -> the gradient its hook is handling now
        self.passed: dict[int, torch.Tensor] = {}  # tensor id -> the gradient its hook passed on
        self.taps: dict[int, tuple[torch.Tensor, list]] = {}  # tensor id -> (tensor, geometries)

    def _tap(self, node: torch.fx.Node) -> tuple[int, tuple]:
        """The tensor autograd reaches for a value whose gradient the block uses, and the value's geometry in
        it: a module value's batch tensor (the value is the invoke's rows of it), or a value the trace computed
        (its own tensor, as NNsight's and torch's hooks on a tensor)."""
        view = self.env[node.args[0]]
        if not isinstance(view, torch.Tensor):
            raise GradientError(f".grad of {_name(node.args[0])}, which is not a tensor ({type(view).__name__})",
                                at=node.meta["fxpatch_loc"], hint="Take .grad of tensors only.")
        if node.args[0].meta["fxpatch_carry"].target is read_site:
            base = view._base if view._base is not None else view
            geometry = (tuple(view.shape), view.stride(), view.storage_offset() - base.storage_offset())
            self.taps.setdefault(id(base), (base, True))
        else:  # its gradient is served in a contiguous copy (its own strides may overlap: an expand)
            base, geometry = view, (tuple(view.shape), _contiguous_strides(view.shape), 0)
            self.taps.setdefault(id(base), (base, False))
        return id(base), geometry

    def _on_the_pass(self, inputs: Any) -> Any:
        """``backward(inputs=...)`` with each module value read in the trace (an invoke's rows: a view of the
        batch's tensor, which the forward pass did not use) replaced by the batch's tensor the pass went
        through, whose hook gives that value's ``.grad``, as the tensor itself is in a prompt's eager run."""
        def on_the_pass(t):
            base = t._base if isinstance(t, torch.Tensor) else None
            return base if base is not None and id(base) in self.taps else t
        if isinstance(inputs, torch.Tensor):
            return on_the_pass(inputs)
        return [on_the_pass(t) for t in inputs]

    def run(self) -> None:
        block = self.block
        loss = self.env[block.loss_node]
        gradient, inputs = map_arg(block.args, lambda n: self.env[n])
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise GradientError(
                "loss.backward() on a value that does not require grad: nothing it was computed from requires "
                "grad (the model's parameters are frozen, or the loss does not depend on the model)", at=block.loc,
                hint="Call .requires_grad_() on the module values you want gradients of, before computing the "
                "loss, or unfreeze the parameters.")
        keys = {}
        for node in self.nodes:
            if node.target in (grad_of, set_grad):
                keys[node] = self._tap(node)
        self.keys = keys
        if inputs is not None:
            inputs = self._on_the_pass(inputs)
        handles = []
        try:
            for key, (tensor, _) in self.taps.items():
                if tensor.requires_grad:  # one that does not gets no gradient: reported below
                    handles.append(tensor.register_hook(self._hook(key, tensor, self.taps[key][1])))
            self._advance()
            with torch.autograd.set_multithreading_enabled(False):  # hooks run in this thread, in order
                torch.autograd.backward(loss, gradient, retain_graph=self.retain_graph,
                                        create_graph=block.create_graph, inputs=inputs)
            self._advance()
            if self.next < len(self.nodes):
                node = self.nodes[self.next]
                tensor = self.taps[self.keys[node][0]][0]
                why = ("the value does not require grad (the model's parameters are frozen and "
                       ".requires_grad_() was not called on it or before it)" if not tensor.requires_grad
                       else "the loss does not depend on it")
                raise GradientError(
                    f"the gradient of {_name(node.args[0])} never arrived: the backward "
                    f"pass did not reach it ({why})", at=node.meta["fxpatch_loc"],
                    also=[("the backward pass starts at", block.loc)],
                    hint="Use .grad of values the loss is computed from.")
        finally:
            for handle in handles:
                handle.remove()
        self.values.update(self.env)

    def _hook(self, key: int, tensor: torch.Tensor, layout: bool):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            # A copy in the tensor's own layout (a batch tensor's: the reads' geometry applies to it) or a
            # contiguous one; an in-place edit of it reaches only the gradient this hook passes on (autograd
            # may hand the same tensor to another branch of the graph).
            self.serving[key] = (torch.empty_strided(tensor.shape, tensor.stride(), dtype=grad.dtype,
                                                     device=grad.device).copy_(grad) if layout
                                 else grad.clone(memory_format=torch.contiguous_format))
            try:
                self._advance()
            finally:
                passed = self.passed[key] = self.serving.pop(key)
            return passed
        return hook

    def _advance(self) -> None:
        """Run the program's nodes until one needs a gradient autograd has not reached yet."""
        while self.next < len(self.nodes):
            node = self.nodes[self.next]
            if node.target in (grad_of, set_grad):
                key, geometry = self.keys[node]
                if key in self.serving:
                    grad = self.serving[key]
                elif key in self.passed and node.target is grad_of:
                    grad = self.passed[key]
                elif key in self.passed:
                    raise GradientError(
                        f"{_name(node.args[0])}.grad is assigned after the backward pass "
                        "has passed that gradient on", at=node.meta["fxpatch_loc"],
                        hint="Assign .grad in the reverse of the forward order (later modules first).")
                else:
                    return
                shape, stride, offset = geometry
                rows = grad.as_strided(shape, stride, grad.storage_offset() + offset)
                if node.target is grad_of:
                    self.env[node] = rows
                else:
                    new = map_arg(node.args[1], lambda n: self.env[n])
                    replaced = grad.clone()
                    replaced.as_strided(shape, stride, replaced.storage_offset() + offset).copy_(
                        torch.as_tensor(new, dtype=grad.dtype, device=grad.device))
                    self.serving[key] = replaced
                    self.env[node] = None
            else:
                self.env[node] = _run_node(node, self.env, self.block.tracer.model._model)
            self.next += 1


def _run_node(node: torch.fx.Node, env: dict, model: torch.nn.Module) -> Any:
    args = map_arg(node.args, lambda n: env[n])
    kwargs = map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_function":
        if node.target in (read_site, write_site):
            raise RuntimeError("module values are not read in a backward block")  # refused while recording
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return model.get_submodule(node.target)(*args, **kwargs)
    raise RuntimeError(f"a backward block cannot run a {node.op} node")
