"""Document readers: text, JSON Lines (.gz/.zst), Parquet and Hugging Face datasets.

Inputs expand to a sorted list of paths; paths split into `Unit`s (deterministic slices, the unit
of parallel work); `read_unit` yields `Doc`s and reports malformed records to a `BadRecords`
counter, which warns with file:line, summarises, and stops a run on a mostly-bad corpus.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import gzip
import io
import json
import os
import stat
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from flame.errors import DataError

KINDS = ("text", "jsonl", "parquet", "hf")
# what a folder (or an extension-less glob) contributes; explicitly named files may be anything
CORPUS_EXTS = (".txt", ".md", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".parquet")
JSONL_EXTS = (".jsonl", ".json", ".ndjson")
COMPRESSED = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json")
BOM = "\ufeff"  # a UTF-8 byte order mark at the start of a text or jsonl file
BLOCK = 8 << 20


# ---------------------------------------------------------------- inputs


def _compression(path: str) -> str | None:
    return COMPRESSED.get(os.path.splitext(path)[1].lower())


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in SAVED_DATASET_MARKERS)


def kind_of(path: str) -> str:
    """'hf' (hub spec or saved dataset folder), 'parquet', 'jsonl', or 'text' (anything else)."""
    if path.startswith("hf:") or os.path.isdir(path):
        return "hf"
    name = path.lower()
    if _compression(name):
        name = os.path.splitext(name)[0]
    ext = os.path.splitext(name)[1]
    if ext == ".parquet":
        return "parquet"
    if ext in JSONL_EXTS:
        return "jsonl"
    return "text"


def _check_readable(path: str, spec: str) -> None:
    if not os.access(path, os.R_OK):
        raise DataError(f"input '{spec}': cannot read {path} (permission denied)", hint="fix its permissions")


class _Skipped:
    """What an expansion left out: entries that are not regular files, and paths that lead to a file
    (or folder) already included through another path (symbolic links)."""

    def __init__(self) -> None:
        self.special: list[tuple[str, str]] = []  # (path, what it is)
        self.special_reals: set[str] = set()
        self.duplicates = 0
        self.loops = 0


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _regular(path: str, skipped: _Skipped) -> bool:
    """True for a regular file (through links); anything else is counted and left out: reading a FIFO
    or a device would block forever or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        skipped.special.append((path, "a broken symbolic link"))
        return False
    if stat.S_ISREG(mode):
        return True
    real = os.path.realpath(path)
    if real not in skipped.special_reals:
        skipped.special_reals.add(real)
        skipped.special.append((path, _special_kind(mode)))
    return False


def _tree(top: str, skipped: _Skipped) -> Iterator[tuple[str, bool]]:
    """(path, is_dir) of every entry under `top` outside hidden folders, following symbolic links to
    folders but entering each real folder once: a link loop ends, and a linked folder is not read twice."""
    seen = {os.path.realpath(top)}
    for root, dirs, files in os.walk(top, followlinks=True):
        keep = []
        for d in sorted(dirs):
            if d.startswith("."):
                continue
            full = os.path.join(root, d)
            real = os.path.realpath(full)
            if real in seen:
                skipped.loops += 1
                continue
            seen.add(real)
            keep.append(d)
            yield full, True
        dirs[:] = keep
        for f in sorted(files):
            yield os.path.join(root, f), False


def _walk(folder: str, skipped: _Skipped) -> list[str]:
    found = []
    saved: set[str] = set()
    for full, is_dir in _tree(folder, skipped):
        parent = os.path.dirname(full)
        if any(parent == s or parent.startswith(s + os.sep) for s in saved):
            continue  # inside a saved dataset folder: the folder is the input
        if is_dir:
            if _is_saved_dataset(full):
                saved.add(full)
                found.append(os.path.normpath(full))
        elif (
            not os.path.basename(full).startswith(".")
            and full.lower().endswith(CORPUS_EXTS)
            and _regular(full, skipped)
        ):
            found.append(os.path.normpath(full))
    return found


