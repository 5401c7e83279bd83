"""The HTTP server of ``cltrace serve``: cltrace's own viewer over a folder of graphs.

Routes (all answered from this machine; the page makes no request to another host):

  GET  /                      the viewer (assets shipped in ``cltrace/serve/assets``)
  GET  /assets/<name>         its script and style sheet
  GET  /api/graphs            the graphs in DIR: entries of every ``graph-metadata.json``
                              (DIR and its sub-folders, 2 levels) plus other graph JSONs
  GET  /lens.html              the lens page: a ``cltrace lens --json`` file as a token x layer
                              grid whose cells open the feature card
  GET  /api/lenses            the lens JSONs in DIR and its sub-folders (1 level)
  GET  /contrast.html         the contrast page: a ``cltrace contrast`` report (plots, ranked
                              table, feature cards, links to the sets' common circuits)
  GET  /api/contrasts         the contrast reports in DIR and its sub-folders (1 level)
  GET  /api/model             whether experiments are available (model loaded) and its sizes
  GET  /data/<path>           a file inside DIR (graphs, feature pages); ``..``, absolute
                              paths and symlinks leading out of DIR get 404
  GET  /image/<path>          an image file inside DIR (the copies ``attribute --image`` writes
                              beside a graph), as the viewer shows it: PNG, JPEG, GIF, WebP and
                              BMP as they are; other formats Pillow reads (PPM, TIFF, ...)
                              converted to PNG; the same path rules as /data/, 404 for a file
                              that is not an image, 415 when it cannot be converted
  POST /api/save              ``{"graph": path, "qParams": {"pinnedIds": [...],
                              "supernodes": [[name, id, ...], ...]}}``: the only write; it
                              replaces those two fields of the graph's ``qParams`` atomically
                              (temporary file in the same folder, then ``os.replace``)
  POST /api/intervene         ``{"graph": path, "interventions": [...], "mode", ...}``: see
                              :mod:`cltrace.serve.experiments` (400 with a message if invalid)
  GET  /api/sae               whether lens-page steering is available (``--sae`` sets loaded)
  POST /api/steer_sae         ``{"lens": path, "set", "layer", "latent", "op", "value", ...}``:
                              steer one SAE latent on the lens's prompt; see
                              :mod:`cltrace.serve.lens_steer` (400 with a message if invalid)

Any other method or path answers 404/405. The server binds 127.0.0.1 unless told otherwise;
then it answers only requests addressed to a loopback name (no DNS rebinding), and a write
must be JSON from the page's own origin (no cross-site form posts): 403 otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

from .experiments import Experiments, RequestError
from .lens_steer import LensSteering

ASSET_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
DATA_TYPES = {".json": "application/json", ".svg": "image/svg+xml", ".png": "image/png",
              ".dot": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8"}
BROWSER_IMAGES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                  ".webp": "image/webp", ".bmp": "image/bmp"}  # raster formats every browser shows
CONVERTED_IMAGES = (".ppm", ".pgm", ".pbm", ".pnm", ".tif", ".tiff", ".tga", ".ico")  # sent as PNG
MAX_IMAGE_PIXELS = 50_000_000  # larger files are not decoded (a decompression bomb guard)
MAX_BODY = 1 << 20  # save/intervene requests are small
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
ASSETS = ("viewer.js", "panels.js", "heatmap.js", "images.js", "viewer.css", "lens.js", "contrast.js")  # what the pages load
LENS_HEAD = b'{"format":"cltrace.lens/'  # how a lens JSON (cltrace lens --json) starts
CONTRAST_HEAD = b'{"format":"cltrace.contrast/'  # how a contrast report (cltrace contrast) starts


def asset(name: str) -> bytes:
    """A viewer file shipped as package data (``index.html``, ``viewer.js``, ``viewer.css``)."""
    return resources.files("cltrace.serve").joinpath("assets", name).read_bytes()


def safe_path(root: Path, rel: str) -> Optional[Path]:
    """``root/rel`` if it names an existing file inside ``root`` (after resolving symlinks);
    None for ``..``, absolute paths, backslashes, NUL or anything leading out."""
    if not rel or rel.startswith(("/", "\\")) or "\\" in rel or "\x00" in rel:
        return None
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
        return None
    path = (root / rel)
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not real.is_file() or not real.is_relative_to(root.resolve()):
        return None
    return real


def image_as_png(path: Path) -> bytes:
    """The image file at ``path`` as PNG bytes, decoded with Pillow (RGB or RGBA kept, other
    modes converted to RGB). ValueError when Pillow is missing, the file is not an image it
    reads, or it holds more than MAX_IMAGE_PIXELS pixels."""
    import io

    try:
        from PIL import Image
    except ImportError:
        raise ValueError("Pillow is not installed (pip install pillow): cannot convert the image") from None
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{path.name}: {im.width}x{im.height} pixels is too large to show")
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path.name}: not an image Pillow can read ({e})") from None
    return buf.getvalue()


def _peek_is_graph(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return not head.startswith((LENS_HEAD, CONTRAST_HEAD)) and (b'"nodes"' in head or b'"metadata"' in head)


def list_graphs(root: Path) -> list[dict]:
    """Graphs under ``root``: ``{path, slug, prompt}`` from each graph-metadata.json (in root
    and its sub-folders) whose ``{slug}.json`` exists, then the other JSON files that look like
    graphs in root and in those folders."""
    out, seen = [], set()
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    for folder in folders:
        meta = folder / "graph-metadata.json"
        if meta.is_file():
            try:
                entries = json.loads(meta.read_text()).get("graphs", [])
            except (OSError, ValueError, AttributeError):
                entries = []
            for e in entries:
                f = folder / f"{e.get('slug', '')}.json"
                if isinstance(e, dict) and f.is_file():
                    rel = f.relative_to(root).as_posix()
                    seen.add(rel)
                    out.append({"path": rel, "slug": e.get("slug"), "prompt": e.get("prompt", "")})
    for folder in [f for f in folders if f == root or (f / "graph-metadata.json").is_file()]:
        for f in sorted(folder.glob("*.json")):  # (not feature-page folders: thousands of files)
            rel = f.relative_to(root).as_posix()
            if rel in seen or f.name == "graph-metadata.json" or f.is_symlink():
                continue
            if _peek_is_graph(f):
                out.append({"path": rel, "slug": f.stem, "prompt": ""})
    return out


def list_lenses(root: Path, head_: bytes = LENS_HEAD) -> list[dict]:
    """``{path}`` of every lens JSON (``cltrace lens --json``) in ``root`` and its sub-folders
    (``head_``: of every JSON starting so)."""
    out = []
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    for folder in folders:
        for f in sorted(folder.glob("*.json")):
            if f.is_symlink():
                continue
            try:
                with open(f, "rb") as fh:
                    head = fh.read(len(head_))
            except OSError:
                continue
            if head == head_:
                out.append({"path": f.relative_to(root).as_posix()})
    return out


def list_contrasts(root: Path) -> list[dict]:
    """``{path}`` of every contrast report (``cltrace contrast``) in ``root`` and its sub-folders."""
    return list_lenses(root, CONTRAST_HEAD)


def save_qparams(root: Path, rel: str, qparams: dict) -> dict:
    """Write ``pinnedIds`` and ``supernodes`` into the graph's ``qParams``, atomically."""
    path = safe_path(root, rel)
    if path is None or path.suffix != ".json":
        raise FileNotFoundError(rel)
    pinned = qparams.get("pinnedIds", [])
    supernodes = qparams.get("supernodes", [])
    if not isinstance(pinned, list) or not all(isinstance(x, str) for x in pinned):
        raise RequestError("pinnedIds must be a list of node ids")
    if not isinstance(supernodes, list) or not all(
            isinstance(s, list) and len(s) >= 2 and all(isinstance(x, str) for x in s)
            for s in supernodes):
        raise RequestError("supernodes must be a list of [name, node_id, ...] lists")
    graph = json.loads(path.read_text())
    ids = {n.get("node_id") for n in graph.get("nodes", [])}
    unknown = [x for x in pinned + [i for s in supernodes for i in s[1:]] if x not in ids]
    if unknown:
        raise RequestError(f"unknown node ids: {', '.join(unknown[:5])}")
    q = graph.get("qParams") or {}
    q["pinnedIds"], q["supernodes"] = pinned, supernodes
    graph["qParams"] = q
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(graph, f, separators=(",", ":"))
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"saved": rel, "pinnedIds": len(pinned), "supernodes": len(supernodes)}


