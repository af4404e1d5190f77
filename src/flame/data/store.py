"""The tokenized store: shards of token ids plus a document index, a manifest, checksums.

Layout of a store directory:
  <shard>.tokens          raw token ids (uint16 when the vocabulary fits, else uint32)
  <shard>.docs            uint64 [documents, 3]: start offset in the shard, source index, record number
  parts/part-I-of-N.json  one per prepared part, written last (atomically): the part is complete
  manifest.json           written once every part is complete: the store is usable

The training view is the concatenation of all shards in name order; a document never spans shards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from flame.errors import DataError

FORMAT = "flame-store"
VERSION = 1
_DOC_COLS = 3
DTYPES = ("uint16", "uint32")
VERIFIED = "verified.json"  # shards whose checksum matched, with the size and mtime they had then
# a shard is a plain file name inside the store: never a path that leads out of it
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
_PART_FILE = re.compile(r"part-(\d+)-of-(\d+)")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def write_error(what: str, path: str | Path, e: OSError) -> DataError:
    """A failed write as one clear message: what was being written, why, and the fix."""
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = Path(path).parent
        try:
            free = f"; {shutil.disk_usage(where).free / 1e6:,.1f} MB free there now"
        except OSError:
            free = ""
        hint = (
            f"free space on the device of {where}{free} (a store needs about 2 bytes per token, 4 with a "
            "vocabulary over 65,536), then run the same command again: finished parts are kept"
        )
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "choose a writable location, or fix its permissions"
    else:
        hint = "check the device, then run the same command again: finished parts are kept"
    return DataError(f"cannot write {what} {path}: {reason}", hint=hint)


def _atomic_write_json(path: Path, obj: Any, what: str = "") -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise write_error(what or "file", path, e) from None


def damaged(path: str | Path, problem: str, hint: str | None = None) -> DataError:
    return DataError(
        f"store {path} is damaged: {problem}",
        hint=hint
        or "re-run the `flame prepare` command that made it (for a store that `flame train` prepared "
        "from data.inputs: the same `flame train` command); finished parts are kept",
    )


def read_json(path: Path, store_dir: str | Path, what: str) -> Any:
    """A metadata file of a store; a damaged one is a DataError naming it."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise damaged(store_dir, f"{what} {path.name} is not valid JSON ({e})") from None


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_shard_name(name: Any) -> bool:
    return isinstance(name, str) and _SHARD_NAME.fullmatch(name) is not None and ".." not in name


def validate_manifest(m: Any, store_dir: str | Path, what: str = "manifest.json") -> None:
    """Every field training relies on has the right type and a sane value; else 'store X is damaged'."""

    def bad(field: str, value: Any, want: str) -> DataError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return damaged(store_dir, f"{what}: {field} is {shown}, expected {want}")

    if not isinstance(m, dict):
        raise bad("the content", m, "a JSON object")
    if m.get("dtype") not in DTYPES:
        raise bad("dtype", m.get("dtype"), " or ".join(DTYPES))
    tok = m.get("tokenizer")
    if not isinstance(tok, dict):
        raise bad("tokenizer", tok, "an object")
    if not isinstance(tok.get("fingerprint"), str):
        raise bad("tokenizer.fingerprint", tok.get("fingerprint"), "a string")
    vocab = tok.get("vocab_size")
    limit = 1 << (8 * np.dtype(m["dtype"]).itemsize)
    if not (_is_count(vocab) and 0 < vocab <= limit):
        raise bad("tokenizer.vocab_size", vocab, f"an integer in [1, {limit}] for {m['dtype']}")
    eos = tok.get("eos_id")
    if not (_is_count(eos) and eos < vocab):
        raise bad("tokenizer.eos_id", eos, f"an integer in [0, {vocab})")
    sources = m.get("sources")
    if not isinstance(sources, list):
        raise bad("sources", sources, "a list")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise bad("shards", shards, "a list")
    names = set()
    for i, sh in enumerate(shards):
        if not isinstance(sh, dict):
            raise bad(f"shards[{i}]", sh, "an object")
        if not check_shard_name(sh.get("name")):
            raise bad(f"shards[{i}].name", sh.get("name"), "a plain file name inside the store")
        if sh["name"] in names:
            raise bad(f"shards[{i}].name", sh["name"], "a name no other shard has")
        names.add(sh["name"])
        for k in ("tokens", "documents"):
            if not _is_count(sh.get(k)):
                raise bad(f"shards[{i}].{k}", sh.get(k), "a non-negative integer")
        if not isinstance(sh.get("checksum"), str):
            raise bad(f"shards[{i}].checksum", sh.get("checksum"), "a SHA-256 hex string")
    for k in ("num_tokens", "num_documents"):
        if k in m and not _is_count(m[k]):
            raise bad(k, m[k], "a non-negative integer")
    if "num_documents" in m and m["num_documents"] != sum(sh["documents"] for sh in shards):
        raise bad("num_documents", m["num_documents"], "the sum of the shards' documents")


