"""``TransformersModel`` (and its older name ``LanguageModel``): a Hugging Face causal LM wrapped
for batched interventions.

Example::

    from fxpatch import TINY_GPT2, TransformersModel
    model = TransformersModel(TINY_GPT2, task="text-generation")
    with model.trace("Madison square garden is located in the city of New"):
        logits = model.lm_head.output.save()
    print(model.tokenizer.decode(logits[0, -1].argmax()))   # ' York'
"""

from __future__ import annotations

import inspect
import os
import threading
from collections import OrderedDict, namedtuple
from collections.abc import Callable, Hashable, Mapping
from operator import getitem
from typing import Any

import torch

from .aliases import bind_aliases
from .envoy import Envoy
from .errors import FxpatchError, InputError, user_location
from .export import TRACING_LOCK, SiteGraph, export_sites
from .inputs import NO_INPUTS
from .passes.functionalize_program import forget_source
from .tracing import Tracer
from .watch import model_fingerprint, watch_of

DEFAULT_CACHE_SIZE = 64
"""Rewritten graphs a ``LanguageModel`` keeps by default: each holds a copy of the exported graph, about
2.5 MB for GPT-2 small (1,000 nodes), 4.4 MB for a 32-layer Llama-shaped one (3,600 nodes)."""


class _Forward(torch.nn.Module):
    """The forward run mode: logits for a left-padded batch."""

    def __init__(self, model: torch.nn.Module, position_ids: bool):
        super().__init__()
        self.model = model
        self.position_ids = position_ids

    def forward(self, input_ids, attention_mask, position_ids=None):
        kwargs = {"position_ids": position_ids} if self.position_ids else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits


