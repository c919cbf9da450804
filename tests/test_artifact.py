"""``tracer.patched_module()``: a trace's program as a ``torch.nn.Module`` (``fxpatch/artifact.py``).

The module's logits and saved values are checked against the trace's own values and against the
plain Hugging Face model with hooks (``tests/reference.py``), on the trace's batch and on a batch
of other prompts with the same rows per invoke; then through ``torch.compile``, and through
``torch.export`` saved to a file and loaded in a Python process that never imports fxpatch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fxpatch.errors import FxpatchError, InputError
from tests.conftest import PROMPT_1, assert_state_unchanged, state
from tests.reference import paths, run_alone, set_last, token_ids, unpad
from tests.test_differential import close, envoy

GROUP = ["The Eiffel Tower is in Paris", "_ _ _"]  # invoke 0: two rows
SINGLE = PROMPT_1  # invoke 1: one row
OTHER_GROUP = ["hello there", "_ _ _ _"]
OTHER_SINGLE = "Paris is nice"


def steer_trace(lm, group, single, steer):
    """Steer invoke 0's layer-0 output at the last position, move its first row's steered value into
    invoke 1, save layer-1 and mlp-1 values; the logits are not read."""
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke(group):
            envoy(lm, p.layer(0)).output[:, -1] += steer
            source = envoy(lm, p.layer(0)).output[0, -1]
            h = envoy(lm, p.layer(1)).output[:, -1].save()
        with tracer.invoke(single):
            envoy(lm, p.layer(0)).output[:, -1] = source
            g = envoy(lm, p.mlp(1)).output.save()
    return tracer, h, g


def references(lm, group, single, steer):
    """The hooked model on each prompt alone: ``(runs in batch order, expected h, expected g)``."""
    p = paths(lm)

    def add_last(x):
        x = x.clone()
        x[:, -1] += steer
        return x

    steered = [run_alone(lm, q, outputs={p.layer(0): add_last}, capture=[p.layer(0), p.layer(1)]) for q in group]
    source = steered[0].outputs[p.layer(0)][0, -1]
    patched = run_alone(lm, single, outputs={p.layer(0): set_last(source)}, capture=[p.mlp(1)])
    h = torch.cat([r.outputs[p.layer(1)][:, -1] for r in steered])
    return steered + [patched], h, patched.outputs[p.mlp(1)]


def left_padded(lm, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of ``prompts``, padded with the model's pad id (as a trace pads)."""
    rows = [token_ids(lm, q) for q in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), lm.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(lm.device), mask.to(lm.device)


def check_against_references(lm, out, group, single, steer):
    logits, h, g = out
    refs, ref_h, ref_g = references(lm, group, single, steer)
    for row, ref in enumerate(refs):
        close(unpad(logits, row, len(ref.ids)), ref.logits, f"logits row {row}")
    close(h, ref_h, "saved layer-1 values")
    close(unpad(g, 0, len(refs[-1].ids)), ref_g[0], "saved mlp-1 value")


@pytest.fixture(scope="module")
def steered():
    """Per architecture: the model, the steering vector, the trace and its module."""
    cache = {}

    def make(lm):
        key = id(lm)
        if key not in cache:
            torch.manual_seed(0)
            steer = torch.randn(lm._model.config.hidden_size, device=lm.device)
            tracer, h, g = steer_trace(lm, GROUP, SINGLE, steer)
            cache[key] = steer, tracer, (h, g), tracer.patched_module()
        return cache[key]
    return make


def test_module_equals_trace_and_hooked_model(lm, steered):
    """On the trace's batch and on other prompts of other lengths with the same rows per invoke, the
    module's logits and saved values are the trace's and the hooked model's."""
    before = state(lm)
    steer, tracer, (h, g), module = steered(lm)
    assert module.model is lm._model and module.invoke_rows == [2, 1]
    batch = tracer.batch
    with torch.no_grad():
        out = module(batch.input_ids, batch.attention_mask)
    assert len(out) == 3
    close(out[1], h, "layer-1 value vs the trace")
    close(out[2], g, "mlp-1 value vs the trace")
    check_against_references(lm, out, GROUP, SINGLE, steer)

    ids, mask = left_padded(lm, OTHER_GROUP + [OTHER_SINGLE])
    assert ids.shape[1] != batch.input_ids.shape[1]
    with torch.no_grad():
        other = module(ids, mask)
    other_tracer, other_h, other_g = steer_trace(lm, OTHER_GROUP, OTHER_SINGLE, steer)
    assert torch.equal(other_tracer.batch.input_ids, ids)
    close(other[1], other_h, "layer-1 value vs the trace on other prompts")
    close(other[2], other_g, "mlp-1 value vs the trace on other prompts")
    check_against_references(lm, other, OTHER_GROUP, OTHER_SINGLE, steer)
    assert_state_unchanged(lm, before)


def test_module_keeps_the_steering_vector_it_was_made_with(gpt2, steered):
    """Tensors from outside the trace are copied into the module: changing them later changes nothing."""
    steer, tracer, _, module = steered(gpt2)
    batch = tracer.batch
    with torch.no_grad():
        first = module(batch.input_ids, batch.attention_mask)
    original = steer.clone()
    steer.mul_(3)
    try:
        with torch.no_grad():
            again = module(batch.input_ids, batch.attention_mask)
    finally:
        steer.copy_(original)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    refs, _, _ = references(gpt2, GROUP, SINGLE, original)
    close(unpad(again[0], 0, len(refs[0].ids)), refs[0].logits)


