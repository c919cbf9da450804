"""``SpecializeNegativeInts``: an int input fed a negative value is that constant in the graph, which computes
what it did, and inductor with dynamic sizes indexes it right (it does not with the int as an input)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from fxpatch.passes import SpecializeNegativeInts


def read(x: torch.Tensor, p: int) -> torch.Tensor:
    """A position read through a flattened computed tensor: inductor indexes it as ``(p + i) % numel``."""
    return (x * 2).reshape(-1)[p:]


def specialized(p: int) -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(read)
    _, position = [n for n in gm.graph.nodes if n.op == "placeholder"]
    position.meta["fxpatch_int"] = p
    return SpecializeNegativeInts()(gm).graph_module


def test_the_input_has_no_users_and_the_graph_computes_the_same():
    x = torch.randn(10, 96)
    for p in (-24, -1, -960):
        gm = specialized(p)
        _, position = [n for n in gm.graph.nodes if n.op == "placeholder"]
        assert not position.users
        assert torch.equal(gm(x, 0), read(x, p))  # the value fed is not read


def test_a_graph_with_no_input_marked_is_left_as_it_is_and_a_non_negative_mark_is_refused():
    gm = torch.fx.symbolic_trace(read)
    code = gm.code
    result = SpecializeNegativeInts()(gm)
    assert not result.modified and result.graph_module.code == code
    with pytest.raises(ValueError, match="only a negative int"):
        specialized(3)


def test_inductor_with_dynamic_sizes_reads_a_negative_position_right_once_it_is_a_constant():
    """Compiled with dynamic sizes, the plain function reads memory before the tensor at p = -24 (this test
    checks that, so that it shows when torch's inductor no longer needs the pass); the pass's graph equals
    eager at p = -24, also for another size of ``x``."""
    x = torch.randn(10, 96)
    torch._dynamo.reset()
    wrong = torch.compile(read, dynamic=True)(x, -24)
    torch._dynamo.reset()
    compiled = torch.compile(specialized(-24), dynamic=True)
    for value in (x, torch.randn(7, 40)):
        torch.testing.assert_close(compiled(value, -24), read(value, -24), atol=0, rtol=0)
    assert not torch.allclose(wrong, read(x, -24))
