"""Nothing is GPT-2- or Llama-specific: other decoder architectures, tiny and random, give each prompt's
logits alone in a left-padded batch, generate what plain ``generate`` does (with a write at every step
too), give every module's output and input, read in each invoke, as the plain model computes it on
the same batch, and a module value's gradient in one invoke as torch computes it. Four architectures
run in the default suite; ``-m slow`` runs 22 more."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

from fxpatch import LanguageModel
from fxpatch.errors import ModuleNotRunError
from fxpatch.proxy import Proxy
from tests.conftest import PROMPT_1
from tests.reference import run_on_batch

PROMPTS = [PROMPT_1, "hello there"]
SIZES = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 128}
KV = {"num_key_value_heads": 2}
T = transformers
CONFIGS = {
    "qwen2": lambda v: T.Qwen2Config(intermediate_size=128, **KV, **SIZES, **v),
    "gpt_neox": lambda v: T.GPTNeoXConfig(intermediate_size=128, **SIZES, **v),
    "opt": lambda v: T.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **SIZES, **v),
    # a mixture of experts: tokens routed to 2 of 4 experts, the experts' values (routed tokens, features)
    "mixtral": lambda v: T.MixtralConfig(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, **KV,
                                         **SIZES, **v),
}
MORE_CONFIGS = {  # under the slow marker
    "bloom": lambda v: T.BloomConfig(n_layer=2, hidden_size=64, n_head=4, **v),
    "codegen": lambda v: T.CodeGenConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=128, n_ctx=128, **v),
    "cohere": lambda v: T.CohereConfig(intermediate_size=128, **KV, **SIZES, **v),
    "falcon": lambda v: T.FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, **v),
    "gemma": lambda v: T.GemmaConfig(intermediate_size=128, head_dim=16, **KV, **SIZES, **v),
    "gemma2": lambda v: T.Gemma2Config(intermediate_size=128, head_dim=16, **KV, **SIZES, **v),
    "gpt_bigcode": lambda v: T.GPTBigCodeConfig(n_layer=2, n_embd=64, n_head=4, n_positions=128, **v),
    "gpt_neo": lambda v: T.GPTNeoConfig(num_layers=2, hidden_size=64, num_heads=4, max_position_embeddings=128,
                                        attention_types=[[["global", "local"], 1]], **v),
    "gptj": lambda v: T.GPTJConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=128, **v),
    "granite": lambda v: T.GraniteConfig(intermediate_size=128, **KV, **SIZES, **v),
    "llama": lambda v: T.LlamaConfig(intermediate_size=128, **KV, **SIZES, **v),
    "mistral": lambda v: T.MistralConfig(intermediate_size=128, **KV, **SIZES, **v),
    "mpt": lambda v: T.MptConfig(n_layers=2, d_model=64, n_heads=4, max_seq_len=128, use_cache=True, **v),
    "olmo": lambda v: T.OlmoConfig(intermediate_size=128, **SIZES, **v),
    "olmo2": lambda v: T.Olmo2Config(intermediate_size=128, **SIZES, **v),
    "olmoe": lambda v: T.OlmoeConfig(intermediate_size=64, num_experts=4, num_experts_per_tok=2, **KV, **SIZES, **v),
    "phi": lambda v: T.PhiConfig(intermediate_size=128, **SIZES, **v),
    "phi3": lambda v: T.Phi3Config(intermediate_size=128, **SIZES, **v),
    "qwen2_moe": lambda v: T.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                                            shared_expert_intermediate_size=64, num_experts_per_tok=2, **KV, **SIZES,
                                            **v),
    "qwen3": lambda v: T.Qwen3Config(intermediate_size=128, head_dim=16, **KV, **SIZES, **v),
    "smollm3": lambda v: T.SmolLM3Config(intermediate_size=128, **KV, **SIZES, **v),
    "starcoder2": lambda v: T.Starcoder2Config(intermediate_size=128, **KV, **SIZES, **v),
}
ARCHS = [*CONFIGS, *(pytest.param(name, marks=pytest.mark.slow) for name in MORE_CONFIGS)]
STEPS = 4


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tokenizer):
    """An architecture's name, its plain HF model (random weights) and fxpatch's model over it."""
    torch.manual_seed(0)
    make = {**CONFIGS, **MORE_CONFIGS}[request.param]
    config = make({"vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0})
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    return request.param, hf, LanguageModel(hf, tokenizer=tokenizer)


def first_layer(hf) -> str:
    """The path of the first decoder layer (the first entry of the model's list of 2 layers)."""
    return next(f"{name}.0" for name, module in hf.named_modules()
                if isinstance(module, torch.nn.ModuleList) and len(module) == 2 and "experts" not in name)


def alone_generate(hf, tokenizer, prompt: str) -> list[int]:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS,
                          do_sample=False, pad_token_id=0)
    return out[0, -STEPS:].tolist()


