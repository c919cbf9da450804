"""Gradients in a trace (NNsight 0.8's syntax) against plain ``torch.autograd`` on the Hugging Face model.

The reference runs ``lm._model`` on one prompt alone with grad enabled; forward (pre-)hooks keep the
module values and tensor hooks on them read (and, where a test edits a gradient, replace) the gradient
reaching them. fxpatch's batches are left-padded, so a row is compared on its real positions and its
padded positions must get no gradient.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from fxpatch.errors import GradientError
from tests.conftest import PROMPT_1, PROMPT_2, assert_state_unchanged, state
from tests.reference import paths, token_ids, unpad
from tests.test_differential import envoy

LONG, SHORT = PROMPT_1, "_ _ _"  # 10 and 3 tokens
ATOL, RTOL = 1e-4, 1e-4


def close(actual, expected, msg=""):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=(lambda m: f"{msg}: {m}") if msg else None)


def _main(value):
    return value if isinstance(value, torch.Tensor) else value[0]


def torch_reference(lm, prompt, loss_fn, outputs=(), pre_inputs=(), grad_edits=None, requires_grad=()):
    """One prompt alone through the HF model with autograd: the loss, the values and gradients at
    ``outputs`` (module outputs) and ``pre_inputs`` (modules' first inputs), and the parameters' grads.

    ``grad_edits[path]`` replaces the gradient reaching that module's output; ``requires_grad`` names
    outputs to call ``requires_grad_()`` on (for a frozen model).
    """
    model = lm._model
    grad_edits = grad_edits or {}
    values, grads, handles = {}, {}, []

    def keep(path, tensor):
        values[path] = tensor
        if path in requires_grad:
            tensor.requires_grad_(True)

        def hook(g):
            grads[path] = g.detach().clone()
            if path in grad_edits:
                g = grad_edits[path](g.clone())
                grads[path + ":after"] = g.detach().clone()
            return g
        if tensor.requires_grad:
            tensor.register_hook(hook)

    for path in outputs:
        handles.append(model.get_submodule(path).register_forward_hook(
            lambda m, a, out, path=path: keep(path, _main(out))))
    for path in pre_inputs:
        handles.append(model.get_submodule(path).register_forward_pre_hook(
            lambda m, a, path=path: keep(path + ":in", a[0])))
    for p in model.parameters():
        p.grad = None
    try:
        ids = torch.tensor([token_ids(lm, prompt)], device=lm.device)
        with torch.enable_grad():
            logits = model(input_ids=ids).logits
            loss = loss_fn(logits)
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    params = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    return {"values": {k: v.detach() for k, v in values.items()}, "grads": grads, "params": params,
            "loss": loss.detach(), "n": ids.shape[1]}


@contextlib.contextmanager
def fresh_param_grads(lm):
    """Parameters start without .grad and are left without it (the models are shared by the session)."""
    for p in lm._model.parameters():
        p.grad = None
    try:
        yield
    finally:
        for p in lm._model.parameters():
            p.grad = None


def param_grads(lm):
    return {n: p.grad.detach().clone() for n, p in lm._model.named_parameters() if p.grad is not None}


def check_params(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name in expected:
        close(actual[name], expected[name], name)


def last_logit(token):
    return lambda logits: logits[:, -1, token].sum()


def logsumexp_last(logits):
    return logits[:, -1].logsumexp(-1).sum()


# -- .grad per invoke ----------------------------------------------------------------------------------------


def test_grad_of_layer_outputs_per_invoke(lm):
    """Two invokes of different lengths, one backward of the sum of their losses: each invoke's .grad of a
    layer's output is its own prompt's gradient alone (padding gets none), in reverse order; parameters'
    .grad is the sum of the two prompts' (torch's accumulation), and no hook is left behind."""
    p = paths(lm)
    before = state(lm)
    with fresh_param_grads(lm):
        with lm.trace() as tracer:
            with tracer.invoke(LONG):
                a0 = envoy(lm, p.layer(0)).output
                attn = envoy(lm, p.attn(1)).output[0]      # an element of a tuple output
                a1 = envoy(lm, p.layer(1)).output
                loss_a = lm.lm_head.output[:, -1, 7].sum()
            with tracer.invoke(SHORT):
                b0 = envoy(lm, p.layer(0)).output
                b1 = envoy(lm, p.layer(1)).output
                loss_b = lm.lm_head.output[:, -1].logsumexp(-1).sum()
            with (loss_a + loss_b).backward():
                ga1, gb1 = a1.grad.save(), b1.grad.save()   # layer 1 before layer 0
                g_attn = attn.grad.save()
                ga0 = a0.grad.save()
                gb0 = b0.grad.save()
        got_params = param_grads(lm)
    ref_a = torch_reference(lm, LONG, last_logit(7), outputs=[p.layer(0), p.attn(1), p.layer(1)])
    ref_b = torch_reference(lm, SHORT, logsumexp_last, outputs=[p.layer(0), p.layer(1)])
    for name, got, ref, path in (("a1", ga1, ref_a, p.layer(1)), ("a0", ga0, ref_a, p.layer(0)),
                                 ("attn", g_attn, ref_a, p.attn(1)),
                                 ("b1", gb1, ref_b, p.layer(1)), ("b0", gb0, ref_b, p.layer(0))):
        assert got.shape[0] == 1 and got.shape[1] == 10, name
        close(unpad(got, 0, ref["n"]), ref["grads"][path][0], name)
        assert not got[0, :got.shape[1] - ref["n"]].any(), f"{name}: padded positions got a gradient"
    assert gb0.abs().sum() > 0
    check_params(got_params, {n: ref_a["params"][n] + ref_b["params"][n] for n in ref_a["params"]})
    assert_state_unchanged(lm, before)


def test_grad_assignment_reaches_earlier_layers(lm):
    """``h.grad = ...`` and ``h.grad[...] = ...`` replace the gradient flowing on: the earlier layer's .grad
    and the parameters' grads are torch's with the same edit made by a tensor hook; each invoke's edit
    stays in its rows."""
    p = paths(lm)
    with fresh_param_grads(lm):
        with lm.trace() as tracer:
            with tracer.invoke(LONG):
                a0 = envoy(lm, p.layer(0)).output
                a1 = envoy(lm, p.layer(1)).output
                loss_a = lm.lm_head.output[:, -1].logsumexp(-1).sum()
            with tracer.invoke(SHORT):
                b0 = envoy(lm, p.layer(0)).output
                b1 = envoy(lm, p.layer(1)).output
                loss_b = lm.lm_head.output[:, -1].logsumexp(-1).sum()
            with (loss_a + loss_b).backward():
                a1.grad = a1.grad * 0.5
                halved = a1.grad.save()          # the gradient as replaced
                b1.grad[:, -1] = 0               # in place: the last position's gradient stops here
                ga0, gb0 = a0.grad.save(), b0.grad.save()
        got_params = param_grads(lm)

    def zero_last(g):
        g[:, -1] = 0
        return g
    ref_a = torch_reference(lm, LONG, logsumexp_last, outputs=[p.layer(0), p.layer(1)],
                            grad_edits={p.layer(1): lambda g: g * 0.5})
    ref_b = torch_reference(lm, SHORT, logsumexp_last, outputs=[p.layer(0), p.layer(1)],
                            grad_edits={p.layer(1): zero_last})
    close(unpad(halved, 0, ref_a["n"]), ref_a["grads"][p.layer(1) + ":after"][0], "replaced a1")
    close(unpad(ga0, 0, ref_a["n"]), ref_a["grads"][p.layer(0)][0], "a0")
    close(unpad(gb0, 0, ref_b["n"]), ref_b["grads"][p.layer(0)][0], "b0")
    plain = torch_reference(lm, SHORT, logsumexp_last, outputs=[p.layer(0)])
    assert not torch.allclose(ref_b["grads"][p.layer(0)], plain["grads"][p.layer(0)])  # the edit matters
    check_params(got_params, {n: ref_a["params"][n] + ref_b["params"][n] for n in ref_a["params"]})


def test_requires_grad_on_a_frozen_model(lm):
    """With the parameters frozen, ``h.requires_grad_()`` makes the model's use of h differentiable, as torch
    does: later layers' .grad is torch's, and no parameter gets a .grad. Without it the backward is refused."""
    p = paths(lm)
    params = list(lm._model.parameters())
    for q in params:
        q.requires_grad_(False)
    try:
        with lm.trace(LONG):
            h0 = envoy(lm, p.layer(0)).output
            h0.requires_grad_()
            h1 = envoy(lm, p.layer(1)).output
            logits = lm.lm_head.output.save()
            with logits[:, -1].logsumexp(-1).sum().backward():
                g1 = h1.grad.save()
                g0 = h0.grad.save()
        ref = torch_reference(lm, LONG, logsumexp_last, outputs=[p.layer(0), p.layer(1)], requires_grad=[p.layer(0)])
        close(g1, ref["grads"][p.layer(1)], "h1")
        close(g0, ref["grads"][p.layer(0)], "h0")
        assert logits.grad_fn is not None
        assert all(q.grad is None for q in params)
        with pytest.raises(GradientError, match="does not require grad"):
            with lm.trace(LONG):
                h1 = envoy(lm, p.layer(1)).output
                with lm.lm_head.output.sum().backward():
                    h1.grad.save()
        with pytest.raises(GradientError, match="never arrived.*does not require grad"):
            with lm.trace(LONG):
                h0 = envoy(lm, p.layer(0)).output
                h1 = envoy(lm, p.layer(1)).output
                h1.requires_grad_()
                with lm.lm_head.output.sum().backward():
                    h1.grad.save()
                    h0.grad.save()
    finally:
        for q in params:
            q.requires_grad_(True)


def test_attribution_patching_as_in_the_nnsight_tutorial(lm):
    """NNsight's attribution-patching tutorial: clean and corrupt invokes in one trace, the attention
    output projection's input saved per layer, the metric's backward reading the corrupt run's gradients
    in reverse; ``(clean - corrupt) * grad`` at the last position equals the torch computation."""
    p = paths(lm)
    proj = "c_proj" if p.attn_name == "attn" else "o_proj"
    answer, wrong = 11, 5
    clean_out, corrupted_out, corrupted_grads = [], [], []
    with fresh_param_grads(lm):
        with lm.trace() as tracer:
            with tracer.invoke(PROMPT_1):
                for i in range(p.n_layers):
                    clean_out.append(envoy(lm, f"{p.attn(i)}.{proj}").input.save())
            with tracer.invoke(PROMPT_2):
                refs = []
                for i in range(p.n_layers):
                    attn_in = envoy(lm, f"{p.attn(i)}.{proj}").input
                    refs.append(attn_in)
                    corrupted_out.append(attn_in.save())
                logits = lm.lm_head.output.save()
                value = logits[:, -1, answer].sum() - logits[:, -1, wrong].sum()
                with value.backward():
                    for attn_in in reversed(refs):
                        corrupted_grads.append(attn_in.grad.save())
    corrupted_grads.reverse()
    got = torch.stack([((clean - corrupt) * grad)[:, -1].sum() for clean, corrupt, grad
                       in zip(clean_out, corrupted_out, corrupted_grads)])
    projs = [f"{p.attn(i)}.{proj}" for i in range(p.n_layers)]
    clean = torch_reference(lm, PROMPT_1, last_logit(answer), pre_inputs=projs)
    corrupt = torch_reference(lm, PROMPT_2, lambda lg: lg[:, -1, answer].sum() - lg[:, -1, wrong].sum(),
                              pre_inputs=projs)
    expected = torch.stack([((clean["values"][q + ":in"] - corrupt["values"][q + ":in"])
                             * corrupt["grads"][q + ":in"])[:, -1].sum() for q in projs])
    close(got, expected, "attribution per layer")
    assert logits.grad_fn is not None


def embed_reference(lm, prompt, alpha, target, leaf=True):
    """Torch alone on one prompt: a forward hook replaces the embeddings' output by ``alpha`` times it, as a
    leaf that requires grad (``leaf``) or as the product itself (its gradient kept by ``retain_grad``); returns
    the gradient reaching that value and the parameters' grads of the backward of the last position's
    ``target`` logit."""
    model, kept = lm._model, {}

    def scale(module, args, out):
        kept["scaled"] = (out * alpha).detach().requires_grad_() if leaf else out * alpha
        if not leaf and kept["scaled"].requires_grad:
            kept["scaled"].retain_grad()
        return kept["scaled"]

    handle = model.get_submodule(paths(lm).embed).register_forward_hook(scale)
    try:
        with fresh_param_grads(lm), torch.enable_grad():
            logits = model(input_ids=torch.tensor([token_ids(lm, prompt)], device=lm.device)).logits
            logits[:, -1, target].sum().backward()
            params = param_grads(lm)
    finally:
        handle.remove()
    return kept["scaled"].grad[0], params


def test_integrated_gradients_as_in_the_nnsight_guide(lm):
    """NNsight's integrated-gradients pattern (docs/patterns/gradient-based-attribution.md), one trace per
    step: ``scaled = embeds * alpha; scaled.requires_grad_(True)`` written into the model, then
    ``scaled.grad`` in the backward block. Each step's gradient is torch's with a forward hook putting the
    scaled leaf in; ``scaled`` requires grad already (the weights do), so the call changes nothing and the
    backward fills the embedding weights' .grad too, as torch does on the product itself."""
    embed = envoy(lm, paths(lm).embed)
    target, n_steps = 11, 2
    ig_accum, grads, params = None, [], []
    with fresh_param_grads(lm):
        for step in range(n_steps):
            alpha = (step + 0.5) / n_steps
            with lm.trace(LONG):
                embeds = embed.output
                embeds_full = embeds.save()
                scaled = embeds * alpha
                scaled.requires_grad_(True)
                embed.output = scaled
                metric = lm.lm_head.output[:, -1, target]
                with metric.sum().backward():
                    g = scaled.grad.save()
            contribution = embeds_full * g
            ig_accum = contribution if ig_accum is None else ig_accum + contribution
            grads.append(g)
            params.append(param_grads(lm))
            for q in lm._model.parameters():
                q.grad = None
    expected_accum = 0
    for step, (g, got_params) in enumerate(zip(grads, params)):
        alpha = (step + 0.5) / n_steps
        ref, _ = embed_reference(lm, LONG, alpha, target)
        close(g[0], ref, f"step {step}")
        if step == 0:  # the weights' grads: torch's through the product itself
            _, ref_params = embed_reference(lm, LONG, alpha, target, leaf=False)
            check_params(got_params, ref_params)
        expected_accum = expected_accum + embeds_full[0].detach() * ref
    close((ig_accum / n_steps)[0], expected_accum / n_steps, "integrated gradients")
    assert not torch.allclose(grads[0], grads[1])


