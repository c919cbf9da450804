"""The comparison suite: each workload timed for every contender in one run, against the plain HF model.

Workloads: the reference page's patch (tiny GPT-2), 8 invokes (tiny GPT-2 and GPT-2-small
shape), the activation-patching sweep (GPT-2-small shape, 12 layers x every position of a
10-token prompt) and generation (8 prompts x 32 tokens). Contenders: plain Hugging Face by
hand (hooks where a patch is needed), fxpatch eager, fxpatch compiled, NNsight 0.8 and, for
the sweep, TransformerLens 4 (``get_act_patch_resid_pre``). On the tiny model's cases and
generation, HF compiled by hand (the same hook, the model's ``forward`` through
``torch.compile``; generation with a static cache) shows what the plain model gives at best on
the machine, so that a ratio target below it is seen to be out of any library's reach. A contender that is not
installed is a row that says so. Everything runs under ``torch.no_grad()``; each
contender's result is compared with HF by hand's (the ``check`` column).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch

from .cases import PAD, gpt2_small, prompts
from .run import Measurement, case, timed_all, timed_once

HF = "HF by hand"
HF_COMPILED = "HF compiled by hand"  # the floor: the same patch as a hook, the model through torch.compile
EAGER, COMPILED = "fxpatch eager", "fxpatch compiled"
NNSIGHT, TL = "NNsight 0.8", "TransformerLens 4"

# the reference page's sweep prompts; both 10 tokens with the embedded tokenizer, no common prefix
CLEAN = "Madison square garden is located in the city of New"
CORRUPT = "_ _ _ _ _ _ _ _ _ _"


# -- models and contenders ----------------------------------------------------------------------------

def tokenizer():
    from transformers import AutoTokenizer

    import fxpatch

    return AutoTokenizer.from_pretrained(fxpatch.TINY_GPT2)


def tiny_gpt2():
    from transformers import AutoModelForCausalLM

    import fxpatch

    return AutoModelForCausalLM.from_pretrained(fxpatch.TINY_GPT2).eval()


def fxpatch_models(hf, tok, compiled: bool = True) -> dict[str, object]:
    from fxpatch import LanguageModel

    out = {EAGER: LanguageModel(hf, tokenizer=tok)}
    if compiled:
        out[COMPILED] = LanguageModel(hf, tokenizer=tok, compile=True)
    return out


def nnsight_model(hf, tok):
    """NNsight's ``LanguageModel`` over a copy of ``hf`` (NNsight wraps the modules it is given), or the
    reason it cannot run."""
    try:
        from nnsight import LanguageModel
    except ImportError:
        return "not installed"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LanguageModel(copy.deepcopy(hf), tokenizer=tok)


def tl_bridge(hf, tok):
    """TransformerLens 4's bridge over a copy of ``hf`` (it switches the model's attention to eager), or the
    reason it cannot run."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return "not installed"
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    return TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(hf), tokenizer=tok)


def compiled_with_hook(hf, path: str, hook):
    """A copy of ``hf`` with ``hook`` as a forward hook of its module ``path`` (registered once: a hook made
    at each call would be a new function for torch.compile's guards each time) and its ``forward`` through
    ``torch.compile``: what the plain model gives for a patch at best on this machine, intervention
    library or not."""
    model = copy.deepcopy(hf)
    model.get_submodule(path).register_forward_hook(hook)
    model.forward = torch.compile(model.forward)
    return model