def _match_parts(pattern: list[str], parts: list[str]) -> bool:
    """glob-style match of path components; a '**' component matches zero or more components."""
    if not pattern:
        return not parts
    head = pattern[0]
    if head == "**":  # like glob: it never matches a hidden name
        for i in range(len(parts) + 1):
            if _match_parts(pattern[1:], parts[i:]):
                return True
            if i < len(parts) and parts[i].startswith("."):
                return False
        return False
    if not parts:
        return False
    if parts[0].startswith(".") and not head.startswith("."):
        return False
    return fnmatch.fnmatchcase(parts[0], head) and _match_parts(pattern[1:], parts[1:])


def _recursive_glob(spec: str, skipped: _Skipped) -> list[str]:
    """glob(spec, recursive=True) that enters each real folder once (glob follows link loops)."""
    parts = spec.split(os.sep)
    i = 0
    while i < len(parts) and not glob.has_magic(parts[i]):
        i += 1
    base = os.sep.join(parts[:i]) or (os.sep if spec.startswith(os.sep) else "")
    pattern = [p for p in parts[i:] if p]
    top = base or "."
    if not os.path.isdir(top):
        return []
    out = []
    if pattern == ["**"] and base:
        out.append(base)
    for full, _ in _tree(top, skipped):
        rel = os.path.relpath(full, top)
        if _match_parts(pattern, rel.split(os.sep)):
            out.append(full if base else rel)
    return out


def _saved_dict_error(spec: str) -> DataError:
    splits = sorted(d for d in os.listdir(spec) if os.path.isdir(os.path.join(spec, d)))
    return DataError(
        f"input '{spec}' is a saved DatasetDict with splits {splits}; name one split",
        hint=f"give e.g. '{os.path.join(spec, splits[0] if splits else 'train')}'",
    )


