"""Every line of the threat table in mosquitto/README.md is backed by a test that exists:
a renamed or deleted test must take its line with it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "mosquitto" / "README.md"
_NAMED = re.compile(r"`(?P<file>test_[a-z0-9_]+\.py)?::(?P<test>test_[a-z0-9_]+)(\[[^\]]*\])?`")


def _table_rows() -> list[str]:
    text = README.read_text()
    section = text.split("## Threats:", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "`" in line]


def _tests_in(file: str) -> set[str]:
    tree = ast.parse((ROOT / "tests" / file).read_text())
    return {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def test_every_threat_line_names_tests_that_exist() -> None:
    rows = _table_rows()
    assert len(rows) >= 7
    missing = []
    for row in rows:
        named = list(_NAMED.finditer(row))
        assert named, f"no test named for: {row[:80]}"
        current = None
        for match in named:
            current = match["file"] or current
            assert current is not None, row[:80]
            if match["test"] not in _tests_in(current):
                missing.append(f"{current}::{match['test']}")
    assert missing == []
