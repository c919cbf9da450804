"""Differential tests: fxpatch intervention programs against plain Hugging Face hooks.

Each test runs one NNsight-style program through fxpatch (several prompts,
left-padded into one batch) and the same edit on each prompt alone through
``tests.reference`` (the HF model with ordinary forward hooks, batch of one,
no padding), then compares the rows' real positions. Every test runs on the
tiny GPT-2 and the tiny Llama (``lm`` fixture).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import PROMPT_1, PROMPT_2
from tests.reference import Run, element, first_input, paths, run_alone, set_last, token_ids, unpad

EIFFEL = "The Eiffel Tower is in Paris"  # 9 tokens
SHORT = "_ _ _"  # 3 tokens
HELLO = "hello"  # 3 tokens

ATOL, RTOL = 1e-5, 1e-5


def close(actual, expected, msg: str = "") -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=(lambda m: f"{msg}: {m}") if msg else None)


def envoy(lm, path: str):
    """The fxpatch envoy at a dotted module path (``"transformer.h.1.mlp"`` -> ``lm.transformer.h[1].mlp``)."""
    node = lm
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def check_rows(batched: torch.Tensor, refs: list[Run], first_row: int = 0, what: str = "logits") -> None:
    """Rows ``first_row..`` of a left-padded batch equal the references' values on their real positions."""
    assert isinstance(batched, torch.Tensor), f"{what} is {type(batched).__name__}, not a tensor"
    for k, ref in enumerate(refs):
        row = first_row + k
        close(unpad(batched, row, len(ref.ids)), ref.logits if what == "logits" else ref, f"{what} row {row}")


def check_value(batched: torch.Tensor, row: int, n: int, expected: torch.Tensor, what: str) -> None:
    """One row's real positions of a saved ``(rows, width, ...)`` value against a reference ``(1, n, ...)`` value."""
    assert isinstance(batched, torch.Tensor), f"{what} is {type(batched).__name__}, not a tensor"
    close(unpad(batched, row, n), expected[0], what)


# -- reading ------------------------------------------------------------------------------------------


def test_save_module_outputs(lm):
    """Saved layer / attention / mlp outputs and logits equal the hooked HF values of each prompt alone."""
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            h1 = envoy(lm, p.layer(1)).output.save()
            logits1 = envoy(lm, p.head).output.save()
        with tracer.invoke(SHORT):
            attn0 = envoy(lm, p.attn(0)).output[0].save()
            mlp1 = envoy(lm, p.mlp(1)).output.save()
            logits2 = envoy(lm, p.head).output.save()
    ref1 = run_alone(lm, PROMPT_1, capture=[p.layer(1)])
    ref2 = run_alone(lm, SHORT, capture=[p.attn(0), p.mlp(1)])
    assert h1.shape[0] == 1 and attn0.shape[0] == 1  # one row per invoke
    assert h1.shape[1] == attn0.shape[1] == 10  # the padded width is included
    check_value(h1, 0, 10, ref1.outputs[p.layer(1)], "layer 1 output")
    check_value(attn0, 0, 3, ref2.outputs[p.attn(0)][0], "attention 0 output")
    check_value(mlp1, 0, 3, ref2.outputs[p.mlp(1)], "mlp 1 output")
    check_rows(logits1, [ref1])
    check_rows(logits2, [ref2])


# -- setting ------------------------------------------------------------------------------------------


def test_set_output_scaled(lm):
    """``m.output = m.output * 2`` in one invoke changes that prompt only."""
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke(EIFFEL):
            envoy(lm, p.layer(0)).output = envoy(lm, p.layer(0)).output * 2
            a = envoy(lm, p.head).output.save()
        with tracer.invoke(PROMPT_1):
            b = envoy(lm, p.head).output.save()
    check_rows(a, [run_alone(lm, EIFFEL, outputs={p.layer(0): lambda h: h * 2})])
    check_rows(b, [run_alone(lm, PROMPT_1)], first_row=0)


def test_set_output_constant(lm):
    """A real tensor assigned as a module's output replaces it for that invoke's row only."""
    p = paths(lm)
    hidden = lm._model.config.hidden_size
    torch.manual_seed(1)
    const = torch.randn(1, 10, hidden).to(lm.device) * 0.1  # PROMPT_2 has 10 tokens: the batch width
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            a = envoy(lm, p.head).output.save()
        with tracer.invoke(PROMPT_2):
            envoy(lm, p.mlp(0)).output = const
            b = envoy(lm, p.head).output.save()
    check_rows(a, [run_alone(lm, PROMPT_1)])
    check_rows(b, [run_alone(lm, PROMPT_2, outputs={p.mlp(0): lambda o: const.clone()})])


