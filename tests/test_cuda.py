"""On a GPU: traces and generation on CUDA give the hooked model's values, also compiled with CUDA graphs.

Skipped where torch sees no CUDA device. ``compile="reduce-overhead"`` replays CUDA graphs whose
outputs live in memory the next replay writes over; a value saved by one trace must still hold its
value after later traces, as it does in eager PyTorch. References are the plain HF model run prompt
by prompt with forward hooks, on the same device.
"""

from __future__ import annotations

import pytest
import torch

import fxpatch
from fxpatch import LanguageModel
from tests.conftest import PROMPT_1, PROMPT_2
from tests.reference import hf_run, run_alone, token_ids, unpad

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EIFFEL = "The Eiffel Tower is in Paris"


@pytest.fixture(scope="module")
def cuda_gpt2() -> LanguageModel:
    return LanguageModel(fxpatch.TINY_GPT2).to("cuda")


def patched_logits(model, source: str, target: str, scale: float, compile):
    """``target``'s logits with ``source``'s layer-1 last position times ``scale`` written into its own."""
    with model.trace(compile=compile) as tracer:
        with tracer.invoke(source):
            h = model.transformer.h[1].output[:, -1]
        with tracer.invoke(target):
            model.transformer.h[1].output[:, -1] = h * scale
            logits = model.lm_head.output.save()
    return logits


def hooked_logits(model, source: str, target: str, scale: float) -> torch.Tensor:
    src = run_alone(model, source, capture=["transformer.h.1"]).outputs["transformer.h.1"][:, -1]

    def edit(out):
        out = out.clone()
        out[:, -1] = src * scale
        return out

    return run_alone(model, target, outputs={"transformer.h.1": edit}).logits


@pytest.mark.parametrize("compile", [False, True, "reduce-overhead"])
def test_saved_values_on_cuda_keep_their_values_across_traces(cuda_gpt2, compile):
    """Three traces of one program (other prompts, another scale): each saved value equals the hooked
    model's after all three ran (a CUDA graph's replay must not write over the earlier traces' values)."""
    cases = [(PROMPT_1, "hello", 2.0), (EIFFEL, PROMPT_2, -1.0), (PROMPT_2, EIFFEL, 0.5)]
    saved = [patched_logits(cuda_gpt2, *case, compile=compile) for case in cases]
    for (source, target, scale), logits in zip(cases, saved):
        assert logits.device.type == "cuda"
        ref = hooked_logits(cuda_gpt2, source, target, scale)
        torch.testing.assert_close(unpad(logits, 0, len(token_ids(cuda_gpt2, target))), ref, atol=1e-4, rtol=1e-4)


def test_generation_on_cuda_compiled_with_cuda_graphs_equals_hooked_generate(cuda_gpt2):
    """A static-cache generation compiled with CUDA graphs, with an edit at every step: the tokens are
    HF ``generate``'s with a hook making the same edit, prompt by prompt."""
    n = 4
    block = cuda_gpt2._model.transformer.h[0]
    outs = []
    for prompt in (PROMPT_1, "hello"):  # two generations: the second replays the graphs the first recorded
        with cuda_gpt2.generate(prompt, max_new_tokens=n, cache_implementation="static",
                                compile="reduce-overhead") as tracer:
            for _ in tracer.all():
                cuda_gpt2.transformer.h[0].output[:] = cuda_gpt2.transformer.h[0].output * 1.5
            outs.append((prompt, tracer.result.save()))

    def scale(output, step):
        return output * 1.5

    for prompt, result in outs:
        ref = hf_run(cuda_gpt2, [prompt], n, edits=[(block, scale)], cache_implementation="static")
        assert result.device.type == "cuda"
        assert result[0].tolist() == ref[0].tolist()
