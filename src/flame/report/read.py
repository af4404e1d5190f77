"""Reading a run directory into a `Run`: metrics.jsonl as columns, the (re)starts, the checkpoints.

metrics.jsonl is read once, by pyarrow's JSON reader (C++, many times faster than a json.loads
per line) into columns; a file it cannot read the way json.loads would (a torn line in the
middle, a value changing type, a duplicate key) is read again line by line with json.loads, so
the report never depends on which reader ran. Whole records are json.loads'ed only where one is
shown (the last train record, the evals, the starts).

Restarts come from `kind: "start"` records when the run has them; otherwise from the records
alone: within one process `time - elapsed_s` stays constant (both clocks advance together), a
restart makes it jump by the wall time from the saved state to training again, and a new
process's peak memory starts lower.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flame.errors import FlameError
from flame.records import read_records

# Where a trainer writes one record per (re)start, if not into metrics.jsonl as `kind: "start"`.
STARTS_FILE = "starts.jsonl"
# A jump of `time - elapsed_s` between two train records larger than this (seconds, plus a
# per-second allowance for clock slew over long gaps) is a restart.
RESTART_JUMP_S = 0.1
CLOCK_SLEW = 1e-3
# The columns find_segments reads off every train record in file order.
ORDER_KEYS = ("time", "elapsed_s", "memory_gib", "tokens_per_s", "tokens_per_s_per_device")

_NAN = float("nan")
_NUM = (int, float)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get(rec, path: tuple[str, ...]):
    for p in path:
        if not isinstance(rec, dict):
            return None
        rec = rec.get(p)
    return rec


class Table:
    """Records of one kind, one per step (the last written), sorted by step, as columns.

    `col(*path)` is a float64 column: the number under that key (nested keys for `sources`),
    NaN where a record holds none (or a bool, a string). `row(i)` is record i exactly as
    json.loads reads it. Columns are made on first use and kept."""

    def __init__(
        self,
        steps: np.ndarray,
        row: Callable[[int], dict],
        column: Callable[[tuple[str, ...]], np.ndarray],
        sources: Callable[[], tuple[list[str], np.ndarray]],
    ):
        self.steps = np.asarray(steps, dtype=np.int64)
        self._row, self._column, self._sources = row, column, sources
        self._cols: dict[tuple[str, ...], np.ndarray] = {}
        self.cache: dict = {}  # values derived from the table (the mixture), made once

    @classmethod
    def from_records(cls, recs: list[dict]) -> Table:
        """A table of dicts as they are (the caller orders them)."""
        recs = list(recs)

        def column(path: tuple[str, ...]) -> np.ndarray:
            raw = (_get(r, path) for r in recs)
            return np.fromiter((v if type(v) in _NUM else _NAN for v in raw), np.float64, len(recs))

        def sources() -> tuple[list[str], np.ndarray]:
            names: list[str] = []
            present = np.zeros(len(recs), dtype=bool)
            for i, r in enumerate(recs):
                src = r.get("sources")
                if src:
                    present[i] = True
                    names += [n for n in src if n not in names]
            return names, present

        steps = [r.get("step", 0) for r in recs]
        return cls(np.array(steps, dtype=np.int64), recs.__getitem__, column, sources)

    def __len__(self) -> int:
        return len(self.steps)

    def col(self, *path: str) -> np.ndarray:
        """The float64 column under `path` (e.g. "loss", or "sources", "web", "loss")."""
        got = self._cols.get(path)
        if got is None:
            got = self._cols[path] = self._column(path)
        return got

    def row(self, i: int) -> dict:
        """Record i (negative: from the end) as json.loads reads it."""
        return self._row(range(len(self))[i])

    def source_names(self) -> list[str]:
        """Mixture source names found in the records' `sources`, in first-seen order."""
        return self._source_info()[0]

    def source_rows(self) -> np.ndarray:
        """Which records hold a non-empty `sources`."""
        return self._source_info()[1]

    def _source_info(self) -> tuple[list[str], np.ndarray]:
        if "sources" not in self.cache:
            self.cache["sources"] = self._sources()
        return self.cache["sources"]


@dataclass
class FileOrder:
    """Every train record in file order (duplicates of a step included), as columns, and where
    the start records sit among them: what find_segments needs."""

    pos: np.ndarray  # each train record's place in the file (its index among the records)
    steps: np.ndarray
    cols: dict[str, np.ndarray]  # ORDER_KEYS
    times: np.ndarray  # `time` of every record (NaN where none), for placing starts.jsonl's
    start_pos: list[float] = field(default_factory=list)  # each start record's place