class TransformersModel(Envoy):
    """A causal language model whose modules can be read and patched per prompt.

    ``TransformersModel(name_or_path | PreTrainedModel, task=None, tokenizer=None, device_map=None,
    dtype=None, compile=False, rename=None, cache_size=64, cache_dir=None, **kwargs)``; ``kwargs`` go
    to ``from_pretrained``.
    ``task`` is NNsight 0.8's: fxpatch runs causal language models, ``"text-generation"`` (``None``
    means that); another task is refused. ``rename`` gives modules extra names with NNsight's rules
    (``rename={"transformer.h": "layers"}`` makes ``model.layers[0]`` the first block; see
    ``fxpatch/aliases.py``). ``dispatch`` (NNsight's "load the weights now") is accepted and has
    nothing to do: fxpatch always loads them. With ``compile=True`` every
    trace and generation runs its rewritten graph through ``torch.compile`` (inductor, dynamic
    batch and sequence sizes; compiled once per rewritten graph); a string is torch.compile's
    ``mode`` (``"reduce-overhead"`` uses CUDA graphs on a GPU). ``model.trace(..., compile=...)``
    and ``model.generate(..., compile=...)`` choose per run. Rewritten graphs are kept in a
    least-recently-used cache of ``cache_size`` graphs (``model.cache_info()``,
    ``model.cache_clear()``). Attribute access mirrors the model's module
    tree (``model.transformer.h[3].mlp``); ``model.trace(...)`` records and runs
    interventions. The model is put in eval mode (as ``from_pretrained`` returns it);
    a tokenizer passed in is used as it is.

    Rewritten graphs are kept in a least-recently-used cache of ``cache_size`` graphs (``None``:
    no bound); ``model.cache_info()`` and ``model.cache_clear()`` work as ``functools.lru_cache``'s.
    The exported site graphs are kept on disk, so another process loads them instead of exporting
    again: in ``cache_dir``, else ``$FXPATCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxpatch`` (default
    ``~/.cache/fxpatch``); ``cache_dir=False`` keeps nothing on disk (see ``fxpatch.export_cache``).

    Loading by name draws no transformers weight-loading progress bar unless asked:
    ``progress=True`` (taken from ``kwargs``, not passed on) shows it, and so does setting
    ``HF_HUB_DISABLE_PROGRESS_BARS`` (transformers' own setting then applies); a tqdm hook
    of your own (``transformers.utils.logging.set_tqdm_hook``) is left in charge.
    transformers' global progress-bar setting is as it was after loading.

    Example::

        model = TransformersModel("openai-community/gpt2", task="text-generation", device_map="auto")
        with model.trace() as tracer:
            with tracer.invoke("Prompt 1"):
                x = model.transformer.wte.output.save()
    """

    def __init__(self, model: str | torch.nn.Module, tokenizer: Any = None, device_map: Any = None,
                 dtype: torch.dtype | str | None = None, compile: bool | str = False, *, task: str | None = None,
                 rename: Mapping | None = None, dispatch: bool = True,
                 cache_size: int | None = DEFAULT_CACHE_SIZE, cache_dir: str | os.PathLike | bool | None = None,
                 **from_pretrained_kwargs: Any):
        _check_cache_settings(cache_size, cache_dir)
        loc = user_location()
        if task not in _TASKS:
            raise InputError(f"fxpatch runs causal language models (task='text-generation'); task={task!r} is "
                             "not supported", at=loc,
                             hint="Pass task='text-generation' (or leave it out) with a causal language model.")
        if isinstance(model, torch.nn.Module):
            hf_model = model
            _check_one_device(hf_model)
            if dtype is not None:
                hf_model = hf_model.to(dtype=_dtype(dtype))
        else:
            hf_model = _load_model(model, device_map, dtype, from_pretrained_kwargs)
            _check_one_device(hf_model)
        if tokenizer is None:
            # A tokenizer fxpatch loads pads like its batches (left, EOS when it has no pad
            # token); one the user passes is theirs and stays as it is.
            tokenizer = _load_tokenizer(model if isinstance(model, str) else
                                        getattr(getattr(hf_model, "config", None), "_name_or_path", None))
            if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None and tokenizer.eos_token:
                tokenizer.pad_token = tokenizer.eos_token
            if tokenizer is not None:
                tokenizer.padding_side = "left"
        hf_model.eval()  # exported graphs capture the mode: dropout must be off, as from_pretrained leaves it
        super().__init__(self, hf_model, "")
        own = {"_model": hf_model, "tokenizer": tokenizer, "_site_graphs": {}, "_patched": GraphCache(cache_size),
               "_checked": BoundedDict(cache_size), "_functional": GraphCache(cache_size), "_state_access": {},
               "_fingerprint": None, "_watch": None, "_kept": [], "_lock": threading.RLock(), "_facts": {},
               "_compile": compile, "task": "text-generation", "_cache_dir": cache_dir}
        for k, v in own.items():
            object.__setattr__(self, k, v)
        reserved = {n for klass in Envoy.__mro__ for n in vars(klass)}
        reserved_root = {n for klass in type(self).__mro__ for n in vars(klass)} | set(self.__dict__)
        object.__setattr__(self, "_renamed", bind_aliases(hf_model, rename, reserved, reserved_root, loc))

    # -- facts about the model ----------------------------------------------------------
    @property
    def device(self) -> torch.device:
        try:
            return next(self._model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    @property
    def config(self):
        return self._model.config

    @property
    def max_length(self) -> int | None:
        cfg = getattr(self._model, "config", None)
        for name in ("n_positions", "max_position_embeddings"):
            if getattr(cfg, name, None):
                return int(getattr(cfg, name))
        return None

    @property
    def vocab_size(self) -> int | None:
        """The number of token ids the input embedding takes (``None`` when the model does not say)."""
        get = getattr(self._model, "get_input_embeddings", None)
        embedding = get() if callable(get) else None
        rows = getattr(embedding, "num_embeddings", None)
        if rows is None:
            rows = getattr(getattr(self._model, "config", None), "vocab_size", None)
        return int(rows) if rows else None

    def _input_facts(self) -> tuple[int | None, int | None, torch.device]:
        """``(max_length, vocab_size, device)``, as a trace checks and pads its inputs: read once per state of the
        model (its fingerprint covers each of them), not at every trace (~10 us through modules and config)."""
        facts = self._facts.get("inputs")
        if facts is None:
            facts = self._facts["inputs"] = (self.max_length, self.vocab_size, self.device)
        return facts

    @property
    def pad_token_id(self) -> int:
        for source in (self.tokenizer, getattr(self._model, "config", None)):
            for name in ("pad_token_id", "eos_token_id"):
                value = getattr(source, name, None)
                if isinstance(value, list):
                    value = value[0] if value else None
                if value is not None:
                    return int(value)
        return 0

    # -- caches ---------------------------------------------------------------------------
    def cache_info(self) -> CacheInfo:
        """``CacheInfo(hits, misses, maxsize, currsize)`` of the rewritten-graph cache, as
        ``functools.lru_cache`` reports it: a hit is a trace or generation step that reused a
        rewritten graph, a miss one that had to build it; ``currsize`` counts graphs kept.

        Example::

            with model.trace("Hello"):
                model.transformer.h[0].output[:, -1] = 0
            with model.trace("Another, longer prompt"):
                model.transformer.h[0].output[:, -1] = 0
            model.cache_info()   # CacheInfo(hits=1, misses=1, maxsize=64, currsize=1)
        """
        return self._patched.info()

    def cache_clear(self) -> None:
        """Forget every rewritten graph (and every checked program) and zero the counts.

        The exported site graphs stay, in memory and on disk. Example::

            model.cache_clear()
            model.cache_info()   # CacheInfo(hits=0, misses=0, maxsize=64, currsize=0)
        """
        with self._lock:
            self._patched.clear(statistics=True)
            self._checked.clear()
            self._functional.clear()

    # -- exported graphs ------------------------------------------------------------------
    def site_graph(self, mode: str = "forward") -> SiteGraph:
        """The model exported once for ``mode``, with a site at every module boundary (cached).

        The cache holds while the model's modules, their modes and its parameters' and
        buffers' dtypes, devices and shapes stay the same (checked at the start of each
        trace; see ``model_fingerprint``).
        """
        sg = self._site_graphs.get(mode)
        if sg is None:
            self._forget_stale_exports()  # all modes' graphs must come from the same model
            try:
                sg = self._export(mode)
            except Warning:  # fxpatch's own (hooks traced in), under a filter that makes warnings errors
                raise
            except Exception as e:  # noqa: BLE001 - whatever torch.export says, say where and what
                raise FxpatchError(
                    f"torch.export could not capture {type(self._model).__name__} for its {mode} pass: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", at=user_location(),
                    hint="fxpatch needs a model torch.export can trace (non-strict); the full error is chained "
                    "below.") from e
            self._site_graphs[mode] = sg
        return sg

    def _forget_stale_exports(self) -> None:
        """Drop the exported graphs, and all made from them, if the model changed since they were made.

        What an export depends on is ``model_fingerprint``'s (``fxpatch/watch.py``): modules, their
        settings, hooks and code, dtypes, devices and shapes; weights edited in place need no new export.
        """
        watch = self._watch
        if watch is not None and watch.unchanged():  # a few microseconds, against the walk's tens to hundreds
            return
        kept: list = []
        with TRACING_LOCK:  # not while another thread's export has patched torch's classes (the walk sees code)
            fingerprint = model_fingerprint(self._model, kept)
            if fingerprint != self._fingerprint:
                _check_one_device(self._model)  # a part moved elsewhere (model.lm_head.to("cuda")) splits the model
                self._site_graphs.clear()
                self._patched.clear()
                self._checked.clear()
                self._functional.clear()
                self._state_access.clear()
                self._facts.clear()
                object.__setattr__(self, "_fingerprint", fingerprint)
            self._watch_anew(kept)

    def _watch_anew(self, kept: list) -> None:
        """Watch the model as the walk that ``kept`` these objects saw it (the current fingerprint's walk,
        or one that found the same fingerprint after a write it does not cover, such as an export's own
        attributes). The objects the fingerprint names by id stay alive while it is compared against."""
        object.__setattr__(self, "_kept", kept)
        object.__setattr__(self, "_watch", watch_of(kept))

    def _changed_since(self, fingerprint: tuple | None) -> bool:
        """Whether anything an export depends on differs from ``fingerprint`` (taken when a trace began):
        the watch, and where it cannot vouch, a walk. Nothing is dropped: the next trace does that."""
        watch = self._watch
        if fingerprint is self._fingerprint and watch is not None and watch.unchanged():
            return False
        kept: list = []
        with TRACING_LOCK:  # as in _forget_stale_exports
            if model_fingerprint(self._model, kept) != fingerprint:
                return True
            if fingerprint is self._fingerprint:
                self._watch_anew(kept)
        return False

    def state_values(self, mode: str) -> tuple[Any, ...]:
        """The model's parameters, buffers and constants as ``mode``'s site graph takes them (placeholder order).

        Where each lives is looked up once per model structure (``_forget_stale_exports``
        forgets it); the tensors are read from their modules' dicts each call, so a buffer
        or parameter reassigned since is the one that runs.
        """
        sg = self.site_graph(mode)
        access = self._state_access.get(mode)
        if access is None or access[0] is not sg:
            where = sg.state_access(self._model)
            # a constant is looked up in a dict of its own, so that every value is one getitem (in C, each call)
            tables = [table if table is not None else {0: name} for table, name in where]
            keys = [name if table is not None else 0 for table, name in where]
            access = self._state_access[mode] = (sg, tables, keys)
        return tuple(map(getitem, access[1], access[2]))

    def _export(self, mode: str) -> SiteGraph:
        if mode in ("prefill", "decode", "prefill_static", "decode_static"):
            from .generation import export_entry

            entry, example, dynamic = export_entry(self, mode)
            return export_sites(self._model, entry, example, dynamic, cache_dir=self._cache_dir)
        if mode != "forward":
            raise ValueError(f"unknown run mode {mode!r}")
        takes_positions = "position_ids" in inspect.signature(self._model.forward).parameters
        vocab = int(getattr(self._model.config, "vocab_size", 2) or 2)
        ids = torch.arange(2 * 8, device=self.device).reshape(2, 8) % vocab
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        example = {"input_ids": ids, "attention_mask": mask}
        if takes_positions:
            example["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return export_sites(self._model, _Forward(self._model, takes_positions), example,
                            cache_dir=self._cache_dir)

    # -- moving the model ----------------------------------------------------------------
    def to(self, *args: Any, **kwargs: Any) -> TransformersModel:
        """``torch.nn.Module.to`` on the wrapped model; returns this model.

        The next trace exports the model again for its new dtype or device.

        Example::

            model = TransformersModel(fxpatch.TINY_GPT2).to(torch.float64)
        """
        self._model.to(*args, **kwargs)
        return self

    def half(self) -> TransformersModel:
        """The wrapped model in float16 (see ``to``)."""
        return self.to(torch.float16)

    def bfloat16(self) -> TransformersModel:
        """The wrapped model in bfloat16 (see ``to``)."""
        return self.to(torch.bfloat16)

    def float(self) -> TransformersModel:
        """The wrapped model in float32 (see ``to``)."""
        return self.to(torch.float32)

    def double(self) -> TransformersModel:
        """The wrapped model in float64 (see ``to``)."""
        return self.to(torch.float64)

    def cpu(self) -> TransformersModel:
        """The wrapped model on the CPU (see ``to``)."""
        return self.to("cpu")

    def cuda(self, device: int | str | torch.device | None = None) -> TransformersModel:
        """The wrapped model on a GPU (see ``to``)."""
        if isinstance(device, int):
            device = f"cuda:{device}"
        return self.to(device or "cuda")

    # -- tracing ---------------------------------------------------------------------
    def trace(self, inputs: Any = NO_INPUTS, **kwargs: Any) -> Tracer:
        """A context that records interventions and runs them in one batched pass at exit.

        ``model.trace("prompt")`` is a one-invoke shortcut; ``model.trace()`` with
        ``tracer.invoke(...)`` blocks batches several (an explicit ``None`` is an error).
        """
        self._forget_stale_exports()
        return Tracer(self, inputs, **kwargs)

    def scan(self, inputs: Any = NO_INPUTS, **kwargs: Any):
        """A context like ``trace`` in which nothing real runs: saved values are fake tensors with the
        shapes and dtypes the run would give (NNsight's ``scan``; see ``fxpatch/scan.py``).

        Example::

            with model.scan("The Eiffel Tower is in"):
                h = model.transformer.h[0].output.save()
            h.shape   # torch.Size([1, n_tokens, hidden]); h is a FakeTensor
        """
        from .scan import ScanTracer

        self._forget_stale_exports()
        return ScanTracer(self, inputs, **kwargs)

    def generate(self, inputs: Any = NO_INPUTS, max_new_tokens: int | None = None, **generation_kwargs: Any):
        """A context like ``trace`` that generates ``max_new_tokens`` tokens per prompt at exit.

        Interventions apply to the prompt pass unless placed in ``for step in
        tracer.iter[...]`` or ``tracer.all()``; ``model.generator.output`` is an
        invoke's token ids. ``generation_kwargs`` are transformers' (``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``num_return_sequences``,
        ``return_dict_in_generate``, ``logits_processor``, ...); those fxpatch's decoding loop
        does not implement (beam search, ...) are refused (``fxpatch/generation_settings.py``).

        Example::

            with model.generate("Madison square garden is located in the city of New", max_new_tokens=3):
                out = model.generator.output.save()
            model.tokenizer.batch_decode(out)   # ['Madison square garden ... New York City.']
        """
        from .generation import GenerateTracer

        self._forget_stale_exports()
        return GenerateTracer(self, inputs, max_new_tokens, **generation_kwargs)

    def edit(self, *, inplace: bool = False):
        """Record interventions that apply to every later trace (NNsight's ``model.edit()``; see
        ``fxpatch/edit.py``). ``with model.edit() as (tracer, edited):`` stores them on ``edited``, a new
        model sharing this one's module and weights (this one is unchanged); with ``inplace=True``
        (``with model.edit(inplace=True) as tracer:``) on this model.

        Example::

            with model.edit() as (tracer, edited):
                edited.transformer.h[0].output[:, -1] = 0
            with edited.trace("Hello"):
                h = edited.transformer.h[0].output.save()   # h[:, -1] == 0
        """
        from .edit import EditTracer

        self._forget_stale_exports()
        return EditTracer(self, inplace)

    def clear_edits(self) -> None:
        """Drop every edit stored on this model (``model.edit(inplace=True)``, or those an edited copy
        holds); later traces run the model as it is."""
        object.__setattr__(self, "_edits", [])

    def session(self):
        """A block of several traces that pass values to each other without ``.save()``; only saved
        values are kept after it (NNsight's ``model.session()``; see ``fxpatch/session.py``).

        Example::

            with model.session():
                with model.trace("The Eiffel Tower is in"):
                    h = model.transformer.h[0].output
                with model.trace("_ _ _ _ _ _"):
                    model.transformer.h[0].output[:, -1] = h[:, -1]
                    logits = model.lm_head.output.save()
        """
        from .session import Session

        return Session(self)

    @property
    def generator(self):
        """``model.generator.output``: an invoke's generated token ids, inside ``generate``."""
        from .generation import Generator

        return Generator(self)


class LanguageModel(TransformersModel):
    """NNsight's earlier name for a ``TransformersModel`` of task ``"text-generation"``.

    ``LanguageModel(name_or_path | PreTrainedModel, tokenizer_kwargs=None, **kwargs)`` takes what
    ``TransformersModel`` takes; ``tokenizer_kwargs`` are set on the tokenizer after loading
    (``padding_side`` is the usual one). NNsight 0.8 warns that the name is deprecated; fxpatch keeps
    it as a plain alias, without a warning, since code written for NNsight uses it everywhere.

    Example::

        model = LanguageModel(fxpatch.TINY_GPT2)
        assert isinstance(model, TransformersModel) and model.task == "text-generation"
    """

    def __init__(self, *args: Any, tokenizer_kwargs: Mapping | None = None, **kwargs: Any):
        kwargs.setdefault("task", "text-generation")
        super().__init__(*args, **kwargs)
        if self.tokenizer is not None:
            for key, value in (tokenizer_kwargs or {}).items():
                setattr(self.tokenizer, key, value)


_TASKS = (None, "text-generation")


CacheInfo = namedtuple("CacheInfo", ["hits", "misses", "maxsize", "currsize"])
CacheInfo.__doc__ = "What ``LanguageModel.cache_info()`` returns, as ``functools.lru_cache``'s ``cache_info``."


class BoundedDict(OrderedDict):
    """A dict that keeps its ``maxsize`` most recently used items (``None``: all of them).

    Example::

        d = BoundedDict(2)
        d["a"], d["b"] = 1, 2
        d.get("a"); d["c"] = 3   # "b" goes: "a" was used more recently
    """

    def __init__(self, maxsize: int | None):
        super().__init__()
        self.maxsize = maxsize

    def get(self, key: Hashable, default: Any = None) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key: Hashable, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if self.maxsize is not None:
            while len(self) > self.maxsize:
                self.popitem(last=False)


class GraphCache:
    """Rewritten graphs by program key, the least recently used going first past ``maxsize`` graphs.

    A key can hold several graphs (one per range of sizes its guards allow); ``find`` returns
    the first that ``fits`` and counts a hit, or counts a miss. Example::

        cache = GraphCache(64)
        gm = cache.find(key, lambda fp: fp.holds_for(sizes))
        if gm is None:
            cache.add(key, fp, gm := build())
    """

    def __init__(self, maxsize: int | None):
        self.maxsize = maxsize
        self._graphs: OrderedDict[Hashable, list[tuple[Any, torch.fx.GraphModule]]] = OrderedDict()
        self._size = 0
        self.hits = self.misses = 0

    def find(self, key: Hashable, fits: Callable[[Any], bool]) -> torch.fx.GraphModule | None:
        for fp, gm in self._graphs.get(key, ()):
            if fits(fp):
                self._graphs.move_to_end(key)
                self.hits += 1
                return gm
        self.misses += 1
        return None

    def add(self, key: Hashable, fp: Any, gm: torch.fx.GraphModule) -> None:
        if self.maxsize == 0:
            return
        self._graphs.setdefault(key, []).append((fp, gm))
        self._graphs.move_to_end(key)
        self._size += 1
        while self.maxsize is not None and self._size > self.maxsize:
            oldest = next(iter(self._graphs))
            graphs = self._graphs[oldest]
            _release(*graphs.pop(0))
            self._size -= 1
            if not graphs:
                del self._graphs[oldest]
        _trim_torch_caches()

    def clear(self, statistics: bool = False) -> None:
        """Drop every graph; with ``statistics`` the hit and miss counts too."""
        for graphs in self._graphs.values():
            for fp, gm in graphs:
                _release(fp, gm)
        self._graphs.clear()
        self._size = 0
        if statistics:
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return self._size

    def info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, self.maxsize, self._size)


