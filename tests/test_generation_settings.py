"""Generation settings: ``num_return_sequences``, ``return_dict_in_generate`` with scores and logits,
the user's logits processors, stopping criteria and streamer, and the settings fxpatch refuses.

As in ``test_generation.py``, every result is compared with plain Hugging Face ``generate`` with
ordinary forward hooks doing the same edit at the same steps (a pre-hook on the root model counts
its forward calls: call 0 is the prompt pass). Sampling draws from the RNG once per step for the
whole batch, so sampled runs are compared with HF's ``generate`` on the same left-padded batch;
greedy runs with each prompt alone. Every test runs on the tiny GPT-2 and the tiny Llama (``lm``)
unless it needs one model only.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

import fxpatch
from fxpatch import generation_settings
from fxpatch.active import active_tracer
from fxpatch.errors import InputError
from tests.conftest import PROMPT_1, assert_state_unchanged, layers, state
from tests.reference import hf_run, kv, left_padded, token_ids
from tests.test_generation import EIFFEL, HELLO, N, add_last, assert_tokens, expected_batch, push_vector

ATOL = 1e-5
K = 3  # num_return_sequences
SAMPLING = {"do_sample": True, "top_k": 50, "temperature": 1.5}
_SOURCE = open(__file__, encoding="utf-8").read().splitlines()


# -- the plain Hugging Face reference ---------------------------------------------------------------
def negate_rows(steps: set[int], rows: slice):
    """``x[rows, -1] = -x[rows, -1]`` at ``steps``: an invoke's edit, in a batch of several invokes."""
    def edit(output, step):
        if step not in steps:
            return None
        output = output.clone()
        output[rows, -1] = -output[rows, -1]
        return output
    return edit


def assert_steps_close(got, expected, what: str) -> None:
    """Two tuples of per-step (rows, vocab) tensors are equal to ``ATOL`` (``-inf`` where the other has it)."""
    assert got is not None and expected is not None, (what, got, expected)
    assert len(got) == len(expected), f"{what}: {len(got)} steps, expected {len(expected)}"
    for step, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape, f"{what} step {step}: shape {tuple(g.shape)}, expected {tuple(e.shape)}"
        torch.testing.assert_close(g, e, atol=ATOL, rtol=ATOL, msg=lambda m, s=step: f"{what} step {s}: {m}")


# -- num_return_sequences -------------------------------------------------------------------------------
@pytest.mark.parametrize("as_dict", [False, True], ids=["tokens", "return-dict"])
def test_num_return_sequences_with_an_edit_at_decode_steps(lm, as_dict):
    """Each prompt row is repeated K times consecutively; the second invoke's edit (layer 0 negated at
    steps 1 and 2) applies to its 2*K rows; with the same seed, HF's sampled batch, tokens and scores."""
    envoys, modules = layers(lm)
    outputs = {"return_dict_in_generate": True, "output_scores": True, "output_logits": True} if as_dict else {}
    settings = {**SAMPLING, **outputs, "num_return_sequences": K}
    prompts = [PROMPT_1, HELLO, EIFFEL]
    torch.manual_seed(0)
    with lm.generate(max_new_tokens=N, **settings) as tracer:
        with tracer.invoke(PROMPT_1):
            out1 = lm.generator.output.save()
        with tracer.invoke([HELLO, EIFFEL]):
            first = envoys[1].output[:, -1].save()  # the prompt pass, all 2*K rows
            for _ in tracer.iter[1:3]:
                envoys[0].output[:, -1] = -envoys[0].output[:, -1]
            out2 = lm.generator.output.save()
        result = tracer.result.save()

    values: list[torch.Tensor] = []
    torch.manual_seed(0)
    ref = hf_run(lm, prompts, N, edits=[(modules[0], negate_rows({1, 2}, slice(K, None)))],
                 capture=(modules[1], values), **settings)
    torch.manual_seed(0)
    plain = hf_run(lm, prompts, N, **settings)
    seqs, plain_seqs = (ref.sequences, plain.sequences) if as_dict else (ref, plain)
    # premises: HF repeats each prompt K times consecutively, samples differ, the edit changes the tokens
    ids, _ = left_padded(lm, prompts)
    assert torch.equal(seqs[:, :ids.shape[1]], ids.repeat_interleave(K, dim=0))
    groups = [{tuple(r) for r in seqs[i:i + K].tolist()} for i in range(0, len(seqs), K)]
    assert any(len(g) > 1 for g in groups), "every prompt's K samples are equal: the test would not see sampling"
    assert torch.equal(seqs[:K], plain_seqs[:K]) and not torch.equal(seqs[K:], plain_seqs[K:])

    if not as_dict:
        assert_tokens(lm, result, seqs.tolist(), "tracer.result")
        assert_tokens(lm, out1, seqs[:K].tolist(), "generator.output of invoke 1")
        assert_tokens(lm, out2, seqs[K:].tolist(), "generator.output of invoke 2")
    else:
        for got, rows, what in ((result, slice(None), "tracer.result"), (out1, slice(0, K), "invoke 1"),
                                (out2, slice(K, None), "invoke 2")):
            assert isinstance(got, GenerateDecoderOnlyOutput), (what, type(got))
            assert_tokens(lm, got.sequences, seqs[rows].tolist(), f"{what} sequences")
            assert_steps_close(got.scores, tuple(s[rows] for s in ref.scores), f"{what} scores")
            assert_steps_close(got.logits, tuple(s[rows] for s in ref.logits), f"{what} logits")
    assert first.shape[0] == 2 * K
    torch.testing.assert_close(first, values[0][K:], atol=ATOL, rtol=ATOL)


