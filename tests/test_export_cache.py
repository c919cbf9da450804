"""The exported site graphs on disk (``fxpatch/export_cache.py``).

A second ``LanguageModel`` of the same model loads its site graphs instead of exporting (``torch.export.export``
is made to raise), and the loaded graphs are the exported ones: node for node (names, targets, arguments, shapes
of every value, site records) and in what they compute (a patching program and a generation, compared with the
freshly exported model's results and with the plain HF model). An entry made for another config or dtype is a
miss; a truncated, corrupt, stale, tampered or untrusted entry is exported again and replaced; two processes
writing the same entry at once, while this one reads it, leave a whole entry. Every test uses its own
``tmp_path`` cache directory (the session's default one is a temporary directory too: ``tests/conftest.py``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import fxpatch
import fxpatch.model
from fxpatch import LanguageModel, export_cache
from fxpatch.errors import InputError
from tests.conftest import PROMPT_1, PROMPT_2, layers, tiny_llama
from tests.reference import run_alone

MODES = ("forward", "prefill", "decode")
SECOND = "The Eiffel Tower is in Paris"


def make(arch: str, cache_dir, tokenizer=None, **kwargs) -> LanguageModel:
    if arch == "gpt2":
        return LanguageModel(AutoModelForCausalLM.from_pretrained(fxpatch.TINY_GPT2), cache_dir=cache_dir, **kwargs)
    return LanguageModel(tiny_llama(len(tokenizer)), tokenizer=tokenizer, cache_dir=cache_dir, **kwargs)


@pytest.fixture
def no_export(monkeypatch):
    """``torch.export.export`` raises: what runs under this loads every graph or fails."""
    monkeypatch.setattr(torch.export, "export", _refuse)


@pytest.fixture
def exports(monkeypatch) -> list[str]:
    """The ``torch.export.export`` calls made while the test runs (entry class names)."""
    calls: list[str] = []
    real = torch.export.export

    def counting(entry, *args, **kwargs):
        calls.append(type(entry).__name__)
        return real(entry, *args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counting)
    return calls


def entries(cache_dir: Path) -> list[Path]:
    folder = cache_dir / "exports"
    return sorted(folder.iterdir()) if folder.exists() else []


IDS = torch.tensor([[1, 2, 3, 4, 5, 6]])


def one_layer(cache_dir, eps: float = 1e-5) -> LanguageModel:
    """A one-layer random GPT-2 (the same weights each time): quick to export."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64, layer_norm_epsilon=eps)
    return LanguageModel(GPT2LMHeadModel(config).eval(), tokenizer=None, cache_dir=cache_dir)


def logits(lm: LanguageModel) -> torch.Tensor:
    with lm.trace({"input_ids": IDS}):
        out = lm.lm_head.output.save()
    return out


def plain_logits(lm: LanguageModel) -> torch.Tensor:
    with torch.no_grad():
        return lm._model(IDS.to(lm.device), use_cache=False).logits


# -- what a loaded graph is ------------------------------------------------------------------------------------------
def norm(a):
    if isinstance(a, torch.fx.Node):
        return ("node", a.name)
    if isinstance(a, (list, tuple)):
        return (type(a) is tuple, tuple(norm(x) for x in a))
    if isinstance(a, dict):
        return ("dict", tuple((k, norm(v)) for k, v in a.items()))
    return (type(a).__name__, a)


def described(v):
    """A node value as the passes see it: shapes and strides as expressions, dtype, device."""
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(str(d) for d in v.shape), tuple(str(d) for d in v.stride()), v.dtype, v.device,
                v.requires_grad, type(v).__name__)
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return (type(v).__name__, str(v.node.expr))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(described(x) for x in v))
    return v


def assert_same_site_graph(fresh, loaded) -> None:
    a, b = list(fresh.graph_module.graph.nodes), list(loaded.graph_module.graph.nodes)
    assert [(n.op, n.name) for n in a] == [(n.op, n.name) for n in b]
    for x, y in zip(a, b):
        assert x.target is y.target or (x.op != "call_function" and x.target == y.target), x.format_node()
        assert norm(x.args) == norm(y.args) and norm(x.kwargs) == norm(y.kwargs), x.format_node()
        assert described(x.meta.get("val")) == described(y.meta.get("val")), x.format_node()
        for key in ("stack_trace", "nn_module_stack", "torch_fn"):
            assert x.meta.get(key) == y.meta.get(key)
    assert [k for k, _ in fresh.state] == [k for k, _ in loaded.state]
    for (kind, x), (_, y) in zip(fresh.state, loaded.state):
        if kind == "constant":
            assert x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
        else:
            assert x == y
    assert (fresh.inputs, fresh.outputs, fresh.input_names) == (loaded.inputs, loaded.outputs, loaded.input_names)
    assert fresh.modules == loaded.modules and fresh.calls == loaded.calls and fresh.aliases == loaded.aliases


