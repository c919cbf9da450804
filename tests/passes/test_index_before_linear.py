"""``IndexBeforeLinear``: a linear whose output is only indexed runs on the rows that are read."""

from __future__ import annotations

import pytest
import torch

from fxpatch.passes import IndexBeforeLinear

aten = torch.ops.aten


class Head(torch.nn.Module):
    """A layer norm and a linear head over (rows, tokens, hidden), read as ``read`` says."""

    def __init__(self, read):
        super().__init__()
        self.norm, self.head, self.read = torch.nn.LayerNorm(8), torch.nn.Linear(8, 13), read

    def forward(self, x):
        return self.read(self.head(self.norm(x)))


def exported(read, x):
    torch.manual_seed(0)
    module = Head(read).eval()
    return module, torch.export.export(module, (x,)).module()


def linears(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.linear.default]


X = torch.randn(3, 5, 8)

READS = {
    "each row's last position": lambda y: tuple(y[r:r + 1][:, -1] for r in range(3)),
    "a position of every row": lambda y: y[:, 2],
    "rows, then a range of positions": lambda y: (y[1:3][:, 1:4], y[0][-2]),
    "a selected row whole": lambda y: y[1],
}


@pytest.mark.parametrize("read", READS, ids=list(READS))
def test_each_read_runs_the_linear_on_its_rows_alone_with_the_same_values(read):
    module, gm = exported(READS[read], X)
    with torch.no_grad():
        want = module(X)
    before = len(linears(gm))
    result = IndexBeforeLinear()(gm)
    assert result.modified
    after = linears(result.graph_module)
    assert before == 1 and len(after) >= 1
    for node in after:  # no linear takes the whole (rows, tokens, hidden) input any more
        assert node.args[0].op == "call_function" and node.args[0].target in (aten.select.int, aten.slice.Tensor)
    with torch.no_grad():
        got = result.graph_module(X)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


KEPT = {
    "the whole output": lambda y: (y, y[:, -1]),
    "the output in arithmetic": lambda y: (y * 2)[:, -1],
    "a read along the last dim": lambda y: y[..., 3],
    "a slice of the last dim": lambda y: y[:, :, 2:5],
}


@pytest.mark.parametrize("read", KEPT, ids=list(KEPT))
def test_a_linear_whose_output_is_used_otherwise_is_left_as_it_is(read):
    module, gm = exported(KEPT[read], X)
    code = gm.code
    result = IndexBeforeLinear()(gm)
    assert not result.modified
    assert result.graph_module.code == code
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(X), module(X))
