"""Export time against disk-cache load time, each in a fresh process.

``python -m bench.export_cache`` makes, for each model shape below (random weights), a
process that exports the forward, prefill and decode site graphs into an empty cache
directory (writing the entries), then a second process that loads them. Prints wall and
CPU seconds per mode (CPU time is what to compare on a busy machine) and the entries' sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from tabulate import tabulate

MODELS = {
    "gpt2-small (12 layers, 768)": "GPT2Config(n_layer=12, n_embd=768, n_head=12)",
    "llama (32 layers, hidden 128)": ("LlamaConfig(num_hidden_layers=32, hidden_size=128, intermediate_size=256, "
                                      "num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)"),
}
MODES = ("forward", "prefill", "decode")


def child(config: str, cache_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig  # noqa: F401 - named in config

    from fxpatch import LanguageModel

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(eval(config)).eval()
    model = LanguageModel(hf, tokenizer=None, cache_dir=cache_dir)
    out = {}
    for mode in MODES:
        wall, cpu = time.perf_counter(), time.process_time()
        sg = model.site_graph(mode)
        out[mode] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                     "export": None if sg.loaded_from else sg.export_seconds, "loaded": sg.loaded_from is not None,
                     "nodes": len(sg.graph_module.graph.nodes)}
    print(json.dumps(out))


def run(config: str, cache_dir: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.export_cache", "--child", config, cache_dir],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = []
    for name, config in MODELS.items():
        with tempfile.TemporaryDirectory() as cache_dir:
            first, second = run(config, cache_dir), run(config, cache_dir)
            size = sum(os.path.getsize(os.path.join(cache_dir, "exports", f))
                       for f in os.listdir(os.path.join(cache_dir, "exports")))
        assert not any(first[m]["loaded"] for m in MODES) and all(second[m]["loaded"] for m in MODES)
        for mode in MODES:
            a, b = first[mode], second[mode]
            rows.append([name, mode, a["nodes"], f"{a['export']:.2f}", f"{a['wall'] - a['export']:.2f}",
                         f"{a['wall']:.2f} / {a['cpu']:.2f}", f"{b['wall']:.2f} / {b['cpu']:.2f}",
                         f"{a['cpu'] / b['cpu']:.1f}x"])
        rows.append([name, "all three", "", "", "", f"{sum(first[m]['wall'] for m in MODES):.2f} / "
                     f"{sum(first[m]['cpu'] for m in MODES):.2f}",
                     f"{sum(second[m]['wall'] for m in MODES):.2f} / {sum(second[m]['cpu'] for m in MODES):.2f}",
                     f"entries {size / 1e6:.1f} MB"])
    print(tabulate(rows, headers=["model", "mode", "nodes", "export s", "write s", "1st process wall / cpu s",
                                  "2nd process (load) wall / cpu s", "cpu ratio"], tablefmt="github"))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3])
    else:
        main()