def test_num_return_sequences_of_a_single_prompt(lm):
    """``model.generate(prompt, num_return_sequences=K)``: the shortcut invoke is repeated too; an edit
    written directly in the block (the prompt pass) gives HF's samples for the same seed."""
    envoys, modules = layers(lm)
    v = push_vector(lm)
    torch.manual_seed(1)
    with lm.generate(HELLO, max_new_tokens=N, num_return_sequences=K, **SAMPLING) as tracer:
        envoys[1].output[:, -1] = envoys[1].output[:, -1] + v
        out = lm.generator.output.save()
        result = tracer.result.save()
    torch.manual_seed(1)
    ref = hf_run(lm, [HELLO], N, edits=[(modules[1], add_last({0}, v))], num_return_sequences=K, **SAMPLING)
    torch.manual_seed(1)
    assert not torch.equal(ref, hf_run(lm, [HELLO], N, num_return_sequences=K, **SAMPLING)), "the edit does nothing"
    assert ref.shape[0] == K
    assert_tokens(lm, out, ref.tolist())
    assert_tokens(lm, result, ref.tolist())


# -- return_dict_in_generate, scores and logits -------------------------------------------------------------
def _penalty_skips_left_pads() -> bool:
    """Whether transformers' generate tells the repetition penalty each row's left padding (5.2x on); before
    that its batched generate, and so fxpatch's, penalizes the pad token in a padded row."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    return "padding_lengths" in inspect.getsource(GenerationMixin._get_logits_processor)


@pytest.mark.skipif(not _penalty_skips_left_pads(), reason="this transformers penalizes left pads in a batch")
def test_scores_and_logits_equal_hf_with_an_edit_at_step_0(lm):
    """Greedy with processors that change the scores (repetition penalty, suppressed tokens): each row's
    sequences, processed scores and raw logits per step equal HF's for its prompt alone, with the edit
    (a vector added to layer 1 at step 0 only) in the second invoke. The unpadded row's cache equals HF's."""
    envoys, modules = layers(lm)
    v = push_vector(lm)
    settings = {"return_dict_in_generate": True, "output_scores": True, "output_logits": True,
                "repetition_penalty": 1.3, "suppress_tokens": [1, 2, 3]}
    with lm.generate(max_new_tokens=N, **settings) as tracer:
        with tracer.invoke(PROMPT_1):
            out1 = lm.generator.output.save()
        with tracer.invoke(HELLO):
            envoys[1].output[:, -1] = envoys[1].output[:, -1] + v
            out2 = lm.generator.output.save()
        result = tracer.result.save()
        last = tracer.result.sequences[:, -1].save()  # an op on the result inside the block

    refs = [hf_run(lm, [PROMPT_1], N, **settings),
            hf_run(lm, [HELLO], N, edits=[(modules[1], add_last({0}, v))], **settings)]
    plain = hf_run(lm, [HELLO], N, **settings)
    assert not torch.allclose(plain.logits[0], refs[1].logits[0]), "the edit does not change HELLO's logits"
    assert not torch.allclose(refs[0].scores[1], refs[0].logits[1]), "the processors do not change the scores"
    assert all(len(r.scores) == N for r in refs), "a prompt stopped early: the test would compare fewer steps"

    assert isinstance(result, GenerateDecoderOnlyOutput), type(result)
    expected = expected_batch(lm, [PROMPT_1, HELLO], [r.sequences[0].tolist() for r in refs])
    assert_tokens(lm, result.sequences, expected, "sequences")
    assert last.tolist() == result.sequences[:, -1].tolist()
    for row, ref in enumerate(refs):
        assert_steps_close(tuple(s[row:row + 1] for s in result.scores), ref.scores, f"row {row} scores")
        assert_steps_close(tuple(s[row:row + 1] for s in result.logits), ref.logits, f"row {row} logits")
    for got, row, ref in ((out1, 0, refs[0]), (out2, 1, refs[1])):
        assert isinstance(got, GenerateDecoderOnlyOutput), type(got)
        assert_tokens(lm, got.sequences, [expected[row]], f"invoke {row + 1} sequences")
        assert_steps_close(got.scores, ref.scores, f"invoke {row + 1} scores")
        assert_steps_close(got.logits, ref.logits, f"invoke {row + 1} logits")
    # PROMPT_1 is the widest prompt, so its row has no padding and its cache is HF's
    for layer, (ours, theirs, mine) in enumerate(zip(kv(result).layers, kv(refs[0]).layers, kv(out1).layers)):
        assert ours.keys.shape[0] == 2 and mine.keys.shape[0] == 1
        torch.testing.assert_close(mine.keys, theirs.keys, atol=ATOL, rtol=ATOL, msg=lambda m, i=layer: f"{i}: {m}")
        torch.testing.assert_close(ours.values[:1], theirs.values, atol=ATOL, rtol=ATOL)


def test_return_dict_without_scores(gpt2):
    """``return_dict_in_generate=True`` alone: sequences and the cache, no scores or logits (as in HF)."""
    with gpt2.generate(PROMPT_1, max_new_tokens=N, return_dict_in_generate=True):
        out = gpt2.generator.output.save()
    ref = hf_run(gpt2, [PROMPT_1], N, return_dict_in_generate=True)
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert out.scores is None and out.logits is None and ref.scores is None
    assert_tokens(gpt2, out.sequences, ref.sequences.tolist())
    assert kv(out).layers[0].keys.shape == kv(ref).layers[0].keys.shape


# -- the user's processors, criteria and streamer ----------------------------------------------------------
class BanToken(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] = -float("inf")
        return scores


class StopOn(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_user_logits_processor_and_stopping_criteria(lm):
    """Lists passed as in transformers' generate: merged with the ones the settings build. The
    processor bans PROMPT_1's first greedy token; the criterion stops a row at HELLO's second."""
    plain = [hf_run(lm, [p], N)[0].tolist() for p in (PROMPT_1, HELLO)]
    banned = plain[0][len(token_ids(lm, PROMPT_1))]
    stop = plain[1][len(token_ids(lm, HELLO)) + 1]

    def lists():
        return {"logits_processor": LogitsProcessorList([BanToken(banned)]),
                "stopping_criteria": StoppingCriteriaList([StopOn(stop)])}

    with lm.generate(max_new_tokens=N, **lists()) as tracer:
        with tracer.invoke(PROMPT_1):
            pass
        with tracer.invoke(HELLO):
            pass
        result = tracer.result.save()
    alone = [hf_run(lm, [p], N, **lists())[0].tolist() for p in (PROMPT_1, HELLO)]
    assert alone[0] != plain[0] and banned not in alone[0][len(token_ids(lm, PROMPT_1)):]
    assert alone[1][-1] == stop and len(alone[1]) < len(plain[1]), "the criterion does not stop HELLO early"
    assert_tokens(lm, result, expected_batch(lm, [PROMPT_1, HELLO], alone))


def test_prefix_allowed_tokens_fn(gpt2):
    def allowed(batch_id, ids):
        return [int(ids[-1]) % 50 + 1, 7, 11]

    with gpt2.generate(PROMPT_1, max_new_tokens=N, prefix_allowed_tokens_fn=allowed):
        out = gpt2.generator.output.save()
    ref = hf_run(gpt2, [PROMPT_1], N, prefix_allowed_tokens_fn=allowed)
    assert not torch.equal(ref, hf_run(gpt2, [PROMPT_1], N))
    assert_tokens(gpt2, out, ref.tolist())


class Recorder(BaseStreamer):
    def __init__(self):
        self.calls: list = []

    def put(self, value):
        self.calls.append(("put", value.tolist()))

    def end(self):
        self.calls.append(("end",))


def test_streamer_gets_what_hf_gives_it(lm):
    """The prompt, then each new token, then end(), as transformers' generate streams them."""
    ours, theirs = Recorder(), Recorder()
    with lm.generate(PROMPT_1, max_new_tokens=N, streamer=ours):
        pass
    hf_run(lm, [PROMPT_1], N, streamer=theirs)
    assert len(theirs.calls) == N + 2
    assert ours.calls == theirs.calls


