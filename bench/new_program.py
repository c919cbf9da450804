"""What a new program costs on a deep model.

``python -m bench.new_program [LAYERS [ROUNDS]]`` builds a Llama-shaped model (hidden 128, default
32 layers, random weights, ``cache_dir=False``), runs a first trace (the export), then in each
round (default 5), with every rewritten graph, functional form and check forgotten, a
cross-prompt patch at layers 0, 1, 2 (each a program not seen before: a new rewritten graph)
and layer 2 again (a cached graph: the run alone). Each call is timed once, after a
``gc.collect()``; the medians over the rounds are printed with every round's time. A new
program's rewrite costs its time minus the cached run's; the first one of its shape also traces
its functional form (``make_fx``), which the programs at other layers reuse.
"""

from __future__ import annotations

import gc
import statistics
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
    gc.collect()  # the garbage of what ran before (the export's, the last round's) is not this call's cost
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(layers: int = 32, rounds: int = 5) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1000, max_position_embeddings=256)
    model = LanguageModel(LlamaForCausalLM(config).eval(), tokenizer=None, cache_dir=False)
    with torch.no_grad():
        print(f"first trace (export): {seconds(lambda: patch(model, 0, 1.0)):.2f} s")
        times: dict[str, list[float]] = {}
        for _ in range(rounds):  # each round starts with nothing cached but the export
            model.cache_clear()
            model._functional.clear()
            model._checked.clear()
            for layer in range(3):
                what = f"new program, layer {layer}" + (" (first of its shape)" if layer == 0 else "")
                times.setdefault(what, []).append(seconds(lambda layer=layer: patch(model, layer, 2.0)))
            times.setdefault("same program again (run only)", []).append(seconds(lambda: patch(model, 2, 2.0)))
        for what, values in times.items():
            ms = [v * 1e3 for v in values]
            print(f"{what}: median {statistics.median(ms):.1f} ms (by round: {', '.join(f'{v:.1f}' for v in ms)})")


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:]])
