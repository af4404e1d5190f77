"""`flame prepare`: corpus -> tokenized store, in parallel, resumable, splittable across machines.

Inputs expand to a sorted list of units (see sources.plan_units) grouped into balanced tasks
(sources.plan_tasks); without an explicit unit size, units are sized from the total input and the
worker count (sources.auto_unit_bytes) and the size is recorded, so a resumed run keeps the plan.
Part I of N owns the tasks with index % N == I; every task becomes one shard `u{index:06d}` (and
one in `<output>/val` when a validation fraction is asked for). A task is done once its record
`units/u{index:06d}.json` exists and its shard files match it, so a killed run re-run with the same
arguments redoes only the rest.
When every part is complete the store is finalized (manifest.json); the last part to finish does it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import functools
import glob
import hashlib
import json
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flame.data import store
from flame.data.sources import (
    TEXT_UNIT_BYTES,
    BadRecords,
    Doc,
    Unit,
    auto_unit_bytes,
    expand_inputs,
    file_state,
    input_bytes,
    plan_tasks,
    plan_units,
    read_unit,
)
from flame.data.sources import unit_bytes as unit_size
from flame.data.tokenizer import Tokenizer, load_tokenizer, save_tokenizer_copy
from flame.errors import DataError
from flame.procs import pid_alive

BATCH_DOCS = 1000
BATCH_CHARS = 8 << 20
WARN_LIMIT = 10
SETTINGS = "prepare.json"
SETTINGS_VERSION = 2
MAX_UNIT_MB = 16384  # a unit is one shard, tokenized by one worker holding its document index in memory
MIN_UNIT_MB = 1 / 1024
LEGACY_UNIT_BYTES = 64 << 20  # the fixed unit size of settings files that did not record theirs
# --part I/N: the machines of the other parts may have other core counts, so an automatic plan is
# sized for this many workers per part, the same on every machine
PART_PLAN_WORKERS = 16


@dataclass(frozen=True)
class _Job:
    """What every worker needs (picklable)."""

    tokenizer: str
    output: str
    dtype: str
    text_field: str
    val_fraction: float
    bad_records: str
    max_bad_fraction: float
    sources: tuple[str, ...]
    threads: int = 0
    states: tuple[tuple[str, list[int] | None], ...] = ()  # (path, [size, mtime_ns]) when planned


def usable_cpus() -> int:
    """The cores this process may run on (taskset, cgroup cpusets), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def is_val(path: str, record: int, fraction: float) -> bool:
    """Deterministic validation routing by (source path, record): stable across parts, workers, reruns."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{path}\0{record}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2.0**64


def shard_name(index: int) -> str:
    return f"u{index:06d}"


def _record_path(output: str, index: int) -> Path:
    return Path(output) / "units" / f"{shard_name(index)}.json"


def _shard_ok(folder: Path, info: dict | None, itemsize: int) -> bool:
    if info is None:
        return True
    tok, docs = folder / f"{info['name']}.tokens", folder / f"{info['name']}.docs"
    return (
        tok.is_file()
        and docs.is_file()
        and tok.stat().st_size == info["tokens"] * itemsize
        and docs.stat().st_size == info["documents"] * 24
    )


def _load_record(output: str, index: int) -> dict | None:
    """The saved record of unit `index`, or None (absent, or damaged: then the unit is redone)."""
    try:
        rec = json.loads(_record_path(output, index).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _record_usable(output: str, rec: dict, units: list[Unit], states: dict, itemsize: int) -> bool:
    """A record counts when it was made from these very units of these very input versions, and its
    shards are complete."""
    try:
        if rec.get("units") != [asdict(u) for u in units]:
            return False
        if rec.get("inputs") != {u.path: states[u.path] for u in units}:
            return False
        for split, folder in (("train", Path(output)), ("val", Path(output) / "val")):
            info = rec[split]
            if info is not None and not store.check_shard_name(info.get("name")):
                return False
            if not _shard_ok(folder, info, itemsize):
                return False
        return isinstance(rec["bad"], dict) and isinstance(rec["stats"], dict)
    except (KeyError, TypeError, AttributeError):
        return False


def _changed_inputs(rec: dict, states: dict) -> set[str]:
    """Inputs whose size or mtime differs from what the record was made from."""
    seen = rec.get("inputs")
    if not isinstance(seen, dict):
        return set()
    return {p for p, st in seen.items() if p in states and states[p] != st}


def _remove_tmp(out: Path, name: str) -> None:
    for d in (out, out / "val"):
        for tmp in glob.glob(str(d / f"{glob.escape(name)}.*.tmp*")):
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


class _UnitWorker:
    """Tokenizes units into shards; one per worker process (or one in-process)."""

    def __init__(self, job: _Job, report=None):
        if job.threads:
            # before the tokenizer's first parallel call: do not oversubscribe the cores across workers
            os.environ["RAYON_NUM_THREADS"] = str(job.threads)
        self.job = job
        self.tok: Tokenizer = load_tokenizer(job.tokenizer)
        self.dtype = np.dtype(job.dtype)
        self.index_of = {p: i for i, p in enumerate(job.sources)}
        self.report = report or (lambda *a: None)
        self.warned = 0

    def run(self, index: int, units: list[Unit]) -> dict:
        """Tokenize a task (consecutive units) into shard `u{index}` (and its val shard)."""
        job, out = self.job, Path(self.job.output)
        name = shard_name(index)
        _remove_tmp(out, name)  # leftovers of a killed run of this task (the part lock is ours)
        bad = BadRecords(job.bad_records, job.max_bad_fraction, warn_limit=max(0, WARN_LIMIT - self.warned))
        writers = {"train": store.ShardWriter(out, name, self.dtype), "val": None}
        if job.val_fraction > 0:
            writers["val"] = store.ShardWriter(out / "val", name, self.dtype)
        stats = {"documents": 0, "tokens": 0, "train": 0, "val": 0}
        batch: list[Doc] = []
        chars = 0
        try:
            for unit in units:
                reported = 0  # input bytes of this unit already reported
                for doc in read_unit(unit, job.text_field, bad):
                    batch.append(doc)
                    chars += len(doc.text)
                    if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
                        ntok = self._write(batch, writers, stats)
                        done = batch[-1].offset - unit.start if batch[-1].offset >= 0 else 0
                        self.report(len(batch), ntok, max(0, done - reported))
                        reported = max(reported, done)
                        batch, chars = [], 0
                self.report(0, 0, max(0, unit_size(unit) - reported))
            if batch:
                self.report(len(batch), self._write(batch, writers, stats), 0)
        except BaseException:
            for w in writers.values():
                if w is not None:
                    w.abort()
            raise
        self.report(0, 0, 0)  # flush
        self.warned += bad.warned
        planned = dict(job.states)
        seen = {u.path: planned.get(u.path) for u in units}
        for path, state in seen.items():
            if state is not None and file_state(path) != state:
                for w in writers.values():
                    if w is not None:
                        w.abort()
                raise DataError(
                    f"input {path} changed while flame prepare was reading it",
                    hint="run the same command again once it no longer changes: what was made from the "
                    "old content is redone",
                )
        infos = {}
        for split, w in writers.items():
            if w is None:
                infos[split] = None
            elif stats[split]:
                infos[split] = w.close()
            else:
                w.abort()  # no shard for a task without documents in this split
                infos[split] = None
        rec = {
            "units": [asdict(u) for u in units],
            "inputs": seen,
            **infos,
            "bad": bad.state_dict(),
            "stats": stats,
        }
        p = _record_path(job.output, index)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise store.write_error("folder", p.parent, e) from None
        store._atomic_write_json(p, rec, "unit record")
        return rec

    def _write(self, batch: list[Doc], writers: dict, stats: dict) -> int:
        ids = self.tok.encode_batch([d.text for d in batch])
        eos, frac, ntok = self.tok.eos_id, self.job.val_fraction, 0
        for d, a in zip(batch, ids):
            toks = np.empty(len(a) + 1, self.dtype)
            toks[:-1] = a
            toks[-1] = eos
            split = "val" if is_val(d.path, d.record, frac) else "train"
            writers[split].add(toks, self.index_of[d.path], d.record)
            stats[split] += 1
            ntok += len(toks)
        stats["documents"] += len(batch)
        stats["tokens"] += ntok
        return ntok


# --- worker-process plumbing: one _UnitWorker per process, progress through a queue

_worker: _UnitWorker | None = None


def _exit_with(parent: int, interval: float = 0.5) -> None:
    """A watchdog thread: end this worker process when the `flame prepare` process that started it is
    gone (a kill -9 gives it no chance to stop its workers), so no orphan keeps tokenizing."""
    ppid = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != ppid or not pid_alive(parent):
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="flame-prepare-watchdog").start()


def _init_worker(job: _Job, progress_q, parent: int | None = None) -> None:
    global _worker
    if parent is not None:
        _exit_with(parent)
    last = [time.monotonic(), 0, 0, 0]

    def report(docs: int, tokens: int, nbytes: int) -> None:
        last[1] += docs
        last[2] += tokens
        last[3] += nbytes
        now = time.monotonic()
        if now - last[0] > 0.2 or not (docs or tokens or nbytes):  # all zero: the end of a task
            progress_q.put(tuple(last[1:]))
            last[:] = [now, 0, 0, 0]

    _worker = _UnitWorker(job, report)


def _run_in_worker(index: int, units: list[Unit]) -> tuple[int, dict | None, tuple[str, str | None] | None]:
    try:
        return index, _worker.run(index, units), None
    except DataError as e:  # re-raised in the parent with its hint intact
        return index, None, (e.message, e.hint)


class _Progress:
    """Rich progress bar (or nothing) fed by (documents, tokens, input bytes) increments."""

    def __init__(self, total_bytes: int, enabled: bool, label: str):
        self.docs = self.tokens = self.nbytes = 0
        self.t0 = time.monotonic()
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("{task.fields[rates]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self.task = self.bar.add_task(label, total=max(total_bytes, 1), rates="")
            self.bar.start()

    def add(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.nbytes += nbytes
        if self.bar is not None:
            dt = max(time.monotonic() - self.t0, 1e-9)
            rates = f"{self.docs / dt:,.0f} docs/s  {self.nbytes / dt / 1e6:,.1f} MB/s  {_si(self.tokens / dt)} tok/s"
            self.bar.update(self.task, completed=self.nbytes, rates=rates)

    def close(self) -> float:
        if self.bar is not None:
            self.bar.stop()
        return time.monotonic() - self.t0


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _make_dir(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if output.is_file() or e.errno == errno.EEXIST:
            what = "is a file, not a directory"
        else:
            what = f"cannot be created: {e.strerror or e}"
        raise DataError(f"store directory {output} {what}", hint="choose another --data.store") from None


def _comparable(settings: dict) -> dict:
    """What must not change between runs into one store (older settings files recorded input sizes
    and a hash of the unit plan: an edited input is now redone unit by unit instead)."""
    out = {k: v for k, v in settings.items() if k not in ("units", "version")}
    inputs = out.get("inputs")
    if isinstance(inputs, list):
        out["inputs"] = [x[0] if isinstance(x, list) and x else x for x in inputs]
    return out


def _check_settings(output: Path, settings: dict) -> None:
    """Refuse to mix shards of different corpora, tokenizers or splits in one output directory."""
    p = output / SETTINGS
    if p.is_file():
        old = store.read_json(p, output, "its settings file")
        if not isinstance(old, dict):
            raise store.damaged(
                output, f"{SETTINGS} does not hold a JSON object", hint=f"delete {p}, then run again"
            )
        a, b = _comparable(old), _comparable(settings)
        if "unit_bytes" not in a:  # an older settings file: its unit plan was checked by the records
            b.pop("unit_bytes")
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            detail = ""
            if diff == ["inputs"] and isinstance(a.get("inputs"), list):
                new = sorted(set(b["inputs"]) - set(map(str, a["inputs"])))
                gone = sorted(set(map(str, a["inputs"])) - set(b["inputs"]))
                detail = (
                    " ("
                    + "; ".join(
                        x
                        for x in (
                            f"{len(new)} new, e.g. {new[0]}" if new else "",
                            f"{len(gone)} no longer given, e.g. {gone[0]}" if gone else "",
                        )
                        if x
                    )
                    + ")"
                )
            raise DataError(
                f"{output} already holds a store prepared with different {', '.join(diff)}{detail}",
                hint="prepare into a new --data.store directory, or delete this one to start over",
            )
        if old.get("version") == settings["version"] and old.get("unit_bytes") == settings["unit_bytes"]:
            return
    store._atomic_write_json(p, settings, "settings file")


def _recorded_unit_bytes(output: Path, settings: dict) -> int | None:
    """The unit size a store already begun with these very settings recorded (its plan, kept whatever
    the worker count of this run), or None: a new store, or other settings (refused just after)."""
    try:
        old = json.loads((output / SETTINGS).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(old, dict):
        return None
    a, b = _comparable(old), _comparable(settings)
    a.pop("unit_bytes", None)
    b.pop("unit_bytes", None)
    if a != b:
        return None
    size = old.get("unit_bytes", LEGACY_UNIT_BYTES)  # without one: the fixed size of older versions
    ok = isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= MAX_UNIT_MB << 20
    return size if ok else None


def _save_tokenizer_copy(tok: Tokenizer, output: Path) -> None:
    """A copy of the tokenizer inside the store, so training and export need nothing else."""
    final = output / "tokenizer"
    try:
        save_tokenizer_copy(tok, final)
    except OSError as e:
        raise store.write_error("the tokenizer copy", final, e) from None
    except Exception as e:  # the tokenizers library's own error for a full disk
        raise DataError(
            f"cannot write the tokenizer copy {final}: {e}",
            hint="check free space and permissions there, then run the same command again",
        ) from None


class _PartLock:
    """An flock per (store, part): two `flame prepare` runs (or two trainings preparing the same inputs
    into one cache) never write the same shards at once; the second waits, then finds them done.
    Released by the kernel when a process dies."""

    def __init__(self, output: Path, part: tuple[int, int], log):
        self.path = output / f".prepare-{part[0]}-of-{part[1]}.lock"
        self.log = log
        self.fd: int | None = None

    def __enter__(self) -> _PartLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise store.write_error("lock file", self.path, e) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    owner = json.loads(os.pread(fd, 256, 0) or b"{}").get("pid", "?")
                except (ValueError, UnicodeDecodeError, AttributeError):
                    owner = "?"
                self.log(
                    f"{self.path.parent}: another flame prepare (pid {owner}) is writing this part; waiting for it"
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise store.write_error("lock file", self.path, e) from None
            # a filesystem without locks: prepare still works, but only one run per part at a time
            self.log(
                f"note: {self.path.parent} does not support file locks; run one prepare per part at a time"
            )
        try:  # who holds it, for the message of a run that waits (best effort: the disk may be full)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid()}).encode(), 0)
        except OSError:
            pass
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def _check_bounds(part, val_fraction, max_bad_fraction, unit_bytes, bad_records) -> None:
    i_part, n_parts = part
    if not (n_parts >= 1 and 0 <= i_part < n_parts):
        raise DataError(f"part {i_part}/{n_parts}: expected I/N with 0 <= I < N")
    if not 0 <= val_fraction < 1:  # also refuses nan
        raise DataError(f"val_fraction = {val_fraction} must be in [0, 1) (a fraction of the documents)")
    if not 0 < max_bad_fraction <= 1:
        raise DataError(
            f"max_bad_fraction = {max_bad_fraction} must be in (0, 1] (a fraction of the records)"
        )
    if unit_bytes is not None and not (isinstance(unit_bytes, int) and 1 <= unit_bytes <= MAX_UNIT_MB << 20):
        raise DataError(f"unit_bytes = {unit_bytes} must be an integer in [1, {MAX_UNIT_MB << 20}]")
    if bad_records not in ("skip", "error"):
        raise DataError(f"bad_records = {bad_records!r} must be 'skip' or 'error'")


def prepare(
    inputs: list[str],
    tokenizer: str,
    output: str,
    *,
    workers: int = 0,
    part: tuple[int, int] = (0, 1),
    text_field: str = "text",
    val_fraction: float = 0.0,
    bad_records: str = "skip",
    max_bad_fraction: float = 0.5,
    progress: bool = True,
    unit_bytes: int | None = None,
    plan_workers: int | None = None,
    log=None,
) -> dict:
    """Tokenize `inputs` into the store `output` (part I of N); returns the manifest once every part is
    complete (with a "val" entry when val_fraction > 0), else this part's info and the missing parts.

    workers > 1 starts worker processes (forkserver/spawn): a script calling this needs the usual
    `if __name__ == "__main__":` guard. unit_bytes None sizes the units from the total input and
    `plan_workers` (default: the worker count; with --part I/N, PART_PLAN_WORKERS per part) so every
    worker gets several similar units; a store already begun keeps the unit size it recorded.
    The store's token stream and document list (in input order) do not depend on the plan; its
    shard layout, and so its fingerprint, does. Re-running with the same arguments resumes; a unit whose
    input changed (size or mtime) since it was prepared is prepared again. Runs of the same part
    into one store take turns (a file lock), so a second one waits and then reuses the first's work.
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    _check_bounds(part, val_fraction, max_bad_fraction, unit_bytes, bad_records)
    tok = load_tokenizer(tokenizer)
    out = Path(output)
    _make_dir(out)
    opts = dict(
        workers=workers,
        part=part,
        text_field=text_field,
        val_fraction=val_fraction,
        bad_records=bad_records,
        max_bad_fraction=max_bad_fraction,
        progress=progress,
        unit_bytes=unit_bytes,
        plan_workers=plan_workers,
        log=log,
    )
    with _PartLock(out, part, log), contextlib.ExitStack() as cleanup:
        return _prepare_locked(inputs, tokenizer, tok, out, cleanup, **opts)