def left_padded(rows: list[list[int]], pad: int = 0, device: str | torch.device = "cpu"):
    """The batch HF by hand runs: left-padded ids, attention mask and position ids (on ``device``)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    return ids.to(device), mask.to(device), (mask.cumsum(-1) - 1).clamp(min=0).to(device)


def compare(results: dict[str, torch.Tensor], rtol: float = 1e-4) -> dict[str, str]:
    """Each contender's max |difference| from HF by hand's result, and whether it is within tolerance."""
    ref = results.get(HF)
    out = {}
    if ref is not None and ref.is_floating_point():  # what the others' differences are measured against
        out[HF] = f"values {float(ref.min()):.3g} to {float(ref.max()):.3g}"
    for name, value in results.items():
        if ref is None or name == HF:
            continue
        if value.shape != ref.shape:
            out[name] = f"DIFFERS: shape {tuple(value.shape)}, HF by hand {tuple(ref.shape)}"
            continue
        diff = float((value.float() - ref.float()).abs().max())
        tol = rtol * max(1.0, float(ref.float().abs().max()))
        out[name] = f"max abs diff {diff:.1e}" + ("" if diff <= tol else f" DIFFERS (tolerance {tol:.0e})")
    return out


def measure(case_name: str, workload: str, contenders: dict[str, Callable[[], torch.Tensor] | str], args,
            targets: dict[str, tuple[str, Callable[[dict[str, float]], bool]]] | None = None,
            repeats: int | None = None, warmup: int = 1, rtol: float = 1e-4, block: int = 1) -> list[Measurement]:
    """Time every runnable contender (interleaved; ``block`` calls per timed run), check its result against HF
    by hand's, make the rows."""
    runnable = {k: v for k, v in contenders.items() if callable(v)}
    repeats = repeats or args.repeats
    seconds, results, errors = timed_all(runnable, repeats, warmup, block)
    checks = compare({k: v for k, v in results.items() if k not in errors}, rtol)
    base = seconds.get(HF)
    rows = []
    for name, fn in contenders.items():
        target, status = "", ""
        if name in (targets or {}) and name in seconds:
            target, holds = targets[name]
            try:
                status = "ok" if holds(seconds) else "MISSED"
            except KeyError:  # a contender the target compares with did not run
                status = "n/a"
        m = Measurement(case_name, workload, HF, seconds.get(name), base, repeats if callable(fn) else 0,
                        target=target, contender=name, status=status, check=checks.get(name, ""),
                        note=errors.get(name, "") if callable(fn) else fn)
        rows.append(m)
        progress(m)
    return rows


def progress(m: Measurement) -> None:
    time = "-" if m.seconds is None else f"{m.seconds * 1e3:.1f} ms"
    print(f"[{m.case}] {m.what}: {m.contender}: {time}{'  ' + m.note if m.note else ''}", file=sys.stderr,
          flush=True)


def first_call(case_name: str, workload: str, name: str, fn: Callable[[], object]) -> Measurement:
    note = "compile" if name == HF_COMPILED else "export + rewrite" + (" + compile" if "compiled" in name else "")
    try:
        seconds = timed_once(fn)
    except Exception as e:  # noqa: BLE001 - reported in the row; measure() reports it again for the timed runs
        seconds, note = None, f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
    m = Measurement(case_name, workload, None, seconds, None, 1, contender=f"{name}, first call", note=note)
    progress(m)
    return m


def skip_compiled_if_quick(contenders: dict, args) -> None:
    """``--quick`` leaves fxpatch compiled out (its first call compiles for tens of seconds to minutes on a
    CPU), as a row that says so."""
    if args.quick:
        contenders[COMPILED] = "skipped with --quick: compiling takes minutes on a CPU"


def first_of(contenders: dict, case_name: str, workload: str) -> Measurement:
    """The first call of fxpatch compiled (export + rewrite + compile), or of eager when compiled is left out."""
    name = COMPILED if callable(contenders.get(COMPILED)) else EAGER
    return first_call(case_name, workload, name, contenders[name])


# -- workloads ------------------------------------------------------------------------------------------

def reference_patch(model):
    """The reference page's cross-prompt patch (``barrier``), reading prompt 2's last-position logits."""
    with torch.no_grad():
        with model.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke("Prompt 1"):
                x = model.transformer.wte.output
                barrier()
            with tracer.invoke("Prompt 2"):
                barrier()
                model.transformer.wte.output = x
                out = model.lm_head.output[:, -1].save()
    return out