@dataclass
class Metrics:
    train: Table
    evals: list[dict]
    starts: list[dict]
    order: FileOrder
    reader: str  # "pyarrow" or "json" (which one read metrics.jsonl)


@dataclass
class Segment:
    """One process's share of a run: from a (re)start to the last record it left."""

    index: int
    resume_step: int | None  # the step it resumed at (0: a fresh start); None when not recorded
    first_step: int | None = None  # its first and last train record
    last_step: int | None = None
    records: int = 0
    elapsed_end: float | None = None
    offset: float | None = None  # time - elapsed_s of its records
    world_size: int | None = None
    lost_s: float | None = None  # wall time from the state it resumed from to training again
    found_by: str = "start record"
    start: dict | None = None


@dataclass
class Run:
    run_dir: Path
    label: str
    train: Table  # by step, one per step
    evals: list[dict]  # by step, one per step
    starts: list[dict]
    config: dict | None  # config.toml as a dict
    config_text: str
    checkpoints: list[dict] = field(default_factory=list)
    abandoned: list[dict] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    reader: str = "json"  # which reader read metrics.jsonl: "pyarrow", or "json" line by line
    _eval_table: Table | None = field(default=None, repr=False, compare=False)

    @property
    def eval_table(self) -> Table:
        """The eval records as columns, for the figures."""
        if self._eval_table is None:
            self._eval_table = Table.from_records(self.evals)
        return self._eval_table


# ---------------------------------------------------------------- metrics.jsonl