def test_item_set_last_token(lm):
    """``m.output[:, -1] = 0`` on a padded row zeroes its last real token; a read after it sees the write."""
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            a = envoy(lm, p.head).output.save()
        with tracer.invoke(EIFFEL):  # 9 tokens in a width of 10: one pad on the left
            envoy(lm, p.mlp(0)).output[:, -1] = 0
            after = envoy(lm, p.mlp(0)).output.save()
            b = envoy(lm, p.head).output.save()
    ref = run_alone(lm, EIFFEL, outputs={p.mlp(0): set_last(0.0)}, capture=[p.mlp(0)])
    check_rows(a, [run_alone(lm, PROMPT_1)])
    check_rows(b, [ref])
    check_value(after, 0, 9, ref.outputs[p.mlp(0)], "mlp 0 output after the write")
    assert torch.count_nonzero(after[0, -1]) == 0


def test_item_set_through_chain(lm):
    """``m.output[:, -1][:, :4] = 0`` writes through both indexings into the module's output."""
    p = paths(lm)

    def first_four_of_last(x):
        x = x.clone()
        x[:, -1, :4] = 0
        return x

    with lm.trace() as tracer:
        with tracer.invoke(SHORT):
            envoy(lm, p.layer(0)).output[:, -1][:, :4] = 0
            a = envoy(lm, p.head).output.save()
        with tracer.invoke(EIFFEL):
            envoy(lm, p.attn(1)).output[0][:, -1][:, :4] = 0
            b = envoy(lm, p.head).output.save()
    check_rows(a, [run_alone(lm, SHORT, outputs={p.layer(0): first_four_of_last})])
    check_rows(b, [run_alone(lm, EIFFEL, outputs={p.attn(1): element(0, first_four_of_last)})])


def test_tuple_element_item_set(lm):
    """Attention returns ``(output, weights)``: ``attn.output[0][:, -1] = 0`` edits the attention output."""
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke(HELLO):
            envoy(lm, p.attn(0)).output[0][:, -1] = 0
            a = envoy(lm, p.head).output.save()
        with tracer.invoke(PROMPT_2):
            b = envoy(lm, p.head).output.save()
    check_rows(a, [run_alone(lm, HELLO, outputs={p.attn(0): element(0, set_last(0.0))})])
    check_rows(b, [run_alone(lm, PROMPT_2)], first_row=0)


def test_tuple_element_assign(lm):
    """``attn.output[0] = ...`` replaces the tuple's tensor element; ``attn.output = (...)`` the whole tuple."""
    p = paths(lm)
    last = p.n_layers - 1
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            attn = envoy(lm, p.attn(last))
            attn.output[0] = attn.output[0] * 0.5
            a = envoy(lm, p.head).output.save()
        with tracer.invoke(SHORT):
            out = envoy(lm, p.attn(last)).output
            envoy(lm, p.attn(last)).output = (-out[0], *out[1:])  # the whole tuple, same structure
            b = envoy(lm, p.head).output.save()
        with tracer.invoke(HELLO):
            c = envoy(lm, p.head).output.save()
    check_rows(a, [run_alone(lm, PROMPT_1, outputs={p.attn(last): element(0, lambda x: x * 0.5)})])
    check_rows(b, [run_alone(lm, SHORT, outputs={p.attn(last): element(0, lambda x: -x)})])
    check_rows(c, [run_alone(lm, HELLO)])


def test_arithmetic_on_proxies(lm):
    """Arithmetic on proxies (mean, subtraction, division, abs, pow, negation, reflected ops) as on tensors."""
    p = paths(lm)

    def edit(h):
        centred = h - h.mean(-1, keepdim=True)
        return 1.5 - (-centred / 2 + 0.1 * h.abs() - (h ** 2) * 0.01)

    def summary(h):
        return (h[:, -1] * 3 - 1).norm(dim=-1)

    with lm.trace() as tracer:
        with tracer.invoke(EIFFEL):
            h = envoy(lm, p.layer(0)).output
            envoy(lm, p.layer(0)).output = edit(h)
            s = summary(envoy(lm, p.layer(1)).output).save()
            a = envoy(lm, p.head).output.save()
        with tracer.invoke(HELLO):
            b = envoy(lm, p.head).output.save()
    ref = run_alone(lm, EIFFEL, outputs={p.layer(0): edit}, capture=[p.layer(1)])
    check_rows(a, [ref])
    check_rows(b, [run_alone(lm, HELLO)], first_row=0)
    close(s, summary(ref.outputs[p.layer(1)]), "saved arithmetic result")


