"""Benchmark harness: each case times fxpatch against a baseline measured in the same run.

Run ``python -m bench`` (all cases) or ``python -m bench generate``. Prints a
table (tabulate) and writes ``bench/results/<case>.json``. Ratios, not seconds,
are what to compare across machines: both sides of a ratio run on the same
machine, interleaved, after the same warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tabulate import tabulate

CASES: dict[str, Callable[[argparse.Namespace], list[Measurement]]] = {}


@dataclass
class Measurement:
    case: str
    what: str
    baseline: str
    seconds: float
    baseline_seconds: float
    repeats: int
    target: float | None = None

    @property
    def ratio(self) -> float:
        return self.seconds / self.baseline_seconds


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_pair(fn: Callable[[], object], baseline: Callable[[], object], repeats: int, warmup: int = 1):
    """Median seconds of ``fn`` and ``baseline``, run alternately after ``warmup`` runs of each."""
    for _ in range(warmup):
        fn()
        baseline()
    ours, theirs = [], []
    for _ in range(repeats):
        for f, sink in ((fn, ours), (baseline, theirs)):
            _sync()
            start = time.perf_counter()
            f()
            _sync()
            sink.append(time.perf_counter() - start)
    return statistics.median(ours), statistics.median(theirs)


def timed_once(fn: Callable[[], object]) -> float:
    """Seconds of one call (a first call: export, rewrite or compile included)."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    from . import cases  # noqa: F401 - registers the cases

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"cases to run (default: all of {sorted(CASES)})")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for the compiled cases (reduce-overhead: CUDA graphs)")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    for name in args.cases or sorted(CASES):
        results = CASES[name](args)
        for m in results:
            rows.append([m.case, m.what, m.baseline, f"{m.seconds * 1e3:.1f}", f"{m.baseline_seconds * 1e3:.1f}",
                         f"{m.ratio:.3f}", "" if m.target is None else f"<= {m.target}",
                         "" if m.target is None else ("ok" if m.ratio <= m.target else "MISSED")])
        path = os.path.join(os.path.dirname(__file__), "results", f"{name}.json")
        with open(path, "w") as f:
            json.dump({"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
                       "dtype": str(args.dtype),
                       "results": [asdict(m) | {"ratio": m.ratio} for m in results]}, f, indent=2)
    print(tabulate(rows, headers=["case", "fxpatch", "baseline", "ms", "baseline ms", "ratio", "target", ""],
                   tablefmt="github"))
    return 0