# -- refused settings ---------------------------------------------------------------------------------------
# one value other than the default for every GenerationConfig field fxpatch refuses
REFUSED_EXAMPLES = {
    "num_beams": 2, "num_beam_groups": 2, "diversity_penalty": 0.5, "early_stopping": True, "length_penalty": 2.0,
    "constraints": ["a constraint"], "force_words_ids": [[5]], "penalty_alpha": 0.6, "low_memory": True,
    "dola_layers": "low", "use_mtp": True, "is_assistant": True, "num_assistant_tokens": 5,
    "num_assistant_tokens_schedule": "heuristic", "assistant_confidence_threshold": 0.2,
    "prompt_lookup_num_tokens": 3, "max_matching_ngram_size": 2, "assistant_early_exit": 1,
    "assistant_lookbehind": 3, "target_lookbehind": 3, "assistant_ensemble_weight": 0.5, "speculation_type": "dflash",
    "token_healing": True, "guidance_scale": 2.0, "output_attentions": True, "output_hidden_states": True,
    "prefill_chunk_size": 4, "continuous_batching_config": {"max_batch_tokens": 8}, "cache_config": {"nbits": 4},
    "use_cache": False, "cache_implementation": "offloaded",
}


def _generate_args(lm) -> dict:
    ids = torch.tensor([token_ids(lm, HELLO)], device=lm.device)
    return {"assistant_model": lm._model, "assistant_tokenizer": lm.tokenizer, "synced_gpus": True,
            "negative_prompt_ids": ids, "negative_prompt_attention_mask": torch.ones_like(ids),
            "custom_generate": lambda *args, **kwargs: None, "trust_remote_code": True}


