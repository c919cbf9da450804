"""``IndexBeforeLinear``: a linear whose output is only indexed runs on the rows that are read."""

from __future__ import annotations

import operator

import pytest
import torch

from fxpatch.passes import IndexBeforeLinear
from fxpatch.passes.ops import capture

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


def reads_into(linear):
    """The reads a linear's input is made of: itself, or the reads a merged linear concatenates."""
    rows = linear.args[0]
    if rows.target is aten.cat.default:
        return [flat.args[0] for flat in rows.args[0]]
    return [rows]


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
        for rows in reads_into(node):
            assert rows.op == "call_function" and rows.target in (aten.select.int, aten.slice.Tensor)
    with torch.no_grad():
        got = result.graph_module(X)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_reads_of_fixed_sizes_from_one_linear_are_one_linear_of_their_rows():
    """Three invokes' last positions: one linear on the three rows (the weight read once), split after."""
    module, gm = exported(READS["each row's last position"], X)
    with torch.no_grad():
        want = module(X)
    result = IndexBeforeLinear()(gm)
    (linear,) = linears(result.graph_module)
    assert len(reads_into(linear)) == 3
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(X), want, atol=1e-6, rtol=1e-6)


def test_reads_of_sizes_known_at_run_time_alone_are_one_linear_with_sizes_from_the_run():
    """Exported with a dynamic number of tokens, a read of every token (``y[0]``) has a size only the run
    knows: the merged linear splits its rows by sizes it takes at run time, for any number of tokens."""
    torch.manual_seed(0)
    module = Head(lambda y: (y[:, -1], y[0], y[1:3, 1:3])).eval()
    tokens = torch.export.Dim("tokens", min=4, max=64)
    gm = torch.export.export(module, (X,), dynamic_shapes={"x": {1: tokens}}).module()
    result = IndexBeforeLinear()(gm)
    (linear,) = linears(result.graph_module)
    assert len(reads_into(linear)) == 3
    for n in (5, 9, 4):
        x = torch.randn(3, n, 8)
        with torch.no_grad():
            torch.testing.assert_close(result.graph_module(x), module(x), atol=1e-6, rtol=1e-6)


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


def invoke_reads(marked: bool):
    """A graph as a program that only reads gets it: each invoke's rows of the head's output (``capture``),
    then ``[:, p]`` with ``p`` an input of the graph (marked as fed an int when ``marked``)."""
    g = torch.fx.Graph()
    x, w, p = g.placeholder("x"), g.placeholder("w"), g.placeholder("p")
    x.meta["val"] = torch.empty(3, 5, 8, device="meta")
    if marked:
        p.meta["fxpatch_number"] = True
    head = g.call_function(aten.linear.default, (x, w))
    head.meta["val"] = torch.empty(3, 5, 13, device="meta")
    reads = [g.call_function(operator.getitem, (g.call_function(capture, (head, a, b)), (slice(None), p)))
             for a, b in ((0, 1), (1, 3))]
    g.output(tuple(reads))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def test_an_invokes_rows_read_at_a_position_fed_as_a_number_move_above_the_linear():
    w = torch.randn(13, 8)
    want = invoke_reads(True)(X, w, -1)
    result = IndexBeforeLinear()(invoke_reads(True))
    (linear,) = linears(result.graph_module)
    assert [r.target for r in reads_into(linear)] == [operator.getitem, operator.getitem]
    for p in (-1, 2, -4):
        torch.testing.assert_close(result.graph_module(X, w, p), invoke_reads(False)(X, w, p), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(result.graph_module(X, w, -1), want, atol=1e-6, rtol=1e-6)


def test_an_index_input_not_known_to_be_a_number_keeps_the_linear_whole():
    """A tensor there could be a mask that reaches the last dim: nothing moves."""
    gm = invoke_reads(False)
    code = gm.code
    result = IndexBeforeLinear()(gm)
    assert not result.modified and result.graph_module.code == code
