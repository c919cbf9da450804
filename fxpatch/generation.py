"""``model.generate(...)``: interventions during generation, on exported prefill and decode graphs.

The prompt pass (step 0) runs the *prefill* graph; each later step runs the
*decode* graph on one new token per row and the KV cache, which crosses the
graph boundary as tensors (``DynamicKV``; with ``cache_implementation="static"``,
``StaticKV``: a cache preallocated to the maximum length, so every decode step
has the same input shapes). Each step's program is inlined into its graph by
the same passes as a trace's (steps with the same program share one rewritten
graph). Token selection and stopping are transformers' own logits processors
and stopping criteria, built from the model's ``generation_config``.

Example::

    with model.generate("Madison square garden is located in the city of New", max_new_tokens=3) as tracer:
        hs = fxpatch.save([])
        for step in tracer.iter[0:3]:
            hs.append(model.transformer.h[-1].output[:, -1])
        tokens = model.generator.output.save()
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch.export import Dim

from .active import active_tracer
from .errors import FxpatchError, InputError, user_location
from .generation_settings import check_generation_settings, split_generate_args
from .inputs import NO_INPUTS, left_pad
from .passes.diagnostics import Location
from .passes.ops import capture
from .proxy import Proxy
from .runner import bind_values, phase_outputs, run_detached, run_program
from .tracing import Invoker, Tracer

RESULT_PHASE = 1 << 30  # after every step: ops on the generated tokens


class DynamicKV:
    """KV cache handling for transformers' ``DynamicCache``: keys and values cross
    the graph boundary as one tensor per layer, shape (batch, kv_heads, length, head_dim).

    A decode step wraps the incoming tensors in a ``DynamicCache`` without
    copying them; the model's own ``update`` appends the new token (one
    concatenation per layer and step, as in transformers' generate). A static,
    preallocated cache is another class with the same three methods.
    """

    def __init__(self, config):
        self.config = config

    def empty(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def wrap(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        cache = self.empty()
        for layer, k, v in zip(cache.layers, keys, values):
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        return cache

    @staticmethod
    def unwrap(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


class StaticKV:
    """KV cache handling for transformers' ``StaticCache`` (``cache_implementation="static"``): keys and
    values are preallocated to the maximum length, shape (batch, kv_heads, max_cache_len, head_dim), and
    cross the graph boundary at that fixed shape with the write position, a 0-dim long tensor.

    Inside a graph the cache's layers write functionally (``index_copy``, not transformers'
    in-place ``index_copy_``), so the exported graph mutates none of its inputs: a decode step
    takes the cache and returns the written one, of the same shapes. Attention masks, query
    offsets and mask sizes are transformers' own ``StaticLayer``'s, so the values equal those
    of ``generate`` with a static cache.

    Example::

        kv = StaticKV(hf_model.config)
        cache = kv.wrap(keys, values, torch.tensor(5))   # a StaticCache whose next write is at position 5
    """

    def __init__(self, config):
        self.config = config

    def empty(self, length):
        from transformers import StaticCache

        cache = StaticCache(config=self.config, max_cache_len=length)
        for layer in cache.layers:
            layer.__class__ = _functional_static_layer()
        return cache

    def wrap(self, keys: list[torch.Tensor], values: list[torch.Tensor], position: torch.Tensor,
             functional: bool = True):
        """A ``StaticCache`` over ``keys`` and ``values`` (not copied) whose next write is at ``position``;
        ``functional=False`` gives transformers' own layers (for a cache handed back to the user)."""
        from transformers import StaticCache

        cache = StaticCache(config=self.config, max_cache_len=keys[0].shape[2])
        for layer, k, v in zip(cache.layers, keys, values):
            if functional:
                layer.__class__ = _functional_static_layer()
            layer.keys, layer.values, layer.device = k, v, k.device
            layer.batch_size, layer.num_heads = k.shape[:2]
            layer.k_head_dim, layer.v_head_dim = k.shape[-1], v.shape[-1]
            # transformers' layers add to their own length in place; functional ones replace it
            layer.cumulative_length = position if functional else position.clone()
            layer.is_initialized = True
        return cache

    unwrap = staticmethod(DynamicKV.unwrap)

    @staticmethod
    def unsupported_layers(config) -> list[str]:
        """The names of the static cache layer types of ``config`` that ``StaticKV`` does not handle
        (sliding-window, indexed, linear-attention layers), each once."""
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        types = [type(layer) for layer in StaticCache(config=config, max_cache_len=1).layers]
        return list(dict.fromkeys(t.__name__ for t in types if t is not StaticLayer))


