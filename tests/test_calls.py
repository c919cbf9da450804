"""A module the forward calls more than once: every call gets its own named sites.

The model is a tiny random GPT-2 whose second block is the first block again
(``transformer.h[1] = transformer.h[0]``), so ``transformer.h.0`` and all its
submodules run twice per forward and are reachable by two paths. The reference
is the plain model with ordinary forward hooks that record every call.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fxpatch import LanguageModel
from fxpatch.export import module_paths
from fxpatch.passes import InlineProgram, StripSites, functionalize_program
from fxpatch.passes.diagnostics import Location
from fxpatch.passes.ops import is_site, read_site, write_site
from fxpatch.runner import chains_of, copy_graph_module
from fxpatch.structure import flatten

from .conftest import PROMPT_1, assert_state_unchanged, state

BLOCK = "transformer.h.0"


def shared_block_gpt2(vocab_size: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=64))
    model.transformer.h[1] = model.transformer.h[0]
    return model.eval()


@pytest.fixture(scope="module")
def shared(tokenizer) -> LanguageModel:
    return LanguageModel(shared_block_gpt2(len(tokenizer)), tokenizer=tokenizer)


def graph_inputs(lm: LanguageModel, prompt: str = PROMPT_1) -> tuple[list, dict]:
    """The site graph's flat inputs for one unpadded prompt, and the same as model kwargs."""
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kwargs["position_ids"] = kwargs["attention_mask"].cumsum(-1) - 1
    sg = lm.site_graph("forward")
    return sg.state_values(lm._model) + [kwargs[name] for name in sg.input_names], kwargs


