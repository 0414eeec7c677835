"""The committed OpenAPI document, rendered from the app itself."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from bridge.http.app import create_app
from bridge.http.settings import HttpSettings

#: Relative to the repository root.
OPENAPI_FILE = Path("docs/openapi.json")


def render_openapi() -> str:
    spec = create_app(None, HttpSettings()).openapi()
    return json.dumps(spec, indent=2, ensure_ascii=False) + "\n"


def write_openapi(root: Path) -> Path:
    path = root / OPENAPI_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_openapi(), encoding="utf-8")
    return path


def openapi_drift(root: Path) -> str | None:
    """``None`` when the committed file matches the app, else a unified diff (or a
    sentence when the file is missing)."""
    path = root / OPENAPI_FILE
    expected = render_openapi()
    if not path.is_file():
        return f"missing: {OPENAPI_FILE.as_posix()}"
    actual = path.read_text(encoding="utf-8")
    if actual == expected:
        return None
    diff = difflib.unified_diff(
        actual.splitlines(keepends=True),
        expected.splitlines(keepends=True),
        fromfile=f"committed {OPENAPI_FILE.as_posix()}",
        tofile="generated from the app",
        n=2,
    )
    return "".join(list(diff)[:200])
