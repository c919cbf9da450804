"""``NonNegativeInputs``: a graph fed the negation of a negative position computes what it did, and inductor
with dynamic sizes indexes it right (it does not with the negative position fed as it is)."""

from __future__ import annotations

import operator

import torch
import torch._dynamo

from fxpatch.passes import NonNegativeInputs


def read(x: torch.Tensor, p: int) -> torch.Tensor:
    """A position read through a flattened computed tensor: inductor indexes it as ``(p + i) % numel``."""
    return (x * 2).reshape(-1)[p:]


def negated_graph() -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(read)
    _, p = [n for n in gm.graph.nodes if n.op == "placeholder"]
    p.meta["fxpatch_negated"] = True
    return NonNegativeInputs()(gm).graph_module


def test_the_graph_uses_the_input_only_through_its_negation_and_computes_the_same():
    gm = negated_graph()
    _, p = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [u.target for u in p.users] == [operator.neg]
    x = torch.randn(10, 96)
    for position in (-24, -1, -960):
        assert torch.equal(gm(x, -position), read(x, position))


def test_a_graph_with_no_input_marked_is_left_as_it_is():
    gm = torch.fx.symbolic_trace(read)
    code = gm.code
    result = NonNegativeInputs()(gm)
    assert not result.modified and result.graph_module.code == code


def test_inductor_with_dynamic_sizes_reads_negative_positions_right_through_the_negation():
    """Compiled with dynamic sizes, the plain function reads memory before the tensor at p = -24 (this test
    checks that, so that it shows when torch's inductor no longer needs the pass); the pass's graph, fed 24,
    equals eager at p = -24 and -3 with one compiled graph."""
    x = torch.randn(10, 96)
    torch._dynamo.reset()
    wrong = torch.compile(read, dynamic=True)(x, -24)
    torch._dynamo.reset()
    compiled = torch.compile(negated_graph(), dynamic=True)
    for position in (-24, -3):
        torch.testing.assert_close(compiled(x, -position), read(x, position), atol=0, rtol=0)
    assert not torch.allclose(wrong, read(x, -24))
