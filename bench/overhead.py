"""A trace's own Python work on the tiny GPT-2: its time minus its graph's.

``python -m bench.overhead [--compile] [--rounds N]`` times, interleaved in rounds of 10 calls
each, four things: the reference page's patch (or the 8-invoke trace) through fxpatch, the
rewritten graph that trace ran called alone on the same arguments, and HF by hand (the batch
with a forward hook). The overhead is fxpatch's time minus the graph's: recording the block,
tokenizing, the model's fingerprint, the program's key and cache lookup, binding saved values.
The issue's target is at most 0.3 ms. The last column times the trace with its graph replaced by
one that hands back the outputs of its last run: the Python work alone, without the graph's effect
on the caches around it (on the 2-core VM the work costs more right after a real run). A third row
runs the patch with a notebook-sized dataset (9,000 rows of a few fields) in the calling module's
globals, which a trace looks through for traced values put into containers made before it
(NNsight's ``acts.append(h)`` idiom) where counting references does not rule that out; a fourth adds
6,000 names, as a long notebook session has (``_i1``, ``_1``, ...).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import bench.suite
import fxpatch.runner
from bench.cases import prompts
from bench.suite import eight_by_hand, eight_invokes, patch_by_hand, reference_patch, tiny_gpt2, tokenizer
from fxpatch import LanguageModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="run the traces with compile=True")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of 10 calls per contender (default 15)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok, hf = tokenizer(), tiny_gpt2()
    model = LanguageModel(hf, tokenizer=tok, cache_dir=False, compile=args.compile)
    rows = prompts(8, 1024)
    last: dict = {}
    call_graph = fxpatch.runner.call_graph

    def keep_last(run, graph_args):
        last.update(run=run, args=graph_args)
        return call_graph(run, graph_args)

    fxpatch.runner.call_graph = keep_last

    cases = {"reference page's patch": (lambda: reference_patch(model), lambda: patch_by_hand(hf, tok)),
             "8 invokes": (lambda: eight_invokes(model, rows, 1), lambda: eight_by_hand(hf, rows, 1))}
    print(f"tiny GPT-2, {'compiled' if args.compile else 'eager'}, {args.threads} threads, "
          f"{args.rounds} rounds of 10 calls (medians, ms)")
    cases["reference page's patch, a 9,000-row dataset in scope"] = cases["reference page's patch"]
    cases["reference page's patch, and 6,000 more names in its module"] = cases["reference page's patch"]
    for name, (trace, by_hand) in cases.items():
        if "dataset" in name:  # reference_patch's module is where its trace looks
            bench.suite.dataset = [{"prompt": f"p{i}", "label": i, "tokens": [1, 2, 3, 4]} for i in range(9000)]
        if "names" in name:  # a long notebook session's _i1, _1, ... (and the dataset still)
            for i in range(3000):
                setattr(bench.suite, f"_i{i}", f"cell {i}")
                setattr(bench.suite, f"_{i}", [i])
        for _ in range(5):
            trace()
            by_hand()

        def graph(run=last["run"], graph_args=last["args"]):  # the graph the last trace ran, alone
            with torch.no_grad():
                return call_graph(run, graph_args)

        outputs = graph()

        def replayed(run, graph_args, outputs=outputs):  # the trace's Python work alone: its graph gives
            return outputs                                # the last run's outputs

        def python_work(trace=trace, replayed=replayed):
            fxpatch.runner.call_graph = replayed
            try:
                trace()
            finally:
                fxpatch.runner.call_graph = keep_last

        times: dict[str, list[float]] = {"fxpatch": [], "graph": [], "hf": [], "python": []}
        for _ in range(args.rounds):
            for key, fn in (("fxpatch", trace), ("graph", graph), ("hf", by_hand), ("python", python_work)):
                start = time.perf_counter()
                for _ in range(10):
                    fn()
                times[key].append((time.perf_counter() - start) / 10 * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        over = statistics.median([a - b for a, b in zip(times["fxpatch"], times["graph"])])
        print(f"  {name}: fxpatch {med['fxpatch']:.2f}  its graph alone {med['graph']:.2f}  HF by hand "
              f"{med['hf']:.2f}  overhead {over:.2f} (target <= 0.3)  fxpatch/HF "
              f"{statistics.median([a / b for a, b in zip(times['fxpatch'], times['hf'])]):.2f}x  "
              f"Python work with the graph replayed {med['python']:.2f} (min {min(times['python']):.2f})")


if __name__ == "__main__":
    main()
