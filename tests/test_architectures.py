"""Nothing is GPT-2- or Llama-specific: other decoder architectures, tiny and random, give
each prompt's logits alone in a left-padded batch and generate what plain ``generate`` does."""

from __future__ import annotations

import pytest
import torch
import transformers

from fxpatch import LanguageModel
from tests.conftest import PROMPT_1

PROMPTS = [PROMPT_1, "hello there"]
SIZES = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 128}
CONFIGS = {
    "qwen2": lambda v: transformers.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **SIZES, **v),
    "gpt_neox": lambda v: transformers.GPTNeoXConfig(intermediate_size=128, **SIZES, **v),
    "opt": lambda v: transformers.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **SIZES, **v),
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