def test_integrated_gradients_one_invoke_per_step(lm):
    """All steps in one batch, one invoke each (prompts of different lengths, left-padded), on a frozen
    model: ``requires_grad_()`` and ``requires_grad = True`` make the scaled value a leaf, as in torch; one
    backward of the summed metrics gives each invoke its own prompt's gradient (none on padding), and a
    leaf's ``.grad`` after the trace is torch's too. With trainable weights and a backward block in each
    invoke, each block's gradient is the same."""
    embed = envoy(lm, paths(lm).embed)
    steps = [(LONG, 0.25), (SHORT, 0.75), (PROMPT_2, 0.5)]
    target = 7
    params = list(lm._model.parameters())
    for q in params:
        q.requires_grad_(False)
    try:
        scaleds, metrics = [], []
        with lm.trace() as tracer:
            for i, (prompt, alpha) in enumerate(steps):
                with tracer.invoke(prompt):
                    scaled = embed.output * alpha
                    if i == 1:
                        scaled.requires_grad = True
                    else:
                        scaled.requires_grad_()
                    embed.output = scaled
                    metrics.append(lm.lm_head.output[:, -1, target].sum())
                    scaleds.append(scaled.save())
            with sum(metrics[1:], metrics[0]).backward():
                grads = [s.grad.save() for s in reversed(scaleds)][::-1]
        assert all(q.grad is None for q in params)
    finally:
        for q in params:
            q.requires_grad_(True)
    # trainable weights, a backward block in each invoke (the brief form; retain_graph as torch needs it for
    # the batch's shared graph): each block's gradient is its own invoke's
    per_block = []
    with fresh_param_grads(lm):
        with lm.trace() as tracer:
            for i, (prompt, alpha) in enumerate(steps[:2]):
                with tracer.invoke(prompt):
                    scaled = embed.output * alpha
                    scaled.requires_grad_()
                    embed.output = scaled
                    with lm.lm_head.output[:, -1, target].sum().backward(retain_graph=i == 0):
                        per_block.append(scaled.grad.save())
    assert len(per_block) == 2
    for (prompt, alpha), g, s, b in zip(steps, grads, scaleds, per_block + [None]):
        ref, _ = embed_reference(lm, prompt, alpha, target)
        n = ref.shape[0]
        close(unpad(g, 0, n), ref, prompt)
        assert not g[0, :g.shape[1] - n].any(), f"{prompt}: padded positions got a gradient"
        assert s.is_leaf and s.requires_grad
        close(s.grad, g, f"{prompt}: the leaf's .grad")
        if b is not None:
            close(b, g, f"{prompt}: its own backward block")