def _prepare_locked(
    inputs: list[str],
    tokenizer: str,
    tok: Tokenizer,
    out: Path,
    cleanup: contextlib.ExitStack,
    *,
    workers: int,
    part: tuple[int, int],
    text_field: str,
    val_fraction: float,
    bad_records: str,
    max_bad_fraction: float,
    progress: bool,
    unit_bytes: int | None,
    plan_workers: int | None,
    log,
) -> dict:
    i_part, n_parts = part
    output = str(out)
    paths = expand_inputs(inputs, log)
    states = {p: file_state(p) for p in paths}
    if workers <= 0:
        workers = usable_cpus()
    dtype = store.token_dtype(tok.vocab_size)
    begun = (out / SETTINGS).is_file()
    settings = {
        "version": SETTINGS_VERSION,
        "tokenizer": tok.fingerprint if begun else None,  # a new store: computed once its workers start
        "inputs": paths,
        "unit_bytes": unit_bytes,
        "text_field": text_field,
        "val_fraction": val_fraction,
        "num_parts": n_parts,
    }
    how = "unit size given"
    text_bytes = None if unit_bytes is not None else TEXT_UNIT_BYTES  # documents never follow the plan
    if unit_bytes is None:
        if begun:
            unit_bytes, how = _recorded_unit_bytes(out, settings), "as recorded when this store was begun"
        if unit_bytes is None:
            sized_for = plan_workers or (PART_PLAN_WORKERS * n_parts if n_parts > 1 else workers)
            unit_bytes = auto_unit_bytes(input_bytes(paths), sized_for)
            how = f"automatic for {sized_for} worker(s)"
        settings["unit_bytes"] = unit_bytes
    units = plan_units(paths, unit_bytes, text_bytes)
    tasks = plan_tasks(units, unit_bytes)
    mine = [(i, t) for i, t in enumerate(tasks) if i % n_parts == i_part]

    def make_job(n_workers: int) -> _Job:
        return _Job(
            tokenizer=tokenizer,
            output=str(out),
            dtype=dtype.name,
            text_field=text_field,
            val_fraction=val_fraction,
            bad_records=bad_records,
            max_bad_fraction=max_bad_fraction,
            sources=tuple(paths),
            threads=max(1, usable_cpus() // n_workers) if n_workers > 1 else 0,
            states=tuple(states.items()),
        )

    # a new store has every task to do: its workers start (and load the tokenizer, about a second for
    # 100k ids) while this process fingerprints the tokenizer, checks the settings and saves its copy
    pool = None
    if not begun and min(workers, len(mine)) > 1:
        workers = min(workers, len(mine))
        pool = cleanup.enter_context(_WorkerPool(make_job(workers), workers))
    settings["tokenizer"] = tok.fingerprint
    _check_settings(out, settings)
    _save_tokenizer_copy(tok, out)

    records: dict[int, dict] = {}
    todo = []
    changed: set[str] = set()
    redone = 0
    for i, t in mine:
        rec = _load_record(output, i)
        if rec is not None and _record_usable(output, rec, t, states, dtype.itemsize):
            records[i] = rec
            continue
        if rec is not None:
            changed |= _changed_inputs(rec, states)
            redone += 1
        todo.append((i, t))
    if changed:
        first = sorted(changed)[0]
        log(
            f"input {first}{f' and {len(changed) - 1} more' if len(changed) > 1 else ''} changed since "
            f"{'its' if len(changed) == 1 else 'their'} shards were prepared: preparing the "
            f"{redone} affected shard(s) again"
        )
    if pool is None:
        workers = max(1, min(workers, len(todo)))
    if todo:
        sizes = [sum(unit_size(u) for u in t) for _, t in todo]
        log(
            f"{'prepare' if n_parts == 1 else f'prepare {i_part}/{n_parts}'}: {len(todo)} of {len(tasks)} "
            f"task(s) to do ({len(units)} unit(s) of ~{unit_bytes / (1 << 20):.3g} MiB, {how}; tasks of "
            f"{min(sizes) / 1e6:,.1f}-{max(sizes) / 1e6:,.1f} MB) on {workers} worker(s)"
        )
    job = pool.job if pool is not None else make_job(workers)
    bad = BadRecords(bad_records, max_bad_fraction)
    for rec in records.values():
        bad.merge(rec["bad"])
    label = f"prepare {i_part}/{n_parts}" if n_parts > 1 else "prepare"
    todo_bytes = sum(unit_size(u) for _, t in todo for u in t)
    bar = _Progress(todo_bytes, progress and bool(todo), label)
    docs = tokens = 0
    try:
        for i, rec in _run_tasks(job, todo, workers, bar.add, pool):
            records[i] = rec
            bad.merge(rec["bad"])
            docs += rec["stats"]["documents"]
            tokens += rec["stats"]["tokens"]
    finally:
        elapsed = bar.close()
    if todo:
        log(
            f"{label}: {docs:,} documents, {tokens:,} tokens from {todo_bytes / 1e6:,.1f} MB in "
            f"{elapsed:.1f}s ({_si(tokens / max(elapsed, 1e-9))} tokens/s, {workers} worker(s))"
            + (f"; {len(mine) - len(todo)} shard(s) were already done" if len(mine) > len(todo) else "")
        )
    if bad.bad_count or bad.empty_count:
        log(f"{label}: {bad.summary()}")
    return _finish(out, tok, paths, states, dtype, records, bad, part, val_fraction, max_bad_fraction, log)


class _WorkerPool:
    """The worker processes of a run, started when created: each loads the tokenizer at once (its
    initializer), so that work overlaps with what the parent still does before the first task."""

    def __init__(self, job: _Job, workers: int):
        self.job = job
        # spawn-like start methods: tokenizers' thread pools and torch do not survive fork
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        if ctx.get_start_method() == "forkserver":
            # imported once in the server (when this starts it) instead of in every worker: about a
            # third of a CPU-second each; no tokenizer thread pool exists before the fork
            ctx.set_forkserver_preload(["__main__", "flame.data.prepare", "tokenizers"])
        self.progress_q = ctx.Queue()
        # an executor, not mp.Pool: a worker that dies (OOM kill) fails the run instead of hanging it
        self.pool = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(job, self.progress_q, os.getpid())
        )
        for _ in range(workers):  # the executor starts a process per submission while none is idle
            self.pool.submit(os.getpid)

    def __enter__(self) -> _WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is None:
            return
        # on an error, stop now rather than after the tasks in flight (their shards are not marked done)
        for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
            proc.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = None


