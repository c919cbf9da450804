"""Eager torch semantics inside a trace: views, aliasing, in-place writes and data-dependent ops.

Each program is checked against the same code run eagerly on the real tensors of the plain HF
model, one prompt alone, inside ordinary forward hooks (``tests.reference``). Prompts of
different lengths share one left-padded batch; every test runs on GPT-2 and Llama.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import PROMPT_1
from tests.reference import run_alone, unpad
from tests.test_differential import close, envoy, paths

HELLO = "hello"
PROMPTS = [PROMPT_1, HELLO]  # 10 and 3 tokens


def heads(lm) -> tuple[int, int]:
    cfg = lm.config
    n = getattr(cfg, "n_head", None) or cfg.num_attention_heads
    return n, cfg.hidden_size // n


def norm1(lm, i: int) -> str:
    return f"{paths(lm).layer(i)}.{'ln_1' if hasattr(lm._model, 'transformer') else 'input_layernorm'}"


def test_write_through_a_view_of_an_attention_output(lm):
    """NNsight's per-head ablation: a write into a .view() of the attention output reaches the model."""
    p = paths(lm)
    n_heads, head_dim = heads(lm)
    with lm.trace() as tracer:
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                a = envoy(lm, p.attn(1)).output[0]
                B, S = a.shape[0], a.shape[1]
                a.view(B, S, n_heads, head_dim)[:, :, 2, :] = 0
        with tracer.invoke():  # every row
            logits = lm.lm_head.output.save()

    def ablate(out):
        out[0].view(out[0].shape[0], out[0].shape[1], n_heads, head_dim)[:, :, 2, :] = 0
        return out

    plain = run_alone(lm, PROMPTS[0])
    for row, prompt in enumerate(PROMPTS):
        ref = run_alone(lm, prompt, outputs={p.attn(1): ablate})
        close(unpad(logits, row, len(ref.ids)), ref.logits, f"row {row}")
    assert not torch.allclose(unpad(logits, 0, len(plain.ids)), plain.logits, atol=1e-4)


def test_views_see_later_in_place_writes_and_clones_do_not(lm):
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            h = envoy(lm, p.layer(0)).output
            view = h[:, -1].save()
            whole = h.save()
            copy = h[:, -1].clone().save()
            h[:, -1] = 0
            logits = lm.lm_head.output.save()
        with tracer.invoke(HELLO):
            other = envoy(lm, p.layer(0)).output[:, -1].save()

    seen = {}

    def edit(out):
        seen["copy"] = out[:, -1].clone()
        out[:, -1] = 0
        return out

    ref = run_alone(lm, PROMPT_1, outputs={p.layer(0): edit}, capture=[p.layer(0)])
    assert view.abs().sum() == 0
    close(copy[0], seen["copy"][0], "clone taken before the write")
    close(unpad(whole, 0, len(ref.ids)), ref.outputs[p.layer(0)][0], "the module output after the write")
    close(unpad(logits, 0, len(ref.ids)), ref.logits, "logits")
    close(other[0], run_alone(lm, HELLO, capture=[p.layer(0)]).outputs[p.layer(0)][0, -1], "other invoke untouched")


def test_in_place_write_to_a_module_input_reaches_the_residual_stream(lm):
    """ln_1's input is the very tensor the block adds back: an in-place write changes both."""
    path = norm1(lm, 1)
    with lm.trace() as tracer:
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                x = envoy(lm, path).input
                x[:, -1] *= 0.5
        with tracer.invoke():
            logits = lm.lm_head.output.save()

    def in_place(args, kwargs):
        args[0][:, -1] *= 0.5
        return args, kwargs

    for row, prompt in enumerate(PROMPTS):
        ref = run_alone(lm, prompt, inputs={path: in_place})
        close(unpad(logits, row, len(ref.ids)), ref.logits, f"row {row}")
        # assigning replaces only the norm's argument: a different result
        only_norm = run_alone(lm, prompt, inputs={path: lambda a, k: ((a[0] * torch.tensor(
            [1.0] * (a[0].shape[1] - 1) + [0.5], device=a[0].device)[None, :, None],), k)})
        assert not torch.allclose(unpad(logits, row, len(ref.ids)), only_norm.logits, atol=1e-4)