def patched(lm: LanguageModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two invokes: PROMPT_1's last layer-0 MLP output patched into SECOND's last position (scaled), and a
    single-prompt run that scales position 1; logits of all three rows."""
    mlp = layers(lm)[0][0].mlp
    with lm.trace() as tracer:
        with tracer.invoke(PROMPT_1):
            source = mlp.output[:, -1]
            a = lm.lm_head.output.save()
        with tracer.invoke(SECOND):
            mlp.output[:, -1] = source * 0.5
            b = lm.lm_head.output.save()
    with lm.trace(PROMPT_2):
        mlp.output[:, 1] = mlp.output[:, 1] * 3.0
        c = lm.lm_head.output.save()
    return a, b, c


def generated(lm: LanguageModel) -> torch.Tensor:
    with lm.generate(max_new_tokens=3) as tracer:
        with tracer.invoke(PROMPT_1):
            layers(lm)[0][0].mlp.output[:, -1] = 0
            out = lm.generator.output.save()
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_second_model_loads_the_graphs_an_export_wrote(arch, tokenizer, tmp_path, monkeypatch):
    fresh = make(arch, tmp_path, tokenizer)
    graphs = {mode: fresh.site_graph(mode) for mode in MODES}
    assert all(sg.loaded_from is None for sg in graphs.values())
    assert len(entries(tmp_path)) == 3

    monkeypatch.setattr(torch.export, "export", _refuse)
    loaded = make(arch, tmp_path, tokenizer)
    for mode in MODES:
        sg = loaded.site_graph(mode)
        assert sg.loaded_from in {str(p) for p in entries(tmp_path)}
        assert_same_site_graph(graphs[mode], sg)

    # the same values as the exported graphs give, and as the plain HF model gives
    want, got = patched(fresh), patched(loaded)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    mlp = f"{'transformer.h' if arch == 'gpt2' else 'model.layers'}.0.mlp"

    def scale_1(out):
        out = out.clone()
        out[:, 1] = out[:, 1] * 3.0
        return out

    torch.testing.assert_close(got[2][0], run_alone(loaded, PROMPT_2, outputs={mlp: scale_1}).logits,
                               rtol=1e-4, atol=1e-4)
    assert torch.equal(generated(loaded), generated(fresh))
    # .source: the sites on the tuple the attention's forward unpacks (attention_interface_1) are in the entry
    heads = []
    for lm in (fresh, loaded):
        attn = layers(lm)[0][0].attn if arch == "gpt2" else layers(lm)[0][0].self_attn
        with lm.trace(PROMPT_1):
            heads.append(attn.source.attention_interface_1.output[0].save())
    assert heads[0].dim() == 4 and torch.equal(heads[0], heads[1])
    assert len(entries(tmp_path)) == 3


def test_a_shared_block_model_loads_with_its_aliases_and_later_calls(tokenizer, tmp_path, monkeypatch):
    """A block reachable by two paths and run twice: the site records of every call and the alias paths are
    the same after a load, and a read of the second call gives the plain model's value."""
    def shared():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64))
        model.transformer.h[1] = model.transformer.h[0]
        return LanguageModel(model.eval(), tokenizer=tokenizer, cache_dir=tmp_path)

    fresh = shared()
    graph = fresh.site_graph("forward")
    monkeypatch.setattr(torch.export, "export", _refuse)
    loaded = shared()
    sg = loaded.site_graph("forward")
    assert sg.loaded_from is not None and sg.aliases["transformer.h.1"] == "transformer.h.0"
    assert_same_site_graph(graph, sg)
    assert sg.calls["transformer.h.1"]["output"][1].leaves == ["transformer.h.0.output#1"]

    def read(lm):
        with lm.trace(PROMPT_1):
            first = lm.transformer.h[1].output.save()  # an alias: the block's first call, as NNsight has it
            later = lm.lm_head.output.save()
        return first, later

    got, want = read(loaded), read(fresh)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    calls = []  # plain torch: every call of the block, in order
    handle = loaded._model.transformer.h[0].register_forward_hook(lambda m, a, o: calls.append(o.detach().clone()))
    try:
        with torch.no_grad():
            ids = torch.tensor([loaded.tokenizer(PROMPT_1)["input_ids"]])
            logits = loaded._model(ids, use_cache=False).logits  # one cache layer would serve both calls
    finally:
        handle.remove()
    assert len(calls) == 2
    torch.testing.assert_close(got[0], calls[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], logits, rtol=1e-5, atol=1e-5)


