"""Pass: on a CPU, a linear with a large float32 weight runs oneDNN's GEMM instead of torch's BLAS.

After it runs, every ``aten.linear(x, w, b)``, ``aten.addmm(b, x, w)``, ``aten.mm(x, w)`` and
``aten.matmul(x, w)`` (``w`` or its transpose a graph input, or an item of one: a weight) whose weight is
a 2-D float32 CPU tensor of at least ``min_numel`` elements, in the graph and every graph module it
calls, is ``fxpatch::onednn_linear``: the same product and sum, reading the weight as it is at each run
(nothing is packed or kept, so a weight changed in any way, ``.data`` included, is the one used). On
the 2-core AMD EPYC this project runs on, torch's CPU BLAS (MKL) reads a GPT-2-small weight at about
12 GB/s for a few rows and oneDNN at 30 or more: the GEMMs of a GPT-2-small forward of 8 rows take
21 ms instead of 49, of 176 rows 144 ms instead of 305 (``python -m bench.gemm``). The values are the
same up to the order of summing (a few float32 ulps), so only the graph handed to ``torch.compile``
gets it, as inductor reorders sums anyway; eager graphs stay bit-for-bit the model's. The op has
torch's gradients, so a compiled trace stays differentiable.
"""

from __future__ import annotations

import operator

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .ops import ONEDNN_LINEAR_OP

aten = torch.ops.aten
MIN_NUMEL = 1 << 18  # 1 MiB of float32: smaller weights stay in the caches, where torch's GEMM is as fast


def available() -> bool:
    """Whether this torch has oneDNN's linear (CPU builds with MKLDNN), and it is not turned off
    (``torch.backends.mkldnn.enabled = False`` keeps torch's BLAS for graphs compiled after it)."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class OneDNNLinear(PassBase):
    """``OneDNNLinear()(gm)``: see the module docstring.

    Example::

        gm = OneDNNLinear()(gm).graph_module  # GPT-2's addmm(b, x, w) is onednn_linear(x, w, b, True)
    """

    def __init__(self, min_numel: int | None = None):
        super().__init__()
        self.min_numel = MIN_NUMEL if min_numel is None else min_numel  # read at each use: settable

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if not available():
            return PassResult(gm, False)
        modified = False
        for module in gm.modules():
            if isinstance(module, torch.fx.GraphModule) and self._rewrite(module.graph):
                module.recompile()
                modified = True
        return PassResult(gm, modified)

    def _rewrite(self, graph: torch.fx.Graph) -> bool:
        changed = False
        for node in list(graph.nodes):
            found = self._linear(node) if node.op == "call_function" else None
            if found is None:
                continue
            x, weight, bias, transposed = found
            with graph.inserting_before(node):
                new = graph.call_function(ONEDNN_LINEAR_OP, (x, weight, bias, transposed))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            operand = node.args[2] if node.target is aten.addmm.default else node.args[1]
            graph.erase_node(node)
            if operand is not weight and not operand.users:  # a transpose of the weight only the linear used
                graph.erase_node(operand)
            changed = True
        if changed:
            graph.lint()
        return changed

    def _linear(self, node: torch.fx.Node):
        """``(x, weight, bias, transposed)`` of a linear this pass rewrites, else ``None``."""
        args, target = node.args, node.target
        if node.kwargs:  # addmm's beta/alpha, or anything else this pass does not read
            return None
        if target is aten.linear.default and len(args) in (2, 3):
            x, w, b = args[0], args[1], args[2] if len(args) == 3 else None
            transposed = False
        elif target is aten.addmm.default and len(args) == 3:
            b, x, w = args
            transposed = True
        elif target in (aten.mm.default, aten.matmul.default) and len(args) == 2:
            x, w, b = args[0], args[1], None
            transposed = True
        else:
            return None
        weight = w
        if transposed and isinstance(w, torch.fx.Node) and w.op == "call_function" and (
                w.target is aten.t.default or w.target is aten.permute.default and list(w.args[1]) == [1, 0]):
            weight, transposed = w.args[0], False  # x @ w.T: the weight as nn.Linear keeps it
        if not (_is_input(weight) and self._large(weight)):
            return None
        if not (_float32_cpu(x) and _val(x).dim() >= 2 and (b is None or _float32_cpu(b) and _val(b).dim() == 1)):
            return None
        return x, weight, b, transposed

    def _large(self, weight: torch.fx.Node) -> bool:
        val = _val(weight)
        return (val is not None and val.dim() == 2 and _float32_cpu(weight)
                and isinstance(val.numel(), int) and val.numel() >= self.min_numel)


def _is_input(node) -> bool:
    """A graph input, or an item of one (fxpatch's graphs take the model's state as one tuple)."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        node = node.args[0]
    return isinstance(node, torch.fx.Node) and node.op == "placeholder"


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _float32_cpu(node) -> bool:
    val = _val(node)
    return val is not None and val.dtype == torch.float32 and val.device.type == "cpu"