def _release(fp: Any, gm: torch.fx.GraphModule) -> None:
    """Forget the generated source of a graph the cache lets go (``forget_source``: 30 kB for each of
    tiny GPT-2's rewritten graphs). A graph still held elsewhere (``tracer.graph``) keeps working."""
    for module in (getattr(fp, "graph", None), gm):
        forget_source(module)


TORCH_CACHE_PERIOD = 32  # graphs built between two trims of torch's process-wide caches
_built = 0


def _trim_torch_caches() -> None:
    """Every ``TORCH_CACHE_PERIOD`` graphs built, empty torch's process-wide caches of fake-tensor work.

    Checking and functionalizing a program runs ops on fake tensors of a new ShapeEnv, and torch
    keeps, for the life of the process, a fake-tensor dispatch entry per op call and an
    ``lru_cache`` entry per ShapeEnv method call (``get_implications``, ``constrain_symbol_range``:
    unbounded), each holding its ShapeEnv: a long run of changing programs would keep every one
    (0.15 MB a program for tiny GPT-2). No later program can hit these entries; only speed ever
    depends on them, never a result.
    """
    global _built
    _built += 1
    if _built % TORCH_CACHE_PERIOD:
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental import symbolic_shapes

    FakeTensorMode.cache_clear()
    worker = getattr(symbolic_shapes, "_maybe_evaluate_static_worker", None)
    for fn in [*vars(symbolic_shapes.ShapeEnv).values(), worker]:
        clear = getattr(fn, "cache_clear", None)
        if callable(clear):
            clear()


