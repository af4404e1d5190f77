"""`flame prepare`: corpus -> tokenized store, in parallel, resumable, splittable across machines.

Inputs expand to a sorted list of units (see sources.plan_units); part I of N owns the units with
index % N == I; every unit becomes one shard `u{index:06d}` (and one in `<output>/val` when a
validation fraction is asked for). A unit is done once its record `units/u{index:06d}.json` exists
and its shard files match it, so a killed run re-run with the same arguments redoes only the rest.
When every part is complete the store is finalized (manifest.json); the last part to finish does it.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flame.data import store
from flame.data.sources import BadRecords, Doc, Unit, expand_inputs, plan_units, read_unit
from flame.data.sources import unit_bytes as unit_size
from flame.data.tokenizer import Tokenizer, load_tokenizer
from flame.errors import DataError

BATCH_DOCS = 1000
BATCH_CHARS = 8 << 20
WARN_LIMIT = 10
SETTINGS = "prepare.json"


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


def _done_record(output: str, index: int, itemsize: int) -> dict | None:
    """The saved result of unit `index` if it and its shards are complete, else None."""
    p = _record_path(output, index)
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    ok = _shard_ok(Path(output), rec["train"], itemsize) and _shard_ok(
        Path(output) / "val", rec["val"], itemsize
    )
    return rec if ok else None


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
        for d in (out, out / "val"):  # leftovers of a killed run of this task
            for tmp in glob.glob(str(d / f"{name}.*.tmp*")):
                os.unlink(tmp)
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
        infos = {}
        for split, w in writers.items():
            if w is None:
                infos[split] = None
            elif stats[split]:
                infos[split] = w.close()
            else:
                w.abort()  # no shard for a task without documents in this split
                infos[split] = None
        rec = {"units": [asdict(u) for u in units], **infos, "bad": bad.state_dict(), "stats": stats}
        p = _record_path(job.output, index)
        p.parent.mkdir(parents=True, exist_ok=True)
        store._atomic_write_json(p, rec)
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


def _init_worker(job: _Job, progress_q) -> None:
    global _worker
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


def _check_settings(output: Path, settings: dict) -> None:
    """Refuse to mix shards of different corpora, tokenizers or splits in one output directory."""
    p = output / SETTINGS
    if p.is_file():
        old = json.loads(p.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise DataError(
                f"{output} already holds a store prepared with different {', '.join(diff)}",
                hint="prepare into a new --output directory, or delete this one to start over",
            )
    else:
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            what = (
                "is a file, not a directory" if output.is_file() else f"cannot be created: {e.strerror or e}"
            )
            raise DataError(f"store directory {output} {what}", hint="choose another --output") from None
        store._atomic_write_json(p, settings)


def _save_tokenizer_copy(tok: Tokenizer, output: Path) -> None:
    """A copy of the tokenizer inside the store, so training and export need nothing else."""
    final = output / "tokenizer"
    tmp = output / f"tokenizer.tmp{os.getpid()}"
    tok.save_pretrained(str(tmp))
    final.mkdir(exist_ok=True)
    for f in os.listdir(tmp):
        os.replace(tmp / f, final / f)
    shutil.rmtree(tmp, ignore_errors=True)


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
    unit_bytes: int = 64 << 20,
    log=None,
) -> dict:
    """Tokenize `inputs` into the store `output` (part I of N); returns the manifest once every part is
    complete (with a "val" entry when val_fraction > 0), else this part's info and the missing parts.

    workers > 1 starts worker processes (forkserver/spawn): a script calling this needs the usual
    `if __name__ == "__main__":` guard. Re-running with the same arguments resumes.
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    i_part, n_parts = part
    if not (n_parts >= 1 and 0 <= i_part < n_parts):
        raise DataError(f"part {i_part}/{n_parts}: expected I/N with 0 <= I < N")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction = {val_fraction} must be in [0, 1)")
    tok = load_tokenizer(tokenizer)
    paths = expand_inputs(inputs)
    units = plan_units(paths, unit_bytes)
    out = Path(output)
    dtype = store.token_dtype(tok.vocab_size)
    settings = {
        "tokenizer": tok.fingerprint,
        "inputs": [[p, os.path.getsize(p) if os.path.isfile(p) else -1] for p in paths],
        "units": hashlib.sha256(json.dumps([asdict(u) for u in units]).encode()).hexdigest(),
        "text_field": text_field,
        "val_fraction": val_fraction,
        "num_parts": n_parts,
    }
    _check_settings(out, settings)
    _save_tokenizer_copy(tok, out)

    mine = [(i, t) for i, t in enumerate(plan_tasks(units, unit_bytes)) if i % n_parts == i_part]
    records: dict[int, dict] = {}
    todo = []
    for i, t in mine:
        rec = _done_record(output, i, dtype.itemsize)
        if rec is None:
            todo.append((i, t))
        else:
            records[i] = rec
    if workers <= 0:
        workers = os.cpu_count() or 1
    workers = max(1, min(workers, len(todo)))
    job = _Job(
        tokenizer=tokenizer,
        output=str(out),
        dtype=dtype.name,
        text_field=text_field,
        val_fraction=val_fraction,
        bad_records=bad_records,
        max_bad_fraction=max_bad_fraction,
        sources=tuple(paths),
        threads=max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0,
    )
    bad = BadRecords(bad_records, max_bad_fraction)
    for rec in records.values():
        bad.merge(rec["bad"])
    label = f"prepare {i_part}/{n_parts}" if n_parts > 1 else "prepare"
    todo_bytes = sum(unit_size(u) for _, t in todo for u in t)
    bar = _Progress(todo_bytes, progress and bool(todo), label)
    docs = tokens = 0
    try:
        for i, rec in _run_tasks(job, todo, workers, bar.add):
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
    return _finish(out, tok, paths, dtype, records, bad, part, val_fraction, max_bad_fraction, log)


