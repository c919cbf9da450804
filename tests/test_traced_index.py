"""A read at a position computed in the trace (``fxpatch/traced_index.py``) equals eager torch's read."""

from __future__ import annotations

import torch

from tests.conftest import PROMPT_1, layers
from tests.reference import paths, run_alone


def test_reads_at_a_traced_position_equal_the_hooked_models(lm):
    """``p`` is where layer 0's output has its largest norm after the first token (a traced 0-d tensor); layer
    1's output read at ``p`` as a position, at ``p - len`` (negative: from the end), as a bare index and
    between numbers and slices, each equal the plain model's layer 1 output at that position."""
    envoys, _ = layers(lm)
    with lm.trace(PROMPT_1):
        p = envoys[0].output[0, 1:].norm(dim=-1).argmax() + 1
        h = envoys[1].output
        at = h[:, p].save()
        from_end = h[0, p - h.shape[1]].save()
        bare = h[0][p].save()
        mixed = h[0:1, p, 2:7].save()
        doubled = (h[:, p] * 2).save()
    run = run_alone(lm, PROMPT_1, capture=[paths(lm).layer(0), paths(lm).layer(1)])
    first, second = run.outputs[paths(lm).layer(0)], run.outputs[paths(lm).layer(1)]
    position = int(first[0, 1:].norm(dim=-1).argmax()) + 1
    for got, want in ((at, second[:, position]), (from_end, second[0, position]), (bare, second[0][position]),
                      (mixed, second[0:1, position, 2:7]), (doubled, second[:, position] * 2)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_traced_index_that_is_not_a_0d_integer_reads_as_torch_indexes_with_it(lm):
    """A traced 1-d index tensor (the two largest norms' positions) is torch's advanced indexing, recorded as
    written: the read equals eager torch's."""
    envoys, _ = layers(lm)
    with lm.trace(PROMPT_1):
        top = envoys[0].output[0].norm(dim=-1).topk(2).indices
        picked = envoys[1].output[:, top].save()
    run = run_alone(lm, PROMPT_1, capture=[paths(lm).layer(0), paths(lm).layer(1)])
    top_ref = run.outputs[paths(lm).layer(0)][0].norm(dim=-1).topk(2).indices
    torch.testing.assert_close(picked, run.outputs[paths(lm).layer(1)][:, top_ref], atol=1e-5, rtol=1e-5)