class Handler(BaseHTTPRequestHandler):
    """Request handler; ``server.root`` (DIR) and ``server.experiments`` set by make_server."""

    server_version = "cltrace-serve"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet unless asked
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)

    # --- responses ---------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                         "style-src 'self' 'unsafe-inline'; connect-src 'self'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _file(self, path: Path, ctype: Optional[str] = None) -> None:
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", ctype or DATA_TYPES.get(path.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(size))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
        self.end_headers()
        if self.command != "HEAD":
            with open(path, "rb") as f:
                shutil.copyfileobj(f, self.wfile, 1 << 20)

    # --- methods -----------------------------------------------------------------------------
    def _foreign(self) -> Optional[str]:
        """Why a request comes from another site, or None. Bound to a loopback address, the
        server answers only requests addressed to a loopback name (no DNS rebinding); a write
        must be JSON (a cross-site form cannot send that without a CORS preflight, which the
        server never grants) from no or the same origin."""
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
        if self.server.loopback and host not in LOOPBACK_NAMES:
            return f"Host {host!r} is not this machine"
        if self.command == "POST":
            origin = self.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
                return f"cross-origin request from {origin}"
            if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                return "writes must be sent as application/json"
        return None

    def do_GET(self):  # noqa: N802
        why = self._foreign()
        if why:
            return self._error(403, why)
        url = unquote(urlsplit(self.path).path)
        root: Path = self.server.root
        if url in ("/", "/index.html"):
            return self._send(200, asset("index.html"), ASSET_TYPES[".html"])
        if url in ("/lens.html", "/contrast.html"):
            return self._send(200, asset(url[1:]), ASSET_TYPES[".html"])
        if url.startswith("/assets/"):
            name = url[len("/assets/"):]
            if name in ASSETS:
                return self._send(200, asset(name), ASSET_TYPES[Path(name).suffix])
            return self._error(404, "not found")
        if url == "/api/graphs":
            return self._json({"graphs": list_graphs(root)})
        if url == "/api/lenses":
            return self._json({"lenses": list_lenses(root)})
        if url == "/api/contrasts":
            return self._json({"contrasts": list_contrasts(root)})
        if url == "/api/model":
            ex = self.server.experiments
            return self._json(ex.info() if ex is not None else {"available": False})
        if url == "/api/sae":
            ls = self.server.lens_steering
            return self._json(ls.info() if ls is not None else {"available": False})
        if url.startswith("/data/"):
            path = safe_path(root, url[len("/data/"):])
            if path is None:
                return self._error(404, "not found")
            return self._file(path)
        if url.startswith("/image/"):
            return self._image(safe_path(root, url[len("/image/"):]))
        return self._error(404, "not found")

    def _image(self, path: Optional[Path]) -> None:
        """GET /image/<path>: an image inside DIR as a browser shows it (see the module doc)."""
        suffix = path.suffix.lower() if path is not None else ""
        if suffix in BROWSER_IMAGES:
            return self._file(path, BROWSER_IMAGES[suffix])
        if suffix not in CONVERTED_IMAGES:
            return self._error(404, "not an image in the served folder")
        try:
            body = image_as_png(path)
        except ValueError as e:
            return self._error(415, str(e))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'none'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            self.close_connection = True  # the unread body must not be parsed as a request
            raise RequestError("request too large")
        try:
            return json.loads(self.rfile.read(n) or b"{}")
        except ValueError:
            raise RequestError("the request body is not JSON") from None

    def do_POST(self):  # noqa: N802
        why = self._foreign()
        if why:
            self.close_connection = True
            return self._error(403, why)
        url = urlsplit(self.path).path
        if url not in ("/api/save", "/api/intervene", "/api/steer_sae"):
            return self._error(405, "the server accepts no write other than /api/save")
        try:
            body = self._body()
            if url == "/api/steer_sae":
                return self._steer_sae(body)
            rel = body.get("graph") if isinstance(body, dict) else None
            if not isinstance(rel, str):
                raise RequestError("name the graph: {\"graph\": \"path/in/DIR.json\", ...}")
            if url == "/api/save":
                with self.server.save_lock:
                    return self._json(save_qparams(self.server.root, rel, body.get("qParams") or {}))
            ex = self.server.experiments
            if ex is None:
                return self._error(409, "no model loaded: start `cltrace serve` with --model/"
                                        "--transcoders to run experiments")
            return self._json(ex.run(self._graph(rel), body, safe_path(self.server.root, rel).parent))
        except FileNotFoundError:
            return self._error(404, "no such graph in the served folder")
        except RequestError as e:
            return self._error(400, str(e))
        except Exception as e:  # a bug, not the user's: say it on the page, keep serving
            self.log_error("error in %s: %r", url, e)
            return self._error(500, f"internal error: {type(e).__name__}: {e}")

    def _steer_sae(self, body) -> None:
        """POST /api/steer_sae: one SAE latent steered on the prompt of a lens JSON."""
        rel = body.get("lens") if isinstance(body, dict) else None
        if not isinstance(rel, str):
            raise RequestError("name the lens: {\"lens\": \"path/in/DIR.json\", ...}")
        ls = self.server.lens_steering
        if ls is None:
            return self._error(409, "no SAE loaded: start `cltrace serve DIR --sae SET` (the "
                                    "lens's set) to steer from the lens page")
        path = safe_path(self.server.root, rel)
        if path is None or path.suffix != ".json":
            return self._error(404, "no such lens in the served folder")
        try:
            lens = json.loads(path.read_text())
        except ValueError as e:
            raise RequestError(f"{rel} is not valid JSON ({e})") from None
        if not isinstance(lens, dict) or not str(lens.get("format", "")).startswith("cltrace.lens/"):
            raise RequestError(f"{rel} is not a lens JSON (cltrace lens --json)")
        return self._json(ls.run(lens, body, path.parent))

    def _graph(self, rel: str) -> dict:
        """The parsed graph JSON at ``rel``, cached while the file is unchanged."""
        path = safe_path(self.server.root, rel)
        if path is None or path.suffix != ".json":
            raise FileNotFoundError(rel)
        st = path.stat()
        key, cache = (st.st_mtime_ns, st.st_size), self.server.graph_cache
        hit = cache.get(path)
        if hit is None or hit[0] != key:
            try:
                graph = json.loads(path.read_text())
            except ValueError as e:
                raise RequestError(f"{rel} is not valid JSON ({e})") from None
            if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
                raise RequestError(f"{rel} is not a graph JSON (no 'nodes' list)")
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[path] = hit = (key, graph)
        return hit[1]

    def _refuse(self):
        self._error(405, "the server accepts no write other than /api/save")

    do_PUT = do_DELETE = do_PATCH = _refuse