def test_architecture(arch, tokenizer):
    _, hf, lm = arch
    with lm.trace(PROMPTS):
        logits = lm.output.logits.save()
    with lm.generate(PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS):
        generated = lm.generator.output.save()
    for row, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            alone = hf(input_ids=ids).logits[0]
        torch.testing.assert_close(logits[row, logits.shape[1] - ids.shape[1]:], alone, atol=1e-5, rtol=1e-5)
        assert generated[row, -STEPS:].tolist() == alone_generate(hf, tokenizer, prompt)


def test_every_module_output_and_input_in_each_invoke_is_the_plain_models(arch):
    """Each invoke reads every module whose output (or first input) is one tensor: its rows of a value with a
    row per prompt, the whole of any other (OPT's flattened (rows * tokens, features), the experts' routed
    tokens), as NNsight gives them; each equals the plain model's on the batch fxpatch ran, taken by hooks."""
    name, hf, lm = arch
    paths = [path for path, _ in hf.named_modules() if path]
    saved = {}
    with torch.no_grad(), lm.trace() as tracer:
        for row, prompt in enumerate(PROMPTS):
            with tracer.invoke(prompt):
                for path in paths:
                    envoy = functools.reduce(getattr, path.split("."), lm)
                    for kind in ("output", "input"):
                        try:
                            value = getattr(envoy, kind)
                        except ModuleNotRunError:
                            break
                        if isinstance(value, Proxy):  # one tensor, not a tuple or dict of them
                            saved[row, path, kind] = value.save()
    seen: dict = {}

    def keep_first_call(path):  # the values themselves, as .save() keeps them
        def pre(module, args, kwargs):
            seen.setdefault((path, "input"), args[0] if args else next(iter(kwargs.values()), None))

        def post(module, args, output):
            seen.setdefault((path, "output"), output)
        return pre, post

    hooks = []
    for path in paths:
        pre, post = keep_first_call(path)
        module = hf.get_submodule(path)
        hooks += [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            run_on_batch(lm, tracer.batch)
    finally:
        for hook in hooks:
            hook.remove()
    whole = 0
    for (row, path, kind), value in saved.items():
        expected = seen[path, kind]
        if expected.dim() > 0 and expected.shape[0] == len(PROMPTS):
            expected = expected[row:row + 1]
        else:
            whole += 1
        torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-5, msg=lambda m, p=path, k=kind: f"{p}.{k}: {m}")
    assert len(saved) >= 30 * len(PROMPTS)  # every module of 2 layers, outputs and inputs
    assert (whole > 0) == (name in ("opt", "mixtral", "olmoe", "qwen2_moe"))  # those that flatten tokens


