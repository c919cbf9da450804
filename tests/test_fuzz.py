"""Property-based differential testing: random intervention programs against the hook reference.

``hypothesis`` draws small NNsight-style programs: one to four invokes on prompts
of different token lengths, each a list of steps at decoder layers (in layer
order): saved reads (views, or ``.clone()``), whole writes (``m.output = ...``),
sliced writes (``m.output[:, -1] = ...``), in-place writes through chains of
views (``view``/``reshape``/``transpose``/``unflatten``/slicing/``select``/
``narrow``/``split``/...), clones written and assigned back, and cross-invoke
copies (a later invoke writes, at layer L, the last position an earlier invoke
read at layer L), with and without ``tracer.barrier(2)``.

The same step code runs twice:

- through fxpatch, as the program ``repr(program)`` shows: one
  ``with lm.trace()`` with an invoke per prompt, on proxies;
- on real tensors, eagerly, in ordinary forward hooks of the plain HF model
  running each prompt alone (``tests.reference.run_alone``): a layer's hook
  runs that layer's steps on the layer's output tensor and returns it. A donor
  value comes from the donor prompt's reference run, in the state eager torch
  leaves it in after the donor's steps at that layer.

Per invoke the last-position logits and every saved value must agree (atol and
rtol 1e-5, float32). Saved views see later in-place writes to their tensor and
clones do not, in eager torch as in fxpatch, so the values are just compared.

Programs are valid by construction. Positions are only addressed from the end,
so left padding does not matter; every step is checked on stand-in tensors
before it is used (``_Sim``): it must run on the prompt alone and on its
padded row, change the real positions the same way in both and save the same
values (no padding in them), so the generator never relies on what padding
holds.

``python -m pytest -q tests/test_fuzz.py`` runs 100 programs (50 per
architecture); ``python -m pytest -q -m slow tests/test_fuzz.py`` runs 1,000, and 40 more with
every trace compiled.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxpatch.proxy import _UNSET, Proxy
from tests.conftest import PROMPTS
from tests.reference import paths, run_alone, token_ids
from tests.test_differential import envoy

ATOL, RTOL = 1e-5, 1e-5

# Token lengths 10, 9, 3, 10, 3, 4, 8, 5 with the tiny GPT-2 tokenizer (both models use it).
POOL = [*PROMPTS, "hello", "a b c d", "The cat sat on the mat", "x y z w v"]

C = [2.0, 0.5, -1.0, 0.0, 1.5, -0.25]  # multipliers and fill values
D = [0.5, 0.0, -1.0, 0.25]  # offsets

# Views an in-place write goes through: ``x`` is the tensor so far. They are written for a layer's
# (batch, positions, hidden) output but chained freely; a chain is only used where ``_Sim`` finds it
# valid. Hidden-dim slices fit both hidden sizes (96 and 64).
VIEWS = [
    "x[:, -1]",
    "x[:, -2:]",
    "x.view(x.shape[0], x.shape[1], 4, -1)[:, :, 1]",
    "x.transpose(1, 2)[:, :8]",
    "x.reshape(-1, x.shape[-1])[-1]",
    "x.narrow(1, x.shape[1] - 1, 1)",
    "x.select(1, -1)[:, 3:9]",
    "x.split(16, dim=2)[1]",
    "x.unflatten(2, (2, -1)).transpose(2, 3)[..., 0]",
    "x[:, -2:].transpose(0, 1)",
    "x[..., 8:40]",
    "x.view(-1)[-8:]",
    "x.flatten(1)[:, -24:]",
    "x.chunk(2, dim=-1)[1]",
    "x.unbind(1)[-1]",
    "x.squeeze(0)",
    "x.movedim(-1, 0)",
    "x.permute(2, 0, 1)[4:12]",
]

# What a saved read ends with (after 0-2 views); only those that give the same values alone and padded.
READ_TAILS = ["x[:, -1]", "x", "x[:, -2:]", "x[..., -1]", "x[-1]", "x[:, -1, 8:24]", "x.select(1, -2)",
              "x.narrow(1, x.shape[1] - 2, 2)", "x[:, -2:].transpose(1, 2)", "x[:, -1:].sum(1)"]

# In-place ops on the end of a view chain ``t``.
OPS = ["t.mul_({c})", "t.add_({d})", "t.zero_()", "t.fill_({c})", "t[...] = {c}", "t *= {c}", "t.add_(t * {c})"]

# Targets of sliced writes, each with sources of the same shape.
TARGETS = {
    "[:, -1]": ["[:, -1]", "[:, -2]"],
    "[:, -2]": ["[:, -2]", "[:, -1]"],
    "[:, -2:]": ["[:, -2:]", "[:, -2:].flip(1)"],
    "[:, -1, 8:24]": ["[:, -1, 8:24]", "[:, -2, 24:40]"],
    "[..., :16]": ["[..., :16]", "[..., 16:32]"],
    "[:, -2:, -8:]": ["[:, -2:, -8:]", "[:, -2:, :8]"],
}


def sub(expr: str, name: str) -> str:
    """``expr`` with the tensor ``x`` named ``name``."""
    return re.sub(r"\bx\b", name, expr)


# -- programs -----------------------------------------------------------------------------------------


@dataclass
class Step:
    """Python statements run at one layer. Names: ``L(i)`` layer i's output, ``set_L(i, v)`` assigns it,
    ``save(v)``, ``torch``, and the variables of earlier steps."""

    layer: float  # a barrier call sits between layers: ``layer + 0.5``
    code: str
    saves: tuple[str, ...] = ()
    barrier: int | None = None  # a receiver's copy: the barrier it calls first
    is_barrier: bool = False  # a barrier call, not a step at a layer


@dataclass
class Invoke:
    prompt: str
    steps: list[Step] = field(default_factory=list)

    def in_order(self) -> list[Step]:
        """Steps as they run: by layer (stable), a receiver's barrier call just before its copy."""
        out = []
        for step in sorted(self.steps, key=lambda s: s.layer):
            if step.barrier is not None:
                out.append(Step(step.layer, f"b{step.barrier}()", is_barrier=True))
            out.append(step)
        return out


