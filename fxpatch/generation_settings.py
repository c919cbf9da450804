"""Which of transformers' generation settings ``model.generate(...)`` uses, and which it refuses.

fxpatch's decoding loop (``fxpatch/generation.py``) is transformers' ``_sample``
(greedy or multinomial, one sequence per row) run on exported graphs. Every
``GenerationConfig`` field and every extra ``generate()`` argument is either
used the way transformers' own ``generate`` uses it, or refused before anything
runs, with an error at the user's line that names the setting and says what to
do instead. Nothing is silently ignored.

Example::

    with model.generate("hello", max_new_tokens=3, num_beams=2):   # InputError: beam search ...
        ...
"""

from __future__ import annotations

import functools
from typing import Any

from .errors import InputError
from .passes.diagnostics import Location

# Fields transformers' logits processors and stopping criteria read (``_get_logits_processor`` /
# ``_get_stopping_criteria``, which fxpatch's loop calls), and those the loop itself reads.
USED_FIELDS = frozenset({
    # length and stopping
    "max_new_tokens", "max_length", "min_length", "min_new_tokens", "max_time", "stop_strings",
    # strategy and token selection
    "do_sample", "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "renormalize_logits", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
    "watermarking_config",
    # special tokens
    "pad_token_id", "eos_token_id",
    # outputs
    "num_return_sequences", "return_dict_in_generate", "output_scores", "output_logits",
    # the cache: on, dynamic or static (other values are refused below)
    "use_cache", "cache_implementation", "max_cache_len",
})

# Fields that change nothing for a decoder-only model given prompts, in transformers' generate too.
NO_EFFECT_FIELDS = frozenset({"bos_token_id", "decoder_start_token_id", "compile_config", "disable_compile"})

_BEAMS = "Drop it: fxpatch decodes one sequence per row, greedy or sampled (for several continuations per " \
         "prompt use do_sample=True with num_return_sequences=N)."
_ASSISTED = "Drop it: fxpatch runs every step on the model itself (no assistant, draft or prompt-lookup tokens)."

# field -> (values that leave it off, what it is, what to do instead)
REFUSED_FIELDS: dict[str, tuple[tuple, str, str]] = {
    "num_beams": ((None, 1), "beam search", "Drop num_beams (or pass num_beams=1); for several continuations per "
                  "prompt use do_sample=True with num_return_sequences=N."),
    "num_beam_groups": ((None, 1), "group beam search", _BEAMS),
    "diversity_penalty": ((None, 0.0), "group beam search's diversity penalty", _BEAMS),
    "early_stopping": ((None, False), "a beam-search stopping rule", _BEAMS),
    "length_penalty": ((None, 1.0), "beam search's length penalty", _BEAMS),
    "constraints": ((None,), "constrained beam search", _BEAMS),
    "force_words_ids": ((None,), "constrained beam search", _BEAMS),
    "penalty_alpha": ((None, 0.0), "contrastive search", "Drop penalty_alpha: fxpatch decodes greedily or samples."),
    "low_memory": ((None, False), "contrastive search's sequential mode", "Drop low_memory."),
    "dola_layers": ((None,), "DoLa decoding (contrasting layers' logits)",
                    "Drop dola_layers; to read a layer's logits, apply the head to model.<layer>.output in the block."),
    "use_mtp": ((None, False), "multi-token-prediction (assisted) decoding", _ASSISTED),
    "is_assistant": ((None, False), "running as another model's assistant", _ASSISTED),
    "num_assistant_tokens": ((None, 20), "an assisted-decoding parameter", _ASSISTED),
    "num_assistant_tokens_schedule": ((None, "constant"), "an assisted-decoding parameter", _ASSISTED),
    "assistant_confidence_threshold": ((None, 0.4), "an assisted-decoding parameter", _ASSISTED),
    "prompt_lookup_num_tokens": ((None,), "prompt-lookup (assisted) decoding", _ASSISTED),
    "max_matching_ngram_size": ((None,), "a prompt-lookup decoding parameter", _ASSISTED),
    "assistant_early_exit": ((None,), "early-exit (assisted) decoding", _ASSISTED),
    "assistant_lookbehind": ((None, 10), "an assisted-decoding parameter", _ASSISTED),
    "target_lookbehind": ((None, 10), "an assisted-decoding parameter", _ASSISTED),
    "assistant_ensemble_weight": ((None,), "an assisted-decoding parameter", _ASSISTED),
    "speculation_type": ((None,), "speculative decoding", _ASSISTED),
    "token_healing": ((None, False), "token healing (rewriting the prompt's last tokens)",
                      "Drop token_healing; heal the prompt first and pass the healed prompt."),
    "guidance_scale": ((None, 1, 1.0), "classifier-free guidance (an extra unconditional model run per step)",
                       "Drop guidance_scale; to contrast with another prompt, add it as an invoke and combine the "
                       "saved logits."),
    "output_attentions": ((None, False), "returning attention weights",
                          "Drop it and save the attention modules' outputs in the block "
                          "(e.g. model.transformer.h[0].attn.output)."),
    "output_hidden_states": ((None, False), "returning hidden states",
                             "Drop it and save the layers' outputs in the block (e.g. model.transformer.h[0].output), "
                             "with tracer.all() for every step."),
    "prefill_chunk_size": ((None,), "prefilling the prompt in chunks",
                           "Drop it: fxpatch runs the whole prompt in one pass."),
    "continuous_batching_config": ((None,), "continuous batching", "Drop it: fxpatch batches the invokes itself."),
    "cache_config": ((None,), "settings of a quantized or offloaded cache",
                     "Drop it: fxpatch uses transformers' dynamic or static KV cache."),
}

