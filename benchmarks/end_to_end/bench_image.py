"""Cost of an image in the prompt: one image + 16 text tokens through the whole attribution
pipeline, per phase, against the same 16 text tokens alone, on a random-weight multimodal
Gemma 3 of 4B shape with its language tower truncated (CPU or CUDA, fp32 by default).

The model (built once by ``--build``, in a child process, cached under
``~/.cache/cltrace/bench/gemma3-4b-shape-L4``, the hub layout ``save_pretrained`` writes):
transformers' ``Gemma3ForConditionalGeneration`` with Gemma 3 4B's shapes

* vision: SigLIP so400m (27 layers, d 1152, MLP 4304, 16 heads), 896 px images, 14 px patches
  (a 64 x 64 grid), pooled by the projector to 16 x 16 = 256 soft tokens of width 2560;
* language: d_model 2560, 8 query heads / 4 KV heads of 256, MLP 10240, vocabulary 262,208,
  sliding window 1024 — but 4 layers instead of 34: layer types ``sliding, sliding, sliding,
  full``, i.e. 4B's layers 2-5 (the first global layer last);
* the tokenizer: the embedded Gemma 3 270M tokenizer (the same 262,144 pieces) with
  ``<image_soft_token>`` added as id 262,144, as in the 4B vocabulary.

Weights random (no multimodal Gemma 3 checkpoint can be downloaded here): transformers' init
(N(0, 0.02)), the projector's input matrix N(0, 1/1152). Transcoders random too: one per-layer
transcoder (PLT, no skip) of width ``--d-sae`` on each of the 4 layers, W_enc ~ N(0, 1/d),
W_dec ~ N(0, 1/d_sae), each feature's threshold the larger of the 1 - ``--active`` quantiles
of its pre-activation over the image's 256 soft tokens and over the 15 text tokens (after
<bos>) of the baseline (at most about ``active`` x d_sae features per position and layer
fire, at soft-token and text positions alike).

Phases, each timed once (after one untimed warm-up run of the whole pipeline; ``--repeat``
for medians), each with the process's peak RSS during that phase (``VmHWM`` reset by
``/proc/self/clear_refs`` before it; on CUDA also ``max_memory_allocated``):

  load        ``load_multimodal`` of the cached checkpoint (both towers, tokenizer, processor)
  preprocess  ``LoadedMultimodal.prompt``: the image resized / normalised, the text tokenized
  vision      ``LoadedMultimodal.embed``: vision tower + projector + token embeddings
  capture     the language model's capture forward (``cltrace.frozen.capture``)
  encode      transcoder encoding + reconstruction (``cltrace.replacement.encoding``)
  attribute   ``cltrace.attribution.attribute``: its own forward (vision, capture, encode and
              the frozen model again: ``attribute`` takes the prompt), logit targets, the
              feature rows (``features``: the attribution proper) and graph assembly
  prune       ``cltrace.graph.pruning.prune`` (default thresholds)
  export      ``cltrace.export.write_neuronpedia`` (the Neuronpedia JSON)

and the steering of ``cltrace steer --image`` (the same prompt, one feature of the graph
ablated at the last position: the most influential visited feature there):

  run           ``ReplacementModel.run`` (vision again, capture, encode, the frozen model)
  steer_free    ``intervene(..., mode="free")`` on that state: the real model with the hooks
  steer_frozen  ``intervene(..., mode="frozen")``: the frozen replacement model
  generate      ``generate`` of 4 tokens with the ablation, from the state's input (the soft
                tokens are not recomputed: a full pass per token, no KV cache)

The baseline is the same text with no image (16 tokens, <bos> included) through the same
replacement model and phases (no preprocessing or vision). Beside the times, the FLOP floor of
the vision tower (patch embedding, 27 blocks, the projector), of the language capture forward
(4 layers, last-position logits) and of the feature rows (``bench_attribution.floor`` with 4B's
attention shapes; image positions counted as causal, a slight undercount), with the machine's
sgemm rate and copy bandwidth measured in the same process (``benchmarks.harness.measure_machine``).

    PYTHONPATH=python python -m benchmarks.end_to_end.bench_image --build      # once, ~6 GB disk
    PYTHONPATH=python python -m benchmarks.end_to_end.bench_image --out benchmarks/results/image-DATE.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import measure_machine, peak_rss_mib

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path.home() / ".cache" / "cltrace" / "bench" / "gemma3-4b-shape-L4"
LAYER_TYPES = ["sliding_attention"] * 3 + ["full_attention"]  # 4B's layers 2..5
TEXT = dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240,
            num_hidden_layers=len(LAYER_TYPES), num_attention_heads=8, num_key_value_heads=4,
            head_dim=256, sliding_window=1024, layer_types=LAYER_TYPES, query_pre_attn_scalar=256,
            max_position_embeddings=131072)
VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=896, patch_size=14, vision_use_head=False)
SOFT_TOKENS = 256
# 16 tokens with <bos> under the Gemma 3 tokenizer (checked at run time)
PROMPT = "Describe the picture in one short sentence: what is the main object and its"


# --- building the random checkpoint ----------------------------------------------------------

def build(folder: Path) -> None:
    """Save the random 4B-shaped multimodal model, its tokenizer and processor configs."""
    from transformers import (AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration,
                              SiglipVisionConfig)

    from cltrace.models.load import embedded_model_dir

    cfg = Gemma3Config(text_config=TEXT, vision_config=SiglipVisionConfig(**VISION).to_dict(),
                       mm_tokens_per_image=SOFT_TOKENS)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mm_input_projection" in name:  # zeros at init: soft tokens would all vanish
                p.normal_(0.0, VISION["hidden_size"] ** -0.5)
    tmp = folder.with_name(folder.name + ".part")
    model.save_pretrained(tmp)
    del model
    tok = AutoTokenizer.from_pretrained(embedded_model_dir(progress=lambda s: None))
    tok.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    assert tok.convert_tokens_to_ids("<image_soft_token>") == cfg.image_token_id
    tok.save_pretrained(tmp)
    pre = {"do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None,
           "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
           "image_processor_type": "Gemma3ImageProcessor", "image_seq_length": SOFT_TOKENS,
           "processor_class": "Gemma3Processor", "resample": 2, "rescale_factor": 1 / 255,
           "size": {"height": VISION["image_size"], "width": VISION["image_size"]}}
    (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (tmp / "processor_config.json").write_text(json.dumps(
        {"image_seq_length": SOFT_TOKENS, "processor_class": "Gemma3Processor"}, indent=2))
    tmp.rename(folder)


# --- random transcoders ------------------------------------------------------------------------

def random_plt(calib: list[torch.Tensor], d_sae: int, active: float, seed: int = 0):
    """A random PLT on every layer; ``calib``: MLP inputs ``[n_layers, n_pos, d]`` of groups of
    positions (the soft tokens, the text tokens): each feature's threshold is the largest of
    its ``1 - active`` quantiles over each group, so at most about ``active`` of the features
    fire per position in every group (one pooled quantile would let the 256 soft tokens set
    thresholds that text positions, of another scale, cross far more often)."""
    from cltrace.transcoders.base import LayerTranscoder, TranscoderSet

    n_layers, _, d = calib[0].shape
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for L in range(n_layers):
        W_enc = torch.randn(d, d_sae, generator=g) / d ** 0.5
        b_enc = torch.zeros(d_sae)
        thr = torch.stack([torch.quantile(x[L].float().cpu() @ W_enc, 1 - active, dim=0)
                           for x in calib]).amax(0).clamp_min(1e-3)  # [d_sae]
        W_dec = torch.randn(d_sae, 1, d, generator=g) / d_sae ** 0.5
        layers[L] = LayerTranscoder(W_enc, b_enc, thr, W_dec, torch.zeros(d))
    return TranscoderSet("plt", n_layers, layers, model_name="random/gemma-3-4b-shape-L4",
                         source=f"random-{d_sae}", info={"width": d_sae})


# --- measuring ---------------------------------------------------------------------------------

class Phases:
    """Wall time and peak RSS (and CUDA peak) of named phases."""

    def __init__(self, device: str):
        self.device, self.rows = device, {}

    def __call__(self, name: str, fn):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        t0 = time.perf_counter()
        out = fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
        row = {"s": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}
        if self.device == "cuda":
            row["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        self.rows.setdefault(name, []).append(row)
        return out

    def summary(self) -> dict:
        return {k: {"median_s": statistics.median(r["s"] for r in rows),
                    "runs_s": [round(r["s"], 4) for r in rows],
                    **{m: max(r[m] for r in rows) for m in rows[0] if m != "s"}}
                for k, rows in self.rows.items()}


def vision_flops(n_images: int = 1) -> float:
    """Matmul FLOPs of SigLIP so400m at 896 px + the projector, per image."""
    d, m, n_layers = VISION["hidden_size"], VISION["intermediate_size"], VISION["num_hidden_layers"]
    n = (VISION["image_size"] // VISION["patch_size"]) ** 2  # 4096 patches
    patch = 2 * n * (3 * VISION["patch_size"] ** 2) * d
    block = 2 * n * (4 * d * d + 2 * d * m) + 2 * 2 * n * n * d  # qkvo + MLP; scores + values
    proj = 2 * SOFT_TOKENS * d * TEXT["hidden_size"]
    return n_images * (patch + n_layers * block + proj)


def vision_bytes() -> float:
    d, m, n_layers = VISION["hidden_size"], VISION["intermediate_size"], VISION["num_hidden_layers"]
    return 4 * (n_layers * (4 * d * d + 2 * d * m) + d * TEXT["hidden_size"])


def language_flops(T: int) -> tuple[float, float]:
    """(FLOPs, fp32 weight bytes) of the capture forward: 4 layers on T positions, attention as
    causal (the image block's extra half is small), the unembedding at the last position."""
    d, H, KV, hd, I = (TEXT[k] for k in ("hidden_size", "num_attention_heads",
                                          "num_key_value_heads", "head_dim", "intermediate_size"))
    weights = d * H * hd + 2 * d * KV * hd + H * hd * d + 3 * d * I
    attn = 2 * 2 * (T * (T + 1) / 2) * H * hd
    n_layers = TEXT["num_hidden_layers"]
    unembed = 2 * d * TEXT["vocab_size"]
    return n_layers * (2 * T * weights + attn) + unembed, 4 * (n_layers * weights + d * TEXT["vocab_size"])


def pipeline(ph: Phases, lm, rm, text: str, image, out_dir: Path, slug: str, a) -> dict:
    """One run of every phase on ``text`` (+ ``image`` when not None); returns the graph's sizes."""
    from cltrace.attribution import attribute
    from cltrace.export import write_neuronpedia
    from cltrace.frozen.capture import capture
    from cltrace.graph.pruning import prune
    from cltrace.replacement.encoding import encode, reconstruct

    dev = lm.model.device
    if image is not None:
        prompt = ph("preprocess", lambda: lm.prompt(text, [image]))
        embeds = ph("vision", lambda: torch.no_grad()(lm.embed)(prompt)[0])
        tokens, groups = prompt.input_ids[0].to(dev), prompt.image_groups[0].to(dev)
    else:
        prompt = text
        tokens = rm.tokenize(text)
        embeds = groups = None
    cap = ph("capture", lambda: capture(rm.parts, tokens, all_logits=False, inputs_embeds=embeds,
                                        image_groups=groups))
    mlp_in = torch.stack([c.mlp_in for c in cap.layers])
    mlp_out = torch.stack([c.mlp_out for c in cap.layers])
    skip = rm.skip_positions_for(tokens)

    def enc():
        acts = encode(rm.transcoders, mlp_in, skip)
        return acts, reconstruct(rm.transcoders, acts, mlp_in, mlp_out, skip)

    acts, _ = ph("encode", enc)
    n_active = sum(int(x.feat_idx.numel()) for x in acts)
    del cap, acts
    times: dict = {}
    graph = ph("attribute", lambda: attribute(prompt, rm, max_feature_nodes=a.max_feature_nodes,
                                              batch_size=a.batch_size, prompt_text=text, timings=times))
    for k, v in times.items():
        ph.rows.setdefault(f"attribute.{k}", []).append({"s": v})  # peak: attribute's
    result = ph("prune", lambda: prune(graph))
    ph("export", lambda: write_neuronpedia(graph, out_dir, slug, result))
    steering(ph, rm, prompt, graph)
    return {"n_pos": graph.n_pos, "n_active": int(graph.settings["n_active_features"]),
            "n_active_encode": n_active, "n_visited": graph.n_features, "n_logits": graph.n_logits,
            "features": graph.features, "skip_positions": graph.settings["skip_positions"]}


def steering(ph: Phases, rm, prompt, graph) -> None:
    """The steering phases (module doc) on ``prompt`` (text or an ImagePrompt): the graph's
    first visited feature at the last position (else its first), set to 0 there."""
    from cltrace.steering import Intervention, generate, intervene
    from cltrace.steering.inputs import state_input

    f = graph.features  # [n_visited, 3]: (layer, pos, feature), in visiting order
    last = (f[:, 1] == graph.n_pos - 1).nonzero().flatten()
    L, pos, feat = f[int(last[0]) if last.numel() else 0].tolist()
    iv = Intervention(L, feat, pos=pos, set=0.0)
    state = ph("run", lambda: rm.run(prompt))  # (all logits, as cltrace steer)
    ph("steer_free", lambda: intervene(rm, None, [iv], mode="free", state=state))
    ph("steer_frozen", lambda: intervene(rm, None, [iv], mode="frozen", state=state))
    ph("generate", lambda: generate(rm, state_input(state), [iv], max_new_tokens=4,
                                    stop_at_eos=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", action="store_true", help="only build the cached checkpoint")
    ap.add_argument("--model", default=str(CACHE))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--active", type=float, default=0.01, help="fraction of features firing")
    ap.add_argument("--max-feature-nodes", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "image.json"))
    a = ap.parse_args()
    folder = Path(a.model)
    if a.build:
        build(folder)
        return
    if not folder.exists():  # a child process: its ~6 GB are returned before we load
        subprocess.run([sys.executable, "-m", "benchmarks.end_to_end.bench_image", "--build",
                        "--model", str(folder)], check=True, cwd=ROOT)
    if a.threads:
        torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    from cltrace.models.multimodal import load_multimodal
    from cltrace.replacement import ReplacementModel
    from cltrace.frozen.capture import capture
    from .bench_attribution import floor

    ph = Phases(a.device)
    lm = ph("load", lambda: load_multimodal(folder, device=a.device, dtype=torch.float32,
                                            progress=lambda s: None))
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 480, 640), generator=g, dtype=torch.uint8)
    text_ids = lm.tokenizer(PROMPT)["input_ids"]
    assert len(text_ids) == 16, len(text_ids)
    img_text = f"{lm.placeholder()}{PROMPT}"  # the image first, as the CLI places it
    prompt = lm.prompt(img_text, [image])
    from cltrace.models.anatomy import text_parts
    parts, dev = text_parts(lm.model), lm.model.device
    with torch.no_grad():
        cap = capture(parts, prompt.input_ids[0].to(dev), all_logits=False,
                      inputs_embeds=lm.embed(prompt)[0], image_groups=prompt.image_groups[0].to(dev))
        soft = torch.stack([c.mlp_in for c in cap.layers])[:, prompt.image_groups[0] >= 0]
        cap = capture(parts, torch.as_tensor(text_ids, device=dev), all_logits=False)
        text = torch.stack([c.mlp_in for c in cap.layers])[:, 1:]  # <bos> has no features
    tcs = random_plt([soft, text], a.d_sae, a.active)
    del cap, soft, text
    rm = ReplacementModel.from_multimodal(lm, tcs.to(device=a.device) if a.device != "cpu" else tcs)
    out_dir = ROOT / "benchmarks" / "out" / "image-graphs"  # the exported graphs (not kept)
    out_dir.mkdir(parents=True, exist_ok=True)
    # warm-up (lazy init, thread pools), untimed
    pipeline(Phases(a.device), lm, rm, PROMPT, None, out_dir, "warm", a)
    cases = {}
    for name, text, im in (("text_only", PROMPT, None), ("image", img_text, image)):
        cph = Phases(a.device)
        for _ in range(a.repeat):
            size = pipeline(cph, lm, rm, text, im, out_dir, name, a)
        cases[name] = {"phases": cph.summary(), "size": {k: v for k, v in size.items() if k != "features"}}
        cases[name]["_features"] = size["features"]
        print(name, json.dumps(cases[name]["phases"], indent=None), flush=True)
    machine = measure_machine(a.device, copy_mib=512)
    rate, bw = machine.gemm_gflops * 1e9, machine.copy_gbs * 1e9
    for name, c in cases.items():
        s = c["size"]
        fl, by = language_flops(s["n_pos"])
        rows = floor(s, c.pop("_features"), n_layers=4, d=2560, n_heads=8, n_kv=4, hd=256, skip=False,
                     batch=a.batch_size, skip_positions=s["skip_positions"])
        p = c["phases"]
        c["floor"] = {"capture_gflop": fl / 1e9, "capture_floor_s": max(fl / rate, by / bw),
                      "capture_time_over_floor": p["capture"]["median_s"] / max(fl / rate, by / bw),
                      "features_gflop": (rows["backward_flop"] + rows["contract_flop"]) / 1e9,
                      "features_floor_s": (rows["backward_flop"] + rows["contract_flop"]) / rate}
        c["floor"]["features_time_over_floor"] = (p["attribute.features"]["median_s"]
                                                  / c["floor"]["features_floor_s"])
        if name == "image":
            vf = vision_flops()
            c["floor"].update({"vision_gflop": vf / 1e9, "vision_floor_s": max(vf / rate, vision_bytes() / bw),
                               "vision_time_over_floor": p["vision"]["median_s"] / max(vf / rate, vision_bytes() / bw)})
    ratio = {k: cases["image"]["phases"][k]["median_s"] / cases["text_only"]["phases"][k]["median_s"]
             for k in cases["text_only"]["phases"] if k in cases["image"]["phases"]
             and cases["text_only"]["phases"][k]["median_s"] > 0}
    out = {"device": machine.name, "threads": machine.threads, "dtype": "float32",
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "sgemm_gflops": machine.gemm_gflops, "copy_gbs": machine.copy_gbs,
           "model": {"text": TEXT, "vision": VISION, "soft_tokens": SOFT_TOKENS,
                     "weights": "random", "load_phase": ph.summary()["load"]},
           "transcoders": {"kind": "plt", "layers": 4, "d_sae": a.d_sae, "active": a.active},
           "settings": {"max_feature_nodes": a.max_feature_nodes, "batch_size": a.batch_size,
                        "repeat": a.repeat},
           "prompt": PROMPT, "cases": cases, "image_over_text_only": ratio,
           "peak_rss_mib_max_over_phases": max(
               v["peak_rss_mib"] for summ in [ph.summary()] + [c["phases"] for c in cases.values()]
               for v in summ.values() if "peak_rss_mib" in v)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1, default=float) + "\n")
    print(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
