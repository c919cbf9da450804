"""``module.source``: a forward's operations, named as NNsight 0.8.1 names them, read and written in a trace.

References: the names and the listing are NNsight 0.8.1's (printed by it for these transformers classes);
values come from the plain HF model run prompt by prompt with hooks (``tests/reference.py``), recomputed
with plain torch where an operation is inside a module's forward.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import transformers

from fxpatch.errors import FxpatchError, SourceOpError
from tests.conftest import PROMPT_1, assert_state_unchanged, state
from tests.reference import first_input, run_alone, set_last, token_ids, unpad
from tests.test_differential import close, envoy

SHORT = "hello"  # 3 tokens; PROMPT_1 has 10

# NNsight 0.8.1's names (``[op.name for op in envoy.source]``) for these classes of transformers 5.24: the
# names are made from the forward's source, which other releases write otherwise
NAMES_TRANSFORMERS = "5.24"
NNSIGHT_NAMES = {
    "GPT2MLP": ["self_c_fc_0", "hidden_states_0", "self_act_0", "hidden_states_1", "self_c_proj_0",
                "hidden_states_2", "self_dropout_0", "hidden_states_3"],
    "LlamaMLP": ["self_gate_proj_0", "self_act_fn_0", "self_up_proj_0", "self_down_proj_0", "down_proj_0"],
    "LlamaAttention": [
        "input_shape_0", "hidden_shape_0", "self_q_proj_0", "view_0", "transpose_0", "query_states_0",
        "self_k_proj_0", "view_1", "transpose_1", "key_states_0", "self_v_proj_0", "view_2", "transpose_2",
        "value_states_0", "apply_rotary_pos_emb_0", "cache_update_0", "ALL_ATTENTION_FUNCTIONS_get_interface_0",
        "attention_interface_0", "attention_interface_1", "attn_output_reshape_0", "contiguous_0", "attn_output_0",
        "self_o_proj_0", "attn_output_1"],
    "GPT2Attention": [
        "is_cross_attention_0", "isinstance_0", "cache_is_updated_get_0", "is_updated_0", "curr_cache_0",
        "curr_cache_1", "curr_cache_2", "hasattr_0", "ValueError_0", "self_q_attn_0", "query_states_0",
        "attention_mask_0", "key_states_0", "value_states_0", "self_c_attn_0", "split_0", "shape_kv_0",
        "key_states_view_0", "transpose_0", "key_states_1", "value_states_view_0", "transpose_1", "value_states_1",
        "self_c_attn_1", "split_1", "shape_kv_1", "key_states_view_1", "transpose_2", "key_states_2",
        "value_states_view_1", "transpose_3", "value_states_2", "shape_q_0", "query_states_view_0", "transpose_4",
        "query_states_1", "curr_cache_update_0", "cache_is_updated_0", "using_eager_0",
        "ALL_ATTENTION_FUNCTIONS_get_interface_0", "attention_interface_0", "self__upcast_and_reordered_attn_0",
        "attention_interface_1", "attn_output_reshape_0", "contiguous_0", "attn_output_0", "self_c_proj_0",
        "attn_output_1", "self_resid_dropout_0", "attn_output_2"],
}

# print(model.transformer.h[0].mlp.source) in NNsight 0.8.1 (fxpatch reads and writes every one: all "->")
NNSIGHT_GPT2_MLP_LISTING = """\
                     * def forward(self, hidden_states: tuple[torch.Tensor] | None) -> torch.Tensor:
 self_c_fc_0     ->  0     hidden_states = self.c_fc(hidden_states)
 hidden_states_0 ->  +     ...
 self_act_0      ->  1     hidden_states = self.act(hidden_states)
 hidden_states_1 ->  +     ...
 self_c_proj_0   ->  2     hidden_states = self.c_proj(hidden_states)
 hidden_states_2 ->  +     ...
 self_dropout_0  ->  3     hidden_states = self.dropout(hidden_states)
 hidden_states_3 ->  +     ...
                     4     return hidden_states
                     5 """


def is_gpt2(lm) -> bool:
    return hasattr(lm._model, "transformer")


def ops(lm) -> dict[str, str]:
    """Per architecture: the layer-0 modules and operations the tests use."""
    if is_gpt2(lm):
        return {"mlp": "transformer.h.0.mlp", "act_op": "self_act_0", "act": "transformer.h.0.mlp.act",
                "attn": "transformer.h.0.attn", "attn_out_op": "attn_output_reshape_0",
                "out_proj": "transformer.h.0.attn.c_proj", "query_op": "query_states_1",
                "unread_op": "shape_kv_1"}
    return {"mlp": "model.layers.0.mlp", "act_op": "self_act_fn_0", "act": "model.layers.0.mlp.act_fn",
            "attn": "model.layers.0.self_attn", "attn_out_op": "attn_output_reshape_0",
            "out_proj": "model.layers.0.self_attn.o_proj", "query_op": "transpose_0",
            "unread_op": "hidden_shape_0"}


def query_states(lm, run) -> torch.Tensor:
    """Layer 0's query heads ``(1, heads, n, head_dim)``, recomputed with plain torch from a captured projection."""
    if is_gpt2(lm):
        qkv = run.outputs["transformer.h.0.attn.c_attn"]
        q = qkv.split(lm._model.config.n_embd, dim=2)[0]
        heads = lm._model.config.n_head
    else:
        q = run.outputs["model.layers.0.self_attn.q_proj"]
        heads = lm._model.config.num_attention_heads
    return q.view(1, q.shape[1], heads, -1).transpose(1, 2)


