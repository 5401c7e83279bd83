"""Random-weight Gemma 3 models and calibrated JumpReLU transcoder sets of real shapes, built
bit-identically on any device, for the GPU run (benchmarks/gpu/run.sh).

Weights come from a counter-based hash (:func:`hash_fill_`), not from torch's random number
generators: integer arithmetic, correctly rounded float steps and gathers, so the CPU that
wrote the reference graphs (benchmarks/gpu/reference/) and the GPU that compares against them
build the same model whatever their torch versions, and the GPU builds it in place without a
CPU copy.

Shapes (``SHAPES``): the tiny test model of tests/support/tiny_gemma.py, and the real Gemma 3 1B and 4B
language models (vocabulary 262144). ``pool``: the 4B shape draws its MLP / attention weights
and its transcoders' encoders and decoders from ``pool`` distinct sets cycled over the layers
(layer L uses set L % pool; norms and thresholds stay per layer), so that its CPU reference fits
in the memory of a small machine; every tensor still has its real shape. Transcoders are
per-layer (PLT) JumpReLU with one threshold per layer, set between two neighbouring
pre-activations of the prompt so that exactly ``l0 * n_pos`` entries are active per layer (and
no pre-activation lies within rounding of the threshold: CPU and GPU keep the same features).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from cltrace.transcoders import LayerTranscoder, TranscoderSet


@dataclass(frozen=True)
class Shape:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv: int
    head_dim: int
    d_mlp: int
    vocab: int
    window: int
    global_every: int  # layer L is global when L % global_every == global_every - 1
    d_sae: int
    l0: int  # active features per position
    kind: str = "plt"
    pool: Optional[int] = None  # distinct weight sets cycled over layers (None: all distinct)

    def layer_types(self) -> list[str]:
        g = self.global_every
        return ["full_attention" if L % g == g - 1 else "sliding_attention"
                for L in range(self.n_layers)]


SHAPES = {
    # tests/support/tiny_gemma.py: d_model 64, 4 heads of 16, 2 KV heads, layer 2 global, window 3
    "tiny": Shape("tiny", 4, 64, 4, 2, 16, 128, 300, 3, 3, 512, 16),
    "tiny-clt": Shape("tiny-clt", 4, 64, 4, 2, 16, 128, 300, 3, 3, 512, 16, kind="clt"),
    # Gemma 3 1B: 26 layers, d_model 1152, 4 heads, 1 KV head, head_dim 256, d_mlp 6912
    "1b": Shape("1b", 26, 1152, 4, 1, 256, 6912, 262144, 512, 6, 16384, 64),
    # Gemma 3 4B (language model): 34 layers, d_model 2560, 8 heads, 4 KV heads, d_mlp 10240
    "4b": Shape("4b", 34, 2560, 8, 4, 256, 10240, 262144, 1024, 6, 16384, 64, pool=4),
}

_M32 = 0xFFFFFFFF
_CHUNK = 1 << 24


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) without int64 overflow (c split in 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: Tensor) -> Tensor:
    """lowbias32 (Wellons): a bijection of [0, 2^32) with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _seed_of(name: str) -> int:
    return zlib.crc32(name.encode()) & _M32


_P = 1048573  # prime: the length of the base sequence
_MAX_COLS = 1 << 16
_BASE: dict = {}


def _base(device, dtype: torch.dtype) -> Tensor:
    """[_P + _MAX_COLS]: _P hashed uniform values of unit std (then the first _MAX_COLS again,
    so that every window of up to _MAX_COLS wraps around), in ``dtype`` on ``device``."""
    key = (str(device), dtype)
    if key not in _BASE:
        idx = torch.arange(_P, dtype=torch.int64, device=device)
        x = _hash32(_hash32(idx) ^ _seed_of("cltrace-gpu-base"))
        u = (x.double() + 0.5) * (2.0 ** -32)  # exact, in (0, 1)
        b = ((u * 2.0 - 1.0) * math.sqrt(3.0)).to(dtype)
        _BASE[key] = torch.cat([b, b[:_MAX_COLS]])
    return _BASE[key]