@dataclass
class Program:
    invokes: list[Invoke]
    n_barriers: int

    def source(self) -> str:
        lines = ["with lm.trace() as tracer:"]
        lines += [f"    b{k} = tracer.barrier(2)" for k in range(self.n_barriers)]
        for i, inv in enumerate(self.invokes):
            lines.append(f"    with tracer.invoke({inv.prompt!r}):")
            for step in inv.in_order():
                lines += ["        " + line for line in step.code.splitlines()]
            lines.append(f"        logits{i} = save(lm.lm_head.output[:, -1])")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return ("\n# L(i) is decoder layer i's .output, set_L(i, v) assigns it, save(v) is v.save()\n"
                + self.source() + "\n")


# -- checking a step on stand-in tensors --------------------------------------------------------------


class _Sim:
    """Eager stand-ins for one invoke's layer output: ``a`` as the prompt alone ``(1, n, H)``, ``b`` as its
    row of a left-padded ``(rows, width, H)`` batch, NaN in the padding and ``a``'s values in the rest."""

    def __init__(self, n: int, width: int, hidden: int, row: int, rows: int):
        self.n, self.width, self.hidden, self.row, self.rows = n, width, hidden, row, rows
        self.vars: dict[str, torch.Tensor] = {}  # the invoke's variables so far (the alone values)

    def _tensors(self):
        a = (torch.arange(self.n * self.hidden, dtype=torch.float32).reshape(1, self.n, self.hidden) + 1) / 7
        batch = torch.full((self.rows, self.width, self.hidden), math.nan)
        batch[self.row, self.width - self.n:] = a[0]
        return a, batch.narrow(0, self.row, 1)

    def _run(self, code: str, cur: torch.Tensor) -> tuple[torch.Tensor, dict] | None:
        state = {"cur": cur}

        def set_layer(i, v):
            state["cur"] = v

        ns = {"torch": torch, "L": lambda i: state["cur"], "set_L": set_layer, "save": lambda v: v}
        ns.update({k: v.clone() for k, v in self.vars.items()})
        try:
            exec(code, ns)
        except Exception:  # noqa: BLE001 - a step eager torch refuses is not generated
            return None
        return state["cur"], ns

    def runs(self, code: str) -> bool:
        """Whether ``code`` runs, alone and padded."""
        a, b = self._tensors()
        return self._run(code, a) is not None and self._run(code, b) is not None

    def check(self, code: str, new: tuple[str, ...] = ()) -> bool:
        """Whether ``code`` runs alone and padded, changes the real positions alike in both and gives the
        same ``new`` variables in both (no padding in them)."""
        a, b = self._tensors()
        ra, rb = self._run(code, a), self._run(code, b)
        if ra is None or rb is None:
            return False
        (cur_a, ns_a), (cur_b, ns_b) = ra, rb
        if cur_a.shape != (1, self.n, self.hidden) or not torch.equal(cur_a, cur_b[:, self.width - self.n:]):
            return False
        for name in new:
            va, vb = ns_a[name], ns_b[name]
            if not (isinstance(va, torch.Tensor) and va.shape == vb.shape and torch.equal(va, vb)):
                return False
        return True

    def commit(self, code: str, new: tuple[str, ...]) -> None:
        """Keep the ``new`` variables of a checked step for later steps to use."""
        a, _ = self._tensors()
        _, ns = self._run(code, a)
        for name in new:
            self.vars[name] = ns[name].detach().clone()


