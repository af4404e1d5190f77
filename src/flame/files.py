"""Small file helpers shared by stores and checkpoints."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_checksum(path: str | Path, chunk: int = 8 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks (bounded memory for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
