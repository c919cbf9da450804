"""What a trace at sizes not seen before costs, against the same traces again.

``python -m bench.new_sizes [--sets N]`` runs the 8-invoke trace of ``python -m bench invokes8``
(tiny GPT-2, eager) over ``N`` sets of 8 prompts (default 40), each set 1 token longer than the
last, so every trace is the first at its sizes; then over the same sets again, each a known size.
Both passes run the same graph (one cache miss, at the first set); the first also checks the
program for its new shapes. The difference per trace is that check's cost: a loop over a
dataset's prompts pays it at each new length. A second table does the same for one prompt and
a position swept over it (``h[:, p] = 0``, then the logits), the positions being new each time.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.suite import eight_invokes, tiny_gpt2, tokenizer
from fxpatch import LanguageModel


def timed(fn, items) -> float:
    """Seconds for ``fn`` over ``items``, in order."""
    start = time.perf_counter()
    for item in items:
        fn(item)
    return time.perf_counter() - start


def zero_at(model: LanguageModel, position: int) -> torch.Tensor:
    with torch.no_grad():
        with model.trace(list(range(1, 41))):
            model.transformer.h[1].output[:, position] = 0
            logits = model.lm_head.output[:, -1].save()
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=40, help="sets of 8 prompts, or positions (default 40)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok, hf = tokenizer(), tiny_gpt2()
    model = LanguageModel(hf, tokenizer=tok, cache_dir=False)
    g = torch.Generator().manual_seed(0)
    sets = [[torch.randint(0, 1023, (8 + n + i,), generator=g).tolist() for i in range(8)]
            for n in range(args.sets + 1)]
    eight_invokes(model, sets[0], 1)  # the export and the graph: not what is measured
    zero_at(model, 0)
    rows = [("8 invokes, prompts 1 token longer each trace", lambda s: eight_invokes(model, s, 1), sets[1:]),
            ("one prompt of 40 tokens, a new position each trace", lambda p: zero_at(model, p),
             range(1, min(args.sets, 39) + 1))]
    print(f"tiny GPT-2, eager, {args.threads} threads (ms per trace)")
    print("| workload | new sizes | the same again | a new size's check |")
    print("|---|---|---|---|")
    for name, fn, items in rows:
        items = list(items)
        first, again = timed(fn, items) / len(items), timed(fn, items) / len(items)
        print(f"| {name} | {first * 1e3:.1f} | {again * 1e3:.1f} | {(first - again) * 1e3:.1f} |")
    print(f"graph cache: {model.cache_info()}")


if __name__ == "__main__":
    main()
