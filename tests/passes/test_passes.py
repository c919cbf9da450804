"""The graph passes on their own: what holds after each one runs."""

from __future__ import annotations

import operator

import pytest
import torch

from fxpatch.passes import InlineProgram, StripSites, check_program, functionalize_program
from fxpatch.passes.diagnostics import FlowError, Location, ShapeError
from fxpatch.passes.ops import capture, is_site, read_site, scatter, write_site
from fxpatch.runner import chains_of, copy_graph_module, root_specs

LOC = Location("user.py", 7, "x = ...")


def program(*ops, sg=None):
    """A program graph from ``(target, args)`` pairs; ``("save", i)`` marks node ``i`` saved.

    Each node waits, as NNsight's thread would, for the sites it reads or writes and for the one before it.
    """
    g = torch.fx.Graph()
    nodes, saved = [], []
    clock = -1
    chains = chains_of(sg) if sg is not None else None
    for target, args in ops:
        if target == "save":
            saved.append(nodes[args])
            continue
        args = tuple(nodes[a.index] if isinstance(a, Ref) else a for a in args)
        node = g.call_function(target, args)
        if target in (read_site, write_site):
            node.meta["fxpatch_site"] = args[0]
            clock = max(clock, chains.position[args[0]])
        node.meta.update(fxpatch_loc=Location("user.py", len(nodes) + 1), fxpatch_invoke=0, fxpatch_phase=0,
                         fxpatch_time=clock)
        nodes.append(node)
    g.output(tuple(saved))
    return g


def inline(gpt2, sg, prog, mutating=False, specs=None):
    chains = chains_of(sg)
    fp = functionalize_program(prog, chains, gpt2._model, {}, *(specs or ({}, {}))[:1], [], mutating,
                               (specs or ({}, {}))[1])
    return InlineProgram(fp)(copy_graph_module(sg.graph_module)).graph_module


class Ref:
    def __init__(self, index):
        self.index = index


@pytest.fixture(scope="module")
def site_graph(gpt2):
    return gpt2.site_graph("forward")


def flat_inputs(gpt2, site_graph, text="Madison square garden"):
    ids = torch.tensor([gpt2.tokenizer(text)["input_ids"]], device=gpt2.device)
    mask = torch.ones_like(ids)
    return site_graph.state_values(gpt2._model) + [ids, mask, (mask.cumsum(-1) - 1)]


def test_strip_sites_leaves_the_plain_model(gpt2, site_graph):
    gm = StripSites()(copy_graph_module(site_graph.graph_module)).graph_module
    assert not any(is_site(n) for n in gm.graph.nodes)
    assert any(is_site(n) for n in site_graph.graph_module.graph.nodes)  # the cached graph is untouched
    flat = flat_inputs(gpt2, site_graph)
    with torch.no_grad():
        ref = gpt2._model(input_ids=flat[-3]).logits
        torch.testing.assert_close(gm(*flat)[0], ref, atol=1e-5, rtol=1e-5)


def test_inline_places_capture_after_its_site_and_scatter_before_users(gpt2, site_graph):
    name = "transformer.h.1.output"
    prog = program((read_site, (name, 0, 1)),
                   (operator.mul, (Ref(0), 2.0)),
                   (write_site, (name, 0, 1, Ref(1))),
                   ("save", 0), sg=site_graph)
    gm = inline(gpt2, site_graph, prog)
    nodes = list(gm.graph.nodes)
    site = next(n for n in nodes if is_site(n) and n.args[1] == name)
    cap = next(n for n in nodes if n.target is capture)
    scat = next(n for n in nodes if n.target is scatter)
    # the capture reads the tensor at the site: the site's input, or (where ``.source`` put an operation's
    # site right under the module's, both naming one tensor) the value under that chain of sites
    under = site.args[0]
    while is_site(under):
        under = under.args[0]
    assert cap.args[0] in (site.args[0], under) and nodes.index(cap.args[0]) < nodes.index(cap) < nodes.index(scat)
    # every model node that used the site now uses the scattered value; the site feeds nothing but itself
    assert not [u for u in site.users if not is_site(u)]
    assert scat.users and all(nodes.index(u) > nodes.index(scat) for u in scat.users)
    assert scat.meta["fxpatch_loc"] == Location("user.py", 3) and scat.meta["fxpatch_role"] == "scatter"
    # the saved value is an extra output
    assert gm.graph.output_node().args[0][-1] is cap


def test_inline_rejects_a_value_flowing_backwards(gpt2, site_graph):
    prog = program((read_site, ("transformer.h.3.output", 0, 1)),
                   (write_site, ("transformer.h.1.output", 1, 2, Ref(0))), sg=site_graph)
    with pytest.raises(FlowError, match=r"user.py:2: transformer.h.1.output is written after .* backwards"):
        inline(gpt2, site_graph, prog)


