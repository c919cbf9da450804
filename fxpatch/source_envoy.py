"""``envoy.source``: a module's ``forward`` operations as envoys (NNsight 0.8's ``Source`` and ``SourceEnvoy``).

``model.transformer.h[0].mlp.source`` lists the operations; ``.source.<op>``
is an ``OpEnvoy`` whose ``.output`` (and, for a call of a submodule,
``.input`` / ``.inputs``) reads and writes like a module's. How names map to
the exported graph is in ``fxpatch/source.py``.

Example::

    print(model.transformer.h[0].mlp.source)          # -> marks what fxpatch reads and writes
    with model.trace("Hello"):
        model.transformer.h[0].attn.source.attn_output_reshape_0.output[:] = 0
        act = model.transformer.h[0].mlp.source.self_act_0.output.save()
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .active import active_tracer
from .envoy import Envoy
from .errors import SourceOpError, user_location
from .source import ModuleSource, format_source


def _site_graph(lm):
    tracer = active_tracer()
    mode = tracer.mode if tracer is not None and tracer.model is lm else "forward"
    return lm.site_graph(mode)


def _module_source(envoy: Envoy) -> tuple[str, ModuleSource]:
    sg = _site_graph(envoy._lm)
    path = sg.aliases.get(envoy._path, envoy._path)
    return path, sg.sources[path]


def _readable_hint(path: str, src: ModuleSource) -> str:
    names = src.addressable()
    shown = ", ".join(names) if names else "(none)"
    return (f"Operations fxpatch reads and writes in {path or 'the model'}: {shown}. "
            "print(...source) marks them with ->.")


class Source:
    """The operations of one module's ``forward``, named as NNsight names them (``self_c_fc_0``, ``h_0``).

    Example::

        src = model.transformer.h[0].mlp.source
        print(src)               # the forward, each line with its operations
        src.names[:2]            # ['self_c_fc_0', 'hidden_states_0']
    """

    def __init__(self, envoy: Envoy):
        self._envoy = envoy

    @property
    def names(self) -> list[str]:
        """Every operation's name, in execution order (NNsight's ``Source.names``)."""
        _, src = _module_source(self._envoy)
        return list(src.forward.names) if src.forward else []

    def __getattr__(self, name: str) -> OpEnvoy:
        if name.startswith("__"):
            raise AttributeError(name)
        path, src = _module_source(self._envoy)
        where = path or "the model"
        if src.forward is None:
            raise SourceOpError(f"{where} has no operations to list: {src.why}", at=user_location(),
                                hint="Read the module's .output and .inputs instead.")
        if name not in src.forward.names:
            raise SourceOpError(f"{where}.source has no operation {name!r}", at=user_location(),
                                hint=_readable_hint(path, src))
        return OpEnvoy(self._envoy, path, name)

    def __iter__(self) -> Iterator[OpEnvoy]:
        path, _ = _module_source(self._envoy)
        return (OpEnvoy(self._envoy, path, n) for n in self.names)

    def __repr__(self) -> str:
        return format_source(_module_source(self._envoy)[1])


class OpEnvoy(Envoy):
    """One operation of a ``forward`` (``model.transformer.h[0].mlp.source.self_act_0``).

    ``.output`` reads and writes the operation's value for the current invoke as
    a module's ``.output`` does; ``.input`` / ``.inputs`` exist for a call of a
    submodule (they are that submodule's). ``tracer.iter[k]`` picks the k-th
    execution of an operation its forward runs several times (a loop over layers).

    Example::

        with model.trace("Hello"):
            model.transformer.h[0].mlp.source.self_act_0.output[:] = 0
            logits = model.lm_head.output.save()
    """

    def __init__(self, envoy: Envoy, module_path: str, name: str):
        super().__init__(envoy._lm, envoy._module, f"{module_path}.source.{name}" if module_path else
                         f"source.{name}")
        object.__setattr__(self, "_op", name)
        object.__setattr__(self, "_module_path", module_path)

    def _check(self, kind: str) -> None:
        sg = _site_graph(self._lm)
        src = sg.sources[self._module_path]
        entry = sg.calls.get(self._path)
        reason = src.status.get(self._op)
        if entry is None and reason is None:
            reason = "it does not run in this pass"
        if reason is not None:
            raise SourceOpError(f"{self._path} cannot be read or written: {reason}", at=user_location(),
                                hint=_readable_hint(self._module_path, src))
        if kind not in entry:
            raise SourceOpError(
                f"{self._path} has no .input/.inputs in fxpatch: only a call of a submodule has them "
                "(they are that module's inputs)", at=user_location(),
                hint="Read .output of the operation that computes the input, or the module's own .inputs.")

    @property
    def output(self) -> Any:
        """The operation's value for the current invoke; assign to replace it for what the forward does next."""
        self._check("output")
        return Envoy.output.fget(self)

    @property
    def inputs(self) -> Any:
        """``(args, kwargs)`` of a submodule call (``self_c_fc_0``): that module's inputs."""
        self._check("inputs")
        return Envoy.inputs.fget(self)

    @property
    def input(self) -> Any:
        """The first input of a submodule call."""
        self._check("inputs")
        return Envoy.input.fget(self)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input", "inputs"):
            self._check("output" if name == "output" else "inputs")
        Envoy.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in ("output", "input", "inputs"):  # its property raised (an AttributeError): say why again
            self._check("output" if name == "output" else "inputs")
        what = "drilling into an operation (.source of an operation)" if name == "source" else repr(name)
        raise SourceOpError(f"{self._path} has no {what} in fxpatch", at=user_location(),
                            hint="Use .output (and .input/.inputs for a call of a submodule).")

    def skip(self, value: Any) -> None:
        raise SourceOpError(f"{self._path}.skip() is not supported by fxpatch", at=user_location(),
                            hint=f"Assign the value instead: {self._path}.output = value.")

    def __call__(self, *args, **kwargs) -> Any:
        raise SourceOpError(f"{self._path} is an operation, not a module to call", at=user_location(),
                            hint="Call the module (model.<path>(...)) instead.")

    def __getitem__(self, index):
        raise SourceOpError(f"{self._path} is an operation; it has no modules to index", at=user_location(),
                            hint="Index its value: .output[...].")

    def __iter__(self):
        raise SourceOpError(f"{self._path} is an operation; it has no modules to iterate", at=user_location(),
                            hint="Iterate model.<module>.source for its operations.")

    def __repr__(self) -> str:
        _, src = _module_source(Envoy(self._lm, self._module, self._module_path))
        fs = src.forward
        op = next(o for o in fs.ops if o.name == self._op)
        lines = fs.text.split("\n")
        at = op.line - 1
        out = [f"{self._path}:"]
        for i in range(max(0, at - 3), min(len(lines), at + 4)):
            out.append(f"    --> {lines[i].strip()} <--" if i == at else "    " + lines[i])
        return "\n".join(out)
