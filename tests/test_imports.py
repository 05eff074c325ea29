"""`pytest tests/test_imports.py -q`: the package boundaries of DESIGN section 2, checked by parsing imports.

store imports nothing of ours (and no torch); extract and student import only store, never each other;
only pipelines may import everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"store": (), "extract": ("modkd.store",), "student": ("modkd.store",)}
FORBIDDEN_THIRD_PARTY = {"store": ("torch", "transformers")}


def imported_names(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level <= 1, f"{path}: relative import leaves its package"
            if node.level == 0:
                names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_respect_the_boundaries(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files or package == "student"
    for path in files:
        for name in imported_names(path):
            top = name.split(".")[0]
            assert top not in ("extract", "store", "student", "pipelines"), f"{path}: import {name} (use modkd.*)"
            if name.startswith("modkd"):
                own = f"modkd.{package}"
                assert name.startswith(own) or name.startswith(ALLOWED[package]), f"{path} imports {name}"
            assert not name.startswith(FORBIDDEN_THIRD_PARTY.get(package, ())), f"{path} imports {name}"


def test_the_two_processor_loaders_stay_one_file():
    """extract/ and student/ may not import each other and store/ imports no transformers, so the processor
    loader exists twice; apart from the docstring lines that name each other, the two must be identical."""
    a, b = ((ROOT / part / "processor.py").read_text().splitlines() for part in ("extract", "student"))
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    assert len(a) == len(b) and all(i < 6 for i in differ), differ