def _died() -> DataError:
    return DataError(
        "a prepare worker process died (killed, or out of memory?)",
        hint="re-run the same command to resume; finished shards are kept. Fewer --workers use less memory",
    )


def _run_tasks(job: _Job, todo: list[tuple[int, list[Unit]]], workers: int, progress, pool=None):
    """Yield (index, record) as tasks finish; in-process for one worker, else a process pool (`pool`
    when already started)."""
    if pool is None and workers == 1:
        w = _UnitWorker(job, progress)
        for i, t in todo:
            yield i, w.run(i, t)
        return
    if not todo:
        return
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(_WorkerPool(job, workers))
        yield from _pool_tasks(pool, todo, progress)


def _pool_tasks(pool: _WorkerPool, todo: list[tuple[int, list[Unit]]], progress):
    progress_q = pool.progress_q
    done: queue.SimpleQueue = queue.SimpleQueue()
    finished: set[int] = set()
    try:
        try:
            for i, t in todo:
                pool.pool.submit(_run_in_worker, i, t).add_done_callback(done.put)
        except BrokenProcessPool:  # a worker died while starting
            raise _died() from None
        left = len(todo)
        while left:
            try:
                progress(*progress_q.get(timeout=0.1))
            except queue.Empty:
                pass
            while not done.empty():
                try:
                    i, rec, err = done.get().result()
                except BrokenProcessPool:
                    raise _died() from None
                if err is not None:
                    raise DataError(err[0], hint=err[1])
                left -= 1
                finished.add(i)
                yield i, rec
        while True:  # the last progress increments
            try:
                progress(*progress_q.get(timeout=0.05))
            except queue.Empty:
                break
    finally:
        pool.close()
        for i, _ in todo:  # what the stopped workers had half-written (the part lock is ours)
            if i not in finished:
                _remove_tmp(Path(pool.job.output), shard_name(i))


