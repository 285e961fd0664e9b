"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    assert "reference" in capsys.readouterr().out


def test_readme_has_the_two_commands():
    text = README.read_text()
    for marker in ("<!-- ci:main -->", "<!-- ci:test -->"):
        assert marker in text
    assert "fedkern bench" in text and "pytest" in text