def first_row_into_second(module, inputs, output: torch.Tensor) -> torch.Tensor:
    """A forward hook: row 0's output copied into row 1's (the reference page's patch, by hand)."""
    output = output.clone()
    output[1] = output[0]
    return output


def patch_by_hand(hf, tok, hooked: bool = False) -> torch.Tensor:
    """HF by hand: both prompts as one batch, a forward hook copying prompt 1's embeddings into prompt 2's
    (``hooked``: ``hf`` has that hook already)."""
    batch = tok(["Prompt 1", "Prompt 2"], return_tensors="pt")  # the same number of tokens
    handle = None if hooked else hf.transformer.wte.register_forward_hook(first_row_into_second)
    try:
        with torch.no_grad():
            return hf(**batch).logits[1:, -1]
    finally:
        if handle is not None:
            handle.remove()


@case("patch")
def patch_case(args) -> list[Measurement]:
    """The reference page's patch on the tiny GPT-2."""
    tok, hf = tokenizer(), tiny_gpt2()
    models = fxpatch_models(hf, tok, compiled=not args.quick)

    contenders = {HF: lambda: patch_by_hand(hf, tok),
                  **{k: (lambda m=m: reference_patch(m)) for k, m in models.items()}}
    nn = nnsight_model(hf, tok)
    contenders[NNSIGHT] = nn if isinstance(nn, str) else (lambda: reference_patch(nn))
    contenders[TL] = "n/a: no cross-prompt patch API"
    skip_compiled_if_quick(contenders, args)
    rows = [first_of(contenders, "patch", "reference page's patch, tiny GPT-2")]
    if not args.quick:
        floor = compiled_with_hook(hf, "transformer.wte", first_row_into_second)
        contenders[HF_COMPILED] = lambda: patch_by_hand(floor, tok, hooked=True)
        rows.append(first_call("patch", "reference page's patch, tiny GPT-2", HF_COMPILED, contenders[HF_COMPILED]))
    return rows + measure("patch", "reference page's patch, tiny GPT-2", contenders, args,
                          targets={COMPILED: ("<= 0.7x HF", lambda t: t[COMPILED] <= 0.7 * t[HF])},
                          block=args.block)


def eight_invokes(model, rows: list[list[int]], layer: int):
    """8 invokes of one prompt each: prompts 0-3's layer output at the last position written into prompts
    4-7 (one barrier for all eight); every invoke saves its last-position logits."""
    outs, hs = [], []
    with torch.no_grad():
        with model.trace() as tracer:
            barrier = tracer.barrier(8)
            for i in range(8):
                with tracer.invoke(rows[i]):
                    if i < 4:
                        hs.append(model.transformer.h[layer].output[:, -1])
                        barrier()
                    else:
                        barrier()
                        model.transformer.h[layer].output[:, -1] = hs[i - 4]
                    outs.append(model.lm_head.output[:, -1].save())
    return torch.cat(list(outs))


def last_positions_of_4_into_4(module, inputs, output: torch.Tensor) -> torch.Tensor:
    """A forward hook: rows 0-3's last position written into rows 4-7's (the 8-invoke patch, by hand)."""
    output = output.clone()
    output[4:, -1] = output[:4, -1]
    return output


def eight_by_hand(hf, rows: list[list[int]], layer: int, hooked: bool = False):
    """HF by hand: the 8 prompts as one left-padded batch, a forward hook doing the patch (``hooked``: ``hf``
    has that hook already)."""
    ids, mask, positions = left_padded(rows, device=hf.device)
    handle = None if hooked else hf.transformer.h[layer].register_forward_hook(last_positions_of_4_into_4)
    try:
        with torch.no_grad():
            return hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    finally:
        if handle is not None:
            handle.remove()


