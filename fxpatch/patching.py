"""Patching sweeps: activation patching and attribution patching over sites x positions.

``activation_patching`` runs the corrupt prompt once per cell (site, position) with the
clean run's value written at that cell, as batched fxpatch traces; ``attribution_patching``
estimates the same grid linearly from one forward and one backward pass per prompt pair.
Both return a ``PatchingResult`` (``.scores``, ``.plot()``, ``.table()``).

Example::

    import fxpatch
    from fxpatch.patching import activation_patching

    model = fxpatch.LanguageModel(fxpatch.TINY_GPT2)
    york = model.tokenizer(" York")["input_ids"][0]
    result = activation_patching(model, "Madison square garden is located in the city of New",
                                 "_ _ _ _ _ _ _ _ _ _",
                                 sites="transformer.h.*", metric=lambda logits: logits[:, york])
    print(result.table())
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import InputError, MissingDependencyError, ModuleNotRunError, ModulePathError, user_location
from .inputs import left_pad, to_rows
from .proxy import Proxy
from .runner import chains_of

Metric = Callable[[torch.Tensor], torch.Tensor]
"""Called with last-position logits ``[n, vocab]``; returns ``[n]``."""

ACTIVATION_BUDGET_BYTES = 1 << 30
"""Memory one batched pass may use when ``batch_size`` is not given (see ``rows_per_pass``)."""

MAX_ROWS_PER_PASS = 512
"""Most patched runs put in one pass: bigger programs take longer to rewrite than they save."""


# -- the result ---------------------------------------------------------------------------------

@dataclass
class PatchingResult:
    """A patching sweep's grid and what it was measured against.

    ``scores[i, j]`` is the score of ``sites[i]`` at ``positions[j]`` (with a leading
    prompt-pair dim when several pairs were given). ``clean`` and ``corrupt`` are the
    metric of the unpatched clean and corrupt runs (a 0-dim tensor, or one per pair).
    ``tokens`` are the clean prompt's tokens (a list per pair for several pairs).
    """

    scores: torch.Tensor
    clean: torch.Tensor
    corrupt: torch.Tensor
    sites: list[str]
    positions: list[int]
    tokens: list[str] | list[list[str]]
    metric_name: str = "metric"
    method: str = "activation patching"
    pairs: bool = field(default=False, repr=False)

    def _view(self, pair: int | None) -> tuple[torch.Tensor, list[str], str]:
        """The grid to show, its column labels and what it is (one pair, or the mean over pairs)."""
        if not self.pairs:
            return self.scores, _labels(self.positions, self.tokens), ""
        n = self.scores.shape[0]
        if pair is None:
            same = all(_labels(self.positions, t) == _labels(self.positions, self.tokens[0]) for t in self.tokens)
            labels = _labels(self.positions, self.tokens[0]) if same else [str(p) for p in self.positions]
            return self.scores.mean(0), labels, f" (mean over {n} pairs)"
        if not -n <= pair < n:
            raise InputError(f"pair {pair} is out of range: the sweep has {n} prompt pairs", at=user_location(),
                             hint=f"Pass a pair from 0 to {n - 1}, or None for the mean over pairs.")
        return self.scores[pair], _labels(self.positions, self.tokens[pair]), f" (pair {pair % n})"

    def table(self, pair: int | None = None, floatfmt: str = ".3f") -> str:
        """The grid as a ``tabulate`` table: a row per site, a column per position.

        With several prompt pairs, ``pair=None`` shows the mean over pairs.

        Example::

            print(result.table())
        """
        from tabulate import tabulate

        grid, labels, _ = self._view(pair)
        rows = [[site, *row] for site, row in zip(self.sites, grid.tolist())]
        return tabulate(rows, headers=["site", *labels], floatfmt=floatfmt, tablefmt="github")

    def plot(self, path: str | None = None, pair: int | None = None) -> Any:
        """A heatmap of the grid (``matplotlib``): positions' tokens on x, sites on y.

        Saves it to ``path`` when given and returns the ``matplotlib.figure.Figure``.
        Needs matplotlib: ``pip install 'fxpatch[plot]'``.

        Example::

            fig = result.plot("patching.png")
        """
        figure_module = _optional("matplotlib.figure", "matplotlib", "result.plot()")
        grid, labels, what = self._view(pair)
        n_sites, n_positions = grid.shape
        fig = figure_module.Figure(figsize=(max(4.5, 0.55 * n_positions + 3.0), max(3.0, 0.4 * n_sites + 2.0)))
        ax = fig.add_subplot()
        values = grid.detach().float().cpu().numpy()
        if self.method.startswith("attribution"):
            # a linear estimate of a change: zero is "no effect", so the colours centre on it
            limit = float(abs(values).max()) or 1.0
            image = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
        else:
            image = ax.imshow(values, aspect="auto", cmap="viridis")
        ax.set_xticks(range(n_positions), labels, rotation=60, ha="right")
        ax.set_yticks(range(n_sites), self.sites)
        ax.set_xlabel("position: clean token")
        ax.set_ylabel("site")
        ax.set_title(f"{self.method}: {self.metric_name}{what}")
        fig.colorbar(image, ax=ax, label=self.metric_name)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig


def _labels(positions: list[int], tokens: list[str]) -> list[str]:
    return [f"{p}: {tokens[p]!r}" if 0 <= p < len(tokens) else str(p) for p in positions]


def _optional(module: str, package: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"{what} needs {package}, which is not installed", at=user_location(),
                                     hint=f"Install it: pip install 'fxpatch[plot]' (or pip install {package}).") \
            from None


def _progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar, or ``None`` when progress is off or tqdm is not installed (no bar, no error)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="run")


# -- what a sweep is over --------------------------------------------------------------------------

@dataclass
class _Site:
    path: str
    container: bool  # the output is a tuple/dict whose element 0 is patched
    ndim: int  # of element 0: (batch, sequence, ...)
    order: int  # where the forward pass computes it: writes must go in this order


@dataclass
class _Sweep:
    pairs: list[tuple[list[int], list[int]]]  # (clean ids, corrupt ids)
    several: bool
    sites: list[_Site]
    positions: list[list[int]]  # per pair, non-negative
    shown_positions: list[int]
    tokens: list[list[str]]
    metric: Metric | None  # None: the default, made for each pair from its clean run
    metric_name: str

    def metric_of(self, clean_logits: torch.Tensor, tokenizer) -> Metric:
        """The metric of a pair whose clean run gave ``clean_logits`` (``[vocab]``)."""
        if self.metric is not None:
            return self.metric
        token = int(clean_logits.argmax())
        if not self.several and tokenizer is not None:
            self.metric_name = f"logit of {tokenizer.decode([token])!r}"
        return _top_token_logit(token)

    def subset(self, ks: list[int]) -> _Sweep:
        """The same sweep over pairs ``ks`` only (a rank's share of a distributed sweep)."""
        return replace(self, pairs=[self.pairs[k] for k in ks], positions=[self.positions[k] for k in ks],
                       tokens=[self.tokens[k] for k in ks])


def _top_token_logit(token: int) -> Metric:
    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, token]
    return metric