def hooked_calls(lm: LanguageModel, kwargs: dict, edits: dict | None = None) -> tuple[dict, torch.Tensor]:
    """``{(first path, kind): [tensor leaves of each call]}`` and the logits of a plain forward.

    ``edits`` maps ``(first path, call)`` to a function of that call's output (an ordinary hook edit).
    """
    seen: dict = defaultdict(list)
    handles = []
    for path, module in module_paths(lm._model)[0].items():
        def pre(mod, args, kwargs, path=path):
            seen[path, "inputs"].append(_tensor_leaves(path, "inputs", len(seen[path, "inputs"]), (args, kwargs)))

        def post(mod, args, output, path=path):
            call = len(seen[path, "output"])
            edit = (edits or {}).get((path, call))
            output = edit(output) if edit else output
            seen[path, "output"].append(_tensor_leaves(path, "output", call, output))
            return output
        handles += [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            logits = lm._model(**kwargs, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return dict(seen), logits


def _tensor_leaves(path: str, kind: str, call: int, value) -> dict[str, torch.Tensor]:
    """A call's tensors by the site name each should have (the naming scheme written out independently)."""
    mark = f"#{call}" if call else ""
    return {f"{path}.{kind}{mark}{key}" if path else f"{kind}{mark}{key}": leaf.detach().clone()
            for key, leaf in flatten(value)[0] if isinstance(leaf, torch.Tensor)}


def site_values(gm: torch.fx.GraphModule, flat: list) -> dict[str, torch.Tensor]:
    """Every site node's value in a run of ``gm``, by site name."""
    values = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if is_site(n):
                values[n.args[1]] = out
            return out
    with torch.no_grad():
        Record(gm).run(*flat)
    return values


def program(sg, *ops) -> torch.fx.Graph:
    """A one-invoke program of ``(read_site | write_site, args)`` with constant args; the reads are saved."""
    g = torch.fx.Graph()
    clock = -1
    for line, (target, args) in enumerate(ops, 1):
        node = g.call_function(target, args)
        clock = max(clock, chains_of(sg).position[args[0]])
        node.meta.update(fxpatch_loc=Location("user.py", line), fxpatch_invoke=0, fxpatch_phase=0,
                         fxpatch_site=args[0], fxpatch_time=clock)
    g.output(tuple(n for n in g.nodes if n.target is read_site))
    return g


def inline(lm, sg, prog, gm=None):
    fp = functionalize_program(prog, chains_of(sg), lm._model, {}, {}, [], mutating=False)
    return InlineProgram(fp)(gm if gm is not None else copy_graph_module(sg.graph_module)).graph_module


def test_a_shared_block_has_two_paths_and_its_sites_use_the_first(shared):
    model = shared._model
    paths = [p for p, m in model.named_modules(remove_duplicate=False) if m is model.transformer.h[0]]
    assert paths == ["transformer.h.0", "transformer.h.1"]
    assert "transformer.h.1" not in dict(model.named_modules())  # torch itself lists the module once
    sg = shared.site_graph("forward")
    assert sg.aliases["transformer.h.1"] == BLOCK and sg.aliases["transformer.h.1.mlp.c_fc"] == f"{BLOCK}.mlp.c_fc"
    for alias, path in sg.aliases.items():  # a module that never runs (attn_dropout here) has no entry at all
        assert (alias in sg.calls) == (path in sg.calls) == (alias in sg.modules)
        if path in sg.calls:
            assert sg.calls[alias] is sg.calls[path] and sg.modules[alias] is sg.modules[path]
    names = [n.args[1] for n in sg.graph_module.graph.nodes if is_site(n)]
    assert len(names) == len(set(names))
    assert not any(name.startswith("transformer.h.1.") for name in names)


def test_every_call_has_its_own_sites_with_that_calls_values(shared):
    sg = shared.site_graph("forward")
    flat, kwargs = graph_inputs(shared)
    calls, _ = hooked_calls(shared, kwargs)
    values = site_values(sg.graph_module, flat)
    assert len(calls[BLOCK, "output"]) == 2 and len(calls[f"{BLOCK}.mlp", "output"]) == 2
    assert [c.leaves for c in sg.calls[BLOCK]["output"]] == [[BLOCK + ".output"], [BLOCK + ".output#1"]]
    assert sg.calls[BLOCK]["inputs"][1].leaves[0] == BLOCK + ".inputs#1[0][0]"
    covered = set()
    for (path, kind), per_call in calls.items():
        recorded = sg.calls[path][kind]
        assert len(recorded) == len(per_call), (path, kind)
        assert recorded[0] is sg.modules[path][kind]
        for call, (sites, expected) in enumerate(zip(recorded, per_call)):
            names = {n for n, is_site_ in zip(sites.leaves, sites.is_site) if is_site_}
            if kind == "output":
                assert names == set(expected), (path, call)
            else:  # eager passes no attention mask where the export makes one, so compare what both have
                assert names & set(expected) and all(n in names for n in expected if "[0][0]" in n), (path, call)
            for name in names & set(expected):
                torch.testing.assert_close(values[name], expected[name], rtol=1e-5, atol=1e-6)
                covered.add(name)
            for name in names:
                assert sg.owner(name) == (path, kind) and sg.call_of(name) == call
    assert {n for n in values if "inputs" not in n} <= covered  # every output site is some module's call
    # positions follow execution: both calls of the block, and the mlp call inside each, in order
    order = [BLOCK + ".inputs[0][0]", f"{BLOCK}.mlp.output", BLOCK + ".output", BLOCK + ".inputs#1[0][0]",
             f"{BLOCK}.mlp.output#1", BLOCK + ".output#1", "lm_head.output"]
    assert [sg.position(n) for n in order] == sorted(sg.position(n) for n in order)
    # the two calls of the block really differ, so a name mix-up could not pass
    assert not torch.allclose(values[BLOCK + ".output"], values[BLOCK + ".output#1"])


def test_a_later_call_is_read_and_written_by_its_own_name(shared):
    sg = shared.site_graph("forward")
    flat, kwargs = graph_inputs(shared)
    second = f"{BLOCK}.mlp.output#1"
    prog = program(sg, (read_site, (second, 0, None)),
                   (write_site, (second, 0, None, 0.0)),
                   (read_site, (f"{BLOCK}.output#1", 0, None)))
    gm = StripSites()(inline(shared, sg, prog)).graph_module
    with torch.no_grad():
        logits, read_mlp, read_block = gm(*flat)
    calls, _ = hooked_calls(shared, kwargs)
    edited, ref_logits = hooked_calls(shared, kwargs, {(f"{BLOCK}.mlp", 1): torch.zeros_like})
    _, first_zeroed = hooked_calls(shared, kwargs, {(f"{BLOCK}.mlp", 0): torch.zeros_like})
    torch.testing.assert_close(read_mlp, calls[f"{BLOCK}.mlp", "output"][1][second], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(read_block, edited[BLOCK, "output"][1][BLOCK + ".output#1"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, first_zeroed, atol=1e-3)


def test_inline_refuses_two_site_nodes_with_one_name(shared):
    gm = copy_graph_module(shared.site_graph("forward").graph_module)
    later = next(n for n in gm.graph.nodes if is_site(n) and n.args[1] == BLOCK + ".output#1")
    later.args = (later.args[0], BLOCK + ".output")
    prog = program(shared.site_graph("forward"), (read_site, (BLOCK + ".output", 0, None)))
    with pytest.raises(ValueError, match=r"two site nodes are named 'transformer\.h\.0\.output'"):
        inline(shared, shared.site_graph("forward"), prog, gm)


def test_trace_reads_and_writes_the_first_call_as_nnsight_does(shared):
    # NNsight 0.8.1: a module reached by two paths has one envoy (h[1] is h[0]) and, outside
    # tracer.iter, .output is the module's first call
    before = state(shared)
    _, kwargs = graph_inputs(shared)
    calls, _ = hooked_calls(shared, kwargs)
    with shared.trace(PROMPT_1):
        first = shared.transformer.h[0].output.save()
        alias = shared.transformer.h[1].output.save()
    torch.testing.assert_close(first, calls[BLOCK, "output"][0][BLOCK + ".output"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alias, calls[BLOCK, "output"][0][BLOCK + ".output"], rtol=1e-5, atol=1e-6)
    with shared.trace(PROMPT_1):
        shared.transformer.h[0].mlp.output[:] = 0
        logits = shared.lm_head.output.save()
    _, ref = hooked_calls(shared, kwargs, {(f"{BLOCK}.mlp", 0): torch.zeros_like})
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert_state_unchanged(shared, before)