def eight_invoke_contenders(hf, tok, models: dict, rows: list[list[int]], layer: int) -> dict:
    """HF by hand, each of ``models`` (fxpatch) and NNsight running the 8-invoke patch (NNsight: the reason it
    cannot run, if it cannot)."""
    contenders = {HF: lambda: eight_by_hand(hf, rows, layer)}
    contenders.update({k: (lambda m=m: eight_invokes(m, rows, layer)) for k, m in models.items()})
    nn = nnsight_model(hf, tok)
    contenders[NNSIGHT] = nn if isinstance(nn, str) else (lambda: eight_invokes(nn, rows, layer))
    return contenders


@case("invokes8")
def invokes8_case(args) -> list[Measurement]:
    """8 invokes on the tiny GPT-2 and on the GPT-2-small shape."""
    tok = tokenizer()
    return _invokes8(args, tok, "tiny GPT-2", tiny_gpt2()) + _invokes8(args, tok, "GPT-2-small shape", gpt2_small())


def _invokes8(args, tok, label: str, hf) -> list[Measurement]:
    workload = f"8 invokes, {label}"
    rows = prompts(8, 1024)
    layer = hf.config.n_layer // 2
    models = fxpatch_models(hf, tok, compiled=not args.quick)
    contenders = eight_invoke_contenders(hf, tok, models, rows, layer)
    contenders[TL] = "n/a: no cross-prompt patch API"
    if label.startswith("tiny"):
        targets = {COMPILED: ("<= 0.7x HF", lambda t: t[COMPILED] <= 0.7 * t[HF]),
                   NNSIGHT: (">= 3x fxpatch compiled", lambda t: t[NNSIGHT] >= 3 * t[COMPILED])}
    else:
        targets = {EAGER: ("<= 1.02x HF", lambda t: t[EAGER] <= 1.02 * t[HF]),
                   COMPILED: ("<= 1.0x HF", lambda t: t[COMPILED] <= t[HF])}
    skip_compiled_if_quick(contenders, args)
    first = [first_of(contenders, "invokes8", workload)]
    if label.startswith("tiny") and not args.quick:
        floor = compiled_with_hook(hf, f"transformer.h.{layer}", last_positions_of_4_into_4)
        contenders[HF_COMPILED] = lambda: eight_by_hand(floor, rows, layer, hooked=True)
        first.append(first_call("invokes8", workload, HF_COMPILED, contenders[HF_COMPILED]))
    return first + measure("invokes8", workload, contenders, args, targets=targets, block=args.block)


# -- the sweep ----------------------------------------------------------------------------------------

def logit_diff(tok):
    """The metric: the clean run's top token's logit minus the corrupt one's (fixed token ids)."""
    a, b = tok(" York")["input_ids"][0], tok(" _")["input_ids"][0]
    return a, b


