"""How fast the CLI starts (issue 19's 0.5 s goal), beside its floor.

Each figure is the best of N runs of a real process (the machine is shared: a single
run measures the load). The commands:

- ``kiosk-bridge --help``, ``devices --help``, ``send --help``;
- ``kiosk-bridge devices --json`` on a SQLite database with 100 devices.

The floor is the simplest program doing the same work in the same run, with the same
interpreter: a two-command typer app printing its ``--help``, and for ``devices`` the
same app reading the same rows with the ``sqlite3`` module and printing them as JSON.
The ratio is what kiosk-bridge adds. ``tests/test_cli_startup_time.py`` keeps the heavy
libraries out of ``--help`` (an import check, not a timing).

    python bench/cli_startup.py [--runs 5] [--json bench/results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Result, workdir

from bridge.db.engine import create_schema, make_engine

NAME = "cli start-up"
GOAL_S = 0.5
DEVICES = 100
HELPS = (("--help",), ("devices", "--help"), ("send", "--help"))

FLOOR_APP = """
import json, sqlite3, sys
import typer

app = typer.Typer()

@app.command()
def devices(db: str = "", as_json: bool = typer.Option(False, "--json")) -> None:
    \"\"\"The fleet.\"\"\"
    query = "SELECT device_identifier, name, status FROM remotes"
    rows = sqlite3.connect(db).execute(query).fetchall()
    print(json.dumps([{"id": i, "name": n, "status": s} for i, n, s in rows]))

@app.command()
def send(device: str = "") -> None:
    \"\"\"Send a command.\"\"\"

app()
"""


def _kiosk_bridge() -> list[str]:
    # The interpreter's own console script, not a shim earlier on PATH (pyenv's adds
    # a bash and a second exec, ~0.1 s, that an installed kiosk-bridge does not have).
    script = Path(sys.executable).with_name("kiosk-bridge")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "bridge"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KB_")}


def best_of(cmd: list[str], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, env=_env(), timeout=60)
        best = min(best, time.perf_counter() - started)
        # 4: the table printed, with the warning that no bridge has written this database.
        if done.returncode not in (0, 4):
            raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr[-300:]!r}")
    return best


def fill(db_url: str) -> None:
    engine = make_engine(db_url)
    create_schema(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO remotes (device_identifier, name, status, remote_control_enabled)"
            " VALUES (?, ?, ?, 0)",
            [(f"kiosk-{i:04d}", f"Kiosk {i}", "Disconnected") for i in range(DEVICES)],
        )
    engine.dispose()


def run(runs: int) -> Result:
    result = Result(NAME)
    kb = _kiosk_bridge()
    with workdir() as tmp:
        work = Path(tmp)
        db_path = work / "bench.db"
        fill(f"sqlite:///{db_path}")
        floor_app = work / "floor_app.py"
        floor_app.write_text(FLOOR_APP)
        floor = [sys.executable, str(floor_app)]
        pairs: dict[str, tuple[list[str], list[str]]] = {
            " ".join(args): ([*kb, *args], [*floor, *args]) for args in HELPS
        }
        pairs["devices --json (100 rows)"] = (
            [*kb, "devices", "--json", "--db", f"sqlite:///{db_path}"],
            [*floor, "devices", "--json", "--db", str(db_path)],
        )
        for label, (ours, simplest) in pairs.items():
            # Taking turns, so that a burst of load hits both alike.
            ours_s = best_of(ours, runs)
            floor_s = best_of(simplest, runs)
            result.figures[f"{label} s (floor)"] = f"{ours_s:.3f} ({floor_s:.3f})"
            result.figures[f"{label} ratio"] = round(ours_s / floor_s, 2)
            result.figures[f"{label} within {GOAL_S} s"] = ours_s < GOAL_S
    result.notes.append(
        f"best of {runs} real processes each; floor: a two-command typer app, the same "
        "interpreter, reading the same rows with sqlite3 for devices"
    )
    return result


def collect(scale: float) -> list[Result]:
    return [run(5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="merge the result into")
    args = parser.parse_args()
    result = run(args.runs)
    result.print()
    if args.json is not None:
        existing: list[dict[str, Any]] = []
        if args.json.is_file():
            existing = json.loads(args.json.read_text())
        kept = [entry for entry in existing if entry.get("name") != NAME]
        args.json.write_text(json.dumps([*kept, result.to_json()], indent=2) + "\n")
        print(f"\nmerged into {args.json}")


if __name__ == "__main__":
    main()
