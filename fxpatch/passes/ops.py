"""Graph-level ops that the export inserts and the passes recognise or insert.

``site`` is the identity op that marks a module boundary in the exported
graph. ``read_site`` / ``write_site`` are markers in a recorded program (an
``InterventionGraph``); they never run. ``capture``, ``scatter`` and
``assign`` are what the passes put in their place: plain torch code that
eager mode, ``FakeTensorProp`` and ``torch.compile`` all understand.
"""

from __future__ import annotations

import operator

import torch

SITE_NAMESPACE = "fxpatch"
# An op whose behaviour changes takes a new name: inductor's on-disk cache keys compiled code by the code,
# which names an op but holds neither its Python body nor its fake, so code compiled for the old behaviour
# would be served for the new one.


@torch.library.custom_op(f"{SITE_NAMESPACE}::site", mutates_args=())
def site(x: torch.Tensor, name: str) -> torch.Tensor:
    """Identity at a module boundary; ``name`` is e.g. ``transformer.h.3.output``.

    It returns a copy because a custom op may not return an alias of its input;
    the copy never runs in a patched graph, where ``strip_sites`` removes every
    site node.
    """
    return x.clone()


@site.register_fake
def _site_fake(x: torch.Tensor, name: str) -> torch.Tensor:
    return torch.empty_like(x)


SITE_OP = torch.ops.fxpatch.site.default


def is_site(node: torch.fx.Node) -> bool:
    """True for a ``site`` node of an exported graph."""
    return node.op == "call_function" and node.target is SITE_OP


def read_site(name: str, start: int, stop: int | None) -> torch.Tensor:
    """Program marker: rows ``start:stop`` of site ``name`` (never executed)."""
    raise RuntimeError("read_site is a program marker and never runs")


def write_site(name: str, start: int, stop: int | None, value: torch.Tensor) -> None:
    """Program marker: set rows ``start:stop`` of site ``name`` (never executed)."""
    raise RuntimeError("write_site is a program marker and never runs")


def capture(base: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
    """Rows ``start:stop`` (dim 0) of ``base``: one invoke's slice of a site."""
    if start == 0 and stop is None:
        return base
    return base[start:stop]


def scatter(base: torch.Tensor, value, start: int, stop: int | None) -> torch.Tensor:
    """A copy of ``base`` whose rows ``start:stop`` hold ``value`` (broadcast)."""
    rows = base[start:stop]
    value = torch.as_tensor(value, dtype=base.dtype, device=base.device)
    value = value.to(dtype=base.dtype, device=base.device).expand(rows.shape)
    if start == 0 and stop is None:
        return value.clone()
    return torch.slice_scatter(base, value, 0, start, stop if stop is not None else base.shape[0])


def assign(base, index, value):
    """Functional ``base[index] = value``: a new tensor, ``base`` untouched."""
    out = base.clone()
    if isinstance(value, torch.Tensor):
        value = value.to(dtype=out.dtype, device=out.device)
    operator.setitem(out, index, value)
    return out


@torch.library.custom_op(f"{SITE_NAMESPACE}::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """``x @ w.T + bias`` by oneDNN's GEMM, reading ``weight`` as it is at each call (nothing packed or kept);
    ``w`` is ``weight``, or ``weight.T`` where ``transposed`` (GPT-2's ``Conv1D`` keeps ``(in, out)``)."""
    w = weight.t() if transposed else weight
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


@onednn_linear.register_fake
def _onednn_linear_fake(x, weight, bias, transposed):
    return x.new_empty((*x.shape[:-1], weight.shape[1] if transposed else weight.shape[0]))


def _onednn_linear_context(ctx, inputs, output) -> None:
    x, weight, bias, transposed = inputs
    ctx.save_for_backward(x, weight)
    ctx.transposed, ctx.has_bias = transposed, bias is not None


def _onednn_linear_backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    w = weight.t() if ctx.transposed else weight  # (out, in)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    flat = grad.reshape(-1, grad.shape[-1])
    grad_x = grad @ w if need_x else None
    grad_w = None
    if need_w:
        grad_w = flat.t() @ x.reshape(-1, x.shape[-1])
        grad_w = grad_w.t() if ctx.transposed else grad_w
    grad_b = flat.sum(0) if need_b and ctx.has_bias else None
    return grad_x, grad_w, grad_b, None


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_context)

ONEDNN_LINEAR_OP = torch.ops.fxpatch.onednn_linear.default
