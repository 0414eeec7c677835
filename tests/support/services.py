"""Skip-or-fail for missing external services: a skip locally, a failure under CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def service_unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it when ``CI=true`` (CI must never silently skip)."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(reason)