def _prepare(model, clean, corrupt, sites, positions, metric, what: str) -> _Sweep:
    loc = user_location()
    clean_list, several = _prompt_list(clean)
    corrupt_list, several_corrupt = _prompt_list(corrupt)
    if several != several_corrupt or len(clean_list) != len(corrupt_list):
        raise InputError(f"clean is {_describe(several, clean_list)} but corrupt is "
                         f"{_describe(several_corrupt, corrupt_list)}", at=loc,
                         hint="Pass one clean and one corrupt prompt, or two lists of the same length (pairs).")
    if not clean_list:
        raise InputError("no prompt pairs were given", at=loc, hint="Pass a clean and a corrupt prompt.")
    pairs = []
    for k, (c, x) in enumerate(zip(clean_list, corrupt_list)):
        c_ids, x_ids = _ids(model, c, loc), _ids(model, x, loc)
        if len(c_ids) != len(x_ids):
            which = f" (pair {k})" if several else ""
            raise InputError(
                f"the clean prompt has {len(c_ids)} tokens and the corrupt prompt has {len(x_ids)}{which}; "
                f"{what} patches position by position, so both need the same number of tokens", at=loc,
                hint="Reword one of them (or pass token ids) so that both have the same number of tokens.")
        pairs.append((c_ids, x_ids))
    per_pair, shown = _positions(positions, [len(c) for c, _ in pairs], loc)
    resolved = _sites(model, sites, loc)
    tokenizer = model.tokenizer
    tokens = [[tokenizer.decode([t]) if tokenizer is not None else str(t) for t in c] for c, _ in pairs]
    if metric is None:
        return _Sweep(pairs, several, resolved, per_pair, shown, tokens, None, "logit of the clean run's top token")
    if not callable(metric):
        raise InputError(f"metric must be a function of the logits, got {type(metric).__name__}", at=loc,
                         hint="Pass metric=lambda logits: logits[:, token_id] (logits are [n, vocab]).")
    _check_metric(model, metric, loc)
    name = getattr(metric, "__name__", "metric")
    return _Sweep(pairs, several, resolved, per_pair, shown, tokens, metric, "metric" if name == "<lambda>" else name)


def _describe(several: bool, prompts: list) -> str:
    return f"a list of {len(prompts)} prompt{'s' if len(prompts) != 1 else ''}" if several else "one prompt"