def _refuse(*args, **kwargs):
    raise AssertionError("torch.export.export was called")


# -- misses ----------------------------------------------------------------------------------------------------------
def test_another_config_or_dtype_is_a_miss(tmp_path, exports):
    """The layer norms' epsilon is a constant in the graph: a model that differs only there must export
    (a wrongly shared graph would give the first model's logits); so must the same model in float64."""
    small, large = one_layer(tmp_path, 1e-5), one_layer(tmp_path, 10.0)
    got_small, got_large = logits(small), logits(large)
    assert exports == ["_Forward", "_Forward"] and len(entries(tmp_path)) == 2
    assert small.site_graph().loaded_from is None and large.site_graph().loaded_from is None
    torch.testing.assert_close(got_small, plain_logits(small), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_large, plain_logits(large), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got_small, got_large, atol=1e-3)
    again = one_layer(tmp_path, 10.0)
    torch.testing.assert_close(logits(again), got_large, rtol=0, atol=0)
    assert again.site_graph().loaded_from is not None and len(exports) == 2
    double = one_layer(tmp_path, 10.0).double()
    torch.testing.assert_close(logits(double), plain_logits(double), rtol=1e-10, atol=1e-10)
    assert len(exports) == 3 and len(entries(tmp_path)) == 3


def test_a_model_with_hooks_of_its_own_is_never_cached(tmp_path, exports):
    """A user's forward hook is traced into the export, and no key can name it: nothing is written for such a
    model, and the hook-free model after it exports again rather than reading a hooked graph."""
    hooked = one_layer(tmp_path)
    handle = hooked._model.transformer.h[0].mlp.register_forward_hook(lambda m, a, o: o * 2)
    try:
        with pytest.warns(UserWarning, match="hooks of your own on transformer.h.0.mlp"):
            hooked.site_graph("forward")
    finally:
        handle.remove()
    assert entries(tmp_path) == [] and exports == ["_Forward"]
    plain = one_layer(tmp_path)
    torch.testing.assert_close(logits(plain), plain_logits(plain), rtol=1e-5, atol=1e-5)
    assert exports == ["_Forward"] * 2 and len(entries(tmp_path)) == 1


# -- broken entries --------------------------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the compressed entry: its CRC no longer matches
    path.write_bytes(bytes(data))


def rewrite(path: Path, change) -> None:
    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    changed = change(members["entry.json"].decode())
    assert changed != members["entry.json"].decode(), "the damage must change the entry"
    members["entry.json"] = changed.encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def stale(path: Path) -> None:
    def older_torch(text):  # the entry another torch wrote: its key differs in the torch version only
        entry = json.loads(text)
        key = json.loads(entry["key"])
        key["versions"]["torch"] = "2.0.0"
        entry["key"] = json.dumps(key, sort_keys=True, separators=(",", ":"))
        return json.dumps(entry)
    rewrite(path, older_torch)


def another_format(path: Path) -> None:
    rewrite(path, lambda text: text.replace(f'"format":{export_cache.FORMAT}', '"format":999', 1))


def tampered_target(path: Path) -> None:
    # a node that would call eval: only registered operators and listed functions resolve
    rewrite(path, lambda text: text.replace('{"fn":"operator.getitem"}', '{"fn":"builtins.eval"}', 1)
            if '"operator.getitem"' in text else text.replace('["aten","add","Tensor"]', '["builtins","eval","x"]', 1))


def tampered_expression(path: Path) -> None:
    rewrite(path, lambda text: text.replace('{"e":"sympy.core.mul.Mul"', '{"e":"sympy.core.sympify.sympify"', 1))


def writable_by_others(path: Path) -> None:
    path.chmod(0o666)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A whole entry for ``one_layer``'s forward graph, written once for the damage tests."""
    cache_dir = tmp_path_factory.mktemp("pristine")
    one_layer(cache_dir).site_graph("forward")
    (path,) = entries(cache_dir)
    return path


@pytest.mark.parametrize("damage", [truncate, garbage, flip_a_byte, stale, another_format, tampered_target,
                                    tampered_expression, writable_by_others], ids=lambda f: f.__name__)
def test_a_damaged_entry_is_exported_again_and_replaced(damage, pristine, tmp_path, exports):
    path = tmp_path / "exports" / pristine.name
    path.parent.mkdir()
    shutil.copyfile(pristine, path)
    path.chmod(0o600)
    damage(path)
    lm = one_layer(tmp_path)
    assert lm.site_graph("forward").loaded_from is None and exports == ["_Forward"]
    torch.testing.assert_close(logits(lm), plain_logits(lm), rtol=1e-5, atol=1e-5)
    # replaced by a whole entry of this user's that the next model reads
    assert entries(tmp_path) == [path] and path.stat().st_mode & 0o077 == 0
    assert one_layer(tmp_path).site_graph("forward").loaded_from == str(path) and exports == ["_Forward"]