_FUNCTIONAL_LAYER = None


def _functional_static_layer():
    """transformers' ``StaticLayer`` with an out-of-place ``update`` (made once, on first use: transformers
    is imported lazily)."""
    global _FUNCTIONAL_LAYER
    if _FUNCTIONAL_LAYER is None:
        from transformers.cache_utils import StaticLayer

        class FunctionalStaticLayer(StaticLayer):
            """Writes the new keys and values at ``cumulative_length`` into new tensors of the same shape,
            as transformers' ``StaticLayer.update`` writes them in place."""

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:  # the prompt pass: a zero cache of the maximum length
                    batch, heads = key_states.shape[:2]
                    self.keys = key_states.new_zeros((batch, heads, self.max_cache_len, key_states.shape[-1]))
                    self.values = value_states.new_zeros((batch, heads, self.max_cache_len, value_states.shape[-1]))
                    self.cumulative_length = torch.zeros((), dtype=torch.long, device=key_states.device)
                    self.device, self.is_initialized = key_states.device, True
                n = key_states.shape[-2]
                index = torch.arange(n, device=key_states.device) + self.cumulative_length
                self.keys = self.keys.index_copy(2, index, key_states)
                self.values = self.values.index_copy(2, index, value_states)
                self.cumulative_length = self.cumulative_length + n
                return self.keys, self.values

        _FUNCTIONAL_LAYER = FunctionalStaticLayer
    return _FUNCTIONAL_LAYER


class Prefill(torch.nn.Module):
    """The prompt pass: logits of the last position, and the filled cache."""

    def __init__(self, model, kv: DynamicKV, position_ids: bool, logits_to_keep: bool):
        super().__init__()
        self.model, self.kv, self.position_ids, self.logits_to_keep = model, kv, position_ids, logits_to_keep
        # transformers 5 renamed past_key_values to cache; older models take the old name
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _run(self, input_ids, attention_mask, position_ids, cache, **kwargs):
        if self.position_ids:
            kwargs["position_ids"] = position_ids
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{self.cache_arg: cache}, **kwargs)
        keys, values = self.kv.unwrap(out[self.cache_arg] if self.cache_arg in out else out["past_key_values"])
        return (out.logits, *keys, *values)

    def forward(self, input_ids, attention_mask, position_ids=None):
        kwargs = {"logits_to_keep": 1} if self.logits_to_keep else {}
        return self._run(input_ids, attention_mask, position_ids, self.kv.empty(), **kwargs)


class Decode(Prefill):
    """One decode step: one new token per row, the cache so far; logits and the grown cache."""

    def forward(self, input_ids, attention_mask, position_ids=None, keys=(), values=()):
        return self._run(input_ids, attention_mask, position_ids, self.kv.wrap(list(keys), list(values)))


class StaticPrefill(Prefill):
    """The prompt pass into a static cache: ``attention_mask`` is the prompt's mask padded with zeros to the
    maximum length, which sizes the cache (as transformers pads it to the static cache's length)."""

    def forward(self, input_ids, attention_mask, position_ids=None):
        kwargs = {"logits_to_keep": 1} if self.logits_to_keep else {}
        return self._run(input_ids, attention_mask, position_ids, self.kv.empty(attention_mask.shape[1]), **kwargs)


class StaticDecode(Prefill):
    """One decode step on a static cache: every input has the same shape at every step (the mask is
    the maximum length's, ``write_position`` a 0-dim tensor), so a compiled graph never recompiles."""

    def forward(self, input_ids, attention_mask, position_ids=None, write_position=None, keys=(), values=()):
        return self._run(input_ids, attention_mask, position_ids,
                         self.kv.wrap(list(keys), list(values), write_position))


