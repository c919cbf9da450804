"""NNsight idioms that run unchanged: ``.save()`` on any object, unpacking values of known length,
containers made outside the trace, and Python control flow refused with what to write instead.

Each test is an example from NNsight's documentation (README, docs/patterns/*.md), run on the tiny
GPT-2 and the tiny Llama (``lm``), with values checked against the plain HF model run prompt by
prompt with forward hooks (``tests.reference``).
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from fxpatch.errors import ControlFlowError, FxpatchError
from fxpatch.proxy import Proxy
from tests.conftest import PROMPT_1, PROMPT_2
from tests.reference import paths, run_alone, token_ids, unpad
from tests.test_differential import close, envoy
from tests.test_errors import raises_cleanly
from tests.test_generation import hf_generate

EIFFEL = "The Eiffel Tower is in Paris"
SHORT = "_ _ _"
PROMPTS = [PROMPT_1, EIFFEL, SHORT]
_SOURCE = open(__file__, encoding="utf-8").read().splitlines()


def line_of(tag: str) -> int:
    hits = [i + 1 for i, text in enumerate(_SOURCE) if text.rstrip().endswith("# line: " + tag)]
    assert len(hits) == 1, tag
    return hits[0]


def at_line(err: Exception, tag: str, *words: str) -> None:
    """``err``'s message starts with this file's ``path:line`` of ``tag`` and says ``words``."""
    msg = str(err)
    where = msg.splitlines()[0].split(": ", 1)[0]
    path, _, lineno = where.rpartition(":")
    assert os.path.samefile(path, __file__) and lineno == str(line_of(tag)), msg
    for word in words:
        assert word.lower() in msg.lower(), f"{word!r} missing from:\n{msg}"


def heads(lm) -> tuple[int, int]:
    config = lm._model.config
    return config.num_attention_heads, config.hidden_size // config.num_attention_heads


def mounted() -> bool:
    return hasattr([], "save")


# -- 10. .save() on a list or dict -------------------------------------------------------------------------
def test_save_on_a_list_and_a_dict_made_in_the_trace(lm):
    """NNsight README: ``logits = list().save()`` inside the trace, appended to in each invoke."""
    p = paths(lm)
    assert not mounted()
    with lm.trace() as tracer:
        assert mounted()
        logits = list().save()
        hidden = dict().save()
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                logits.append(lm.lm_head.output[:, -1])
                hidden[prompt] = envoy(lm, p.layer(1)).output
    assert not mounted()
    assert isinstance(logits, list) and isinstance(hidden, dict) and len(logits) == len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        ref = run_alone(lm, prompt, capture=[p.layer(1)])
        close(logits[i][0], ref.logits[-1], prompt)
        close(unpad(hidden[prompt], 0, len(ref.ids)), ref.outputs[p.layer(1)][0], prompt)


def test_save_is_on_objects_only_while_a_trace_records(gpt2, llama):
    """Mounted while any trace records (nested traces: until the outer one ends), removed after,
    also when the block raises; outside a trace ``x.save()`` is an AttributeError again."""
    with pytest.raises(ValueError, match="boom"):
        with gpt2.trace(PROMPT_1):
            assert mounted()
            raise ValueError("boom")
    assert not mounted()
    with gpt2.trace(PROMPT_1):
        # only plain containers get it: a library that lists a class's attributes at import time
        # (torch inductor lists its ops handler's) must not find a save on every object
        assert not hasattr(object(), "save")
        outer = list().save()
        outer.append(gpt2.lm_head.output[:, -1])
        with llama.trace(PROMPT_1):
            inner = list().save()
            inner.append(llama.lm_head.output[:, -1])
        assert mounted()  # the outer trace still records
        assert isinstance(inner[0], torch.Tensor)  # the inner trace ran at its exit
    assert not mounted()
    with pytest.raises(AttributeError):
        [].save()
    for lm, saved in ((gpt2, outer), (llama, inner)):
        close(saved[0][0], run_alone(lm, PROMPT_1).logits[-1])


def test_save_acts_on_the_calling_threads_trace(gpt2, llama):
    """Two threads record at once, each filling its own ``list().save()``; a third thread that
    records nothing gets a clear error from ``.save()`` while they record."""
    barrier = threading.Barrier(3, timeout=60)
    results: dict = {}
    errors: list = []

    def record(lm, prompt):
        try:
            with lm.trace(prompt):
                saved = list().save()
                saved.append(lm.lm_head.output[:, -1])
                barrier.wait()  # all three threads are here: two recording, one not
                barrier.wait()
            results[prompt] = (lm, saved)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    def bystander():
        try:
            barrier.wait()
            try:
                [].save()
            except FxpatchError as e:
                results["bystander"] = e
            barrier.wait()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=record, args=(gpt2, PROMPT_1)),
               threading.Thread(target=record, args=(llama, PROMPT_2)), threading.Thread(target=bystander)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert ".save() was called outside a trace" in str(results["bystander"])
    for prompt in (PROMPT_1, PROMPT_2):
        lm, saved = results[prompt]
        assert len(saved) == 1
        close(saved[0][0], run_alone(lm, prompt).logits[-1], prompt)
    assert not mounted()


# -- 11. values of known length unpack -----------------------------------------------------------------
def test_tuple_module_output_unpacks(lm):
    """``out, *rest = attn.output``: the attention module's tuple output."""
    p = paths(lm)
    with lm.trace(PROMPT_1):
        out, *rest = envoy(lm, p.attn(0)).output
        out = out.save()
    ref = run_alone(lm, PROMPT_1, capture=[p.attn(0)])
    expected, *expected_rest = ref.outputs[p.attn(0)]
    close(out, expected)
    assert len(rest) == len(expected_rest) and all(r is None for r in expected_rest)
    assert rest == expected_rest