def test_inline_rejects_a_write_upstream_of_a_read_in_one_invoke(gpt2, site_graph):
    prog = program((read_site, ("transformer.h.3.output", 0, 1)),
                   (write_site, ("transformer.h.1.output", 0, 1, 0.0)),
                   ("save", 0), sg=site_graph)
    with pytest.raises(FlowError, match="user.py:2: transformer.h.1.output is written after the model"):
        inline(gpt2, site_graph, prog)


def test_in_place_write_becomes_functional_scatter_ops(gpt2, site_graph):
    """x[:, -1] = 0 on a read: no mutating op is left, and the model after the site uses the new value."""
    name = "transformer.h.1.output"
    flat = flat_inputs(gpt2, site_graph)
    specs = root_specs(site_graph, flat[-3:])
    prog = program((read_site, (name, 0, None)),
                   (operator.setitem, (Ref(0), (slice(None), -1), 0.0)),
                   ("save", 0), sg=site_graph)
    gm = StripSites()(inline(gpt2, site_graph, prog, mutating=True, specs=specs)).graph_module
    assert not [n for n in gm.graph.nodes if getattr(n.target, "_schema", None) is not None
                and n.target._schema.is_mutable]
    with torch.no_grad():
        out = gm(*flat)
    saved = out[-1]
    assert saved[:, -1].abs().sum() == 0 and saved[:, 0].abs().sum() > 0

    def zero_last(module, args, output):
        output[:, -1] = 0
        return output

    handle = gpt2._model.transformer.h[1].register_forward_hook(zero_last)
    try:
        with torch.no_grad():
            ref = gpt2._model(input_ids=flat[-3]).logits
    finally:
        handle.remove()
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)


def test_check_program_names_the_line_of_a_bad_write(gpt2, site_graph):
    flat = flat_inputs(gpt2, site_graph)
    prog = program((write_site, ("transformer.wte.output", 0, 1, torch.zeros(5, 7, device=gpt2.device))), sg=site_graph)
    with pytest.raises(ShapeError, match=r"user.py:1: a value of shape \(5, 7\) does not fit transformer.wte.output"):
        check_program(prog, chains_of(site_graph), {}, *root_specs(site_graph, flat[-3:])[:1], [],
                      root_specs(site_graph, flat[-3:])[1])


def test_ops_capture_and_scatter():
    base = torch.arange(12.0).reshape(3, 4)
    assert capture(base, 0, None) is base
    torch.testing.assert_close(capture(base, 1, 2), base[1:2])
    out = scatter(base, 0.0, 1, 3)
    assert out[1:].eq(0).all() and out[0].eq(base[0]).all() and base[1].ne(0).all()
    torch.testing.assert_close(scatter(base, torch.ones(4), 0, None), torch.ones(3, 4))


def test_guards_as_python_agree_with_sympy():
    """``holds_for`` answers from the guards printed as one Python expression; sympy's answer is the
    reference, for the functions torch's shape guards use, at sizes on both sides of each guard."""
    import sympy
    from torch.utils._sympy.functions import CleanDiv, FloorDiv, Max, Min, Mod, PythonMod

    from fxpatch.passes.functionalize_program import CheckedProgram

    s0, s1 = sympy.symbols("s0 s1", integer=True, positive=True)
    p = sympy.Symbol("fxpatch_feed_0", integer=True)
    guards = [sympy.Ne(Mod(s0, 2), 1), FloorDiv(s1, 3) >= 1, s1 + p > 0, sympy.Lt(-s1, p), PythonMod(p, s1) < 5,
              Max(s0, s1) > 2, Min(s0, s1) <= 9, sympy.Eq(CleanDiv(s1 * 4, 4), s1), sympy.Ne(s0 * s1, 12), p < s1]
    seen = set()
    for a in range(1, 5):
        for b in (1, 2, 3, 5, 6, 9, 12, 13):
            for c in (-14, -13, -6, -1, 0, 1, 4, 5, 12, 13):
                sizes = {s0: a, s1: b, p: c}
                exact = {k: sympy.Integer(v) for k, v in sizes.items()}  # torch 2.9's Max/Min take no int
                expected = all(bool(g.xreplace(exact)) for g in guards)
                assert CheckedProgram(False, guards).holds_for(sizes) == expected, sizes
                seen.add(expected)
                for g in guards:  # each guard alone, so every one of them is seen failing and holding
                    assert CheckedProgram(False, [g]).holds_for(sizes) == bool(g.xreplace(exact)), (g, sizes)
    assert seen == {True, False}
    checked = CheckedProgram(False, guards)
    checked.holds_for({s0: 2, s1: 6, p: 1})
    assert checked.__dict__["_compiled"] is not None  # the printed form was used, not only sympy
    # a fraction is left to sympy: in floating point (1/3)*s1 <= 4 could differ at the boundary
    fraction = CheckedProgram(False, [sympy.Rational(1, 3) * s1 <= 4])
    assert [fraction.holds_for({s1: n}) for n in (11, 12, 13)] == [True, True, False]
    assert fraction.__dict__["_compiled"] is None