class ShardWriter:
    """Writes one shard; files appear under their final names only when `close()` succeeds.

    A failed write (a full disk, a read-only directory) is a DataError naming the file; `abort()`
    then removes the temporary files and never raises, so the store is left as it was."""

    def __init__(self, store_dir: str | Path, name: str, dtype: np.dtype):
        self.dir = Path(store_dir)
        self.name = name
        self.dtype = np.dtype(dtype)
        self._tok_tmp = self.dir / f"{name}.tokens.tmp{os.getpid()}"
        self._docs_tmp = self.dir / f"{name}.docs.tmp{os.getpid()}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._tok = open(self._tok_tmp, "wb")
        except OSError as e:
            raise write_error("shard", self._tok_tmp, e) from None
        self._hash = hashlib.sha256()
        self._docs: list[tuple[int, int, int]] = []
        self._n = 0

    def add(self, tokens: np.ndarray, path_index: int, record: int) -> None:
        """Append one document, including its trailing EOS."""
        arr = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._docs.append((self._n, path_index, record))
        buf = arr.tobytes()
        try:
            self._tok.write(buf)
        except OSError as e:
            raise write_error("shard", self._tok_tmp, e) from None
        self._hash.update(buf)
        self._n += len(arr)

    def close(self) -> dict:
        docs = np.asarray(self._docs, dtype=np.uint64).reshape(-1, _DOC_COLS).tobytes()
        target = self._tok_tmp
        try:
            self._tok.flush()
            os.fsync(self._tok.fileno())
            self._tok.close()
            target = self._docs_tmp
            with open(self._docs_tmp, "wb") as f:
                f.write(docs)
                f.flush()
                os.fsync(f.fileno())
            # docs last: a shard counts as written when its .docs file exists
            target = self.dir / f"{self.name}.tokens"
            os.replace(self._tok_tmp, target)
            target = self.dir / f"{self.name}.docs"
            os.replace(self._docs_tmp, target)
        except OSError as e:
            self.abort()
            raise write_error("shard", target, e) from None
        return {
            "name": self.name,
            "tokens": self._n,
            "documents": len(self._docs),
            "checksum": self._hash.hexdigest(),
            "docs_checksum": hashlib.sha256(docs).hexdigest(),
        }

    def abort(self) -> None:
        """Drop what was written; never raises (it runs while another error is on its way out)."""
        try:
            self._tok.close()
        except OSError:
            pass  # e.g. the buffered tail hits the same full disk again: the file goes anyway
        for tmp in (self._tok_tmp, self._docs_tmp):
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


def write_part_manifest(store_dir: str | Path, part: int, num_parts: int, info: dict) -> None:
    parts = Path(store_dir) / "parts"
    try:
        parts.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error("folder", parts, e) from None
    _atomic_write_json(
        parts / f"part-{part}-of-{num_parts}.json",
        {**info, "part": part, "num_parts": num_parts},
        "part manifest",
    )


def part_path(store_dir: str | Path, part: int, num_parts: int) -> Path:
    return Path(store_dir) / "parts" / f"part-{part}-of-{num_parts}.json"


