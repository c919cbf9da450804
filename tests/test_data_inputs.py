"""Numbers a researcher sweeps are data: traces that differ only in them reuse one rewritten graph.

Token positions and slice bounds in a tensor index and scalars used as values are graph inputs
(``fxpatch/data_inputs.py``); module choice, dims and op kinds are structure. Every run is checked
against the plain HF model edited by hooks (``tests/reference.py``), so a graph reused for a program it
does not fit would show as wrong logits.
"""

from __future__ import annotations

import pytest
import torch

from fxpatch.errors import ShapeError
from tests.reference import run_alone
from tests.test_differential import close, envoy

PROMPTS = [[5, 17, 42, 8, 99, 3, 61, 7], [11, 4, 23, 70, 2, 38, 9, 15]]  # token ids, the same length


def layer_path(lm, i: int) -> str:
    return f"transformer.h.{i}" if hasattr(lm._model, "transformer") else f"model.layers.{i}"


def hidden(out):
    return out[0] if isinstance(out, tuple) else out


def patched(lm, p: int, scale: float, layer: int = 1) -> torch.Tensor:
    """Prompt 0's layer output at ``p`` (its own row's position) times ``scale`` written into prompt 1's."""
    with lm.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            h = hidden(envoy(lm, layer_path(lm, layer)).output)[:, p]
        with tracer.invoke(PROMPTS[1]):
            hidden(envoy(lm, layer_path(lm, layer)).output)[:, p] = h * scale
            logits = lm.lm_head.output[:, -1].save()
    return logits


def reference(lm, p: int, scale: float, layer: int = 1) -> torch.Tensor:
    path = layer_path(lm, layer)
    donor = run_alone(lm, PROMPTS[0], capture=[path]).outputs[path]

    def write(out):
        h = hidden(out).clone()
        h[:, p] = hidden(donor)[:, p] * scale
        return (h, *out[1:]) if isinstance(out, tuple) else h
    return run_alone(lm, PROMPTS[1], outputs={path: write}).logits[-1:]


def test_positions_and_scales_reuse_one_graph_per_sign(lm):
    """A sweep over positions and scales builds one graph for non-negative positions and one for negative
    ones (Python's indexing differs by sign), and each run equals the hook reference."""
    lm.cache_clear()
    for p, scale in [(0, 2.0), (3, -0.5), (5, 1e-3), (-1, 3.0), (-4, 0.25), (2, 1.0), (-2, 7.5)]:
        close(patched(lm, p, scale), reference(lm, p, scale), f"position {p}, scale {scale}")
    info = lm.cache_info()
    assert (info.hits, info.misses, info.currsize) == (5, 2, 2), info


def test_a_read_with_slice_bounds_is_one_graph_for_all_bounds(lm):
    path = layer_path(lm, 0)
    want = hidden(run_alone(lm, PROMPTS[1], capture=[path]).outputs[path])
    lm.cache_clear()
    for a, b, scale in [(0, 2, 1.0), (1, 4, 2.0), (3, 8, -1.0)]:
        with lm.trace(PROMPTS[1]):
            got = (hidden(envoy(lm, path).output)[:, a:b] * scale).save()
        close(got, want[:, a:b] * scale, f"[:, {a}:{b}] * {scale}")
    assert lm.cache_info().misses == 1


def test_module_dims_and_ops_are_structure(lm):
    """Another layer, dim or op is another program, with its own graph."""
    lm.cache_clear()
    patched(lm, -1, 2.0, layer=0)
    patched(lm, -1, 2.0, layer=1)
    assert lm.cache_info().misses == 2
    with lm.trace(PROMPTS[0]):
        a = hidden(envoy(lm, layer_path(lm, 0)).output).sum(dim=-1).save()
    with lm.trace(PROMPTS[0]):
        b = hidden(envoy(lm, layer_path(lm, 0)).output).sum(dim=1).save()
    assert a.shape != b.shape and lm.cache_info().misses == 4


def test_an_integer_scalar_stays_a_python_int(gpt2):
    """An int multiplier is structure (ints may size things), and keeps Python's int semantics: an int
    tensor times 2 stays an int tensor."""
    with gpt2.trace(PROMPTS[0]):
        ids = (gpt2.transformer.wte.input * 2).save()
    assert ids.dtype == torch.long
    assert torch.equal(ids[0], 2 * torch.tensor(PROMPTS[0], device=ids.device))


def test_a_position_out_of_range_is_refused_after_a_graph_was_reused(gpt2):
    """Guards keep a reused graph to the positions it fits; one past the width is the user's ShapeError."""
    patched(gpt2, 2, 1.0)
    with pytest.raises(ShapeError, match=r"test_data_inputs.py:\d+: this operation fails"):
        patched(gpt2, 40, 1.0)


