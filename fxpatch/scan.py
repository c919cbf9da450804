"""``model.scan(...)``: a trace in which nothing real runs.

The block is recorded and checked as in ``model.trace``, then the program runs once on fake tensors
(``torch._subclasses.FakeTensor``) of the shapes and dtypes the real run would have (each module
value's shape comes from the model's export, with the batch and sequence sizes of these inputs),
as NNsight's ``scan`` runs the forward under a fake-tensor mode. Saved values are those fake
tensors: their ``.shape``, ``.dtype`` and ``.device`` are the real run's, they hold no data, and
ops on them give fake tensors again. The model's weights are not read and nothing is computed;
a write of the wrong shape, or an op that would fail, raises ``ShapeError`` at its line.

Example::

    with model.scan("The Eiffel Tower is in") as tracer:
        h = model.transformer.h[0].output.save()
    h.shape   # torch.Size([1, 6, 768]), a FakeTensor
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from .export import TRACING_LOCK
from .inputs import left_pad
from .passes.diagnostics import ShapeError
from .passes.functionalize_program import _fake, _Interpreter, _quiet_fake_log, _raise_at
from .runner import _feeds, bind_values, chains_of, phase_outputs, root_specs
from .tracing import Tracer


class ScanTracer(Tracer):
    """``model.scan(inputs=None)``: record as ``trace`` does, run on fake tensors (see the module docstring).

    After the block, ``tracer.batch`` holds the padded inputs; ``tracer.graph`` is ``None`` (no
    graph runs).
    """

    kind = "scan"

    def _check_changes_after_use(self) -> None:
        """Nothing to refuse: a scan runs on fake tensors, so only shapes matter, not values changed since
        (of outside tensors or of the model's weights)."""

    def _run(self) -> None:
        with self.model._lock:
            run_scan(self)


def run_scan(tracer: ScanTracer) -> None:
    """Run a scan's program on fake tensors of the run's shapes and bind the saved (fake) values."""
    model = tracer.model
    rows = [r for invoke in tracer.invokes for r in invoke.rows]
    batch = left_pad(rows, model.pad_token_id, model._input_facts()[2])
    tracer.batch = batch
    sg = model.site_graph("forward")
    inputs = [batch.input_ids, batch.attention_mask]
    if "position_ids" in sg.input_names:
        inputs.append(batch.position_ids)
    program = tracer.program_of(0)
    outputs = phase_outputs(tracer, 0)
    program.output(tuple(outputs))
    modules = {n.target: model._model.get_submodule(n.target) for n in program.nodes if n.op == "call_module"}
    with TRACING_LOCK:
        specs, sizes = root_specs(sg, inputs)
        saved = fake_run(program, chains_of(sg), modules, specs, _feeds(program, {}), sizes)
    bind_values(tracer, dict(zip(outputs, saved)))


def fake_run(program: torch.fx.Graph, chains, modules: dict, specs: dict, feeds: list, sizes: dict) -> list[Any]:
    """The program's saved values, run in NNsight's order on fake tensors with the sizes ``sizes``."""
    interp = _Interpreter(program, chains, snapshots=False, modules=modules)
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    flat = [_fake(mode, specs[r], sizes=sizes) for r in interp.roots] + [_fake(mode, v) for v in feeds]
    n_saved = len(interp.output.args[0]) if interp.output else 0
    with _quiet_fake_log(), mode, torch.no_grad():
        try:
            out = interp(*flat)
        except ShapeError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure is the user's op, reported at its line
            _raise_at(interp.current, e)
    return list(out[:n_saved])
