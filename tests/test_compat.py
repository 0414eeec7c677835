"""The version gate of bridge._compat: private library parts are used only on versions
they were written for, and anything else fails at import with the supported range."""

from __future__ import annotations

import pytest

from bridge._compat import UnsupportedLibrary, require
from bridge._compat.aiomqtt import AIOMQTT_VERSION, PAHO_VERSION
from bridge._compat.amqtt import AMQTT_VERSION


def test_installed_versions_are_the_supported_ones() -> None:
    assert AIOMQTT_VERSION.startswith("2.5.")
    assert PAHO_VERSION.startswith(("2.1", "2.2"))
    assert AMQTT_VERSION.startswith("0.12.")


def test_a_version_outside_the_range_names_the_range() -> None:
    with pytest.raises(UnsupportedLibrary, match=r"supports >=9\.0,<10 .*pip install"):
        require("aiomqtt", "9.0", "10")
    with pytest.raises(UnsupportedLibrary, match=r"supports >=0,<2\.5"):
        require("aiomqtt", "0", "2.5")


def test_a_missing_library_is_named() -> None:
    with pytest.raises(UnsupportedLibrary, match="no-such-dist-kb is not installed"):
        require("no-such-dist-kb", "1", "2")