def _part_info(
    tok: Tokenizer, paths: list[str], states: dict, dtype: np.dtype, shards: list[dict], bad: BadRecords
) -> dict:
    sources = []
    for p in paths:
        st = states.get(p)
        sources.append(
            {
                "path": p,
                "size": st[0] if st else -1,
                "mtime": st[1] / 1e9 if st else -1,
                "state": st,
            }
        )
    return {
        "tokenizer": {
            "spec": tok.spec,
            "fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
        },
        "dtype": dtype.name,
        "sources": sources,
        "shards": shards,
        "bad_records": bad.summary() if (bad.bad_count or bad.empty_count) else "",
        "bad_state": bad.state_dict(),
    }


def _finish(
    out: Path, tok, paths, states, dtype, records: dict, bad: BadRecords, part, val_fraction, max_bad, log
) -> dict:
    i_part, n_parts = part
    order = sorted(records)
    dirs = {"train": out, "val": out / "val"} if val_fraction > 0 else {"train": out}
    for split, d in dirs.items():
        shards = [records[i][split] for i in order if records[i][split] is not None]
        store.write_part_manifest(d, i_part, n_parts, _part_info(tok, paths, states, dtype, shards, bad))
    status = store.store_status(out)
    if status["missing"]:
        log(f"part {i_part}/{n_parts} complete; still missing parts {status['missing']}")
        return {"part": i_part, "num_parts": n_parts, "missing": status["missing"], "units": len(order)}
    _check_usable(out, n_parts, max_bad)
    manifest = store.finalize_store(out)
    if val_fraction > 0:
        val = store.finalize_store(out / "val")
        if not val["num_documents"]:
            log(f"warning: the validation split of {out} got no documents; raise --val-fraction")
        manifest = {**manifest, "val": val}
    _forget_damage(out, log)
    return manifest


