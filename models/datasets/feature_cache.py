"""A disk cache of extracted features, so that decoding happens once per file, not once
per epoch (nor once per DataLoader worker, whose in-memory caches die with it).

An entry is one ``.pt`` file holding a dict of tensors, named by a hash of

- each source file's resolved path, modification time (ns) and size: editing or replacing
  a file invalidates its entries, moving the whole corpus does too;
- the extractor's configuration string: another frontend or frontend setting gets its
  own entries, never stale ones;
- :data:`FORMAT_VERSION`, bumped whenever the code that computes features changes.

Writes are atomic (a uniquely named temporary file, then ``os.replace``), so concurrent
workers computing the same entry cannot leave a torn file behind. Entries are read with
``torch.load(weights_only=True)``: a cache file cannot run code.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch

FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$FASTFUSION_CACHE``, else ``$XDG_CACHE_HOME/fastfusion/features``, else
    ``~/.cache/fastfusion/features``: outside the corpus, which may be read-only."""
    if "FASTFUSION_CACHE" in os.environ:
        return Path(os.environ["FASTFUSION_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastfusion" / "features"


class FeatureCache:
    """Feature dicts on disk under ``directory``; ``directory=None`` disables caching
    (every call computes)."""

    def __init__(self, directory: str | Path | None):
        self.directory = None if directory is None else Path(directory)

    def key(self, sources: Sequence[str | Path], config: str) -> str:
        digest = hashlib.sha256(f"v{FORMAT_VERSION}\0{config}".encode())
        for source in sources:
            path = Path(source).resolve()
            stat = path.stat()
            digest.update(f"\0{path}\0{stat.st_mtime_ns}\0{stat.st_size}".encode())
        return digest.hexdigest()

    def get(self, sources: Sequence[str | Path], config: str, compute: Callable[[], dict]) -> dict:
        """The cached features of ``sources`` under ``config``, computed (and stored) on a miss."""
        if self.directory is None:
            return compute()
        path = self.directory / f"{self.key(sources, config)}.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        features = compute()
        self.directory.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=self.directory, suffix=".partial")
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(features, file)
            os.replace(partial, path)
        except BaseException:
            os.unlink(partial)
            raise
        return features