def _last_per_step(rows: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Of `rows` (file order) with their `steps`: the last written per step, sorted by step."""
    if not len(rows):
        return rows
    order = np.lexsort((rows, steps))
    s = steps[order]
    keep = np.ones(len(order), dtype=bool)
    keep[:-1] = s[1:] != s[:-1]
    return rows[order[keep]]


def read_metrics_columns(path: Path) -> Metrics:
    """metrics.jsonl (records with an integer step) as train columns, evals and starts."""
    return _read_arrow(path) or _read_json(path)


def _read_json(path: Path) -> Metrics:
    """json.loads per line: any file read_records reads, whatever its quirks."""
    records = [
        r for r in read_records(path) if isinstance(r.get("step"), int) and not isinstance(r["step"], bool)
    ]
    by_kind: dict[object, dict[int, dict]] = {"train": {}, "eval": {}}
    for rec in records:
        by_kind.setdefault(rec.get("kind", "train"), {})[rec["step"]] = rec
    train = [by_kind["train"][s] for s in sorted(by_kind["train"])]
    evals = [by_kind["eval"][s] for s in sorted(by_kind["eval"])]
    pos, steps, start_pos, starts = [], [], [], []
    for i, r in enumerate(records):
        kind = r.get("kind", "train")
        if kind == "train":
            pos.append(i)
            steps.append(r["step"])
        elif kind == "start":
            starts.append(r)
            start_pos.append(float(i))
    trains = [records[i] for i in pos]
    cols = {
        k: np.fromiter(
            (r.get(k) if type(r.get(k)) in _NUM else _NAN for r in trains), np.float64, len(trains)
        )
        for k in ORDER_KEYS
    }
    times = np.fromiter((r.get("time") if type(r.get("time")) in _NUM else _NAN for r in records), np.float64)
    order = FileOrder(
        np.array(pos, dtype=np.float64), np.array(steps, dtype=np.int64), cols, times, start_pos
    )
    return Metrics(Table.from_records(train), evals, starts, order, "json")


def _valid(arr) -> np.ndarray:
    """Which values of a pyarrow Array are not null, from its validity bitmap (pyarrow.compute,
    which its methods would import, takes longer to import than the whole file to read)."""
    buf = arr.buffers()[0]
    if buf is None or arr.null_count == 0:
        return np.ones(len(arr), dtype=bool)
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")
    return bits[arr.offset : arr.offset + len(arr)].astype(bool)


def _numbers(arr) -> np.ndarray:
    """A pyarrow int64 / double Array as float64, NaN where null (its buffers, no copy but the cast)."""
    vals = np.frombuffer(arr.buffers()[1], dtype=np.dtype(arr.type.to_pandas_dtype()))
    out = vals[arr.offset : arr.offset + len(arr)].astype(np.float64)
    out[~_valid(arr)] = np.nan
    return out


def _read_arrow(path: Path) -> Metrics | None:
    """pyarrow's reading of metrics.jsonl, or None where it would differ from json.loads'."""
    try:
        import pyarrow as pa
        import pyarrow.json as pj
    except ImportError:
        return None
    data = path.read_bytes()
    # line bounds; pyarrow skips blank lines, and so do we (json.loads would fail on them)
    nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    starts_ = np.concatenate([[0], nl + 1])
    ends = np.concatenate([nl, [len(data)]])
    keep = ends > starts_
    for i in np.flatnonzero(keep & (ends - starts_ < 64)):
        keep[i] = bool(data[starts_[i] : ends[i]].strip())
    starts_, ends = starts_[keep], ends[keep]
    if not len(starts_):
        return None
    end = len(data)
    try:  # a line torn by a crash mid-write is the last one: leave it out, as read_records does
        tail = json.loads(data[starts_[-1] : ends[-1]])
    except ValueError:
        tail = None
    if not isinstance(tail, dict):
        end, starts_, ends = int(starts_[-1]), starts_[:-1], ends[:-1]
    if not len(starts_) or b'"kind": null' in data or b'"kind":null' in data:
        return None  # `"kind": null` reads as no kind there (train) but is none of them for json
    try:
        tb = pj.read_json(
            pa.BufferReader(pa.py_buffer(data).slice(0, end)),
            read_options=pj.ReadOptions(block_size=1 << 22),
        )
    except Exception:  # pyarrow.ArrowInvalid and kin: the line-by-line reader decides
        return None
    if tb.num_rows != len(starts_) or "step" not in tb.column_names:
        return None

    def leaves(path: tuple[str, ...]) -> list | None:
        """The chunks of the (nested) field at `path`, parents' nulls included; None if absent."""
        if path[0] not in tb.column_names:
            return None
        out = []
        for a in tb.column(path[0]).chunks:
            for p in path[1:]:
                k = a.type.get_field_index(p) if pa.types.is_struct(a.type) else -1
                if k < 0:
                    return None
                a = a.flatten()[k]
            out.append(a)
        return out

    full: dict[tuple[str, ...], np.ndarray] = {}

    def numbers(path: tuple[str, ...]) -> np.ndarray:
        """The float64 column at `path` over every line, NaN where it holds no number."""
        if path not in full:
            chunks = leaves(path)
            if chunks is None or not all(
                pa.types.is_integer(a.type) or pa.types.is_floating(a.type) for a in chunks
            ):
                full[path] = np.full(tb.num_rows, np.nan)
            else:
                full[path] = np.concatenate([_numbers(a) for a in chunks]) if chunks else np.empty(0)
        return full[path]

    step_chunks = leaves(("step",)) or []
    if not all(pa.types.is_integer(a.type) for a in step_chunks):
        return None  # a float or a string step somewhere: json's reading filters record by record
    steps_f = numbers(("step",))
    valid = np.isfinite(steps_f)
    steps = np.where(valid, steps_f, 0).astype(np.int64)
    kind_chunks = leaves(("kind",))
    if kind_chunks is None:
        kinds = np.full(tb.num_rows, "train", dtype=object)
    elif all(pa.types.is_string(a.type) for a in kind_chunks):
        kinds = np.array(
            [k if k is not None else "train" for a in kind_chunks for k in a.to_pylist()], dtype=object
        )
    else:
        return None

    def load(i: int) -> dict:  # keeps the file's bytes for as long as the table lives
        return json.loads(data[starts_[i] : ends[i]])

    is_train = (kinds == "train") & valid
    train_rows = np.flatnonzero(is_train)
    sel = _last_per_step(train_rows, steps[train_rows])

    def sources() -> tuple[list[str], np.ndarray]:
        present = np.zeros(len(sel), dtype=bool)
        chunks = leaves(("sources",))
        if not chunks or not pa.types.is_struct(chunks[0].type):
            return [], present
        firsts = []
        for j in range(chunks[0].type.num_fields):
            name = chunks[0].type.field(j).name
            ok = np.concatenate([_valid(a) for a in leaves(("sources", name))])[sel]
            if ok.any():
                firsts.append((int(np.argmax(ok)), j, name))
                present |= ok
        return [n for _, _, n in sorted(firsts)], present

    train = Table(steps[sel], lambda i: load(int(sel[i])), lambda path: numbers(path)[sel], sources)
    eval_rows = np.flatnonzero((kinds == "eval") & valid)
    evals = [load(int(i)) for i in _last_per_step(eval_rows, steps[eval_rows])]
    start_rows = np.flatnonzero((kinds == "start") & valid)
    order = FileOrder(
        train_rows.astype(np.float64),
        steps[train_rows],
        {k: numbers((k,))[train_rows] for k in ORDER_KEYS},
        np.where(valid, numbers(("time",)), np.nan),
        [float(i) for i in start_rows],
    )
    return Metrics(train, evals, [load(int(i)) for i in start_rows], order, "pyarrow")


# ---------------------------------------------------------------- reading a run


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """Everything the report shows of one run directory; a FlameError when it is not one."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise FlameError(f"no such run directory: {run_dir}")
    if not path.is_file():
        raise FlameError(
            f"{run_dir} has no metrics.jsonl",
            hint="give the run directory of a `flame train` run (its --train.run_dir) that logged a step",
        )
    m = read_metrics_columns(path)
    if not len(m.train) and not m.evals:
        raise FlameError(
            f"{path} holds no records yet",
            hint="make the report once the run has logged a step",
        )
    config, text = None, ""
    cfg_path = run_dir / "config.toml"
    if cfg_path.is_file():
        try:
            text = cfg_path.read_text(encoding="utf-8")
            config = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
            config = None  # shown as unreadable; the metrics still make a report
    starts, order = m.starts, m.order
    if not starts:  # the trainer's start records in a file of their own
        starts = [
            {**r, "kind": "start"}
            for r in read_records(run_dir / STARTS_FILE)
            if isinstance(r.get("step"), int) and _is_num(r.get("time"))
        ]
        starts.sort(key=lambda r: r["time"])  # the order they are put among the records in
        order.start_pos = merge_starts(order, starts)
    run = Run(
        run_dir=run_dir,
        label=label or run_dir.name,
        train=m.train,
        evals=m.evals,
        starts=starts,
        config=config,
        config_text=text,
        reader=m.reader,
    )
    run.checkpoints, run.abandoned = read_checkpoints(run_dir)
    run.segments = find_segments(order, starts)
    return run


def merge_starts(order: FileOrder, starts: list[dict]) -> list[float]:
    """Where starts.jsonl's records (sorted by time) happened among metrics.jsonl's records: just
    before the first one written at or after their time, after all of them when none is."""
    t = np.where(np.isfinite(order.times), order.times, -np.inf)
    upto = np.maximum.accumulate(t) if len(t) else t  # the first record at or after a time
    return [float(np.searchsorted(upto, st["time"], side="left")) - 0.5 for st in starts]


def find_segments(order: FileOrder, starts: list[dict]) -> list[Segment]:
    """The run's (re)starts: from `start` records when there are any, else from jumps of
    `time - elapsed_s` (and drops of peak memory) between consecutive train records."""
    c = order.cols
    ok = np.isfinite(c["time"]) & np.isfinite(c["elapsed_s"])
    pos, steps = order.pos[ok], order.steps[ok]
    t, el, mem = c["time"][ok], c["elapsed_s"][ok], c["memory_gib"][ok]
    tps, tpd = c["tokens_per_s"][ok], c["tokens_per_s_per_device"][ok]
    offset = t - el
    segs: list[Segment] = []
    if starts:
        # each train record belongs to the latest start before it; records before any start
        # (a run from before start records) make a segment of their own, the first
        sid = np.searchsorted(np.asarray(order.start_pos, dtype=np.float64), pos, side="left") - 1
        lead = bool(len(sid)) and sid[0] < 0
        if lead:
            segs.append(Segment(0, None, found_by="records"))
        segs += [Segment(len(segs) + k, int(st["step"]), start=st) for k, st in enumerate(starts)]
        sid = sid + (1 if lead else 0)
    else:
        new = np.zeros(len(pos), dtype=bool)
        how = np.zeros(len(pos), dtype=np.int8)  # 1: time jump, 2: memory drop
        if len(pos):
            new[0] = True
            jump = offset[1:] - offset[:-1]
            allowed = RESTART_JUMP_S + CLOCK_SLEW * np.maximum(0.0, t[1:] - t[:-1])
            with np.errstate(invalid="ignore"):
                by_time = jump > allowed
                by_mem = ~by_time & np.isfinite(mem[1:]) & np.isfinite(mem[:-1]) & (mem[1:] < mem[:-1])
            new[1:] = by_time | by_mem
            how[1:][by_time], how[1:][by_mem] = 1, 2
        sid = np.cumsum(new) - 1
        for k, i in enumerate(np.flatnonzero(new)):
            if i == 0:
                found = "start of the records"
            elif how[i] == 1:
                found = f"time jump of {_dur(float(offset[i] - offset[i - 1]))}"
            else:
                found = "peak memory dropped (a new process)"
            segs.append(Segment(k, 0 if k == 0 else None, found_by=found))
    if len(sid):
        ids, first = np.unique(sid, return_index=True)
        last = np.concatenate([first[1:], [len(sid)]]) - 1
        for s, a, b in zip(ids, first, last):
            seg = segs[int(s)]
            seg.first_step, seg.offset = int(steps[a]), float(offset[a])
            seg.last_step, seg.elapsed_end = int(steps[b]), float(el[b])
            seg.records = int(b - a + 1)
            if np.isfinite(tps[a]) and np.isfinite(tpd[a]) and tpd[a] != 0:
                seg.world_size = int(round(tps[a] / tpd[a]))
    last_offset = None
    for seg in segs:
        if seg.start is not None and seg.start.get("world_size"):
            seg.world_size = int(seg.start["world_size"])
        if seg.offset is not None:
            if last_offset is not None and seg.index > 0:
                seg.lost_s = seg.offset - last_offset
            last_offset = seg.offset
        if seg.resume_step is None and seg.index > 0 and seg.first_step is not None:
            # the checkpoint resumed from lies in [previous last record, this first record): exact
            # when they are adjacent steps
            before = [s.last_step for s in segs[: seg.index] if s.last_step is not None]
            if before and seg.first_step == before[-1] + 1:
                seg.resume_step = before[-1]
    return segs


def _dur(s) -> str:
    if not _is_num(s):
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


# ---------------------------------------------------------------- checkpoints


def _read_state(ckpt: Path) -> dict | None:
    """A checkpoint's run state (JSON, or an older trainer.pt of plain values), None if unreadable."""
    try:
        if (ckpt / "trainer.json").is_file():
            state = json.loads((ckpt / "trainer.json").read_text())
        elif (ckpt / "trainer.pt").is_file():
            import torch

            state = torch.load(ckpt / "trainer.pt", weights_only=True, map_location="cpu")
        else:
            return None
    except Exception:
        return None
    return state if isinstance(state, dict) else None


def _checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (as flame.checkpoint lists them, without
    importing torch: a report needs no tensor library for this)."""
    found = []
    for p in root.glob("step-*"):
        step = p.name.split("-", 1)[1]
        if p.is_dir() and ".tmp" not in p.name and step.isdigit() and (p / "COMPLETE").is_file():
            found.append((int(step), p))
    return [p for _, p in sorted(found)]


def _sizes_problem(path: Path, marker: dict | None) -> str | None:
    """What is wrong with a checkpoint's files by their sizes in its COMPLETE marker (checksums
    are `flame train`'s job at resume: hashing every file would make the report slow)."""
    files = (marker or {}).get("files")
    if not isinstance(files, dict):
        return "its COMPLETE marker is unreadable"
    for name, meta in files.items():
        f = path / name
        if not isinstance(meta, dict) or Path(name).is_absolute() or ".." in Path(name).parts:
            return "its COMPLETE marker is malformed"
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta.get("size"):
            return f"{name} has {f.stat().st_size} bytes, expected {meta.get('size')}"
    return None


def read_checkpoints(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(kept checkpoints, abandoned ones) with step, size, save time, sizes check and run state."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return [], []

    def describe(path: Path) -> dict:
        try:
            marker = json.loads((path / "COMPLETE").read_text())
        except (OSError, ValueError):
            marker = None
        marker = marker if isinstance(marker, dict) else None
        return {
            "path": path,
            "step": int(path.name.split("-", 1)[1]),
            "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
            "saved": (marker or {}).get("time"),
            "problem": _sizes_problem(path, marker),
            "state": _read_state(path),
        }

    kept = [describe(p) for p in _checkpoint_dirs(root)]
    abandoned = []
    for folder in sorted(root.glob("abandoned-*")):
        if folder.is_dir():
            abandoned += [{**describe(p), "folder": folder.name} for p in _checkpoint_dirs(folder)]
    return kept, abandoned


def checkpoint_parameters(run: Run) -> int | None:
    """Elements of the model tensors in the latest checkpoint (its DCP metadata; no weights read)."""
    if not run.checkpoints:
        return None
    try:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        md = FileSystemReader(str(run.checkpoints[-1]["path"] / "state")).read_metadata()
        return sum(
            math.prod(m.size)
            for k, m in md.state_dict_metadata.items()
            if k.startswith("model.") and isinstance(m, TensorStorageMetadata)
        )
    except Exception:
        return None
