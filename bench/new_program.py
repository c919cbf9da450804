"""What a new program costs on a deep model.

``python -m bench.new_program [LAYERS]`` builds a Llama-shaped model (hidden 128, default 32
layers, random weights, ``cache_dir=False``), runs a first trace (the export), then a
cross-prompt patch at layers 0, 1, 2 (each a program not seen before: a new rewritten graph)
and layer 2 again (a cached graph: the run alone). A new program's rewrite costs its time
minus the cached run's; the first one of its shape also traces its functional form (``make_fx``),
which the programs at other layers reuse.
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fxpatch import LanguageModel

ROWS = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12]]


def patch(model: LanguageModel, layer: int, scale: float) -> torch.Tensor:
    """Prompt 0's layer output at the last position, scaled, into prompt 1's."""
    with model.trace() as tracer:
        with tracer.invoke(ROWS[0]):
            h = model.model.layers[layer].output[:, -1].save()
        with tracer.invoke(ROWS[1]):
            model.model.layers[layer].output[:, -1] = h * scale
            out = model.lm_head.output[:, -1].save()
    return out


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(layers: int = 32) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1000, max_position_embeddings=256)
    model = LanguageModel(LlamaForCausalLM(config).eval(), tokenizer=None, cache_dir=False)
    with torch.no_grad():
        print(f"first trace (export): {seconds(lambda: patch(model, 0, 1.0)):.2f} s")
        model.cache_clear()
        model._functional.clear()
        for layer in range(3):
            print(f"new program, layer {layer}: {seconds(lambda layer=layer: patch(model, layer, 2.0)) * 1e3:.1f} ms")
        print(f"same program again (run only): {seconds(lambda: patch(model, 2, 2.0)) * 1e3:.1f} ms")


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:]])