def test_shape_unpacks_per_head_read_and_ablation(lm):
    """docs/patterns/per-head-attention.md: ``B, S, H = attn_out.shape``, then ``view(B, S, n_heads,
    head_dim)``; reading one head, and zeroing one head in place through the view."""
    p = paths(lm)
    n_heads, head_dim = heads(lm)
    head = 1
    with lm.trace(PROMPT_1):
        attn_out = envoy(lm, p.attn(1)).output[0]
        B, S, H = attn_out.shape
        assert isinstance(B, int) and isinstance(H, int) and isinstance(S, Proxy)  # the width is known at the run
        per_head = attn_out.view(B, S, n_heads, head_dim).save()
    n = len(token_ids(lm, PROMPT_1))
    assert (B, S, H) == (1, n, n_heads * head_dim) and type(S) is int
    ref = run_alone(lm, PROMPT_1, capture=[p.attn(1)])
    close(per_head, ref.outputs[p.attn(1)][0].view(1, n, n_heads, head_dim))

    with lm.trace(PROMPT_1):
        attn = envoy(lm, p.attn(1)).output[0]
        B, S, _ = attn.shape
        reshaped = attn.view(B, S, n_heads, head_dim)
        reshaped[:, :, head, :] = 0  # the view shares storage: the model goes on with the head zeroed
        logits = lm.lm_head.output[:, -1, :].save()

    def zero_head(output):
        out = output[0].clone()
        out.view(*out.shape[:2], n_heads, head_dim)[:, :, head] = 0
        return (out, *output[1:])

    ref = run_alone(lm, PROMPT_1, outputs={p.attn(1): zero_head})
    close(logits[0], ref.logits[-1])


def test_split_unpacks_into_q_k_v(lm):
    """``q, k, v = c_attn.output.split(n_embd, dim=2)`` (GPT-2's fused projection); Llama's separate
    projections merged and split with sizes, as NNsight's vLLM guide does for a fused qkv."""
    p = paths(lm)
    attn = p.attn(0)
    if hasattr(lm._model, "transformer"):
        n_embd = lm._model.config.hidden_size
        with lm.trace(PROMPT_1):
            q, k, v = envoy(lm, f"{attn}.c_attn").output.split(n_embd, dim=2)
            q, k, v = q.save(), k.save(), v.save()
        ref = run_alone(lm, PROMPT_1, capture=[f"{attn}.c_attn"])
        expected = ref.outputs[f"{attn}.c_attn"].split(n_embd, dim=2)
    else:
        projections = [f"{attn}.{name}_proj" for name in "qkv"]
        with lm.trace(PROMPT_1):
            outputs = [envoy(lm, path).output for path in projections]
            sizes = [o.shape[-1] for o in outputs]  # traced ints: split sizes the run knows
            q, k, v = torch.cat(outputs, dim=-1).split(sizes, dim=-1)
            q, k, v = q.save(), k.save(), v.save()
        ref = run_alone(lm, PROMPT_1, capture=projections)
        expected = [ref.outputs[path] for path in projections]
    for name, got, want in zip("qkv", (q, k, v), expected):
        close(got, want, name)


def test_chunk_and_unbind_unpack(lm):
    """``chunk`` into a fixed number of parts, ``unbind`` of the invoke's rows, ``max``'s named tuple."""
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke([PROMPT_1, EIFFEL]):
            h = envoy(lm, p.layer(0)).output
            first_half, second_half = h.chunk(2, dim=-1)
            row_a, row_b = h.unbind(0)
            values, indices = lm.lm_head.output[:, -1].max(-1)
            saved = [x.save() for x in (first_half, second_half, row_a, row_b, values, indices)]
            rows = len(h)
    first_half, second_half, row_a, row_b, values, indices = saved
    assert rows == 2
    for row, (prompt, row_value) in enumerate(((PROMPT_1, row_a), (EIFFEL, row_b))):
        ref = run_alone(lm, prompt, capture=[p.layer(0)])
        n = len(ref.ids)
        expected = ref.outputs[p.layer(0)][0]
        half = expected.shape[-1] // 2
        close(unpad(first_half, row, n), expected[:, :half])
        close(unpad(second_half, row, n), expected[:, half:])
        close(row_value[row_value.shape[0] - n:], expected)
        assert indices[row] == ref.logits[-1].argmax()
        close(values[row], ref.logits[-1].max())


def test_sequence_width_from_shape_is_an_int_after_the_trace(lm):
    """The width unpacked from ``.shape`` is a traced int inside the block (usable in ops) and a plain
    int in the user's variables after it, without ``.save()``: the padded width of the batch."""
    p = paths(lm)
    widths = []
    with lm.trace() as tracer:
        for prompt in (PROMPT_1, SHORT):
            with tracer.invoke(prompt):
                B, S, H = envoy(lm, p.layer(0)).output.shape
                widths.append(S)
                last = envoy(lm, p.layer(0)).output[:, S - 1].save()  # S used in a later op
    width = max(len(token_ids(lm, prompt)) for prompt in (PROMPT_1, SHORT))
    assert type(S) is int and S == width and B == 1 and H == lm._model.config.hidden_size
    assert widths == [width, width]
    ref = run_alone(lm, SHORT, capture=[p.layer(0)])
    close(last[0], ref.outputs[p.layer(0)][0, -1])


def test_unknown_length_says_why(lm):
    """Splitting the sequence dim makes a number of parts only the run knows: a clear error, before
    the model runs, at the user's line."""
    p = paths(lm)
    with raises_cleanly(lm, ControlFlowError) as info:
        with lm.trace(PROMPT_1):
            h = envoy(lm, p.layer(0)).output
            first, second = h.split(4, dim=1)  # line: split-width
    at_line(info.value, "split-width", "unpacking", "padded sequence width", "chunk")
    with raises_cleanly(lm, ControlFlowError) as info:
        with lm.trace(PROMPT_1):
            h = envoy(lm, p.layer(0)).output
            for _position in h[0]:  # line: iterate-width
                pass
    at_line(info.value, "iterate-width", "iterating", "padded sequence width")
    with raises_cleanly(lm, ControlFlowError) as info:
        with lm.trace(PROMPT_1):
            h = envoy(lm, p.layer(0)).output
            total = h.sum()
            a, b = total  # line: zero-d
    at_line(info.value, "zero-d", "0-d tensor")


# -- 12. containers made outside the trace -------------------------------------------------------------
def test_list_made_outside_is_filled_mean_ablation(lm):
    """docs/patterns/ablation.md, mean ablation: ``acts = []`` outside the trace, ``acts.append(...)``
    in each invoke with no ``.save()``; the mean is then written into another prompt."""
    p = paths(lm)
    mlp = p.mlp(1)
    ref_prompts = PROMPTS
    acts = []
    token_counts = []
    with lm.trace() as tracer:
        for prompt in ref_prompts:
            with tracer.invoke(prompt):
                acts.append(envoy(lm, mlp).output[:, -1, :])
                token_counts.append(envoy(lm, mlp).output.shape[1])
    assert all(isinstance(a, torch.Tensor) for a in acts)
    width = max(len(token_ids(lm, prompt)) for prompt in ref_prompts)
    assert token_counts == [width] * len(ref_prompts) and sum(token_counts) == width * len(ref_prompts)
    refs = [run_alone(lm, prompt, capture=[mlp]).outputs[mlp][:, -1] for prompt in ref_prompts]
    for prompt, got, want in zip(ref_prompts, acts, refs):
        close(got, want, prompt)
    mean_act = torch.stack(acts, dim=0).mean(dim=0)

    with lm.trace(PROMPT_2):
        envoy(lm, mlp).output[:, -1, :] = mean_act
        logits = lm.lm_head.output[:, -1, :].save()

    def set_mean(output):
        output = output.clone()
        output[:, -1] = torch.stack(refs).mean(0)
        return output

    close(logits[0], run_alone(lm, PROMPT_2, outputs={mlp: set_mean}).logits[-1])


def test_dicts_made_outside_are_filled(lm):
    """A dict (and a list inside one) made before the trace, filled inside it: real values after."""
    p = paths(lm)
    cache = {"layers": []}
    with lm.trace(PROMPT_1):
        for i in range(p.n_layers):
            cache["layers"].append(envoy(lm, p.layer(i)).output[:, -1])
        cache["logits"] = lm.lm_head.output[:, -1]
    ref = run_alone(lm, PROMPT_1, capture=[p.layer(i) for i in range(p.n_layers)])
    assert len(cache["layers"]) == p.n_layers
    for i, got in enumerate(cache["layers"]):
        close(got, ref.outputs[p.layer(i)][:, -1], f"layer {i}")
    close(cache["logits"][0], ref.logits[-1])


# a module-level dataset, as a notebook holds one: every trace in this module looks through it
DATASET = [{"prompt": f"row {i}", "label": i, "tokens": [1, 2, 3, 4], "acts": []} for i in range(3000)]


def test_containers_made_outside_in_every_shape_are_filled(lm):
    """A defaultdict, a tuple made in the trace and put into two lists, a list deep in a module-level
    dataset of 3,000 rows: each holds real values after the trace, equal to the hooked model's; the
    dataset's other rows are the same objects, unchanged."""
    from collections import defaultdict

    p = paths(lm)
    by_layer = defaultdict(list)
    first, second = [], []
    before = [(row, dict(row), list(row["tokens"])) for row in DATASET[:5]]
    with lm.trace(PROMPT_1):
        for i in range(p.n_layers):
            by_layer[i].append(envoy(lm, p.layer(i)).output[:, -1])
        pair = (envoy(lm, p.layer(0)).output[:, -1], lm.lm_head.output[:, -1])
        first.append(pair)
        second.append(pair)
        DATASET[-1]["acts"].append(lm.lm_head.output[:, -1])
    ref = run_alone(lm, PROMPT_1, capture=[p.layer(i) for i in range(p.n_layers)])
    for i in range(p.n_layers):
        close(by_layer[i][0], ref.outputs[p.layer(i)][:, -1], f"layer {i}")
    for holder in (first, second):
        assert type(holder[0]) is tuple
        close(holder[0][0], ref.outputs[p.layer(0)][:, -1], "the tuple's layer 0")
        close(holder[0][1][0], ref.logits[-1], "the tuple's logits")
    close(DATASET[-1]["acts"].pop()[0], ref.logits[-1], "the dataset's last row")
    for row, fields, tokens in before:
        assert row == fields and row["tokens"] == tokens and row["acts"] == []


@pytest.mark.parametrize("at", [0, 250, 499])
def test_a_list_among_many_lists_of_numbers_is_filled(gpt2, at):
    """A dataset of token lists with one list filled in the trace: the walk ends early at a depth whose
    lists hold numbers only, and must not do so when one of them (first, in the middle or last) holds a
    traced value."""
    rows = [[i, i + 1, i + 2] for i in range(500)]
    rows[at] = []
    with gpt2.trace(PROMPT_1):
        rows[at].append(gpt2.lm_head.output[:, -1])
    assert type(rows[at][0]) is torch.Tensor, type(rows[at][0])
    close(rows[at][0][0], run_alone(gpt2, PROMPT_1).logits[-1], "filled")
    assert all(row == [i, i + 1, i + 2] for i, row in enumerate(rows) if i != at)


