"""Export time against depth, and where it goes.

``python -m bench.export_depth [LAYERS ...]`` exports the forward site graph of Llama-shaped
models (hidden 128, random weights, ``cache_dir=False``) of each depth in one process, in
increasing order, and prints the seconds of ``model.site_graph()``, of ``torch.export`` inside
it and of fxpatch's operation-site pass (``add_op_sites``), with the graph's node count.
"""

from __future__ import annotations

import sys
import time

import torch
from tabulate import tabulate
from transformers import LlamaConfig, LlamaForCausalLM

import fxpatch.export as export
from fxpatch import LanguageModel


def timed(owner, name: str, totals: dict) -> None:
    """Add the seconds each call of ``owner.name`` takes to ``totals[name]``."""
    original = getattr(owner, name)

    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

    setattr(owner, name, run)


def main(depths: list[int]) -> None:
    totals: dict[str, float] = {}
    timed(torch.export, "export", totals)
    timed(export, "add_op_sites", totals)
    rows = []
    for layers in depths:
        totals.clear()
        torch.manual_seed(0)
        config = LlamaConfig(num_hidden_layers=layers, hidden_size=128, intermediate_size=256,
                             num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)
        model = LanguageModel(LlamaForCausalLM(config).eval(), tokenizer=None, cache_dir=False)
        start = time.perf_counter()
        sg = model.site_graph("forward")
        rows.append({"layers": layers, "site_graph (s)": time.perf_counter() - start,
                     "torch.export (s)": totals.get("export", 0.0),
                     "add_op_sites (s)": totals.get("add_op_sites", 0.0),
                     "nodes": len(sg.graph_module.graph.nodes)})
        print(tabulate(rows[-1:], headers="keys", floatfmt=".2f"), flush=True)
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".2f"))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [2, 4, 8, 16, 32])
