"""Gradients inside a trace: ``with loss.backward():`` and ``.grad``, as in NNsight 0.8.

A trace runs with gradients when torch's grad mode is on at its exit (as NNsight's forward does), so
saved values keep their ``grad_fn`` and ``loss.backward()`` after the trace works; under
``torch.no_grad()`` it runs without. Inside the block, ``with loss.backward(...):`` records a backward
pass of a traced ``loss``: it runs after the forward pass, with torch's own ``Tensor.backward``
arguments (``gradient``, ``retain_graph``, ``create_graph``, ``inputs``), and parameters' ``.grad``
accumulate as torch accumulates them. In its block, ``x.grad`` of a module value read earlier in the
trace (``x = model.transformer.h[1].output``) is that invoke's rows of the gradient reaching the
tensor; ``x.grad = v`` (or ``x.grad[...] = v``) replaces them in the gradient that flows on to earlier
layers. As in NNsight, ``.grad`` is read in the reverse of the forward order (later layers first),
and modules' ``.output`` / ``.input`` are read before the backward block, not in it.

Example::

    with model.trace("The Eiffel Tower is in") as tracer:
        h0 = model.transformer.h[0].output
        h1 = model.transformer.h[1].output
        loss = model.lm_head.output[:, -1].logsumexp(-1).sum()
        with loss.backward():
            g1 = h1.grad.save()          # later layer first
            h1.grad = h1.grad * 0.5      # the gradient that reaches layer 0 is halved
            g0 = h0.grad.save()

How it runs: each backward block is a phase of the trace's program. The forward graph returns the
loss and the values whose ``.grad`` the block reads; these are the graph's own tensors in an eager
run, so a tensor hook on each (on its batch tensor, the invoke's rows taken out of the gradient by
the read's geometry, as NNsight does) runs the block's recorded code when autograd reaches it.
``.grad`` needs those tensors and so an eager run: with ``compile=True`` it is refused before
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
    """Put ``require_grad`` right after the model node computing each site the program calls
    ``.requires_grad_()`` on (``root_of``: site -> that node's name), so every later use is recorded."""
    sites = [n.args[0].args[0] for n in program.nodes if n.target is requires_grad_mark]
    if not sites:
        return
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in dict.fromkeys(sites):
        root = nodes.get(root_of[site])
        if root is None:  # the model never computes it in this graph (it ends before)
            continue
        with gm.graph.inserting_after(root):
            node = gm.graph.call_function(require_grad, (root,))
        node.meta.update(fxpatch_role="requires_grad", fxpatch_site=site)
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
    node = proxy.node
    if not requires_grad:
        raise GradientError(
            ".requires_grad_(False) on a module value: the model's activations are not leaves, and torch allows "
            "this only on leaves", at=loc, hint="Use .detach() for a value without gradients.")
    if node.target is not read_site:
        raise GradientError(
            ".requires_grad_() on a value computed in the trace: fxpatch applies it to module values read in "
            "the forward pass, whose batch tensor the model goes on to use", at=loc,
            hint="Call it on the module value (h = model.transformer.h[1].output; h.requires_grad_()); values "
            "computed from it require grad when it does.")
    proxy.tracer.record("call_function", requires_grad_mark, (proxy,), {})
    return proxy


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
        self.tracer, self.loc = tracer, loc
        self.phase = max([0, *tracer.programs]) + 1
        self.program = tracer.program_of(self.phase)
        self.loss_node = tracer._input(self.phase, loss.node, loc, carry=tracer.check_live(loss, loc))
        self.args = tracer._graph_arg((gradient, inputs), loc, self.phase)
        self.retain_graph, self.create_graph = retain_graph, create_graph
        self.last: tuple[int, str, Location] | None = None  # the previous .grad: (order, site, line)
        self._phase_before = tracer.phase
        tracer.backwards.append(self)

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
    if node.target is not read_site or node.meta.get("fxpatch_phase") != 0:
        raise GradientError(
            f"{what} of a value computed in the trace: fxpatch serves .grad of module values read in the "
            "forward pass (model.<module>.output / .input, or an element of a tuple output)", at=loc,
            also=[("the value was recorded at", node.meta["fxpatch_loc"])],
            hint="Take .grad of the module value itself (h = model.transformer.h[1].output; ... h.grad) and "
            "apply your operation to the gradient (h.grad[:, -1]).")
    if tracer.compile:
        raise GradientError(
            f"{what} in a compiled trace (compile=True): the gradient hooks need the eager graph's own tensors",
            at=loc, hint="Run this trace with model.trace(..., compile=False); a compiled trace is differentiable "
            "and loss.backward() without .grad runs there.")
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
    for block in tracer.backwards:
        _BackwardRun(block, values).run()


class _BackwardRun:
    """One backward pass: the block's program runs as autograd's hooks hand it the gradients it reads."""

    def __init__(self, block: BackwardBlock, values: dict):
        self.block, self.values = block, values
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
        """The tensor autograd reaches for a read module value (its batch tensor) and the read's geometry."""
        view = self.env[node.args[0]]
        base = view._base if view._base is not None else view
        geometry = (tuple(view.shape), view.stride(), view.storage_offset() - base.storage_offset())
        self.taps.setdefault(id(base), (base, []))
        return id(base), geometry

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
        handles = []
        try:
            for key, (tensor, _) in self.taps.items():
                if tensor.requires_grad:  # one that does not gets no gradient: reported below
                    handles.append(tensor.register_hook(self._hook(key, tensor)))
            self._advance()
            with torch.autograd.set_multithreading_enabled(False):  # hooks run in this thread, in order
                torch.autograd.backward(loss, gradient, retain_graph=block.retain_graph,
                                        create_graph=block.create_graph, inputs=inputs)
            self._advance()
            if self.next < len(self.nodes):
                node = self.nodes[self.next]
                tensor = self.taps[self.keys[node][0]][0]
                why = ("the value does not require grad (the model's parameters are frozen and "
                       ".requires_grad_() was not called on it or before it)" if not tensor.requires_grad
                       else "the loss does not depend on it")
                raise GradientError(
                    f"the gradient of {node.args[0].meta['fxpatch_carry'].args[0]} never arrived: the backward "
                    f"pass did not reach it ({why})", at=node.meta["fxpatch_loc"],
                    also=[("the backward pass starts at", block.loc)],
                    hint="Use .grad of module values the loss is computed from.")
        finally:
            for handle in handles:
                handle.remove()
        self.values.update(self.env)

    def _hook(self, key: int, tensor: torch.Tensor):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            # A copy in the tensor's own layout: the reads' geometry applies to it, and an in-place edit of
            # it reaches only the gradient this hook passes on (autograd may hand the same tensor to
            # another branch of the graph).
            self.serving[key] = torch.empty_strided(tensor.shape, tensor.stride(), dtype=grad.dtype,
                                                    device=grad.device).copy_(grad)
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
                        f"{node.args[0].meta['fxpatch_carry'].args[0]}.grad is assigned after the backward pass "
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