def sweep_by_hand(hf, clean: list[int], corrupt: list[int], a: int, b: int) -> torch.Tensor:
    """One forward per cell with a pre-hook writing the clean residual stream into layer ``l``'s input at
    ``p`` (the clean inputs captured by pre-hooks in one clean run)."""
    layers = hf.transformer.h
    clean_in: dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(module, args, kwargs):
            clean_in[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    grid = torch.empty(len(layers), len(clean))
    with torch.no_grad():
        handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            hf(torch.tensor([clean]))
        finally:
            for h in handles:
                h.remove()
        corrupt_ids = torch.tensor([corrupt])
        for i, layer in enumerate(layers):
            for p in range(len(clean)):
                def put(module, args, kwargs, i=i, p=p):
                    hidden = (args[0] if args else kwargs["hidden_states"]).clone()
                    hidden[:, p] = clean_in[i][:, p]
                    if args:
                        return (hidden, *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": hidden}
                handle = layer.register_forward_pre_hook(put, with_kwargs=True)
                try:
                    logits = hf(corrupt_ids).logits[0, -1]
                finally:
                    handle.remove()
                grid[i, p] = logits[a] - logits[b]
    return grid


def sweep_fxpatch(model, clean, corrupt, a, b) -> torch.Tensor:
    from fxpatch.patching import activation_patching

    # layer l's input (TransformerLens' resid_pre) is layer l - 1's output; layer 0's is the embeddings'
    n = model.config.n_layer
    sites = ["transformer.drop"] + [f"transformer.h.{i}" for i in range(n - 1)]
    with torch.no_grad():
        result = activation_patching(model, clean, corrupt, sites, metric=lambda x: x[:, a] - x[:, b],
                                     progress=False)
    return result.scores


def sweep_nnsight(model, clean, corrupt, a, b) -> torch.Tensor:
    """NNsight's tutorial loop: one trace saving the clean layer inputs, then one trace per cell."""
    n = len(model.transformer.h)
    clean_in = {}
    grid = torch.empty(n, len(clean))
    with torch.no_grad():
        with model.trace(clean):
            for layer in range(n):
                clean_in[layer] = model.transformer.h[layer].input.save()
        for layer in range(n):
            for p in range(len(clean)):
                with model.trace(corrupt):
                    model.transformer.h[layer].input[:, p] = clean_in[layer][:, p]
                    logits = model.lm_head.output[0, -1].save()
                grid[layer, p] = logits[a] - logits[b]
    return grid


def sweep_tl(bridge, clean, corrupt, a, b) -> torch.Tensor:
    """TransformerLens: the clean cache, then ``patching.get_act_patch_resid_pre``."""
    from transformer_lens import patching

    with torch.no_grad():
        _, cache = bridge.run_with_cache(torch.tensor([clean]))
        return patching.get_act_patch_resid_pre(bridge, torch.tensor([corrupt]), cache,
                                                lambda logits: logits[0, -1, a] - logits[0, -1, b]).cpu()


@case("sweep")
def sweep_case(args) -> list[Measurement]:
    """Activation patching of the residual stream: 12 layers x the 10 positions of the reference page's
    prompts, GPT-2-small shape; scores compared with HF by hand's."""
    tok, hf = tokenizer(), gpt2_small()
    clean, corrupt = tok(CLEAN)["input_ids"], tok(CORRUPT)["input_ids"]
    a, b = logit_diff(tok)
    workload = f"sweep, GPT-2-small shape, {hf.config.n_layer} layers x {len(clean)} positions"
    models = fxpatch_models(hf, tok, compiled=not args.quick)
    contenders = {HF: lambda: sweep_by_hand(hf, clean, corrupt, a, b)}
    contenders.update({k: (lambda m=m: sweep_fxpatch(m, clean, corrupt, a, b)) for k, m in models.items()})
    if args.quick:
        contenders[COMPILED] = "skipped with --quick: compiling takes minutes on a CPU (a graph per layer)"
    nn = nnsight_model(hf, tok)
    contenders[NNSIGHT] = nn if isinstance(nn, str) else (lambda: sweep_nnsight(nn, clean, corrupt, a, b))
    tl = tl_bridge(hf, tok)
    contenders[TL] = tl if isinstance(tl, str) else (lambda: sweep_tl(tl, clean, corrupt, a, b))

    def five_times(name):
        return lambda t: all(t[name] * 5 <= t[other] for other in (NNSIGHT, TL))

    targets = {k: ("<= 0.2x NNsight and TL", five_times(k)) for k in (EAGER, COMPILED)}
    rows = [first_call("sweep", workload, k, contenders[k]) for k in models]
    # the loops take seconds per call: fewer repeats; scores must agree to 1e-3 of the largest score
    return rows + measure("sweep", workload, contenders, args, targets=targets,
                          repeats=1 if args.quick else max(1, args.repeats // 2), warmup=0, rtol=1e-3)


# -- generation ---------------------------------------------------------------------------------------

def generate_patched(model, rows, layer, new: int, nnsight: bool):
    """32 new tokens for 8 prompts, prompts 0-3's layer output at the last prompt position written into
    prompts 4-7 at the first step. NNsight reads the result inside an invoke, fxpatch at the top."""
    with torch.no_grad():
        with model.generate(max_new_tokens=new, do_sample=False, min_new_tokens=new, pad_token_id=PAD) as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(rows[:4]):
                h = model.transformer.h[layer].output[:, -1]
                barrier()
            with tracer.invoke(rows[4:]):
                barrier()
                model.transformer.h[layer].output[:, -1] = h
            if nnsight:
                with tracer.invoke():
                    out = tracer.result.save()
            else:
                out = tracer.result.save()
    return out


@case("generation")
def generation_case(args) -> list[Measurement]:
    """8 prompts x 32 new tokens (greedy) on the GPT-2-small shape, with a first-step patch."""
    tok, hf = tokenizer(), gpt2_small()
    rows, new = prompts(8, 1024), 32
    layer = hf.config.n_layer // 2
    workload = f"generation, GPT-2-small shape, 8 prompts x {new} tokens"
    ids, mask, _ = left_padded(rows)

    def hook(module, inputs, output):
        if output.shape[1] == 1:  # a decode step: the patch is on the prompt pass only
            return output
        return last_positions_of_4_into_4(module, inputs, output)

    def by_hand():
        handle = hf.transformer.h[layer].register_forward_hook(hook)
        try:
            with torch.no_grad():
                return hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=PAD)
        finally:
            handle.remove()

    models = fxpatch_models(hf, tok, compiled=not args.quick)
    contenders = {HF: by_hand}
    floor_rows = []
    if not args.quick:  # a static cache: fixed shapes, so the decode step compiles once
        floor = compiled_with_hook(hf, f"transformer.h.{layer}", hook)

        def compiled_by_hand():
            with torch.no_grad():
                return floor.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False, pad_token_id=PAD, cache_implementation="static")

        contenders[HF_COMPILED] = compiled_by_hand
        floor_rows.append(first_call("generation", workload, HF_COMPILED, compiled_by_hand))
    contenders.update({k: (lambda m=m: generate_patched(m, rows, layer, new, False)) for k, m in models.items()})
    nn = nnsight_model(hf, tok)
    contenders[NNSIGHT] = nn if isinstance(nn, str) else (lambda: generate_patched(nn, rows, layer, new, True))
    contenders[TL] = "n/a: no cross-prompt patch API"
    targets = {COMPILED: ("<= 0.8x HF generate", lambda t: t[COMPILED] <= 0.8 * t[HF])}
    skip_compiled_if_quick(contenders, args)
    rows_out = [first_of(contenders, "generation", workload), *floor_rows]
    return rows_out + measure("generation", workload, contenders, args, targets=targets,
                              repeats=max(1, args.repeats // 2))


# -- on a GPU ----------------------------------------------------------------------------------------

CUDA_GRAPHS = "fxpatch compiled, CUDA graphs"


@case("gpu")
def gpu_case(args) -> list[Measurement]:
    """8 invokes on the GPT-2-small shape on ``--device`` in ``--dtype``: HF by hand, fxpatch eager, compiled
    and compiled with CUDA graphs (``compile="reduce-overhead"``), NNsight. Results are checked against HF by
    hand's with a tolerance for the dtype (half precision: 3% of the largest logit)."""
    from fxpatch import LanguageModel

    tok = tokenizer()
    hf = gpt2_small().to(device=args.device, dtype=args.dtype)
    name = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else str(args.device)
    workload = f"8 invokes, GPT-2-small shape, {str(args.dtype).removeprefix('torch.')}, {name}"
    rows, layer = prompts(8, 1024), hf.config.n_layer // 2
    models = {**fxpatch_models(hf, tok), CUDA_GRAPHS: LanguageModel(hf, tokenizer=tok, compile="reduce-overhead")}
    contenders = eight_invoke_contenders(hf, tok, models, rows, layer)
    firsts = [first_call("gpu", workload, k, contenders[k]) for k in models]
    rtol = 1e-4 if args.dtype == torch.float32 else 3e-2
    return firsts + measure("gpu", workload, contenders, args, warmup=3, rtol=rtol)


SUITE = ["patch", "invokes8", "sweep", "generation"]