def test_assigning_a_module_input_replaces_only_that_argument(lm):
    path = norm1(lm, 1)
    with lm.trace() as tracer:
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                x = envoy(lm, path).input
                envoy(lm, path).input = x * 0.5
        with tracer.invoke():
            logits = lm.lm_head.output.save()
    for row, prompt in enumerate(PROMPTS):
        ref = run_alone(lm, prompt, inputs={path: lambda a, k: ((a[0] * 0.5, *a[1:]), k)})
        close(unpad(logits, row, len(ref.ids)), ref.logits, f"row {row}")


def test_data_dependent_ops(lm):
    """Ops whose output shape depends on values run (they are not shape errors) and equal eager torch."""
    p = paths(lm)
    results = []
    with lm.trace() as tracer:
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                h = envoy(lm, p.layer(1)).output[:, -1]
                results.append((h[h > 0].sum().save(), torch.nonzero(h > 0.5).save(),
                                torch.masked_select(h, h < -0.5).save(), torch.unique((h * 4).round()).save()))
    assert len(results) == 2
    for prompt, values in zip(PROMPTS, results):
        ref = run_alone(lm, prompt, capture=[p.layer(1)]).outputs[p.layer(1)][:, -1]
        close(values[0], ref[ref > 0].sum(), "boolean-mask sum")
        assert torch.equal(values[1], torch.nonzero(ref > 0.5))
        close(values[2], torch.masked_select(ref, ref < -0.5), "masked_select")
        close(values[3], torch.unique((ref * 4).round()), "unique")


def test_in_place_chain_of_views_on_the_last_invoke(lm):
    """Writes through transpose/unflatten/narrow/select views, in the second of two invokes."""
    p = paths(lm)
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            donor = envoy(lm, p.layer(0)).output[:, -1].clone()
        with tracer.invoke(HELLO):
            h = envoy(lm, p.layer(0)).output
            h.transpose(1, 2).unflatten(0, (1, -1)).narrow(3, h.shape[1] - 1, 1).select(0, 0)[..., 0] = donor
            logits = lm.lm_head.output.save()
    src = run_alone(lm, PROMPT_1, capture=[p.layer(0)]).outputs[p.layer(0)][:, -1]

    def edit(out):
        out.transpose(1, 2).unflatten(0, (1, -1)).narrow(3, out.shape[1] - 1, 1).select(0, 0)[..., 0] = src
        return out

    ref = run_alone(lm, HELLO, outputs={p.layer(0): edit})
    close(unpad(logits, 0, len(ref.ids)), ref.logits, "patched row")


def test_in_place_writes_at_two_points_with_a_read_between_reach_the_model_where_eager_makes_them(lm):
    """Layer 0's output written in place, layer 1's first norm read, then layer 1's attention output written
    in place by an op that is in place by its argument alone (``relu`` with ``inplace=True``): the norm sees
    the first write, the residual add both, as the same code in hooks does eagerly. (The value of each
    tensor at each point is a snapshot of the functional run, reused from the point before where no op
    between could change it, and the tensor itself after the last op that could.)"""
    p = paths(lm)
    with lm.trace() as tracer:
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                x = envoy(lm, p.layer(0)).output
                x[:, -1] *= 0.5
                normed = envoy(lm, norm1(lm, 1)).output[:, -1].save()
                torch.nn.functional.relu(envoy(lm, p.attn(1)).output[0], inplace=True)
        with tracer.invoke():
            logits = lm.lm_head.output.save()

    def halve(out):
        out[:, -1] *= 0.5
        return out

    def relu_in_place(out):
        torch.nn.functional.relu(out[0], inplace=True)
        return out

    for row, prompt in enumerate(PROMPTS):
        ref = run_alone(lm, prompt, outputs={p.layer(0): halve, p.attn(1): relu_in_place}, capture=[norm1(lm, 1)])
        close(unpad(logits, row, len(ref.ids)), ref.logits, f"row {row}")
        without = run_alone(lm, prompt, outputs={p.layer(0): halve}).logits
        assert not torch.allclose(unpad(logits, row, len(ref.ids)), without, atol=1e-3)  # the second write counts
    close(normed, ref.outputs[norm1(lm, 1)][:, -1], "the norm saw the first write")  # HELLO's: the last invoke


