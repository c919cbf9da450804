"""``CountFromEnd``: a position fed as ``m = 1 - p`` is used as ``size + 1 - m`` (a slice bound clamped at
0), so the graph computes what it computes with ``p``; compiled by inductor with dynamic
sizes, one graph reads right at every negative position (with ``p`` itself as the input it does not)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

from fxpatch.passes import CountFromEnd
from fxpatch.passes.count_from_end import fed, from_end_uses

aten = torch.ops.aten


def flat_tail(x: torch.Tensor, p: int) -> torch.Tensor:
    """A slice bound read through a flattened computed tensor: inductor indexes it as ``(p + i) % numel``."""
    return aten.slice.Tensor((x * 2).reshape(-1), 0, p)


def row_write(x: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """A select, a select_scatter and a slice_scatter at positions of dim 1."""
    y = x + 1
    row = aten.select.int(y, 1, p) * 3
    y = aten.select_scatter.default(y, row, 1, p)
    return aten.slice_scatter.default(y, aten.slice.Tensor(x, 1, q) * -1, 1, q)


def indexed(x: torch.Tensor, p: int, q: int, r: int) -> torch.Tensor:
    """``[...]`` indices: a position after a slice and a ``None``, a slice bound after ``...``."""
    return (x - 1)[:, None, p] + (x * 2)[..., q:r].sum(-1, keepdim=True)


def counted(fn, marked: tuple[int, ...]) -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(fn)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i in marked:
        inputs[i].meta["fxpatch_from_end"] = True
    return CountFromEnd()(gm).graph_module


def test_the_graph_fed_1_minus_p_computes_what_the_function_computes_with_p():
    x = torch.randn(6, 10, 4)
    for p in (-1, -7, -40, -240):
        torch.testing.assert_close(counted(flat_tail, (1,))(x, fed(p)), flat_tail(x, p), atol=0, rtol=0)
    for p, q in ((-1, -1), (-10, -3), (-4, -30)):  # q = -30: a slice bound before the start, clamped to 0
        torch.testing.assert_close(counted(row_write, (1, 2))(x, fed(p), fed(q)), row_write(x, p, q), atol=0, rtol=0)
    for p, q, r in ((-1, -3, -1), (-10, -4, -2), (-5, -9, -50)):
        torch.testing.assert_close(counted(indexed, (1, 2, 3))(x, fed(p), fed(q), fed(r)), indexed(x, p, q, r), atol=0,
                                   rtol=0)
    assert torch.equal(counted(indexed, (2,))(x, 3, fed(-1), -1), indexed(x, 3, -1, -1))  # the others as they are


def test_inductor_with_dynamic_sizes_reads_every_negative_position_right_from_one_graph():
    """Compiled with dynamic sizes, the plain function reads memory before the tensor at p = -24 (this test
    checks that, so that it shows when torch's inductor no longer needs the pass); the pass's graph equals
    eager at four negative positions and two sizes of ``x``, compiled once."""
    x = torch.randn(10, 96)
    torch._dynamo.reset()
    wrong = torch.compile(flat_tail, dynamic=True)(x, -24)
    assert not torch.allclose(wrong, flat_tail(x, -24))
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(counted(flat_tail, (1,)), backend=counter, dynamic=True)
    for value in (x, torch.randn(7, 40)):
        for p in (-24, -3, -2, -100):
            torch.testing.assert_close(compiled(value, fed(p)), flat_tail(value, p), atol=0, rtol=0)
    assert counter.frame_count == 1


def test_a_compiled_index_at_minus_1_shares_the_graph_of_the_other_negative_positions():
    """-1 is fed as 2: fed as 1, torch would make it a constant of the graph and compile again for -2."""
    def row(x, p):
        return aten.select.int(x * 2, 1, p)

    x = torch.randn(3, 10, 4)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(counted(row, (1,)), backend=counter, dynamic=True)
    for p in (-1, -2, -7, -10):
        torch.testing.assert_close(compiled(x, fed(p)), row(x, p), atol=0, rtol=0)
    assert counter.frame_count == 1 and fed(-1) == 2


def uses_of(fn, at: int):
    gm = torch.fx.symbolic_trace(fn)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return from_end_uses(inputs[at], set(inputs[1:])), gm


def test_from_end_uses_names_each_position_its_dim_and_kind():
    uses, _ = uses_of(indexed, 1)
    assert [(u.slot, u.dim, u.kind) for u in uses] == [((2, None), 1, "index")]  # [:, None, p]: dim 1
    uses, _ = uses_of(indexed, 3)
    assert [(u.slot, u.dim, u.kind) for u in uses] == [((1, "stop"), -1, "bound")]  # [..., q:r]: the last dim
    uses, _ = uses_of(row_write, 1)
    assert sorted((u.user.target.__name__, u.slot, u.dim, u.kind) for u in uses) == [
        ("select.int", 2, 1, "index"), ("select_scatter.default", 3, 1, "index")]


def test_a_position_with_another_use_is_not_counted_from_the_end_and_a_mark_on_it_is_refused():
    def as_dim(x, p):
        return aten.select.int(x, p, 0)

    def as_value(x, p):
        return x[:, p] * p

    def after_a_tensor(x, p):
        return x[torch.tensor([0, 1]), p]

    for fn in (as_dim, as_value, after_a_tensor):
        uses, gm = uses_of(fn, 1)
        assert uses is None, fn.__name__
    with pytest.raises(ValueError, match="has a use that is not a position"):
        counted(as_value, (1,))


def test_a_graph_with_no_input_marked_is_left_as_it_is():
    gm = torch.fx.symbolic_trace(flat_tail)
    code = gm.code
    result = CountFromEnd()(gm)
    assert not result.modified and result.graph_module.code == code
    assert not any(n.target is operator.sub for n in result.graph_module.graph.nodes)
