"""One circuit-tracer (0.5.0) attribution run for bench_attribution.py, in the peer's own venv.

Executed by ``benchmarks/.venv-peer/bin/python`` (never imported by cltrace): loads the Gemma 3
270M copy and the transcoders in circuit-tracer's layout through circuit-tracer's public
loaders (nnsight backend), runs ``attribute`` / ``prune_graph`` / ``create_graph_files``, and
writes ``<out>.json`` (times in s, peak RSS in MiB after each phase) and
``<out>.safetensors`` (the adjacency rows of the visited features and logits, and the
features' (layer, pos, feature)), the same layout as run_cltrace.py writes.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from benchmarks.harness import peak_rss_mib


def load(model_dir: str, tc_dir: str, kind: str):
    from circuit_tracer import ReplacementModel
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    hooks = dict(feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out")
    if kind == "plt":
        paths = {int(p.stem.split("_")[1]): str(p) for p in Path(tc_dir).glob("layer_*.safetensors")}
        tcs = load_transcoder_set(paths, scan="bench", device=torch.device("cpu"),
                                  dtype=torch.float32, lazy_encoder=False, lazy_decoder=False, **hooks)
    else:
        tcs = load_clt(tc_dir, scan="bench", device=torch.device("cpu"), dtype=torch.float32,
                       lazy_decoder=False, lazy_encoder=False, **hooks)
    return ReplacementModel.from_pretrained_and_transcoders(
        model_dir, tcs, backend="nnsight", device=torch.device("cpu"), dtype=torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--transcoders", required=True)
    ap.add_argument("--kind", choices=["plt", "clt"], required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-feature-nodes", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    res: dict = {"times": {}, "rss_mib": {}}
    T, M = res["times"], res["rss_mib"]
    try:
        from circuit_tracer import attribute
        from circuit_tracer.graph import prune_graph
        from circuit_tracer.utils.create_graph_files import create_graph_files

        t0 = time.perf_counter()
        model = load(a.model_dir, a.transcoders, a.kind)
        T["load"], M["load"] = time.perf_counter() - t0, peak_rss_mib()
        tokens = torch.load(a.prompt)
        t0 = time.perf_counter()
        graph = attribute(tokens, model, max_feature_nodes=a.max_feature_nodes,
                          batch_size=a.batch_size)
        T["attribution"], M["attribution"] = time.perf_counter() - t0, peak_rss_mib()
        t0 = time.perf_counter()
        pr = prune_graph(graph)
        T["pruning"], M["pruning"] = time.perf_counter() - t0, peak_rss_mib()
        t0 = time.perf_counter()
        create_graph_files(graph, "bench", str(Path(a.out).parent / (Path(a.out).name + "-graph")))
        T["export"], M["export"] = time.perf_counter() - t0, peak_rss_mib()
        n_sel = graph.selected_features.numel()
        n_logits = len(graph.logit_targets)
        rows = torch.cat([graph.adjacency_matrix[:n_sel], graph.adjacency_matrix[-n_logits:]])
        feats = graph.active_features[graph.selected_features]
        from safetensors.torch import save_file
        save_file({"features": feats.long().contiguous(), "edges": rows.float().contiguous(),
                   "logit_tokens": torch.tensor([int(t.vocab_idx) for t in graph.logit_targets])},
                  a.out + ".safetensors")
        res.update(n_active=int(graph.active_features.shape[0]), n_visited=n_sel, n_logits=n_logits,
                   kept_nodes=int(pr.node_mask.sum()), threads=torch.get_num_threads(), ok=True)
    except Exception as e:  # recorded honestly in the results
        res.update(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:],
                   peak_rss_mib=peak_rss_mib())
    Path(a.out + ".json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