def query_module(lm) -> str:
    return "transformer.h.0.attn.c_attn" if is_gpt2(lm) else "model.layers.0.self_attn.q_proj"


@pytest.mark.skipif(not transformers.__version__.startswith(NAMES_TRANSFORMERS + "."),
                    reason=f"the names were read off transformers {NAMES_TRANSFORMERS}'s source")
def test_names_and_listing_are_nnsights(lm):
    o = ops(lm)
    for path in (o["mlp"], o["attn"]):
        src = envoy(lm, path).source
        assert src.names == NNSIGHT_NAMES[type(lm._model.get_submodule(path)).__name__]
        assert [op._op for op in src] == src.names
    listing = repr(envoy(lm, o["attn"]).source)
    assert f" {o['attn_out_op']} " in listing and "-x" in listing  # some ops it cannot address are marked
    if is_gpt2(lm):
        assert repr(lm.transformer.h[0].mlp.source) == NNSIGHT_GPT2_MLP_LISTING
        assert repr(lm.transformer.h[1].mlp.source) == NNSIGHT_GPT2_MLP_LISTING


def test_read_operations_in_two_invokes_of_different_lengths(lm):
    o = ops(lm)
    mlp, attn = envoy(lm, o["mlp"]).source, envoy(lm, o["attn"]).source
    with lm.trace() as tracer:
        saved = []
        for prompt in (PROMPT_1, SHORT):
            with tracer.invoke(prompt):
                saved.append({
                    "act": getattr(mlp, o["act_op"]).output.save(),
                    "act_in": getattr(mlp, o["act_op"]).input.save(),
                    "attn_out": getattr(attn, o["attn_out_op"]).output.save(),
                    "query": getattr(attn, o["query_op"]).output.save(),
                })
    width = saved[0]["act"].shape[1]
    assert width == len(token_ids(lm, PROMPT_1)) > len(token_ids(lm, SHORT))
    for row, prompt in enumerate((PROMPT_1, SHORT)):
        ref = run_alone(lm, prompt, capture=[o["act"], o["out_proj"], query_module(lm)])
        n = len(ref.ids)
        got = saved[row]
        assert got["act"].shape[0] == 1  # an invoke's own row
        close(unpad(got["act"], 0, n), ref.outputs[o["act"]][0], f"act row {row}")
        close(unpad(got["act_in"], 0, n), ref.inputs[o["act"]][0][0][0], f"act input row {row}")
        close(unpad(got["attn_out"], 0, n), ref.inputs[o["out_proj"]][0][0][0], f"attention output row {row}")
        query = got["query"][0, :, width - n:] if row == 1 else got["query"][0]
        close(query, query_states(lm, ref)[0], f"query heads row {row}")