def test_a_write_at_every_generation_step_of_one_invoke_is_what_generate_with_a_hook_gives(arch, tokenizer):
    """The second invoke scales its last position of the first layer's output at every step; its tokens are
    plain ``generate``'s on the left-padded batch with that write in a hook, and the first prompt's are its
    tokens alone."""
    _, hf, lm = arch
    path = first_layer(hf)
    layer = functools.reduce(getattr, path.split("."), lm)
    with torch.no_grad(), lm.generate(max_new_tokens=STEPS, min_new_tokens=STEPS) as tracer:
        with tracer.invoke(PROMPTS[0]):
            first = lm.generator.output.save()
        with tracer.invoke(PROMPTS[1]):
            for _ in tracer.all():
                out = layer.output
                (out if isinstance(out, Proxy) else out[0])[:, -1] *= 3.0
            second = lm.generator.output.save()

    def scale(module, args, output):
        (output if isinstance(output, torch.Tensor) else output[0])[1, -1] *= 3.0

    rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    hook = hf.get_submodule(path).register_forward_hook(scale)
    try:
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=mask, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                   do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    assert second[0, -STEPS:].tolist() == expected[1, -STEPS:].tolist()
    assert first[0, -STEPS:].tolist() == alone_generate(hf, tokenizer, PROMPTS[0])


def test_a_module_values_gradient_in_one_invoke_is_torchs(arch):
    """``with metric.backward(): x.grad`` of the first layer's output in the second invoke (and, in OPT, of
    ``fc1``'s flattened value, whole) equals torch's gradient of that prompt's metric on the same batch."""
    name, hf, lm = arch
    paths = [first_layer(hf)] + (["model.decoder.layers.0.fc1"] if name == "opt" else [])
    for path in paths:
        envoy = functools.reduce(getattr, path.split("."), lm)
        with lm.trace() as tracer:
            with tracer.invoke(PROMPTS[0]):
                pass
            with tracer.invoke(PROMPTS[1]):
                out = envoy.output
                value = out if isinstance(out, Proxy) else out[0]
                logits = lm.output.logits
                metric = logits[:, -1, 5].sum() - logits[:, -1, 7].sum()
                with metric.backward():
                    grad = value.grad.save()
        kept: dict = {}

        def keep(module, args, output, kept=kept):
            kept["value"] = output if isinstance(output, torch.Tensor) else output[0]
            kept["value"].retain_grad()

        logits = run_on_batch(lm, tracer.batch, [(hf.get_submodule(path), keep)])
        (logits[1, -1, 5] - logits[1, -1, 7]).backward()
        hf.zero_grad(set_to_none=True)
        expected = kept["value"].grad
        if expected.shape[0] == len(PROMPTS):
            expected = expected[1:2]
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5, msg=lambda m, p=path: f"{p}: {m}")


@pytest.mark.slow
def test_compiled_patch_and_generation_equal_eager(arch, tokenizer):
    """``compile=True`` on the same model: a cross-prompt patch at the first layer's last position gives eager's
    logits (within 1e-5), and a write at every generation step gives eager's tokens."""
    _, hf, eager = arch
    torch._dynamo.reset()
    compiled = LanguageModel(hf, tokenizer=tokenizer, compile=True)
    path = first_layer(hf)

    def patch(lm):
        layer = functools.reduce(getattr, path.split("."), lm)
        with torch.no_grad(), lm.trace() as tracer:
            with tracer.invoke(PROMPTS[0]):
                out = layer.output
                h = (out if isinstance(out, Proxy) else out[0])[:, -1]
            with tracer.invoke(PROMPTS[1]):
                out = layer.output
                (out if isinstance(out, Proxy) else out[0])[:, -1] = h * 2.0
            with tracer.invoke():
                logits = lm.lm_head.output.save() if hasattr(lm._model, "lm_head") else lm.output.logits.save()
        return logits

    def generate(lm):
        layer = functools.reduce(getattr, path.split("."), lm)
        with torch.no_grad(), lm.generate(max_new_tokens=STEPS, min_new_tokens=STEPS) as tracer:
            with tracer.invoke(PROMPTS[0]):
                pass
            with tracer.invoke(PROMPTS[1]):
                for _ in tracer.all():
                    out = layer.output
                    (out if isinstance(out, Proxy) else out[0])[:, -1] *= 3.0
            with tracer.invoke():
                tokens = lm.generator.output.save()
        return tokens

    torch.testing.assert_close(patch(compiled), patch(eager), atol=1e-5, rtol=1e-5)
    assert generate(compiled).tolist() == generate(eager).tolist()