def _prompt_list(prompts) -> tuple[list, bool]:
    """``(prompts, several)``: one prompt (text or token ids) is a list of one."""
    if isinstance(prompts, str) or (isinstance(prompts, torch.Tensor) and prompts.dim() == 1):
        return [prompts], False
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)], False
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        return list(prompts), True
    if isinstance(prompts, (list, tuple)):
        return list(prompts), True
    raise InputError(f"cannot use {type(prompts).__name__} as a prompt", at=user_location(),
                     hint="Pass a string, token ids, or a list of them (one per prompt pair).")


def _ids(model, prompt, loc) -> list[int]:
    rows = to_rows(prompt, model.tokenizer, loc, model.max_length, model.vocab_size)
    if len(rows) != 1:
        raise InputError(f"a prompt of a pair must be one prompt, got {len(rows)}", at=loc,
                         hint="Pass pairs as two lists: clean=[c1, c2], corrupt=[x1, x2].")
    return rows[0]


def _positions(positions, lengths: list[int], loc) -> tuple[list[list[int]], list[int]]:
    """Each pair's positions (non-negative), and the positions the result reports."""
    if positions is None:
        if len(set(lengths)) > 1:
            raise InputError(
                f"the prompt pairs have different numbers of tokens ({', '.join(map(str, lengths))}), so "
                "'all positions' is not one list", at=loc,
                hint="Pass positions=[...] (negative positions count from the end: -1 is the last token).")
        positions = list(range(lengths[0]))
    if isinstance(positions, int):
        positions = [positions]
    positions = [int(p) for p in positions]
    if not positions:
        raise InputError("positions is empty", at=loc, hint="Pass at least one position, or leave it out (all).")
    for length in lengths:
        bad = [p for p in positions if not -length <= p < length]
        if bad:
            raise InputError(f"position {bad[0]} is out of range for a prompt of {length} tokens", at=loc,
                             hint=f"Use positions from {-length} to {length - 1}.")
    per_pair = [[p % n for p in positions] for n in lengths]
    shown = per_pair[0] if len(set(lengths)) == 1 else positions
    return per_pair, shown


def _sites(model, sites, loc) -> list[_Site]:
    """Module paths (globs expanded, one path component per ``*``) checked to run and give a tensor."""
    if isinstance(sites, str):
        sites = [sites]
    sites = list(sites)
    if not sites:
        raise InputError("no sites were given", at=loc,
                         hint='Pass module paths, e.g. sites=["transformer.h.0"] or "transformer.h.*".')
    graph = model.site_graph("forward")
    names = [n for n, _ in model._model.named_modules() if n]
    found: list[str] = []
    for pattern in sites:
        if not isinstance(pattern, str):
            raise InputError(f"a site must be a module path (str), got {type(pattern).__name__}", at=loc,
                             hint='Use dotted paths such as "transformer.h.3.attn".')
        if any(ch in pattern for ch in "*?["):
            parts = pattern.split(".")
            matches = [n for n in names if len(n.split(".")) == len(parts)
                       and all(fnmatch.fnmatchcase(a, b) for a, b in zip(n.split("."), parts))]
            matches = [n for n in matches if _runs_with_tensor(graph, n)]
            if not matches:
                raise ModulePathError(f"no module that runs matches the site pattern {pattern!r}", at=loc,
                                      hint="Each * stands for one path component (transformer.h.* is every "
                                      "layer); print(model) shows the module tree.")
            found += matches
        elif pattern not in graph.modules:
            if pattern in names or pattern == "":
                raise ModuleNotRunError(f"module {pattern!r} does not run in the model's forward pass", at=loc,
                                        hint="Pick a module that runs (print(model) shows the tree).")
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.6)
            raise ModulePathError(f"the model has no module {pattern!r}", at=loc,
                                  hint=(f"Did you mean {', '.join(map(repr, close))}? " if close else "")
                                  + "Sites are dotted module paths (print(model) shows the tree).")
        elif not _runs_with_tensor(graph, pattern):
            raise InputError(f"module {pattern!r} has no tensor output to patch (its output's first element is "
                             "not a tensor the model uses)", at=loc,
                             hint="Pick a module whose output (or output[0]) is a (batch, tokens, ...) tensor.")
        else:
            found.append(pattern)
    out = []
    chains = chains_of(graph)
    for path in dict.fromkeys(found):
        ms = graph.modules[path]["output"]
        ndim, order = _site_facts(graph)[ms.leaves[0]]
        if ndim < 2:
            raise InputError(f"module {path!r} outputs a {ndim}-D tensor; patching needs (batch, tokens, ...)",
                             at=loc, hint="Pick a module whose output has a batch and a token dim.")
        if chains.root[ms.leaves[0]] in chains.unbatched:
            raise InputError(f"module {path!r} outputs a tensor whose first dim is not the batch (its rows and "
                             "tokens flattened, say); patching needs (batch, tokens, ...)", at=loc,
                             hint="Pick a module whose output has a batch and a token dim (a layer, or the "
                             "module the flattened one is inside).")
        out.append(_Site(path, ms.spec.kind != "leaf", ndim, order))
    return out


