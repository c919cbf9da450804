"""A module the forward calls more than once: every call gets its own named sites.

The model is a tiny random GPT-2 whose second block is the first block again
(``transformer.h[1] = transformer.h[0]``), so ``transformer.h.0`` and all its
submodules run twice per forward and are reachable by two paths. The reference
is the plain model with ordinary forward hooks that record every call.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fxpatch
import fxpatch.generation
import fxpatch.runner
from fxpatch import LanguageModel
from fxpatch.active import active_tracer
from fxpatch.errors import FxpatchError
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
    # every output site is some module's call (the sites of .source operations are test_source.py's)
    assert {n for n in values if "inputs" not in n and not n.startswith("source.") and ".source." not in n} <= covered
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


# -- addressing a call through the public API: tracer.iter / tracer.all(), as NNsight 0.8.1 numbers them --------

MLP = f"{BLOCK}.mlp"
_SOURCE = open(__file__).read().splitlines()


def line_of(tag: str) -> int:
    """The line number of the one line of this file that ends with the marker ``# line: <tag>``."""
    hits = [i + 1 for i, text in enumerate(_SOURCE) if text.rstrip().endswith("# line: " + tag)]
    assert len(hits) == 1, f"marker {tag!r} found on lines {hits}"
    return hits[0]


def check_message(err: Exception, tag: str, *words: str) -> None:
    """``err`` is an ``FxpatchError`` whose message starts with this file's line of ``tag`` and says ``words``."""
    assert isinstance(err, FxpatchError), repr(err)
    msg = str(err)
    match = re.match(r"(.+?):(\d+): ", msg.splitlines()[0])
    assert match and os.path.samefile(match.group(1), __file__), msg
    assert int(match.group(2)) == line_of(tag), f"expected line {line_of(tag)} ({tag}), got:\n{msg}"
    for word in words:
        assert word.lower() in msg.lower(), f"{word!r} missing from:\n{msg}"


def close(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_tracer_iter_reads_every_call_in_one_trace(shared):
    # NNsight 0.8.1 gives these calls for this program (checked against it): step k pins the body's first
    # read to call k; for k > 0 the reads after it take the next call of their module at or after it
    before = state(shared)
    _, kwargs = graph_inputs(shared)
    calls, _ = hooked_calls(shared, kwargs)
    with shared.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            outs = fxpatch.save([])
            for _ in tracer.iter[0:2]:
                outs.append(shared.transformer.h[0].output)
        with tracer.invoke(PROMPT_1):
            for _ in tracer.iter[1]:
                second_mlp = shared.transformer.h[0].mlp.output.save()
                second = shared.transformer.h[1].output.save()  # an alias path: the same module, call 1
                logits = shared.lm_head.output.save()  # runs once: its only call
        with tracer.invoke(PROMPT_1):
            every = fxpatch.save([])
            for _ in tracer.all():  # to the last call of the module the body reads first
                every.append(shared.transformer.h[0].inputs[0][0])
                every.append(shared.transformer.h[1].mlp.output)
            after = shared.transformer.ln_f.output.save()  # fxpatch runs what follows an open loop
    assert len(outs) == 2 and len(every) == 4
    for k in (0, 1):
        close(outs[k], calls[BLOCK, "output"][k][BLOCK + (f".output#{k}" if k else ".output")])
        mark = f"#{k}" if k else ""
        close(every[2 * k], calls[BLOCK, "inputs"][k][f"{BLOCK}.inputs{mark}[0][0]"])
        close(every[2 * k + 1], calls[MLP, "output"][k][f"{MLP}.output{mark}"])
    close(second_mlp, calls[MLP, "output"][1][MLP + ".output#1"])
    close(second, calls[BLOCK, "output"][1][BLOCK + ".output#1"])
    close(logits, calls["lm_head", "output"][0]["lm_head.output"])
    close(after, calls["transformer.ln_f", "output"][0]["transformer.ln_f.output"])
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)  # the two calls differ: a mix-up could not pass
    assert_state_unchanged(shared, before)


def test_tracer_iter_writes_only_the_call_it_names(shared):
    before = state(shared)
    _, kwargs = graph_inputs(shared)
    plain, _ = hooked_calls(shared, kwargs)
    edited, ref = hooked_calls(shared, kwargs, {(MLP, 1): torch.zeros_like})
    _, first_zeroed = hooked_calls(shared, kwargs, {(MLP, 0): torch.zeros_like})
    doubled, ref_doubled = hooked_calls(shared, kwargs, {(BLOCK, 1): lambda out: out * 2})
    with shared.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            first = shared.transformer.h[0].output.save()
            for _ in tracer.iter[1]:
                shared.transformer.h[1].mlp.output[:] = 0  # an alias path of the mlp, its call 1
                second = shared.transformer.h[0].output.save()  # after the edit: call 1 sees it
            logits = shared.lm_head.output.save()
        with tracer.invoke(PROMPT_1):  # another invoke's rows and calls are untouched
            untouched = fxpatch.save([])
            for _ in tracer.iter[[0, 1]]:
                untouched.append(shared.transformer.h[0].output)
        with tracer.invoke(PROMPT_1):  # assignment: the read on the right and the write take call 1
            for _ in tracer.iter[1]:
                shared.transformer.h[0].output = shared.transformer.h[0].output * 2
            logits_doubled = shared.lm_head.output.save()
    close(first, plain[BLOCK, "output"][0][BLOCK + ".output"])
    close(second, edited[BLOCK, "output"][1][BLOCK + ".output#1"])
    close(logits, ref)
    assert not torch.allclose(logits, first_zeroed, atol=1e-3)  # not the first call's edit
    assert not torch.allclose(second, plain[BLOCK, "output"][1][BLOCK + ".output#1"], atol=1e-3)
    close(untouched[0], plain[BLOCK, "output"][0][BLOCK + ".output"])
    close(untouched[1], plain[BLOCK, "output"][1][BLOCK + ".output#1"])
    close(logits_doubled, ref_doubled)
    close(doubled[BLOCK, "output"][0][BLOCK + ".output"], plain[BLOCK, "output"][0][BLOCK + ".output"])
    assert_state_unchanged(shared, before)