def _check_cache_settings(cache_size: Any, cache_dir: Any) -> None:
    if cache_size is not None and (isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0):
        raise InputError(f"cache_size={cache_size!r} is not a number of graphs", at=user_location(),
                         hint="Pass a whole number of rewritten graphs to keep (0 keeps none), or None for no bound.")
    if not (cache_dir is None or cache_dir is False or isinstance(cache_dir, (str, os.PathLike))):
        raise InputError(f"cache_dir={cache_dir!r} is not a directory", at=user_location(),
                         hint="Pass a directory path, None for the default ($FXPATCH_CACHE_DIR or ~/.cache/fxpatch), "
                         "or False to keep no exported graphs on disk.")


def _dtype(dtype):
    return getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype


# device_map strategies that spread a model over several devices
_SPREADING_STRATEGIES = ("balanced", "balanced_low_0", "sequential")


def _device_name(device: Any) -> str:
    """One name per device, as ``device_map`` values name them (accelerate: an int is a GPU index)."""
    if isinstance(device, int) and not isinstance(device, bool):
        return f"cuda:{device}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return str(device)  # "disk": offloaded weights
    if dev.type in ("cpu", "meta"):
        return dev.type
    return f"{dev.type}:{dev.index or 0}"


def _refuse_devices(what: str, devices: set[str]) -> None:
    raise InputError(
        f"{what} on {len(devices)} devices ({', '.join(sorted(devices))}); fxpatch runs the whole model on one "
        "device and does not support models split over several", at=user_location(),
        hint='Put the model on one device: device_map="cuda:0" (or "cpu", or "auto", which picks one), or '
        "model.to(device) before wrapping it.")


