"""One rank of ``tests/test_distributed.py``'s 2-process sweeps: ``run_cases`` runs them and returns what it got.

``tests/test_distributed.py`` forks the ranks from the test process (sharing its exported model);
``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT_DIR``
runs the same cases under torchrun, each rank writing ``OUT_DIR/rank<r>.pt`` (``-m slow`` test).
The error cases run first, so the sweeps after them also show the process group is still usable.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the worktree's fxpatch

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fxpatch  # noqa: E402
from fxpatch import patching  # noqa: E402
from fxpatch.patching import activation_patching, attribution_patching  # noqa: E402

# the sweep shared with the test: 3 pairs of 10, 9 and 12 tokens, so rank 0 sweeps pairs 0-1 and rank 1 pair 2
CLEANS = ["Madison square garden is located in the city of New", "The Louvre is located in the city of New",
          "The Colosseum is located in the city of New"]
CORRUPTS = ["Madison square house is located in the town of New", "_ _ _ _ _ _ _ _ _",
            "The Colosseum is located in the town of New"]
SITES = ["transformer.h.0", "transformer.h.2.attn"]
POSITIONS = [0, -3, -1]
YORK, UNDERSCORE = 308, 257


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, YORK] - logits[:, UNDERSCORE]


def fields(result) -> dict:
    return {"scores": result.scores, "clean": result.clean, "corrupt": result.corrupt, "tokens": result.tokens,
            "sites": result.sites, "positions": result.positions, "metric_name": result.metric_name,
            "method": result.method}


def error(e: Exception) -> dict:
    return {"error": f"{type(e).__module__}.{type(e).__qualname__}", "message": str(e),
            "notes": getattr(e, "__notes__", []), "rank": getattr(e, "rank", None)}


def run_cases(model) -> dict:
    """Every case on this rank (the process group is set up by the first sweep, from torchrun's environment)."""
    out: dict = {}
    bars: list = []
    make_bar = patching._progress_bar

    def record_bar(total, desc, enabled):
        bars.append((desc, total, enabled))
        return make_bar(total, desc, False)  # no output: what matters is which rank asked for a bar

    patching._progress_bar = record_bar

    def case(name, fn):
        try:
            out[name] = fields(fn())
        except Exception as e:  # noqa: BLE001 - the test checks what each rank raised
            out[name] = error(e)

    def fails_on_rank_1(logits):
        if dist.get_rank() == 1 and logits.abs().sum() > 0:  # the zero logits of the argument check pass
            raise ValueError("metric failed on rank 1")
        return logit_diff(logits)

    try:
        case("failing metric", lambda: attribution_patching(  # line: failing metric
            model, CLEANS, CORRUPTS, SITES, positions=POSITIONS, metric=fails_on_rank_1, distributed=True))
        positions = POSITIONS if dist.get_rank() == 0 else [0, -1]
        case("different sweeps", lambda: activation_patching(  # line: different sweeps
            model, CLEANS, CORRUPTS, SITES, positions=positions, metric=logit_diff, distributed=True))
        bars.clear()
        case("activation", lambda: activation_patching(model, CLEANS, CORRUPTS, SITES, positions=POSITIONS,
                                                       metric=logit_diff, distributed=True))
        case("attribution", lambda: attribution_patching(model, CLEANS, CORRUPTS, SITES, positions=POSITIONS,
                                                         metric=logit_diff, batch_size=1, distributed=True))
        # one pair on two ranks (rank 1 sweeps nothing), the default metric, the group passed explicitly
        case("one pair", lambda: activation_patching(model, CLEANS[0], CORRUPTS[0], SITES, positions=[1, 4, -1],
                                                     distributed=dist.group.WORLD))
    finally:
        patching._progress_bar = make_bar
    out["bars"] = bars
    out["rank"], out["world"] = dist.get_rank(), dist.get_world_size()
    return out


def main(out_dir: str) -> None:
    out = run_cases(fxpatch.LanguageModel(fxpatch.TINY_GPT2))
    torch.save(out, os.path.join(out_dir, f"rank{out['rank']}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
