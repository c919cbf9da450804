"""A new program's rewritten graph holds the nodes of the layers it touches; the other layers run as
calls of their segments made once per site graph (fxpatch/segments.py), and the values are the hooked
HF model's."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fxpatch import LanguageModel
from tests.conftest import PROMPT_1, PROMPT_2
from tests.reference import run_alone, set_last, unpad

N_LAYERS, K = 4, 1
LAYER = f"model.layers.{K}"


@pytest.fixture(scope="module")
def deep(tokenizer) -> LanguageModel:
    torch.manual_seed(1)
    config = LlamaConfig(num_hidden_layers=N_LAYERS, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LanguageModel(LlamaForCausalLM(config).eval(), tokenizer=tokenizer)


def _main(value):
    return value if isinstance(value, torch.Tensor) else value[0]


def _layers(nodes) -> dict[int, int]:
    """How many nodes the export attributes to each decoder layer."""
    count: dict[int, int] = {}
    for node in nodes:
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        found = re.search(r"layers\.(\d+)", stack[-1][0]) if stack else None
        if found:
            count[int(found.group(1))] = count.get(int(found.group(1)), 0) + 1
    return count


def _structure(gm: torch.fx.GraphModule) -> tuple[dict[int, int], set[int]]:
    """The layers whose nodes ``gm`` holds itself (node counts), and those it runs through segment calls."""
    called = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for segment in gm.get_submodule(node.target).segments:
                called |= set(_layers(segment.graph.nodes))
    return _layers(gm.graph.nodes), called


def test_a_patch_at_one_layer_copies_that_layer_only_and_matches_the_hooks(deep):
    with torch.no_grad():
        with deep.trace() as tracer:
            with tracer.invoke(PROMPT_1):
                clean = deep.model.layers[K].output[:, -1].save()
            with tracer.invoke(PROMPT_2):
                deep.model.layers[K].output[:, -1] = clean * 2
                h = deep.model.layers[K + 1].output
                h[:, -1] *= 1.5  # in place: the layers after it see the change
                logits = deep.lm_head.output.save()
    src = _main(run_alone(deep, PROMPT_1, capture=[LAYER]).outputs[LAYER])[0, -1]
    ref = run_alone(deep, PROMPT_2, outputs={
        LAYER: lambda out: set_last(src * 2)(_main(out)),
        f"model.layers.{K + 1}": lambda out: set_last(_main(out)[:, -1] * 1.5)(_main(out))})
    n = len(ref.ids)
    torch.testing.assert_close(unpad(logits, 0, n), ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clean[0], src, atol=1e-6, rtol=1e-6)

    own, called = _structure(tracer.graph)
    whole = _layers(deep.site_graph("forward").graph_module.graph.nodes)
    assert set(own) == {K, K + 1}  # the layers it reads and writes, node by node
    assert own[K] < whole[K] and own[K + 1] < whole[K + 1]  # without their sites
    assert called == set(range(N_LAYERS)) - {K, K + 1}  # the others, as they are
    # the rest: inputs, the state it uses, the two calls and the values they pass on, the norm and the head
    rest = [n for n in tracer.graph.graph.nodes if "fxpatch_role" not in n.meta and not _layers([n])]
    assert len(rest) < whole[0], (len(rest), whole[0])
    assert [r["site"] for r in tracer.inserted if r["role"] == "scatter"] == [f"{LAYER}.output",
                                                                             f"model.layers.{K + 1}.output"]


def test_a_layer_given_its_whole_output_drops_the_layers_below_it(deep):
    """Skipping layer K with a value for every row: nothing needs layers 0..K any more, so the graph
    calls the segment before the layers (embeddings, positions, mask) and the layers after K only."""
    with torch.no_grad():
        with deep.trace(PROMPT_1):
            h = deep.model.layers[K].output.save()
        with deep.trace(PROMPT_1) as tracer:
            deep.model.layers[K].skip(h * 0.5)
            logits = deep.lm_head.output.save()
    ref = run_alone(deep, PROMPT_1, outputs={LAYER: lambda out: _main(out) * 0.5})
    torch.testing.assert_close(logits[0], ref.logits, atol=1e-5, rtol=1e-5)
    own, called = _structure(tracer.graph)
    assert not own and called == set(range(K + 1, N_LAYERS))