def store_status(store_dir: str | Path) -> dict:
    d = Path(store_dir)
    found: dict[int, set[int]] = {}
    for p in sorted((d / "parts").glob("part-*-of-*.json")):
        m = _PART_FILE.fullmatch(p.stem)
        if m is None or not int(m.group(1)) < int(m.group(2)):
            continue  # not a part manifest flame writes
        found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
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


def _read_part(d: Path, i: int, n: int) -> dict:
    p = part_path(d, i, n)
    info = read_json(p, d, "part manifest")
    validate_manifest(info, d, f"parts/{p.name}")
    return info


def _source_versions(d: Path, parts: list[dict]) -> None:
    """Refuse to merge parts that read different versions of an input (edited between them)."""
    seen: dict[str, dict[tuple, list[int]]] = {}
    for i, p in enumerate(parts):
        for src in p["sources"]:
            if isinstance(src, dict) and isinstance(src.get("state"), list):
                seen.setdefault(str(src.get("path")), {}).setdefault(tuple(src["state"]), []).append(i)
    for path, versions in seen.items():
        if len(versions) > 1:
            shown = "; ".join(
                f"parts {ids} saw {st[0]:,} bytes modified at ns {st[1]}" for st, ids in versions.items()
            )
            raise DataError(
                f"the parts of store {d} were prepared from different versions of {path} ({shown})",
                hint="run `flame prepare ... --part I/N` again for the parts made from the old version: "
                "they redo only the shards of what changed",
            )


def finalize_store(store_dir: str | Path) -> dict:
    """Merge complete part manifests into manifest.json; DataError naming the parts still missing."""
    d = Path(store_dir)
    st = store_status(d)
    if st["parts"] == 0:
        raise DataError(f"{d} has no prepared parts", hint="run `flame prepare --data.store` into it first")
    if st["missing"]:
        raise DataError(
            f"store {d} is incomplete: parts {st['missing']} of {st['parts']} are missing",
            hint=f"run `flame prepare ... --part I/{st['parts']}` for each missing part",
        )
    parts = [_read_part(d, i, st["parts"]) for i in range(st["parts"])]
    first = parts[0]
    for p in parts[1:]:
        if p["tokenizer"]["fingerprint"] != first["tokenizer"]["fingerprint"]:
            raise DataError(f"parts of {d} were prepared with different tokenizers")
        if p["dtype"] != first["dtype"]:
            raise damaged(d, f"its parts hold token ids of different types ({first['dtype']}, {p['dtype']})")
    _source_versions(d, parts)
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
    validate_manifest(manifest, d)  # e.g. two parts naming the same shard
    _atomic_write_json(d / "manifest.json", manifest, "store manifest")
    return manifest


def check_ids(batch_ids: np.ndarray, vocab_size: int, where: str = "a batch") -> None:
    """DataError when any token id of a batch is outside [0, vocab_size) (a damaged store or a
    tokenizer that does not match the model), before an embedding lookup turns it into an index
    error. One vectorised max (and min for signed ids) over the batch: about 4 µs for 8 x 2,048 ids."""
    if batch_ids.size == 0:
        return
    hi = int(batch_ids.max())
    lo = int(batch_ids.min()) if batch_ids.dtype.kind == "i" else 0
    if hi >= vocab_size or lo < 0:
        bad = hi if hi >= vocab_size else lo
        raise DataError(
            f"{where} holds token id {bad}, outside the vocabulary of {vocab_size} ids",
            hint="the data is damaged or was prepared with another tokenizer: run `flame prepare "
            "--verify STORE` on the store, or use the tokenizer it was prepared with",
        )


