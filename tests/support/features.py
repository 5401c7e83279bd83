"""The tiny model and transcoders of test_features, saved once and loaded by each Ray actor of
the ``--ray`` tests; optionally the actor ends its process (as a pre-empted node) in the
middle of its first shard, once per ``marker`` file."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def save_tiny(model, transcoders, path: Path) -> Path:
    torch.save({"model": model, "transcoders": transcoders}, path)
    return path


def load_tiny(path: str, crash_marker: str = ""):
    """(model, transcoders) as saved; with ``crash_marker``, the first actor to run a forward
    pass through layer 1 while the marker is absent writes it and dies (``os._exit``)."""
    saved = torch.load(path, weights_only=False)
    model = saved["model"]
    if crash_marker:
        def crash(module, args):
            try:
                fd = os.open(crash_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return None
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os._exit(1)
        model.model.layers[1].register_forward_pre_hook(crash)
    return model, saved["transcoders"]
