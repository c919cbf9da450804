"""Patching sweeps (``fxpatch.patching``) against independent references.

Activation patching is checked against a loop of plain Hugging Face runs, one per cell,
with an ordinary forward hook writing the clean value (``tests/reference.py``);
attribution patching against ``torch.autograd`` on the plain model, one prompt at a time.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

import pytest
import torch

from fxpatch.errors import InputError, MissingDependencyError, ModulePathError
from fxpatch.patching import activation_patching, attribution_patching
from tests.conftest import PROMPT_1, PROMPT_2, assert_state_unchanged, module_calls, state
from tests.reference import element, paths, run_alone, token_ids

# 10 tokens each; the first two tokens ("Madison square") are the same, so positions 0 and 1
# lie in the common prefix, which the sweep does not run (their score is the corrupt metric).
CLEAN = PROMPT_1  # "Madison square garden is located in the city of New"
CORRUPT = "Madison square house is located in the town of New"
# a second pair of 9 tokens: pairs of different lengths share passes left-padded
CLEAN_2, CORRUPT_2 = "The Louvre is located in the city of New", "_ _ _ _ _ _ _ _ _"
YORK, UNDERSCORE = 308, 257  # " York", " _"


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, YORK] - logits[:, UNDERSCORE]


def first(value):
    return value[0] if isinstance(value, tuple) else value


def reference_grid(lm, clean: str, corrupt: str, sites: list[str], positions: list[int], metric=logit_diff):
    """One plain HF run per cell: the corrupt prompt with ``output[:, p] = clean_output[:, p]`` by a hook."""
    clean_run = run_alone(lm, clean, capture=sites)
    grid = torch.empty(len(sites), len(positions))
    for i, site in enumerate(sites):
        value = first(clean_run.outputs[site])
        for j, p in enumerate(positions):
            def put(x, value=value, p=p):
                x = x.clone()
                x[:, p] = value[:, p]
                return x
            edit = element(0, put) if isinstance(clean_run.outputs[site], tuple) else put
            grid[i, j] = metric(run_alone(lm, corrupt, outputs={site: edit}).logits[-1:])[0]
    # on the CPU, as the sweep hands its scores over
    return grid, metric(clean_run.logits[-1:])[0].cpu(), metric(run_alone(lm, corrupt).logits[-1:])[0].cpu()


def two_sites(lm) -> list[str]:
    """Two layers: a decoder block's output (a tensor) and an attention module's (a tuple)."""
    p = paths(lm)
    return [p.layer(0), p.attn(1)]


_SWEEPS: dict = {}


def sweep(lm):
    """The activation sweep of ``two_sites`` at positions 1 (common prefix), 4 and -1, computed once."""
    key = id(lm)
    if key not in _SWEEPS:
        before = state(lm)
        _SWEEPS[key] = activation_patching(lm, CLEAN, CORRUPT, two_sites(lm), positions=[1, 4, -1],
                                           metric=logit_diff, progress=False)
        assert_state_unchanged(lm, before)
    return _SWEEPS[key]


# -- activation patching ----------------------------------------------------------------------------
def test_activation_patching_matches_one_hf_run_per_cell(lm):
    result = sweep(lm)
    ref, ref_clean, ref_corrupt = reference_grid(lm, CLEAN, CORRUPT, two_sites(lm), [1, 4, 9])
    assert (ref - ref_corrupt).abs().max() > 1e-3  # the patches change the metric: the comparison means something
    torch.testing.assert_close(result.scores, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.clean, ref_clean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.corrupt, ref_corrupt, rtol=1e-4, atol=1e-4)
    assert result.sites == two_sites(lm)
    assert result.positions == [1, 4, 9]
    assert result.tokens == [lm.tokenizer.decode([t]) for t in token_ids(lm, CLEAN)]


def test_default_metric_is_the_logit_of_the_clean_top_token(gpt2):
    result = attribution_patching(gpt2, CLEAN, CORRUPT, two_sites(gpt2), progress=False)
    # the tiny GPT-2 continues CLEAN with " York"
    ref = reference_attribution(gpt2, CLEAN, CORRUPT, two_sites(gpt2), metric=lambda logits: logits[:, YORK])
    torch.testing.assert_close(result.scores, ref, rtol=1e-4, atol=1e-5)
    assert result.metric_name == "logit of ' York'"


def test_prompt_pairs_in_one_pass_and_in_chunks(gpt2):
    """Two pairs of different lengths; once all in one trace, once in passes of 3 patched runs."""
    sites, positions = ["transformer.h.0", "transformer.h.2.mlp"], [0, -2, -1]
    refs = [reference_grid(gpt2, c, x, sites, positions) for c, x in ((CLEAN, CORRUPT), (CLEAN_2, CORRUPT_2))]
    for batch_size in (None, 3):
        misses = gpt2.cache_info().misses
        result = activation_patching(gpt2, [CLEAN, CLEAN_2], [CORRUPT, CORRUPT_2], sites, positions=positions,
                                     metric=logit_diff, batch_size=batch_size, progress=False)
        if batch_size == 3:
            # 10 cells (2 lie in the first pair's common prefix), 5 per site: 2 clean/corrupt passes of one
            # pair (one graph) and per site passes of 3 and 2 rows (a graph per site and row count: 4)
            assert gpt2.cache_info().misses - misses <= 5
        assert result.scores.shape == (2, 2, 3)
        torch.testing.assert_close(result.scores, torch.stack([r[0] for r in refs]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(result.clean, torch.stack([r[1] for r in refs]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(result.corrupt, torch.stack([r[2] for r in refs]), rtol=1e-4, atol=1e-4)
        assert result.positions == positions  # the pairs differ in length: positions stay as given
        assert [len(t) for t in result.tokens] == [10, 9]
    # the mean over pairs is what the table shows by default, one pair on request
    assert "transformer.h.2.mlp" in result.table()
    mean_row = [float(v) for v in result.table().splitlines()[2].split("|")[2:-1]]
    torch.testing.assert_close(torch.tensor(mean_row), result.scores.mean(0)[0], atol=1e-3, rtol=0)
    pair_row = [float(v) for v in result.table(pair=1).splitlines()[3].split("|")[2:-1]]
    torch.testing.assert_close(torch.tensor(pair_row), result.scores[1, 1], atol=1e-3, rtol=0)


def test_glob_sites_expand_in_model_order(gpt2):
    result = activation_patching(gpt2, CLEAN, CORRUPT, "transformer.h.*", positions=[-1], metric=logit_diff,
                                 progress=False)
    assert result.sites == [f"transformer.h.{i}" for i in range(4)]
    ref, _, _ = reference_grid(gpt2, CLEAN, CORRUPT, result.sites, [9])
    torch.testing.assert_close(result.scores, ref, rtol=1e-4, atol=1e-4)
    both = attribution_patching(gpt2, CLEAN, CORRUPT, ["transformer.h.[02].attn", "transformer.h.0.attn"],
                                positions=[-1], metric=logit_diff, progress=False)
    assert both.sites == ["transformer.h.0.attn", "transformer.h.2.attn"]  # each site once


def _layers_computed(graph: torch.fx.GraphModule) -> set[int]:
    """The decoder layers whose weights a rewritten graph uses: parameter inputs, or parameters taken out
    of its state input, that have users, in its own nodes and in the segments it calls."""
    used = set()
    for node in graph.graph.nodes:
        if node.op == "call_module":
            for segment in getattr(graph.get_submodule(node.target), "segments", ()):
                used |= _layers_computed(segment)
        found = re.search(r"_(?:h|layers)_(\d+)_", node.name) if node.op in ("placeholder", "call_function") else None
        if found and node.users:
            used.add(int(found.group(1)))
    return used


def test_residual_sweep_over_every_layer_and_position_runs_no_layer_below_the_patch(lm):
    """Every layer's output at every position, against one HF run per cell; the pass patching layer ``i``
    gets layer ``i``'s output whole and skips it, so its graph computes layers ``i + 1`` and up only."""
    from fxpatch import LanguageModel

    fresh = LanguageModel(lm._model, tokenizer=lm.tokenizer)  # its own graph cache, the same weights
    p = paths(lm)
    sites = [p.layer(i) for i in range(p.n_layers)]
    result = activation_patching(fresh, CLEAN, PROMPT_2, f"{p.layers}.*", metric=logit_diff, progress=False)
    ref, ref_clean, ref_corrupt = reference_grid(lm, CLEAN, PROMPT_2, sites, list(range(10)))
    assert (ref - ref_corrupt).abs().max() > 1e-3
    torch.testing.assert_close(result.scores, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.clean, ref_clean, rtol=1e-4, atol=1e-4)
    # the clean/corrupt pass computes every layer; the pass patching layer i, layers above i only
    computed = sorted((sorted(_layers_computed(gm)) for fps in fresh._patched._graphs.values() for _, gm in fps),
                      key=len, reverse=True)
    assert computed == [list(range(i + 1, p.n_layers)) for i in range(-1, p.n_layers)]


