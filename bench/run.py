"""Benchmark harness: each case times fxpatch and its contenders against a baseline measured in the same run.

Run ``python -m bench`` (the comparison suite: patch, invokes8, sweep, generation),
``python -m bench --quick`` (one timed run each, fxpatch compiled left out) or name cases
(``python -m bench sweep``; also the older trace, trace_compiled, generate and stop).
Prints a progress line per measurement (stderr), a table (tabulate) and writes
``bench/results/bench.json``. Ratios, not seconds, are what to compare across
machines: both sides of a ratio run on the same machine, interleaved, after the same
warm-up."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tabulate import tabulate

CASES: dict[str, Callable[[argparse.Namespace], list[Measurement]]] = {}


@dataclass
class Measurement:
    """One row: ``contender``'s median seconds on workload ``what``, and its baseline's in the same run.

    ``seconds`` is ``None`` for a contender that did not run (``note`` says why).
    ``target`` is a bound on ``ratio`` (a number) or a described one with ``status``
    set by the case; ``check`` is how the contender's result compares with the baseline's.
    """

    case: str
    what: str
    baseline: str | None
    seconds: float | None
    baseline_seconds: float | None
    repeats: int
    target: float | str | None = None
    contender: str = "fxpatch"
    status: str = ""
    check: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.seconds is None or not self.baseline_seconds:
            return None
        return self.seconds / self.baseline_seconds

    def __post_init__(self):
        if isinstance(self.target, (int, float)) and not self.status and self.ratio is not None:
            self.status = "ok" if self.ratio <= self.target else "MISSED"


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


def timed_all(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, block: int = 1):
    """Median seconds of each of ``fns`` run round-robin (``warmup`` rounds first), each one's last result, and
    the error of each one that raised (it is not run again). With ``block`` > 1 each timed run is that
    many calls back to back, the time per call their mean: a loop's steady state (caches warm with the
    contender's own work), where one call between the others' measures it cold."""
    results: dict[str, object] = {}
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, f in fns.items():
            if name in errors:
                continue
            _sync()
            start = time.perf_counter()
            try:
                for _ in range(block if round_ >= warmup else 1):
                    results[name] = f()
            except Exception as e:  # noqa: BLE001 - a contender that fails is a row that says how
                errors[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
                continue
            _sync()
            if round_ >= warmup:
                times[name].append((time.perf_counter() - start) / block)
    seconds = {name: statistics.median(t) for name, t in times.items() if t and name not in errors}
    return seconds, results, errors


def timed_once(fn: Callable[[], object]) -> float:
    """Seconds of one call (a first call: export, rewrite or compile included)."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.2f} s" if seconds >= 10 else f"{seconds * 1e3:,.1f} ms"


def table(rows: list[Measurement]) -> str:
    """The results as a tabulate table (GitHub style), units in the cells."""
    body = []
    for m in rows:
        ratio = m.ratio
        target = m.target if isinstance(m.target, str) or m.target is None else f"<= {m.target}x"
        body.append([m.what, m.contender if m.seconds is not None or not m.note else f"{m.contender} ({m.note})",
                     _time(m.seconds), "" if ratio is None or m.contender == m.baseline else f"{ratio:.2f}x",
                     "" if m.contender == m.baseline else m.baseline or "", target or "", m.status, m.check])
    return tabulate(body, headers=["workload", "contender", "time (median)", "ratio", "vs", "target", "",
                                   "result check"], tablefmt="github", disable_numparse=True)


def main(argv: list[str] | None = None) -> int:
    from . import cases, suite  # noqa: F401 - registers the cases

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*",
                        help=f"cases to run (default: {' '.join(suite.SUITE)}; also: "
                        f"{' '.join(sorted(set(CASES) - set(suite.SUITE)))})")
    parser.add_argument("--quick", action="store_true",
                        help="one timed run per contender after one warm-up, fxpatch compiled left out")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 5; 1 quick)")
    parser.add_argument("--block", type=int, default=1,
                        help="calls back to back in each timed run of the patch and invokes8 cases (default 1: "
                        "one call, between the other contenders' calls)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda (the gpu case and the older cases; the suite runs on the CPU)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for the compiled cases (reduce-overhead: CUDA graphs)")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench.json"),
                        help="where the results go (default bench/results/bench.json)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    args.dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[Measurement] = []
    start = time.perf_counter()
    for name in args.cases or suite.SUITE:
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        rows += CASES[name](args)
    elapsed = time.perf_counter() - start
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": platform.platform(), "cpu": _cpu_name(), "cores": os.cpu_count(),
                   "load_average": os.getloadavg(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                   "dtype": str(args.dtype), "quick": args.quick, "block": args.block, "seconds": elapsed,
                   "grad": "torch.no_grad()",
                   "results": [asdict(m) | {"ratio": m.ratio} for m in rows]}, f, indent=2)
    print(table(rows))
    print(f"\n{_cpu_name()}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end; "
          f"{elapsed:.0f} s in all; results in {args.json}")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
