"""docs/CONTRACT.md's clause ids: well-formed, defined once, all indexed, all known.

A clause is defined where its id stands in bold (``**KB-PRES-1**``) at the start of a
sentence or bullet; everywhere else an id is a reference. Tests, logs and the
conformance kit cite these ids, so a typo or a duplicate would send a reader to the
wrong rule.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

CONTRACT = Path(__file__).resolve().parents[1] / "docs" / "CONTRACT.md"
TEXT = CONTRACT.read_text(encoding="utf-8")

#: KB-<PREFIX>-<n>: the prefixes in use, each a part of the contract.
PREFIXES = ("CONN", "TOP", "ID", "PAY", "PRES", "NET", "STAT", "CMD", "CFG", "PROV", "CMS")
WELL_FORMED = re.compile(rf"^KB-(?:{'|'.join(PREFIXES)})-[1-9][0-9]*$")
# Anything that looks like an id, well-formed or not (KB-pres-1, KB-PRES-01, KB-FOO-2).
ANY_ID = re.compile(r"\bKB-[A-Za-z]+-[0-9A-Za-z]+\b")
DEFINITION = re.compile(r"\*\*(KB-[A-Za-z]+-[0-9A-Za-z]+)\*\*")
INDEX_ROW = re.compile(r"^\| (KB-[A-Z]+-[0-9]+) \| .+ \|$", re.MULTILINE)

#: The ids the conformance kit checks (issue 18); each must be defined here.
KIT_IDS = (
    "KB-CONN-1", "KB-CONN-2", "KB-CONN-3",
    "KB-PRES-1", "KB-PRES-2", "KB-PRES-3", "KB-PRES-4", "KB-PRES-5", "KB-PRES-6",
    "KB-NET-1", "KB-NET-2", "KB-NET-3",
    "KB-STAT-1",
    "KB-CMD-1", "KB-CMD-2", "KB-CMD-3", "KB-CMD-4", "KB-CMD-5", "KB-CMD-6", "KB-CMD-7",
)  # fmt: skip


def _definitions() -> list[str]:
    return DEFINITION.findall(TEXT)


def _index() -> list[str]:
    section = TEXT.split("## Clause index", 1)[1]
    return INDEX_ROW.findall(section)


def test_every_id_in_the_document_is_well_formed() -> None:
    bad = sorted({found for found in ANY_ID.findall(TEXT) if not WELL_FORMED.match(found)})
    assert bad == []


def test_every_clause_is_defined_once() -> None:
    defined = _definitions()
    assert len(defined) >= 60
    duplicates = sorted({cid for cid in defined if defined.count(cid) > 1})
    assert duplicates == []


def test_every_referenced_id_is_defined() -> None:
    defined = set(_definitions())
    referenced = set(ANY_ID.findall(TEXT))
    assert sorted(referenced - defined) == []


def test_definitions_start_a_sentence_or_a_bullet() -> None:
    # "- **KB-X-1** ...", "1. **KB-X-1** ...", "**KB-X-1** ..." at a line start, or a
    # second clause within a numbered step ("   **KB-X-2** ...").
    starts = re.compile(r"^\s*(?:(?:[-*]|\d+\.)\s+)?\*\*KB-")
    lines_with_defs = [line for line in TEXT.splitlines() if DEFINITION.search(line)]
    misplaced = [line for line in lines_with_defs if not starts.match(line)]
    assert misplaced == []


def test_the_clause_index_lists_every_clause_once() -> None:
    index = _index()
    assert len(index) == len(set(index))
    assert set(index) == set(_definitions())


def test_the_clauses_the_kit_checks_are_defined() -> None:
    assert sorted(set(KIT_IDS) - set(_definitions())) == []


def test_every_clause_the_kit_defines_is_in_the_contract() -> None:
    # The kit is built alongside; read its registry only if it is there.
    try:
        clauses = importlib.import_module("bridge.conformance.clauses")
    except ImportError:
        pytest.skip("bridge.conformance.clauses is not there yet")
    registry = getattr(clauses, "CLAUSES", None)
    if registry is None:
        pytest.skip("bridge.conformance.clauses has no CLAUSES")
    kit_ids = [str(getattr(clause, "id", clause)) for clause in registry]
    assert kit_ids
    assert sorted(set(kit_ids) - set(_definitions())) == []