def line_of(tag: str) -> int:
    hits = [i + 1 for i, text in enumerate(_SOURCE) if text.rstrip().endswith("# line: " + tag)]
    assert len(hits) == 1, f"marker {tag!r} found on lines {hits}"
    return hits[0]


def check_message(err: Exception, tag: str, *words: str) -> None:
    """``err``'s message starts with this file's ``path:line`` of ``tag`` and says ``words``."""
    msg = str(err)
    match = re.match(r"(.+?):(\d+): ", msg.splitlines()[0])
    assert match, f"no file:line at the start of:\n{msg}"
    assert os.path.samefile(match.group(1), __file__), msg
    assert int(match.group(2)) == line_of(tag), f"expected line {line_of(tag)} ({tag}), got:\n{msg}"
    for word in words:
        assert word.lower() in msg.lower(), f"{word!r} missing from:\n{msg}"


def refused(lm, settings: dict) -> InputError:
    """The InputError ``model.generate(**settings)`` raises at its own line, before its body runs; the
    model is left as it was."""
    before = state(lm)
    ran = []
    with pytest.raises(InputError) as info:
        with lm.generate(PROMPT_1, max_new_tokens=2, **settings):  # line: refused
            ran.append(True)
            lm.generator.output.save()
    assert not ran, "the block ran: the setting was not refused at the generate() call"
    assert active_tracer() is None
    assert_state_unchanged(lm, before)
    return info.value


