"""Reading the run's JSONL records (metrics, batch logs) the way a crash may have left them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_records(path: str | Path) -> Iterator[dict]:
    """The JSON objects of a JSONL file, skipping a line torn by a crash mid-write (and non-objects)."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec
