"""``keep_appended``: which containers made before a trace hold its values, and which need no second look.

Its quick answers (the reference count, and the one-pass ``_hold_no_proxies``, for the common trace that puts
nothing into them) must agree with the full walk, which keeps account per container, on every shape of
container."""

from __future__ import annotations

import collections

import pytest

import fxpatch.saving
from fxpatch.saving import _hold_no_proxies, keep_appended
from tests.conftest import PROMPT_1

Pair = collections.namedtuple("Pair", "a b")


def structures(h) -> dict:
    """Containers as a notebook's variables hold them; ``h`` a traced value (``None``: none of them hold one)."""
    cycle: list = [1, 2]
    cycle.append(cycle)
    deep = inner = []
    for _ in range(40):
        inner.append([])
        inner = inner[0]
    out = {
        "dataset rows": [{"prompt": f"p{i}", "label": i, "tokens": [1, 2, 3]} for i in range(500)],
        "dict of lists": {"a": [1, 2], "b": [[3], ("x", 4.0)]},
        "namedtuple and tuples": [Pair([1], (2, (3,))), ((), ("s",))],
        "a cycle": cycle,
        "deeper than the one-pass walk goes": deep,
        "longer than the walk takes": list(range(fxpatch.saving._SCAN_LIMIT + 1)),
        "empty": [],
    }
    if h is not None:
        out.update({
            "a list holding one": [1, h],
            "a dict of lists holding one": {"a": [1, 2], "b": [[3], [h]]},
            "a tuple in a list holding one": [(1, (h,))],
            "rows holding one deep down": [{"x": [[[h]]]}] * 3,
        })
    return out


def scope(containers) -> list[dict]:
    """``containers`` as ``scope_of`` gives a frame's variables."""
    return [{f"c{i}": c for i, c in enumerate(containers)}]


def full_walk(tracer, containers):
    """``keep_appended`` with neither the reference count nor the one-pass answer: the walk alone."""
    saved = fxpatch.saving._hold_no_proxies, fxpatch.saving._held_elsewhere
    fxpatch.saving._hold_no_proxies = lambda tracer, containers: False
    fxpatch.saving._held_elsewhere = lambda tracer, frame: {0: 1}  # a reference no container's items explain
    try:
        return keep_appended(tracer, scope(containers))
    finally:
        fxpatch.saving._hold_no_proxies, fxpatch.saving._held_elsewhere = saved


@pytest.mark.parametrize("with_values", [False, True])
def test_the_one_pass_answer_agrees_with_the_full_walk(gpt2, with_values):
    with gpt2.trace(PROMPT_1) as tracer:
        h = gpt2.transformer.h[0].output[:, -1] if with_values else None
        for name, c in structures(h).items():
            one_pass = _hold_no_proxies(tracer, [c])
            kept, untouched = full_walk(tracer, [c])
            holds = "holding one" in name
            assert (kept == [c]) is holds, name
            if one_pass:  # said only where the full walk finds nothing and looks at everything
                assert not holds and kept == [] and untouched == [c], name
            assert one_pass is not (holds or name.startswith(("a cycle", "deeper", "longer"))), name
            got, untouched_now = keep_appended(tracer, scope([c]))
            assert got == kept, name
            if untouched_now is None:  # the count: no container holds a value (past the walk's limits too)
                assert not holds, name
            else:
                assert untouched_now == untouched, name
        out = gpt2.lm_head.output.save()
    assert out.shape[-1] == gpt2.config.vocab_size
