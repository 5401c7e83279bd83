"""A batch worker: the replacement model loaded once, then one prompt per call.

The same code runs in a local worker process (:mod:`.local`), in a Ray actor (:mod:`.cluster`) and
in-process (``workers=0``). A prompt's outputs (with images: the copies of its image files
beside the JSON) are traced into a private temporary folder and returned as bytes, with the
manifest record, so the coordinator alone writes the batch's
folder; a failure of the prompt (a ValueError for an empty or over-long prompt, a target that
is not one token, or any other error) is returned as a failed record, never raised.
"""
from __future__ import annotations

import json
import os
import resource
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from ..pipeline import PromptSpec, TraceSettings, trace_prompt

# loader() -> (ReplacementModel, tokenizer[, FeaturePages]): a picklable callable (a module-level
# function or a functools.partial of one), called once per worker; with feature pages, the
# graphs are labelled and the kept features' pages returned as features/{c}.json
Loader = Callable[[], tuple]


class Worker:
    """Holds one replacement model and traces prompts with it."""

    def __init__(self, loader: Loader, settings: TraceSettings, threads: int = 0):
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.rm, self.tokenizer, *pages = loader()
        self.pages = pages[0] if pages else None
        self.load_s = time.perf_counter() - t0
        self.settings = settings
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def trace(self, spec: PromptSpec, attempt: int = 1) -> dict:
        """{"record": the manifest record, "files": {name: bytes}} of one prompt."""
        times: dict = {}
        t0 = time.perf_counter()
        record = {"slug": spec.slug, "prompt": spec.prompt, "chat": spec.chat,
                  "targets": [list(t) if isinstance(t, tuple) else t for t in spec.targets],
                  "worker": self.name, "attempt": attempt}
        if spec.images:  # the files read (their copies beside the graph are in "files")
            record["images"] = list(spec.images)
        files = {}
        try:
            with tempfile.TemporaryDirectory(prefix="cltrace-batch-") as tmp:
                result = trace_prompt(self.rm, self.tokenizer, spec, self.settings, Path(tmp),
                                      times=times, pages=self.pages)
                for path in result.written:
                    files[path.name] = path.read_bytes()
                for path in sorted(Path(tmp, "features").glob("*.json")):  # with pages: the kept ones
                    files[f"features/{path.name}"] = path.read_bytes()
                index = Path(tmp, "graph-metadata.json")
                if index.exists():
                    record["metadata"] = json.loads(index.read_text())["graphs"][0]
            record.update(status="ok", error=None, **result.summary(), warnings=result.warnings,
                          features=result.kept_features(),
                          files=sorted(n for n in files if not n.startswith("features/")),
                          feature_pages=sum(n.startswith("features/") for n in files))
        except Exception as e:  # a bad prompt (or a bug) fails this prompt, not the batch
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            record.update(status="failed", error=f"{type(e).__name__}: {msg}",
                          traceback=traceback.format_exc(limit=-3))
            files = {}
        times["total"] = time.perf_counter() - t0
        record["times"] = {k: round(v, 4) for k, v in times.items()}
        record["load_s"] = round(self.load_s, 3)  # this worker's one model load
        record["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        return {"record": record, "files": files}