@pytest.mark.parametrize("fn", ["relu", "where", "cat"])
def test_torch_functions_on_proxies(lm, fn):
    """``torch.relu``, ``torch.where`` and ``torch.cat`` on proxies build the same values as on tensors."""
    p = paths(lm)
    edits = {
        "relu": torch.relu,
        "where": lambda h: torch.where(h > 0, h, h * 0.1),
        "cat": lambda h: torch.cat([h[:, :-1], h[:, -1:] * 0], dim=1),
    }
    edit = edits[fn]
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_2):
            a = envoy(lm, p.head).output.save()
        with tracer.invoke(SHORT):
            envoy(lm, p.layer(0)).output = edit(envoy(lm, p.layer(0)).output)
            b = envoy(lm, p.head).output.save()
    check_rows(a, [run_alone(lm, PROMPT_2)])
    check_rows(b, [run_alone(lm, SHORT, outputs={p.layer(0): edit})])


# -- cross-invoke -------------------------------------------------------------------------------------


@pytest.mark.parametrize("later", [0, 1], ids=["same-layer", "later-layer"])
def test_cross_invoke_patch_with_barrier(lm, later):
    """Invoke 1's last-token layer-0 state written into invoke 2's last token (a shorter prompt), with a barrier."""
    p = paths(lm)
    with lm.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(PROMPT_1):
            x = envoy(lm, p.layer(0)).output[:, -1]
            barrier()
            a = envoy(lm, p.head).output.save()
        with tracer.invoke(HELLO):
            barrier()
            envoy(lm, p.layer(later)).output[:, -1] = x
            b = envoy(lm, p.head).output.save()
    src = run_alone(lm, PROMPT_1, capture=[p.layer(0)])
    patch = src.outputs[p.layer(0)][:, -1]
    check_rows(a, [src])
    check_rows(b, [run_alone(lm, HELLO, outputs={p.layer(later): set_last(patch)})])


def test_cross_invoke_patch_without_barrier(lm):
    """The pre-0.5 syntax (no barrier): prompt 1's embeddings replace prompt 2's; a layer patch across rows too."""
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            emb = envoy(lm, p.embed).output
            x = envoy(lm, p.layer(0)).output[:, -1]
            a = envoy(lm, p.head).output.save()
        with tracer.invoke(PROMPT_2):
            envoy(lm, p.embed).output = emb
            b = envoy(lm, p.head).output.save()
        with tracer.invoke(EIFFEL):
            envoy(lm, p.layer(1)).output[:, -1] = x * 2 + 0.5
            c = envoy(lm, p.head).output.save()
    src = run_alone(lm, PROMPT_1, capture=[p.embed, p.layer(0)])
    check_rows(a, [src])
    patched_emb = src.outputs[p.embed]
    check_rows(b, [run_alone(lm, PROMPT_2, outputs={p.embed: lambda o: patched_emb.clone()})])
    check_rows(c, [run_alone(lm, EIFFEL, outputs={p.layer(1): set_last(src.outputs[p.layer(0)][:, -1] * 2 + 0.5)})])


def test_values_from_one_trace_used_in_the_next(lm):
    """Embeddings saved in one trace are written into a same-length prompt in a second, padded trace."""
    p = paths(lm)
    with lm.trace(PROMPT_1):
        emb = envoy(lm, p.embed).output.save()
        last = envoy(lm, p.layer(0)).output[:, -1].save()
    assert isinstance(emb, torch.Tensor) and isinstance(last, torch.Tensor)
    with lm.trace() as tracer:
        with tracer.invoke(HELLO):
            envoy(lm, p.layer(1)).output[:, -1] = last
            a = envoy(lm, p.head).output.save()
        with tracer.invoke(PROMPT_2):
            envoy(lm, p.embed).output = emb
            b = envoy(lm, p.head).output.save()
    src = run_alone(lm, PROMPT_1, capture=[p.embed, p.layer(0)])
    close(emb, src.outputs[p.embed], "saved embeddings")
    ref_emb, ref_last = src.outputs[p.embed], src.outputs[p.layer(0)][:, -1]
    check_rows(a, [run_alone(lm, HELLO, outputs={p.layer(1): set_last(ref_last)})])
    check_rows(b, [run_alone(lm, PROMPT_2, outputs={p.embed: lambda o: ref_emb.clone()})], first_row=0)