def _runs_with_tensor(graph, path: str) -> bool:
    ms = graph.modules.get(path, {}).get("output")
    if ms is None or not ms.is_site or not ms.is_site[0]:
        return False
    return ms.spec.kind == "leaf" or ms.spec.children[0].kind == "leaf"


def _site_facts(graph) -> dict[str, tuple[int, int]]:
    """Each site's ``(dims, place in the forward pass)``, from the export's graph.

    The dims shape the write's mask; the place orders an invoke's writes, which
    fxpatch requires to follow the forward pass.
    """
    facts = getattr(graph, "_fxpatch_site_facts", None)
    if facts is None:
        from .passes.ops import is_site

        facts = {}
        for i, n in enumerate(graph.graph_module.graph.nodes):
            if is_site(n) and isinstance(n.meta.get("val"), torch.Tensor):
                facts.setdefault(n.args[1], (n.meta["val"].dim(), i))
        graph._fxpatch_site_facts = facts
    return facts


def _check_metric(model, metric: Metric, loc) -> None:
    """Call ``metric`` on zero logits of the model's width: a wrong output shape is found before any run."""
    head = model._model.get_output_embeddings() if hasattr(model._model, "get_output_embeddings") else None
    vocab = getattr(head, "out_features", None) or model.vocab_size or 1
    probe = metric(torch.zeros(3, vocab, device=model.device))
    _check_metric_value(probe, 3, loc)


def _check_metric_value(value, n: int, loc) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != (n,):
        got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError(f"metric returned {got} for logits of {n} runs; it must return one value per run, "
                         f"shape ({n},)", at=loc,
                         hint="Reduce over the vocabulary only: e.g. logits[:, a] - logits[:, b].")
    return value


def rows_per_pass(model, width: int) -> int:
    """How many patched runs of ``width`` tokens one pass holds within ``ACTIVATION_BUDGET_BYTES``.

    A row's pass is dominated by its logits (``width x vocab``), a few hidden-size
    activations per token alive at a time and the attention scores (``heads x width^2``).
    """
    config = model.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 1024
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 16
    vocab = model.vocab_size or 50_000
    itemsize = next(model._model.parameters()).element_size()
    per_row = itemsize * width * (vocab + 16 * hidden + heads * width)
    return max(1, min(MAX_ROWS_PER_PASS, ACTIVATION_BUDGET_BYTES // per_row))


def _check_batch_size(batch_size, loc) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}", at=loc,
                         hint="Pass batch_size=64 (patched runs per pass), or leave it out to size passes by "
                         "memory.")


# -- activation patching ---------------------------------------------------------------------------

def _envoy(model, path: str):
    envoy = model
    for part in path.split("."):
        envoy = getattr(envoy, part)
    return envoy


def _element0(value):
    """A module's output, or element 0 of a tuple/dict output (a site's first value)."""
    if isinstance(value, (Proxy, torch.Tensor)):
        return value
    return next(iter(value.values())) if isinstance(value, dict) else value[0]


def _last_logits(model):
    out = model.output
    logits = out["logits"] if isinstance(out, dict) and "logits" in out else out[0]
    return logits[:, -1]