def test_sites_at_and_after_the_final_norm_match_one_hf_run_per_cell(lm):
    """The patched passes apply the output layer to its input at the last position themselves, except
    for a patch of the output layer itself, whose patched logits are read."""
    p = paths(lm)
    sites = [p.layer(p.n_layers - 1), p.norm, p.head]
    result = activation_patching(lm, CLEAN, PROMPT_2, sites, positions=[3, -1], metric=logit_diff,
                                 progress=False)
    ref, _, ref_corrupt = reference_grid(lm, CLEAN, PROMPT_2, sites, [3, 9])
    assert (ref[:, 1] - ref_corrupt).abs().min() > 1e-3  # each site's last position changes the metric
    torch.testing.assert_close(result.scores, ref, rtol=1e-4, atol=1e-4)


def test_logits_that_are_not_the_output_layer_of_its_input_are_read_whole(gpt2):
    """A model that scales its logits after the output layer (as soft-capping models do): the unpatched runs
    find that the layer applied to its input is not the logits, so the patched passes read the logits."""
    from transformers import GPT2LMHeadModel

    from fxpatch import LanguageModel

    class Scaled(GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 30 * torch.tanh(out.logits / 30)
            return out

    scaled = Scaled(gpt2._model.config).eval()
    scaled.load_state_dict(gpt2._model.state_dict())
    lm = LanguageModel(scaled, tokenizer=gpt2.tokenizer)
    sites = ["transformer.h.1", "transformer.h.3"]
    result = activation_patching(lm, CLEAN, PROMPT_2, sites, positions=[2, -1], metric=logit_diff, progress=False)
    ref, _, ref_corrupt = reference_grid(lm, CLEAN, PROMPT_2, sites, [2, 9])
    assert (ref - ref_corrupt).abs().max() > 1e-3
    torch.testing.assert_close(result.scores, ref, rtol=1e-4, atol=1e-4)


# -- attribution patching ---------------------------------------------------------------------------
def reference_attribution(lm, clean: str, corrupt: str, sites: list[str], metric=logit_diff) -> torch.Tensor:
    """``(clean - corrupt) . d metric / d activation`` with plain autograd, each prompt run alone."""
    model = lm._model
    clean_run = run_alone(lm, clean, capture=sites)
    acts: dict[str, torch.Tensor] = {}

    def keep(site):
        def hook(module, args, output):
            acts[site] = first(output)
            acts[site].retain_grad()
        return hook

    handles = [model.get_submodule(s).register_forward_hook(keep(s)) for s in sites]
    try:
        with torch.enable_grad():
            ids = torch.tensor([token_ids(lm, corrupt)], device=lm.device)
            logits = model(input_ids=ids, use_cache=False).logits
            metric(logits[:, -1])[0].backward(inputs=[acts[s] for s in sites])
    finally:
        for h in handles:
            h.remove()
    return torch.stack([((first(clean_run.outputs[s]) - acts[s].detach()) * acts[s].grad)[0].sum(-1)
                        for s in sites]).cpu()


def test_attribution_patching_matches_autograd(lm):
    before = state(lm)
    sites = two_sites(lm)
    result = attribution_patching(lm, CLEAN, CORRUPT, sites, metric=logit_diff, progress=False)
    ref = reference_attribution(lm, CLEAN, CORRUPT, sites)
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(result.scores, ref, rtol=1e-4, atol=1e-5)
    assert result.scores.shape == (2, 10) and result.positions == list(range(10))
    torch.testing.assert_close(result.corrupt, sweep(lm).corrupt, rtol=1e-4, atol=1e-4)
    assert_state_unchanged(lm, before)
    assert all(p.grad is None for p in lm._model.parameters())


def test_attribution_with_pairs_matches_autograd_per_pair(gpt2):
    sites = ["transformer.h.1", "transformer.h.3.mlp"]
    result = attribution_patching(gpt2, [CLEAN, CLEAN_2], [CORRUPT, CORRUPT_2], sites, positions=[0, -1],
                                  metric=logit_diff, progress=False)
    for k, (c, x) in enumerate(((CLEAN, CORRUPT), (CLEAN_2, CORRUPT_2))):
        ref = reference_attribution(gpt2, c, x, sites)
        n = ref.shape[1]
        torch.testing.assert_close(result.scores[k], ref[:, [0, n - 1]], rtol=1e-4, atol=1e-5)


def test_attribution_is_activation_patching_where_the_metric_is_linear(gpt2):
    """The final norm's output and the logits reach a logit difference linearly: the estimate is exact."""
    sites = ["transformer.ln_f", "lm_head"]
    act = activation_patching(gpt2, CLEAN, PROMPT_2, sites, metric=logit_diff, progress=False)
    att = attribution_patching(gpt2, CLEAN, PROMPT_2, sites, metric=logit_diff, progress=False)
    assert (act.scores - act.corrupt).abs().max() > 1.0
    torch.testing.assert_close(att.scores, act.scores - act.corrupt, rtol=1e-4, atol=1e-3)


def test_attribution_ranks_cells_like_activation_patching(gpt2):
    """Through the layers the estimate is first order only; on the tiny GPT-2 it still orders the
    attention and MLP cells as activation patching does (Spearman rank correlation above 0.7)."""
    sites = ["transformer.h.*.attn", "transformer.h.*.mlp"]
    act = activation_patching(gpt2, CLEAN, PROMPT_2, sites, metric=logit_diff, progress=False)
    att = attribution_patching(gpt2, CLEAN, PROMPT_2, sites, metric=logit_diff, progress=False)

    def ranks(x):
        return x.flatten().argsort().argsort().float()

    rho = torch.corrcoef(torch.stack([ranks(act.scores - act.corrupt), ranks(att.scores)]))[0, 1]
    assert rho > 0.7, rho


# -- plot, table, progress ----------------------------------------------------------------------------
def test_plot_writes_a_png_with_labelled_axes(gpt2, tmp_path):
    pytest.importorskip("matplotlib")
    result = sweep(gpt2)
    path = tmp_path / "grid.png"
    fig = result.plot(str(path))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert ax.get_xlabel() == "position: clean token" and ax.get_ylabel() == "site"
    assert [t.get_text() for t in ax.get_yticklabels()] == result.sites
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1: ' square'", "4: ' located'", "9: ' New'"]
    assert ax.get_title() == "activation patching: logit_diff"
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "logit_diff"  # the colorbar
    torch.testing.assert_close(torch.tensor(ax.images[0].get_array().data), result.scores)


def test_table_has_a_row_per_site(gpt2):
    result = sweep(gpt2)
    lines = result.table().splitlines()
    assert "1: ' square'" in lines[0] and "9: ' New'" in lines[0]
    for i, (site, line) in enumerate(zip(result.sites, lines[2:])):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == site
        torch.testing.assert_close(torch.tensor([float(c) for c in cells[1:]]), result.scores[i], atol=1e-3, rtol=0)


def test_plot_without_matplotlib_says_how_to_install_it(gpt2, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError) as info:
        sweep(gpt2).plot()  # line: plot
    assert str(info.value).startswith(f"{os.path.abspath(__file__)}:{_line_of('# line: plot')}:")
    assert "pip install 'fxpatch[plot]'" in str(info.value)


def test_progress_bar_when_tqdm_is_installed_and_none_without_it(gpt2, capsys, monkeypatch):
    pytest.importorskip("tqdm")
    kwargs = dict(positions=[1, 4, -1], metric=logit_diff)
    with_bar = activation_patching(gpt2, CLEAN, CORRUPT, two_sites(gpt2), progress=True, **kwargs)
    assert re.search(r"activation patching: 100%.*6/6", capsys.readouterr().err)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    without = activation_patching(gpt2, CLEAN, CORRUPT, two_sites(gpt2), progress=True, **kwargs)
    assert capsys.readouterr().err == ""
    torch.testing.assert_close(without.scores, with_bar.scores)


# -- errors -------------------------------------------------------------------------------------------
def _line_of(marker: str) -> int:
    lines = open(__file__, encoding="utf-8").read().splitlines()
    hits = [i + 1 for i, text in enumerate(lines) if text.rstrip().endswith(marker)]
    assert len(hits) == 1, hits
    return hits[0]


@contextlib.contextmanager
def refused(lm, error_type, marker: str, *words: str):
    """The error is ``error_type`` at this file's line ending with ``marker``, says ``words``, and no module ran."""
    lm.site_graph("forward")  # exported before runs are counted
    before = state(lm)
    with module_calls() as calls, pytest.raises(error_type) as info:
        yield
    message = str(info.value)
    assert message.startswith(f"{os.path.abspath(__file__)}:{_line_of(marker)}:"), message
    for word in words:
        assert word in message, (word, message)
    assert not calls, "the model ran before the error"
    assert_state_unchanged(lm, before)


def test_clean_and_corrupt_of_different_lengths_are_refused(gpt2):
    with refused(gpt2, InputError, "# line: lengths", "10 tokens", "has 9", "same number of tokens"):
        activation_patching(gpt2, CLEAN, CORRUPT_2, "transformer.h.0")  # line: lengths
    with refused(gpt2, InputError, "# line: attribution lengths", "10 tokens", "has 9", "(pair 1)"):
        attribution_patching(gpt2, [CLEAN, CLEAN], [CORRUPT, CORRUPT_2], "transformer.h.0")  # line: attribution lengths
    with refused(gpt2, InputError, "# line: pairs", "clean is a list of 2 prompts but corrupt is a list of 1 prompt"):
        activation_patching(gpt2, [CLEAN, CLEAN_2], [CORRUPT], "transformer.h.0")  # line: pairs


def test_unknown_sites_are_refused_with_the_closest_names(gpt2):
    with refused(gpt2, ModulePathError, "# line: unknown", "no module 'transformer.h.0.atn'", "transformer.h.0.attn"):
        activation_patching(gpt2, CLEAN, CORRUPT, ["transformer.h.0", "transformer.h.0.atn"])  # line: unknown
    with refused(gpt2, ModulePathError, "# line: glob", "'transformer.layers.*'"):
        attribution_patching(gpt2, CLEAN, CORRUPT, "transformer.layers.*")  # line: glob


def test_a_site_whose_first_dim_is_not_the_batch_is_refused(opt):
    """OPT's ``fc1`` output is (rows * tokens, 128): no batch or token dim to patch a position of."""
    with refused(opt, InputError, "# line: flattened", "'model.decoder.layers.0.fc1'", "first dim is not the batch",
                 "(batch, tokens, ...)"):
        activation_patching(opt, CLEAN, CORRUPT, "model.decoder.layers.*.fc1")  # line: flattened


def test_bad_positions_and_metrics_are_refused(gpt2):
    with refused(gpt2, InputError, "# line: position", "position 10 is out of range", "10 tokens"):
        activation_patching(gpt2, CLEAN, CORRUPT, "transformer.h.0", positions=[0, 10])  # line: position
    with refused(gpt2, InputError, "# line: all positions", "different numbers of tokens (10, 9)"):
        activation_patching(gpt2, [CLEAN, CLEAN_2], [CORRUPT, CORRUPT_2], "transformer.h.0")  # line: all positions
    with refused(gpt2, InputError, "# line: metric", "metric returned shape ()", "shape (3,)"):
        activation_patching(gpt2, CLEAN, CORRUPT, "transformer.h.0", metric=lambda x: x.sum())  # line: metric
