"""Train the tiny GPT-2 model and byte-level BPE tokenizer embedded in fxpatch.

The script is deterministic (fixed seeds, one CPU thread, deterministic torch
algorithms) and needs no network access. It:

1. reads the corpus ``fxpatch/assets/corpus.txt`` (one training line per row),
2. trains a GPT-2 style byte-level BPE tokenizer (``ByteLevel`` pre-tokenizer
   with ``add_prefix_space=False``, ``ByteLevel`` decoder, ``<|endoftext|>`` as
   bos/eos/unk, no pad token) and wraps it as a ``GPT2TokenizerFast``,
3. trains a small ``GPT2LMHeadModel`` (real GPT-2 architecture, tied
   embeddings) on the corpus with AdamW, each line being one sample that starts
   at position 0 and ends with ``<|endoftext|>``,
4. saves model (safetensors), tokenizer and generation config to
   ``fxpatch/assets/tiny-gpt2/``, then reloads them with ``AutoTokenizer`` /
   ``AutoModelForCausalLM`` and checks the behaviour fxpatch relies on (exact
   tokenizations and greedy continuations, also in a left-padded batch).
   The exit status is non-zero if any check fails.

Run from the repository root (about 1.5 minutes; it uses one CPU thread):

    python fxpatch/assets/train_tiny_gpt2.py
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
)

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus.txt"
OUT_DIR = HERE / "tiny-gpt2"

EOT = "<|endoftext|>"
VOCAB_SIZE = 1024
SEED = 0
STEPS = 1500
BATCH = 32
LR = 3e-3

MADISON = "Madison square garden is located in the city of New"
BLANKS = " ".join(["_"] * 10)
EXPECTED = {
    MADISON: "Madison square garden is located in the city of New York City.",
    BLANKS: " ".join(["_"] * 13),
}
EXTRA_PROMPTS = [
    "Paris is the capital of",
    "The Eiffel Tower is located in the city of",
    "Once upon a time there was",
    "A week has",
    "one two three",
]


def train_tokenizer(lines: list[str]) -> GPT2TokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return GPT2TokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        add_prefix_space=False,
        model_max_length=128,
    )


def make_batches(tok, lines: list[str], gen: torch.Generator):
    """Yield (input_ids, attention_mask, labels) minibatches forever."""
    eos = tok.eos_token_id
    seqs = [tok(line)["input_ids"] + [eos] for line in lines]
    while True:
        order = torch.randperm(len(seqs), generator=gen).tolist()
        for i in range(0, len(order) - BATCH + 1, BATCH):
            chunk = [seqs[j] for j in order[i : i + BATCH]]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), eos)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, s in enumerate(chunk):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            yield ids, mask, ids.masked_fill(mask == 0, -100)


@torch.no_grad()
def corpus_loss(model, tok, lines: list[str]) -> float:
    model.eval()
    total, count = 0.0, 0
    for line in sorted(set(lines)):
        ids = torch.tensor([tok(line)["input_ids"] + [tok.eos_token_id]])
        out = model(ids, labels=ids)
        n = ids.shape[1] - 1
        total += out.loss.item() * n
        count += n
    return total / count


def train(tok, lines: list[str]) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_embd=96,
        n_layer=4,
        n_head=4,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.01},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=LR,
        betas=(0.9, 0.98),
    )
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, STEPS) / STEPS)),
    )
    gen = torch.Generator().manual_seed(SEED)
    batches = make_batches(tok, lines, gen)
    model.train()
    for step in range(1, STEPS + 1):
        ids, mask, labels = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == 1:
            lr = sched.get_last_lr()[0]
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}", flush=True)
    model.eval()
    return model


def verify(path: Path, lines: list[str]) -> list[str]:
    """Reload the saved assets and return a list of failed checks."""
    failures: list[str] = []

    def check(cond: bool, what: str) -> None:
        print(("ok   " if cond else "FAIL ") + what)
        if not cond:
            failures.append(what)

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    check(model.config.model_type == "gpt2", "model_type is gpt2")
    check(model.lm_head.weight is model.transformer.wte.weight, "lm_head tied to wte")
    check(tok.pad_token is None, "tokenizer has no pad token")

    madison = tok.convert_ids_to_tokens(tok(MADISON)["input_ids"])
    blanks = tok.convert_ids_to_tokens(tok(BLANKS)["input_ids"])
    print("  ", madison)
    print("  ", blanks)
    check(
        len(madison) == 10 and madison[0] == "Madison" and madison[-1] == "ĠNew",
        "Madison prompt is 10 tokens",
    )
    check(blanks == ["_"] + ["Ġ_"] * 9, "blank prompt is '_' + 9 x 'Ġ_'")
    multi = [t for t in tok.get_vocab() if t.count("_") > 1]
    check(not multi, f"no multi-underscore tokens in vocab {multi}")

    for prompt, want in EXPECTED.items():
        enc = tok(prompt, return_tensors="pt")
        res = model.generate(
            **enc,
            max_new_tokens=3,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        out = res.sequences
        got = tok.batch_decode(out)
        # Smallest gap between the top-1 and top-2 logits over the new tokens.
        top2 = torch.stack([s[0].topk(2).values for s in res.scores])
        margin = (top2[:, 0] - top2[:, 1]).min().item()
        print(f"   {prompt!r} -> {got}  (min top-2 logit margin {margin:.2f})")
        n_new = out.shape[1] - enc["input_ids"].shape[1]
        check(n_new == 3 and got == [want], f"greedy continuation of {prompt!r}")

    # Left-padded batch, explicit position ids, including a shorter prompt.
    prompts = [MADISON, BLANKS, EXTRA_PROMPTS[0]]
    single = []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
        single.append(out[0, enc["input_ids"].shape[1] :])
    btok = AutoTokenizer.from_pretrained(path, padding_side="left")
    btok.pad_token = btok.eos_token
    enc = btok(prompts, return_tensors="pt", padding=True)
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    out = model.generate(
        **enc,
        position_ids=pos,
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=btok.eos_token_id,
    )
    new = out[:, enc["input_ids"].shape[1] :]
    print("   batched:", btok.batch_decode(new))
    same = all(torch.equal(n, s) for n, s in zip(new, single, strict=True))
    check(same, "left-padded batch generate matches")

    # Same thing with a plain forward loop (no KV cache).
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        for _ in range(3):
            step_pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=step_pos).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    check(torch.equal(ids, out), "left-padded manual forward loop matches")

    for p in EXTRA_PROMPTS:
        enc = tok(p, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
        print(f"   {p!r} -> {tok.decode(out[0], skip_special_tokens=True)!r}")

    loss = corpus_loss(model, tok, lines)
    uniform = math.log(len(tok))
    print(f"   corpus loss {loss:.4f} (uniform {uniform:.4f})")
    check(loss < 0.25 * uniform, "corpus loss well below uniform")
    return failures


def main() -> int:
    t0 = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    lines = [ln.strip() for ln in CORPUS.read_text(encoding="utf-8").splitlines() if ln.strip()]
    print(f"corpus: {len(lines)} lines")

    tok = train_tokenizer(lines)
    print(f"tokenizer: {len(tok)} tokens")
    model = train(tok, lines)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, do_sample=False
    )
    model.save_pretrained(OUT_DIR, safe_serialization=True)
    tok.save_pretrained(OUT_DIR)
    print(f"saved to {OUT_DIR}")

    failures = verify(OUT_DIR, lines)
    print(f"wall time {time.time() - t0:.1f}s")
    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