@torch.no_grad()  # traces follow torch's grad mode; the sweep needs no gradients
def activation_patching(model, clean: Any, corrupt: Any, sites: str | Sequence[str],
                        positions: Sequence[int] | int | None = None, metric: Metric | None = None,
                        batch_size: int | None = None, progress: bool = True,
                        distributed: bool | torch.distributed.ProcessGroup = False) -> PatchingResult:
    """Patch each site's clean output into the corrupt run, one position at a time, and measure.

    ``scores[i, j]`` is ``metric`` of the corrupt prompt run with ``sites[i]``'s output
    (for a tuple output, element 0) at token ``positions[j]`` taken from the clean run:
    eager torch's ``model.<site>.output[:, p] = clean_value[:, p]``. ``clean`` and
    ``corrupt`` are prompts (text or token ids) with the same number of tokens, or two
    lists of them (prompt pairs: ``scores`` then has a leading pair dim). ``sites`` are
    module paths; ``*`` in a path stands for one component (``"transformer.h.*"``).
    ``positions`` are token indices (negative ones count from the end; default: all).
    ``metric(logits)`` maps the last-position logits ``[n, vocab]`` of ``n`` runs of one
    prompt pair to ``[n]``; the default is the logit of the clean run's top next token.
    ``result.clean`` / ``result.corrupt`` are the metric of the unpatched runs.

    How it runs. Every patched run is a row of a batched fxpatch trace. First the clean
    and corrupt prompts run (up to ``batch_size // 2`` pairs per pass), keeping every
    site's clean values at the swept positions and its corrupt output at every token.
    Then each site gets passes of its cells, a corrupt row per cell (at most
    ``batch_size`` rows; default: as many as fit ``ACTIVATION_BUDGET_BYTES`` for the
    model's hidden size, vocabulary and the prompts' length, at most
    ``MAX_ROWS_PER_PASS``), in which the site's output is given whole: the corrupt
    run's value with the clean value at that row's position. ``progress`` shows a
    ``tqdm`` bar over the cells when tqdm is installed.

    ``distributed=True`` (or a ``torch.distributed`` process group) shares the prompt
    pairs among the ranks of a ``torchrun`` launch: each rank sweeps its share and every
    rank returns the whole result, the same as one process would (see
    ``fxpatch.distributed``; every rank must make the same call).

    What the maths lets it skip, and what it does not:

    * The clean and corrupt prompts run once per pair, not once per cell or per pass.
    * A patched run agrees with the corrupt run everywhere before the patched site, so
      a pass that patches one site need not compute anything before it: the site's
      output is the corrupt output with one position replaced, passed in as data. A
      site whose output is a tensor is skipped with that value (``envoy.skip``), so its
      module's computation, and whatever fed only it, leaves the graph that runs: a
      pass patching layer ``l`` of the residual stream computes layers ``l + 1`` and up
      (over a full sweep of ``L`` layers, about half the layer computations of one full
      run per cell). A site whose output is a tuple (an attention module) gets element
      0 written instead and its module runs.
    * The metric reads the last position's logits only. Where the model's logits are
      its output layer (an ``nn.Linear``) applied to that layer's input, which the
      unpatched runs check, the patched passes read the layer's input at the last
      position and apply the layer to it (once over up to ``batch_size`` rows of many
      passes), and the graph drops the layer over the other positions (for GPT-2-small
      with 10 tokens, a third of a full run's work).
    * A patch at position ``p`` changes nothing at positions before ``p`` (causal
      attention), and the clean and corrupt runs agree at every site up to the last
      position where their tokens agree. So a cell at a position inside the prompts'
      common prefix writes the value that is already there: it is not run, and its score
      is the corrupt metric.
    * Positions are data (the patched values passed in), not part of the program, so
      passes of the same site and row count share one rewritten graph: fxpatch caches
      graphs by the program's structure (its sites and row counts, not the prompts,
      positions or values), also across calls. A sweep needs a graph per site (and per
      distinct row count), plus the clean/corrupt pass's.
    * Not exploited: positions before ``p`` are still recomputed in the layers above the
      patch (they equal the corrupt run's there, but attention needs their keys and
      values, and an fxpatch trace has no entry point taking a cache of them), and the
      last layers still run over every position although only the last one is read.

    Example::

        york = model.tokenizer(" York")["input_ids"][0]
        result = activation_patching(model, "Madison square garden is located in the city of New",
                                     "_ _ _ _ _ _ _ _ _ _",
                                     sites="transformer.h.*", positions=[-3, -2, -1],
                                     metric=lambda logits: logits[:, york])
        result.scores.shape   # (4, 3): 4 layers x 3 positions
    """
    return _sweep(model, "activation patching", _activation_sweep, clean, corrupt, sites, positions, metric,
                  batch_size, progress, distributed, user_location())


def _sweep(model, method: str, sweep_pairs: Callable[..., _Tally], clean, corrupt, sites, positions, metric,
           batch_size: int | None, progress: bool, distributed, loc) -> PatchingResult:
    """Check the arguments and sweep the prompt pairs with ``sweep_pairs`` (``_activation_sweep``,
    ``_attribution_sweep``) here, or share them among the ranks of a process group."""

    def prepare() -> _Sweep:
        _check_batch_size(batch_size, loc)
        return _prepare(model, clean, corrupt, sites, positions, metric, method)

    def run(sweep: _Sweep, show: bool) -> _Tally:
        return sweep_pairs(model, sweep, batch_size, show, loc)

    if distributed is not False and distributed is not None:
        from .distributed import sharded_sweep

        return sharded_sweep(model, prepare, run, method, progress, distributed, loc)
    return run(prepare(), progress).result(method)


