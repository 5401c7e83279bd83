"""Pieces shared by the commands: progress messages, argument declarations (model, layers),
and loading the replacement model."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable
from ..errors import UsageError


CURRENT_STEP = ["starting"]  # the last progress message: what an interrupt interrupted


def messenger(quiet: bool) -> Callable[..., None]:
    """Print progress to stderr (nothing with --quiet); the last message is kept in
    CURRENT_STEP, so that Ctrl-C can say what it interrupted."""
    def say(*parts) -> None:
        CURRENT_STEP[0] = " ".join(map(str, parts)).strip().rstrip(" .")
        if not quiet:
            print(*parts, file=sys.stderr, flush=True)
    return say


def add_model_arguments(p: argparse.ArgumentParser, dtype_default: str | None = None) -> None:
    """--model, --device and --dtype: what :func:`cltrace.models.load_model` reads."""
    p.add_argument("--model", default="gemma-3-270m",
                   help="model: 'gemma-3-270m' (embedded, default), a hub id, a folder or a .gguf")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=dtype_default,
                   help="float32, bfloat16, float16 (default: "
                        f"{dtype_default or 'float32 on CPU'})")


def add_replacement_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --transcoders, --device and --dtype: what :func:`load_replacement` reads."""
    add_model_arguments(p)
    p.add_argument("--transcoders", default=None, metavar="T",
                   help="transcoder folder or hub reference (default: the trained starter set)")
    p.add_argument("--skip-positions", default="auto", type=_skip_positions, metavar="auto|N",
                   help="leading positions without nodes (no features, no error node): 'auto' "
                        "(default, as circuit-tracer) = the <bos> position, or the 4-token chat "
                        "prefix of -it models and --chat prompts; 0 gives <bos> nodes too (for study)")


def _skip_positions(text: str):
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an int >= 0, got {text!r}")
    return n


def add_prompt_arguments(p: argparse.ArgumentParser, messages: bool = False) -> None:
    """PROMPT or --prompt-file, --chat, and with ``messages`` --messages FILE: what
    :func:`read_prompt_or_messages` and :func:`cltrace.models.prompt_tokens` read."""
    p.add_argument("prompt", metavar="PROMPT", nargs="?", default=None,
                   help="the prompt text (or use --prompt-file)")
    p.add_argument("--prompt-file", metavar="PATH", default=None,
                   help="read the prompt from a UTF-8 text file ('-': standard input); for prompts "
                        "longer than a command-line argument allows")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in Gemma's chat turn (for -it models; works on base models too)")
    if not messages:
        return
    p.add_argument("--messages", metavar="FILE", default=None,
                   help="a conversation instead of PROMPT: a JSON list of {\"role\": system|user|"
                        "model|assistant, \"content\": ...} (or an object with 'messages'); a last "
                        "model message is a prefill the model continues")


def text_problem(data: bytes, whole: bool = True) -> str | None:
    """Why ``data`` is not UTF-8 text ("a binary file, not text", "not UTF-8 text (...)"), or
    None. ``whole=False``: ``data`` is the head of a longer file, so a character cut at its
    end is not a problem."""
    if b"\0" in data:
        return "a binary file, not text"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        if whole or e.start < len(data) - 4:
            return f"not UTF-8 text ({e.reason} at byte {e.start})"
    return None


def read_text_file(path: Path, flag: str) -> str:
    """The UTF-8 text of the file ``path``, checked: readable, not a folder, not binary (the
    errors name ``flag`` and the file)."""
    if path.is_dir():
        raise UsageError(f"{flag} {path}: a folder, not a text file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise OSError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    problem = text_problem(raw)
    if problem:
        raise UsageError(f"{flag} {path}: {problem}")
    return raw.decode("utf-8")


def read_messages_file(path: str | Path, flag: str = "--messages") -> tuple:
    """The checked conversation of a file: a JSON list of messages, or a JSON object (one JSONL
    line of a prompts file) with a ``messages`` list
    (:func:`cltrace.models.conversation.check_messages`)."""
    import json

    from ..models.conversation import check_messages

    text = read_text_file(Path(path), flag)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} {path}: not JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):
        if "messages" not in data:
            raise UsageError(f"{flag} {path}: an object without 'messages'")
        data = data["messages"]
    return check_messages(data, f"{flag} {path}")


