"""Patching sweeps over many prompt pairs, data-parallel with ``torch.distributed``.

``activation_patching(..., distributed=True)`` and ``attribution_patching(..., distributed=True)``
share the prompt pairs among the ranks of a process group: rank ``r`` of ``w`` sweeps
a contiguous share of the pairs (the first ``n % w`` ranks one pair more than the
others; ranks beyond the ``n``-th get none), then the ranks gather every share, so
that **every rank** returns the whole ``PatchingResult``, the one a single process
would return (up to float rounding of the different batch shapes). Each rank makes
the same call with the same arguments, as with any collective.

* ``distributed=True`` uses the default process group; if the script has not called
  ``torch.distributed.init_process_group``, the sweep does, from the environment
  ``torchrun`` sets (NCCL for a model on CUDA, with that GPU as the current device;
  gloo otherwise). A ``ProcessGroup`` uses that group. ``False`` (the default) sweeps
  in this process alone, also under ``torchrun``: a sweep never joins a collective
  unless asked, so code that sweeps on rank 0 only, or different prompts per rank,
  does not hang.
* Under NCCL each rank's model belongs on its own GPU: ``model.to(local_device())``
  (``cuda:LOCAL_RANK``). The gathered results are small (a float per cell), and go
  over the group's own backend.
* Only rank 0 shows a progress bar (over its share).
* Errors reach every rank. The arguments are checked on every rank, and the ranks
  compare what they were asked (prompt pairs, sites, positions) before any sweeping;
  a rank whose sweep fails (a metric that raises on its pairs, CUDA out of memory)
  still joins the gather. The failing rank then raises its own error (with a note
  naming the rank) and every other rank a ``DistributedError`` naming the failing
  rank and its error. Nobody waits on a rank that failed, and the group stays usable.
  A rank that dies (killed, segfault) cannot report: ``torchrun`` then stops the
  others.

Example (``sweep.py``, run with ``torchrun --nproc-per-node 2 sweep.py``)::

    import torch.distributed as dist
    import fxpatch
    from fxpatch.distributed import local_device
    from fxpatch.patching import activation_patching

    model = fxpatch.LanguageModel(fxpatch.TINY_GPT2).to(local_device())
    result = activation_patching(model, ["Madison square garden is located in the city of New",
                                         "The Louvre is located in the city of New"],
                                 ["_ _ _ _ _ _ _ _ _ _", "_ _ _ _ _ _ _ _ _"],
                                 sites="transformer.h.*", positions=[-1], distributed=True)
    if dist.get_rank() == 0:
        print(result.table())
    dist.destroy_process_group()
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import traceback
from collections.abc import Callable
from typing import Any

import torch

from .errors import FxpatchError, InputError, Location

__all__ = ["DistributedError", "local_device", "share"]


class DistributedError(FxpatchError, RuntimeError):
    """Another rank of a distributed sweep failed, or the ranks were asked for different sweeps.

    ``rank`` is the rank that failed (``None`` for different sweeps) and
    ``remote_traceback`` its traceback as text.

    Example::

        try:
            result = activation_patching(model, clean, corrupt, sites, distributed=True)
        except DistributedError as e:
            print(e.rank, e.remote_traceback)
    """

    def __init__(self, problem: str, *, rank: int | None = None, remote_traceback: str = "", **kwargs: Any):
        super().__init__(problem, **kwargs)
        self.rank, self.remote_traceback = rank, remote_traceback


def local_device() -> torch.device:
    """This process's device under ``torchrun``: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.

    Example::

        model = fxpatch.LanguageModel(fxpatch.TINY_GPT2).to(local_device())
    """
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def share(n: int, rank: int, world: int) -> range:
    """The pairs rank ``rank`` of ``world`` sweeps: a contiguous share, the first ``n % world`` ranks one more.

    Example::

        [list(share(3, r, 2)) for r in range(2)]   # [[0, 1], [2]]
    """
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def sharded_sweep(model, prepare: Callable[[], Any], run: Callable[[Any, bool], Any], method: str,
                  progress: bool, distributed: Any, loc: Location):
    """Run a patching sweep's share of prompt pairs on this rank and gather every rank's share.

    ``prepare()`` checks the arguments and returns the whole sweep (``patching._Sweep``);
    ``run(sweep, show_progress)`` sweeps some of its pairs and returns their ``_Tally``.
    """
    import torch.distributed as dist

    from .patching import _Tally

    group = _process_group(distributed, model, loc)
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    sweep, error = _attempt(prepare)
    asked = _gather(model, group, world, _failure(rank, error) if error else _fingerprint(method, sweep))
    _raise_failures(asked, rank, world, method, error, loc)
    _check_same_sweep(asked, method, loc)

    ks = list(share(len(sweep.pairs), rank, world))

    def my_share() -> dict:
        if not ks:
            return {"pairs": []}
        part = sweep.subset(ks)
        tally = run(part, progress and rank == 0)
        return {"pairs": ks, "scores": tally.scores, "clean": tally.clean, "corrupt": tally.corrupt,
                "metric_name": part.metric_name}

    part, error = _attempt(my_share)
    parts = _gather(model, group, world, _failure(rank, error) if error else part)
    _raise_failures(parts, rank, world, method, error, loc)

    whole = _Tally(model, sweep, loc)
    for part in parts:
        for r, k in enumerate(part["pairs"]):
            whole.scores[k], whole.clean[k], whole.corrupt[k] = part["scores"][r], part["clean"][r], part["corrupt"][r]
            if k == 0:  # one pair's default metric is named after its top token, which that pair's rank found
                sweep.metric_name = part["metric_name"]
    return whole.result(method)


def _process_group(distributed: Any, model, loc: Location):
    import torch.distributed as dist

    if not dist.is_available():
        raise InputError("distributed sweeps need torch.distributed, which this PyTorch build lacks", at=loc,
                         hint="Leave distributed out, or install a PyTorch build with distributed support.")
    if distributed is True:
        if not dist.is_initialized():
            missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise InputError(
                    "distributed=True, but torch.distributed is not initialized and this process was not started "
                    f"by torchrun ({', '.join(missing)} not set)", at=loc,
                    hint="Launch the script with torchrun --nproc-per-node N script.py (or call "
                    "torch.distributed.init_process_group first), or leave distributed out to sweep in this "
                    "process alone.")
            if model.device.type == "cuda":
                torch.cuda.set_device(model.device)
                dist.init_process_group("nccl")
            else:
                dist.init_process_group("gloo")
        return dist.group.WORLD
    if isinstance(distributed, dist.ProcessGroup):
        if dist.get_rank(distributed) < 0:
            raise InputError("this process is not a member of the process group passed as distributed", at=loc,
                             hint="Call the sweep only on the group's ranks, or pass distributed=True (every rank).")
        return distributed
    raise InputError(f"distributed must be True, False or a torch.distributed.ProcessGroup, got "
                     f"{type(distributed).__name__}", at=loc,
                     hint="Pass distributed=True under torchrun (the default process group), or leave it out.")


def _attempt(fn: Callable[[], Any]) -> tuple[Any, Exception | None]:
    """``(fn(), None)``, or ``(None, error)``: a rank that fails must still join the next gather."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - every error is reported to the other ranks, then raised
        return None, e