def _activation_sweep(model, sweep: _Sweep, batch_size: int | None, progress: bool, loc) -> _Tally:
    tally = _Tally(model, sweep, loc)
    cells: list[list[tuple[int, int, int]]] = [[] for _ in sweep.sites]  # per site
    skipped = []
    for k, (c_ids, x_ids) in enumerate(sweep.pairs):
        for j, p in enumerate(sweep.positions[k]):
            shared_prefix = c_ids[:p + 1] == x_ids[:p + 1]
            for i in range(len(sweep.sites)):
                (skipped if shared_prefix else cells[i]).append((k, i, j))
    rows = batch_size or rows_per_pass(model, max(len(c) for c, _ in sweep.pairs))
    bar = _progress_bar(tally.scores.numel(), "activation patching", progress)
    try:
        runs = _unpatched_passes(model, sweep, max(1, rows // 2), tally)
        heads: list[tuple[list, torch.Tensor]] = []  # (cells, the output layer's input at the last position)
        for i in _forward_order(sweep):
            for start in range(0, len(cells[i]), rows):
                chunk = cells[i][start:start + rows]
                _site_pass(model, sweep, i, chunk, runs, tally, heads)
                if bar is not None:
                    bar.update(len(chunk))
        _apply_head(heads, runs, rows, tally)
        for k, i, j in skipped:
            tally.scores[k, i, j] = tally.corrupt[k]
        if bar is not None:
            bar.update(bar.total - bar.n)
    finally:
        if bar is not None:
            bar.close()
    return tally


class _Tally:
    """A sweep's scores and unpatched metrics as the passes come in, and each pair's metric."""

    def __init__(self, model, sweep: _Sweep, loc):
        self.model, self.sweep, self.loc = model, sweep, loc
        n_pairs = len(sweep.pairs)
        self.scores = torch.full((n_pairs, len(sweep.sites), len(sweep.shown_positions)), math.nan)
        self.clean, self.corrupt = torch.empty(n_pairs), torch.empty(n_pairs)
        self.metrics: dict[int, Metric] = {}

    def unpatched(self, ks: list[int], clean_logits: torch.Tensor, corrupt_logits: torch.Tensor) -> list:
        """Record pairs ``ks``' clean and corrupt metrics (logit rows in ``ks`` order).

        Returns each pair's ``metric`` output ``[clean, corrupt]`` as computed (with its autograd graph).
        """
        out = []
        for r, k in enumerate(ks):
            self.metrics[k] = self.sweep.metric_of(clean_logits[r].detach(), self.model.tokenizer)
            values = _check_metric_value(self.metrics[k](torch.stack([clean_logits[r], corrupt_logits[r]])), 2,
                                         self.loc)
            self.clean[k], self.corrupt[k] = values.detach().float().cpu()
            out.append(values)
        return out

    def patched(self, cells: list[tuple[int, int, int]], logits: torch.Tensor) -> None:
        """Score each cell from its row of ``logits``; the metric is called once per pair, with its rows."""
        pair_of_row = [k for k, _, _ in cells]
        for k in dict.fromkeys(pair_of_row):
            rows = [r for r, kk in enumerate(pair_of_row) if kk == k]
            values = _check_metric_value(self.metrics[k](logits[rows]), len(rows), self.loc)
            for r, v in zip(rows, values.detach().float().cpu()):
                _, i, j = cells[r]
                self.scores[k, i, j] = v

    def result(self, method: str) -> PatchingResult:
        sweep = self.sweep
        scores, clean, corrupt = self.scores, self.clean, self.corrupt
        if not sweep.several:
            scores, clean, corrupt = scores[0], clean[0], corrupt[0]
        return PatchingResult(scores, clean, corrupt, [s.path for s in sweep.sites], list(sweep.shown_positions),
                              sweep.tokens if sweep.several else sweep.tokens[0], sweep.metric_name, method,
                              sweep.several)


def _forward_order(sweep: _Sweep) -> list[int]:
    return sorted(range(len(sweep.sites)), key=lambda i: sweep.sites[i].order)


def _read_sites(model, sweep: _Sweep, save: bool) -> list:
    """Every site's output (element 0) in the current invoke, read in forward order as an invoke must."""
    reads: list = [None] * len(sweep.sites)
    for i in _forward_order(sweep):
        value = _element0(_envoy(model, sweep.sites[i].path).output)
        reads[i] = value.save() if save else value
    return reads


@dataclass
class _Unpatched:
    """What the patched passes take from the unpatched runs of every pair.

    ``clean[k][i]``: site ``i``'s clean output (element 0) of pair ``k`` at its swept
    positions, ``(positions, ...)``; ``corrupt[k][i]``: the corrupt output at every
    token, ``(tokens, ...)``; ``head``: the output layer's ``(weight, bias)`` when the
    logits are exactly that layer applied to its input (else ``None``: full logits are read).
    """

    clean: list[list[torch.Tensor]]
    corrupt: list[list[torch.Tensor]]
    head: tuple[torch.Tensor, torch.Tensor | None] | None
    head_path: str | None
    head_order: int


def _head(model) -> tuple[str | None, torch.nn.Module | None]:
    """The output layer's path and module when it is a plain ``nn.Linear`` (the usual LM head)."""
    hf = model._model
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return None, None
    path = next((name for name, m in hf.named_modules() if m is head), None)
    graph = model.site_graph("forward")
    if not path or path not in graph.modules or not _runs_with_tensor(graph, path):
        return None, None
    return path, head


def _unpatched_passes(model, sweep: _Sweep, pairs_per_pass: int, tally: _Tally) -> _Unpatched:
    """Run each pair's clean and corrupt prompts once: their metrics, and the values the patched passes need.

    The runs also read the output layer's input at the last position: where the layer
    applied to it gives the model's logits (checked on these runs), the patched passes
    read that input instead of the logits, so the layer runs on one position per row.
    """
    head_path, head = _head(model)
    clean: list[list[torch.Tensor]] = [[] for _ in sweep.pairs]
    corrupt: list[list[torch.Tensor]] = [[] for _ in sweep.pairs]
    head_exact = head is not None
    for start in range(0, len(sweep.pairs), pairs_per_pass):
        ks = list(range(start, min(start + pairs_per_pass, len(sweep.pairs))))
        width = max(len(sweep.pairs[k][0]) for k in ks)
        saved: dict[str, Any] = {}
        with model.trace() as tracer:
            for side in (0, 1):
                with tracer.invoke([sweep.pairs[k][side] for k in ks]):
                    saved[side, "sites"] = _read_sites(model, sweep, save=True)
                    if head is not None:
                        saved[side, "head"] = _envoy(model, head_path).input[:, -1].save()
                    saved[side, "logits"] = _last_logits(model).save()
        tally.unpatched(ks, saved[0, "logits"], saved[1, "logits"])
        for side in (0, 1) if head is not None else ():
            logits = saved[side, "logits"]
            again = torch.nn.functional.linear(saved[side, "head"], head.weight, head.bias)
            scale = float(logits.abs().max()) or 1.0
            head_exact = head_exact and torch.allclose(again, logits, rtol=1e-4, atol=1e-5 * scale)
        for r, k in enumerate(ks):
            n = len(sweep.pairs[k][0])
            at = [width - n + p for p in sweep.positions[k]]
            clean[k] = [v[r, at].clone() for v in saved[0, "sites"]]
            corrupt[k] = [v[r, width - n:].clone() for v in saved[1, "sites"]]
    graph = model.site_graph("forward")
    order = _site_facts(graph)[graph.modules[head_path]["output"].leaves[0]][1] if head_exact else -1
    return _Unpatched(clean, corrupt, (head.weight, head.bias) if head_exact else None, head_path, order)


def _apply_head(heads: list, runs: _Unpatched, rows: int, tally: _Tally) -> None:
    """Score the cells whose passes read the output layer's input: the layer applied to up to ``rows``
    rows at a time, over several passes' rows, so that its weight (vocabulary x hidden) is read once."""
    while heads:
        group = [heads.pop(0)]
        while heads and sum(len(c) for c, _ in group) + len(heads[0][0]) <= rows:
            group.append(heads.pop(0))
        with torch.no_grad():
            logits = torch.nn.functional.linear(torch.cat([h for _, h in group]), *runs.head)
        for (cells, _), part in zip(group, logits.split([len(c) for c, _ in group])):
            tally.patched(cells, part)


def _site_pass(model, sweep: _Sweep, i: int, cells, runs: _Unpatched, tally: _Tally, heads: list) -> None:
    """One pass of corrupt rows patched at site ``i``, a row per cell in ``cells``.

    The site's output is given whole: the corrupt run's value with the clean value at
    the row's position. A site whose output is a tensor is skipped (``envoy.skip``) with
    that value, so its module's computation, and whatever fed only it (for a
    residual-stream site: every layer below), is not in the graph that runs. A site
    whose output is a tuple gets element 0 written instead, and runs.
    """
    site = sweep.sites[i]
    width = max(len(sweep.pairs[k][0]) for k, _, _ in cells)
    like = runs.corrupt[cells[0][0]][i]
    value = like.new_zeros((len(cells), width) + tuple(like.shape[1:]))  # left padding stays zero: it is masked
    for r, (k, _, j) in enumerate(cells):
        n = len(sweep.pairs[k][0])
        value[r, width - n:] = runs.corrupt[k][i]
        value[r, width - n + sweep.positions[k][j]] = runs.clean[k][i][j]
    # the head shortcut needs the head's input to come after the patch (not a patch of the head itself)
    shortcut = runs.head is not None and site.path != runs.head_path and site.order < runs.head_order
    saved: dict[str, Any] = {}
    with model.trace() as tracer:
        with tracer.invoke([sweep.pairs[k][1] for k, _, _ in cells]):
            envoy = _envoy(model, site.path)
            if site.container:
                out = envoy.output
                out[0] = value
            else:
                # a skipped module's computation leaves the graph, and with it whatever only fed it
                envoy.skip(value)
            if shortcut:
                saved["head"] = _envoy(model, runs.head_path).input[:, -1].save()
            else:
                saved["logits"] = _last_logits(model).save()
    if shortcut:
        heads.append((cells, saved["head"]))  # scored when the sweep applies the output layer
    else:
        tally.patched(cells, saved["logits"])


# -- attribution patching --------------------------------------------------------------------------

def attribution_patching(model, clean: Any, corrupt: Any, sites: str | Sequence[str],
                         positions: Sequence[int] | int | None = None, metric: Metric | None = None,
                         batch_size: int | None = None, progress: bool = True,
                         distributed: bool | torch.distributed.ProcessGroup = False) -> PatchingResult:
    """The linear estimate of ``activation_patching``'s effects: ``(clean - corrupt) . d metric / d activation``.

    For each site (output element 0) and position, ``scores[i, j]`` is the clean minus
    corrupt activation at that position times the gradient of the corrupt run's metric
    with respect to that activation, summed over the hidden dims: a first-order estimate
    of ``activation_patching(...).scores - corrupt`` (a change of the metric, not the
    metric itself). It is exact where the metric is linear in the site (the logits, the
    final norm's output) and an estimate elsewhere. Arguments are
    ``activation_patching``'s; ``batch_size`` is the number of prompt pairs per pass.

    It does not use fxpatch's traces: it runs the
    wrapped Hugging Face model (``model._model``) with plain ``torch.autograd``, forward
    hooks capturing each site's output, one forward pass of the clean and corrupt
    prompts together (left-padded, with position ids from the attention mask, as fxpatch
    batches) and one backward pass (``torch.autograd.grad`` of the summed corrupt
    metrics with respect to the captured activations) per pass of pairs. Hooks are
    removed afterwards; no parameter's ``.grad`` is touched. ``distributed`` shares the
    prompt pairs among ranks, as for ``activation_patching``.

    Example::

        york = model.tokenizer(" York")["input_ids"][0]
        estimate = attribution_patching(model, "Madison square garden is located in the city of New",
                                        "_ _ _ _ _ _ _ _ _ _",
                                        sites="transformer.h.*", metric=lambda logits: logits[:, york])
        estimate.plot("attribution.png")
    """
    return _sweep(model, "attribution patching", _attribution_sweep, clean, corrupt, sites, positions, metric,
                  batch_size, progress, distributed, user_location())


def _attribution_sweep(model, sweep: _Sweep, batch_size: int | None, progress: bool, loc) -> _Tally:
    tally = _Tally(model, sweep, loc)
    n_pairs = len(sweep.pairs)
    per_pass = batch_size or max(1, rows_per_pass(model, max(len(c) for c, _ in sweep.pairs)) // 2)
    bar = _progress_bar(n_pairs, "attribution patching", progress)
    try:
        for start in range(0, n_pairs, per_pass):
            ks = list(range(start, min(start + per_pass, n_pairs)))
            _attribution_pass(model, sweep, ks, tally)
            if bar is not None:
                bar.update(len(ks))
    finally:
        if bar is not None:
            bar.close()
    return tally


def _attribution_pass(model, sweep: _Sweep, ks: list[int], tally: _Tally) -> None:
    """One forward pass of pairs ``ks`` (rows: clean, corrupt, clean, corrupt, ...) and one backward."""
    hf = model._model
    batch = left_pad([ids for k in ks for ids in sweep.pairs[k]], model.pad_token_id, model.device)
    captured: dict[str, torch.Tensor] = {}

    def capture(path: str):
        def hook(module, args, output):
            captured[path] = _element0(output)
        return hook

    def track(module, args, output):
        # with frozen weights nothing would need a gradient: the embeddings then start the graph
        return output if output.requires_grad else output.detach().requires_grad_()

    handles = []
    try:
        handles.append(hf.get_input_embeddings().register_forward_hook(track))
        for site in sweep.sites:
            handles.append(hf.get_submodule(site.path).register_forward_hook(capture(site.path)))
        kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
        if "position_ids" in model.site_graph("forward").input_names:
            kwargs["position_ids"] = batch.position_ids
        with torch.enable_grad():
            logits = hf(**kwargs).logits[:, -1]
            values = tally.unpatched(ks, logits[0::2], logits[1::2])
            # rows do not interact, so one backward of the sum gives each corrupt row its own gradient
            total = torch.stack([v[1] for v in values]).sum()
            acts = [captured[s.path] for s in sweep.sites]
            grads = torch.autograd.grad(total, acts, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    width = batch.input_ids.shape[1]
    for i, (act, grad) in enumerate(zip(acts, grads)):
        act = act.detach()
        for r, k in enumerate(ks):
            at = [width - len(sweep.pairs[k][0]) + p for p in sweep.positions[k]]
            if grad is None:  # the metric does not depend on this site
                tally.scores[k, i] = 0.0
                continue
            delta = act[2 * r, at] - act[2 * r + 1, at]
            tally.scores[k, i] = (delta * grad[2 * r + 1, at]).flatten(1).sum(-1).float().cpu()


__all__ = ["ACTIVATION_BUDGET_BYTES", "MAX_ROWS_PER_PASS", "Metric", "MissingDependencyError", "PatchingResult",
           "activation_patching", "attribution_patching", "rows_per_pass"]