@torch.no_grad()
def hash_fill_(t: Tensor, name: str, std: float, mean: float = 0.0) -> Tensor:
    """Fill ``t`` (contiguous) in place with uniform values of the given mean and std, a pure
    function of (name, element index): the same bits on every device and torch version.

    Row r of ``t`` (viewed as [rows, last dim]) is the window of the hashed base sequence that
    starts at (r * a + b) mod _P, with (a, b) from the name, so filling costs one gather of rows
    (memory speed) instead of hashing every element."""
    cols = t.shape[-1] if t.dim() else 1
    if cols > _MAX_COLS:
        raise ValueError(f"hash_fill_: rows of {cols} > {_MAX_COLS} elements")
    rows = t.numel() // max(cols, 1)
    seed = _seed_of(name)
    a, b = 1 + seed % (_P - 1), (seed >> 7) % _P
    windows = _base(t.device, t.dtype).unfold(0, cols, 1)  # [n, cols] view, row j = base[j:j+cols]
    flat = t.view(rows, cols)
    step = max(1, _CHUNK // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        starts = (torch.arange(r0, r1, device=t.device, dtype=torch.int64) * a + b) % _P
        torch.index_select(windows, 0, starts, out=flat[r0:r1])
        flat[r0:r1].mul_(std)
        if mean:
            flat[r0:r1].add_(mean)
    return t


def _pooled(name: str, shape: Shape) -> str:
    """The name whose values a tensor takes: layer L's weights are those of L % pool."""
    if shape.pool is None:
        return name
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i - 1] == "layers" and parts[i].isdigit() and "norm" not in name:
            parts[i] = str(int(parts[i]) % shape.pool)
    return ".".join(parts)


def gemma_config(shape: Shape, vocab: Optional[int] = None):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab or shape.vocab, hidden_size=shape.d_model,
        intermediate_size=shape.d_mlp, num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv,
        head_dim=shape.head_dim, sliding_window=shape.window, layer_types=shape.layer_types(),
        max_position_embeddings=4096, query_pre_attn_scalar=shape.head_dim)


