"""The docs against the program: every ``kiosk-bridge ...`` command line in README.md and
docs/*.md parses with the CLI (an unknown command or flag fails), and the README's
exit-code table is the one :mod:`bridge.exit_codes` renders."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main

from bridge import exit_codes
from bridge.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"`(kiosk-bridge [^`]+)`")
#: Shell operators between commands (spaced, as the docs write them).
OPERATORS = re.compile(r"\s(?:&&|\|\||\||;)\s")
TABLE_START = "<!-- exit-codes:start (generated from bridge/exit_codes.py) -->"
TABLE_END = "<!-- exit-codes:end -->"


def command_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, command) of each ``kiosk-bridge`` invocation: in fenced blocks the
    command lines (in a block with ``$`` prompts only those: the rest is output), with
    ``\\`` continuations joined; and inline code in prose."""
    block: list[tuple[int, str]] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                yield from _block_commands(block)
                block = None
            continue
        if block is not None:
            block.append((number, line))
            continue
        for match in INLINE.finditer(line):
            yield number, match.group(1)


def _block_commands(lines: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    prompted = any(line.lstrip().startswith("$ ") for _, line in lines)
    pending: tuple[int, str] | None = None
    for number, line in lines:
        stripped = line.strip()
        if pending is not None:
            start, joined = pending
            stripped, number, pending = f"{joined} {stripped}", start, None
        elif prompted:
            if not stripped.startswith("$ "):
                continue
            stripped = stripped[2:]
        if stripped.endswith("\\"):
            pending = (number, stripped[:-1].rstrip())
            continue
        for part in OPERATORS.split(stripped):
            if part.strip().startswith("kiosk-bridge "):
                yield number, part.strip()


def variants(command: str) -> list[list[str]]:
    """The argv of ``command`` (without ``kiosk-bridge``); a word like ``a|b|c`` in prose
    stands for each alternative."""
    words = shlex.split(command, comments=True)[1:]
    out: list[list[str]] = [[]]
    for word in words:
        if word == "...":
            continue  # "and the rest", in prose and examples
        choices = word.split("|") if "|" in word and not word.startswith("-") else [word]
        out = [[*argv, choice] for argv in out for choice in choices]
    return out


def parse(argv: list[str]) -> None:
    """Resolve ``argv`` through the command tree as the CLI would, without running it:
    raises the CLI's usage error for an unknown command, option or extra argument.

    Only the parser runs (not the values' checks): the docs write placeholders (``ID``,
    ``URL``) and leave out options a real run requires."""
    command: Any = typer.main.get_command(app)
    name, args, parent = "kiosk-bridge", list(argv), None
    while True:
        ctx = command.make_context(name, [], parent=parent, resilient_parsing=True)
        ctx.resilient_parsing = False
        _, rest, _ = command.make_parser(ctx).parse_args(list(args))
        if not hasattr(command, "resolve_command"):
            if rest:
                raise AssertionError(f"unexpected extra arguments: {rest}")
            return
        if not rest:
            return
        name, command, args = command.resolve_command(ctx, rest)
        if command is None:
            raise AssertionError(f"no such command: {rest[0]}")
        parent = ctx


def documented() -> list[Any]:
    found = []
    for path in DOCS:
        for number, command in command_lines(path.read_text(encoding="utf-8")):
            where = f"{path.relative_to(ROOT)}:{number}"
            found.append(pytest.param(command, id=f"{where} {command[:60]}"))
    return found


DOCUMENTED = documented()


def test_the_docs_have_command_lines() -> None:
    assert len(DOCUMENTED) > 40


@pytest.mark.parametrize("command", DOCUMENTED)
def test_documented_command_parses(command: str) -> None:
    for argv in variants(command):
        try:
            parse(argv)
        except Exception as exc:
            pytest.fail(f"`{command}` does not parse: {exc}")


@pytest.mark.parametrize(
    "command",
    [
        "kiosk-bridge devcies",
        "kiosk-bridge devices --no-such-flag",
        "kiosk-bridge device shw ID",
        "kiosk-bridge commands show ID --colour",
    ],
)
def test_the_check_catches_unknown_commands_and_flags(command: str) -> None:
    with pytest.raises(Exception, match=r"(?i)no such (command|option)"):
        for argv in variants(command):
            parse(argv)


def test_extraction() -> None:
    text = (
        "Run `kiosk-bridge device enroll|revoke ID` or:\n"
        "```console\n"
        "$ kiosk-bridge run --broker URL \\\n"
        "      --db URL   # a comment\n"
        "kiosk-bridge top  12:00:00Z  (output, not a command)\n"
        "$ pip install -e . && kiosk-bridge demo | tee out\n"
        "```\n"
    )
    found = list(command_lines(text))
    assert found == [
        (1, "kiosk-bridge device enroll|revoke ID"),
        (3, "kiosk-bridge run --broker URL --db URL   # a comment"),
        (6, "kiosk-bridge demo"),
    ]
    assert variants(found[0][1]) == [["device", "enroll", "ID"], ["device", "revoke", "ID"]]
    assert variants(found[1][1]) == [["run", "--broker", "URL", "--db", "URL"]]


def test_readme_exit_code_table_is_generated() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert TABLE_START in readme and TABLE_END in readme, "README lost the exit-code markers"
    shown = readme.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    assert shown == exit_codes.markdown_table(), (
        "README's exit-code table differs from bridge/exit_codes.py; paste:\n"
        + exit_codes.markdown_table()
    )