STATIC_MODES = {"prefill_static": "prefill", "decode_static": "decode"}  # run mode -> the step it runs


def export_entry(model, mode: str):
    """The wrapper module, example inputs and dynamic shapes that export ``mode``."""
    if mode in STATIC_MODES:
        return _static_export_entry(model, STATIC_MODES[mode])
    return _dynamic_export_entry(model, mode)


def _static_export_entry(model, mode: str):
    hf = model._model
    kv = StaticKV(hf.config)
    takes_positions = "position_ids" in inspect.signature(hf.forward).parameters
    keep = "logits_to_keep" in inspect.signature(hf.forward).parameters
    vocab = int(getattr(hf.config, "vocab_size", 2) or 2)
    batch, width, length = 2, 8, 13  # sizes that equal no model size, so export keeps them apart
    ids = torch.arange(batch * width, device=model.device).reshape(batch, width) % vocab
    mask = torch.zeros((batch, length), dtype=torch.long, device=model.device)
    mask[:, :width] = 1
    mask[0, :2] = 0
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    if mode == "prefill":
        example = {"input_ids": ids, "attention_mask": mask}
        if takes_positions:
            example["position_ids"] = positions
        return StaticPrefill(hf, kv, takes_positions, keep), example, None
    with torch.no_grad():
        out = StaticPrefill(hf, kv, takes_positions, keep)(ids, mask, positions if takes_positions else None)
    n = (len(out) - 1) // 2
    keys, values = list(out[1:1 + n]), list(out[1 + n:])
    auto = Dim.AUTO
    step_mask = mask.clone()
    step_mask[:, width] = 1
    example = {"input_ids": ids[:, -1:], "attention_mask": step_mask}
    dynamic = {"input_ids": {0: auto}, "attention_mask": {0: auto, 1: auto}}
    if takes_positions:
        example["position_ids"] = positions[:, -1:] + 1
        dynamic["position_ids"] = {0: auto}
    example["write_position"] = torch.tensor(width, device=model.device)
    dynamic["write_position"] = None
    example.update(keys=keys, values=values)
    dynamic.update(keys=[{0: auto, 2: auto}] * n, values=[{0: auto, 2: auto}] * n)
    return StaticDecode(hf, kv, takes_positions, keep), example, dynamic


def _dynamic_export_entry(model, mode: str):
    hf = model._model
    kv = DynamicKV(hf.config)
    takes_positions = "position_ids" in inspect.signature(hf.forward).parameters
    keep = "logits_to_keep" in inspect.signature(hf.forward).parameters
    vocab = int(getattr(hf.config, "vocab_size", 2) or 2)
    batch, length = 2, 8
    ids = torch.arange(batch * length, device=model.device).reshape(batch, length) % vocab
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if mode == "prefill":
        example = {"input_ids": ids, "attention_mask": mask}
        if takes_positions:
            example["position_ids"] = positions
        return Prefill(hf, kv, takes_positions, keep), example, None
    with torch.no_grad():
        out = Prefill(hf, kv, takes_positions, keep)(ids, mask, positions if takes_positions else None)
    n = (len(out) - 1) // 2
    keys, values = list(out[1:1 + n]), list(out[1 + n:])
    # Batch and cache length are dynamic (torch.export infers how the mask's length
    # relates to the cache's); the new token's length stays 1.
    auto = Dim.AUTO
    example = {"input_ids": ids[:, -1:], "attention_mask": torch.cat([mask, mask[:, -1:]], -1)}
    dynamic = {"input_ids": {0: auto}, "attention_mask": {0: auto, 1: auto}}
    if takes_positions:
        example["position_ids"] = positions[:, -1:] + 1
        dynamic["position_ids"] = {0: auto}
    example.update(keys=keys, values=values)
    dynamic.update(keys=[{0: auto, 2: auto}] * n, values=[{0: auto, 2: auto}] * n)
    return Decode(hf, kv, takes_positions, keep), example, dynamic