def _failure(rank: int, error: Exception) -> dict:
    # text only: exceptions do not always pickle (FxpatchError's keyword-only arguments do not)
    return {"failed": rank, "type": type(error).__name__, "message": str(error),
            "traceback": "".join(traceback.format_exception(error))}


def _gather(model, group, world: int, obj: Any) -> list:
    import torch.distributed as dist

    out: list = [None] * world
    # NCCL gathers objects through the current CUDA device, which must be this rank's own
    device = torch.cuda.device(model.device) if model.device.type == "cuda" else contextlib.nullcontext()
    with device:
        dist.all_gather_object(out, obj, group=group)
    return out


def _raise_failures(records: list, rank: int, world: int, method: str, error: Exception | None,
                    loc: Location) -> None:
    failed = [r for r in records if isinstance(r, dict) and "failed" in r]
    if not failed:
        return
    if error is not None:
        error.add_note(f"(rank {rank} of {world} of a distributed {method}; the other ranks raised "
                       "fxpatch.distributed.DistributedError)")
        raise error
    first = failed[0]
    more = f" (and {len(failed) - 1} other rank{'s' if len(failed) > 2 else ''})" if len(failed) > 1 else ""
    raise DistributedError(
        f"rank {first['failed']} of {world}{more} failed in a distributed {method}, so every rank stops: "
        f"{first['type']}: {first['message']}", at=loc, rank=first["failed"], remote_traceback=first["traceback"],
        hint=f"Fix what rank {first['failed']} reports (its traceback is in its output and in this error's "
        ".remote_traceback); the process group can still be used.")


def _digest(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def _fingerprint(method: str, sweep) -> dict:
    """What every rank must agree on; metrics are functions and cannot be compared, beyond being given or not."""
    return {"function": method, "prompt pairs": _digest((sweep.several, sweep.pairs)),
            "sites": _digest([s.path for s in sweep.sites]),
            "positions": _digest((sweep.positions, sweep.shown_positions)),
            "metric": "default" if sweep.metric is None else "given"}


def _check_same_sweep(fingerprints: list[dict], method: str, loc: Location) -> None:
    first = fingerprints[0]
    for rank, other in enumerate(fingerprints[1:], start=1):
        differ = [key for key in first if other[key] != first[key]]
        if differ:
            raise DistributedError(
                f"the ranks were asked for different sweeps: rank {rank}'s {', '.join(differ)} differ from "
                f"rank 0's (in a distributed {method})", at=loc,
                hint="Call the sweep with the same arguments on every rank: each rank sweeps its share of the "
                "prompt pairs. To sweep different prompts on each rank, leave distributed out.")