def _first_valid(draw, options: list, valid) -> object | None:
    good = [o for o in options if valid(o)]
    return draw(st.sampled_from(good)) if good else None


class _Gen:
    """Draws one program; every step is checked with ``_Sim`` as it is drawn."""

    def __init__(self, draw, hidden: int, n_layers: int, lengths: dict[str, int], max_steps: int):
        self.draw, self.hidden, self.n_layers, self.lengths, self.max_steps = draw, hidden, n_layers, lengths, max_steps
        self.counter = 0
        self.n_barriers = 0

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter - 1}"

    def program(self) -> Program:
        draw = self.draw
        n_invokes = draw(st.integers(1, 4))
        prompts = [draw(st.sampled_from(POOL)) for _ in range(n_invokes)]
        width = max(self.lengths[p] for p in prompts)
        invokes = [Invoke(p) for p in prompts]
        # one or two layers for the whole program, so that steps meet at a layer: a saved view then an
        # in-place write into it, a donor's read then its own writes, copies between invokes
        pool = draw(st.lists(st.integers(0, self.n_layers - 1), min_size=1, max_size=2, unique=True))
        for i, inv in enumerate(invokes):
            sim = _Sim(self.lengths[inv.prompt], width, self.hidden, i, n_invokes)
            n_steps = draw(st.integers(0, self.max_steps))
            layers = sorted(draw(st.sampled_from(pool)) for _ in range(n_steps))
            for layer in layers:
                kinds = ["read", "write", "slice", "inplace", "clone", "copy"] if i else \
                        ["read", "write", "slice", "inplace", "clone"]
                kind = draw(st.sampled_from(kinds))
                if kind == "copy":
                    inv.steps.append(self.copy(invokes, i, layer))
                else:
                    step = getattr(self, kind)(sim, layer)
                    sim.commit(step.code, step.saves)
                    inv.steps.append(step)
        return Program(invokes, self.n_barriers)

    def _chain(self, sim, start: str, name: str, max_views: int) -> list[str]:
        """Up to ``max_views`` views of ``start`` that run, as lines binding ``name``."""
        lines = [f"{name} = {start}"]
        for _ in range(self.draw(st.integers(0, max_views))):
            view = _first_valid(self.draw, VIEWS,
                                lambda v: sim.runs("\n".join([*lines, f"{name} = {sub(v, name)}"])))
            if view is None:
                break
            lines.append(f"{name} = {sub(view, name)}")
        return lines

    def read(self, sim, layer: int) -> Step:
        draw = self.draw
        var = self.name("s")
        clone = ".clone()" if draw(st.booleans()) else ""
        lines = self._chain(sim, f"L({layer})", "t", 2)

        def code(lines, tail):
            if len(lines) == 1:  # no views: read the module directly
                return f"{var} = save({sub(tail, f'L({layer})')}{clone})"
            return "\n".join([*lines, f"{var} = save({sub(tail, 't')}{clone})"])

        while True:
            tail = _first_valid(draw, READ_TAILS, lambda t: sim.check(code(lines, t), (var,)))
            if tail is not None:
                return Step(layer, code(lines, tail), (var,))
            assert len(lines) > 1, "x[:, -1] of a module value is always a valid read"
            lines.pop()  # this chain has padding in every tail: read from a shorter one

    def write(self, sim, layer: int) -> Step:
        c, d = self.draw(st.sampled_from(C)), self.draw(st.sampled_from(D))
        h = f"L({layer})"
        forms = [f"{h} * {c} + {d}", f"-{h}", f"torch.relu({h}) * {c}"]
        forms += [f"{h} * {c} + {v} * {d}" for v in sim.vars]
        form = _first_valid(self.draw, forms, lambda f: sim.check(f"set_L({layer}, {f})"))
        return Step(layer, f"set_L({layer}, {form})")

    def slice(self, sim, layer: int) -> Step:
        draw = self.draw
        c, d = draw(st.sampled_from(C)), draw(st.sampled_from(D))
        h = f"L({layer})"
        target = _first_valid(draw, list(TARGETS), lambda t: sim.check(f"{h}{t} = {c}"))
        values = [f"{c}"] + [f"{h}{src} * {c} + {d}" for src in TARGETS[target]]
        values += [f"{v} * {c} + {d}" for v in sim.vars] + [f"{v}.clone()" for v in sim.vars]
        value = _first_valid(draw, values, lambda v: sim.check(f"{h}{target} = {v}"))
        return Step(layer, f"{h}{target} = {value}")

    def _in_place(self, sim, layer: int, head: list[str], tail: list[str], base: str) -> str:
        """``head``, a chain of 1-3 views from ``base`` into ``t``, an in-place op on ``t``, ``tail``."""
        draw = self.draw
        c, d = draw(st.sampled_from(C)), draw(st.sampled_from(D))
        lines = [*head, f"t = {base}"]
        for _ in range(draw(st.integers(1, 3))):
            view = _first_valid(draw, VIEWS, lambda v: sim.runs("\n".join([*lines, f"t = {sub(v, 't')}"])))
            if view is None:
                break
            lines.append(f"t = {sub(view, 't')}")
        ops = [op.format(c=c, d=d) for op in OPS]
        while True:
            op = _first_valid(draw, ops, lambda o: sim.check("\n".join([*lines, o, *tail])))
            if op is not None:
                return "\n".join([*lines, op, *tail])
            assert len(lines) > len(head) + 1, "an in-place op on a whole module value is always valid"
            lines.pop()  # every op on this chain would touch a padded position: write through a shorter one

    def inplace(self, sim, layer: int) -> Step:
        return Step(layer, self._in_place(sim, layer, [], [], f"L({layer})"))

    def clone(self, sim, layer: int) -> Step:
        """A clone of the output, written in place (through views) and assigned back."""
        return Step(layer, self._in_place(sim, layer, [f"u = L({layer}).clone()"], [f"set_L({layer}, u)"], "u"))

    def copy(self, invokes: list[Invoke], i: int, layer: int) -> Step:
        """Invoke ``i`` writes at ``layer``, position -1, what an earlier invoke read there."""
        draw = self.draw
        donor = invokes[draw(st.integers(0, i - 1))]
        var = self.name("d")
        read = f"L({layer})[:, -1]" + (".clone()" if draw(st.booleans()) else "")
        saved = draw(st.booleans())
        read = f"{var} = save({read})" if saved else f"{var} = {read}"
        # steps run sorted by layer (stably): only the place among the donor's steps at this layer matters
        at_layer = [k for k, s in enumerate(donor.steps) if s.layer == layer]
        # first at the layer half the time: a view read then changed by the donor's own writes
        k = 0 if draw(st.booleans()) else draw(st.integers(0, len(at_layer)))
        pos = at_layer[k] if k < len(at_layer) else len(donor.steps)
        donor.steps.insert(pos, Step(layer, read, (var,) if saved else ()))
        barrier = None
        if draw(st.booleans()):
            barrier = self.n_barriers
            self.n_barriers += 1
            # the donor waits once all its steps at this layer are done
            donor.steps.append(Step(layer + 0.5, f"b{barrier}()", is_barrier=True))
        c, d = draw(st.sampled_from(C)), draw(st.sampled_from(D))
        value = draw(st.sampled_from([var, f"{var} * {c} + {d}"]))
        return Step(layer, f"L({layer})[:, -1] = {value}", barrier=barrier)