def test_past_the_walk_limit_saved_values_are_bound_and_unsaved_ones_say_so(gpt2):
    """Containers made before the trace are looked through up to 100,000 elements in all. Past that, a
    value put into one is bound only if ``.save()``d; an unsaved one is a clear error when used, never a
    stale or wrong value."""
    from fxpatch.errors import ProxyScopeError

    data = [[]] + [list(range(9000)) for _ in range(12)]  # 108,000 numbers; CPython walks lists from the end
    with gpt2.trace(PROMPT_1):
        data[0].append(gpt2.lm_head.output[:, -1].save())
        data[0].append(gpt2.lm_head.output[:, -1] * 2)
    close(data[0][0][0], run_alone(gpt2, PROMPT_1).logits[-1], "saved")
    with pytest.raises(ProxyScopeError, match="not saved"):
        data[0][1] + 1
    assert [len(row) for row in data[1:]] == [9000] * 12


def test_a_large_container_first_in_scope_does_not_hide_one_filled_in_the_trace(gpt2):
    """The walk's limit is spent breadth first over all the containers in scope: a large one bound before
    ``acts`` (as a notebook's dataset is) cannot use it up before ``acts`` itself is looked at."""
    data = [[0] * 10 for _ in range(10_000)]  # 110,000 elements: the walk's 100,000 end inside its rows
    acts = []
    with gpt2.trace(PROMPT_1):
        acts.append(gpt2.lm_head.output[:, -1])
    assert type(acts[0]) is torch.Tensor, type(acts[0])
    close(acts[0][0], run_alone(gpt2, PROMPT_1).logits[-1], "filled")
    assert len(data) == 10_000 and all(row == [0] * 10 for row in data)


class _CountedRow(list):
    """A dataset row that counts how often its length is asked (the walk over containers asks each one)."""

    asked = 0

    def __len__(self) -> int:
        type(self).asked += 1
        return super().__len__()


def test_a_dataset_in_scope_is_not_walked_when_the_block_puts_nothing_into_containers(gpt2):
    """Counting references tells that no container made before the trace holds its values: the rows of a
    dataset in scope are not looked at, by a block that reads and saves (its ``acts`` filled at top level
    are found without them too), while a value put deep into one still sends the walk through them."""
    dataset = [_CountedRow([i, i + 1]) for i in range(200)]
    acts: list = []
    _CountedRow.asked = 0
    with gpt2.trace(PROMPT_1):
        h = gpt2.transformer.h[0].output
        shape = h.shape.save()  # a proxy whose owner is h
        logits = gpt2.lm_head.output[:, -1].save()
        acts.append(h[:, -1])
    assert _CountedRow.asked == 0
    ref = run_alone(gpt2, PROMPT_1, capture=["transformer.h.0"])
    close(logits[0], ref.logits[-1], "saved")
    close(acts[0][0], ref.outputs["transformer.h.0"][:, -1][0], "appended at top level")
    assert tuple(shape) == tuple(ref.outputs["transformer.h.0"].shape)
    with gpt2.trace(PROMPT_1):
        dataset[7].append(gpt2.lm_head.output[:, -1])
    assert _CountedRow.asked > 0
    close(dataset[7][2][0], ref.logits[-1], "put into a row")
    assert [list(row) for row in dataset[:7]] == [[i, i + 1] for i in range(7)]


def test_a_notebooks_namespace_binds_its_saved_values_without_looking_into_each_name(gpt2):
    """A trace at a module's top level (a notebook cell: its variables are the module's), with thousands of
    names as a long notebook session has (``_i1``, ``_1``, ...) and a dataset: the saved value and the list
    filled at top level hold real values after it (found by counting references: the names are copied as
    the block starts, not each looked into), the dataset's rows are not looked at, the other names are as
    they were."""
    namespace = {"gpt2": gpt2, "PROMPT_1": PROMPT_1,
                 "dataset": [_CountedRow([i, i + 1]) for i in range(200)], "acts": []}
    namespace.update({f"_i{i}": f"cell {i}" for i in range(3000)})
    namespace.update({f"_{i}": [i] for i in range(3000)})
    _CountedRow.asked = 0
    exec(compile("with gpt2.trace(PROMPT_1):\n"
                 "    logits = gpt2.lm_head.output[:, -1].save()\n"
                 "    acts.append(gpt2.transformer.h[0].output[:, -1])\n", "<cell>", "exec"), namespace)
    assert _CountedRow.asked == 0
    ref = run_alone(gpt2, PROMPT_1, capture=["transformer.h.0"])
    close(namespace["logits"][0], ref.logits[-1], "saved")
    close(namespace["acts"][0][0], ref.outputs["transformer.h.0"][:, -1][0], "appended")
    assert namespace["_i2999"] == "cell 2999" and namespace["_2999"] == [2999]


