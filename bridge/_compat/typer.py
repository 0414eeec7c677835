"""typer's private parts, in one place: flags without a ``<bool>`` in ``--help``, and
the current command's context for the CLI's ``--debug``.

typer 0.29 vendors click as ``typer._click`` and prints each option's type in the rich
help, ``<bool>`` too, although a flag takes no value (``--help`` included). Click's own
help leaves flags without a type; :func:`hide_flag_types` does the same for typer's.
"""

from __future__ import annotations

from typing import Any

import typer.core
from typer._click.globals import get_current_context

from bridge._compat import require

TYPER_VERSION = require("typer", "0.29", "0.30")

_DEBUG_KEY = "kiosk_bridge.debug"


def hide_flag_types() -> None:
    """Make flags show no type in the rich help. Idempotent."""
    option = typer.core.TyperOption
    if getattr(option.display_type_rich, "_kb_patched", False):
        return
    original = option.display_type_rich

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        if self.is_flag and self.metavar is None:
            return None
        result: str | None = original(self, ctx)
        return result

    display_type_rich._kb_patched = True  # type: ignore[attr-defined]
    option.display_type_rich = display_type_rich  # type: ignore[method-assign]


def set_debug(ctx: typer.Context, debug: bool) -> None:
    """Remember ``--debug`` for every command under ``ctx`` (``meta`` is shared by the
    whole context tree)."""
    ctx.meta[_DEBUG_KEY] = debug


def debug_enabled() -> bool:
    """Whether the root command was given ``--debug``."""
    ctx = get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(_DEBUG_KEY, False))