# Values of used fields that the loop does not implement.
_USED_BUT_NOT = {
    "use_cache": ((None, True), "decoding without the KV cache",
                  "Drop use_cache=False: fxpatch decodes one token per step with the KV cache (the tokens are the "
                  "same; a decode step's module values have length 1)."),
    "cache_implementation": ((None, "dynamic", "static"), "a cache other than the dynamic and the static one",
                             "Pass cache_implementation='dynamic' (the default) or 'static' (preallocated to the "
                             "maximum length: fixed shapes under compile=True), or drop it."),
}

# Arguments of transformers' generate() that are not GenerationConfig fields.
USED_ARGS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "streamer", "tokenizer")
REFUSED_ARGS: dict[str, tuple[str, str]] = {
    "assistant_model": ("assisted decoding", _ASSISTED),
    "assistant_tokenizer": ("assisted decoding", _ASSISTED),
    "synced_gpus": ("multi-GPU synchronised decoding", "Drop synced_gpus: fxpatch runs on one device."),
    "negative_prompt_ids": ("classifier-free guidance", REFUSED_FIELDS["guidance_scale"][2]),
    "negative_prompt_attention_mask": ("classifier-free guidance", REFUSED_FIELDS["guidance_scale"][2]),
    "custom_generate": ("a custom decoding loop", "Drop custom_generate: fxpatch runs its own loop."),
    "trust_remote_code": ("loading a custom decoding loop", "Drop trust_remote_code."),
}

_METADATA = {"transformers_version"}


@functools.cache
def config_fields() -> frozenset[str]:
    """The public fields of transformers' ``GenerationConfig`` (metadata excluded)."""
    from transformers import GenerationConfig

    return frozenset(k for k in vars(GenerationConfig()) if not k.startswith("_") and k not in _METADATA)


def _is_off(value: Any, off: tuple) -> bool:
    return any(value is o or (o is not None and value is not None and value == o) for o in off)


def split_generate_args(kwargs: dict, loc: Location) -> dict:
    """Pop ``generate()``'s own arguments from ``kwargs``: the used ones are returned, the refused ones raise."""
    for name, (what, hint) in REFUSED_ARGS.items():
        value = kwargs.pop(name, None)
        if value is not None and value is not False:
            raise InputError(f"model.generate(..., {name}=...) asks for {what}, which fxpatch does not implement",
                             at=loc, hint=hint)
    return {name: kwargs.pop(name) for name in USED_ARGS if kwargs.get(name) is not None}