class StepSelection:
    """``tracer.iter[...]``: ``for step in tracer.iter[1:3]`` records the body once per step."""

    def __init__(self, tracer: GenerateTracer):
        self.tracer = tracer

    def __getitem__(self, index) -> StepLoop:
        loc = user_location()
        n = self.tracer.max_new_tokens
        if isinstance(index, slice):
            steps = list(range(n))[index]
        elif isinstance(index, int):
            steps = [index + n if index < 0 else index]  # -1 is the last step, as in Python
        elif isinstance(index, (list, tuple)) and all(isinstance(i, int) for i in index):
            steps = [i + n if i < 0 else i for i in index]
        else:
            raise FxpatchError(f"tracer.iter[...] takes a step, a slice or a list of steps, not {index!r}", at=loc)
        for step in steps:
            if not 0 <= step < n:
                raise FxpatchError(
                    f"step {step} is outside this generation's {n} steps (0 to {n - 1})", at=loc,
                    hint=f"Use steps below max_new_tokens={n}, or raise max_new_tokens.")
        return StepLoop(self.tracer, steps, loc)


class StepLoop:
    """Iterating yields each step index with the tracer recording into that step."""

    def __init__(self, tracer: GenerateTracer, steps: list[int], loc: Location):
        self.tracer, self.steps, self.loc = tracer, steps, loc

    def __enter__(self):
        # NNsight before 0.5 spelled it ``with tracer.all():``; 0.8's is a loop
        raise FxpatchError("tracer.iter[...] and tracer.all() are loops, not blocks", at=user_location(),
                           hint="Write `for step in tracer.all():` (or `for step in tracer.iter[1:3]:`) and put the "
                           "interventions in its body, as NNsight 0.8 does.")

    def __exit__(self, *exc):  # never reached: __enter__ raises
        return False

    def __iter__(self):
        tracer = self.tracer
        outer = tracer.phase
        try:
            for step in self.steps:
                tracer.phase = step
                yield step
        finally:
            tracer.phase = outer


class RepeatedInvoker(Invoker):
    """An invoke of ``model.generate``: each prompt row repeated ``num_return_sequences`` times
    consecutively, as transformers' ``_expand_inputs_for_generation`` repeats them, so the
    invoke's interventions and ``model.generator.output`` cover all its repeated rows."""

    def __enter__(self) -> Invoker:
        super().__enter__()
        k = self.tracer.num_return_sequences
        if self.rows and k > 1:
            self.rows = [row for row in self.rows for _ in range(k)]
            self.stop = self.start + len(self.rows)
        return self


