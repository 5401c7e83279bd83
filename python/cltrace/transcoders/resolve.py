"""Finding a transcoder set: which layout a folder holds and which files to read or download.

A reference is a local folder or a Hugging Face reference ``owner/repo/sub/folder[@revision]``.
Both are planned the same way, from the list of file names under the folder (two levels
deep): Gemma Scope 2 PLT folder(s) or CLT, circuit-tracer PLT or CLT, or circuit-tracer's
config.yaml listing the files (see :mod:`.gemmascope`, :mod:`.circuit_tracer`,
:mod:`.ct_config`). A folder of many Gemma Scope 2 variants
(``transcoder_all/``) is narrowed by naming the variant as if it were a subfolder:
``.../transcoder_all/width_16k_l0_small`` selects every ``layer_{L}_width_16k_l0_small/``.

Hub references are downloaded with huggingface_hub into its normal cache, only the files of the
requested layers; with ``HF_HUB_OFFLINE=1`` (or no network) the cached snapshot is used.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from . import circuit_tracer as ct
from . import gemmascope as gs
from .checks import TranscoderLoadError

LAYOUTS = ("gemmascope_plt", "gemmascope_clt", "gemmascope_crosscoder", "circuit_tracer_plt",
           "circuit_tracer_clt", "circuit_tracer_yaml")
_HUB_REF = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+)((?:/[^@]+)?)(?:@(.+))?$")


@dataclass
class Plan:
    """What to read for one transcoder set, relative to its folder."""

    layout: str  # one of LAYOUTS
    files: dict[int, list[str]]  # source layer -> files it needs (-1: layer from config.json)
    available: list[int]  # every source layer found, before narrowing to the asked layers
    shared: list[str] = field(default_factory=list)  # config.json of a CLT
    variant: str = ""  # Gemma Scope 2 width/L0 variant, e.g. "width_16k_l0_small"
    single: bool = False  # one Gemma Scope 2 layer folder: a set of just that layer
    layers: Optional[list[int]] = None  # asked-for layers, for layouts listing files later
    sites: Optional[list[int]] = None  # a crosscoder's layers (file i holds sites[i])

    def all_files(self) -> list[str]:
        return sorted({f for fs in self.files.values() for f in fs} | set(self.shared))


def plan(files: Iterable[str], name: str, layers: Optional[Sequence[int]],
         variant: Optional[str], where: str) -> Plan:
    """Plan a set from the relative paths ``files`` under the folder named ``name``."""
    files = set(files)
    top = {f for f in files if "/" not in f}
    if variant:
        return _plan_variant(files, variant, layers, where)
    if "params.safetensors" in top:
        m = gs.PLT_FOLDER.match(name)
        layer = int(m.group(1)) if m else -1
        p = Plan("gemmascope_plt", {layer: ["params.safetensors", "config.json"]}, [layer],
                 variant=m.group(2) if m else "", single=True)
        return _narrow(p, layers, where) if layer >= 0 else p
    cc = gs.CROSSCODER_FOLDER.match(name)
    if cc and any(gs.CLT_FILE.fullmatch(f) for f in top):
        sites = [int(x) for x in cc.group(1).split("_")]
        found = sorted(int(m.group(1)) for f in top if (m := gs.CLT_FILE.fullmatch(f)))
        if found != list(range(len(sites))):
            raise TranscoderLoadError(
                f"{where}: a crosscoder over layers {sites} needs params_layer_0.."
                f"{len(sites) - 1}.safetensors, found params_layer_{found}")
        p = Plan("gemmascope_crosscoder",
                 {L: [f"params_layer_{i}.safetensors"] for i, L in enumerate(sites)}, sites,
                 ["config.json"] if "config.json" in top else [], variant=cc.group(2),
                 sites=sites)
        return _narrow(p, layers, where)
    for layout, pattern, needs in (
        ("gemmascope_clt", gs.CLT_FILE, lambda i: [f"params_layer_{i}.safetensors"]),
        ("circuit_tracer_plt", ct.PLT_FILE, lambda i: [f"layer_{i}.safetensors"]),
        ("circuit_tracer_clt", ct.CLT_ENC_FILE,
         lambda i: [f"W_enc_{i}.safetensors", f"W_dec_{i}.safetensors"]),
    ):
        found = sorted(int(m.group(1)) for f in top if (m := pattern.fullmatch(f)))
        if found:
            shared = ["config.json"] if "config.json" in top else []
            return _narrow(Plan(layout, {i: needs(i) for i in found}, found, shared), layers,
                           where)
    if "config.yaml" in top:  # circuit-tracer's list of files (often hf:// URIs)
        return Plan("circuit_tracer_yaml", {}, [], shared=["config.yaml"],
                    layers=None if layers is None else sorted(set(layers)))
    variants = sorted({m.group(2) for f in files if "/" in f
                       if (m := gs.PLT_FOLDER.match(f.split("/")[0]))})
    if len(variants) == 1:
        return _plan_variant(files, variants[0], layers, where)
    if variants:
        raise TranscoderLoadError(
            f"{where} holds Gemma Scope 2 transcoders of {len(variants)} widths/L0s: "
            f"{', '.join(variants)}; name one as a subfolder, e.g. {where}/{variants[0]}")
    sub = sorted({f.split("/")[0] for f in files if "/" in f})
    raise TranscoderLoadError(
        f"no transcoders found in {where}: expected Gemma Scope 2 (params.safetensors, "
        "layer_*_width_*/ folders or params_layer_*.safetensors) or circuit-tracer "
        "(layer_*.safetensors, W_enc_*/W_dec_*.safetensors or config.yaml) files"
        + (f"; subfolders: {', '.join(sub[:20])}" if sub else ""))


def _plan_variant(files: set[str], variant: str, layers, where: str) -> Plan:
    found = {}
    for f in files:
        m = gs.PLT_FOLDER.match(f.split("/")[0])
        if m and m.group(2) == variant and f.endswith("/params.safetensors"):
            found[int(m.group(1))] = f.split("/")[0]
    if not found:
        raise TranscoderLoadError(f"no Gemma Scope 2 transcoders layer_*_{variant}/ in {where}")
    p = Plan("gemmascope_plt",
             {i: [f"{d}/params.safetensors", f"{d}/config.json"] for i, d in found.items()},
             sorted(found), variant=variant)
    return _narrow(p, layers, where)


def _narrow(p: Plan, layers: Optional[Sequence[int]], where: str) -> Plan:
    if layers is None:
        return p
    missing = sorted(set(layers) - set(p.files))
    if missing:
        raise TranscoderLoadError(f"{where}: no transcoders for layers {missing} "
                                  f"(found layers {p.available})")
    p.files = {i: p.files[i] for i in sorted(set(layers))}
    return p


# --- local folders -----------------------------------------------------------------------

def local_listing(folder: Path) -> list[str]:
    """Relative paths of the files in ``folder`` and its direct subfolders, and ``"name/"``
    for each subfolder."""
    out = []
    for entry in os.scandir(folder):
        if entry.is_file():
            out.append(entry.name)
        elif entry.is_dir():
            out.append(entry.name + "/")
            out.extend(f"{entry.name}/{e.name}" for e in os.scandir(entry.path) if e.is_file())
    return out


def resolve_local(path: Path, layers, where: Optional[str] = None) -> tuple[Path, Plan]:
    """(folder, plan) for a local folder, or a variant 'subfolder' of a Gemma Scope 2 folder."""
    where = where or str(path)
    if path.is_dir():
        return path, plan(local_listing(path), path.name, layers, None, where)
    if path.parent.is_dir() and gs.parse_variant(path.name):
        return path.parent, plan(local_listing(path.parent), path.parent.name, layers,
                                 path.name, where)
    if path.is_file():
        raise TranscoderLoadError(f"{path} is a file; pass the folder that holds it")
    raise FileNotFoundError(f"transcoders not found: {where} is neither a local folder nor a "
                            "Hugging Face reference owner/repo/folder[@revision]")


# --- the Hugging Face Hub ----------------------------------------------------------------

def parse_hub_ref(ref: str) -> Optional[tuple[str, str, Optional[str]]]:
    """``owner/repo/sub/folder@rev`` -> (repo_id, "sub/folder", rev), or None if not one."""
    m = _HUB_REF.match(ref)
    if m is None:
        return None
    return m.group(1), m.group(2).strip("/"), m.group(3)


def resolve_hub(ref: str, layers) -> tuple[Path, Plan]:
    """Download (or find in the cache) the files of a hub reference; (folder, plan)."""
    import huggingface_hub as hf

    repo_id, sub, revision = parse_hub_ref(ref)
    listing = None if _offline() else _hub_listing(repo_id, sub, revision)
    patterns = None
    if listing is not None:
        folder, name, variant = sub, sub.rsplit("/", 1)[-1], None
        files = _under(listing, folder)
        if not files and gs.parse_variant(name):  # a variant 'subfolder' of transcoder_all/
            folder, variant = sub.rpartition("/")[0], name
            files = _under(listing, folder)
        if not files:
            raise FileNotFoundError(f"{ref}: no files under {sub or 'the repository root'}")
        p = plan(files, folder.rsplit("/", 1)[-1], layers, variant, ref)
        prefix = f"{folder}/" if folder else ""
        patterns = [prefix + f for f in p.all_files()]
    try:
        root = hf.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                    local_files_only=listing is None)
    except Exception as e:  # offline without a cached copy, gated repo, ...
        raise FileNotFoundError(
            f"cannot get {ref} from the Hugging Face Hub"
            + (" (offline: HF_HUB_OFFLINE is set or the Hub cannot be reached, and it is not in "
               "the cache)" if listing is None else "") + f": {e}") from e
    folder, local = resolve_local(Path(root) / sub, layers, where=ref)
    if listing is not None:
        local.available = p.available  # the repository's layers, not just those downloaded
    return folder, local


def _hub_listing(repo_id: str, sub: str, revision: Optional[str]) -> Optional[list[str]]:
    """Every file path in the repository (None when the Hub cannot be reached)."""
    import huggingface_hub as hf
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return list(hf.list_repo_files(repo_id, revision=revision))
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:  # includes gated repos
        raise FileNotFoundError(
            f"{repo_id}{'@' + revision if revision else ''}: not found on the Hugging Face Hub, "
            f"or gated (accept its licence on the Hub and log in / set HF_TOKEN): {e}") from e
    except Exception:  # no network: fall back to the cache
        return None


def _under(listing: list[str], folder: str) -> list[str]:
    prefix = f"{folder}/" if folder else ""
    rel = [f[len(prefix):] for f in listing if f.startswith(prefix)]
    dirs = {f.split("/")[0] + "/" for f in rel if "/" in f}
    return [f for f in rel if f.count("/") <= 1] + sorted(dirs)


def _offline() -> bool:
    import huggingface_hub.constants as c

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(c.HF_HUB_OFFLINE)