def test_the_bound_of_a_position_is_a_guard_without_torchs_own(monkeypatch):
    """torch before 2.12 records no bound guard for a symbolic position in its fake ``select`` (seen on
    torch 2.11): a graph reused past the width then failed in the real run, with torch's IndexError. With
    such a ``select`` in place, a position past the end of a fresh model's prompt is still the user's
    ShapeError before the run."""
    from torch._subclasses import fake_impls
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    import fxpatch

    def select_without_bound(fake_mode, func, x, dim, index):  # torch 2.11's: no guard on index < size
        dim = dim if dim >= 0 else dim + x.dim()
        size, stride = list(x.size()), list(x.stride())
        start = index if guard_or_false(index >= 0) else index + size[dim]
        offset = x.storage_offset() + start * stride[dim]
        del size[dim], stride[dim]
        with fake_mode:
            return x.as_strided(size, stride, offset)

    monkeypatch.setitem(fake_impls.op_implementations_dict, torch.ops.aten.select.int, select_without_bound)
    lm = fxpatch.LanguageModel(fxpatch.TINY_GPT2)
    for p, scale in [(2, 1.0), (5, 2.0), (7, -1.0)]:  # a concrete check, then a symbolic one that serves p=7
        close(patched(lm, p, scale), reference(lm, p, scale), f"position {p}")
    assert any(getattr(v, "symbolic", None) for v in lm._checked.values())
    with pytest.raises(ShapeError, match=r"test_data_inputs.py:\d+: this operation fails.*index 40 is out of bounds"):
        patched(lm, 40, 1.0)


def test_compiled_positions_do_not_recompile(gpt2):
    """Under compile=True non-negative positions and scales are inputs of the compiled graph: no recompile."""
    import torch._dynamo

    torch._dynamo.reset()
    frames = []

    def run(p, scale):
        with gpt2.trace(compile=True) as tracer:
            with tracer.invoke(PROMPTS[0]):
                h = gpt2.transformer.h[1].output[:, p]
            with tracer.invoke(PROMPTS[1]):
                gpt2.transformer.h[1].output[:, p] = h * scale
                logits = gpt2.lm_head.output[:, -1].save()
        frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        return logits

    for p, scale in [(1, 2.0), (3, 0.5), (4, -1.0)]:
        close(run(p, scale), reference(gpt2, p, scale), f"compiled, position {p}")
    assert frames[0] >= 1 and frames[-1] == frames[0], frames


def test_compiled_reads_at_positions_compile_once_per_sign(gpt2):
    """A program that only reads (``h[:, p]``, ``h[:, p:]``: no functional rewrite, so torch's own indexing
    reaches dynamo, which made ``p`` a constant and compiled again for each value) compiles one graph for
    the positive positions and one for the negative ones (fxpatch/passes/index_to_ops.py and
    count_from_end.py), each read equal to the plain model's. Left out, each one compile more: 0 and 1
    (torch makes an int input of 0 or 1 a constant), -1 (``h[:, -1:]`` is one position: torch guards a
    size of 1 apart) and -8 (the first token: a slice from 0 is a guard of its own)."""
    import torch._dynamo

    torch._dynamo.reset()
    layer = hidden(run_alone(gpt2, PROMPTS[0], capture=["transformer.h.1"]).outputs["transformer.h.1"])
    frames = []
    for p in (2, 3, 6, -2, -3, -5, -7):
        with gpt2.trace(PROMPTS[0], compile=True):
            h = hidden(gpt2.transformer.h[1].output)
            row, tail = h[:, p].save(), h[:, p:].save()
        close(row, layer[:, p], f"compiled h[:, {p}]")
        close(tail, layer[:, p:], f"compiled h[:, {p}:]")
        frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert frames[0] >= 1 and frames[2] == frames[0] and frames[-1] == frames[3] == frames[0] + 1, frames


def test_a_0d_integer_tensor_of_the_users_indexes_as_its_int_and_is_data(lm):
    """Eager torch indexes with a 0-d integer tensor as with its int (``h[:, torch.tensor(-1)]`` is
    ``h[:, -1]``): as a position, a slice bound, a bare index and in a write, each equals the int's run, and a
    position reuses the int's graph (its value at the line is data)."""
    path = layer_path(lm, 1)
    close(patched(lm, torch.tensor(-2), 1.5), reference(lm, -2, 1.5), "patch at torch.tensor(-2)")
    lm.cache_clear()
    patched(lm, -1, 2.0)
    patched(lm, torch.tensor(-3), 2.0)
    assert lm.cache_info().misses == 1
    want = hidden(run_alone(lm, PROMPTS[1], capture=[path]).outputs[path])
    with lm.trace(PROMPTS[1]):
        out = hidden(envoy(lm, path).output)
        span = out[:, torch.tensor(2):torch.tensor(5)].save()
        tail = out[:, 1:torch.tensor(-1)].save()
        row = out[torch.tensor(0)].save()
    close(span, want[:, 2:5], "[:, tensor(2):tensor(5)]")
    close(tail, want[:, 1:-1], "[:, 1:tensor(-1)]")
    close(row, want[0], "[tensor(0)]")