class GenerateTracer(Tracer):
    """``model.generate(inputs=None, max_new_tokens=..., **generation_kwargs)``.

    Interventions written directly in an invoke apply to the prompt pass
    (step 0); ``for step in tracer.iter[a:b]`` / ``tracer.all()`` bind a loop
    body to those steps. After the block, ``tracer.result`` (if saved) and
    ``model.generator.output`` hold token ids, prompt included, or, with
    ``return_dict_in_generate=True``, transformers' ``GenerateDecoderOnlyOutput``
    (``sequences``, ``scores``, ``logits``, ``cache``), as NNsight gives them.
    ``tracer.graph`` and ``tracer.inserted`` describe the prompt pass's rewritten
    graph and ``tracer.graphs[step]`` the graph each step ran. Which generation
    settings are used and which are refused: ``generation_settings.check_generation_settings``.
    """

    kind = "generate"

    def __init__(self, model, inputs: Any = NO_INPUTS, max_new_tokens: int | None = None, **kwargs: Any):
        super().__init__(model, inputs, compile=kwargs.pop("compile", None))
        loc = self.loc
        if max_new_tokens is None:
            raise InputError("model.generate(...) needs max_new_tokens", at=loc,
                             hint="Pass max_new_tokens=N (N >= 1), e.g. model.generate(prompt, max_new_tokens=3).")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}", at=loc,
                             hint="Pass max_new_tokens=N with N >= 1.")
        self.max_new_tokens = max_new_tokens
        self.generate_args = split_generate_args(kwargs, loc)  # logits_processor, streamer, ...
        self.generation_config = self._generation_config(kwargs, loc)
        self.num_return_sequences: int = self.generation_config.num_return_sequences
        if self._shortcut_invoke is not None:  # model.generate(prompt): its rows are repeated too
            self._shortcut_invoke = RepeatedInvoker(self, inputs, loc)
        self.iter = StepSelection(self)
        self.graphs: dict[int, torch.fx.GraphModule] = {}  # the graph each step ran (steps may share one)
        self._result: Proxy | None = None

    def _generation_config(self, kwargs: dict, loc: Location):
        hf = self.model._model
        base = kwargs.pop("generation_config", None)  # a GenerationConfig, as transformers' generate takes
        user_set = set(kwargs) | ({k for k, v in vars(base).items() if v is not None} if base is not None else set())
        try:
            config, unused = hf._prepare_generation_config(base, max_new_tokens=self.max_new_tokens, **kwargs)
        except (ValueError, TypeError) as e:
            raise _rejected(e, loc) from e
        check_generation_settings(config, user_set, loc)
        if config.cache_implementation == "static":
            unsupported = StaticKV.unsupported_layers(hf.config.get_text_config(decoder=True))
            if unsupported:
                raise InputError(f"cache_implementation='static' gives {type(hf).__name__} a StaticCache with "
                                 f"{', '.join(unsupported)} layers, which fxpatch's static cache does not implement "
                                 "(it writes full-attention StaticLayers)", at=loc,
                                 hint="Drop cache_implementation (the dynamic cache works with every layer type).")
        if unused:
            try:  # transformers' own message for a typo
                hf._validate_model_kwargs(dict(unused))
            except (ValueError, TypeError) as e:
                raise _rejected(e, loc) from e
            raise InputError(f"model.generate(...) got {', '.join(sorted(unused))}, which transformers would pass "
                             "to the model's forward", at=loc,
                             hint="Drop them: fxpatch builds input_ids, attention_mask, position_ids and the cache "
                             "itself; pass prompts, token ids or a BatchEncoding as the inputs.")
        try:
            config.validate(strict=True)
            # transformers checks some settings only when it builds its logits processors
            ids = torch.zeros((1, 1), dtype=torch.long, device=self.model.device)
            _processors(hf, copy.deepcopy(config), ids, torch.ones_like(ids), self.model.tokenizer, self.generate_args)
        except (ValueError, TypeError) as e:
            raise _rejected(e, loc) from e
        return config

    def invoke(self, inputs: Any = NO_INPUTS, **kwargs: Any) -> Invoker:
        """Add ``inputs`` as rows of the batch, each repeated ``num_return_sequences`` times; with none, an invoke
        of every row."""
        invoker = super().invoke(inputs, **kwargs)
        return RepeatedInvoker(self, invoker.inputs, invoker.loc)

    @property
    def mode(self) -> str:  # the graph of the step being recorded: recorded times are positions in it
        return run_mode(self.phase, self.static)

    @property
    def static(self) -> bool:
        """Whether this generation's KV cache is transformers' ``StaticCache``."""
        config = getattr(self, "generation_config", None)
        return config is not None and config.cache_implementation == "static"

    def all(self) -> StepLoop:
        """Every step: ``for step in tracer.all(): ...``."""
        return StepLoop(self, list(range(self.max_new_tokens)), user_location())

    @property
    def result(self) -> Proxy:
        """The token ids after generation (prompt and new tokens), or the ``GenerateDecoderOnlyOutput`` with
        ``return_dict_in_generate=True``: inside an invoke its rows (as NNsight gives), else the whole batch."""
        if self.finished:
            raise FxpatchError("tracer.result is only available inside the generate block; save it there",
                               at=user_location(), hint="tracer.result.save() inside the block.")
        invoke = self.current_invoke
        return self._whole_result() if invoke is None else self._result_rows(invoke)

    def _whole_result(self) -> Proxy:
        if self._result is None:
            node = self.program_of(RESULT_PHASE).placeholder("result")
            node.meta.update(fxpatch_loc=user_location(), fxpatch_invoke=None, fxpatch_phase=RESULT_PHASE,
                             fxpatch_result=True)
            self._result = Proxy(node, self)
        return self._result

    def _result_rows(self, invoke: Invoker) -> Proxy:
        return self.record("call_function", output_rows, (self._whole_result(), invoke.start, invoke.stop), {},
                           phase=RESULT_PHASE)

    def generator_output(self) -> Proxy:
        return self._result_rows(self._require_invoke("model.generator.output"))

    def _run(self) -> None:
        with self.model._lock:
            generate(self)