def test_write_operations_matches_hooks(lm):
    o = ops(lm)
    before = state(lm)
    mlp, attn = envoy(lm, o["mlp"]).source, envoy(lm, o["attn"]).source
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):  # a submodule call's operation: its output's last token
            getattr(mlp, o["act_op"]).output[:, -1] = 0
            zeroed = lm.lm_head.output.save()
        with tracer.invoke(SHORT):  # an op of the forward itself (no module boundary there)
            op = getattr(attn, o["attn_out_op"])
            op.output = op.output * 2
            doubled = lm.lm_head.output.save()
        with tracer.invoke(SHORT):
            plain = lm.lm_head.output.save()
    close(zeroed[0], run_alone(lm, PROMPT_1, outputs={o["act"]: set_last(0.0)}).logits, "zeroed act")
    ref = run_alone(lm, SHORT, inputs={o["out_proj"]: first_input(lambda x: x * 2)}).logits
    n = len(token_ids(lm, SHORT))
    close(unpad(doubled, 0, n), ref, "doubled attention output")
    close(unpad(plain, 0, n), run_alone(lm, SHORT).logits, "untouched invoke")
    assert not torch.allclose(unpad(doubled, 0, n), unpad(plain, 0, n), atol=1e-3)
    assert_state_unchanged(lm, before)


def test_zeroing_an_op_inside_attention_matches_zeroing_what_it_is_made_of(lm):
    """The query heads (a view/transpose op of the attention's own forward), zeroed in place."""
    o = ops(lm)
    with lm.trace(PROMPT_1):
        getattr(envoy(lm, o["attn"]).source, o["query_op"]).output[:] = 0
        logits = lm.lm_head.output.save()
    if is_gpt2(lm):
        n_embd = lm._model.config.n_embd

        def zero_query(qkv):
            qkv = qkv.clone()
            qkv[..., :n_embd] = 0
            return qkv
    else:
        def zero_query(q):
            return torch.zeros_like(q)
    ref = run_alone(lm, PROMPT_1, outputs={query_module(lm): zero_query})
    close(unpad(logits, 0, len(ref.ids)), ref.logits, "logits with zero queries")
    assert not torch.allclose(unpad(logits, 0, len(ref.ids)), run_alone(lm, PROMPT_1).logits, atol=1e-3)


@contextlib.contextmanager
def attention_results(lm, edit=None):
    """Plain-torch reference for ``attention_interface_1``: while the block runs, layer 0's attention calls a
    wrapper of its attention function (transformers' ``ALL_ATTENTION_FUNCTIONS``) that lists each call's
    result ``(output, weights)``, after ``edit(result)`` (which returns the result the forward goes on with)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    module = lm._model.get_submodule(ops(lm)["attn"])
    impl = module.config._attn_implementation
    original = ALL_ATTENTION_FUNCTIONS.get_interface(impl, sys.modules[type(module).__module__].eager_attention_forward)
    seen: list[tuple] = []

    def wrapper(m, *args, **kwargs):
        result = original(m, *args, **kwargs)
        if m is module:
            result = edit(result) if edit is not None else result
            seen.append(tuple(None if v is None else v.detach().clone() for v in result))
        return result

    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    before = dict(local)
    local[impl] = wrapper
    try:
        yield seen
    finally:
        local.clear()
        local.update(before)


def zero_last_output(result):
    output = result[0].clone()
    output[:, -1] = 0  # (batch, tokens, heads, head_dim): every head at the last token
    return (output, *result[1:])


def interface_op(lm):
    """NNsight's ``...attn.source.attention_interface_1``, spelled as a user spells it."""
    attn = lm.transformer.h[0].attn if is_gpt2(lm) else lm.model.layers[0].self_attn
    return attn.source.attention_interface_1