def plan_tasks(units: list[Unit], target_bytes: int) -> list[list[Unit]]:
    """Group consecutive units into tasks of about target_bytes (one shard each), so a corpus of many
    small files does not become as many tiny shards. A pure function of the unit list."""
    tasks: list[list[Unit]] = []
    size = target_bytes
    for u in units:
        if size >= target_bytes:
            tasks.append([])
            size = 0
        tasks[-1].append(u)
        size += max(unit_size(u), 1)
    return tasks


def _run_tasks(job: _Job, todo: list[tuple[int, list[Unit]]], workers: int, progress):
    """Yield (index, record) as tasks finish; in-process for one worker, else a process pool."""
    if workers == 1:
        w = _UnitWorker(job, progress)
        for i, t in todo:
            yield i, w.run(i, t)
        return
    # spawn-like start methods: tokenizers' thread pools and torch do not survive fork
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    progress_q = ctx.Queue()
    done: queue.SimpleQueue = queue.SimpleQueue()
    # an executor, not mp.Pool: a worker that dies (OOM kill) fails the run instead of hanging it
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(job, progress_q))
    try:
        for i, t in todo:
            pool.submit(_run_in_worker, i, t).add_done_callback(done.put)
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
                    raise DataError(
                        "a prepare worker process died (killed, or out of memory?)",
                        hint="re-run the same command to resume; finished shards are kept. "
                        "Fewer --workers use less memory",
                    ) from None
                if err is not None:
                    raise DataError(err[0], hint=err[1])
                left -= 1
                yield i, rec
        while True:  # the last progress increments
            try:
                progress(*progress_q.get(timeout=0.05))
            except queue.Empty:
                break
    finally:
        # on an error, stop now rather than after the tasks in flight (their shards are not marked done)
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def _part_info(
    tok: Tokenizer, paths: list[str], dtype: np.dtype, shards: list[dict], bad: BadRecords
) -> dict:
    sources = []
    for p in paths:
        st = os.stat(p) if os.path.exists(p) else None
        sources.append({"path": p, "size": st.st_size if st else -1, "mtime": st.st_mtime if st else -1})
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
    out: Path, tok, paths, dtype, records: dict, bad: BadRecords, part, val_fraction, max_bad, log
) -> dict:
    i_part, n_parts = part
    order = sorted(records)
    dirs = {"train": out, "val": out / "val"} if val_fraction > 0 else {"train": out}
    for split, d in dirs.items():
        shards = [records[i][split] for i in order if records[i][split] is not None]
        store.write_part_manifest(d, i_part, n_parts, _part_info(tok, paths, dtype, shards, bad))
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
    return manifest


def _check_usable(out: Path, n_parts: int, max_bad: float) -> None:
    """No usable document in the whole corpus is an error, before the store is marked finished."""
    total = BadRecords(max_fraction=max_bad)
    for i in range(n_parts):
        info = json.loads((out / "parts" / f"part-{i}-of-{n_parts}.json").read_text())
        total.merge(info.get("bad_state") or {"good": 1, "bad": 0, "empty": 0, "reasons": {}, "first": None})
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flame prepare",
        description="Tokenize a corpus once into a store that training memory-maps. Re-running the same "
        "command resumes; --part I/N splits the work across machines (the last part finalizes).",
    )
    p.add_argument(
        "--input", nargs="+", metavar="SPEC", help="files, folders, globs, hf:NAME[:SPLIT], or stdlib"
    )
    p.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer directory / tokenizer.json")
    p.add_argument("--output", help="store directory to write")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0 = all cores)")
    p.add_argument("--part", type=_parse_part, default=(0, 1), metavar="I/N", help="prepare only part I of N")
    p.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet/HF records")
    p.add_argument(
        "--val-fraction", type=float, default=0.0, help="fraction of documents routed to <output>/val"
    )
    p.add_argument(
        "--bad-records", choices=("skip", "error"), default="skip", help="skip (count, warn) or error"
    )
    p.add_argument(
        "--max-bad-fraction", type=float, default=0.5, help="stop when more records than this are bad"
    )
    p.add_argument(
        "--unit-mb", type=float, default=64, help="split big uncompressed files into ~this many MB"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar, only a summary line")
    p.add_argument(
        "--status", metavar="STORE", help="show which parts of STORE are complete; exit 1 if not all"
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


def cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.status:
        text, complete = status_text(args.status)
        print(text)
        return 0 if complete else 1
    if not args.input or not args.output:
        _parser().error("--input and --output are required (or --status STORE)")
    if not args.unit_mb > 0:
        _parser().error(f"--unit-mb {args.unit_mb} must be > 0")
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
        unit_bytes=max(1, int(args.unit_mb * (1 << 20))),
    )
    return 0
