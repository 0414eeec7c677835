"""The verdicts as a rich table or as JSON, and the exit code they mean."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from bridge.conformance.clauses import Outcome, Verdict

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_KIOSK_CMD = 2
EXIT_BROKER = 3

_STYLE = {Outcome.PASS: "green", Outcome.FAIL: "bold red", Outcome.NOT_APPLICABLE: "dim"}


def exit_code(verdicts: list[Verdict]) -> int:
    """0 when every mandatory clause passed (or does not apply), else 1."""
    failed = [v for v in verdicts if v.clause.mandatory and v.outcome is Outcome.FAIL]
    return EXIT_FAIL if failed else EXIT_PASS


def as_dict(
    verdicts: list[Verdict], *, kiosk_cmd: str, device_id: str, broker: str, duration_s: float
) -> dict[str, Any]:
    return {
        "kiosk_cmd": kiosk_cmd,
        "device_id": device_id,
        "broker": broker,
        "duration_s": round(duration_s, 2),
        "passed": exit_code(verdicts) == EXIT_PASS,
        "clauses": [
            {
                "id": v.clause.id,
                "title": v.clause.title,
                "mandatory": v.clause.mandatory,
                "outcome": v.outcome.value,
                "detail": v.detail,
            }
            for v in verdicts
        ],
    }


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)


def print_table(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"kiosk conformance: {report['device_id']} on {report['broker']}")
    table.add_column("clause", no_wrap=True)
    table.add_column("title")
    table.add_column("result", no_wrap=True)
    table.add_column("seen")
    for row in report["clauses"]:
        outcome = Outcome(row["outcome"])
        table.add_row(
            row["id"], row["title"], f"[{_STYLE[outcome]}]{outcome.value}[/]", row["detail"]
        )
    console.print(table)
    failed = sum(1 for row in report["clauses"] if row["outcome"] == Outcome.FAIL.value)
    verdict = "[green]conformant[/]" if report["passed"] else f"[bold red]{failed} failed[/]"
    console.print(f"{verdict} in {report['duration_s']:.1f} s")
