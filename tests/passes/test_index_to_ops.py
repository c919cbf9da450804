"""``IndexToOps``: ``t[index]`` at a graph input int is aten select/slice/unsqueeze ops, with the same values
for every kind of basic index; compiled with dynamic sizes, one graph serves every position, where dynamo
makes the int of ``t[:, p]`` a constant and compiles again for the next."""

from __future__ import annotations

import operator

import torch
import torch._dynamo
import torch._dynamo.testing

from fxpatch.passes import IndexToOps

aten = torch.ops.aten


def lowered(fn, ints: tuple[int, ...]) -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(fn)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i in ints:
        inputs[i].meta["fxpatch_number"] = True
    return IndexToOps()(gm).graph_module


def strides(t: torch.Tensor) -> list[int]:
    """A view's strides where they mean something: a dim of size 1 has any stride (unsqueeze gives another)."""
    return [s for s, n in zip(t.stride(), t.shape) if n > 1]


def getitems(gm: torch.fx.GraphModule) -> int:
    return sum(n.target is operator.getitem for n in gm.graph.nodes)


INDEXES = {  # each a function of (x, p, q) with x of shape (4, 6, 5, 3)
    "[:, p]": lambda x, p, q: x[:, p],
    "[p, q]": lambda x, p, q: x[p, q],
    "[:, p:q]": lambda x, p, q: x[:, p:q],
    "[None, p, :, q]": lambda x, p, q: x[None, p, :, q],
    "[..., p]": lambda x, p, q: x[..., p],
    "[..., p, None]": lambda x, p, q: x[..., p, None],
    "[..., None, p:q]": lambda x, p, q: x[..., None, p:q],
    "[1, ..., q, :]": lambda x, p, q: x[1, ..., q, :],
    "[:, None, p, ..., None, q::2]": lambda x, p, q: x[:, None, p, ..., None, q::2],
    "[p:, q]": lambda x, p, q: x[p:, q],
}


def test_every_basic_index_at_graph_ints_equals_the_index_and_is_ops():
    x = torch.randn(4, 6, 5, 3)
    for name, fn in INDEXES.items():
        gm = lowered(fn, (1, 2))
        assert getitems(gm) == 0, name
        for p, q in ((0, 1), (2, -1), (-3, 2), (-1, -2)):
            want = fn(x, p, q)
            got = gm(x, p, q)
            assert got.shape == want.shape and torch.equal(got, want), (name, p, q)
            assert got._base is x and strides(got) == strides(want), (name, "a view of x, as the index is")


def test_an_index_without_a_graph_int_or_with_a_tensor_is_left_as_it_is():
    def with_tensor(x, p, q):
        return x[torch.tensor([0, 1]), p]

    assert getitems(lowered(INDEXES["[:, p]"], ())) == 1  # p not known to be an int
    assert getitems(lowered(with_tensor, (1,))) == 1
    assert not IndexToOps()(torch.fx.symbolic_trace(INDEXES["[:, p]"])).modified


def test_a_compiled_read_at_a_position_compiles_once_for_every_position():
    """The plain function, compiled with dynamic sizes, compiles again for a new ``p`` (this test checks
    that, so that it shows when dynamo no longer needs the pass); the pass's graph compiles once."""
    x = torch.randn(4, 6, 5, 3)
    fn = INDEXES["[:, p]"]
    torch._dynamo.reset()
    plain = torch._dynamo.testing.CompileCounterWithBackend("eager")
    for p in (2, 3, 4):
        torch.compile(fn, backend=plain, dynamic=True)(x, p, 0)
    assert plain.frame_count > 1
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(lowered(fn, (1, 2)), backend=counter, dynamic=True)
    for p in (2, 3, 4, 5):
        torch.testing.assert_close(compiled(x, p, 0), fn(x, p, 0), atol=0, rtol=0)
    assert counter.frame_count == 1
