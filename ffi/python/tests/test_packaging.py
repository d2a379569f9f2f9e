"""The package as setuptools ships it: every Python package of the source tree is listed in
pyproject.toml (setuptools packs only the listed ones, so a subpackage left out would be
missing from the wheel and from ``pip install``)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11
PYTHON = Path(__file__).resolve().parents[1]


def test_every_package_of_the_tree_is_listed():
    listed = tomllib.loads((PYTHON / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]
    found = sorted(".".join(p.parent.relative_to(PYTHON).parts)
                   for p in (PYTHON / "hyzo").rglob("__init__.py"))
    assert sorted(listed) == found
