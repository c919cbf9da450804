"""``# line: tag`` markers in a test file, so tests check that an error names the user's file:line.

Example::

    MARKS = Markers(__file__)
    with pytest.raises(InputError) as e:
        model.trace(None)  # line: none
    MARKS.check_message(e.value, "none", "inputs")
"""

from __future__ import annotations

import os
import re


class Markers:
    """The ``# line: <tag>`` comments of one source file."""

    def __init__(self, path: str):
        self.path = path
        with open(path, encoding="utf-8") as f:
            self.source = f.read().splitlines()

    def line_of(self, tag: str) -> int:
        hits = [i + 1 for i, text in enumerate(self.source) if text.rstrip().endswith("# line: " + tag)]
        assert len(hits) == 1, f"marker {tag!r} found on lines {hits}"
        return hits[0]

    def check_message(self, err: Exception, tag: str, *words: str) -> None:
        """``err``'s message starts with this file's ``path:line`` of ``tag`` and says ``words``."""
        msg = str(err)
        match = re.match(r"(.+?):(\d+): ", msg.splitlines()[0])
        assert match, f"no file:line at the start of:\n{msg}"
        assert os.path.samefile(match.group(1), self.path), msg
        assert int(match.group(2)) == self.line_of(tag), f"expected line {self.line_of(tag)} ({tag}), got:\n{msg}"
        for word in words:
            assert word.lower() in msg.lower(), f"{word!r} missing from:\n{msg}"