def _one_device(device_map: Any) -> Any:
    """``device_map`` with a dict that maps every module to one device made that device.

    One device needs no accelerate; a ``device_map`` that spreads the model over
    several devices is refused here, before anything loads.
    """
    if isinstance(device_map, str) and device_map in _SPREADING_STRATEGIES:
        raise InputError(
            f'device_map="{device_map}" spreads a model over several devices; fxpatch runs the whole model on '
            "one device", at=user_location(),
            hint='Use device_map="auto" (one device: the GPU if there is one) or name one device.')
    if isinstance(device_map, Mapping):
        devices = {_device_name(d) for d in device_map.values()}
        if len(devices) > 1:
            _refuse_devices("device_map puts the model's modules", devices)
        if len(devices) == 1 and next(iter(devices)) != "disk":
            return next(iter(devices))
    return device_map


def _check_one_device(model: torch.nn.Module) -> None:
    """Refuse a model whose modules were dispatched to, or whose tensors lie on, several devices."""
    hf_map = getattr(model, "hf_device_map", None)
    if isinstance(hf_map, Mapping):
        devices = {_device_name(d) for d in hf_map.values()}
        if len(devices) > 1:
            _refuse_devices("the model was loaded with its modules (hf_device_map)", devices)
    devices = {_device_name(t.device) for t in model.parameters()} | {_device_name(t.device) for t in model.buffers()}
    if len(devices) > 1:
        _refuse_devices("the model's parameters and buffers are", devices)