def test_requires_grad_and_retain_grad_on_computed_values_follow_torch(gpt2):
    """``retain_grad()`` fills a computed value's .grad in a backward after the trace, as torch does (a
    non-leaf without it has none); torch's refusals are GradientErrors at the user's line: setting
    ``requires_grad`` on a non-leaf, ``requires_grad_(False)`` on one, ``retain_grad()`` on a value that
    does not require grad, and a ``requires_grad_()`` after the value was used (which torch would not
    record there, and fxpatch would) on a frozen model."""
    wte, target = gpt2.transformer.wte, 11
    with gpt2.trace(SHORT):
        kept = wte.output * 0.3
        kept.retain_grad()
        wte.output = kept
        plain = gpt2.transformer.h[0].output * 1.0
        gpt2.transformer.h[0].output = plain
        loss = gpt2.lm_head.output[:, -1, target].sum().save()
        kept, plain = kept.save(), plain.save()
    with fresh_param_grads(gpt2):
        loss.backward()
    close(kept.grad[0], embed_reference(gpt2, SHORT, 0.3, target)[0])
    with pytest.warns(UserWarning, match="not a leaf"):
        assert plain.grad is None
    with pytest.raises(GradientError, match="only on leaf tensors") as err:
        with gpt2.trace(SHORT):
            scaled = wte.output * 0.5
            scaled.requires_grad = True  # line: set non-leaf
            wte.output = scaled
            gpt2.lm_head.output.save()
    check_location(err, "set non-leaf")
    with pytest.raises(GradientError, match="only on leaf tensors") as err:
        with gpt2.trace(SHORT):
            (wte.output * 0.5).requires_grad_(False)  # line: unset
    check_location(err, "unset")
    with pytest.raises(GradientError, match="module value") as err:
        with gpt2.trace(SHORT):
            gpt2.transformer.h[0].output.retain_grad()  # line: retain module
    check_location(err, "retain module")
    with pytest.raises(GradientError, match="compiled trace") as err:
        with gpt2.trace(SHORT, compile=True):
            (wte.output * 0.5).requires_grad_()  # line: compiled mark
    check_location(err, "compiled mark")
    params = list(gpt2._model.parameters())
    for q in params:
        q.requires_grad_(False)
    try:
        with pytest.raises(GradientError, match="does not require grad") as err:
            with gpt2.trace(SHORT):
                (wte.output * 0.5).retain_grad()  # line: retain frozen
        check_location(err, "retain frozen")
        with pytest.raises(GradientError, match="used by an operation before this call") as err:
            with gpt2.trace(SHORT):
                scaled = wte.output * 0.5
                extra = scaled.sum()
                scaled.requires_grad_()  # line: late
                wte.output = scaled
                with (gpt2.lm_head.output[:, -1, target].sum() + extra).backward():
                    scaled.grad.save()
        check_location(err, "late")
    finally:
        for q in params:
            q.requires_grad_(True)


