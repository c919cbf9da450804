"""Data-parallel patching sweeps (``fxpatch.distributed``): 2 ranks over gloo against one process and HF runs.

The ranks are forked from the test process, each with torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so the sweeps' own
``distributed=True`` set-up runs as under torchrun, and the forked ranks reuse the test
process's exported tiny GPT-2 instead of importing and exporting it again (a minute on a
busy machine). ``-m slow`` runs the same cases under a real ``torchrun``.
Each rank runs ``tests/distributed_worker.py``'s cases (3 prompt pairs of 10, 9 and 12
tokens: rank 0 sweeps pairs 0 and 1, rank 1 pair 2; one pair: rank 1 sweeps nothing;
a metric that fails on rank 1; ranks asked for different positions).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from fxpatch.distributed import DistributedError, share
from fxpatch.errors import InputError
from fxpatch.patching import activation_patching, attribution_patching
from tests import distributed_worker as worker
from tests.test_patching import reference_attribution, reference_grid

WORLD = 2
FULL_NAME = f"{DistributedError.__module__}.{DistributedError.__qualname__}"
TIMEOUT_S = 240  # a hung collective fails the test instead of the suite


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(model, rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TOKENIZERS_PARALLELISM="false")
    out = worker.run_cases(model)
    torch.save(out, path)
    torch.distributed.destroy_process_group()


def _backward_once() -> None:
    try:
        x = torch.ones(2, requires_grad=True)
        (x * 2).sum().backward()
    except RuntimeError:
        os._exit(1)


def _forked_backward_runs() -> bool:
    """Whether a process forked from this one can run a backward pass, as the attribution sweep's ranks do."""
    child = multiprocessing.get_context("fork").Process(target=_backward_once)
    child.start()
    child.join(60)
    return child.exitcode == 0


def _line_of(marker: str, path: str = worker.__file__) -> int:
    lines = open(path, encoding="utf-8").read().splitlines()
    hits = [i + 1 for i, text in enumerate(lines) if text.rstrip().endswith(marker)]
    assert len(hits) == 1, hits
    return hits[0]


@pytest.fixture(scope="module")
def ranks(gpt2, tmp_path_factory) -> list[dict]:
    """What each of the 2 forked ranks got."""
    if gpt2.device.type != "cpu":
        pytest.skip("the ranks are forked, which CUDA does not survive; on GPUs run the README's torchrun example")
    gpt2.site_graph("forward")  # exported once, here, for both ranks
    if not _forked_backward_runs():
        pytest.skip(f"torch {torch.__version__} refuses a backward pass in a process forked from this one (autograd's "
                    "device threads started here: a CUDA build's export starts them, GPU or not); the slow "
                    "torchrun test runs these cases in processes of their own")
    out = tmp_path_factory.mktemp("ranks")
    paths = [str(out / f"rank{r}.pt") for r in range(WORLD)]
    port = _free_port()
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_rank, args=(gpt2, r, port, paths[r])) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0] * WORLD, "a rank failed or hung: see its output above"
    return [torch.load(path, weights_only=False) for path in paths]


def single(gpt2, sweep, **kwargs):
    return sweep(gpt2, worker.CLEANS, worker.CORRUPTS, worker.SITES, positions=worker.POSITIONS,
                 metric=worker.logit_diff, progress=False, **kwargs)


def assert_same_result(got: dict, want) -> None:
    torch.testing.assert_close(got["scores"], want.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["clean"], want.clean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["corrupt"], want.corrupt, rtol=1e-5, atol=1e-5)
    for key in ("tokens", "sites", "positions", "metric_name", "method"):
        assert got[key] == getattr(want, key), key


def test_pairs_are_shared_contiguously_and_evenly():
    for world in range(1, 5):
        for n in range(0, 8):
            shares = [share(n, r, world) for r in range(world)]
            assert [k for s in shares for k in s] == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            assert [len(s) for s in shares] == sorted((len(s) for s in shares), reverse=True)


