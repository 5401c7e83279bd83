"""circuit-tracer's ``config.yaml``: a transcoder set listed file by file.

circuit-tracer publishes sets as a folder with a ``config.yaml`` whose ``transcoders`` list
gives, for layer i, the i-th file, often a URI ``hf://owner/repo/path/file[?revision=...]``
into another repository (for Gemma Scope 2, Google's ``params.safetensors`` files), and whose
``model_kind`` is ``transcoder_set`` or ``cross_layer_transcoder``. The files themselves are in
one of the layouts of :mod:`.gemmascope` or :mod:`.circuit_tracer`; URIs are fetched with
huggingface_hub (honouring ``HF_HUB_OFFLINE``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import parse_qs, urlparse

from . import circuit_tracer as ct
from . import gemmascope as gs
from .base import TranscoderSet
from .checks import TranscoderLoadError, read_sites


def read_yaml(folder: Path) -> dict:
    try:
        import yaml
    except ImportError as e:
        raise ImportError("reading circuit-tracer's config.yaml needs PyYAML "
                          "(pip install pyyaml)") from e
    path = folder / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise TranscoderLoadError(f"{path}: unreadable config ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("transcoders"), list):
        raise TranscoderLoadError(f"{path}: no 'transcoders' list of files (cltrace reads "
                                  "config.yaml files that list each layer's file)")
    return config


def load_yaml_set(folder: Path, layers: Optional[Sequence[int]],
                  model_n_layers: Optional[int], where: str) -> TranscoderSet:
    """The set a ``config.yaml`` in ``folder`` lists (only ``layers`` when given)."""
    config = read_yaml(folder)
    entries = config["transcoders"]
    wanted = range(len(entries)) if layers is None else layers
    bad = sorted(set(wanted) - set(range(len(entries))))
    if bad:
        raise TranscoderLoadError(f"{where}: no transcoders for layers {bad} (config.yaml "
                                  f"lists {len(entries)})")
    clt = config.get("model_kind") == "cross_layer_transcoder"
    n_layers = model_n_layers or len(entries)
    out, files, acts = {}, [], set()
    for i in sorted(set(wanted)):
        path = _fetch(str(entries[i]), folder, where)
        files.append(str(path))
        w = f"{where} layer {i} ({entries[i]})"
        if clt and gs.CLT_FILE.fullmatch(path.name):
            out[i] = gs.load_clt_layer(path, i, n_layers, {}, w)
        elif path.name == "params.safetensors":
            _fetch_sibling(str(entries[i]), "config.json")
            out[i], cfg = gs.load_plt_layer(path.parent, w)
            if read_sites(cfg, i, w) != ("mlp_in", "mlp_out"):
                raise TranscoderLoadError(f"{w}: config.json's hook points are not the MLP "
                                          "input and output: circuit-tracer lists transcoders")
        elif not clt:
            out[i], act = ct.load_plt_layer(path, w)
            acts.add(act)
        else:
            raise TranscoderLoadError(f"{w}: cannot read a cross-layer transcoder from "
                                      f"{path.name}")
    info = {"files": files, "scan": config.get("scan_name") or config.get("scan", "")}
    if acts:
        info["activation"] = "/".join(sorted(acts))
    return TranscoderSet("clt" if clt else "plt", n_layers, out,
                         model_name=str(config.get("model_name", "")), info=info)


def _fetch(entry: str, folder: Path, where: str) -> Path:
    if not entry.startswith("hf://"):
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise FileNotFoundError(f"{where}: config.yaml lists {entry}, which does not exist")
        return path
    import huggingface_hub as hf

    repo_id, filename, revision = _parse_uri(entry)
    try:
        return Path(hf.hf_hub_download(repo_id, filename, revision=revision))
    except Exception as e:
        raise FileNotFoundError(f"{where}: cannot get {entry} (not in the Hugging Face cache "
                                f"and the Hub cannot be reached or refused): {e}") from e


def _fetch_sibling(entry: str, name: str) -> None:
    """Also fetch ``name`` next to an hf:// entry (e.g. Gemma Scope 2's config.json)."""
    if entry.startswith("hf://"):
        import huggingface_hub as hf

        repo_id, filename, revision = _parse_uri(entry)
        try:
            hf.hf_hub_download(repo_id, f"{filename.rpartition('/')[0]}/{name}",
                               revision=revision)
        except Exception:  # optional: without it the hook points are not checked
            pass


def _parse_uri(uri: str) -> tuple[str, str, Optional[str]]:
    """``hf://owner/repo/path/file?revision=r`` -> ("owner/repo", "path/file", "r")."""
    u = urlparse(uri)
    repo, _, filename = u.path.lstrip("/").partition("/")
    if not u.netloc or not repo or not filename:
        raise TranscoderLoadError(f"bad Hugging Face URI {uri!r} "
                                  "(expected hf://owner/repo/path/file)")
    revision = parse_qs(u.query).get("revision", [None])[0]
    return f"{u.netloc}/{repo}", filename, revision
