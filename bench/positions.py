"""A compiled graph with its positions counted from the end, against the same graph with them as constants.

``python -m bench.positions [--rounds N]`` takes the rewritten graph of the 8-invoke trace on the tiny
GPT-2 (16 positions, all -1: reads and writes at the last token, the head on the rows read), compiles
it twice, once as ``compile=True`` runs it now (each position an input ``m = 1 - p`` the graph counts from
the end, ``CountFromEnd``: one graph for every value) and once with each position a constant
(``SpecializeNegativeInts``, a graph per value), checks that both give the same outputs, and times the
two interleaved in one process, rounds of 20 calls each. The ratio is what counting from the end costs
the graph's own run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fxpatch.runner as runner
from bench.cases import prompts
from bench.suite import eight_invokes, tiny_gpt2, tokenizer
from fxpatch import LanguageModel
from fxpatch.passes.count_from_end import fed as fed_as


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds of 20 calls per form (default 30)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = LanguageModel(tiny_gpt2(), tokenizer=tokenizer(), cache_dir=False, compile=True)
    seen: dict = {}
    compiled, call_graph = runner.compiled, runner.call_graph

    def keep_compiled(gm, mode=None, dynamic=True, numbers=(), negative=(), from_end=()):
        seen.update(gm=gm, numbers=numbers, from_end=from_end)
        return compiled(gm, mode, dynamic, numbers, negative, from_end)

    def keep_args(run, graph_args):
        seen["args"] = graph_args
        return call_graph(run, graph_args)

    runner.compiled, runner.call_graph = keep_compiled, keep_args
    try:
        eight_invokes(model, prompts(8, 1024), 1)
    finally:
        runner.compiled, runner.call_graph = compiled, call_graph
    gm, numbers, from_end, fed = seen["gm"], seen["numbers"], seen["from_end"], seen["args"]
    constants = list(fed)
    for place in from_end:  # the run fed m = 1 - p; the constant form is fed p
        constants[place] = fed_as(constants[place])
    forms = {"counted from the end": (compiled(gm, None, True, numbers, (), from_end), fed),
             "constants": (compiled(gm, None, True, numbers, tuple((p, constants[p]) for p in from_end)),
                           constants)}
    with torch.no_grad():
        outs = [fn(*a) for fn, a in forms.values()]
        same = all(torch.equal(x, y) for x, y in zip(*outs) if isinstance(x, torch.Tensor))
        times: dict[str, list[float]] = {name: [] for name in forms}
        for _ in range(args.rounds):
            for name, (fn, a) in forms.items():
                start = time.perf_counter()
                for _ in range(20):
                    fn(*a)
                times[name].append((time.perf_counter() - start) / 20 * 1e3)
    first, second = times.values()
    print(f"tiny GPT-2, 8 invokes, {len(from_end)} positions counted from the end, {args.threads} threads, "
          f"{args.rounds} rounds of 20 calls (medians, ms); same outputs: {same}")
    for name, values in times.items():
        print(f"  {name}: {statistics.median(values):.3f}")
    print(f"  ratio: {statistics.median([a / b for a, b in zip(first, second)]):.3f}")


if __name__ == "__main__":
    main()