# -- batches ------------------------------------------------------------------------------------------


def test_prompts_of_different_lengths(lm):
    """Four prompts of 10, 9, 3 and 10 tokens, one invoke each, each with its own edit (or none)."""
    p = paths(lm)
    scales = {PROMPT_1: 3.0, EIFFEL: None, SHORT: -1.0, PROMPT_2: 0.5}
    saved = []
    with lm.trace() as tracer:
        for prompt, scale in scales.items():
            with tracer.invoke(prompt):
                if scale is not None:
                    envoy(lm, p.mlp(0)).output[:, -1] = envoy(lm, p.mlp(0)).output[:, -1] * scale
                saved.append(envoy(lm, p.head).output.save())
    assert tracer.batch.input_ids.shape == (4, 10)
    for out, (prompt, scale) in zip(saved, scales.items()):
        def edit(o, scale=scale):
            o = o.clone()
            o[:, -1] = o[:, -1] * scale
            return o
        check_rows(out, [run_alone(lm, prompt, outputs={p.mlp(0): edit} if scale is not None else None)])


def test_several_prompts_in_one_invoke(lm):
    """``tracer.invoke([p1, p2])``: the invoke's value has both rows and its edit applies to both."""
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            a = envoy(lm, p.head).output.save()
        with tracer.invoke([EIFFEL, HELLO]):
            envoy(lm, p.mlp(1)).output[:, -1] = 0
            h = envoy(lm, p.layer(1)).output.save()
            b = envoy(lm, p.head).output.save()
    assert b.shape[0] == 2 and h.shape[:2] == (2, 10)
    refs = [run_alone(lm, q, outputs={p.mlp(1): set_last(0.0)}, capture=[p.layer(1)]) for q in (EIFFEL, HELLO)]
    check_rows(a, [run_alone(lm, PROMPT_1)])
    check_rows(b, refs)
    for row, ref in enumerate(refs):
        check_value(h[row:row + 1], 0, len(ref.ids), ref.outputs[p.layer(1)], f"layer 1 output row {row}")


@pytest.mark.parametrize("where", ["last", "first"])
def test_empty_invoke_applies_to_all_rows(lm, where):
    """An empty ``tracer.invoke()`` beside prompted invokes (after or before them) edits and reads every row."""
    p = paths(lm)
    with lm.trace() as tracer:
        if where == "first":
            with tracer.invoke():
                envoy(lm, p.layer(1)).output[:, -1] = 0
        with tracer.invoke(PROMPT_1):
            envoy(lm, p.layer(0)).output = envoy(lm, p.layer(0)).output * 2
        with tracer.invoke(SHORT):
            pass
        with tracer.invoke():
            if where == "last":
                envoy(lm, p.layer(1)).output[:, -1] = 0
            everything = envoy(lm, p.head).output.save()
    assert everything.shape[:2] == (2, 10)
    both = {p.layer(0): lambda h: h * 2, p.layer(1): set_last(0.0)}
    check_rows(everything, [run_alone(lm, PROMPT_1, outputs=both),
                            run_alone(lm, SHORT, outputs={p.layer(1): set_last(0.0)})])


# -- calling modules on proxies: the logit lens ---------------------------------------------------------


def test_logit_lens(lm):
    """``lm_head(norm(layer.output))`` per layer equals the modules applied to the hooked hidden states."""
    p = paths(lm)
    head, norm = envoy(lm, p.head), envoy(lm, p.norm)
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            lens1 = [head(norm(envoy(lm, p.layer(i)).output)).save() for i in range(p.n_layers)]
        with tracer.invoke(HELLO):
            envoy(lm, p.layer(0)).output[:, -1] = 0
            lens2 = [head(norm(envoy(lm, p.layer(i)).output))[:, -1].save() for i in range(p.n_layers)]
    layer_paths = [p.layer(i) for i in range(p.n_layers)]
    ref1 = run_alone(lm, PROMPT_1, capture=layer_paths)
    ref2 = run_alone(lm, HELLO, outputs={p.layer(0): set_last(0.0)}, capture=layer_paths)
    model = lm._model
    with torch.no_grad():
        for i, path in enumerate(layer_paths):
            expect1 = model.get_submodule(p.head)(model.get_submodule(p.norm)(ref1.outputs[path]))
            expect2 = model.get_submodule(p.head)(model.get_submodule(p.norm)(ref2.outputs[path]))
            check_value(lens1[i], 0, 10, expect1, f"lens layer {i}, prompt 1")
            close(lens2[i], expect2[:, -1], f"lens layer {i}, prompt 2 last token")
    # After the last layer the lens is the model's own head: the final logits.
    check_rows(lens1[-1], [ref1])


