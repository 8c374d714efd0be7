"""An on-disk cache for expensive, deterministic intermediate results (LC's adversarially
perturbed images), keyed by a content hash and guarded by a file lock so concurrent trials of
a sweep compute each entry once. Location: ``$BDAT_RAY_CACHE``, else ``~/.cache/bdat_ray``;
on a cluster point it at shared storage."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def cache_dir() -> Path:
    return Path(os.environ.get("BDAT_RAY_CACHE", "~/.cache/bdat_ray")).expanduser()


def content_key(*parts: Any) -> str:
    """Stable hash of JSON-able parts and tensors (hashed by their bytes)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def cached_tensors(
    kind: str, key: str, compute: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Load ``kind/key.pt`` or compute, save and return it (one process computes, the others
    wait on the lock and load)."""
    from filelock import FileLock

    folder = cache_dir() / kind
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.pt"
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        tensors = compute()
        tmp = path.with_suffix(".tmp")
        torch.save(tensors, tmp)
        os.replace(tmp, path)
        return tensors