def make_server(root, host: str = "127.0.0.1", port: int = 8000,
                experiments: Optional[Experiments] = None, rm=None,
                verbose: bool = False, saes=None) -> ThreadingHTTPServer:
    """A ready (not yet serving) server for folder ``root``; ``port=0`` picks a free port.
    Pass a loaded ReplacementModel as ``rm`` (or an :class:`Experiments`) to enable experiments,
    and :class:`~cltrace.steering.SaeSteering` objects as ``saes`` (a list, or a
    :class:`LensSteering`) to enable steering from the lens page."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    srv = ThreadingHTTPServer((host, port), Handler)
    srv.daemon_threads = True
    srv.root = root.resolve()
    srv.experiments = experiments if experiments is not None else (Experiments(rm) if rm is not None else None)
    srv.lens_steering = saes if isinstance(saes, LensSteering) or saes is None else LensSteering(saes)
    srv.save_lock = threading.Lock()
    srv.graph_cache = {}  # path -> ((mtime_ns, size), graph) for experiments
    srv.verbose = verbose
    srv.loopback = host in LOOPBACK_NAMES or host.startswith("127.")
    return srv


def serve_in_thread(srv: ThreadingHTTPServer) -> threading.Thread:
    """Run ``srv.serve_forever`` in a daemon thread (stop with ``srv.shutdown()``)."""
    t = threading.Thread(target=srv.serve_forever, daemon=True, name="cltrace-serve")
    t.start()
    return t
