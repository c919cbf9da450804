"""Traces recorded in several threads at once: each thread sees its own trace, and values are right."""

from __future__ import annotations

import threading

import torch

from tests.conftest import PROMPT_1, PROMPT_2
from tests.reference import run_alone
from tests.test_differential import close, envoy, paths


def _trace_in_threads(jobs):
    """Run ``jobs`` (functions taking a ``threading.Barrier``) in threads that all record at the same time."""
    barrier = threading.Barrier(len(jobs), timeout=60)
    results, errors = [None] * len(jobs), []

    def run(i, job):
        try:
            results[i] = job(barrier)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def _patch_job(lm, prompt, scale):
    def job(barrier):
        p = paths(lm)
        with lm.trace(prompt):
            h = envoy(lm, p.layer(0)).output
            barrier.wait()  # both threads are now inside their trace blocks
            envoy(lm, p.layer(0)).output = h * scale
            logits = lm.lm_head.output.save()
            barrier.wait()
        return logits
    return job


def test_two_threads_trace_two_models_at_once(gpt2, llama):
    out = _trace_in_threads([_patch_job(gpt2, PROMPT_1, 2.0), _patch_job(llama, PROMPT_2, 0.5)])
    for lm, prompt, scale, logits in ((gpt2, PROMPT_1, 2.0, out[0]), (llama, PROMPT_2, 0.5, out[1])):
        ref = run_alone(lm, prompt, outputs={paths(lm).layer(0): lambda x, s=scale: x * s})
        close(logits[0], ref.logits, f"{type(lm._model).__name__}")


def test_two_threads_trace_the_same_model_at_once(gpt2):
    out = _trace_in_threads([_patch_job(gpt2, PROMPT_1, 2.0), _patch_job(gpt2, PROMPT_2, -1.0)])
    for prompt, scale, logits in ((PROMPT_1, 2.0, out[0]), (PROMPT_2, -1.0, out[1])):
        ref = run_alone(gpt2, prompt, outputs={"transformer.h.0": lambda x, s=scale: x * s})
        close(logits[0], ref.logits, prompt)
    assert not torch.allclose(out[0], out[1])


def test_traces_end_cleanly_while_another_thread_exports_a_model(gpt2, tokenizer):
    """torch.export patches torch's own classes while it runs, process-wide, and a trace's check that the
    model did not change inside its block looks at those classes' code: traces of one model, one after
    another while another thread exports another model, each wait for the export to end rather than
    take its patches for a change (a FlowError) or drop the model's exports."""
    from fxpatch import LanguageModel
    from tests.conftest import tiny_llama

    fresh = LanguageModel(tiny_llama(len(tokenizer), seed=3), tokenizer=tokenizer, cache_dir=False)
    done, errors = threading.Event(), []

    def export():
        try:
            with fresh.trace(PROMPT_1):
                fresh.lm_head.output.save()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
        finally:
            done.set()

    exporter = threading.Thread(target=export)
    exporter.start()
    traces = 0
    try:
        while not done.is_set():
            with gpt2.trace(PROMPT_1):
                logits = gpt2.lm_head.output.save()
            traces += 1
    finally:
        exporter.join(120)
    assert not errors, errors
    assert traces >= 1
    close(logits[0], run_alone(gpt2, PROMPT_1).logits, "the last trace")
