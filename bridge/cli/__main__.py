"""``python -m bridge.cli``: the ``kiosk-bridge`` command where the script is not on PATH
(a source checkout without ``pip install``; the conformance tests fall back to it)."""

from bridge.cli import app

if __name__ == "__main__":
    # The program name the help and usage lines show, not "__main__.py".
    app(prog_name="kiosk-bridge")