# -- grad mode ---------------------------------------------------------------------------------------------


def test_grad_mode_follows_torch(lm):
    """With grad enabled, saved values keep their grad_fn and ``loss.backward()`` after the trace gives the
    parameter grads torch gives; under ``torch.no_grad()`` the saved values have none."""
    with fresh_param_grads(lm):
        with lm.trace(LONG):
            logits = lm.lm_head.output.save()
        assert logits.grad_fn is not None and logits.requires_grad
        logsumexp_last(logits).backward()
        got = param_grads(lm)
    ref = torch_reference(lm, LONG, logsumexp_last)
    check_params(got, ref["params"])
    with torch.no_grad():
        with lm.trace(LONG):
            quiet = lm.lm_head.output.save()
    assert quiet.grad_fn is None and not quiet.requires_grad
    close(quiet, logits.detach())
    with pytest.raises(GradientError, match="without gradients") as err:
        with torch.no_grad():
            with lm.trace(LONG):
                h = lm.lm_head.output
                with h.sum().backward():
                    h.grad.save()
    assert str(err.value).startswith(f"{__file__}:")


def test_patched_graph_is_differentiable(lm):
    """A trace with a cross-prompt patch and in-place writes, then ``backward()`` on its saved logits: the
    parameters' grads are torch's for the same edits made by forward hooks (the patched value keeps its
    gradient path into the clean prompt's run)."""
    p = paths(lm)
    with fresh_param_grads(lm):
        with lm.trace() as tracer:
            with tracer.invoke(LONG):
                clean = envoy(lm, p.layer(0)).output[:, -1].clone()
            with tracer.invoke(SHORT):
                envoy(lm, p.layer(0)).output[:, -1] = clean * 2
                h = envoy(lm, p.layer(1)).output
                h[:, -1] *= 1.5
                logits = lm.lm_head.output.save()
        logsumexp_last(logits).backward()
        got = param_grads(lm)
    model = lm._model
    kept = {}

    def keep(module, args, out):
        kept["clean"] = _main(out)[:, -1].clone()

    def patch(module, args, out):
        _main(out)[:, -1] = kept["clean"] * 2

    def shift(module, args, out):
        _main(out)[:, -1] *= 1.5

    with torch.enable_grad():
        handle = model.get_submodule(p.layer(0)).register_forward_hook(keep)
        model(input_ids=torch.tensor([token_ids(lm, LONG)], device=lm.device))
        handle.remove()
        handles = [model.get_submodule(p.layer(0)).register_forward_hook(patch),
                   model.get_submodule(p.layer(1)).register_forward_hook(shift)]
        try:
            ref_logits = model(input_ids=torch.tensor([token_ids(lm, SHORT)], device=lm.device)).logits
        finally:
            for handle in handles:
                handle.remove()
        with fresh_param_grads(lm):
            logsumexp_last(ref_logits).backward()
            expected = param_grads(lm)
    close(unpad(logits, 0, ref_logits.shape[1]), ref_logits[0].detach(), "logits")
    check_params(got, expected)