def _fill_from_a_closure(lm, holder: dict, h=None):
    """``h`` is an argument that a nested function captures: held by a cell, named twice in the code."""
    p = paths(lm)
    with lm.trace(PROMPT_1):
        h = envoy(lm, p.layer(0)).output[:, -1]
        doubled = lambda: h * 2  # noqa: E731
        holder["deep"]["acts"].append(h)
    return doubled


def test_values_held_by_closures_and_put_deep_into_containers_are_filled(lm):
    """A traced value held by a variable a closure captures, and put two levels into a dict made before the
    trace: the reference count of a captured variable is not taken for a reason to skip the walk."""
    p = paths(lm)
    holder = {"deep": {"acts": []}}
    doubled = _fill_from_a_closure(lm, holder)
    got = holder["deep"]["acts"]
    assert [type(v) for v in got] == [torch.Tensor], got
    want = run_alone(lm, PROMPT_1, capture=[p.layer(0)]).outputs[p.layer(0)][:, -1]
    close(got[0], want, "the captured value")
    close(doubled(), want * 2, "through the closure")


def test_a_modules_tuple_value_put_into_containers_made_outside_is_a_tuple_of_real_values(lm):
    """``acts.append(attn.output)``: the module's tuple value, held by a list and a dict made before the
    trace and by a tuple in the list, is a plain tuple of real values in each after it (as the module
    returned it in the hooked model), not the trace's view of it."""
    p = paths(lm)
    acts, by_name = [], {}
    with lm.trace(PROMPT_1):
        out = envoy(lm, p.attn(0)).output
        acts.append(out)
        by_name["attn"] = out
        acts.append((out, "label"))
    want = run_alone(lm, PROMPT_1, capture=[p.attn(0)]).outputs[p.attn(0)]
    assert type(want) is tuple
    for got in (acts[0], by_name["attn"], acts[1][0]):
        assert type(got) is tuple and len(got) == len(want), type(got)
        for g, w in zip(got, want):
            if w is None:
                assert g is None
            else:
                close(g[0], w[0], "the attention output")
    assert acts[1][1] == "label"


def test_list_made_outside_is_filled_at_every_generation_step(lm):
    """``hs = []`` before ``model.generate``, appended to at each step: each step's last-position
    hidden state, as plain HF ``generate`` computes it."""
    p = paths(lm)
    n = 3
    hs = []
    with lm.generate(PROMPT_1, max_new_tokens=n) as tracer:
        for _step in tracer.all():
            hs.append(envoy(lm, p.layer(p.n_layers - 1)).output[:, -1])
    expected: list = []
    hf_generate(lm, PROMPT_1, n, capture=(lm._model.get_submodule(p.layer(p.n_layers - 1)), expected))
    assert len(hs) == n
    for step, (got, want) in enumerate(zip(hs, expected)):
        close(got, want, f"step {step}")


# -- 15. Python control flow on traced values ----------------------------------------------------------
@pytest.mark.parametrize("what", ["if", "tolist", "float", "range"])
def test_python_values_are_refused_with_what_to_write_instead(lm, what):
    """Nothing runs inside the block, so a traced value has no Python value there: a clear error."""
    p = paths(lm)
    with raises_cleanly(lm, ControlFlowError) as info:
        with lm.trace(PROMPT_1):
            h = envoy(lm, p.layer(0)).output
            if what == "if":
                if h[:, -1].norm() > 1:  # line: if
                    h[:] = 0
            elif what == "tolist":
                h[0, -1, :3].tolist()  # line: tolist
            elif what == "float":
                float(h.mean())  # line: float
            else:
                for _ in range(h.shape[1]):  # line: range
                    pass
    words = {"if": ("control flow", "torch.where"), "tolist": (".tolist()", ".save()"),
             "float": ("float()", ".save()"), "range": ("python index", "constants")}[what]
    at_line(info.value, what, "until the model runs", *words)


def test_known_sizes_are_python_ints_for_control_flow(lm):
    """What is known while recording is a plain int: Python loops over it work."""
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke([PROMPT_1, EIFFEL]):
            h = envoy(lm, p.layer(0)).output
            B, S, H = h.shape
            rows = [h[i, -1].save() for i in range(B)]
    for i, prompt in enumerate((PROMPT_1, EIFFEL)):
        ref = run_alone(lm, prompt, capture=[p.layer(0)])
        close(rows[i], ref.outputs[p.layer(0)][0, -1], prompt)
