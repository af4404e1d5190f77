"""The tokenized store: shards of token ids plus a document index, a manifest, checksums.

Layout of a store directory:
  <shard>.tokens          raw token ids (uint16 when the vocabulary fits, else uint32)
  <shard>.docs            uint64 [documents, 3]: start offset in the shard, source index, record number
  parts/part-I-of-N.json  one per prepared part, written last (atomically): the part is complete
  manifest.json           written once every part is complete: the store is usable

The training view is the concatenation of all shards in name order; a document never spans shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from flame.errors import DataError

FORMAT = "flame-store"
VERSION = 1
_DOC_COLS = 3


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_checksum(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


class ShardWriter:
    """Writes one shard; files appear under their final names only when `close()` succeeds."""

    def __init__(self, store_dir: str | Path, name: str, dtype: np.dtype):
        self.dir = Path(store_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.dtype = np.dtype(dtype)
        self._tok_tmp = self.dir / f"{name}.tokens.tmp{os.getpid()}"
        self._tok = open(self._tok_tmp, "wb")
        self._hash = hashlib.sha256()
        self._docs: list[tuple[int, int, int]] = []
        self._n = 0

    def add(self, tokens: np.ndarray, path_index: int, record: int) -> None:
        """Append one document, including its trailing EOS."""
        arr = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._docs.append((self._n, path_index, record))
        buf = arr.tobytes()
        self._tok.write(buf)
        self._hash.update(buf)
        self._n += len(arr)

    def close(self) -> dict:
        self._tok.flush()
        os.fsync(self._tok.fileno())
        self._tok.close()
        docs = np.asarray(self._docs, dtype=np.uint64).reshape(-1, _DOC_COLS)
        docs_tmp = self.dir / f"{self.name}.docs.tmp{os.getpid()}"
        with open(docs_tmp, "wb") as f:
            f.write(docs.tobytes())
            f.flush()
            os.fsync(f.fileno())
        # docs last: a shard counts as written when its .docs file exists
        os.replace(self._tok_tmp, self.dir / f"{self.name}.tokens")
        os.replace(docs_tmp, self.dir / f"{self.name}.docs")
        return {
            "name": self.name,
            "tokens": self._n,
            "documents": len(self._docs),
            "checksum": self._hash.hexdigest(),
        }

    def abort(self) -> None:
        self._tok.close()
        self._tok_tmp.unlink(missing_ok=True)


def write_part_manifest(store_dir: str | Path, part: int, num_parts: int, info: dict) -> None:
    parts = Path(store_dir) / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(
        parts / f"part-{part}-of-{num_parts}.json", {**info, "part": part, "num_parts": num_parts}
    )


def store_status(store_dir: str | Path) -> dict:
    d = Path(store_dir)
    found: dict[int, set[int]] = {}
    for p in sorted((d / "parts").glob("part-*-of-*.json")):
        _, i, _, n = p.stem.split("-")
        found.setdefault(int(n), set()).add(int(i))
    if len(found) > 1:
        raise DataError(
            f"{d} mixes parts of different splits {sorted(found)}", hint="prepare into a fresh directory"
        )
    num = next(iter(found), 0)
    complete = sorted(found.get(num, set()))
    missing = [i for i in range(num) if i not in found.get(num, set())]
    return {
        "parts": num,
        "complete": complete,
        "missing": missing,
        "finalized": (d / "manifest.json").is_file(),
    }


def finalize_store(store_dir: str | Path) -> dict:
    """Merge complete part manifests into manifest.json; DataError naming the parts still missing."""
    d = Path(store_dir)
    st = store_status(d)
    if st["parts"] == 0:
        raise DataError(f"{d} has no prepared parts", hint="run `flame prepare --output` into it first")
    if st["missing"]:
        raise DataError(
            f"store {d} is incomplete: parts {st['missing']} of {st['parts']} are missing",
            hint=f"run `flame prepare ... --part I/{st['parts']}` for each missing part",
        )
    parts = [
        json.loads((d / "parts" / f"part-{i}-of-{st['parts']}.json").read_text()) for i in range(st["parts"])
    ]
    first = parts[0]
    for p in parts[1:]:
        if p["tokenizer"]["fingerprint"] != first["tokenizer"]["fingerprint"]:
            raise DataError(f"parts of {d} were prepared with different tokenizers")
    shards = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["name"])
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": first["tokenizer"],
        "dtype": first["dtype"],
        "sources": first["sources"],
        "num_tokens": sum(s["tokens"] for s in shards),
        "num_documents": sum(s["documents"] for s in shards),
        "shards": shards,
        "parts": st["parts"],
        "bad_records": [p.get("bad_records", "") for p in parts if p.get("bad_records")],
    }
    _atomic_write_json(d / "manifest.json", manifest)
    return manifest


class TokenStore:
    """Memory-mapped reader over a finished store; the concatenated token stream of all shards."""

    def __init__(self, path: str | Path, verify: bool = False, max_open: int = 256):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            if (self.path / "parts").is_dir():
                st = store_status(self.path)
                if st["missing"]:
                    raise DataError(
                        f"store {self.path} is incomplete: parts {st['missing']} of {st['parts']} are missing",
                        hint="finish them with `flame prepare --part I/N`; `flame prepare --status` lists them",
                    )
                finalize_store(self.path)
            else:
                raise DataError(
                    f"{self.path} is not a flame store (no manifest.json)",
                    hint="make one with `flame prepare`",
                )
        try:
            self.manifest = json.loads(mf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(
                f"{mf} is corrupt: {e}", hint="re-run `flame prepare` into a fresh directory"
            ) from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise DataError(
                f"{self.path}: unsupported store format {self.manifest.get('format')} v{self.manifest.get('version')}"
            )
        self.dtype = np.dtype(self.manifest["dtype"])
        self.shards: list[dict] = self.manifest["shards"]
        if not self.shards:
            raise DataError(
                f"store {self.path} holds no documents", hint="check the inputs given to `flame prepare`"
            )
        sizes = np.array([s["tokens"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # shard i covers [offsets[i], offsets[i+1])
        self._sizes = sizes
        self.num_tokens = int(self.offsets[-1])
        self.num_documents = int(self.manifest["num_documents"])
        self._open: OrderedDict[int, np.memmap] = OrderedDict()
        self._docs: OrderedDict[int, np.ndarray] = OrderedDict()
        self._max_open = max_open
        self._check_files(verify)

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    @property
    def sources(self) -> list:
        return self.manifest["sources"]

    def fingerprint(self) -> str:
        """Identifies the content: changes when any shard changes."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s['name']}:{s['tokens']}:{s['checksum']};".encode())
        return h.hexdigest()[:16]

    def _check_files(self, verify: bool) -> None:
        problems = []
        for s in self.shards:
            tok = self.path / f"{s['name']}.tokens"
            docs = self.path / f"{s['name']}.docs"
            if not tok.is_file() or not docs.is_file():
                problems.append(f"{s['name']}: missing files")
            elif tok.stat().st_size != s["tokens"] * self.dtype.itemsize:
                problems.append(
                    f"{tok.name}: size {tok.stat().st_size} B, expected {s['tokens'] * self.dtype.itemsize} B"
                )
            elif docs.stat().st_size != s["documents"] * _DOC_COLS * 8:
                problems.append(f"{docs.name}: size does not match {s['documents']} documents")
            elif verify and file_checksum(tok) != s["checksum"]:
                problems.append(f"{tok.name}: checksum mismatch")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise DataError(f"store {self.path} is damaged: {shown}", hint="re-run `flame prepare` for it")

    def verify(self) -> None:
        self._check_files(verify=True)

    def shard_tokens(self, i: int) -> np.ndarray:
        """Shard i's tokens, memory-mapped (an LRU of at most `max_open` shards stays open)."""
        arr = self._open.get(i)
        if arr is None:
            n = self.shards[i]["tokens"]
            path = self.path / f"{self.shards[i]['name']}.tokens"
            # a plain ndarray view of the map: slicing np.memmap objects costs a third of a batch
            arr = (
                np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)).view(np.ndarray)
                if n
                else np.zeros(0, self.dtype)
            )
            self._open[i] = arr
            if len(self._open) > self._max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(i)
        return arr

    def shard_docs(self, i: int) -> np.ndarray:
        """[documents, 3] uint64, memory-mapped: start offset in the shard, source index, record number."""
        path = self.path / f"{self.shards[i]['name']}.docs"
        n = self.shards[i]["documents"]
        if not n:
            return np.zeros((0, _DOC_COLS), np.uint64)
        return np.memmap(path, dtype=np.uint64, mode="r", shape=(n, _DOC_COLS)).view(np.ndarray)

    def doc_column(self, i: int) -> np.ndarray:
        """Document start offsets of shard i as a contiguous int64 array (a bounded LRU cache)."""
        col = self._docs.get(i)
        if col is None:
            col = np.ascontiguousarray(self.shard_docs(i)[:, 0], dtype=np.int64)
            self._docs[i] = col
            if len(self._docs) > self._max_open:
                self._docs.popitem(last=False)
        else:
            self._docs.move_to_end(i)
        return col

    def read(self, start: int, out: np.ndarray) -> None:
        """Copy tokens [start, start + len(out)) of the concatenated stream into `out`."""
        n = len(out)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = 0
        while pos < n:
            local = start + pos - int(self.offsets[i])
            take = min(n - pos, self.shards[i]["tokens"] - local)
            out[pos : pos + take] = self.shard_tokens(i)[local : local + take]
            pos += take
            i += 1

    def read_windows(self, starts: np.ndarray, out: np.ndarray, rows: np.ndarray | None = None) -> None:
        """out[r] = tokens [starts[j], starts[j] + L) for each row r = rows[j] (default: j)."""
        length = out.shape[1]
        rows = range(len(starts)) if rows is None else rows.tolist()
        shard = np.searchsorted(self.offsets, starts, side="right") - 1
        local = starts - self.offsets[shard]
        inside = local + length <= self._sizes[shard]
        if shard[0] == shard[-1] and inside.all() and (shard == shard[0]).all():  # the common case
            arr = self.shard_tokens(int(shard[0]))
            for r, lo in zip(rows, local.tolist()):
                out[r] = arr[lo : lo + length]
            return
        for r, s, i, lo, ok in zip(rows, starts.tolist(), shard.tolist(), local.tolist(), inside.tolist()):
            if ok:
                out[r] = self.shard_tokens(i)[lo : lo + length]
            else:  # the window runs into the next shard
                self.read(s, out[r])

    def doc_starts(self, start: int, stop: int) -> np.ndarray:
        """Global offsets of the documents that start inside [start, stop)."""
        out = []
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while i < len(self.shards) and self.offsets[i] < stop:
            base = int(self.offsets[i])
            col = self.doc_column(i)
            lo = np.searchsorted(col, start - base, side="left")
            hi = np.searchsorted(col, stop - base, side="left")
            out.append(col[lo:hi] + base)
            i += 1
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def inner_doc_starts(self, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Documents starting strictly inside windows [s, s + length): (window index, offset in it).

        Vectorised per shard: one searchsorted for all windows of a batch that lie in one shard.
        """
        shard = np.searchsorted(self.offsets, starts, side="right") - 1
        first, last = int(shard.min()), int(shard.max())
        groups = (
            [(first, None)]
            if first == last
            else [(i, np.nonzero(shard == i)[0]) for i in np.unique(shard).tolist()]
        )
        rows, offs = [], []
        for i, m in groups:
            base = int(self.offsets[i])
            col = self.doc_column(i)
            local = (starts if m is None else starts[m]) - base
            lo = col.searchsorted(local + 1)
            hi = col.searchsorted(local + length)
            counts = hi - lo
            total = int(counts.sum())
            idx = np.arange(len(local)) if m is None else m
            if total:
                ends = counts.cumsum()
                take = np.arange(total) + np.repeat(lo - (ends - counts), counts)
                rows.append(np.repeat(idx, counts))
                offs.append(col[take] - np.repeat(local, counts))
            over = local + length > self.shards[i]["tokens"]
            if over.any():  # windows that run into later shards
                for j in idx[over].tolist():
                    s = int(starts[j])
                    extra = self.doc_starts(base + self.shards[i]["tokens"], s + length) - s
                    rows.append(np.full(len(extra), j))
                    offs.append(extra)
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if len(rows) == 1:
            return rows[0], offs[0]
        return np.concatenate(rows).astype(np.int64), np.concatenate(offs).astype(np.int64)

    def locate(self, pos: int) -> tuple[str, int, int]:
        """(source file, record number, token offset in that document) of global token `pos`."""
        i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
        local = pos - int(self.offsets[i])
        j = int(np.searchsorted(self.doc_column(i), local, side="right")) - 1
        start, src, rec = (int(x) for x in self.shard_docs(i)[j])
        source = self.sources[src]
        return (source["path"] if isinstance(source, dict) else str(source)), rec, local - start
