"""Benchmark cases. Each returns ``Measurement``s whose baseline ran in the same process."""

from __future__ import annotations

import torch

from .run import Measurement, case, timed_once, timed_pair

PAD = 50256  # GPT-2's <|endoftext|>


def gpt2_small(seed: int = 0):
    """A random GPT-2-small-shaped model (12 layers, 768 wide, GPT-2's vocabulary size)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                        bos_token_id=PAD, eos_token_id=PAD)
    return GPT2LMHeadModel(config).eval()


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` token-id prompts of different lengths (8 to 8 + 2n tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab - 1, (8 + 2 * i,), generator=g).tolist() for i in range(n)]


def setup(args=None, compile=False):
    """The plain model, fxpatch's wrapper of it, 8 prompts and their left-padded batch (on ``args.device``)."""
    from fxpatch import LanguageModel
    from fxpatch.inputs import left_pad

    device = getattr(args, "device", "cpu")
    hf = gpt2_small().to(device=device, dtype=getattr(args, "dtype", torch.float32))
    rows = prompts(8, hf.config.vocab_size)
    return hf, LanguageModel(hf, tokenizer=None, compile=compile), rows, left_pad(rows, PAD, device)


def patch_last_token(model, tracer, rows) -> None:
    """The measured intervention: prompts 0-3's layer-6 last position written into prompts 4-7."""
    with tracer.invoke(rows[:4]):
        h = model.transformer.h[6].output[:, -1]
    with tracer.invoke(rows[4:]):
        model.transformer.h[6].output[:, -1] = h


def forward_pair(hf, model, rows, batch):
    """The trace cases' two sides: the plain HF forward of the batch, and fxpatch's patched trace of it."""
    def plain():
        with torch.no_grad():
            return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids).logits

    def patched():
        with torch.no_grad(), model.trace() as tracer:  # as the baseline: inference, no autograd graph
            patch_last_token(model, tracer, rows)
            with tracer.invoke():
                out = model.lm_head.output[:, -1].save()
        return out

    return plain, patched


@case("generate")
def generate_case(args) -> list[Measurement]:
    """32 new tokens for 8 prompts with a step-0 patch, against plain generate with no intervention."""
    hf, model, rows, batch = setup(args)
    new = 32
    settings = {"do_sample": False, "min_new_tokens": new, "pad_token_id": PAD}

    def plain():
        with torch.no_grad():
            return hf.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=new, **settings)

    def patched():
        with model.generate(max_new_tokens=new, **settings) as tracer:
            patch_last_token(model, tracer, rows)
            out = tracer.result.save()
        return out

    seconds, base = timed_pair(patched, plain, args.repeats)
    return [Measurement("generate", "generate, 8 prompts x 32 tokens, step-0 patch", "HF generate, no patch",
                        seconds, base, args.repeats, target=1.2)]


@case("trace")
def trace_case(args) -> list[Measurement]:
    """One forward pass of 8 prompts with a cross-prompt patch, against the plain model on the same batch."""
    hf, model, rows, batch = setup(args)

    plain, patched = forward_pair(hf, model, rows, batch)

    seconds, base = timed_pair(patched, plain, args.repeats)
    return [Measurement("trace", "trace, 8 prompts, cross-prompt patch (graph reused)", "HF forward, no patch",
                        seconds, base, args.repeats)]


@case("trace_compiled")
def trace_compiled_case(args) -> list[Measurement]:
    """The trace case with the rewritten graph compiled (torch.compile, dynamic sizes); the first call's
    compile time is reported on its own line."""
    hf, model, rows, batch = setup(args, compile=args.compile_mode or True)

    plain, patched = forward_pair(hf, model, rows, batch)

    first = timed_once(patched)
    seconds, base = timed_pair(patched, plain, args.repeats, warmup=2)
    return [Measurement("trace_compiled", "trace, 8 prompts, patch, compiled", "HF forward, no patch",
                        seconds, base, args.repeats),
            Measurement("trace_compiled", "first call: export + rewrite + compile", "HF forward, no patch",
                        first, base, 1)]


@case("stop")
def stop_case(args) -> list[Measurement]:
    """A trace that reads layer 0 of 8 prompts: with ``tracer.stop()``, without it (the graph ends at the last
    value used either way), and the same read with ``model.output`` also saved (the whole model runs)."""
    _, model, rows, _ = setup()

    def layer0(stop: bool, output: bool):
        def run():
            with model.trace(rows) as tracer:
                h = model.transformer.h[0].output.save()
                if output:
                    model.output.save()
                if stop:
                    tracer.stop()
            return h
        return run

    with_stop, without_stop, whole = layer0(True, False), layer0(False, False), layer0(False, True)
    stop_s, plain_s = timed_pair(with_stop, without_stop, args.repeats)
    plain2_s, whole_s = timed_pair(without_stop, whole, args.repeats)
    stop2_s, whole2_s = timed_pair(with_stop, whole, args.repeats)
    return [Measurement("stop", "layer 0 read, tracer.stop()", "layer 0 read, no stop", stop_s, plain_s,
                        args.repeats),
            Measurement("stop", "layer 0 read, no stop", "layer 0 + model.output (all 12 layers + head)", plain2_s,
                        whole_s, args.repeats),
            Measurement("stop", "layer 0 read, tracer.stop()", "layer 0 + model.output (all 12 layers + head)",
                        stop2_s, whole2_s, args.repeats)]