# -- two writers at once -------------------------------------------------------------------------------------------
def forward_key(lm: LanguageModel) -> str:
    """The key of ``lm``'s forward export (the example ``LanguageModel`` exports with: 2 x 8 int64 tensors)."""
    from fxpatch.model import _Forward

    example = {k: torch.zeros(2, 8, dtype=torch.long) for k in ("input_ids", "attention_mask", "position_ids")}
    return export_cache.cache_key(lm._model, _Forward(lm._model, True), example, None, "model.")


def _writer(cache_dir: str, barrier, rounds: int) -> None:
    """In a spawned process: export ``one_layer`` (writing its entry) at the same time as the other writer,
    then write the entry ``rounds`` times more."""
    lm = one_layer(cache_dir)
    barrier.wait()
    sg = lm.site_graph("forward")
    parts = sg.cache_parts()
    for _ in range(rounds):
        export_cache.save(Path(cache_dir) / "exports", forward_key(lm), parts)


@pytest.mark.slow  # about a minute (compiling / two spawned exporting processes): run with -m slow
def test_two_processes_writing_at_once_leave_a_whole_entry(tmp_path, no_export):
    """Two spawned processes export and write the same entry over and over while this one reads it: every read
    of an existing file is a whole entry, and the entry left is read with no export."""
    lm = one_layer(tmp_path)
    key = forward_key(lm)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), barrier, 30)) for _ in range(2)]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs):
        if any(e.suffix == ".fxg" for e in entries(tmp_path)):
            assert export_cache.load(tmp_path / "exports", key) is not None, "a read saw a partial entry"
            reads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert [e.name for e in entries(tmp_path)] == [export_cache.entry_path(tmp_path / "exports", key).name]
    got = logits(lm)  # no_export: a load or a failure
    assert lm.site_graph().loaded_from is not None and reads > 0
    torch.testing.assert_close(got, plain_logits(lm), rtol=1e-5, atol=1e-5)


def test_a_directory_keeps_its_most_recently_used_entries(tmp_path, monkeypatch, exports):
    monkeypatch.setattr(export_cache, "MAX_ENTRIES", 2)
    a, b = one_layer(tmp_path, 1e-5), one_layer(tmp_path, 1e-3)
    a.site_graph(), b.site_graph()
    folder = tmp_path / "exports"
    path_a, path_b = (export_cache.entry_path(folder, forward_key(m)) for m in (a, b))
    assert entries(tmp_path) == sorted([path_a, path_b])
    assert export_cache.load(folder, forward_key(a)) is not None  # a is now used more recently than b
    left = tmp_path / "exports" / ".dead-writer.tmp"
    left.write_bytes(b"half an entry")
    os.utime(left, (0, 0))
    one_layer(tmp_path, 1e-1).site_graph()  # a third entry: b, the least recently used, goes
    assert len(exports) == 3 and path_a in entries(tmp_path) and not path_b.exists() and not left.exists()
    assert len(entries(tmp_path)) == 2


# -- where -----------------------------------------------------------------------------------------------------------
def test_the_cache_directory_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("FXPATCH_CACHE_DIR", str(tmp_path / "env"))
    assert export_cache.default_cache_dir() == tmp_path / "env"
    assert export_cache.entries_dir(None) == tmp_path / "env" / "exports"
    assert export_cache.entries_dir(tmp_path / "mine") == tmp_path / "mine" / "exports"
    assert export_cache.entries_dir(False) is None
    monkeypatch.delenv("FXPATCH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert export_cache.default_cache_dir() == tmp_path / "xdg" / "fxpatch"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert export_cache.default_cache_dir() == tmp_path / "home" / ".cache" / "fxpatch"


def test_cache_dir_false_writes_nothing(tmp_path, monkeypatch, exports):
    monkeypatch.setenv("FXPATCH_CACHE_DIR", str(tmp_path))
    for _ in range(2):
        lm = one_layer(False)
        assert lm.site_graph("forward").loaded_from is None
    assert list(tmp_path.iterdir()) == [] and exports == ["_Forward"] * 2


def test_the_test_session_writes_no_cache_into_home():
    home = Path.home().resolve()
    assert home not in export_cache.default_cache_dir().resolve().parents


@pytest.mark.parametrize("bad", [True, 3, ["dir"]])
def test_a_bad_cache_dir_is_refused_at_the_users_line(bad):
    with pytest.raises(InputError, match=r"test_export_cache.py:\d+: cache_dir=.* is not a directory"):
        LanguageModel(fxpatch.TINY_GPT2, cache_dir=bad)