def test_compiled_module_equals_eager(gpt2, steered):
    _, tracer, _, module = steered(gpt2)
    compiled = torch.compile(module)
    ids, mask = left_padded(gpt2, OTHER_GROUP + [OTHER_SINGLE])
    for batch in ((tracer.batch.input_ids, tracer.batch.attention_mask), (ids, mask)):
        with torch.no_grad():
            eager, fast = module(*batch), compiled(*batch)
        for a, b in zip(eager, fast):
            close(b, a, "compiled vs eager")


# Loads the exported program and runs it on every batch given; fxpatch must stay out of the process.
LOADER = """
import importlib.abc, json, sys
class NoFxpatch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'fxpatch':
            raise ImportError('fxpatch imported by the loaded program')
sys.meta_path.insert(0, NoFxpatch())
import torch
args = json.loads(sys.argv[1])
program = torch.export.load(args['program']).module()
outputs = []
with torch.no_grad():
    for ids, mask in torch.load(args['inputs']):
        outputs.append([t.detach().cpu() for t in program(ids, mask)])
torch.save(outputs, args['outputs'])
assert not any(m.split('.')[0] == 'fxpatch' for m in sys.modules), 'fxpatch was imported'
print('fxpatch' in sys.modules)
"""


def test_exported_program_runs_without_fxpatch(lm, steered, tmp_path):
    """``torch.export.export`` + ``torch.export.save``; ``torch.export.load`` in ``python -c`` without
    fxpatch gives the module's values, on the trace's batch and on another sequence length."""
    _, tracer, _, module = steered(lm)
    batch = (tracer.batch.input_ids, tracer.batch.attention_mask)
    other = left_padded(lm, OTHER_GROUP + [OTHER_SINGLE])
    with torch.no_grad():
        ep = torch.export.export(module, batch, dynamic_shapes=module.dynamic_shapes)
    namespaces = {n.target.namespace for n in ep.graph.nodes if isinstance(n.target, torch._ops.OpOverload)}
    assert "fxpatch" not in namespaces
    path = tmp_path / "steered.pt2"
    torch.export.save(ep, path)
    torch.save([batch, other], tmp_path / "inputs.pt")  # on the model's device, where the program runs
    args = {"program": str(path), "inputs": str(tmp_path / "inputs.pt"), "outputs": str(tmp_path / "out.pt")}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "False"
    loaded = torch.load(tmp_path / "out.pt")
    for inputs, got in zip((batch, other), loaded):
        with torch.no_grad():
            expected = module(*inputs)
        assert len(got) == len(expected) == 3
        for a, b in zip(got, expected):
            close(a, b.cpu(), "loaded program vs module")


def test_wrong_row_count_is_refused(gpt2, steered):
    _, tracer, _, module = steered(gpt2)
    ids, mask = left_padded(gpt2, OTHER_GROUP)
    with pytest.raises(InputError) as e:
        module(ids, mask)
    message = str(e.value)
    assert message.startswith(f"{__file__}:")
    assert "runs batches of 3 rows (invoke 0: 2, invoke 1: 1), as its trace did; got 2 rows" in message
    assert message.splitlines()[-1].startswith("Pass 3 rows, in the trace's invoke order")
    with pytest.raises(InputError, match="must both have shape"):
        module(tracer.batch.input_ids, tracer.batch.attention_mask[:, 1:])


def test_patched_module_needs_a_finished_trace(gpt2):
    with gpt2.trace(PROMPT_1) as tracer:
        gpt2.transformer.h[0].output.save()
        with pytest.raises(FxpatchError, match="called inside the trace block") as e:
            tracer.patched_module()
    assert str(e.value).startswith(f"{__file__}:")
    with gpt2.trace(PROMPT_1) as tracer:
        h = gpt2.transformer.h[0].output.save()
        tracer.stop()
    assert h.shape[0] == 1
    with pytest.raises(FxpatchError, match="called tracer.stop()"):
        tracer.patched_module()
    with gpt2.generate(PROMPT_1, max_new_tokens=1) as tracer:
        gpt2.transformer.h[0].output.save()
    with pytest.raises(FxpatchError, match="made from model.trace"):
        tracer.patched_module()


def test_a_position_computed_from_the_width_follows_the_width(gpt2):
    """A program writing in place at a position computed from the width (``x.shape[1] // 2``) is traced with
    the width and the position symbolic: the module and its exported program write at each width's half."""
    with gpt2.trace("The Eiffel Tower is in Paris") as tracer:  # 9 tokens: position 4
        x = gpt2.transformer.h[0].output
        x[:, x.shape[1] // 2] = 0
        gpt2.transformer.h[1].output.save()
    module = tracer.patched_module()

    def zero_half(x):
        x = x.clone()
        x[:, x.shape[1] // 2] = 0
        return x

    ep = torch.export.export(module, (tracer.batch.input_ids, tracer.batch.attention_mask),
                             dynamic_shapes=module.dynamic_shapes).module()
    # 8, 9 and 10 tokens: positions 4, 4 and 5
    for prompt in ("The Colosseum is in Rome", "the weather today is", "The cat sat on the mat today"):
        ids, mask = left_padded(gpt2, [prompt])
        with torch.no_grad():
            logits, h = module(ids, mask)
            exported = ep(ids, mask)
        ref = run_alone(gpt2, prompt, outputs={"transformer.h.0": zero_half}, capture=["transformer.h.1"])
        close(logits[0], ref.logits)
        close(h, ref.outputs["transformer.h.1"])
        close(exported[1], h)