def test_activation_sweep_over_2_ranks_is_the_single_process_sweep(gpt2, ranks):
    want = single(gpt2, activation_patching)
    assert want.scores.shape == (3, 2, 3)
    for got in ranks:  # every rank returns the whole result
        assert got["world"] == WORLD
        assert_same_result(got["activation"], want)
    # and both agree with plain HF runs, one per cell, with a hook writing the clean value
    refs = [reference_grid(gpt2, c, x, worker.SITES, worker.POSITIONS, metric=worker.logit_diff)
            for c, x in zip(worker.CLEANS, worker.CORRUPTS)]
    got = ranks[0]["activation"]
    torch.testing.assert_close(got["scores"], torch.stack([r[0] for r in refs]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["clean"], torch.stack([r[1] for r in refs]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["corrupt"], torch.stack([r[2] for r in refs]), rtol=1e-4, atol=1e-4)
    assert (got["scores"][2] - got["corrupt"][2]).abs().max() > 1e-2  # rank 1's pair changes: it was swept


def test_attribution_sweep_over_2_ranks_is_the_single_process_sweep(gpt2, ranks):
    want = single(gpt2, attribution_patching)
    for got in ranks:
        assert_same_result(got["attribution"], want)
    got = ranks[0]["attribution"]
    for k, (c, x) in enumerate(zip(worker.CLEANS, worker.CORRUPTS)):
        ref = reference_attribution(gpt2, c, x, worker.SITES, metric=worker.logit_diff)
        n = ref.shape[1]
        assert ref[:, [p % n for p in worker.POSITIONS]].abs().max() > 1e-2
        torch.testing.assert_close(got["scores"][k], ref[:, [p % n for p in worker.POSITIONS]], rtol=1e-4, atol=1e-5)


def test_one_pair_on_2_ranks_with_the_default_metric(gpt2, ranks):
    want = activation_patching(gpt2, worker.CLEANS[0], worker.CORRUPTS[0], worker.SITES, positions=[1, 4, -1],
                               progress=False)
    assert want.metric_name == "logit of ' York'"  # found by rank 0, which swept the pair
    for got in ranks:
        assert got["one pair"]["scores"].shape == (2, 3) and got["one pair"]["clean"].dim() == 0
        assert_same_result(got["one pair"], want)


def test_only_rank_0_shows_a_progress_bar_over_its_share(ranks):
    assert ranks[0]["bars"] == [("activation patching", 12, True), ("attribution patching", 2, True),
                                ("activation patching", 6, True)]  # 2 pairs x 2 sites x 3 positions, ...
    # rank 1 sweeps pair 2 (6 cells) and nothing of the single pair
    assert ranks[1]["bars"] == [("activation patching", 6, False), ("attribution patching", 1, False)]


def test_a_metric_failing_on_one_rank_raises_on_every_rank(ranks):
    own, other = ranks[1]["failing metric"], ranks[0]["failing metric"]
    assert own["error"] == "builtins.ValueError" and own["message"] == "metric failed on rank 1"
    assert own["notes"] == ["(rank 1 of 2 of a distributed attribution patching; the other ranks raised "
                            "fxpatch.distributed.DistributedError)"]
    assert other["error"] == FULL_NAME and other["rank"] == 1
    assert other["message"].startswith(f"{worker.__file__}:{_line_of('# line: failing metric')}: rank 1 of 2 "
                                       "failed in a distributed attribution patching, so every rank stops: "
                                       "ValueError: metric failed on rank 1")
    assert other["message"].endswith("the process group can still be used.")


def test_ranks_asked_for_different_sweeps_are_refused_on_every_rank(ranks):
    for got in ranks:
        e = got["different sweeps"]
        assert e["error"] == FULL_NAME
        assert e["message"].startswith(f"{worker.__file__}:{_line_of('# line: different sweeps')}: the ranks "
                                       "were asked for different sweeps: rank 1's positions differ from rank 0's")
        assert "leave distributed out" in e["message"]


def test_distributed_without_torchrun_or_with_a_wrong_value_is_refused(gpt2, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert not torch.distributed.is_initialized()
    with pytest.raises(InputError) as info:
        activation_patching(gpt2, worker.CLEANS[0], worker.CORRUPTS[0], "transformer.h.0",  # line: no torchrun
                            distributed=True)
    message = str(info.value)
    assert message.startswith(f"{__file__}:{_line_of('# line: no torchrun', __file__)}: distributed=True, but "
                              "torch.distributed is not initialized and this process was not started by torchrun "
                              "(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set)")
    assert "torchrun --nproc-per-node N" in message
    with pytest.raises(InputError, match="distributed must be True, False or a torch.distributed.ProcessGroup, "
                                         "got str"):
        attribution_patching(gpt2, worker.CLEANS[0], worker.CORRUPTS[0], "transformer.h.0", distributed="yes")
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_the_same_cases_under_torchrun(gpt2, ranks, tmp_path):
    """A real ``torchrun --nproc-per-node 2`` launch gives what the forked ranks gave."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
                    worker.__file__, str(tmp_path)], cwd=root, check=True, timeout=TIMEOUT_S)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        for case in ("activation", "attribution", "one pair"):
            want = ranks[r][case]
            torch.testing.assert_close(got[case]["scores"], want["scores"], rtol=1e-5, atol=1e-5)
            assert got[case]["tokens"] == want["tokens"] and got[case]["metric_name"] == want["metric_name"]
        for case in ("failing metric", "different sweeps"):
            assert got[case] == ranks[r][case]
        assert got["bars"] == ranks[r]["bars"]
