"""``fxpatch demo`` prints the reference page's results and the inserted-node table; ``--version``
and ``--help`` print plain text."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import fxpatch
from fxpatch.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxpatch", *args], capture_output=True, text=True, timeout=300)


def test_demo_prints_the_reference_results():
    done = run("demo")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "'_ _ _ _ _ _ _ _ _ _' patched -> next token ' York'" in out
    assert "| capture" in out and "| scatter" in out and "transformer.wte.output" in out
    assert "['Madison square garden is located in the city of New York City.'] " \
           "['_ _ _ _ _ _ _ _ _ _ York City.']" in out
    assert "Loading weights" not in done.stderr and "%|" not in done.stderr, done.stderr


def test_version_with_python_m():
    done = run("--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"fxpatch {fxpatch.__version__}\n", "")


def test_version_from_the_entry_point(capsys):
    """``main`` is the ``fxpatch`` console script (setup.cfg's entry point)."""
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"fxpatch {fxpatch.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", fxpatch.__version__)


@pytest.mark.parametrize("args, says", [
    (["--help"], ["usage: fxpatch", "--version", "demo", "run the reference examples"]),
    (["demo", "--help"], ["usage: fxpatch demo", "reference page's examples", "tiny GPT-2"]),
])
def test_help_is_plain_text(capsys, args, says):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for text in says:
        assert text in out, f"{text!r} not in the help:\n{out}"
    for markup in ("``", "::", ":func:", ":class:"):
        assert markup not in out, f"reST markup {markup!r} in the help:\n{out}"


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    assert "the following arguments are required: command" in capsys.readouterr().err