@st.composite
def programs(draw, hidden: int, n_layers: int, lengths: dict[str, int], max_steps: int) -> Program:
    return _Gen(draw, hidden, n_layers, lengths, max_steps).program()


# -- running a program both ways ----------------------------------------------------------------------


def _value(v):
    if isinstance(v, Proxy):
        assert v.value is not _UNSET, f"{v} was saved but has no value after the trace"
        return v.value
    return v


def run_fxpatch(lm, program: Program) -> dict:
    """The program through fxpatch; returns its namespace (saved values bound as after any trace)."""
    p = paths(lm)

    def set_layer(i, v):
        envoy(lm, p.layer(i)).output = v

    ns = {"lm": lm, "torch": torch, "L": lambda i: envoy(lm, p.layer(i)).output, "set_L": set_layer,
          "save": lambda v: v.save()}
    exec(compile(program.source(), "<fuzz program>", "exec"), ns)
    return ns


def run_reference(lm, inv: Invoke, donors: dict) -> tuple[torch.Tensor, dict]:
    """One invoke's steps run eagerly in forward hooks of the plain model on its prompt alone."""
    p = paths(lm)
    state = {}

    def layer_value(i):
        assert i == state["layer"], f"step at layer {state['layer']} reads layer {i}"
        return state["cur"]

    def set_layer(i, v):
        assert i == state["layer"], f"step at layer {state['layer']} writes layer {i}"
        state["cur"] = v

    ns = {"torch": torch, "L": layer_value, "set_L": set_layer, "save": lambda v: v, **donors}
    by_layer: dict[int, list[Step]] = {}
    for step in inv.in_order():
        if not step.is_barrier:
            by_layer.setdefault(int(step.layer), []).append(step)

    def edit_for(layer):
        def edit(out):
            state["layer"], state["cur"] = layer, out
            for step in by_layer[layer]:
                exec(step.code, ns)
            return state["cur"]
        return edit

    ref = run_alone(lm, inv.prompt, outputs={p.layer(layer): edit_for(layer) for layer in by_layer})
    return ref.logits[-1], ns