def test_retain_graph_and_a_second_backward(gpt2):
    """Two backward blocks on one forward: with retain_graph=True on the first, as torch needs, the
    second sees its own loss's gradient; without it eager PyTorch fails, and fxpatch refuses before the
    model runs, at the second's line."""
    with gpt2.trace(SHORT):
        h = gpt2.transformer.h[1].output
        logits = gpt2.lm_head.output
        with logits.sum().backward(retain_graph=True):
            first = h.grad.save()
        with (logits * 2).sum().backward():
            second = h.grad.save()
    close(second, 2 * first)
    for q in gpt2._model.parameters():
        q.grad = None
    with pytest.raises(GradientError, match="a second backward pass through this invoke's forward pass after one "
                       "without retain_graph=True") as err:
        with gpt2.trace(SHORT):
            h = gpt2.transformer.h[1].output
            logits = gpt2.lm_head.output
            with logits.sum().backward():
                h.grad.save()
            with logits.sum().backward():  # line: second-backward
                h.grad.save()
    check_location(err, "second-backward")
    assert all(q.grad is None for q in gpt2._model.parameters()), "the model ran"


def test_a_backward_pass_in_each_invoke_is_each_prompts_own(lm):
    """Each prompt alone has its own forward graph, so a plain ``loss.backward()`` in each of two invokes runs
    in eager PyTorch; the batched pass shares one graph, which the first backward pass must keep for the
    second (it failed with torch's 'backward through the graph a second time'). Each gradient equals its
    prompt's alone."""
    p = paths(lm)
    grads = []
    with fresh_param_grads(lm):
        with lm.trace() as tracer:
            for prompt in (LONG, SHORT):
                with tracer.invoke(prompt):
                    h = envoy(lm, p.layer(1)).output
                    loss = lm.lm_head.output[:, -1].log_softmax(-1)[:, 0].sum()
                    with loss.backward():
                        grads.append(h.grad.save())
    for prompt, grad in zip((LONG, SHORT), grads):
        ref = torch_reference(lm, prompt, lambda logits: logits[:, -1].log_softmax(-1)[:, 0].sum(),
                              outputs=[p.layer(1)])
        close(unpad(grad, 0, ref["n"]), ref["grads"][p.layer(1)][0], f"{prompt!r}")