def check_generation_settings(config, user_set: set[str], loc: Location) -> None:
    """Refuse every setting of ``config`` (a merged ``GenerationConfig``) that fxpatch's loop does not implement.

    Raised at the user's ``model.generate(...)`` line, before anything runs. ``user_set``
    names the fields the user passed; others came from the model's ``generation_config``
    and the message says so. The decision for each field of transformers 5's
    ``GenerationConfig`` (refused means: refused when set to a value other than the listed
    default; ``generate()`` arguments that are not fields are at the end):

    =====================================================  =======================================================
    setting                                                fxpatch
    =====================================================  =======================================================
    max_new_tokens                                         used: required, one decode step per new token
    max_length                                             used as transformers does when both are given:
                                                           max_new_tokens takes precedence
    min_length, min_new_tokens                             used (transformers' logits processors)
    max_time, stop_strings                                 used (transformers' stopping criteria)
    do_sample                                              used: multinomial sampling, else argmax
    temperature, top_k, top_p, min_p, top_h, typical_p,    used (transformers' logits processors, built by
    epsilon_cutoff, eta_cutoff, repetition_penalty,        ``_get_logits_processor`` exactly as generate builds
    encoder_repetition_penalty, no_repeat_ngram_size,      them, on the left-padded batch)
    encoder_no_repeat_ngram_size, bad_words_ids,
    renormalize_logits, forced_bos_token_id,
    forced_eos_token_id, remove_invalid_values,
    exponential_decay_length_penalty, suppress_tokens,
    begin_suppress_tokens, sequence_bias,
    watermarking_config
    pad_token_id, eos_token_id                             used: EOS stops a row, which is then filled with pad
    num_return_sequences                                   used: each prompt row repeated N times consecutively
    return_dict_in_generate, output_scores, output_logits  used: result is a GenerateDecoderOnlyOutput
    use_cache                                              used when True; False refused (the loop always
                                                           decodes with the KV cache)
    cache_implementation                                   used when unset, "dynamic" or "static" (a
                                                           ``StaticCache`` of the maximum length); others refused
    max_cache_len                                          used with "static": the cache's length when longer
                                                           than prompt + max_new_tokens - 1, as in transformers;
                                                           refused with a dynamic cache (which would ignore it)
    bos_token_id, decoder_start_token_id                   no effect: prompts are given, the model is
                                                           decoder-only (as in transformers)
    compile_config, disable_compile                        no effect: fxpatch compiles when asked with
                                                           ``compile=`` (transformers' automatic compilation of
                                                           static-cache decoding does not apply)
    num_beams (1), num_beam_groups (1),                    refused: beam search
    diversity_penalty (0), early_stopping (False),
    length_penalty (1), constraints, force_words_ids
    penalty_alpha, low_memory                              refused: contrastive search
    dola_layers                                            refused: DoLa decoding
    use_mtp, is_assistant, num_assistant_tokens (20),      refused: assisted / speculative decoding
    num_assistant_tokens_schedule ("constant"),
    assistant_confidence_threshold (0.4),
    prompt_lookup_num_tokens, max_matching_ngram_size,
    assistant_early_exit, assistant_lookbehind (10),
    target_lookbehind (10), assistant_ensemble_weight,
    speculation_type
    token_healing                                          refused: rewrites the prompt
    guidance_scale (1)                                     refused: classifier-free guidance runs the model again
    output_attentions, output_hidden_states                refused: save module outputs in the block instead
    prefill_chunk_size, continuous_batching_config         refused: fxpatch runs the prompt in one batched pass
    cache_config                                           refused: quantized and offloaded caches
    (a field fxpatch does not know, from a newer           refused when set
    transformers)
    logits_processor, stopping_criteria,                   generate() arguments, used: merged into transformers'
    prefix_allowed_tokens_fn                               lists as generate merges them
    streamer                                               generate() argument, used: put(prompt ids), put(new
                                                           tokens) each step, end()
    tokenizer                                              generate() argument, used for stop_strings
    assistant_model, assistant_tokenizer, synced_gpus,     generate() arguments, refused
    negative_prompt_ids, negative_prompt_attention_mask,
    custom_generate, trust_remote_code
    other keyword arguments (attention_mask, ...)          refused: fxpatch builds the model's inputs itself
    =====================================================  =======================================================

    Example::

        check_generation_settings(config, {"num_beams"}, loc)   # InputError if config.num_beams == 2
    """
    for name in sorted(config_fields() | set(REFUSED_FIELDS) | set(_USED_BUT_NOT)):
        value = getattr(config, name, None)
        if name in _USED_BUT_NOT:
            off, what, hint = _USED_BUT_NOT[name]
        elif name in REFUSED_FIELDS:
            off, what, hint = REFUSED_FIELDS[name]
        elif name in USED_FIELDS or name in NO_EFFECT_FIELDS:
            continue
        else:
            off, what, hint = (None,), "a generation setting fxpatch does not know", f"Drop {name}."
        if _is_off(value, off):
            continue
        source = "" if name in user_set else " (from the model's generation_config)"
        raise InputError(f"model.generate(...) got {name}={value!r}{source}: {what}, which fxpatch's decoding loop "
                         "does not implement", at=loc, hint=hint)
    n = config.max_cache_len
    if n is not None:
        source = "" if "max_cache_len" in user_set else " (from the model's generation_config)"
        if config.cache_implementation != "static":
            raise InputError(f"model.generate(...) got max_cache_len={n!r}{source}, which sizes a static cache, but "
                             f"the cache is dynamic (cache_implementation={config.cache_implementation!r})", at=loc,
                             hint="Pass cache_implementation='static' with it, or drop max_cache_len.")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InputError(f"max_cache_len must be a whole number >= 1, got {n!r}{source}", at=loc,
                             hint="Pass max_cache_len=N with N >= 1, or drop it (the cache then has the prompt's "
                             "width plus max_new_tokens - 1 positions).")
    k = config.num_return_sequences
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InputError(f"num_return_sequences must be a whole number >= 1, got {k!r}", at=loc,
                         hint="Pass num_return_sequences=N with N >= 1.")