def check_shard(
    store_dir: Path, shard: dict, dtype: np.dtype, vocab_size: int, n_sources: int, ids: bool = True
) -> str | None:
    """Everything that can be checked of one shard: sizes, SHA-256 of its tokens (and of its
    document index where the manifest has one), token ids in the vocabulary, document index sane.
    None when it is fine, else what is wrong."""
    tok = store_dir / f"{shard['name']}.tokens"
    docs = store_dir / f"{shard['name']}.docs"
    problem = _size_problem(tok, docs, shard, dtype)
    if problem:
        return problem
    h = hashlib.sha256()
    top = 0
    with open(tok, "rb") as f:
        while b := f.read(8 << 20):
            h.update(b)
            if ids and vocab_size < (1 << (8 * dtype.itemsize)):
                top = max(top, int(np.frombuffer(b, dtype, len(b) // dtype.itemsize).max()))
    if h.hexdigest() != shard["checksum"]:
        return f"{tok.name}: checksum mismatch (SHA-256 {h.hexdigest()[:12]}..., expected {shard['checksum'][:12]}...)"
    if top >= vocab_size:
        return f"{tok.name}: token id {top} is outside the vocabulary of {vocab_size} ids"
    raw = docs.read_bytes()
    want = shard.get("docs_checksum")
    if isinstance(want, str) and hashlib.sha256(raw).hexdigest() != want:
        return f"{docs.name}: checksum mismatch"
    index = np.frombuffer(raw, np.uint64).reshape(-1, _DOC_COLS)
    if len(index):
        starts = index[:, 0]
        if (
            starts[0] != 0
            or (np.diff(starts.astype(np.int64)) <= 0).any()
            or int(starts[-1]) >= shard["tokens"]
        ):
            return f"{docs.name}: document offsets are out of order or out of range"
        if int(index[:, 1].max()) >= n_sources:
            return f"{docs.name}: a source index is out of range"
    return None


def _size_problem(tok: Path, docs: Path, shard: dict, dtype: np.dtype) -> str | None:
    if not tok.is_file() or not docs.is_file():
        return f"{shard['name']}: missing files"
    if tok.stat().st_size != shard["tokens"] * dtype.itemsize:
        return f"{tok.name}: size {tok.stat().st_size} B, expected {shard['tokens'] * dtype.itemsize} B"
    if docs.stat().st_size != shard["documents"] * _DOC_COLS * 8:
        return f"{docs.name}: size does not match {shard['documents']} documents"
    return None


class TokenStore:
    """Memory-mapped reader over a finished store; the concatenated token stream of all shards.

    Opening checks the manifest and every shard's file sizes (cheap). `verify`: False checks no
    more; True also checks every shard's SHA-256 now; "background" checks them in a background
    thread (shards verified before and unchanged since, by size and mtime, are skipped), and the
    next read after a mismatch raises a DataError naming the shard. Every read checks the token ids
    it returns against the vocabulary.
    """

    def __init__(self, path: str | Path, verify: bool | str = False, max_open: int = 256):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            if (self.path / "manifest.json.damaged").is_file():
                raise damaged(
                    self.path,
                    "`flame prepare --verify` found damaged shards and set them aside (*.damaged)",
                )
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
        self.manifest = read_json(mf, self.path, "its manifest")
        if not isinstance(self.manifest, dict):
            raise damaged(self.path, "manifest.json does not hold a JSON object")
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise DataError(
                f"{self.path}: unsupported store format {self.manifest.get('format')} v{self.manifest.get('version')}"
            )
        validate_manifest(self.manifest, self.path)
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
        self.num_documents = int(self.manifest.get("num_documents", sum(s["documents"] for s in self.shards)))
        self._vocab = self.vocab_size
        # ids read from a shard need a check only when the dtype can hold ids past the vocabulary
        self._check_ids = self._vocab < (1 << (8 * self.dtype.itemsize))
        self._open: OrderedDict[int, np.memmap] = OrderedDict()
        self._docs: OrderedDict[int, np.ndarray] = OrderedDict()
        self._max_open = max_open
        self._damage: str | None = None
        self._thread: threading.Thread | None = None
        self._check_files(verify is True)
        if verify == "background":
            self._thread = threading.Thread(
                target=self._verify_in_background, daemon=True, name="flame-verify"
            )
            self._thread.start()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_thread"] = None  # a loader worker reads; the opening process verifies
        return state

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
            tok, docs = self.path / f"{s['name']}.tokens", self.path / f"{s['name']}.docs"
            problem = _size_problem(tok, docs, s, self.dtype)
            if problem is None and verify:
                problem = check_shard(self.path, s, self.dtype, self._vocab, len(self.sources))
            if problem:
                problems.append(problem)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise damaged(self.path, shown, self._repair_hint())

    def _repair_hint(self) -> str:
        return (
            f"run `flame prepare --verify {self.path}` (it sets the damaged shards aside), then the "
            "`flame prepare` command that made the store again (for a store `flame train` prepared from "
            "data.inputs: the same `flame train` command): only those shards are tokenized again"
        )

    def verify(self) -> None:
        """Check every shard's checksum now; DataError naming the damaged ones."""
        self._check_files(verify=True)

    def _verify_in_background(self) -> None:
        try:
            known = self._load_verified()
            done = {}
            for s in self.shards:
                tok = self.path / f"{s['name']}.tokens"
                st = tok.stat()
                stamp = [st.st_size, st.st_mtime_ns, s["checksum"]]
                if known.get(s["name"]) != stamp:
                    problem = check_shard(self.path, s, self.dtype, self._vocab, len(self.sources), ids=False)
                    if problem:
                        self._damage = problem
                        return
                done[s["name"]] = stamp
            if done != known:
                self._save_verified(done)
        except OSError as e:
            self._damage = f"cannot read it: {e.strerror or e}"

    def _load_verified(self) -> dict:
        try:
            got = json.loads((self.path / VERIFIED).read_text())
            return got if isinstance(got, dict) else {}
        except (OSError, ValueError, UnicodeDecodeError):
            return {}

    def _save_verified(self, done: dict) -> None:
        try:
            _atomic_write_json(self.path / VERIFIED, done, "verification record")
        except DataError:
            pass  # a read-only store is verified again next time

    def wait_verified(self, timeout: float | None = None) -> None:
        """Wait for the background verification, then raise if it found damage."""
        if self._thread is not None:
            self._thread.join(timeout)
        self.raise_if_damaged()

    def raise_if_damaged(self) -> None:
        """DataError when the background verification found a damaged shard (cheap: call per batch)."""
        if self._damage is not None:
            raise damaged(self.path, self._damage, self._repair_hint())

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

    def _bad_ids(self, out: np.ndarray, starts) -> None:
        """The slow path after a batch failed the id check: which shard holds the bad id."""
        flat = out.reshape(len(starts), -1) if out.ndim > 1 else out.reshape(1, -1)
        for row, s in zip(flat, np.atleast_1d(starts).tolist()):
            j = int(np.argmax(row >= self._vocab))
            if row[j] >= self._vocab:
                pos = s + j
                i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
                name = self.shards[i]["name"]
                raise damaged(
                    self.path,
                    f"shard {name}.tokens holds token id {int(row[j])} at token {pos - int(self.offsets[i])}, "
                    f"outside the vocabulary of {self._vocab} ids",
                    self._repair_hint(),
                )
        check_ids(out, self._vocab, f"store {self.path}")

    def read(self, start: int, out: np.ndarray) -> None:
        """Copy tokens [start, start + len(out)) of the concatenated stream into `out`."""
        if self._damage is not None:
            self.raise_if_damaged()
        self._read(start, out)
        if self._check_ids and len(out) and out.max() >= self._vocab:
            self._bad_ids(out, [start])

    def _read(self, start: int, out: np.ndarray) -> None:
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
        """out[r] = tokens [starts[j], starts[j] + L) for each row r = rows[j] (default: j).

        The ids read are checked against the vocabulary (one max over the rows read)."""
        if self._damage is not None:
            self.raise_if_damaged()
        self._read_windows(starts, out, rows)
        if self._check_ids and len(starts):
            got = out if rows is None else out[rows]
            if got.max() >= self._vocab:
                self._bad_ids(got, starts)

    def _read_windows(self, starts: np.ndarray, out: np.ndarray, rows: np.ndarray | None) -> None:
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
                self._read(s, out[r])

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