def test_backward_inputs_restrict_the_pass_to_module_values_as_torch_does(lm):
    """``loss.backward(inputs=[h])`` on module values of two invokes: each ``h.grad`` is its prompt's gradient
    alone, and no parameter gets a ``.grad``, as ``torch.autograd.backward(inputs=...)`` gives on one prompt."""
    p = paths(lm)
    with fresh_param_grads(lm):
        with lm.trace() as tracer:
            with tracer.invoke(LONG):
                a = envoy(lm, p.layer(0)).output
                loss_a = lm.lm_head.output[:, -1].logsumexp(-1).sum()
            with tracer.invoke(SHORT):
                b = envoy(lm, p.layer(1)).output
                loss_b = lm.lm_head.output[:, -1].logsumexp(-1).sum()
            with (loss_a + loss_b).backward(inputs=[a, b]):
                gb, ga = b.grad.save(), a.grad.save()
        assert param_grads(lm) == {}
    ref_a = torch_reference(lm, LONG, logsumexp_last, outputs=[p.layer(0)])
    ref_b = torch_reference(lm, SHORT, logsumexp_last, outputs=[p.layer(1)])
    close(unpad(ga, 0, ref_a["n"]), ref_a["grads"][p.layer(0)][0], "a")
    close(unpad(gb, 0, ref_b["n"]), ref_b["grads"][p.layer(1)][0], "b")


