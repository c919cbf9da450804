"""The GEMMs of a GPT-2-small forward, by torch's CPU BLAS and by oneDNN (``fxpatch::onednn_linear``).

``python -m bench.gemm [--rows 1 8 176] [--threads 2]`` runs every weight product of a GPT-2-small-shaped
forward (12 layers of GPT-2's ``Conv1D``: ``addmm(b, x, w)`` with ``w`` of ``(in, out)``, then the head's
``mm`` of the tied ``(vocab, hidden)`` weight) on ``rows`` rows, as the plain model runs them and as a
compiled fxpatch graph runs them after ``OneDNNLinear`` (fxpatch/passes/onednn_linear.py), interleaved,
and prints the medians, their ratio and the largest difference of values. 8 rows is a decode step of 8
prompts; 176 the 8-invoke prefill of 22 tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.suite import gpt2_small
from fxpatch.passes.onednn_linear import available
from fxpatch.passes.ops import ONEDNN_LINEAR_OP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 176])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if not available():
        raise SystemExit("this torch has no oneDNN linear")
    torch.set_num_threads(args.threads)
    hf = gpt2_small()
    convs = [(m.weight.detach(), m.bias.detach()) for block in hf.transformer.h
             for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
    head = hf.lm_head.weight.detach()
    print(f"GPT-2-small GEMMs, {args.threads} threads, medians of {args.rounds} rounds")
    for rows in args.rows:
        xs = {w.shape[0]: torch.randn(rows, w.shape[0]) for w, _ in convs}

        def blas(xs=xs):
            return [torch.addmm(b, xs[w.shape[0]], w) for w, b in convs] + [torch.mm(xs[head.shape[1]], head.t())]

        def onednn(xs=xs):
            return ([ONEDNN_LINEAR_OP(xs[w.shape[0]], w, b, True) for w, b in convs]
                    + [ONEDNN_LINEAR_OP(xs[head.shape[1]], head, None, False)])

        diff = max((a - b).abs().max().item() for a, b in zip(blas(), onednn()))
        times: dict[str, list[float]] = {"blas": [], "onednn": []}
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, fn in (("blas", blas), ("onednn", onednn)):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        b, o = (statistics.median(times[k]) * 1e3 for k in ("blas", "onednn"))
        print(f"  {rows:4d} rows: torch's BLAS {b:7.1f} ms  oneDNN {o:7.1f} ms  ratio {o / b:.2f}x  "
              f"max abs diff {diff:.1e}")


if __name__ == "__main__":
    main()