@torch.no_grad()
def build_model(shape: Shape, device, dtype: torch.dtype = torch.float32):
    """Gemma3ForCausalLM of ``shape`` on ``device`` with hash weights (no CPU copy, no
    transformers init): linear weights std 1/sqrt(fan_in), embeddings 1/sqrt(d_model) (times
    sqrt(d_model) in the forward), norm gains (1 + w) with w of std 0.3."""
    from transformers import Gemma3ForCausalLM

    cfg = gemma_config(shape)
    with torch.device("meta"):
        model = Gemma3ForCausalLM(cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    made: dict[int, torch.nn.Parameter] = {}  # one real tensor per distinct (pooled) name
    by_name: dict[str, torch.nn.Parameter] = {}
    for name, p in params.items():
        key = _pooled(name, shape)
        if id(p) in made:  # tied (lm_head = embed_tokens)
            new = made[id(p)]
        elif key in by_name:  # pooled: the same tensor as layer L % pool
            new = by_name[key]
        else:
            new = torch.nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype),
                                     requires_grad=False)
            if "norm" in name:
                hash_fill_(new.data, key, 0.3)
            elif "embed" in name:
                hash_fill_(new.data, key, 1.0 / math.sqrt(shape.d_model))
            else:
                hash_fill_(new.data, key, 1.0 / math.sqrt(p.shape[1]))
            by_name[key] = new
        made[id(p)] = new
        mod_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(mod_name), leaf, new)
    _copy_buffers(model, shape, device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    return model.eval()


def _copy_buffers(model, shape: Shape, device) -> None:
    """Buffers (rotary frequencies, embedding scale) from a small model of the same attention
    shape built normally, so they are exactly what transformers computes."""
    from transformers import Gemma3ForCausalLM

    types = sorted(set(shape.layer_types()))
    cfg = gemma_config(shape, vocab=16)
    cfg.num_hidden_layers, cfg.layer_types, cfg.intermediate_size = len(types), types, 8
    donor = Gemma3ForCausalLM(cfg)
    donor_bufs = dict(donor.named_buffers())
    for name, b in list(model.named_buffers()):
        if name not in donor_bufs:
            if b.is_meta:
                raise RuntimeError(f"no donor for buffer {name}")
            continue
        mod_name, _, leaf = name.rpartition(".")
        model.get_submodule(mod_name)._buffers[leaf] = donor_bufs[name].to(device)


def prompt_tokens(shape: Shape, n_pos: int, seed: int = 0) -> Tensor:
    """[n_pos] int64: <bos> (2), then hash-drawn ids in [3, vocab)."""
    x = _hash32(_hash32(torch.arange(n_pos, dtype=torch.int64)) ^ _seed_of(f"prompt{seed}"))
    ids = 3 + x % (shape.vocab - 3)
    ids[0] = 2
    return ids


@torch.no_grad()
def mlp_inputs(model, tokens: Tensor) -> list[Tensor]:
    """The output of pre_feedforward_layernorm of every layer on ``tokens``: [n_pos, d_model]."""
    out: list[Optional[Tensor]] = [None] * len(model.model.layers)
    hooks = [layer.pre_feedforward_layernorm.register_forward_hook(
        lambda _m, _i, o, L=L: out.__setitem__(L, o[0].detach()))
        for L, layer in enumerate(model.model.layers)]
    try:
        model(tokens[None].to(model.lm_head.weight.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return out  # type: ignore[return-value]


def calibrate_thresholds(mlp_in: list[Tensor], encoders: list[tuple[Tensor, Tensor]],
                         l0: int) -> Tensor:
    """[n_layers] float64: per layer, a midpoint between two neighbouring pre-activations
    z = x @ W_enc + b_enc (float64) near the (n_pos * l0)-th largest: the widest such gap among
    the ranks within n_pos of it, so that about n_pos * l0 entries pass (L0 = l0 +- 1) and no z
    lies within rounding of the threshold on any device."""
    thr = []
    for x, (W_enc, b_enc) in zip(mlp_in, encoders):
        z = (x.double() @ W_enc.double() + b_enc.double()).flatten()
        n = x.shape[0]
        k = max(1, min(n * l0, z.numel() - n - 2))
        lo = max(1, k - n)
        top = z.topk(k + n + 1).values  # descending
        gaps = top[lo - 1:k + n] - top[lo:k + n + 1]  # gaps[i] = top[lo-1+i] - top[lo+i]
        i = lo - 1 + int(gaps.argmax())
        thr.append(float(top[i] + top[i + 1]) / 2)
    return torch.tensor(thr, dtype=torch.float64)


@torch.no_grad()
def build_transcoders(shape: Shape, device, dtype: torch.dtype = torch.float32,
                      thresholds: Optional[Tensor] = None, mlp_in: Optional[list[Tensor]] = None
                      ) -> tuple[TranscoderSet, Tensor]:
    """Hash-weight JumpReLU transcoders of ``shape`` and their per-layer thresholds [n_layers]
    (given, or calibrated on ``mlp_in``). W_enc std 1/sqrt(d_model), b_enc 0.1, W_dec
    1/sqrt(d_sae), b_dec 0.1; a CLT source layer L writes to layers L .. n_layers - 1."""
    d, F = shape.d_model, shape.d_sae
    made: dict[str, Tensor] = {}

    def weight(name: str, L: int, *dims: int, std: float) -> Tensor:
        key = f"{name}.{L if shape.pool is None else L % shape.pool}"
        if key not in made:
            made[key] = hash_fill_(torch.empty(*dims, device=device, dtype=dtype), "tc." + key, std)
        return made[key]

    enc = [(weight("W_enc", L, d, F, std=1 / math.sqrt(d)), weight("b_enc", L, F, std=0.1))
           for L in range(shape.n_layers)]
    if thresholds is None:
        if mlp_in is None:
            raise ValueError("give thresholds or mlp_in to calibrate them on")
        thresholds = calibrate_thresholds(mlp_in, enc, shape.l0)
    layers = {}
    for L in range(shape.n_layers):
        n_out = 1 if shape.kind == "plt" else shape.n_layers - L
        W_dec = hash_fill_(torch.empty(F, n_out, d, device=device, dtype=dtype), f"tc.W_dec.{L}",
                           1 / math.sqrt(F)) if shape.kind == "clt" else \
            weight("W_dec", L, F, 1, d, std=1 / math.sqrt(F))
        thr = torch.full((F,), float(thresholds[L]), device=device, dtype=dtype)
        layers[L] = LayerTranscoder(enc[L][0], enc[L][1], thr, W_dec,
                                    weight("b_dec", L, d, std=0.1))
    ts = TranscoderSet(kind=shape.kind, n_layers=shape.n_layers, layers=layers,
                       model_name=f"random-gemma-3-{shape.name}")
    return ts, thresholds


def graph_record(g) -> dict:
    """The parts of a Graph that two devices must agree on, as CPU tensors."""
    return {"features": g.features.to(torch.int32), "activations": g.activations.float(),
            "logit_tokens": g.logit_tokens, "logit_probs": g.logit_probs.float(),
            "edges": g.edges.float(), "edge_targets": g.edge_targets,
            "n_layers": torch.tensor(g.n_layers), "n_pos": torch.tensor(g.n_pos)}


def compare_graphs(got: dict, ref: dict) -> dict:
    """How far ``got`` is from ``ref`` (both :func:`graph_record`). Feature nodes are matched
    by (layer, pos, feature); edges are compared on the matched rows and columns, as
    max |got - ref| / max |ref| (``edge_rel``)."""
    out: dict = {}
    out["same_logits"] = bool(torch.equal(got["logit_tokens"], ref["logit_tokens"]))
    out["logit_prob_max_abs"] = float((got["logit_probs"] - ref["logit_probs"]).abs().max()) \
        if out["same_logits"] else None
    fg, fr = got["features"].long(), ref["features"].long()
    key = lambda f: ((f[:, 0] * 1_000_003 + f[:, 1]) * 1_000_033 + f[:, 2]).tolist()  # noqa: E731
    kg, kr = key(fg), key(fr)
    pos_g = {k: i for i, k in enumerate(kg)}
    common = [(pos_g[k], j) for j, k in enumerate(kr) if k in pos_g]
    out["n_features"] = [len(kg), len(kr)]
    out["n_features_matched"] = len(common)
    if not common or not out["same_logits"]:
        out["edge_rel"] = None
        return out
    ig = torch.tensor([c[0] for c in common])
    ir = torch.tensor([c[1] for c in common])
    out["activation_rel"] = float((got["activations"][ig] - ref["activations"][ir]).abs().max()
                                  / ref["activations"][ir].abs().max().clamp_min(1e-30))
    nf_g, nf_r = len(kg), len(kr)
    n_logits = int(ref["logit_tokens"].numel())
    rest_g = torch.arange(nf_g, got["edges"].shape[1])  # errors, tokens, logits
    rest_r = torch.arange(nf_r, ref["edges"].shape[1])
    cols_g, cols_r = torch.cat([ig, rest_g]), torch.cat([ir, rest_r])
    rows_g = torch.cat([ig, torch.arange(nf_g, nf_g + n_logits)])
    rows_r = torch.cat([ir, torch.arange(nf_r, nf_r + n_logits)])
    eg = got["edges"][rows_g][:, cols_g].double()
    er = ref["edges"][rows_r][:, cols_r].double()
    scale = er.abs().max().clamp_min(1e-30)
    out["edge_max_abs_ref"] = float(scale)
    out["edge_rel"] = float((eg - er).abs().max() / scale)
    out["edge_rel_l2"] = float((eg - er).norm() / er.norm().clamp_min(1e-30))
    out["finite"] = bool(torch.isfinite(got["edges"]).all())
    return out
