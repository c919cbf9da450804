"""The fxpatch command: ``fxpatch demo`` and ``fxpatch --version``.

Run as ``fxpatch demo`` or ``python -m fxpatch demo``.
"""

from __future__ import annotations

import argparse
import sys

import torch


def demo() -> None:
    """Run the reference page's trace examples and print what they give."""
    import fxpatch
    from fxpatch import TINY_GPT2, LanguageModel
    from fxpatch.runner import format_inserted

    model = LanguageModel(TINY_GPT2)
    tok = model.tokenizer
    p1 = "Madison square garden is located in the city of New"
    p2 = "_ _ _ _ _ _ _ _ _ _"
    print(f"fxpatch demo on the embedded tiny GPT-2 ({TINY_GPT2})\n")

    print("1. Batching: two invokes, one forward pass")
    with model.trace() as tracer:
        with tracer.invoke(p1):
            x = model.transformer.wte.output.save()
        with tracer.invoke(p2):
            y = model.transformer.wte.output.save()
    print(f"   x: {type(x).__name__} {tuple(x.shape)}   y: {type(y).__name__} {tuple(y.shape)}")
    print(f"   (one pass, batch of {tracer.batch.input_ids.shape[0]} rows, export took "
          f"{model.site_graph().export_seconds:.2f}s once)\n")

    print("2. Cross-prompt intervention with a barrier: prompt 1's embeddings replace prompt 2's")
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(p1):
            embeddings = model.transformer.wte.output
            barrier()
            original = model.lm_head.output[:, -1].argmax(dim=-1).save()
        with tracer.invoke(p2):
            barrier()
            model.transformer.wte.output = embeddings
            intervened = model.lm_head.output[:, -1].argmax(dim=-1).save()
    print(f"   {p1!r} -> next token {tok.decode(original)!r}")
    print(f"   {p2!r} patched -> next token {tok.decode(intervened)!r}\n")
    print("   Nodes the rewrite inserted into the exported graph:")
    print("   " + format_inserted(tracer.inserted).replace("\n", "\n   ") + "\n")

    print("3. The same without a barrier (pre-0.5 syntax)")
    with model.trace() as tracer:
        with tracer.invoke(p1):
            embeddings = model.transformer.wte.output
        with tracer.invoke(p2):
            model.transformer.wte.output = embeddings
            intervened = model.lm_head.output[:, -1].argmax(dim=-1).save()
    print(f"   {p2!r} patched -> next token {tok.decode(intervened)!r}\n")

    print("4. Two separate runs: save in one trace, use in the next")
    with model.trace(p1):
        embeddings = model.transformer.wte.output.save()
    with model.trace(p2):
        model.transformer.wte.output = embeddings
        intervened = model.lm_head.output[:, -1].argmax(dim=-1).save()
    print(f"   {p2!r} patched -> next token {tok.decode(intervened)!r}\n")

    print("5. Logit lens: the next-token guess after each layer, for prompt 1")
    with model.trace(p1):
        guesses = [model.lm_head(model.transformer.ln_f(layer.output))[:, -1].argmax(dim=-1).save()
                   for layer in model.transformer.h]
    print("   " + "  ".join(f"h[{i}]: {tok.decode(g)!r}" for i, g in enumerate(guesses)))
    torch.testing.assert_close(guesses[-1], original)

    print("\n6. Generation: the page's generate blocks (3 new tokens, greedy)")
    with model.generate(max_new_tokens=3) as tracer:
        with tracer.invoke(p1):
            batch1 = model.generator.output.save()
        with tracer.invoke(p2):
            batch2 = model.generator.output.save()
    print(f"   batching:            {tok.batch_decode(batch1)} {tok.batch_decode(batch2)}")
    with model.generate(max_new_tokens=3) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(p1):
            embeddings = model.transformer.wte.output
            barrier()
            original = model.generator.output.save()
        with tracer.invoke(p2):
            barrier()
            model.transformer.wte.output = embeddings
            intervened = model.generator.output.save()
    print(f"   cross-prompt:        {tok.batch_decode(original)} {tok.batch_decode(intervened)}")
    with model.generate(p1, max_new_tokens=3):
        embeddings = model.transformer.wte.output.save()
    with model.generate(p2, max_new_tokens=3):
        model.transformer.wte.output = embeddings
        intervened = model.generator.output.save()
    print(f"   two separate runs:   {tok.batch_decode(intervened)}")
    with model.generate(p1, max_new_tokens=3) as tracer:
        last = fxpatch.save([])
        for _step in tracer.all():
            last.append(model.lm_head.output[:, -1].argmax(dim=-1))
    print(f"   per-step argmax:     {[tok.decode(t) for t in last]}")


def main(argv: list[str] | None = None) -> int:
    """Run the fxpatch command line; ``argv`` defaults to ``sys.argv[1:]``.

    Example::

        main(["demo"])   # as `fxpatch demo`
    """
    from fxpatch import __version__

    # Help text is plain: argparse prints it as written, so no reST markup here.
    parser = argparse.ArgumentParser(
        prog="fxpatch",
        description="fxpatch: NNsight's batched, cross-prompt interventions, run as one pass "
                    "through an exported FX graph of a Hugging Face model.")
    parser.add_argument("--version", action="version", version=f"fxpatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    sub.add_parser(
        "demo", help="run the reference examples on the embedded tiny GPT-2",
        description="Run the NNsight reference page's examples (batching, cross-prompt patching "
                    "with and without a barrier, two separate runs, logit lens, generation) on the "
                    "tiny GPT-2 shipped with fxpatch, offline, and print what each gives.")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