def _step_inputs(model, mode: str, ids, mask, positions, write=None, keys=(), values=()) -> list[torch.Tensor]:
    inputs = [ids, mask]
    names = model.site_graph(mode).input_names
    if "position_ids" in names:
        inputs.append(positions)
    if "write_position" in names:
        inputs.append(write)
    return inputs + list(keys) + list(values)


def run_mode(step: int, static: bool) -> str:
    """The site graph that runs generation step ``step``."""
    return ("prefill" if step == 0 else "decode") + ("_static" if static else "")


def static_cache_length(config, width: int) -> int:
    """The length a static cache is preallocated to, as transformers' generate sizes it: the prompt
    width plus ``max_new_tokens - 1`` (the last token is never fed back), or ``max_cache_len`` if larger."""
    return max(width + config.max_new_tokens - 1, config.max_cache_len or 0)


def _rejected(e: Exception, loc: Location) -> InputError:
    return InputError(f"transformers rejects these generation settings: {e}", at=loc,
                      hint="Fix the generation keyword arguments (see transformers' GenerationConfig).")


def _processors(hf, config, ids: torch.Tensor, mask: torch.Tensor, tokenizer, args: dict):
    """transformers' logits processors and stopping criteria for ``config`` (changed in place), with the
    user's ``logits_processor`` / ``stopping_criteria`` / ``prefix_allowed_tokens_fn`` merged in as
    transformers' generate merges them."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    hf._prepare_special_tokens(config, True, device=ids.device, batch_size=ids.shape[0])
    config.max_length = ids.shape[1] + config.max_new_tokens
    processors = hf._get_logits_processor(
        generation_config=config, input_ids_seq_length=ids.shape[1], encoder_input_ids=ids,
        prefix_allowed_tokens_fn=args.get("prefix_allowed_tokens_fn"),
        logits_processor=args.get("logits_processor", LogitsProcessorList()), device=ids.device,
        model_kwargs={"attention_mask": mask})
    stopping = hf._get_stopping_criteria(generation_config=config,
                                         stopping_criteria=args.get("stopping_criteria", StoppingCriteriaList()),
                                         tokenizer=args.get("tokenizer", tokenizer))
    return processors, stopping


def output_rows(result, start: int, stop: int | None):
    """Rows ``start:stop`` of a generation's result: of the token ids, or of each per-row
    tensor of a ``GenerateDecoderOnlyOutput`` (sequences, each step's scores and logits, the cache)."""
    if isinstance(result, torch.Tensor):
        return capture(result, start, stop)
    if start == 0 and stop is None:
        return result
    field = result_cache_field()
    cache = getattr(result, field)
    if cache is not None:  # a shallow copy whose layers hold the rows: the whole batch's cache is unchanged
        cache = copy.copy(cache)
        cache.layers = [copy.copy(layer) for layer in cache.layers]
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[start:stop], layer.values[start:stop]
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):  # a StaticLayer's own count
                layer.cumulative_length = layer.cumulative_length.clone()
                layer.batch_size = layer.keys.shape[0]
    per_step = {name: None if steps is None else tuple(s[start:stop] for s in steps)
                for name, steps in (("scores", result.scores), ("logits", result.logits))}
    return type(result)(sequences=result.sequences[start:stop], **{field: cache}, **per_step)