def test_compiled_trace_is_differentiable(gpt2):
    """A compiled trace's saved values carry grad_fn and ``backward()`` after it gives torch's parameter
    grads; ``.grad`` inside it is refused before anything runs."""
    with fresh_param_grads(gpt2):
        with gpt2.trace(LONG, compile=True):
            logits = gpt2.lm_head.output.save()
        assert logits.grad_fn is not None
        logsumexp_last(logits).backward()
        got = param_grads(gpt2)
    check_params(got, torch_reference(gpt2, LONG, logsumexp_last)["params"])
    with pytest.raises(GradientError, match="compiled trace") as err:
        with gpt2.trace(LONG, compile=True):
            h = gpt2.transformer.h[1].output
            with gpt2.lm_head.output.sum().backward():
                h.grad.save()  # line: compiled
    assert str(err.value).startswith(f"{__file__}:")


# -- mistakes ------------------------------------------------------------------------------------------------


def _line_of(tag: str) -> int:
    lines = open(__file__, encoding="utf-8").read().splitlines()
    return next(i + 1 for i, line in enumerate(lines) if line.rstrip().endswith(f"# line: {tag}"))


def check_location(err, tag):
    assert str(err.value).startswith(f"{os.path.abspath(__file__)}:{_line_of(tag)}:"), str(err.value)


