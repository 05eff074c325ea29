"""`pytest tests/test_store_imports.py -q`: store/ imports nothing of ours and no torch."""

from __future__ import annotations

import ast
from pathlib import Path

STORE = Path(__file__).resolve().parents[1] / "store"


def test_store_imports_only_itself_and_third_party():
    for path in sorted(STORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside store/
                    continue
                names = [node.module]
            else:
                continue
            for name in names:
                assert not name.startswith(("modkd", "extract", "student", "pipelines", "torch")), f"{path.name} imports {name}"
