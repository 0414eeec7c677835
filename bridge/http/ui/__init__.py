"""The fleet page (issue 21): a read-only, live view of the fleet at ``/``.

``router`` is included by :func:`bridge.http.app.create_app`. Access and its threat
model are in :mod:`bridge.http.ui.auth`; the reads in :mod:`bridge.http.ui.queries`;
the page itself is ``static/`` (vanilla JS and CSS, no external resource).
"""

from bridge.http.ui.routes import router

__all__ = ["router"]
