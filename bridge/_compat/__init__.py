"""Where kiosk-bridge reaches into a library's private parts: one module per library.

Each module checks, when it is imported, that the installed version is one it was
written and tested for, and fails with :class:`UnsupportedLibrary` naming the supported
range otherwise: a private attribute that moved would otherwise break at run time, far
from its cause (a kiosk that never goes ``lost``, a bridge that reads nothing).
``pyproject.toml`` pins the same ranges.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version


class UnsupportedLibrary(ImportError):
    """An installed library version this code was not written for."""


def _release(text: str) -> tuple[int, ...]:
    """The release numbers of a version ("0.12.1rc1" -> (0, 12, 1))."""
    match = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def require(distribution: str, at_least: str, below: str) -> str:
    """The installed version of ``distribution``; raises :class:`UnsupportedLibrary`
    unless ``at_least <= version < below``."""
    try:
        installed = version(distribution)
    except PackageNotFoundError:
        raise UnsupportedLibrary(f"{distribution} is not installed") from None
    if not _release(at_least) <= _release(installed) < _release(below):
        raise UnsupportedLibrary(
            f"{distribution} {installed} is installed; kiosk-bridge uses private parts of "
            f"{distribution} and supports >={at_least},<{below} "
            f"(pip install '{distribution}>={at_least},<{below}')"
        )
    return installed


__all__ = ["UnsupportedLibrary", "require"]