def _expand_one(spec: str, skipped: _Skipped) -> list[str]:
    if not spec.strip():
        raise DataError(
            "an input is an empty name ('')",
            hint="give files, folders, globs ('data/**/*.jsonl.zst'), hf:NAME[:SPLIT] or 'stdlib'",
        )
    if spec.startswith("hf:"):
        if len(spec.split(":")) > 4 or not spec.split(":")[1]:
            raise DataError(f"input '{spec}': expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
        return [spec]
    if spec == "stdlib" and not os.path.exists(spec):
        # the embedded default corpus: this interpreter's own standard library, no download needed
        return sorted(glob.glob(os.path.join(glob.escape(sysconfig.get_paths()["stdlib"]), "*.py")))
    if os.path.isdir(spec):
        if _is_saved_dataset(spec):
            return [os.path.normpath(spec)]
        if os.path.isfile(os.path.join(spec, "dataset_dict.json")):
            raise _saved_dict_error(spec)
        return _walk(spec, skipped)
    if os.path.isfile(spec):
        return [os.path.normpath(spec)]
    if os.path.exists(spec):  # named explicitly, yet not a regular file: reading it could block forever
        raise DataError(
            f"input '{spec}' is {_special_kind(os.stat(spec).st_mode)}; flame reads regular files only",
            hint="copy the data into a file first",
        )
    if os.path.islink(spec):
        raise DataError(f"input '{spec}' is a broken symbolic link", hint="fix the link or give its target")
    if glob.has_magic(spec):
        # a pattern naming an extension ("*.py") keeps every match; "data/**" keeps corpus files only
        explicit = "." in os.path.basename(spec)
        matches = _recursive_glob(spec, skipped) if "**" in spec.split(os.sep) else glob.glob(spec)
        out = []
        for m in matches:
            if os.path.isdir(m):
                if _is_saved_dataset(m):
                    out.append(os.path.normpath(m))
            elif (explicit or m.lower().endswith(CORPUS_EXTS)) and _regular(m, skipped):
                out.append(os.path.normpath(m))
        return out
    raise DataError(
        f"input '{spec}': no such file, folder or glob",
        hint="give files, folders, globs ('data/**/*.jsonl.zst'), hf:NAME[:SPLIT], a saved dataset folder, or 'stdlib'",
    )


def expand_inputs(specs: list[str] | str, log: Callable[[str], None] | None = None) -> list[str]:
    """Files, folders (recursive), globs, hf:NAME[:SPLIT], saved datasets, 'stdlib' -> sorted unique paths.

    A file reached through several paths (symbolic links to it or to a folder above it) is read
    once, under the first of its paths in sorted order; link loops end. Entries that are not regular
    files (FIFOs, sockets, devices, broken links) are left out with a counted warning to `log`
    (stderr by default); one named explicitly is an error.
    """
    log = log or _stderr
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise DataError("no inputs given", hint="pass at least one file, folder or glob (or 'stdlib')")
    out: set[str] = set()
    skipped = _Skipped()
    for spec in specs:
        found = _expand_one(spec, skipped)
        if not found:
            raise DataError(
                f"input '{spec}' matches no files",
                hint=f"folders contribute regular files ending {', '.join(CORPUS_EXTS)} (hidden files are skipped)",
            )
        for p in found:
            if not p.startswith("hf:"):
                _check_readable(p, spec)
        out.update(found)
    unique: list[str] = []
    reals: set[str] = set()
    for p in sorted(out):
        real = p if p.startswith("hf:") else os.path.realpath(p)
        if real in reals:
            skipped.duplicates += 1
            continue
        reals.add(real)
        unique.append(p)
    if skipped.special:
        kinds: dict[str, int] = {}
        for _, what in skipped.special:
            kinds[what] = kinds.get(what, 0) + 1
        n = len(skipped.special)
        log(
            f"warning: skipped {n} input entr{'y' if n == 1 else 'ies'} that "
            f"{'is' if n == 1 else 'are'} not a regular file ("
            + ", ".join(f"{c} x {w}" for w, c in sorted(kinds.items()))
            + f"); first: {skipped.special[0][0]}"
        )
    if skipped.duplicates or skipped.loops:
        log(
            f"note: {skipped.duplicates + skipped.loops} input path(s) lead to a file or folder already "
            "included (symbolic links); each file is read once"
        )
    return unique


def file_state(path: str) -> list[int] | None:
    """[size, mtime in ns] of an input file (for a folder: of its files together), None for hub names.

    Recorded with every prepared unit, so a rerun notices an input that was edited in between."""
    if path.startswith("hf:"):
        return None
    try:
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            return [st.st_size, st.st_mtime_ns]
        size, mtime = 0, st.st_mtime_ns
        for e in os.scandir(path):
            if e.is_file():
                est = e.stat()
                size += est.st_size
                mtime = max(mtime, est.st_mtime_ns)
        return [size, mtime]
    except OSError:
        return [-1, -1]


# ---------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    """A deterministic slice of one input: the unit of parallel work.

    start/stop: byte offsets (uncompressed text/jsonl; a range owns the lines that start inside it),
    row-group indices (parquet) or row indices (hf); stop -1 = to the end. `record` is the record
    number of the slice's first record (its first line, or first row), so messages can say file:line.
    """

    path: str
    kind: str
    start: int = 0
    stop: int = -1
    record: int = 0


def _line_starts(path: str, target: int) -> list[tuple[int, int]]:
    """(byte offset, line number) of the first line at or after every ~target bytes; one sequential read."""
    size = os.path.getsize(path)
    starts = [(0, 0)]
    buf = bytearray(BLOCK)
    pos = lines = 0
    want = target
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            while want < pos + n:
                i = buf.find(b"\n", max(want - 1 - pos, 0), n)
                if i < 0:
                    break  # the boundary's line continues into the next block
                start = pos + i + 1
                if start < size:
                    starts.append((start, lines + buf.count(b"\n", 0, i + 1)))
                want = start + target
            lines += buf.count(b"\n", 0, n)
            pos += n
    return starts


@functools.lru_cache(maxsize=8)
def _load_saved(path: str):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise DataError(f"input '{path}': cannot load saved dataset: {e}") from None
    if not isinstance(ds, datasets.Dataset):
        raise _saved_dict_error(path)
    return ds


TEXT_UNIT_BYTES = 64 << 20  # a .txt file is one document up to this size (prepare and streaming alike)


def plan_units(paths: list[str], target_bytes: int = 64 << 20, text_bytes: int | None = None) -> list[Unit]:
    """Split inputs into units of about target_bytes: byte ranges of big uncompressed text/jsonl files,
    groups of parquet row groups, row ranges of saved datasets; compressed files and hub datasets whole.
    Text files split at `text_bytes` (default target_bytes): each piece of one is a document, so a plan
    sized for the worker count must not cut them."""
    if target_bytes < 1:
        raise ValueError("target_bytes must be positive")
    units: list[Unit] = []
    for path in paths:
        kind = kind_of(path)
        limit = text_bytes if (text_bytes and kind == "text") else target_bytes
        if path.startswith("hf:"):
            units.append(Unit(path, kind))
        elif kind == "hf":
            ds = _load_saved(path)
            n = len(ds)
            nbytes = max(ds.data.nbytes, 1)
            per = max(1, -(-n * target_bytes // nbytes))
            units += [Unit(path, kind, a, min(a + per, n), a) for a in range(0, n, per)]
        elif kind == "parquet":
            meta = _parquet_file(path).metadata
            g0, rows, row0, size = 0, 0, 0, 0
            for g in range(meta.num_row_groups):
                size += meta.row_group(g).total_byte_size
                rows += meta.row_group(g).num_rows
                if size >= target_bytes or g == meta.num_row_groups - 1:
                    units.append(Unit(path, kind, g0, g + 1, row0))
                    g0, row0, size = g + 1, rows, 0
        elif _compression(path) or os.path.getsize(path) <= limit:
            units.append(Unit(path, kind))
        else:
            starts = _line_starts(path, limit)
            for i, (start, line) in enumerate(starts):
                stop = starts[i + 1][0] if i + 1 < len(starts) else -1
                units.append(Unit(path, kind, start, stop, line))
    return units


def _row_group_bytes(rg) -> int:
    """Compressed on-disk bytes of a parquet row group (the sum over its column chunks)."""
    size = getattr(rg, "total_compressed_size", None)  # not every pyarrow version has it
    if size is None:
        size = sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
    return int(size)


def unit_bytes(unit: Unit) -> int:
    """Approximate on-disk bytes of a unit (for progress and ETA)."""
    if unit.path.startswith("hf:"):
        return 0
    if unit.kind == "hf":
        ds = _load_saved(unit.path)
        return ds.data.nbytes * (unit.stop - unit.start) // max(len(ds), 1)
    if unit.kind == "parquet":
        meta = _parquet_file(unit.path).metadata
        return sum(_row_group_bytes(meta.row_group(g)) for g in range(unit.start, unit.stop))
    stop = os.path.getsize(unit.path) if unit.stop < 0 else unit.stop
    return stop - unit.start


# automatic unit sizing: enough similar units that every worker stays busy to the end (a worker that
# draws the last unit finishes at most one unit after the others), few enough that per-unit costs
# (a shard, a record, a seek) stay negligible
UNITS_PER_WORKER = 8
MIN_AUTO_UNIT = 2 << 20
MAX_AUTO_UNIT = 64 << 20
MIN_SPLIT_UNIT = 256 << 10  # below this a worker costs more to start than it saves


def input_bytes(paths: list[str]) -> int:
    """On-disk bytes of the inputs (a folder: its files; hub names count 0): what unit sizing divides."""
    total = 0
    for p in paths:
        if p.startswith("hf:"):
            continue
        try:
            if os.path.isdir(p):
                for top, _, names in os.walk(p):
                    total += sum(os.path.getsize(os.path.join(top, n)) for n in names)
            else:
                total += os.path.getsize(p)
        except OSError:
            pass  # reported by the reader, with its own message
    return total


def auto_unit_bytes(total_bytes: int, workers: int) -> int:
    """The unit size for `total_bytes` of input on `workers` workers: about UNITS_PER_WORKER units per
    worker, within [MIN_AUTO_UNIT, MAX_AUTO_UNIT], but never fewer units than workers while each would
    still hold MIN_SPLIT_UNIT. A pure function of its two arguments (a resumed prepare keeps its plan)."""
    workers = max(1, int(workers))
    if total_bytes <= 0:
        return MAX_AUTO_UNIT
    size = min(max(-(-total_bytes // (UNITS_PER_WORKER * workers)), MIN_AUTO_UNIT), MAX_AUTO_UNIT)
    if total_bytes // size < workers:  # the minimum would leave workers idle: split finer
        size = max(total_bytes // workers, MIN_SPLIT_UNIT)
    n = max(1, (2 * total_bytes + size) // (2 * size))  # round(total / size) units ...
    n = max(n, -(-total_bytes // MAX_AUTO_UNIT))
    return -(-total_bytes // n)  # ... of equal size, so the last one is no small remainder


def plan_tasks(units: list[Unit], target_bytes: int) -> list[list[Unit]]:
    """Group consecutive units into about total/target_bytes tasks of balanced size (one shard each), so
    a corpus of many small files does not become as many tiny shards and no task is a small remainder.
    A unit joins the task its midpoint falls in; a unit bigger than a task is a task of its own. A pure
    function of the unit list."""
    if not units:
        return []
    sizes = [max(unit_bytes(u), 1) for u in units]
    total = sum(sizes)
    n = max(1, min(len(units), (2 * total + target_bytes) // (2 * target_bytes)))  # round(total / target)
    tasks: list[list[Unit]] = []
    last, done = -1, 0
    for u, s in zip(units, sizes):
        k = min(n - 1, (2 * done + s) * n // (2 * total))
        if k != last:
            tasks.append([])
            last = k
        tasks[-1].append(u)
        done += s
    return tasks


# ---------------------------------------------------------------- bad records


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def where(path: str, record: int) -> str:
    """'file:line' for line-based inputs, 'file (row N)' for tables."""
    if kind_of(path) in ("parquet", "hf"):
        return f"{path} (row {record})"
    return f"{path}:{record + 1}"


class BadRecords:
    """Counts good, empty and bad records; warns about the first few bad ones (file:line), then stays
    quiet; raises DataError on policy 'error', or when more than max_fraction of the records seen
    (after min_records) are bad. Counts merge across worker processes."""

    def __init__(
        self,
        policy: str = "skip",
        max_fraction: float = 0.5,
        min_records: int = 1000,
        warn_limit: int = 10,
        log: Callable[[str], None] | None = None,
    ):
        if policy not in ("skip", "error"):
            raise DataError(f"bad_records = '{policy}' must be 'skip' or 'error'")
        self.policy, self.max_fraction, self.min_records = policy, max_fraction, min_records
        self.warn_limit = warn_limit
        self.log = log or _stderr
        self.good_count = self.bad_count = self.empty_count = self.warned = 0
        self.reasons: dict[str, int] = {}
        self.first: str | None = None

    @property
    def seen(self) -> int:
        return self.good_count + self.bad_count + self.empty_count

    def good(self) -> None:
        self.good_count += 1

    def empty(self) -> None:
        """An empty document: skipped without a warning, mentioned in the summary."""
        self.empty_count += 1

    def bad(self, path: str, record: int, reason: str, detail: str = "") -> None:
        """A record that cannot be used. `reason` is the category counted in the summary."""
        loc = where(path, record)
        msg = f"{reason}: {detail}" if detail else reason
        if self.policy == "error":
            raise DataError(
                f"{loc}: {msg}",
                hint="fix the record, or count and skip bad records with bad_records = 'skip' "
                "(--data.bad_records skip, in flame train and flame prepare)",
            )
        self.bad_count += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if self.first is None:
            self.first = loc
        if self.warned < self.warn_limit:
            self.warned += 1
            self.log(f"warning: skipping bad record {loc}: {msg}")
            if self.warned == self.warn_limit:
                self.log("warning: further bad records are counted quietly; a summary follows at the end")
        self.check()

    def check(self) -> None:
        """Stop on a mostly-bad corpus (usually a wrong format or text field, not a few bad lines)."""
        if self.seen >= self.min_records and self.bad_count > self.max_fraction * self.seen:
            top = max(self.reasons, key=self.reasons.get)
            hint = "fix the inputs, or raise max_bad_fraction if this is expected"
            if top.startswith("missing field"):
                hint = (
                    "set the field that holds the text (--data.text_field, in flame train and flame prepare)"
                )
            raise DataError(
                f"corpus is mostly bad: {self.bad_count} of {self.seen} records could not be used "
                f"({self._reasons()}); first: {self.first}",
                hint=hint,
            )

    def _reasons(self) -> str:
        return ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items(), key=lambda x: (-x[1], x[0])))

    def summary(self) -> str:
        s = f"skipped {self.bad_count} bad records of {self.seen}"
        if self.bad_count:
            s += f" ({self._reasons()}); first: {self.first}"
        if self.empty_count:
            s += f"; {self.empty_count} empty documents"
        return s

    def check_finished(self, what: str) -> None:
        """Call after a whole corpus: no usable document at all is an error."""
        if self.good_count == 0:
            raise DataError(
                f"no usable documents in {what}: {self.summary()}",
                hint="check the inputs and the text field (--data.text_field)",
            )

    def state_dict(self) -> dict:
        return {
            "good": self.good_count,
            "bad": self.bad_count,
            "empty": self.empty_count,
            "reasons": dict(self.reasons),
            "first": self.first,
            "warned": self.warned,
        }

    def load_state_dict(self, state: dict) -> None:
        self.good_count, self.bad_count, self.empty_count = state["good"], state["bad"], state["empty"]
        self.reasons = dict(state["reasons"])
        self.first = state["first"]
        self.warned = state.get("warned", 0)

    def merge(self, other: BadRecords | dict) -> None:
        """Add another counter's counts (e.g. a worker's), then apply the mostly-bad check."""
        s = other.state_dict() if isinstance(other, BadRecords) else other
        self.good_count += s["good"]
        self.bad_count += s["bad"]
        self.empty_count += s["empty"]
        for r, n in s["reasons"].items():
            self.reasons[r] = self.reasons.get(r, 0) + n
        self.first = self.first or s["first"]
        self.warned = max(self.warned, s.get("warned", 0))
        self.check()


# ---------------------------------------------------------------- reading


@dataclass
class Doc:
    """One document. record: 0-based line (jsonl; for text the chunk's first line, 0 for a whole file)
    or row (parquet/hf); offset: byte offset of its start in the uncompressed file, else -1."""

    text: str
    path: str
    record: int
    offset: int

    @property
    def position(self) -> int:
        """Where to resume from this document: `read_unit(unit, ..., start_offset=doc.position)`."""
        return self.offset if self.offset >= 0 else self.record


class _ZstdReader(io.RawIOBase):
    """Concatenated zstd frames as one raw stream; a file cut mid-frame raises EOFError, as gzip does
    (zstandard's stream_reader would end quietly and lose the tail)."""

    def __init__(self, path: str):
        import zstandard

        self._dctx = zstandard.ZstdDecompressor()
        self._f = open(path, "rb")
        self._obj = None
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos >= len(self._out):
            pending = b""
            if self._obj is not None and self._obj.eof:
                pending, self._obj = self._obj.unused_data, None
            if not pending:
                pending = self._f.read(1 << 17)  # small input steps bound the output of one call
                if not pending:
                    if self._obj is not None:
                        raise EOFError("zstd stream ends mid-frame (truncated file?)")
                    return 0
            if self._obj is None:
                self._obj = self._dctx.decompressobj()
            self._out, self._pos = self._obj.decompress(pending), 0
        n = min(len(b), len(self._out) - self._pos)
        b[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_binary(path: str):
    comp = _compression(path)
    if comp == "gz":
        return gzip.open(path, "rb")
    if comp == "zst":
        return io.BufferedReader(_ZstdReader(path), BLOCK)
    return open(path, "rb", buffering=BLOCK)


def _count_lines(f, nbytes: int) -> int:
    n = 0
    while nbytes > 0:
        b = f.read(min(nbytes, BLOCK))
        if not b:
            break
        n += b.count(b"\n")
        nbytes -= len(b)
    return n


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def read_unit(unit: Unit, text_field: str, bad: BadRecords, start_offset: int | None = None) -> Iterator[Doc]:
    """Yield the unit's usable documents, reporting the rest to `bad`.

    start_offset resumes at a `Doc.position` (a byte offset for text/jsonl, a row for parquet/hf):
    documents before it are skipped. Uncompressed files seek there (counting the newlines in between,
    within this unit only, to keep line numbers right); compressed files are decompressed from the
    start and the records before it skipped unparsed.
    """
    try:
        if unit.kind == "jsonl":
            yield from _read_jsonl(unit, text_field, bad, start_offset)
        elif unit.kind == "text":
            yield from _read_text(unit, bad, start_offset)
        elif unit.kind == "parquet":
            yield from _read_parquet(unit, text_field, bad, start_offset)
        elif unit.kind == "hf":
            yield from _read_hf(unit, text_field, bad, start_offset)
        else:
            raise ValueError(f"unknown unit kind {unit.kind!r}")
    except (OSError, EOFError) as e:
        # truncated gzip/zstd streams, vanished or unreadable files
        raise DataError(
            f"{unit.path}: cannot read: {e}", hint="check the file is complete and readable"
        ) from None
    except Exception as e:
        if type(e).__module__.startswith("zstandard"):
            raise DataError(f"{unit.path}: corrupt zstd stream: {e}") from None
        raise


def _read_text(unit: Unit, bad: BadRecords, start_offset: int | None) -> Iterator[Doc]:
    if start_offset is not None and start_offset > unit.start:
        return
    with _open_binary(unit.path) as f:
        if unit.start:
            f.seek(unit.start)
        data = f.read() if unit.stop < 0 else f.read(unit.stop - unit.start)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = unit.record + data.count(b"\n", 0, e.start)
        bad.bad(unit.path, line, "invalid UTF-8", f"byte offset {unit.start + e.start}")
        return
    if unit.start == 0 and text.startswith(BOM):  # an encoding mark some editors write, not text
        text = text[1:]
    if not text:
        bad.empty()
        return
    bad.good()
    yield Doc(text, unit.path, unit.record, unit.start)


def _json_array_error(path: str) -> DataError:
    return DataError(
        f"{path}: looks like one JSON array, but flame reads JSON Lines (one object per line)",
        hint=f"convert it, e.g. jq -c '.[]' {path} > {os.path.splitext(path)[0]}.jsonl",
    )


def _read_jsonl(unit: Unit, field: str, bad: BadRecords, start_offset: int | None) -> Iterator[Doc]:
    path = unit.path
    limit = unit.stop if unit.stop >= 0 else float("inf")
    skip_to = -1
    with _open_binary(path) as f:
        offset, line_no = unit.start, unit.record
        if start_offset is not None and start_offset > unit.start:
            if not 0 <= start_offset < limit:
                raise ValueError(f"start_offset {start_offset} outside {unit}")
            if _compression(path):
                skip_to = start_offset
            else:
                f.seek(unit.start)
                line_no += _count_lines(f, start_offset - unit.start)
                offset = start_offset
        if offset:
            f.seek(offset)
        for line in f:
            if offset >= limit:
                break
            pos, rec = offset, line_no
            offset += len(line)
            line_no += 1
            if pos < skip_to or not line.strip():
                continue
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.bad(path, rec, "invalid UTF-8", f"byte {pos + e.start}")
                continue
            if pos == 0 and s.startswith(BOM):  # json.loads refuses it: the first record would be lost
                s = s[1:]
            try:
                obj = json.loads(s)
            except ValueError as e:
                if rec == 0 and s.lstrip().startswith("["):
                    raise _json_array_error(path) from None
                bad.bad(path, rec, "malformed JSON", str(e))
                continue
            if not isinstance(obj, dict):
                if rec == 0 and isinstance(obj, list):
                    raise _json_array_error(path)
                bad.bad(path, rec, "not a JSON object", f"got {type(obj).__name__}")
                continue
            text = obj.get(field)
            if not isinstance(text, str):
                if field not in obj:
                    keys = ", ".join(list(obj)[:8])
                    bad.bad(path, rec, f"missing field '{field}'", f"keys: {keys}")
                else:
                    bad.bad(path, rec, f"field '{field}' is not a string", f"got {type(text).__name__}")
                continue
            if not text:
                bad.empty()
                continue
            # JSON can escape lone surrogates ("\ud800"), which are not encodable text
            if "\\u" in s and _has_surrogates(text):
                bad.bad(path, rec, "invalid UTF-8", "lone surrogate escape")
                continue
            bad.good()
            yield Doc(text, path, rec, pos)


@functools.lru_cache(maxsize=16)
def _parquet_file(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from None


def _text_values(path: str, record: int, values, bad: BadRecords, field: str) -> Iterator[Doc]:
    for v in values:
        rec = record
        record += 1
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                bad.bad(path, rec, "invalid UTF-8")
                continue
        if v is None:
            bad.bad(path, rec, f"field '{field}' is null")
        elif not isinstance(v, str):
            bad.bad(path, rec, f"field '{field}' is not a string", f"got {type(v).__name__}")
        elif not v:
            bad.empty()
        else:
            bad.good()
            yield Doc(v, path, rec, -1)


def _check_column(path: str, field: str, names: list[str]) -> None:
    if field not in names:
        raise DataError(
            f"{path}: no column '{field}'; its columns are {names}",
            hint="name the text column with --data.text_field (flame train or flame prepare)",
        )


def _read_parquet(unit: Unit, field: str, bad: BadRecords, start_offset: int | None) -> Iterator[Doc]:
    import pyarrow as pa

    pf = _parquet_file(unit.path)
    schema = pf.schema_arrow
    _check_column(unit.path, field, schema.names)
    typ = schema.field(field).type
    if pa.types.is_dictionary(typ):  # a dictionary-encoded (categorical) column reads as its values
        typ = typ.value_type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ)):
        if not (pa.types.is_large_binary(typ) or str(typ) in ("string_view", "binary_view")):
            raise DataError(
                f"{unit.path}: column '{field}' holds {typ}, not text", hint="choose a string column"
            )
    row = unit.record
    skip = (start_offset or 0) - row
    for batch in pf.iter_batches(batch_size=1024, row_groups=range(unit.start, unit.stop), columns=[field]):
        n = batch.num_rows
        if skip >= n:
            skip -= n
            row += n
            continue
        col = batch.column(0)
        if skip > 0:
            col, row, skip = col.slice(skip), row + skip, 0
        yield from _text_values(unit.path, row, col.to_pylist(), bad, field)
        row += len(col)


def _hub_spec(spec: str) -> tuple[str, str | None, str]:
    parts = spec[3:].split(":")
    if len(parts) == 1:
        return parts[0], None, "train"
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def _read_hf(unit: Unit, field: str, bad: BadRecords, start_offset: int | None) -> Iterator[Doc]:
    start = max(unit.start, start_offset or 0)
    if unit.path.startswith("hf:"):
        import datasets

        name, config, split = _hub_spec(unit.path)
        try:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as e:
            raise DataError(
                f"input '{unit.path}': cannot open the hub dataset: {e}",
                hint="hub datasets need a network; offline, save it with datasets' save_to_disk and pass that folder",
            ) from None
        if start:
            ds = ds.skip(start)
        names = ds.column_names
        if names is not None:
            _check_column(unit.path, field, names)
        rows = (r.get(field) for r in ds)
        yield from _text_values(unit.path, start, rows, bad, field)
        return
    ds = _load_saved(unit.path)
    _check_column(unit.path, field, ds.column_names)
    stop = len(ds) if unit.stop < 0 else unit.stop
    sub = ds.select_columns([field])
    for a in range(start, stop, 1024):
        b = min(a + 1024, stop)
        yield from _text_values(unit.path, a, sub[a:b][field], bad, field)
