"""``fxpatch demo`` prints the reference page's results and the inserted-node table."""

from __future__ import annotations

import subprocess
import sys


def test_demo_prints_the_reference_results():
    out = subprocess.run([sys.executable, "-m", "fxpatch", "demo"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert "'_ _ _ _ _ _ _ _ _ _' patched -> next token ' York'" in out
    assert "| capture" in out and "| scatter" in out and "transformer.wte.output" in out
    assert "['Madison square garden is located in the city of New York City.'] " \
           "['_ _ _ _ _ _ _ _ _ _ York City.']" in out