def test_attention_interface_result_read_and_written(lm):
    """``attn_output, attn_weights = attention_interface(...)`` (NNsight 0.8.1's ``attention_interface_1``
    under transformers 5: ``attention_interface_0`` is the line choosing the function): its ``.output`` is
    the tuple, read whole and at ``[0]`` and written, per invoke, with no setting."""
    before = state(lm)
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            pair = interface_op(lm).output.save()
        with tracer.invoke(SHORT):
            short = interface_op(lm).output[0].save()
        with tracer.invoke(SHORT):
            interface_op(lm).output[0][:, -1] = 0
            edited = lm.lm_head.output.save()
    with attention_results(lm) as ref:
        run_alone(lm, PROMPT_1)
        plain = run_alone(lm, SHORT).logits
    assert isinstance(pair, tuple) and len(pair) == 2 and pair[0].dim() == 4
    assert pair[1] is None and ref[0][1] is None  # sdpa gives no weights, in NNsight too
    n = len(token_ids(lm, SHORT))
    close(pair[0][0], ref[0][0][0], "PROMPT_1's attention output")
    close(unpad(short, 0, n), ref[1][0][0], "SHORT's attention output (padded row)")
    with attention_results(lm, zero_last_output) as ref:
        zeroed = run_alone(lm, SHORT).logits
    assert len(ref) == 1
    close(unpad(edited, 0, n), zeroed, "attention output zeroed at the last token")
    assert not torch.allclose(zeroed, plain, atol=1e-3)
    assert_state_unchanged(lm, before)


def test_attention_interface_in_generate_steps(lm):
    """Each step's attention output read, and zeroed at the last token in every step of another invoke."""
    import fxpatch
    from tests.test_generation import HELLO, assert_tokens, expected_batch, hf_generate

    with lm.generate(max_new_tokens=2) as tracer:
        with tracer.invoke(PROMPT_1):
            seen = fxpatch.save([])
            for _ in tracer.all():
                seen.append(interface_op(lm).output[0][:, -1])
        with tracer.invoke(HELLO):
            for _ in tracer.all():
                interface_op(lm).output[0][:, -1] = 0
        result = tracer.result.save()
    with attention_results(lm) as ref:
        plain = hf_generate(lm, PROMPT_1, 2)
    assert len(seen) == len(ref) == 2
    for step, (got, want) in enumerate(zip(seen, ref)):
        close(got, want[0][:, -1], f"step {step}")
    with attention_results(lm, zero_last_output) as ref:
        edited = hf_generate(lm, HELLO, 2)
    assert len(ref) == 2 and edited != hf_generate(lm, HELLO, 2)
    assert_tokens(lm, result, expected_batch(lm, [PROMPT_1, HELLO], [plain, edited]))


def test_attention_interface_with_eager_attention_gives_its_weights():
    """Eager attention returns its weights too: both positions of the tuple, per invoke. The export runs a
    wrapped copy of the attention's forward code and puts the original back."""
    import fxpatch
    from fxpatch import LanguageModel
    from fxpatch.source import forward_function

    lm = LanguageModel(fxpatch.TINY_GPT2, attn_implementation="eager")
    forward = forward_function(lm._model.transformer.h[0].attn)
    code = forward.__code__
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            pair = interface_op(lm).output.save()
        with tracer.invoke(SHORT):
            weights = interface_op(lm).output[1].save()
    assert forward.__code__ is code and sys.gettrace() is None
    with attention_results(lm) as ref:
        run_alone(lm, PROMPT_1)
        run_alone(lm, SHORT)
    assert pair[1].shape == ref[0][1].shape  # (1, heads, tokens, tokens)
    close(pair[0], ref[0][0], "attention output")
    close(pair[1], ref[0][1], "attention weights")
    n = len(token_ids(lm, SHORT))
    width = weights.shape[-1]
    close(weights[0, :, width - n:, width - n:], ref[1][1][0], "SHORT's weights over its own tokens")


def test_an_operation_in_a_loop_has_one_value_per_execution(llama):
    """``decoder_layer_0`` runs once per layer (LlamaModel's loop); tracer.iter[k] picks execution k."""
    src = llama.model.source
    with llama.trace(PROMPT_1) as tracer:
        first = src.decoder_layer_0.output.save()
        for _ in tracer.iter[1]:
            second = src.decoder_layer_0.output.save()
    ref = run_alone(llama, PROMPT_1, capture=["model.layers.0", "model.layers.1"])
    close(first, ref.outputs["model.layers.0"], "execution 0")
    close(second, ref.outputs["model.layers.1"], "execution 1")