@pytest.mark.parametrize("case", ["no-call-2", "runs-once", "none-after", "negative", "slice-step", "no-invoke"])
def test_tracer_iter_refuses_a_call_that_does_not_exist_before_running(shared, monkeypatch, case):
    # where NNsight 0.8.1 warns and cuts the loop short (or fails), fxpatch stops at the line, before the model runs
    before = state(shared)
    monkeypatch.setattr(fxpatch.runner, "run_trace", lambda tracer: pytest.fail("the model ran"))
    with pytest.raises(FxpatchError) as info:
        if case == "no-call-2":
            with shared.trace(PROMPT_1) as tracer:
                for _ in tracer.iter[0:3]:
                    shared.transformer.h[0].output.save()  # line: no-call-2
        elif case == "runs-once":
            with shared.trace(PROMPT_1) as tracer:
                for _ in tracer.iter[1]:
                    shared.lm_head.output.save()  # line: runs-once
        elif case == "none-after":
            with shared.trace(PROMPT_1) as tracer:
                for _ in tracer.iter[1]:
                    shared.transformer.h[0].output.save()
                    shared.transformer.h[1].mlp.output.save()  # line: none-after
        elif case == "negative":
            with shared.trace(PROMPT_1) as tracer:
                for _ in tracer.iter[-1]:  # line: negative
                    shared.transformer.h[0].output.save()
        elif case == "slice-step":
            with shared.trace(PROMPT_1) as tracer:
                for _ in tracer.iter[0:4:2]:  # line: slice-step
                    shared.transformer.h[0].output.save()
        else:
            with shared.trace() as tracer:
                for _ in tracer.iter[1]:  # line: no-invoke
                    with tracer.invoke(PROMPT_1):
                        shared.transformer.h[0].output.save()
    words = {"no-call-2": ("call 2 of transformer.h.0.output", "runs 2 times", "tracer.iter[0:2]"),
             "runs-once": ("call 1 of lm_head.output", "runs once", "tracer.iter[0:1]"),
             "none-after": ("transformer.h.1.mlp.output (the same module as transformer.h.0.mlp)",
                            "no call left after call 1 of transformer.h.0.output", "order the model runs them"),
             "negative": ("tracer.iter[-1]", "no negative index", "tracer.all()"),
             "slice-step": ("slice step", "tracer.iter[[0, 2]]"),
             "no-invoke": ("outside an invoke", "tracer.invoke")}[case]
    check_message(info.value, case, *words)
    assert active_tracer() is None
    assert_state_unchanged(shared, before)


@pytest.fixture(scope="module")
def shared_norm(tokenizer) -> LanguageModel:
    """A GPT-2 whose two blocks share one ``ln_1``: it runs twice per forward and generation step."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64))
    model.transformer.h[1].ln_1 = model.transformer.h[0].ln_1
    return LanguageModel(model.eval(), tokenizer=tokenizer)


def test_generate_reads_the_prompt_pass_call_and_refuses_later_steps_of_a_module_run_twice(shared_norm,
                                                                                           monkeypatch):
    # NNsight numbers such a module's calls across steps (its tracer.iter[1] is the prompt pass's second
    # call, checked against 0.8.1), so reading it by step would silently differ: fxpatch refuses
    before = state(shared_norm)
    norm = "transformer.h.0.ln_1"
    ids = torch.tensor([shared_norm.tokenizer(PROMPT_1)["input_ids"]])
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "position_ids": torch.arange(ids.shape[1])[None]}
    calls, _ = hooked_calls(shared_norm, kwargs)
    with shared_norm.generate(PROMPT_1, max_new_tokens=2) as tracer:
        prompt_pass = shared_norm.transformer.h[1].ln_1.output.save()  # outside tracer.iter: call 0
        last = fxpatch.save([])
        for _ in tracer.all():
            last.append(shared_norm.transformer.h[1].output[:, -1])  # runs once per step: by step, as before
    close(prompt_pass, calls[norm, "output"][0][norm + ".output"])
    close(last[0], calls["transformer.h.1", "output"][0]["transformer.h.1.output"][:, -1])
    assert len(last) == 2
    monkeypatch.setattr(fxpatch.generation, "generate", lambda tracer: pytest.fail("the model ran"))
    with pytest.raises(FxpatchError) as info:
        with shared_norm.generate(PROMPT_1, max_new_tokens=2) as tracer:
            for _ in tracer.all():
                shared_norm.transformer.h[0].ln_1.output.save()  # line: per-step
    check_message(info.value, "per-step", "transformer.h.0.ln_1.output", "runs 2 times per generation step",
                  "prompt pass")
    assert active_tracer() is None
    assert_state_unchanged(shared_norm, before)