@pytest.mark.parametrize("name", sorted(REFUSED_EXAMPLES))
def test_refused_setting(gpt2, name):
    err = refused(gpt2, {name: REFUSED_EXAMPLES[name]})
    if name not in generation_settings.config_fields() | {"use_cache", "cache_implementation"}:
        # a setting newer than the installed transformers, whose GenerationConfig rejects it on its own
        check_message(err, "refused", "transformers rejects these generation settings", name)
        return
    check_message(err, "refused", f"{name}=", "does not implement")
    assert "from the model's generation_config" not in str(err)


@pytest.mark.parametrize("name", ["assistant_model", "assistant_tokenizer", "synced_gpus", "negative_prompt_ids",
                                  "negative_prompt_attention_mask", "custom_generate", "trust_remote_code"])
def test_refused_generate_argument(lm, name):
    check_message(refused(lm, {name: _generate_args(lm)[name]}), "refused", name, "does not implement")


def test_model_kwargs_are_refused(lm):
    """``attention_mask=...`` would go to the model's forward in transformers; fxpatch builds its own."""
    mask = torch.ones((1, len(token_ids(lm, PROMPT_1))), dtype=torch.long, device=lm.device)
    check_message(refused(lm, {"attention_mask": mask}), "refused", "attention_mask", "forward")


def test_setting_from_the_models_generation_config_is_refused(gpt2):
    config = gpt2._model.generation_config
    config.num_beams = 2
    try:
        check_message(refused(gpt2, {}), "refused", "num_beams=2", "generation_config")
        with gpt2.generate(PROMPT_1, max_new_tokens=2, num_beams=1):  # overriding it works
            out = gpt2.generator.output.save()
    finally:
        config.num_beams = None
    assert out.shape == (1, len(token_ids(gpt2, PROMPT_1)) + 2)


@pytest.mark.parametrize("settings, words", [
    ({"num_return_sequences": 0, "do_sample": True}, ["num_return_sequences", ">= 1"]),
    ({"num_return_sequences": 2}, ["num_return_sequences", "greedy"]),  # transformers' own check
    ({"output_scores": True}, ["output_scores", "return_dict_in_generate"]),  # transformers: it would be ignored
])
def test_output_settings_that_cannot_work(gpt2, settings, words):
    check_message(refused(gpt2, settings), "refused", *words)


def test_every_generation_config_field_is_decided():
    """Each field of the installed transformers' GenerationConfig is used, has no effect, or is refused
    (one of them), is named in the docstring table, and every refused one has a test example above."""
    fields = generation_settings.config_fields()
    used, no_effect = generation_settings.USED_FIELDS, generation_settings.NO_EFFECT_FIELDS
    refused_fields = set(generation_settings.REFUSED_FIELDS)
    assert not (used & no_effect) and not (used & refused_fields) and not (no_effect & refused_fields)
    assert fields <= used | no_effect | refused_fields, sorted(fields - (used | no_effect | refused_fields))
    table = generation_settings.check_generation_settings.__doc__
    missing = [f for f in sorted(fields | set(generation_settings.USED_ARGS) | set(generation_settings.REFUSED_ARGS))
               if not re.search(rf"\b{f}\b", table)]
    assert not missing, missing
    assert set(REFUSED_EXAMPLES) == refused_fields | {"use_cache", "cache_implementation"}
    # defaults are not refused: a plain GenerationConfig with every refused field at its default passes
    config = GenerationConfig(**GenerationConfig._get_default_generation_params())
    generation_settings.check_generation_settings(config, set(), fxpatch.errors.Location("x.py", 1))