def _forget_damage(out: Path, log) -> None:
    """After a store was finished again, the metadata `--verify` set aside is out of date: drop it."""
    old = [p for d in (out, out / "val") for p in (*d.glob("*.damaged"), *d.glob("*/*.damaged"))]
    if old:
        for p in old:
            p.unlink(missing_ok=True)
        log(f"{out}: the shards `flame prepare --verify` set aside are prepared again; the store is complete")


def _check_usable(out: Path, n_parts: int, max_bad: float) -> None:
    """No usable document in the whole corpus is an error, before the store is marked finished."""
    total = BadRecords(max_fraction=max_bad)
    for i in range(n_parts):
        info = store.read_json(store.part_path(out, i, n_parts), out, "part manifest")
        state = info.get("bad_state") if isinstance(info, dict) else None
        try:
            total.merge(state or {"good": 1, "bad": 0, "empty": 0, "reasons": {}, "first": None})
        except (KeyError, TypeError, AttributeError):
            raise store.damaged(
                out,
                f"parts/part-{i}-of-{n_parts}.json: bad_state is malformed",
                hint=f"run `flame prepare ... --part {i}/{n_parts}` again (its finished shards are kept)",
            ) from None
    total.check_finished(f"the inputs of {out}")


# ---------------------------------------------------------------- CLI


