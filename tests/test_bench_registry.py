"""The benchmark registry against its documentation (fedkern/benchmarks/__init__.py)."""

from __future__ import annotations

import re

import fedkern.benchmarks as fb
from fedkern.benchmarks import core


def test_documented_positions_are_the_registry():
    """The package docstring's position list names every registered op at its position and
    nothing else, so a new family cannot take a documented number or leave the list stale."""
    text = " ".join(fb.__doc__.split())
    i = text.index("``position``: where the op's cases run; unique. Now:")
    j = text.index("A new family takes a free number", i)
    documented = {op: int(pos) for op, pos in re.findall(r"(\w+) (\d+)[,;( ]", text[i:j])}
    registered = {op: core.spec(op).position for op in core.ops()}
    assert documented == registered
    assert int(re.search(r"free number \(e\.g\. (\d+)", text).group(1)) not in registered.values()


def test_documented_families_are_the_registry():
    """Every family that registers an op is named in the docstring's family list."""
    head = " ".join(fb.__doc__.split("Registry API")[0].split())
    families = {core.spec(op).family for op in core.ops()}
    assert all(f"``{f}``" in head for f in families)
