"""Nothing is GPT-2- or Llama-specific: other decoder architectures, tiny and random, give
each prompt's logits alone in a left-padded batch, generate what plain ``generate`` does, and give
every module's output, read in each invoke, as the plain model computes it on the same batch."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

from fxpatch import LanguageModel
from fxpatch.errors import ModuleNotRunError
from fxpatch.proxy import Proxy
from tests.conftest import PROMPT_1

PROMPTS = [PROMPT_1, "hello there"]
SIZES = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 128}
CONFIGS = {
    "qwen2": lambda v: transformers.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **SIZES, **v),
    "gpt_neox": lambda v: transformers.GPTNeoXConfig(intermediate_size=128, **SIZES, **v),
    "opt": lambda v: transformers.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **SIZES, **v),
    # a mixture of experts: tokens routed to 2 of 4 experts, the experts' values (routed tokens, features)
    "mixtral": lambda v: transformers.MixtralConfig(intermediate_size=128, num_key_value_heads=2, num_local_experts=4,
                                                    num_experts_per_tok=2, **SIZES, **v),
}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_architecture(arch, tokenizer):
    torch.manual_seed(0)
    config = CONFIGS[arch]({"vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0})
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    lm = LanguageModel(hf, tokenizer=tokenizer)
    with lm.trace(PROMPTS):
        logits = lm.output.logits.save()
    with lm.generate(PROMPTS, max_new_tokens=4, min_new_tokens=4):
        generated = lm.generator.output.save()
    for row, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            alone = hf(input_ids=ids).logits[0]
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                                   do_sample=False, pad_token_id=0)
        torch.testing.assert_close(logits[row, logits.shape[1] - ids.shape[1]:], alone, atol=1e-5, rtol=1e-5)
        assert generated[row, -4:].tolist() == expected[0, -4:].tolist()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_module_output_in_each_invoke_is_the_plain_models(arch, tokenizer):
    """Each invoke reads every module whose output is one tensor: its rows of a value with a row per prompt,
    the whole of any other (OPT's flattened (rows * tokens, features), the experts' routed tokens), as
    NNsight gives them; each equals the plain model's output on the batch fxpatch ran, taken by a hook."""
    torch.manual_seed(0)
    config = CONFIGS[arch]({"vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0})
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    lm = LanguageModel(hf, tokenizer=tokenizer)
    paths = [name for name, _ in hf.named_modules() if name]
    saved = {}
    with torch.no_grad(), lm.trace() as tracer:
        for row, prompt in enumerate(PROMPTS):
            with tracer.invoke(prompt):
                for path in paths:
                    try:
                        value = functools.reduce(getattr, path.split("."), lm).output
                    except ModuleNotRunError:
                        continue
                    if isinstance(value, Proxy):  # one tensor, not a tuple or dict of them
                        saved[row, path] = value.save()
    outputs: dict = {}

    def keep_first_call(path):  # the value itself, as .save() keeps it
        def hook(module, args, output):
            outputs.setdefault(path, output)
        return hook

    hooks = [hf.get_submodule(path).register_forward_hook(keep_first_call(path)) for path in paths]
    try:
        batch = tracer.batch
        with torch.no_grad():
            hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    finally:
        for hook in hooks:
            hook.remove()
    whole = 0
    for (row, path), value in saved.items():
        expected = outputs[path]
        if expected.shape[0] == len(PROMPTS):
            expected = expected[row:row + 1]
        else:
            whole += 1
        torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-5, msg=lambda m, p=path: f"{p}: {m}")
    assert len(saved) > 20 * len(PROMPTS)
    assert (whole > 0) == (arch in ("opt", "mixtral"))  # the architectures that flatten tokens