def _load_model(name: str, device_map, dtype, kwargs) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    progress = kwargs.pop("progress", None)
    device_map = _one_device(device_map)

    if dtype is not None:
        kwargs["dtype"] = _dtype(dtype)
    move_to = None
    if device_map == "auto":
        # device_map="auto" needs accelerate; one device is all fxpatch uses, so pick it here.
        move_to = "cuda" if torch.cuda.is_available() else "cpu"
    elif isinstance(device_map, (str, torch.device)):
        move_to = device_map  # one device: no need for accelerate
    elif device_map is not None:
        kwargs["device_map"] = device_map
    restore = _hide_loading_bars(progress)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    finally:
        restore()
    return model.to(move_to) if move_to else model


def _hide_loading_bars(progress: bool | None):
    """Hide transformers' weight-loading bars unless the user asked for them; returns the undo.

    A library call should not draw bars on its caller's stderr. The user has asked when
    ``progress=True``, when ``HF_HUB_DISABLE_PROGRESS_BARS`` is set (transformers' own
    setting then applies) or when they installed their own transformers tqdm hook.
    """
    import os

    from transformers.utils import logging as hf_logging

    if progress is None:
        progress = "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ
    if progress or not hf_logging.is_progress_bar_enabled():
        return lambda: None
    if hasattr(hf_logging, "set_tqdm_hook"):
        # A hook changes no global setting, and is put back as it was.
        previous = hf_logging.set_tqdm_hook(_hidden_bar)
        if previous is not None:  # the user's own hook decides what their bars do
            hf_logging.set_tqdm_hook(previous)
            return lambda: None
        return lambda: hf_logging.set_tqdm_hook(previous)
    # Older transformers: no hook; switch the bars off and on again.
    hf_logging.disable_progress_bar()
    return hf_logging.enable_progress_bar


def _hidden_bar(factory, args, kwargs):
    return factory(*args, **{**kwargs, "disable": True})


def _load_tokenizer(name):
    if not name:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        return None