def test_a_saved_shape_beside_an_in_place_write(gpt2):
    """A shape (nested sizes in the functional program's outputs) saved in a program that writes in place."""
    with gpt2.trace(PROMPT_1):
        h = gpt2.transformer.h[0].output
        shape = h.shape.save()
        h[:, -1] = 0
        after = gpt2.transformer.h[0].output.save()
    assert tuple(shape) == tuple(after.shape) == (1, 10, gpt2.config.hidden_size)
    assert after[0, -1].abs().sum() == 0 and after[0, 0].abs().sum() > 0


def test_outside_tensors_are_used_with_the_value_they_have_at_their_line(lm):
    """A tensor from outside the trace changed before the line that uses it gives the changed value there;
    a ``.clone()`` at the line keeps that line's value through later changes; under
    ``torch.inference_mode()`` (inference tensors have no version counter to check) the value at the line is
    the one used, as eager PyTorch runs it."""
    from tests.reference import set_last

    p = paths(lm)
    hidden = lm._model.config.hidden_size
    ones, twos = torch.ones(hidden), torch.full((hidden,), 2.0)
    want = {k: run_alone(lm, PROMPT_1, outputs={p.layer(0): set_last(v)}).logits[-1]
            for k, v in (("ones", ones), ("twos", twos))}

    v = torch.zeros(hidden)
    with lm.trace(PROMPT_1):
        v += 1  # before its use: the use sees ones
        envoy(lm, p.layer(0)).output[:, -1] = v
        before = lm.lm_head.output[:, -1].save()
    close(before[0], want["ones"], "changed before its use")

    v = torch.ones(hidden)
    with lm.trace(PROMPT_1):
        envoy(lm, p.layer(0)).output[:, -1] = v.clone()
        cloned = lm.lm_head.output[:, -1].save()
        v += 1
    close(cloned[0], want["ones"], "a clone at the use")

    with torch.inference_mode():
        v = torch.full((hidden,), 2.0)
        with lm.trace(PROMPT_1):
            envoy(lm, p.layer(0)).output[:, -1] = v
            inference = lm.lm_head.output[:, -1].save()
            v += 1
    assert v.is_inference() and bool((v == 3).all())
    close(inference[0], want["twos"], "an inference tensor changed after its use")


def test_weights_changed_before_the_blocks_first_use_of_the_model_run_in_the_whole_pass(lm):
    """A weight changed in place inside the block before any module value is used: the forward pass runs
    with it, as NNsight's (which starts the model's modules only once the block waits for a value) and as
    the plain model with the changed weight does."""
    p = paths(lm)
    weight = next(lm._model.get_submodule(p.layer(0)).parameters())
    original = weight.detach().clone()
    try:
        with torch.no_grad(), lm.trace(PROMPT_1):
            weight.mul_(0.5)
            logits = lm.lm_head.output[:, -1].save()
        want = run_alone(lm, PROMPT_1).logits[-1]  # the weight is still halved
    finally:
        with torch.no_grad():
            weight.copy_(original)
    close(logits[0], want, "halved weight")
    assert not torch.allclose(want, run_alone(lm, PROMPT_1).logits[-1])


