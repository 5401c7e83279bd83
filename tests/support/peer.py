"""circuit-tracer 0.5.0, the reference implementation, run from its own virtual environment.

It pins old transformers (4.57), so it lives in ``benchmarks/.venv-peer`` (created by
:func:`ensure_peer`; ``.ci/run`` creates it in CI) and runs as a subprocess
(``python -m benchmarks.end_to_end.run_peer``). Used by ``tests/test_peer.py`` and
``benchmarks/end_to_end/bench_attribution.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
VENV = ROOT / "benchmarks" / ".venv-peer"
PEER_PY = VENV / "bin" / "python"


def peer_available() -> bool:
    return PEER_PY.exists() and subprocess.run([str(PEER_PY), "-c", "import circuit_tracer"],
                                               capture_output=True).returncode == 0


def ensure_peer() -> None:
    """Create the peer's venv with circuit-tracer 0.5.0 (once; a few minutes)."""
    if peer_available():
        return
    print("creating benchmarks/.venv-peer with circuit-tracer==0.5.0 (once, a few minutes)...")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(PEER_PY), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # the local CPU wheel, not CUDA wheels
    # nnsight 0.7+ moved modules circuit-tracer 0.5.0 imports (nnsight.intervention.tracing)
    subprocess.run(pip + ["circuit-tracer==0.5.0", "nnsight==0.6.3"], check=True)


def peer_model_dir(out: Path) -> Path:
    """A transformers-4.57-loadable copy of the cached Gemma 3 270M (weights linked): a
    4.57-style config (``rope_theta``/``rope_local_base_freq`` instead of ``rope_parameters``)."""
    from cltrace.models import embedded_model_dir

    src = embedded_model_dir()
    dst = out / "gemma-3-270m-hf457"
    if (dst / "config.json").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters", {}) or {}
    cfg["rope_theta"] = rope.get("full_attention", {}).get("rope_theta", 1e6)
    cfg["rope_local_base_freq"] = rope.get("sliding_attention", {}).get("rope_theta", 1e4)
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg["transformers_version"] = "4.57.3"
    for name in os.listdir(src):
        if name != "config.json" and not (dst / name).exists():
            os.symlink(src / name, dst / name)
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst


def run_peer(model_dir: Path, transcoders: Path, kind: str, tokens_file: Path, out: Path,
             max_feature_nodes=None, timeout: float = 1800) -> dict:
    """One circuit-tracer attribution; its result JSON (``ok``, times) — the rows are in
    ``{out}.safetensors``."""
    cmd = [str(PEER_PY), "-m", "benchmarks.end_to_end.run_peer", "--model-dir", str(model_dir), "--transcoders",
           str(transcoders), "--kind", kind, "--prompt", str(tokens_file), "--out", str(out)]
    if max_feature_nodes:
        cmd += ["--max-feature-nodes", str(max_feature_nodes)]
    subprocess.run(cmd, check=True, timeout=timeout, capture_output=True, cwd=ROOT,
                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(Path(str(out) + ".json").read_text())


def agreement(A: dict, B: dict, n_layers: int, n_pos: int) -> dict:
    """Edge rows of two graphs on their shared nodes. ``A``, ``B``: ``features [n, 3]``
    (layer, pos, feature), ``edges`` (rows: those features then the logits; columns: those
    features, then errors (layer-major), tokens, logits), ``logit_tokens``.

    Returns the shared/own feature and logit counts, ``max_abs_over_max`` (max |a - b| /
    max |b| over feature and error columns), ``max_rel_big_edges`` (largest relative error
    over edges above 1e-3 of the largest) and, for the token columns, ``token_ratio`` (the
    median of a / b over big entries) and ``token_max_abs_over_max`` (max |a - b·ratio| / max
    |b·ratio|)."""
    import torch

    ka = {tuple(r): i for i, r in enumerate(A["features"].tolist())}
    kb = {tuple(r): i for i, r in enumerate(B["features"].tolist())}
    shared = sorted(set(ka) & set(kb))
    ia = torch.tensor([ka[k] for k in shared], dtype=torch.long)
    ib = torch.tensor([kb[k] for k in shared], dtype=torch.long)
    la, lb = A["logit_tokens"].tolist(), B["logit_tokens"].tolist()
    common = [t for t in la if t in lb]
    na, nb = len(ka), len(kb)
    rows_a = torch.cat([ia, torch.tensor([na + la.index(t) for t in common], dtype=torch.long)])
    rows_b = torch.cat([ib, torch.tensor([nb + lb.index(t) for t in common], dtype=torch.long)])
    rest = torch.arange((n_layers + 1) * n_pos)
    ea = A["edges"][rows_a][:, torch.cat([ia, na + rest])].double()
    eb = B["edges"][rows_b][:, torch.cat([ib, nb + rest])].double()
    tok_a, tok_b = ea[:, -n_pos:], eb[:, -n_pos:]
    ea, eb = ea[:, :-n_pos], eb[:, :-n_pos]
    scale = eb.abs().max().clamp_min(1e-30)
    big = eb.abs() > 1e-3 * scale
    rel = ((ea - eb).abs()[big] / eb.abs()[big]).max() if big.any() else torch.tensor(0.0)
    tb_big = tok_b.abs() > 1e-3 * tok_b.abs().max()
    ratio = (tok_a[tb_big] / tok_b[tb_big]).median() if tb_big.any() else torch.tensor(float("nan"))
    tok_scale = (tok_b * ratio).abs().max().clamp_min(1e-30)
    return {"shared_features": len(shared), "features_a": na, "features_b": nb,
            "shared_logits": len(common), "logits_a": len(la), "logits_b": len(lb),
            "max_abs_over_max": float((ea - eb).abs().max() / scale),
            "max_rel_big_edges": float(rel), "n_edges_compared": int(ea.numel()),
            "token_ratio": float(ratio),
            "token_max_abs_over_max": float((tok_a - tok_b * ratio).abs().max() / tok_scale)}


if __name__ == "__main__":  # python tests/support/peer.py: create the venv (.ci/run does)
    ensure_peer()