def read_prompt_or_messages(args: argparse.Namespace) -> tuple[str, tuple]:
    """(prompt text, conversation): from --messages FILE, (its last user message, the checked
    messages); else (:func:`read_prompt`, ())."""
    if getattr(args, "messages", None) is None:
        return read_prompt(args), ()
    if args.prompt is not None or args.prompt_file is not None:
        raise UsageError("give PROMPT, --prompt-file or --messages (one of them)")
    from ..models.conversation import messages_title

    messages = read_messages_file(args.messages)
    return messages_title(messages), messages


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt text from PROMPT or --prompt-file (exactly one), checked non-empty."""
    if (args.prompt is None) == (args.prompt_file is None):
        also = ", or a conversation with --messages FILE" if hasattr(args, "messages") else ""
        raise UsageError("give the prompt either as PROMPT or with --prompt-file PATH (one of "
                         f"them){also}")
    if args.prompt_file is None:
        text = args.prompt
    elif args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        text = read_text_file(Path(args.prompt_file), "--prompt-file")
    if not text.strip():
        raise UsageError("the prompt is empty" + (f" ({args.prompt_file})" if args.prompt_file else ""))
    return text


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create ``path`` if needed and make sure files can be written there, before any work."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".cltrace-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OSError(f"{flag} {out}: cannot write there ({e.strerror or e})") from None
    return out


def add_features_argument(p: argparse.ArgumentParser) -> None:
    """--features DIR|none: the feature pages that label a graph (attribute and batch)."""
    p.add_argument("--features", default=None, metavar="DIR",
                   help="feature pages of the transcoders (cltrace features --out DIR): label the "
                        "graph's features and copy their pages beside it. Default: with the starter "
                        "set, its own pages (built on the first run); else none. 'none': no labels")


def check_features_dir(features: str | None) -> None:
    """Before any work: an explicit --features DIR is a feature pages folder."""
    if features in (None, "none"):
        return
    from ..features.store import LABELS_FILE

    if not (Path(features) / LABELS_FILE).is_file():
        raise FileNotFoundError(f"--features {features}: not a feature pages folder (no "
                                f"{LABELS_FILE}; make one with `cltrace features --out DIR`)")


def feature_pages(features: str | None, loaded, transcoders, say: Callable[..., None]):
    """The FeaturePages of --features DIR; by default the starter set's own pages (built on
    first use) or None for another set; None for 'none'."""
    if features == "none":
        return None
    from ..features import FeaturePages

    if features is not None:
        return FeaturePages(features)
    if str(transcoders.info.get("set_id", "")).startswith("cltrace-starter/"):
        from ..features.starter import starter_pages

        return starter_pages(loaded, transcoders, progress=say)
    return None


def load_replacement(args: argparse.Namespace, say: Callable[..., None]):
    """(LoadedModel, ReplacementModel) from --model, --transcoders (default: the starter set),
    --device and --dtype."""
    from ..models import load_model
    from ..replacement import ReplacementModel
    from ..training.starter import starter_transcoders

    transcoders = None
    if args.transcoders is not None:  # read (lazily) and checked before the model loads
        from ..transcoders import load_transcoders
        from ..transcoders.checks import check_transcoders

        say(f"loading transcoders {args.transcoders} ...")
        transcoders = load_transcoders(args.transcoders)
        check_transcoders(transcoders, args.transcoders, "attribution graphs and features")
    say(f"loading model {args.model} ...")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    if transcoders is None:
        transcoders = starter_transcoders(loaded, progress=say)
    return loaded, ReplacementModel(loaded.model, transcoders, tokenizer=loaded.tokenizer,
                                    model_name=loaded.name,
                                    skip_positions=getattr(args, "skip_positions", "auto"))


def add_image_argument(p: argparse.ArgumentParser, dictionaries: str = "--transcoders") -> None:
    """--image PATH (repeatable): what :func:`check_images` reads; ``dictionaries``: what the
    help says the command needs beside the multimodal --model."""
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image in the prompt (PNG, PPM ...; repeatable, in prompt order): it goes "
                        "where the prompt has <start_of_image> (one per image; with none, the images "
                        "come first); --chat puts them in the user turn. Needs a multimodal Gemma 3 "
                        f"(--model: a 4B/12B/27B checkpoint folder or hub id) and {dictionaries}")


def check_images(args: argparse.Namespace) -> tuple:
    """Before any model loads: the --image files (each read and decoded: a file that is not an
    image is a one-line UsageError naming it), with a multimodal --model (its config.json),
    no --messages, and for a command with --transcoders (and --sae) one of them given (the
    starter set is text-only). Returns the files, as strings."""
    images = tuple(getattr(args, "image", None) or ())
    if not images:
        return ()
    from ..models.images import read_image
    from ..models.multimodal import check_multimodal

    if getattr(args, "messages", None) is not None:
        raise UsageError("--image goes with PROMPT or --prompt-file (and --chat), not --messages")
    for path in images:
        if Path(path).is_dir():
            raise UsageError(f"--image {path}: a folder, not an image file")
        read_image(path)  # UsageError naming the file if it cannot be decoded
    check_multimodal(args.model)
    _check_dictionaries(args, "--image needs")
    return images


def check_image_rows(specs, args: argparse.Namespace, source: str) -> bool:
    """Whether a prompt of ``specs`` (PromptSpecs of the prompts file ``source``, e.g.
    "PROMPTS f") has images; if so, before any model loads, as :func:`check_images`: a
    multimodal --model and --transcoders (or --sae) given, one line naming the first such row."""
    spec = next((s for s in specs if s.images), None)
    if spec is None:
        return False
    from ..models.multimodal import check_multimodal

    where = f"{source} (row {spec.slug!r} has images)"
    try:
        check_multimodal(args.model)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    _check_dictionaries(args, f"{where}: image rows need")
    return True


def _check_dictionaries(args: argparse.Namespace, what: str) -> None:
    """One of the command's dictionary options (--transcoders, --sae) is given: the starter set
    is text-only."""
    flags = [f for f in ("transcoders", "sae") if hasattr(args, f)]
    if flags and all(getattr(args, f) is None for f in flags):
        raise UsageError(f"{what} {' or '.join('--' + f for f in flags)} (dictionaries of the "
                         "multimodal model's language model; the starter set is text-only)")


def load_multimodal_replacement(args: argparse.Namespace, say: Callable[..., None]):
    """(LoadedMultimodal, ReplacementModel) from a multimodal --model, --transcoders,
    --device and --dtype: the replacement model of its language model, which also runs image
    prompts (:meth:`cltrace.replacement.ReplacementModel.from_multimodal`)."""
    from ..models.multimodal import load_multimodal
    from ..replacement import ReplacementModel
    from ..transcoders import load_transcoders
    from ..transcoders.checks import check_transcoders

    say(f"loading transcoders {args.transcoders} ...")
    transcoders = load_transcoders(args.transcoders)
    check_transcoders(transcoders, args.transcoders, "attribution graphs and features")
    say(f"loading multimodal model {args.model} ...")
    loaded = load_multimodal(args.model, device=args.device, dtype=args.dtype)
    return loaded, ReplacementModel.from_multimodal(
        loaded, transcoders, skip_positions=getattr(args, "skip_positions", "auto"))