def test_grad_errors(gpt2):
    """Each gradient mistake is a GradientError at its line; those known while recording leave no parameter
    grads (nothing ran), and the model is left unchanged."""
    before = state(gpt2)
    with fresh_param_grads(gpt2):
        with pytest.raises(GradientError, match="reverse of the forward order") as err:
            with gpt2.trace(LONG):
                h0 = gpt2.transformer.h[0].output
                h1 = gpt2.transformer.h[1].output
                with gpt2.lm_head.output.sum().backward():
                    h0.grad.save()
                    h1.grad.save()  # line: order
        check_location(err, "order")
        assert "OutOfOrderError" in str(err.value)
        with pytest.raises(GradientError, match="outside a `with loss.backward\\(\\):` block") as err:
            with gpt2.trace(LONG):
                h0 = gpt2.transformer.h[0].output
                h0.grad.save()  # line: outside
        check_location(err, "outside")
        with pytest.raises(GradientError, match="only .grad is available") as err:
            with gpt2.trace(LONG):
                loss = gpt2.lm_head.output.sum()
                with loss.backward():
                    gpt2.transformer.h[1].output.grad.save()  # line: module
        check_location(err, "module")
        with pytest.raises(GradientError, match="computed in the backward block") as err:
            with gpt2.trace(LONG):
                loss = gpt2.lm_head.output.sum()
                with loss.backward():
                    (loss * 2).grad.save()  # line: computed
        check_location(err, "computed")
        with pytest.raises(GradientError, match="generation runs without gradients") as err:
            with gpt2.generate(SHORT, max_new_tokens=2):
                gpt2.lm_head.output.sum().backward()  # line: generate
        check_location(err, "generate")
        assert all(q.grad is None for q in gpt2._model.parameters())  # nothing ran
        with pytest.raises(GradientError, match="never arrived") as err:  # known only when the backward ends
            with gpt2.trace(LONG):
                h3 = gpt2.transformer.h[3].output
                with gpt2.transformer.h[1].output.sum().backward():
                    h3.grad.save()  # line: unreached
        check_location(err, "unreached")
        with pytest.raises(GradientError, match="value computed at line .* never arrived.*does not depend") as err:
            with gpt2.trace(LONG):  # a view the model does not use: torch's hook on it never runs either
                last = gpt2.transformer.h[1].output[:, -1]
                with gpt2.lm_head.output.sum().backward():
                    last.grad.save()  # line: computed unused
        check_location(err, "computed unused")
    assert_state_unchanged(gpt2, before)
