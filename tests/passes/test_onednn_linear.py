"""``OneDNNLinear``: a linear with a large float32 weight runs oneDNN's GEMM, with the same values and gradients,
reading the weight as it is at each run."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from fxpatch.passes import OneDNNLinear
from fxpatch.passes.onednn_linear import available
from fxpatch.passes.ops import ONEDNN_LINEAR_OP

aten = torch.ops.aten
pytestmark = pytest.mark.skipif(not available(), reason="this torch has no oneDNN linear, or it is off")

X = torch.randn(3, 5, 16)


class Layers(torch.nn.Module):
    """Every form of linear the pass reads: ``nn.Linear`` with and without a bias (``aten.linear``), GPT-2's
    ``Conv1D`` (``aten.addmm`` of an ``(in, out)`` weight), ``x @ w`` (``aten.matmul``) and ``torch.mm(x, w.T)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear, self.no_bias = torch.nn.Linear(16, 24), torch.nn.Linear(24, 16, bias=False)
        self.conv1d = Conv1D(32, 16)
        self.w_in_out, self.w_out_in = torch.nn.Parameter(torch.randn(32, 8)), torch.nn.Parameter(torch.randn(8, 32))

    def forward(self, x):
        h = torch.relu(self.no_bias(torch.relu(self.linear(x))))
        flat = self.conv1d(h).reshape(-1, 32)
        return flat @ self.w_in_out + torch.mm(flat, self.w_out_in.t())


def lifted(module: torch.nn.Module, x: torch.Tensor):
    """The exported graph with the weights as inputs (as fxpatch's graphs take them), and its inputs."""
    ep = torch.export.export(module, (x,))
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    weights = [state[spec.target] for spec in ep.graph_signature.input_specs if spec.target is not None]
    return ep.graph_module, weights


def ops(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"
            and n.target in (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default,
                             ONEDNN_LINEAR_OP)]


def test_every_form_of_linear_is_onednns_with_the_same_values():
    module = Layers().eval()
    gm, weights = lifted(module, X)
    assert sorted(map(str, ops(gm))) == ["aten.addmm.default", "aten.linear.default", "aten.linear.default",
                                         "aten.matmul.default", "aten.mm.default"]
    with torch.no_grad():
        want = module(X)
    result = OneDNNLinear(min_numel=0)(gm)
    assert result.modified
    assert ops(result.graph_module) == [ONEDNN_LINEAR_OP] * 5
    assert not [n for n in result.graph_module.graph.nodes if n.target in (aten.t.default, aten.permute.default)]
    with torch.no_grad():
        (got,) = result.graph_module(*weights, X)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gradients_are_torchs():
    module = Layers().eval()
    gm, weights = lifted(module, X)
    rewritten = OneDNNLinear(min_numel=0)(lifted(module, X)[0]).graph_module
    x = X.clone().requires_grad_()
    grads = []
    for graph in (gm, rewritten):
        (out,) = graph(*weights, x)
        grads.append(torch.autograd.grad((out * torch.arange(out.numel()).reshape(out.shape)).sum(),
                                         [x, *weights]))
    assert len(grads[0]) == 1 + len(weights)
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_a_weight_changed_through_data_is_the_one_used():
    """Nothing is packed or kept: a weight edited in a way its version counter does not see (``.data``, as
    research code ablates weights) is read as it is at the next run."""
    module = Layers().eval()
    gm, weights = lifted(module, X)
    rewritten = OneDNNLinear(min_numel=0)(gm).graph_module
    with torch.no_grad():
        rewritten(*weights, X)
        version = module.conv1d.weight._version
        module.conv1d.weight.data[:, :4] = 0
        module.linear.weight.data.mul_(-2)
        assert module.conv1d.weight._version == version
        want = module(X)
        (got,) = rewritten(*weights, X)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class Odd(torch.nn.Module):
    """Linears the pass leaves alone: ``addmm`` with ``beta``, a float64 weight, a weight computed in the
    graph."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w, self.b = torch.nn.Parameter(torch.randn(16, 16)), torch.nn.Parameter(torch.randn(16))
        self.w64 = torch.nn.Parameter(torch.randn(16, 16, dtype=torch.float64))

    def forward(self, x):
        y = torch.addmm(self.b, x, self.w, beta=0.5)
        z = torch.nn.functional.linear(x.double(), self.w64).float()
        return y + z + torch.nn.functional.linear(x, self.w * 2)


def test_what_is_not_a_plain_linear_of_a_float32_weight_is_left_alone():
    module = Odd().eval()
    x = torch.randn(4, 16)
    gm, _ = lifted(module, x)
    assert not OneDNNLinear(min_numel=0)(gm).modified


def test_small_weights_are_left_to_torchs_gemm():
    """Below ``MIN_NUMEL`` (1 MiB of float32) a weight stays in the caches, where torch's own GEMM is as fast."""
    gm, _ = lifted(Layers().eval(), X)
    assert not OneDNNLinear()(gm).modified
    big = torch.nn.Linear(512, 1024).eval()
    gm, weights = lifted(big, torch.randn(2, 512))
    result = OneDNNLinear()(gm)
    assert result.modified and ops(result.graph_module) == [ONEDNN_LINEAR_OP]


def test_turning_onednn_off_keeps_torchs_gemm(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    gm, _ = lifted(Layers().eval(), X)
    assert not OneDNNLinear(min_numel=0)(gm).modified
