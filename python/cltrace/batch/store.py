"""Where a batch writes: a local folder or an fsspec URL (``s3://``, ``gs://``, ``memory://``).

Every file is written whole or not at all (a temporary name, then a rename/move); the manifest
is a JSONL file that grows one complete line per prompt.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Iterator, Optional
from ..errors import UsageError


MANIFEST = "manifest.jsonl"


def is_url(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


class Store:
    """A flat output folder addressed by file name."""

    def __init__(self, location: str | os.PathLike):
        self.location = str(location)
        if is_url(self.location):
            try:
                import fsspec
            except ImportError:
                raise UsageError(f"--out {self.location}: URLs need fsspec (pip install 'cltrace[ray]')") from None
            self.fs, self.root = fsspec.core.url_to_fs(self.location)
            self.root = self.root.rstrip("/")
        else:
            self.fs, self.root = None, str(Path(self.location.removeprefix("file://")))

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def check_writable(self) -> "Store":
        """Create the folder and write and remove a probe file, before any work."""
        probe = f".cltrace-write-test-{uuid.uuid4().hex}"
        try:
            if self.fs is None:
                Path(self.root).mkdir(parents=True, exist_ok=True)
            else:
                self.fs.makedirs(self.root, exist_ok=True)
            self.put(probe, b"")
            self.remove(probe)
        except OSError as e:
            raise OSError(f"--out {self.location}: cannot write there ({e.strerror or e})") from None
        return self

    def put(self, name: str, data: bytes) -> str:
        """Write ``name`` (which may be in a subfolder, e.g. ``features/1.json``) atomically:
        readers see the old file or the whole new one."""
        folder, _, base = name.rpartition("/")
        tmp = f"{folder}/.{base}.{uuid.uuid4().hex}.tmp" if folder else f".{base}.{uuid.uuid4().hex}.tmp"
        if folder:
            if self.fs is None:
                os.makedirs(self._path(folder), exist_ok=True)
            else:
                self.fs.makedirs(self._path(folder), exist_ok=True)
        if self.fs is None:
            try:
                with open(self._path(tmp), "wb") as f:
                    f.write(data)
                os.replace(self._path(tmp), self._path(name))
            finally:
                if os.path.exists(self._path(tmp)):
                    os.unlink(self._path(tmp))
        else:
            with self.fs.open(self._path(tmp), "wb") as f:
                f.write(data)
            self.fs.mv(self._path(tmp), self._path(name))
        return self._path(name) if self.fs is None else f"{self.location.rstrip('/')}/{name}"

    def get(self, name: str) -> Optional[bytes]:
        """The bytes of ``name``, or None when there is no such file."""
        try:
            if self.fs is None:
                return Path(self._path(name)).read_bytes()
            with self.fs.open(self._path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name)) if self.fs is None else self.fs.exists(self._path(name))

    def remove(self, name: str) -> None:
        if self.fs is None:
            os.unlink(self._path(name))
        else:
            self.fs.rm(self._path(name))

    def append_record(self, record: dict, name: str = MANIFEST) -> None:
        """Add one JSON line to ``name``: one write(2) in append mode on a local disk (never
        interleaved, never partial on a crash of this process), a whole-file atomic rewrite
        on object stores, which cannot append."""
        line = (json.dumps(record, allow_nan=False, sort_keys=True) + "\n").encode()
        if self.fs is None:
            fd = os.open(self._path(name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            self.put(name, (self.get(name) or b"") + line)

    def records(self, name: str = MANIFEST) -> Iterator[dict]:
        """The manifest's records in order (a torn last line, from a killed writer, is skipped)."""
        data = self.get(name)
        for line in (data or b"").decode("utf-8").splitlines():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