def _parse_part(s: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in s.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not I/N (e.g. 0/4)") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"part {s}: need 0 <= I < N")
    return i, n


# Options that are config keys take the config's spelling, --section.key as in `flame train` (the
# store written is what data.store then reads); the older spellings still work, with a note.
RENAMED = {
    "--input": "--data.inputs",
    "--tokenizer": "--data.tokenizer",
    "--output": "--data.store",
    "--text-field": "--data.text_field",
    "--bad-records": "--data.bad_records",
    "--max-bad-fraction": "--data.max_bad_fraction",
}


def _spellings(argv: list[str]) -> dict[str, str]:
    """{new spelling: the one used} of the renamed options in argv; one note per old spelling."""
    used: dict[str, str] = {}
    for tok in argv:
        flag = tok.split("=", 1)[0]
        if flag in RENAMED and RENAMED[flag] not in used:
            print(
                f"note: flame prepare {flag} is now spelt {RENAMED[flag]} (as in flame train); "
                "the old spelling still works",
                file=sys.stderr,
            )
        if flag in RENAMED or flag in RENAMED.values():
            used.setdefault(RENAMED.get(flag, flag), flag)
    return used


def _config_option(p: argparse.ArgumentParser, new: str, dest: str, **kw) -> None:
    """An option spelt as its config key, and its old spelling as a hidden alias."""
    p.add_argument(new, dest=dest, **kw)
    old = next(o for o, n in RENAMED.items() if n == new)
    kw = {k: v for k, v in kw.items() if k in ("nargs", "type", "choices", "metavar")}
    p.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def _parser() -> argparse.ArgumentParser:
    from flame.config import DataConfig, choice_fields

    d = DataConfig()
    p = argparse.ArgumentParser(
        prog="flame prepare",
        description="Tokenize a corpus once into a store that training memory-maps. Re-running the same "
        "command resumes; --part I/N splits the work across machines (the last part finalizes).",
    )
    _config_option(
        p,
        "--data.inputs",
        "input",
        nargs="+",
        metavar="SPEC",
        help="files, folders, globs, hf:NAME[:SPLIT], or stdlib (was --input)",
    )
    _config_option(
        p,
        "--data.tokenizer",
        "tokenizer",
        default=d.tokenizer,
        help="'byte' or a tokenizer directory / tokenizer.json (was --tokenizer)",
    )
    _config_option(
        p,
        "--data.store",
        "output",
        metavar="STORE",
        help="store directory to write; train on it with flame train --data.store STORE (was --output)",
    )
    p.add_argument("--workers", type=int, default=0, help="worker processes (0 = all cores)")
    p.add_argument("--part", type=_parse_part, default=(0, 1), metavar="I/N", help="prepare only part I of N")
    _config_option(
        p,
        "--data.text_field",
        "text_field",
        default=d.text_field,
        metavar="FIELD",
        help="field holding the text in jsonl/parquet/HF records (was --text-field)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="fraction of documents routed to <store>/val, in [0, 1)",
    )
    _config_option(
        p,
        "--data.bad_records",
        "bad_records",
        choices=choice_fields()["data.bad_records"],
        default=d.bad_records,
        help="skip (count, warn) or error (was --bad-records)",
    )
    _config_option(
        p,
        "--data.max_bad_fraction",
        "max_bad_fraction",
        type=float,
        default=d.max_bad_fraction,
        metavar="X",
        help="stop when more records than this fraction are bad, in (0, 1] (was --max-bad-fraction)",
    )
    p.add_argument(
        "--unit-mb",
        type=float,
        default=None,
        help=f"split the work into units (shards) of about this many MB, in [{MIN_UNIT_MB:.4g}, {MAX_UNIT_MB}] "
        "(default: sized from the input and --workers so every worker stays busy)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar, only a summary line")
    p.add_argument(
        "--status", metavar="STORE", help="show which parts of STORE are complete; exit 1 if not all"
    )
    p.add_argument(
        "--verify",
        metavar="STORE",
        help="check every shard of STORE (sizes, SHA-256, token ids, document index); damaged shards are "
        "set aside so that re-running the command that made STORE prepares them again; exit 1 if any",
    )
    return p


def status_text(path: str) -> tuple[str, bool]:
    """A human summary of a store's parts, and whether it is complete."""
    d = Path(path)
    if not d.is_dir():
        raise DataError(f"no such store directory '{path}'")
    lines, complete = [], True
    for name, sd in (("store", d), ("validation store", d / "val")):
        if name != "store" and not sd.is_dir():
            continue
        st = store.store_status(sd)
        if (sd / "manifest.json.damaged").is_file() and not (sd / "manifest.json").is_file():
            lines.append(
                f"{name} {sd}: damaged shards were set aside by `flame prepare --verify`; run the command "
                "that made it again to prepare them anew"
            )
            complete = False
            continue
        if st["parts"] == 0:
            lines.append(f"{name} {sd}: no part prepared yet")
            complete = False
            continue
        ok = not st["missing"]
        complete &= ok
        lines.append(
            f"{name} {sd}: {len(st['complete'])} of {st['parts']} parts complete"
            + (f"; missing parts {st['missing']}" if st["missing"] else "")
            + ("; finalized" if st["finalized"] else "")
        )
    return "\n".join(lines), complete


def _set_aside(path: Path) -> bool:
    if not path.exists():
        return False
    os.replace(path, path.with_name(path.name + ".damaged"))
    return True


def _check_one(d: Path, dtype: np.dtype, vocab: int, n_src: int, shard: dict) -> str | None:
    try:
        return store.check_shard(d, shard, dtype, vocab, n_src)
    except OSError as e:
        return f"{shard['name']}: cannot read it: {e.strerror or e}"


def verify_store(path: str, workers: int = 0, log=None) -> list[str]:
    """Check every shard of a store and of its `val` part; set the damaged ones aside (their unit
    records, the part manifests that list them and the store manifest get a `.damaged` suffix), so
    the store is not used until the command that made it is run again, which redoes only those
    shards. Returns the problems found (empty: the store is intact)."""
    from concurrent.futures import ThreadPoolExecutor

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    root = Path(path)
    if not (root / "manifest.json").is_file():
        if not root.is_dir():
            raise DataError(f"no such store directory '{path}'")
        raise DataError(
            f"{path} has no manifest.json: not a finished store",
            hint="`flame prepare --status STORE` says what is missing",
        )
    problems: list[str] = []
    t0 = time.monotonic()
    nbytes = nshards = 0
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    for d in (root, root / "val"):
        mf = d / "manifest.json"
        if d != root and not mf.is_file():
            continue
        m = store.read_json(mf, d, "its manifest")
        store.validate_manifest(m, d)
        dtype = np.dtype(m["dtype"])
        vocab, n_src = m["tokenizer"]["vocab_size"], len(m["sources"])
        with ThreadPoolExecutor(workers) as ex:  # hashlib and file reads release the GIL
            found = list(ex.map(functools.partial(_check_one, d, dtype, vocab, n_src), m["shards"]))
        nshards += len(m["shards"])
        nbytes += sum(s["tokens"] * dtype.itemsize + s["documents"] * 24 for s in m["shards"])
        bad = [(s, p) for s, p in zip(m["shards"], found) if p]
        if not bad:
            continue
        n_parts = m.get("parts", 1) if isinstance(m.get("parts"), int) and m.get("parts", 0) > 0 else 1
        for s, problem in bad:
            problems.append(f"{d}: {problem}")
            name = s["name"]
            if name.startswith("u") and name[1:].isdigit():
                index = int(name[1:])
                _set_aside(_record_path(str(root), index))
                _set_aside(store.part_path(d, index % n_parts, n_parts))
        _set_aside(mf)
    dt = time.monotonic() - t0
    rate = (
        f"{nbytes / 1e6:,.1f} MB in {dt:.1f}s ({nbytes / max(dt, 1e-9) / 1e9:.2f} GB/s, {workers} thread(s))"
    )
    if problems:
        log(f"store {path}: {len(problems)} of {nshards} shard(s) damaged ({rate}):")
        for p in problems[:20]:
            log(f"  {p}")
        if len(problems) > 20:
            log(f"  ... and {len(problems) - 20} more")
    else:
        log(f"store {path}: all {nshards} shard(s) intact ({rate})")
    return problems


def cli(argv: list[str]) -> int:
    parser = _parser()
    used = _spellings(argv)
    args = parser.parse_args(argv)
    if args.status:
        text, complete = status_text(args.status)
        print(text)
        return 0 if complete else 1
    if args.verify:
        problems = verify_store(args.verify, args.workers)
        if problems:
            print(
                f"error: store {args.verify} is damaged; its damaged shards were set aside (*.damaged)\n"
                "  hint: run the `flame prepare` command that made it again (for a store that `flame train` "
                "prepared from data.inputs: the same `flame train` command): only those shards are "
                "tokenized again",
                file=sys.stderr,
            )
            return 1
        return 0
    if not args.input or not args.output:
        parser.error(
            "--data.inputs and --data.store (the store to write) are required (or --status STORE, "
            "or --verify STORE)"
        )
    if args.unit_mb is not None and not MIN_UNIT_MB <= args.unit_mb <= MAX_UNIT_MB:  # also refuses nan, inf
        parser.error(
            f"--unit-mb {args.unit_mb} must be in [{MIN_UNIT_MB:.4g}, {MAX_UNIT_MB}] (MB per unit of work)"
        )
    if not 0 < args.max_bad_fraction <= 1:
        parser.error(
            f"{used.get('--data.max_bad_fraction', '--data.max_bad_fraction')} {args.max_bad_fraction} "
            "must be in (0, 1] (a fraction of the records)"
        )
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction {args.val_fraction} must be in [0, 1) (a fraction of the documents)")
    prepare(
        args.input,
        args.tokenizer,
        args.output,
        workers=args.workers,
        part=args.part,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        bad_records=args.bad_records,
        max_bad_fraction=args.max_bad_fraction,
        progress=not args.no_progress and sys.stderr.isatty(),
        unit_bytes=None if args.unit_mb is None else max(1, int(args.unit_mb * (1 << 20))),
    )
    return 0
