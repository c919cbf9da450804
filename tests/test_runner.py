"""Rewritten graphs: cached by program structure, inspectable, reused for new values."""

from __future__ import annotations

import torch

from fxpatch import format_inserted
from tests.conftest import PROMPT_1, PROMPT_2


def patch(model, source, target):
    with model.trace() as tracer:
        with tracer.invoke(source):
            h = model.transformer.h[1].output[:, -1]
        with tracer.invoke(target):
            model.transformer.h[1].output[:, -1] = h
            out = model.lm_head.output[:, -1].save()
    return tracer, out


def test_same_program_reuses_the_rewritten_graph(gpt2):
    first, a = patch(gpt2, PROMPT_1, PROMPT_2)
    second, b = patch(gpt2, "The Eiffel Tower is in Paris", "_ _ _")  # other values, other lengths
    assert first.graph is second.graph
    assert not torch.equal(a, b)


def test_inserted_nodes_name_the_users_lines(gpt2):
    tracer, _ = patch(gpt2, PROMPT_1, PROMPT_2)
    rows = tracer.inserted
    roles = [r["role"] for r in rows]
    assert roles.count("capture") == 3 and roles.count("scatter") == 1
    scatter = next(r for r in rows if r["role"] == "scatter")
    assert scatter["site"] == "transformer.h.1.output" and scatter["line"].endswith("test_runner.py:16")
    table = format_inserted(rows)
    assert "scatter" in table and "test_runner.py:16" in table
    assert not [n for n in tracer.graph.graph.nodes if "site" in str(n.target)]


def test_program_key_tells_apart_functions_of_one_name():
    # targets are keyed through a cache, by identity: two closures of one qualified name differ
    from fxpatch.runner import program_key

    def program(target):
        g = torch.fx.Graph()
        x = g.placeholder("x")
        g.output(g.call_function(target, (x,)))
        return g

    def scale(k):
        def times(x):
            return x * k
        return times

    double, triple = scale(2), scale(3)
    assert double.__qualname__ == triple.__qualname__
    assert program_key(program(double)) == program_key(program(double))
    assert program_key(program(double)) != program_key(program(triple))
