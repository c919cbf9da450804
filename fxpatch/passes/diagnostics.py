"""Errors about a user's program, located at the user's own lines.

Program nodes carry ``node.meta["fxpatch_loc"]`` (a ``Location``), so a pass
that finds a problem can name the line that caused it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """A line of user code: ``Location("demo.py", 12, "x = model.transformer.wte.output")``."""

    filename: str
    lineno: int
    source: str = ""

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno}"

    def describe(self) -> str:
        return f"{self}: {self.source}" if self.source else str(self)


class FxpatchError(Exception):
    """Base of every error fxpatch raises for a mistake in user code.

    The message starts with the user's ``file:line`` (``at``), lists other
    lines involved (``also``: ``(label, Location)`` pairs) and ends with what to
    do instead (``hint``).
    """

    def __init__(self, problem: str, *, at: Location | None = None,
                 also: list[tuple[str, Location]] | None = None, hint: str = ""):
        self.problem, self.at, self.also, self.hint = problem, at, list(also or []), hint
        lines = [f"{at}: {problem}" if at else problem]
        if at is not None and at.source:
            lines.append(f"    {at.source}")
        for label, loc in self.also:
            lines.append(f"  {label} {loc.describe()}")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class FlowError(FxpatchError):
    """A value would have to flow backwards through the network in one pass."""


class ShapeError(FxpatchError, ValueError):
    """A value does not fit the site or operation it is used at (found before the run)."""


def location_of(node) -> Location | None:
    """The user line a program or graph node was recorded at, if any."""
    return node.meta.get("fxpatch_loc")