def result_cache_field() -> str:
    """The field of transformers' ``GenerateDecoderOnlyOutput`` that holds the KV cache: ``cache``, or
    ``past_key_values`` before transformers 5.2x."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


def generate(tracer: GenerateTracer) -> None:
    """The decoding loop: prefill, then one decode graph run per new token (transformers' ``_sample``)."""
    model = tracer.model
    rows = [r for invoke in tracer.invokes for r in invoke.rows]
    batch = left_pad(rows, model.pad_token_id, model._input_facts()[2])
    tracer.batch = batch
    config = copy.deepcopy(tracer.generation_config)
    processors, stopping = _processors(model._model, config, batch.input_ids, batch.attention_mask, model.tokenizer,
                                       tracer.generate_args)
    pad = config._pad_token_tensor
    stops_on_eos = any(hasattr(c, "eos_token_id") for c in stopping)
    as_dict = bool(config.return_dict_in_generate)
    all_scores = () if as_dict and config.output_scores else None
    all_logits = () if as_dict and config.output_logits else None
    streamer = tracer.generate_args.get("streamer")

    ids, mask = batch.input_ids, batch.attention_mask
    if streamer is not None:
        streamer.put(ids.cpu())
    positions = batch.position_ids
    unfinished = torch.ones(len(rows), dtype=torch.long, device=ids.device)
    values: dict = {}
    static = tracer.static
    width = ids.shape[1]
    if static:  # every step's mask has the cache's length: ones where a token is written so far
        static_mask = mask.new_zeros((mask.shape[0], static_cache_length(config, width)))
        static_mask[:, :width] = mask
    step_inputs = [ids, static_mask if static else mask, positions, None]
    keys: list = []
    kv_values: list = []
    for step in range(tracer.max_new_tokens):
        mode = run_mode(step, static)
        program = tracer.program_of(step)
        out, gm = run_program(model, mode, program, phase_outputs(tracer, step),
                              _step_inputs(model, mode, *step_inputs, keys, kv_values), values,
                              compile=tracer.compile, dynamic=mode != "decode_static")
        if step == 0:
            tracer.graph = gm
        tracer.graphs[step] = gm
        logits = out[0]
        n = (len(out) - 1) // 2
        keys, kv_values = out[1:1 + n], out[1 + n:]
        raw = logits[:, -1].to(copy=True, dtype=torch.float32)
        scores = processors(ids, raw)
        if all_scores is not None:
            all_scores += (scores,)
        if all_logits is not None:
            all_logits += (raw,)
        if config.do_sample:
            next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        if stops_on_eos and pad is not None:
            next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
        ids = torch.cat([ids, next_tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping(ids, all_scores)  # what transformers' criteria are given
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        new_positions = mask.sum(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        if unfinished.max() == 0 or step + 1 == tracer.max_new_tokens:
            break
        write = None
        if static:  # the next token goes to cache position width + step; a new mask, as values saved may hold the old
            static_mask = static_mask.clone()
            static_mask[:, width + step] = 1
            write = torch.tensor(width + step, device=ids.device)
        step_inputs = [next_tokens[:, None], static_mask if static else mask, new_positions, write]
    if streamer is not None:
        streamer.end()
    result_program = tracer.programs.get(RESULT_PHASE)
    if result_program is not None:
        result: Any = ids
        if as_dict:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            if static:
                written = torch.tensor(width + step, device=ids.device)  # prompt, then one token per decode step
                cache = StaticKV(model._model.config).wrap(list(keys), list(kv_values), written, functional=False)
            else:
                cache = DynamicKV(model._model.config).wrap(list(keys), list(kv_values))
            result = GenerateDecoderOnlyOutput(sequences=ids, scores=all_scores, logits=all_logits,
                                               **{result_cache_field(): cache})
        values[tracer._result.node] = result
        run_detached(result_program, phase_outputs(tracer, RESULT_PHASE), values)
    bind_values(tracer, values)


class Generator:
    """``model.generator``: inside ``model.generate``, ``model.generator.output`` is the
    current invoke's token ids after generation (prompt and new tokens), or its rows of
    the ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate=True``."""

    def __init__(self, model):
        self._model = model

    @property
    def output(self) -> Proxy:
        tracer = active_tracer()
        if not isinstance(tracer, GenerateTracer) or tracer.model is not self._model:
            what = "a trace" if tracer is not None else "no generation"
            raise FxpatchError(f"model.generator.output was used in {what}; it exists only inside model.generate(...)",
                               at=user_location(), hint="Use `with model.generate(prompt, max_new_tokens=N):`, or "
                               "read model.lm_head.output in a trace.")
        return tracer.generator_output()
