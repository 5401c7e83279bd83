"""``cltrace serve [DIR]``: cltrace's offline graph viewer, with experiments when a model is given."""
from __future__ import annotations

import argparse

from ._common import add_replacement_arguments
from ..errors import UsageError

NAME = "serve"
HELP = "view the graphs of a folder in the browser (offline), pin, group and run experiments"
DESCRIPTION = """\
Serve DIR (default: graphs) with cltrace's own viewer: the list of its graphs, each drawn on
a grid (x: token position, y: layer; tokens at the bottom, logits on top) with a pruning
slider on cumulative influence, node and feature cards (with feature pages when the graph's
metadata.scan names a local ./ folder), links of the selected node, search, pinned subgraph
and named supernodes saved into the graph's qParams (pinnedIds, supernodes; the only write the
server makes, atomic). The page loads nothing from another host.

With --model and/or --transcoders, the model is loaded once at start and the page can
ablate, scale or steer the selected features or a supernode: it shows the next-token
probabilities before and after, a generated continuation, and (frozen mode, other features
held) the change of each target logit next to the change the graph's edges predict.
A multimodal --model (Gemma 3 4B/12B/27B; give its --transcoders) runs the experiments of
image + text graphs too, on the copies of their images beside the JSON (and with --sae, the
steering of image + text lenses).

With --sae SET (repeatable; SAEs at resid_post, attn_out or mlp_out, as for `cltrace steer
--sae`), the lens page (/lens.html) can steer a latent of a cell: add to it or clamp it at the
layer's site, from the whole prompt, the clicked token onward or the prompt only, and shows
the next-token probabilities and the greedy continuation before and after. The lens's set
must be one of the --sae sets (same set id or reference); the model is --model
(default gemma-3-270m; with --sae, graph experiments need --transcoders too).

The server binds 127.0.0.1 (reachable from this machine only) unless --host says otherwise.

Examples:
  cltrace serve graphs/
  cltrace serve graphs/ --port 8080 --model gemma-3-270m      (experiments, starter transcoders)
  cltrace serve lenses/ --sae sae/                             (steering from the lens page)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", default="graphs", metavar="DIR",
                   help="folder with graph JSONs, graph-metadata.json, feature pages (default: graphs)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    add_replacement_arguments(p)
    p.set_defaults(model=None)  # experiments only when --model or --transcoders is given
    for a in p._actions:
        if a.dest == "model":
            a.help = ("model for experiments: 'gemma-3-270m', a hub id, a folder or a .gguf "
                      "(default: none; gemma-3-270m when only --transcoders is given)")
    p.add_argument("--sae", action="append", default=None, metavar="SET",
                   help="SAE set (folder or reference) to steer from the lens page (repeatable)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.add_argument("--quiet", action="store_true", help="no progress messages")


def run(args: argparse.Namespace) -> int:
    from ..serve import make_server
    from ._common import load_multimodal_replacement, load_replacement, messenger

    if not 0 <= args.port < 65536:
        raise UsageError(f"--port {args.port}: must be in 0..65535")
    say = messenger(args.quiet)
    rm = loaded = None
    if args.model is not None or args.transcoders is not None or args.sae:
        if args.model is None:
            args.model = "gemma-3-270m"
    saes = load_saes(args.sae or [], say)
    multimodal = args.model is not None and _is_multimodal(args.model)
    if args.transcoders is not None or (args.model is not None and not saes):
        if multimodal and args.transcoders is None:
            raise UsageError(f"--model {args.model} is multimodal: give its --transcoders (the "
                             "starter set is text-only)")
        loaded, rm = (load_multimodal_replacement if multimodal else load_replacement)(args, say)
    steering = None
    if saes:
        from ..steering import SaeSteering
        from ..models import load_model, load_multimodal
        from ..serve.lens_steer import LensSteering

        if loaded is None:
            say(f"loading {'multimodal ' if multimodal else ''}model {args.model} ...")
            loaded = (load_multimodal if multimodal else load_model)(args.model, device=args.device,
                                                                     dtype=args.dtype)
        steering = LensSteering([SaeSteering(loaded.model, s, tokenizer=loaded.tokenizer,
                                             model_name=loaded.name,
                                             skip_positions=args.skip_positions,
                                             images=loaded if multimodal else None) for s in saes],
                                refs=args.sae)
    srv = make_server(args.dir, host=args.host, port=args.port, rm=rm, verbose=args.verbose,
                      saes=steering)
    host, port = srv.server_address[:2]
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    print(f"cltrace serve: http://{shown}:{port}/  (folder {srv.root}; "
          f"experiments {'on' if rm is not None else 'off: no --model/--transcoders'}; "
          f"lens steering {'on' if steering is not None else 'off: no --sae'}; Ctrl-C stops)",
          flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


def load_saes(refs: list, say) -> list:
    """The --sae sets, each checked to hold per-layer SAEs (one-line UsageError otherwise)."""
    from ..steering.sae import check_sae_set
    from ..transcoders import load_transcoders

    out = []
    for ref in refs:
        say(f"loading SAEs {ref} ...")
        ts = load_transcoders(ref)
        check_sae_set(ts, ref)
        out.append(ts)
    return out


def _is_multimodal(model: str) -> bool:
    """Whether --model is a multimodal Gemma 3 checkpoint (its config.json; False for the
    text-only ones and for anything :func:`cltrace.models.check_multimodal` refuses)."""
    from ..models import check_multimodal

    try:
        check_multimodal(model)
    except UsageError:
        return False
    return True