def test_operations_of_a_module_called_twice_are_per_call(tokenizer):
    """A block shared by two layers runs twice: each of its operations has a value per call."""
    from fxpatch import LanguageModel
    from tests.test_calls import BLOCK, shared_block_gpt2

    lm = LanguageModel(shared_block_gpt2(len(tokenizer)), tokenizer=tokenizer)
    src = envoy(lm, BLOCK + ".mlp").source
    with lm.trace(PROMPT_1) as tracer:
        calls = []
        for _ in tracer.iter[0:2]:
            calls.append(src.self_act_0.output.save())
    values = []
    hook = lm._model.get_submodule(BLOCK + ".mlp.act").register_forward_hook(lambda m, a, out: values.append(out))
    try:
        run_alone(lm, PROMPT_1)
    finally:
        hook.remove()
    assert len(values) == 2
    close(calls[0], values[0], "call 0")
    close(calls[1], values[1], "call 1")


def test_errors_name_the_operation_and_what_can_be_read(lm):
    o = ops(lm)
    before = state(lm)
    attn = envoy(lm, o["attn"]).source
    with pytest.raises(SourceOpError) as e:
        with lm.trace(PROMPT_1):
            attn.nope_0.output.save()
    msg = str(e.value)
    assert msg.startswith(f"{__file__}:") and f"{o['attn']}.source has no operation 'nope_0'" in msg
    assert f"{o['attn_out_op']}, " in msg and o["unread_op"] not in msg.split("reads and writes")[1]
    with pytest.raises(SourceOpError, match=rf"{o['unread_op']} cannot be read or written"):
        with lm.trace(PROMPT_1):
            getattr(attn, o["unread_op"]).output.save()
    with pytest.raises(SourceOpError, match=r"has no \.input/\.inputs in fxpatch"):
        with lm.trace(PROMPT_1):
            getattr(attn, o["attn_out_op"]).inputs.save()
    with pytest.raises(SourceOpError, match=r"skip\(\) is not supported"):
        with lm.trace(PROMPT_1):
            getattr(attn, o["attn_out_op"]).skip(0)
    with pytest.raises(FxpatchError, match="outside a trace"):
        _ = getattr(attn, o["attn_out_op"]).output
    assert_state_unchanged(lm, before)



def test_operations_in_generate_steps(lm):
    """Prefill and decode graphs have the operations too: per-step reads and a write at every step."""
    import fxpatch
    from tests.test_generation import HELLO, N, assert_tokens, expected_batch, hf_generate

    o = ops(lm)
    attn = envoy(lm, o["attn"]).source
    with lm.generate(max_new_tokens=N) as tracer:
        with tracer.invoke(PROMPT_1):
            seen = fxpatch.save([])
            for _ in tracer.all():
                seen.append(getattr(attn, o["attn_out_op"]).output[:, -1])
        with tracer.invoke(HELLO):
            for _ in tracer.all():
                getattr(attn, o["attn_out_op"]).output[:, -1] = 0
        result = tracer.result.save()

    out_proj = lm._model.get_submodule(o["out_proj"])
    ref: list[torch.Tensor] = []
    hook = out_proj.register_forward_pre_hook(lambda m, args: ref.append(args[0][:, -1].detach().clone()))
    try:
        plain = hf_generate(lm, PROMPT_1, N)
    finally:
        hook.remove()
    assert len(seen) == len(ref) == N
    for step, (got, expected) in enumerate(zip(seen, ref)):
        close(got, expected, f"step {step}")

    def zero_last_input(output, step):  # out_proj(0) at the last position is its bias
        output = output.clone()
        output[:, -1] = 0 if out_proj.bias is None else out_proj.bias
        return output
    edited = hf_generate(lm, HELLO, N, edits=[(out_proj, zero_last_input)])
    assert edited != hf_generate(lm, HELLO, N)
    assert_tokens(lm, result, expected_batch(lm, [PROMPT_1, HELLO], [plain, edited]))
