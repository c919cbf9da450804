"""Pass: propagate fake tensors of the real input shapes through the graph.

After it runs without error every node has ``meta["val"]`` (a fake tensor of
the shape it will have in the real run) and the real run will not fail on a
shape. An inserted node that fails raises ``ShapeError`` at the user's line;
nothing real has been computed.
"""

from __future__ import annotations

import logging

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.node import map_arg
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .diagnostics import ShapeError, location_of


def _shape(v) -> str:
    if isinstance(v, torch.Tensor):
        return str(tuple(v.shape))
    return repr(v)


class _LocatedFakeProp(FakeTensorProp):
    def run_node(self, n: torch.fx.Node):
        try:
            return super().run_node(n)
        except ShapeError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure is re-raised at the user's line
            loc = location_of(n)
            if loc is None:
                raise
            role = n.meta.get("fxpatch_role")
            vals = map_arg(n.args, lambda a: a.meta.get("val"))
            if role == "scatter":
                base, value, start, stop = vals
                rows = base[start:stop]
                problem = (f"a value of shape {_shape(value)} does not fit {n.meta.get('fxpatch_site', 'the site')}, "
                           f"whose rows for this invoke have shape {_shape(rows)}")
                hint = "Assign a value of that shape (or one that broadcasts to it)."
            else:
                problem = f"this operation fails on values of the shapes the run will have: {e}".strip()
                hint = "Check the shapes (print the saved .shape after a trace) and index or reshape to match."
            raise ShapeError(problem, at=loc, hint=hint) from e


class CheckShapes(PassBase):
    """``CheckShapes(example_inputs)(gm)``: ``example_inputs`` are the real flat inputs."""

    def __init__(self, example_inputs: list):
        super().__init__()
        self.example_inputs = example_inputs

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        # a failing op is reported as a ShapeError; torch's own log of it would only repeat it
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        level = fake_log.level
        fake_log.setLevel(logging.CRITICAL)
        try:
            _LocatedFakeProp(gm, mode).propagate(*self.example_inputs)
        finally:
            fake_log.setLevel(level)
        return PassResult(gm, False)