# -- inputs -------------------------------------------------------------------------------------------


def test_input_edit_on_mlp(lm):
    """``mlp.input = mlp.input * 0.5`` scales the mlp's first input for that invoke only."""
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke(EIFFEL):
            mlp = envoy(lm, p.mlp(1))
            mlp.input = mlp.input * 0.5
            a = envoy(lm, p.head).output.save()
        with tracer.invoke(SHORT):
            b = envoy(lm, p.head).output.save()
    check_rows(a, [run_alone(lm, EIFFEL, inputs={p.mlp(1): first_input(lambda x: x * 0.5)})])
    check_rows(b, [run_alone(lm, SHORT)])


def test_input_edit_on_layer(lm):
    """Item assignment into a decoder layer's hidden-state input (``layer.input[:, -1] = ...``)."""
    p = paths(lm)

    def edit(x):
        x = x.clone()
        x[:, -1] = x[:, -1] * -1 + 0.25
        return x

    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_2):
            b = envoy(lm, p.head).output.save()
        with tracer.invoke(HELLO):
            layer = envoy(lm, p.layer(1))
            layer.input[:, -1] = layer.input[:, -1] * -1 + 0.25
            a = envoy(lm, p.head).output.save()
    check_rows(a, [run_alone(lm, HELLO, inputs={p.layer(1): first_input(edit)})])
    check_rows(b, [run_alone(lm, PROMPT_2)])


def test_read_inputs(lm):
    """``.inputs`` is ``(args, kwargs)``: the hidden state and the position ids the layer was called with."""
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            pass
        with tracer.invoke(SHORT):
            args, kwargs = envoy(lm, p.layer(1)).inputs
            hidden = args[0].save()
            mlp_in = envoy(lm, p.mlp(0)).input.save()
            layer_inputs = envoy(lm, p.layer(1)).inputs.save()
    ref = run_alone(lm, SHORT, capture=[p.layer(1), p.mlp(0)])
    ref_args, ref_kwargs = ref.inputs[p.layer(1)]
    check_value(hidden, 0, 3, ref_args[0], "layer 1 input")
    check_value(mlp_in, 0, 3, ref.inputs[p.mlp(0)][0][0], "mlp 0 input")
    saved_args, saved_kwargs = layer_inputs
    assert isinstance(saved_args[0], torch.Tensor)
    check_value(saved_args[0], 0, 3, ref_args[0], "layer 1 input via .inputs.save()")
    # Positions count from the first real token, as they do for the prompt alone.
    assert torch.equal(unpad(saved_kwargs["position_ids"], 0, 3), ref_kwargs["position_ids"][0])
    if "position_embeddings" in ref_kwargs:  # Llama: rotary (cos, sin) per position
        for saved_pe, ref_pe in zip(saved_kwargs["position_embeddings"], ref_kwargs["position_embeddings"]):
            check_value(saved_pe, 0, 3, ref_pe, "rotary position embeddings")


# -- the model's own output ---------------------------------------------------------------------------


def test_model_output_logits_per_invoke(lm):
    """``model.output.logits`` and ``model.lm_head.output`` saved per invoke are that invoke's rows."""
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke(HELLO):
            envoy(lm, p.layer(0)).output[:, -1] = 0
            logits_a = lm.output.logits.save()
            head_a = lm.lm_head.output.save()
        with tracer.invoke([PROMPT_1, EIFFEL]):
            logits_b = lm.output.logits.save()
            head_b = lm.lm_head.output.save()
    vocab = lm._model.config.vocab_size
    assert logits_a.shape == (1, 10, vocab) and logits_b.shape == (2, 10, vocab)
    ref_a = run_alone(lm, HELLO, outputs={p.layer(0): set_last(0.0)})
    refs_b = [run_alone(lm, PROMPT_1), run_alone(lm, EIFFEL)]
    check_rows(logits_a, [ref_a])
    check_rows(head_a, [ref_a])
    check_rows(logits_b, refs_b)
    check_rows(head_b, refs_b)
    assert token_ids(lm, HELLO) == ref_a.ids
