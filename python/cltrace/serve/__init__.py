"""``cltrace serve``: cltrace's own offline viewer for attribution graphs, with experiments.

* :func:`make_server` — an HTTP server over a folder of graphs (see :mod:`.server`);
  given a loaded :class:`~cltrace.ReplacementModel` it also runs interventions for the page
  (see :mod:`.experiments`).
* :func:`show` — the same viewer inline in a Jupyter notebook (see :mod:`.notebook`).

The viewer (``assets/index.html``, ``viewer.js``, ``panels.js``, ``viewer.css``; the lens page
``lens.html`` and ``lens.js``, which reuse its feature card) is written for cltrace, ships as
package data and makes no request to another host.
"""
from __future__ import annotations

from .experiments import Experiments, RequestError
from .notebook import Viewer, show
from .server import list_graphs, list_lenses, make_server, safe_path, save_qparams, serve_in_thread

__all__ = ["Experiments", "RequestError", "Viewer", "list_graphs", "list_lenses", "make_server", "safe_path",
           "save_qparams", "serve_in_thread", "show"]