def test_a_tensor_assigned_as_the_whole_batchs_module_value_is_the_value_the_model_goes_on_with(lm):
    """``m.output = x`` over every row hands ``x`` itself to the model, as a hook returning ``x`` does in eager
    torch: a later in-place write into ``x`` reaches the model, and one into ``m.output`` reaches ``x``."""
    p = paths(lm)
    with lm.trace(PROMPT_1):
        x = envoy(lm, p.layer(1)).output * 2
        envoy(lm, p.layer(1)).output = x
        x[:, -1] = 0
        through_x = lm.lm_head.output[:, -1].save()
    with lm.trace(PROMPT_1):
        y = envoy(lm, p.layer(1)).output * 2
        envoy(lm, p.layer(1)).output = y
        envoy(lm, p.layer(1)).output[:, 0] = 1
        kept = y.save()
        through_output = lm.lm_head.output[:, -1].save()

    given = {}

    def doubled(then):
        def edit(out):
            x = out * 2
            then(x)
            given["x"] = x
            return x
        return edit

    ref = run_alone(lm, PROMPT_1, outputs={p.layer(1): doubled(lambda x: x[:, -1].zero_())})
    close(through_x[0], ref.logits[-1], "write into x after the assignment")
    ref = run_alone(lm, PROMPT_1, outputs={p.layer(1): doubled(lambda x: x[:, 0].fill_(1))})
    close(through_output[0], ref.logits[-1], "write into m.output after the assignment")
    close(kept, given["x"], "x seen after a write into m.output")
    assert bool((kept[:, 0] == 1).all())


# ops that return their input, or a view of it, in eager PyTorch (torch's functionalization copies)
ALIASING_OPS = {
    "type_as": lambda h: h.type_as(h),
    "atleast_3d": torch.atleast_3d,
    "atleast_2d of a position": lambda h: torch.atleast_2d(h[0, -1]),
    "sum_to_size": lambda h: h.sum_to_size(h.shape),
    "to_dense": lambda h: h.to_dense(),
    "broadcast_tensors": lambda h: torch.broadcast_tensors(h, torch.zeros(h.shape[-1], device=h.device))[0],
}


@pytest.mark.parametrize("op", list(ALIASING_OPS))
def test_ops_that_return_their_input_share_writes_with_it_as_in_eager(lm, op):
    """``x = h.type_as(h)`` is ``h`` in eager PyTorch (``atleast_3d``, ``sum_to_size`` to its size, ``to_dense``
    likewise; ``broadcast_tensors`` gives a view): a write into ``x`` reaches the model, and one into the module
    value after it shows in ``x``. torch's functionalization made copies of them: the write was lost (logits
    off by up to 5.7 on the tiny GPT-2)."""
    p, alias = paths(lm), ALIASING_OPS[op]
    with lm.trace() as tracer:
        saved = []
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                h = envoy(lm, p.layer(0)).output
                x = alias(h)
                x[..., -1] = 1.5                # through the alias into the model
                h[:, -2] = 0                    # into the module value, seen through the alias
                saved.append((x.save(), lm.lm_head.output.save()))
    for row, prompt in enumerate(PROMPTS):
        seen: dict = {}

        def edit(out, seen=seen):
            x = alias(out)
            x[..., -1] = 1.5
            out[:, -2] = 0
            seen["x"] = x.clone()
            return out

        ref = run_alone(lm, prompt, outputs={p.layer(0): edit})
        x, logits = saved[row]
        n = len(ref.ids)
        if x.dim() == 3:
            x = unpad(x, 0, n)[None] if x.shape[1] != n else x
            close(x[0], seen["x"][0], f"{op}: the alias after both writes ({prompt!r})")
        else:
            close(x, seen["x"], f"{op}: the alias after both writes ({prompt!r})")
        close(unpad(logits, 0, n), ref.logits, f"{op}: logits ({prompt!r})")