def check_program(lm, program: Program) -> None:
    """Each invoke's last-position logits and saved values from fxpatch equal the reference's."""
    fx = run_fxpatch(lm, program)
    problems = []
    donors: dict = {}
    for i, inv in enumerate(program.invokes):
        logits, ns = run_reference(lm, inv, donors)
        donors.update({k: v for k, v in ns.items() if re.fullmatch(r"d\d+", k)})
        pairs = [(f"logits{i}", _value(fx[f"logits{i}"])[0], logits)]
        pairs += [(name, _value(fx[name]), ns[name]) for step in inv.steps for name in step.saves]
        for name, actual, expected in pairs:
            if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
                problems.append(f"invoke {i}: {name} is {getattr(actual, 'shape', actual)}, "
                                f"expected shape {tuple(expected.shape)}")
                continue
            try:
                torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)
            except AssertionError as e:
                problems.append(f"invoke {i}: {name}: {e}")
    assert not problems, "\n".join(problems)


def _lengths(lm) -> dict[str, int]:
    lengths = {p: len(token_ids(lm, p)) for p in POOL}
    assert min(lengths.values()) >= 3 and len(set(lengths.values())) >= 5, lengths
    return lengths


def _draw_and_check(lm, data, max_steps: int) -> None:
    config = lm._model.config
    program = data.draw(programs(config.hidden_size, paths(lm).n_layers, _lengths(lm), max_steps), label="program")
    check_program(lm, program)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: on a shared 2-core machine a second intra-op thread only waits for a core
    (each example runs two to three times faster on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_random_programs(lm, data):
    """50 random programs per architecture (100 in all) give the hook reference's logits and saved values."""
    _draw_and_check(lm, data, max_steps=3)


@pytest.mark.slow
@settings(FUZZ, max_examples=500)
@given(data=st.data())
def test_random_programs_slow(lm, data):
    """500 random programs per architecture (1,000 in all), up to 4 steps per invoke."""
    _draw_and_check(lm, data, max_steps=4)


@pytest.fixture(scope="module")
def compiled_lm(lm):
    """``lm``'s model again, every trace through torch.compile (its own graph cache, the same weights)."""
    from fxpatch import LanguageModel

    torch._dynamo.reset()
    return LanguageModel(lm._model, tokenizer=lm.tokenizer, compile=True)


@pytest.mark.slow
@settings(FUZZ, max_examples=20)
@given(data=st.data())
def test_random_programs_compiled(compiled_lm, data):
    """20 random programs per architecture, compiled (each its own graph: seconds of inductor each), give the
    hook reference's logits and saved values: the graph torch.compile gets (``IndexBeforeLinear``,
    ``IndexToOps``, ``CountFromEnd``, ``OneDNNLinear``, ``SpecializeNegativeInts``) computes what the eager
    one does."""
    _draw_and_check(compiled_lm, data, max_steps=3)
