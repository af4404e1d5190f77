"""`flame report RUN_DIR... [-o report.html]`: one self-contained page about one run or several.

Built afterwards from what a run directory already holds, never threaded through training:
`metrics.jsonl` (train and eval records; and one record per (re)start when the trainer writes
them, as `kind: "start"` there or in `starts.jsonl`), `config.toml`, the kept checkpoints' run state and the data stores'
manifests. The page has the headline numbers, the curves (PNG embedded as base64: it opens from
disk with no network), the restarts, the config as its difference from the defaults, the
environment, the data fingerprints and the checkpoints. `-o report.md` writes the same as
Markdown with the PNGs beside it.

Restarts come from `kind: "start"` records when the run has them; otherwise from the records
alone: within one process `time - elapsed_s` stays constant (both clocks advance together), a
restart makes it jump by the wall time from the saved state to training again, and a new
process's peak memory starts lower.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flame.errors import FlameError
from flame.plot import (
    EVAL_MARKERS,
    read_run_records,
    run_labels,
    run_style,
    smooth,
    source_names,
    split_records,
    thin,
)
from flame.records import read_records

# Where a trainer writes one record per (re)start, if not into metrics.jsonl as `kind: "start"`.
STARTS_FILE = "starts.jsonl"
# A jump of `time - elapsed_s` between two train records larger than this (seconds, plus a
# per-second allowance for clock slew over long gaps) is a restart.
RESTART_JUMP_S = 0.1
CLOCK_SLEW = 1e-3


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
    records: list[dict]  # file order
    train: list[dict]  # by step, one per step
    evals: list[dict]
    starts: list[dict]
    config: dict | None  # config.toml as a dict
    config_text: str
    checkpoints: list[dict] = field(default_factory=list)
    abandoned: list[dict] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)


# ---------------------------------------------------------------- reading a run


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """Everything the report shows of one run directory; a FlameError when it is not one."""
    run_dir = Path(run_dir)
    records = read_run_records(run_dir)
    train, evals = split_records(records)
    if not train and not evals:
        raise FlameError(
            f"{run_dir / 'metrics.jsonl'} holds no records yet",
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
    starts = [r for r in records if r.get("kind") == "start"]
    if not starts:  # the trainer's start records in a file of their own
        starts = [
            {**r, "kind": "start"}
            for r in read_records(run_dir / STARTS_FILE)
            if isinstance(r.get("step"), int) and _is_num(r.get("time"))
        ]
        records = merge_starts(records, starts)
    run = Run(
        run_dir=run_dir,
        label=label or run_dir.name,
        records=records,
        train=train,
        evals=evals,
        starts=starts,
        config=config,
        config_text=text,
    )
    run.checkpoints, run.abandoned = read_checkpoints(run_dir)
    run.segments = find_segments(records)
    return run


def merge_starts(records: list[dict], starts: list[dict]) -> list[dict]:
    """metrics.jsonl's records with the start records of starts.jsonl put where they happened:
    before the first record written after them."""
    pending = sorted(starts, key=lambda r: r["time"])
    out, i = [], 0
    for r in records:
        t = r.get("time")
        while i < len(pending) and _is_num(t) and pending[i]["time"] <= t:
            out.append(pending[i])
            i += 1
        out.append(r)
    return out + pending[i:]


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


def find_segments(records: list[dict]) -> list[Segment]:
    """The run's (re)starts: from `start` records when there are any, else from jumps of
    `time - elapsed_s` (and drops of peak memory) between consecutive train records."""
    has_starts = any(r.get("kind") == "start" for r in records)
    segs: list[Segment] = []
    prev = None
    for r in records:
        kind = r.get("kind", "train")
        if kind == "start":
            segs.append(Segment(len(segs), int(r["step"]), start=r))
            continue
        if kind != "train" or not _is_num(r.get("elapsed_s")) or not _is_num(r.get("time")):
            continue
        offset = r["time"] - r["elapsed_s"]
        new = not segs
        how = "start of the records"
        if not has_starts and prev is not None:
            jump = offset - (prev["time"] - prev["elapsed_s"])
            allowed = RESTART_JUMP_S + CLOCK_SLEW * max(0.0, r["time"] - prev["time"])
            mem, pmem = r.get("memory_gib"), prev.get("memory_gib")
            if jump > allowed:
                new, how = True, f"time jump of {_dur(jump)}"
            elif _is_num(mem) and _is_num(pmem) and mem < pmem:
                new, how = True, "peak memory dropped (a new process)"
        if new and not has_starts:
            segs.append(Segment(len(segs), 0 if not segs else None, found_by=how))
        seg = segs[-1] if segs else None
        if seg is None:  # train records before any start record: a run from before start records
            seg = Segment(0, None, found_by="records")
            segs.append(seg)
        if seg.records == 0:
            seg.first_step, seg.offset = r["step"], offset
            if _is_num(r.get("tokens_per_s")) and r.get("tokens_per_s_per_device"):
                seg.world_size = int(round(r["tokens_per_s"] / r["tokens_per_s_per_device"]))
        seg.last_step, seg.elapsed_end = r["step"], r["elapsed_s"]
        seg.records += 1
        prev = r
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


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------- the numbers


def _median(recs: list[dict], key: str) -> float | None:
    _, ys = _vals(recs, key)
    return float(np.median(ys)) if len(ys) else None


def model_description(cfg: dict | None) -> str:
    if not cfg:
        return "?"
    m = cfg.get("model", {})
    name = m.get("init_from") and f"{m['init_from']} (init_from)" or m.get("name", "?")
    kind = ""
    from flame.config import MODEL_PRESETS

    if m.get("name") in MODEL_PRESETS and not m.get("init_from"):
        kind = "llama preset"
    else:
        path = Path(m.get("init_from") or m.get("name", ""))
        cj = path / "config.json" if path.is_dir() else path
        if cj.suffix == ".json" and cj.is_file():
            try:
                kind = json.loads(cj.read_text()).get("model_type", "")
            except (OSError, ValueError, AttributeError):
                kind = ""
        elif ":" in str(m.get("name", "")):
            kind = "custom module"
    out = f"{name} ({kind})" if kind else name
    if m.get("overrides"):
        out += " with " + ", ".join(f"{k}={v}" for k, v in m["overrides"].items())
    return out


def mixture(train: list[dict], evals: list[dict]) -> dict:
    key = (id(train), "mixture", id(evals))
    hit = _COLUMNS.get(key)
    if hit is not None and hit[0] is train:
        return hit[1]
    out = _mixture(train, evals)
    _COLUMNS[key] = (train, out, evals)
    return out


def _mixture(train: list[dict], evals: list[dict]) -> dict:
    """Per source: target and achieved shares (overall and per phase of constant targets), tokens,
    the last finite train loss, the last held-out loss and bits per byte."""
    names = source_names(train) + [n for n in source_names(evals) if n not in source_names(train)]
    if not names:
        return {}
    last = next((r for r in reversed(train) if r.get("sources")), {})
    out = {"sources": [], "phases": []}
    last_eval = next((r for r in reversed(evals) if r.get("sources")), {})
    for n in names:
        s = (last.get("sources") or {}).get(n, {})
        loss = next(
            (
                r["sources"][n]["loss"]
                for r in reversed(train)
                if _is_num((r.get("sources") or {}).get(n, {}).get("loss"))
            ),
            None,
        )
        ev = (last_eval.get("sources") or {}).get(n, {})
        out["sources"].append(
            {
                "name": n,
                "target_share": s.get("target_share"),
                "share": s.get("share"),
                "tokens_total": s.get("tokens_total"),
                "train_loss": loss,
                "eval_loss": ev.get("loss"),
                "eval_bpb": ev.get("bpb"),
            }
        )
    # phases: runs of records with the same target shares
    prev_totals = dict.fromkeys(names, 0)
    phase = None
    for r in train:
        src = r.get("sources") or {}
        if not src:
            continue
        targets = tuple(round(float(src.get(n, {}).get("target_share") or 0.0), 9) for n in names)
        if phase is None or phase["targets"] != targets:
            if phase is not None:
                prev_totals = phase["end_totals"]
            phase = {
                "targets": targets,
                "first_step": r["step"],
                "start_totals": dict(prev_totals),
                "end_totals": {},
            }
            out["phases"].append(phase)
        phase["last_step"] = r["step"]
        phase["end_totals"] = {n: int(src.get(n, {}).get("tokens_total") or 0) for n in names}
    for ph in out["phases"]:
        got = {n: ph["end_totals"][n] - ph["start_totals"][n] for n in names}
        total = sum(got.values()) or 1
        ph["achieved"] = tuple(got[n] / total for n in names)
        ph["tokens"] = tuple(got[n] for n in names)
    out["names"] = names
    return out


def summarize(run: Run) -> dict:
    """The headline numbers of a run, each computed from metrics.jsonl (and the checkpoints)."""
    t, e = run.train, run.evals
    last = t[-1] if t else {}
    first = t[0] if t else {}
    out: dict = {"label": run.label, "run_dir": str(run.run_dir), "model": model_description(run.config)}
    start = run.starts[-1] if run.starts else {}
    if _is_num(start.get("parameters")):
        out["parameters"], out["parameters_from"] = int(start["parameters"]), "start record"
    else:
        n = checkpoint_parameters(run)
        out["parameters"] = n
        out["parameters_from"] = f"checkpoint {run.checkpoints[-1]['path'].name}" if n is not None else None
    out["attention"] = last.get("attention")
    out["step"], out["total_steps"] = last.get("step"), last.get("total_steps")
    out["tokens"], out["epoch"] = last.get("tokens"), last.get("epoch")
    out["train_loss"] = last.get("loss")
    finite_evals = [r for r in e if _is_num(r.get("loss"))]
    le = e[-1] if e else {}
    out["eval_step"] = le.get("step")
    out["eval_loss"], out["eval_bpb"], out["eval_perplexity"] = (
        le.get("loss"),
        le.get("bpb"),
        le.get("perplexity"),
    )
    if finite_evals:
        best = min(finite_evals, key=lambda r: r["loss"])
        out["best_eval_loss"], out["best_eval_step"] = best["loss"], best["step"]
        with_bpb = [r for r in finite_evals if _is_num(r.get("bpb"))]
        if with_bpb:
            b = min(with_bpb, key=lambda r: r["bpb"])
            out["best_eval_bpb"], out["best_eval_bpb_step"] = b["bpb"], b["step"]
    out["training_time_s"] = last.get("elapsed_s")
    if run.starts and _is_num(run.starts[0].get("time")) and _is_num(last.get("time")):
        out["wall_clock_s"] = last["time"] - run.starts[0]["time"]  # from the first start, setup included
    elif _is_num(first.get("time")) and _is_num(first.get("elapsed_s")) and _is_num(last.get("time")):
        out["wall_clock_s"] = last["time"] - (first["time"] - first["elapsed_s"])
    out["restarts"] = max(0, len(run.segments) - 1)
    out["median_tokens_per_s"] = _median(t, "tokens_per_s")
    out["median_tokens_per_s_per_device"] = _median(t, "tokens_per_s_per_device")
    if _is_num(last.get("tokens")) and _is_num(last.get("elapsed_s")) and last["elapsed_s"] > 0:
        out["tokens_per_training_s"] = last["tokens"] / last["elapsed_s"]
    out["median_mfu"] = _median(t, "mfu")
    out["flops_per_token"], out["flops_source"] = last.get("flops_per_token"), last.get("flops_source")
    _, mems = _vals(t, "memory_gib")
    out["peak_memory_gib"] = float(mems.max()) if len(mems) else None
    out["median_data_wait"] = _median(t, "data_wait")
    out["bad_steps"] = last.get("bad_steps")
    out["data_skipped_steps"] = last.get("skipped_steps")
    out["world_sizes"] = [s.world_size for s in run.segments if s.records]
    out["mixture"] = mixture(t, e)
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for section, body in d.items():
        if isinstance(body, dict) and not prefix:
            for k, v in body.items():
                out[f"{section}.{k}"] = v
        else:
            out[f"{prefix}{section}"] = body
    return out


def config_diff(cfg: dict | None) -> list[tuple[str, object, object]]:
    """(key, default, value) of every setting that differs from flame's defaults; keys this flame
    does not know have the default None."""
    if not cfg:
        return []
    from flame.config import Config

    defaults = _flatten(Config().to_dict())
    mine = _flatten(cfg)
    return [(k, defaults.get(k), v) for k, v in mine.items() if k not in defaults or defaults[k] != v]


def checkpoint_config_changes(run: Run) -> list[tuple[str, str, object, object]]:
    """(checkpoint, key, its value, config.toml's value) where a kept checkpoint was saved with
    other settings than the run's latest start (e.g. a resume with a new lr)."""
    if not run.config:
        return []
    now = _flatten(run.config)
    out = []
    for c in run.checkpoints:
        saved = (c.get("state") or {}).get("config")
        if isinstance(saved, dict):
            for k, v in _flatten(saved).items():
                if k in now and now[k] != v:
                    out.append((c["path"].name, k, v, now[k]))
    return out


def data_plan(run: Run) -> list[dict]:
    """The phases of the run's data plan (`<run_dir>/data_plan.json`), [] when it has none."""
    try:
        plan = json.loads((run.run_dir / "data_plan.json").read_text())
    except (OSError, ValueError):
        return []
    phases = plan.get("phases") if isinstance(plan, dict) else None
    return [p for p in phases if isinstance(p, dict)] if isinstance(phases, list) else []


def data_stores(run: Run) -> list[dict]:
    """The stores the run read (training and held-out) with their manifests' fingerprints."""
    cfg = run.config or {}
    d, ev = cfg.get("data", {}), cfg.get("eval", {})
    rows: list[tuple[str, Path]] = []
    if d.get("streaming"):
        return [
            {
                "role": "train (streaming)",
                "path": ", ".join(d.get("inputs") or ["stdlib"]),
                "note": "no store",
            }
        ]
    phases = [ph.get("mix") for ph in d.get("phases") or [] if isinstance(ph, dict) and ph.get("mix")]
    if d.get("mix") or phases:
        from flame.data.mixture import parse_named_mix

        seen = set()
        for spec in [d["mix"]] if d.get("mix") else phases:
            try:
                parsed = parse_named_mix(spec)
            except ValueError as e:
                return [{"role": "train", "path": spec, "note": f"unreadable mixture: {e}"}]
            for name, path, w in parsed:
                if path not in seen:
                    seen.add(path)
                    share = f" ({w:.1%})" if d.get("mix") else ""
                    rows.append((f"mixture source {name}{share}", Path(path)))
    elif d.get("store"):
        rows.append(("train", Path(d["store"])))
    else:
        root = Path(d["cache_dir"]) if d.get("cache_dir") else run.run_dir / "data"
        for p in sorted(root.glob("store-*")):
            if (p / "manifest.json").is_file():
                rows.append(("train (prepared from data.inputs)", p))
    if ev.get("store"):
        rows.append(("held-out", Path(ev["store"])))
    else:
        for role, p in list(rows):
            if (p / "val" / "manifest.json").is_file():
                rows.append((f"held-out of {role.split(' (')[0]}", p / "val"))
    latest = next((c["state"] for c in reversed(run.checkpoints) if c.get("state")), None) or {}
    saved = str((latest.get("data") or {}).get("fingerprint", "")).split("|")
    out = []
    for role, p in rows:
        row = {"role": role, "path": str(p)}
        if not (p / "manifest.json").is_file():
            row["note"] = "not found from here (a relative path is relative to where the run started)"
            out.append(row)
            continue
        try:
            from flame.data.store import TokenStore

            s = TokenStore(p, verify=False)
            tok = s.manifest.get("tokenizer", {})
            row.update(
                fingerprint=s.fingerprint(),
                tokens=s.num_tokens,
                documents=s.num_documents,
                shards=len(s.shards),
                dtype=str(s.dtype),
                tokenizer=f"{tok.get('spec', '?')} ({tok.get('vocab_size', '?')} tokens, "
                f"fingerprint {str(tok.get('fingerprint', '?'))[:12]})",
            )
            if latest and not role.startswith("held-out"):
                row["checkpoint"] = "matches" if row["fingerprint"] in saved else "differs"
        except Exception as e:  # a damaged store: say so, the report still gets made
            row["note"] = f"unreadable: {getattr(e, 'message', e)}"
        out.append(row)
    return out


# ---------------------------------------------------------------- formatting


def _dur(s) -> str:
    if not _is_num(s):
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def _f(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.{digits - 1}e}"
    return str(v)


def _si(v) -> str:
    if not _is_num(v):
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def _value(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "(not set)" if v is None else str(v)


def headline_rows(s: dict) -> list[tuple[str, str]]:
    """The headline as (label, text) rows."""
    rows = [("model", s["model"])]
    if s.get("parameters") is not None:
        rows.append(
            ("parameters", f"{s['parameters']:,} ({_si(s['parameters'])}; from the {s['parameters_from']})")
        )
    else:
        rows.append(("parameters", "- (no start record or checkpoint holds them)"))
    rows.append(("attention", s.get("attention") or "-"))
    rows.append(("steps", f"{_f(s['step'])} of {_f(s['total_steps'])}"))
    rows.append(("tokens", f"{_f(s['tokens'])} ({_si(s['tokens'])}; {_f(s['epoch'], 3)} epochs)"))
    mx = s.get("mixture") or {}
    if mx:
        parts = [
            f"{x['name']} {_pct(x['target_share'])} target / {_pct(x['share'])} achieved"
            for x in mx["sources"]
        ]
        rows.append(("mixture", "; ".join(parts)))
    seg_note = f"{s['restarts'] + 1} segment(s), {s['restarts']} restart(s)"
    rows.append(
        (
            "training time",
            f"{_dur(s['training_time_s'])} across {seg_note}; wall clock {_dur(s.get('wall_clock_s'))} "
            "from the first start to the last record",
        )
    )
    rows.append(("final train loss", f"{_f(s['train_loss'])} (step {_f(s['step'])})"))
    if s.get("eval_step") is not None:
        rows.append(
            (
                "final eval",
                f"loss {_f(s['eval_loss'])}, perplexity {_f(s['eval_perplexity'], 2)}, "
                f"{_f(s['eval_bpb'])} bits per byte (step {_f(s['eval_step'])})",
            )
        )
        best = f"loss {_f(s.get('best_eval_loss'))} (step {_f(s.get('best_eval_step'))})"
        if s.get("best_eval_bpb") is not None:
            best += f", {_f(s['best_eval_bpb'])} bits per byte (step {_f(s['best_eval_bpb_step'])})"
        rows.append(("best eval", best))
    else:
        rows.append(("eval", "- (no eval records: see --eval.interval)"))
    rows.append(
        (
            "throughput",
            f"{_int(s['median_tokens_per_s'])} tokens/s median of records "
            f"({_int(s['median_tokens_per_s_per_device'])} per device); "
            f"{_int(s.get('tokens_per_training_s'))} tokens/s over the whole training time",
        )
    )
    fl = f"{_si(s['flops_per_token'])} FLOPs/token ({s['flops_source'] or '?'})"
    if s.get("median_mfu") is not None:
        rows.append(("MFU", f"{s['median_mfu'] * 100:.2f}% median of records; {fl}"))
    else:
        rows.append(("MFU", f"- (peak FLOP/s of the device unknown: --log.peak_flops); {fl}"))
    rows.append(("peak memory", f"{_f(s['peak_memory_gib'], 3)} GiB"))
    rows.append(("data wait", f"{_pct(s['median_data_wait'])} of the time (median of records)"))
    rows.append(("skipped steps", f"{_f(s['bad_steps'])} (NaN / spike guard)"))
    if s.get("data_skipped_steps"):
        rows.append(
            ("data skipped", f"{_f(s['data_skipped_steps'])} steps consumed without training (data.skip)")
        )
    ws = sorted({w for w in s["world_sizes"] if w})
    rows.append(("processes", ", ".join(map(str, ws)) if ws else "-"))
    return rows


def headline_cards(s: dict) -> list[tuple[str, str, str]]:
    """The few numbers a reader looks for first: (label, value, note)."""
    cards = [("final train loss", _f(s["train_loss"]), f"step {_f(s['step'])}")]
    if s.get("eval_step") is not None:
        cards.append(("final eval loss", _f(s["eval_loss"]), f"step {_f(s['eval_step'])}"))
        if s.get("eval_bpb") is not None:
            cards.append(("eval bits per byte", _f(s["eval_bpb"]), f"best {_f(s.get('best_eval_bpb'))}"))
    cards.append(("tokens", _si(s["tokens"]), f"{_f(s['step'])} of {_f(s['total_steps'])} steps"))
    cards.append(("training time", _dur(s["training_time_s"]), f"{s['restarts']} restart(s)"))
    cards.append(("tokens / s", _si(s["median_tokens_per_s"]), "median of records"))
    if s.get("median_mfu") is not None:
        cards.append(("MFU", f"{s['median_mfu'] * 100:.1f}%", f"FLOPs: {s['flops_source']}"))
    return cards


def _int(v) -> str:
    return f"{v:,.0f}" if _is_num(v) else "-"


def _pct(v) -> str:
    return f"{v * 100:.2f}%" if _is_num(v) else "-"


# ---------------------------------------------------------------- figures


@dataclass
class Figure:
    name: str
    title: str
    png: bytes
    caption: str = ""


FIG_W, FIG_H, DPI = 8.0, 3.2, 100  # 800 x 320 pixels


def _xs(train: list[dict], recs: list[dict], x: str) -> np.ndarray:
    steps = np.array([r["step"] for r in recs], dtype=np.float64)
    if x == "step":
        return steps
    ts = np.array([r["step"] for r in train], dtype=np.float64)
    tk = np.array([r.get("tokens") or 0 for r in train], dtype=np.float64)
    if all(_is_num(r.get("tokens")) for r in recs) and recs and recs[0].get("kind") == "train":
        return np.array([r["tokens"] for r in recs], dtype=np.float64)
    return np.interp(steps, ts, tk) if len(ts) else steps


_NAN = float("nan")
_COLUMNS: dict = {}  # (id of a record list, key, source field) -> (indices, values)


def _vals(recs: list[dict], key, sub: tuple[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the records holding a finite number under `key` (or sources[name][field]),
    those numbers); computed once per record list."""
    cache_key = (id(recs), key, sub)
    hit = _COLUMNS.get(cache_key)
    if hit is not None and hit[0] is recs:
        return hit[1], hit[2]
    if sub:
        name, fld = sub
        raw = (((r.get("sources") or {}).get(name) or {}).get(fld) for r in recs)
    else:
        raw = (r.get(key) for r in recs)
    num = (int, float)
    ys = np.fromiter((v if type(v) in num else _NAN for v in raw), dtype=np.float64, count=len(recs))
    idx = np.flatnonzero(np.isfinite(ys))
    _COLUMNS[cache_key] = (recs, idx, ys[idx])  # the list is kept so its id is never reused
    return idx, ys[idx]


def _to_x(run: Run, step: float, x: str) -> float:
    if x == "step" or not run.train:
        return step
    ts = np.array([r["step"] for r in run.train], dtype=np.float64)
    tk = np.array([r.get("tokens") or 0 for r in run.train], dtype=np.float64)
    return float(np.interp(step, ts, tk))


def restart_steps(run: Run) -> list[float]:
    """Where each restart sits on the step axis: the step resumed at when recorded, else just
    after the previous segment's last record."""
    out = []
    for seg in run.segments[1:]:
        if seg.resume_step is not None:
            out.append(float(seg.resume_step))
        else:
            prev = [s.last_step for s in run.segments[: seg.index] if s.last_step is not None]
            if prev:
                out.append(float(prev[-1]))
    return out


def bad_step_marks(run: Run) -> list[int]:
    """Train record steps whose window had updates skipped (bad_steps went up)."""
    out, prev = [], 0
    for r in run.train:
        b = r.get("bad_steps")
        if _is_num(b):
            if b > prev:
                out.append(r["step"])
            prev = b
    return out


def _auto_window(n: int, smooth_window: int | None) -> int:
    if smooth_window is not None:
        return smooth_window
    return max(1, round(n / 100)) if n >= 200 else 1


def _log_helps(ys: np.ndarray, ratio: float) -> bool:
    ys = ys[np.isfinite(ys)]
    return len(ys) > 1 and ys.min() > 0 and ys.max() / ys.min() > ratio


def make_figures(runs: list[Run], x: str = "step", smooth_window: int | None = None) -> list[Figure]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, FuncFormatter, MaxNLocator

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    many = len(runs) > 1
    figs: list[Figure] = []

    def new(title: str):
        fig, ax = plt.subplots(figsize=(FIG_W, FIG_H), dpi=DPI)
        # fixed margins: a layout engine would cost more than the drawing on long runs
        fig.subplots_adjust(left=0.085, right=0.985, top=0.9, bottom=0.15)
        ax.grid(True, alpha=0.3)
        ax.set_title(title, fontsize="medium", loc="left")
        ax.set_xlabel("step" if x == "step" else "tokens seen")
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return fig, ax

    def marks(ax, handles: dict, bad: bool = False) -> None:
        for i, run in enumerate(runs):
            for k, s in enumerate(restart_steps(run)):
                line = ax.axvline(
                    _to_x(run, s, x),
                    color=colors[i % len(colors)] if many else "0.45",
                    lw=1.0,
                    ls="--",
                    alpha=0.8,
                    zorder=1,
                )
                if k == 0:
                    handles.setdefault("restart", line)
            if bad:
                steps = bad_step_marks(run)
                if steps:
                    xs = [_to_x(run, s, x) for s in steps]
                    trans = ax.get_xaxis_transform()
                    (pts,) = ax.plot(
                        xs, [0.03] * len(xs), "x", color="crimson", ms=6, mew=1.5, transform=trans, zorder=5
                    )
                    handles.setdefault("skipped step(s)", pts)

    def finish(fig, ax, name: str, title: str, handles: dict, caption: str = "") -> None:
        if handles:
            ax.legend(list(handles.values()), list(handles), fontsize="small", loc="best", framealpha=0.85)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        plt.close(fig)
        figs.append(Figure(name, title, buf.getvalue(), caption))

    def series(
        name: str,
        title: str,
        key: str,
        *,
        log_ratio: float = 0.0,
        from_zero: bool = False,
        smooth_it: bool = True,
        evals: bool = False,
        scale: float = 1.0,
        bad: bool = False,
        ylabel: str = "",
        caption: str = "",
    ) -> None:
        if not any(_vals(r.train, key)[0].size for r in runs) and not (evals and any(r.evals for r in runs)):
            return
        fig, ax = new(title)
        handles: dict = {}
        ally = []
        for i, run in enumerate(runs):
            color, style = colors[i % len(colors)], run_style(i)
            tag = f"{run.label} " if many else ""
            idx, ys = _vals(run.train, key)
            if len(idx):
                xs = _xs(run.train, run.train, x)[idx]
                ys = ys * scale
                ally.append(ys)
                w = _auto_window(len(ys), smooth_window) if smooth_it else 1
                if w > 1:
                    ax.plot(
                        *thin(xs, ys), color=color, alpha=0.25, lw=0.8, ls=style["ls"], zorder=style["zorder"]
                    )
                    (line,) = ax.plot(*thin(xs, smooth(ys, w)), color=color, **style)
                    handles.setdefault(
                        f"{tag}train (mean of {w})" if key == "loss" else f"{tag}mean of {w} records", line
                    )
                else:
                    (line,) = ax.plot(*thin(xs, ys), color=color, **style)
                    if many or key == "loss":  # one run's only curve needs no legend entry
                        handles.setdefault(f"{tag}train" if key == "loss" else run.label, line)
            if evals and run.evals:
                eidx, ey = _vals(run.evals, key)
                if len(eidx):
                    ally.append(ey * scale)
                    (line,) = ax.plot(
                        _xs(run.train, run.evals, x)[eidx],
                        ey * scale,
                        color=color,
                        ls=":",
                        lw=1.0,
                        marker=EVAL_MARKERS[i % len(EVAL_MARKERS)],
                        ms=4,
                        mfc="none" if i else color,
                        zorder=style["zorder"] + 0.5,
                    )
                    handles.setdefault(f"{tag}eval", line)
        if ally and log_ratio and _log_helps(np.concatenate(ally), log_ratio):
            ax.set_yscale("log")
            ax.set_title(title + " (log scale)", fontsize="medium", loc="left")
        elif from_zero and ally:
            top = max((float(np.nanmax(a)) for a in ally if np.isfinite(a).any()), default=1.0)
            ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)  # a flat line stays inside the frame
        if ylabel:
            ax.set_ylabel(ylabel)
        if key == "lr":  # plain ticks (0.0025): an offset text would collide with the title
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
        marks(ax, handles, bad)
        finish(fig, ax, name, title, handles, caption)

    series(
        "loss",
        "loss",
        "loss",
        log_ratio=3.0,
        evals=True,
        bad=True,
        caption="train: the loss of each log window (with a moving mean when there are many); "
        "eval: held-out loss",
    )
    if any(_vals(r.evals, "bpb")[0].size for r in runs):
        fig, ax = new("held-out bits per byte")
        handles = {}
        for i, run in enumerate(runs):
            idx, ys = _vals(run.evals, "bpb")
            if len(idx):
                (line,) = ax.plot(
                    _xs(run.train, run.evals, x)[idx],
                    ys,
                    color=colors[i % len(colors)],
                    marker=EVAL_MARKERS[i % len(EVAL_MARKERS)],
                    ms=4,
                    **run_style(i),
                )
                handles.setdefault(run.label if many else "eval", line)
        marks(ax, handles)
        finish(fig, ax, "bpb", "held-out bits per byte", handles)
    for i, run in enumerate(runs):
        mx = mixture(run.train, run.evals)
        if not mx:
            continue
        suffix = f" — {run.label}" if many else ""
        fig, ax = new("loss per source" + suffix)
        handles = {}
        for j, n in enumerate(mx["names"]):
            c = colors[(j + 1) % len(colors)]
            idx, ys = _vals(run.train, None, (n, "loss"))
            if len(idx):
                xs = _xs(run.train, run.train, x)[idx]
                w = _auto_window(len(ys), smooth_window)
                if w > 1:
                    ax.plot(*thin(xs, ys), color=c, alpha=0.25, lw=0.8)
                (line,) = ax.plot(*thin(xs, smooth(ys, w)), color=c, lw=1.4)
                handles.setdefault(f"{n} train", line)
            eidx, ey = _vals(run.evals, None, (n, "loss"))
            if len(eidx):
                (line,) = ax.plot(_xs(run.train, run.evals, x)[eidx], ey, color=c, ls=":", marker="s", ms=4)
                handles.setdefault(f"{n} eval", line)
        marks(ax, handles)
        finish(fig, ax, f"loss-per-source-{i}", "loss per source" + suffix, handles)
        fig, ax = new("mixture: achieved share of tokens so far (dotted: target)" + suffix)
        handles = {}
        for j, n in enumerate(mx["names"]):
            c = colors[(j + 1) % len(colors)]
            idx, ys = _vals(run.train, None, (n, "share"))
            if len(idx):
                (line,) = ax.plot(*thin(_xs(run.train, run.train, x)[idx], ys), color=c, lw=1.4)
                handles.setdefault(n, line)
            tidx, ty = _vals(run.train, None, (n, "target_share"))
            if len(tidx):
                ax.plot(*thin(_xs(run.train, run.train, x)[tidx], ty), color=c, lw=1.0, ls=":")
        ax.set_ylim(0, 1)
        marks(ax, handles)
        finish(fig, ax, f"mixture-{i}", "mixture share" + suffix, handles)
    series("lr", "learning rate", "lr", smooth_it=False)
    series("grad_norm", "gradient norm (before clipping)", "grad_norm", log_ratio=20.0, bad=True)
    series("tokens_per_s", "tokens / s (all processes)", "tokens_per_s", from_zero=True)
    if any(_vals(r.train, "mfu")[0].size for r in runs):
        series("mfu", "MFU (%)", "mfu", from_zero=True, scale=100.0)
    series("data_wait", "time waiting for data (%)", "data_wait", from_zero=True, scale=100.0)
    series("memory_gib", "peak memory (GiB)", "memory_gib", from_zero=True, smooth_it=False)
    return figs


# ---------------------------------------------------------------- the document


@dataclass
class Block:
    kind: str  # h2, p, kv, table, figures, details
    title: str = ""
    rows: list = field(default_factory=list)
    header: list = field(default_factory=list)
    text: str = ""
    figures: list = field(default_factory=list)
    anchor: str = ""


def build_blocks(runs: list[Run], summaries: list[dict], figures: list[Figure]) -> list[Block]:
    many = len(runs) > 1
    blocks: list[Block] = [Block("h2", "Summary", anchor="summary")]
    if many:
        rows_by_run = [headline_rows(s) for s in summaries]
        labels = [label for label, _ in rows_by_run[0]]
        for rs in rows_by_run[1:]:
            labels += [lab for lab, _ in rs if lab not in labels]
        table = []
        for lab in labels:
            table.append([lab] + [dict(rs).get(lab, "-") for rs in rows_by_run])
        blocks.append(Block("table", header=[""] + [r.label for r in runs], rows=table))
    else:
        blocks.append(Block("cards", rows=headline_cards(summaries[0])))
        blocks.append(Block("kv", rows=headline_rows(summaries[0])))
    blocks.append(Block("h2", "Curves", anchor="curves"))
    if figures:
        blocks.append(Block("figures", figures=figures))
    blocks.append(
        Block(
            "p",
            text="Dashed vertical lines: restarts. Red crosses: log windows in which the NaN / spike "
            "guard skipped updates. A faint line under a curve is the raw record; the solid one its "
            "moving mean.",
        )
    )
    blocks.append(Block("h2", "Restarts", anchor="restarts"))
    for run in runs:
        rows = []
        for seg in run.segments:
            rows.append(
                [
                    str(seg.index + 1),
                    "-" if seg.resume_step is None else f"{seg.resume_step:,}",
                    f"{_f(seg.first_step)} – {_f(seg.last_step)}"
                    if seg.records
                    else "no record (its work was lost)",
                    _dur(seg.elapsed_end),
                    _f(seg.world_size),
                    _dur(seg.lost_s) if seg.index else "-",
                    seg.found_by,
                ]
            )
        blocks.append(
            Block(
                "table",
                title=run.label if many else "",
                header=[
                    "segment",
                    "resumed at step",
                    "records (steps)",
                    "training time at its end",
                    "processes",
                    "wall time from the saved state to training again",
                    "found by",
                ],
                rows=rows,
            )
        )
    for run, s in zip(runs, summaries):
        mx = s.get("mixture") or {}
        if not mx:
            continue
        blocks.append(Block("h2", "Mixture" + (f" — {run.label}" if many else ""), anchor="mixture"))
        blocks.append(
            Block(
                "table",
                header=[
                    "source",
                    "target",
                    "achieved",
                    "tokens",
                    "last train loss",
                    "last eval loss",
                    "eval bits per byte",
                ],
                rows=[
                    [
                        x["name"],
                        _pct(x["target_share"]),
                        _pct(x["share"]),
                        _f(x["tokens_total"]),
                        _f(x["train_loss"]),
                        _f(x["eval_loss"]),
                        _f(x["eval_bpb"]),
                    ]
                    for x in mx["sources"]
                ],
            )
        )
        plan = data_plan(run)
        if plan:
            blocks.append(
                Block(
                    "table",
                    title="the data plan (data_plan.json)",
                    header=["phase", "from step", "mixture", "origin"],
                    rows=[
                        [
                            str(i + 1),
                            _f(ph.get("start_step")),
                            str(ph.get("mix", "-")),
                            str(ph.get("origin") or "config"),
                        ]
                        for i, ph in enumerate(plan)
                    ],
                )
            )
        if len(mx["phases"]) > 1:
            rows = []
            for k, ph in enumerate(mx["phases"]):
                for j, n in enumerate(mx["names"]):
                    rows.append(
                        [
                            str(k + 1),
                            f"{ph['first_step']:,} – {ph['last_step']:,}",
                            n,
                            _pct(ph["targets"][j]),
                            _pct(ph["achieved"][j]),
                            _f(ph["tokens"][j]),
                        ]
                    )
            blocks.append(
                Block(
                    "table",
                    title="per phase (records with the same target shares)",
                    header=["phase", "records (steps)", "source", "target", "achieved in phase", "tokens"],
                    rows=rows,
                )
            )
    blocks.append(Block("h2", "Configuration", anchor="config"))
    for run in runs:
        tag = f"{run.label}: " if many else ""
        if run.config is None:
            blocks.append(Block("p", text=f"{tag}no readable config.toml in {run.run_dir}."))
            continue
        diff = config_diff(run.config)
        blocks.append(
            Block(
                "table",
                title=f"{tag}settings that differ from flame's defaults",
                header=["setting", "default", "this run"],
                rows=[
                    [k, "(not an option of this flame)" if d is None else _value(d), _value(v)]
                    for k, d, v in diff
                ],
            )
        )
        changes = checkpoint_config_changes(run)
        if changes:
            blocks.append(
                Block(
                    "table",
                    title=f"{tag}settings of kept checkpoints that differ from the latest start",
                    header=["checkpoint", "setting", "saved with", "latest start"],
                    rows=[[c, k, _value(a), _value(b)] for c, k, a, b in changes],
                )
            )
        blocks.append(Block("details", title=f"{tag}the full config.toml", text=run.config_text))
    blocks.append(Block("h2", "Environment", anchor="environment"))
    for run in runs:
        tag = f"{run.label}: " if many else ""
        if run.starts:
            rows = []
            for k, st in enumerate(run.starts):
                v = st.get("versions") or {}
                rows.append(
                    [
                        str(k + 1),
                        _f(st.get("step")),
                        _f(st.get("world_size")),
                        str(st.get("device_name") or st.get("device") or "-"),
                        str(st.get("strategy") or "-"),
                        ", ".join(f"{a} {b}" for a, b in v.items()) or "-",
                        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["time"]))
                        if _is_num(st.get("time"))
                        else "-",
                    ]
                )
            blocks.append(
                Block(
                    "table",
                    title=tag.rstrip(": "),
                    header=["start", "at step", "processes", "device", "strategy", "versions", "time"],
                    rows=rows,
                )
            )
        else:
            dev = ((run.config or {}).get("train") or {}).get("device", "?")
            ws = ", ".join(str(s.world_size) for s in run.segments if s.world_size) or "-"
            blocks.append(
                Block(
                    "p",
                    text=f"{tag}this run's records hold no start records, so the versions and devices it ran "
                    f"with are not known. train.device: {dev}; processes per segment (tokens/s over tokens/s "
                    f"per device): {ws}.",
                )
            )
    blocks.append(Block("h2", "Data", anchor="data"))
    for run in runs:
        tag = f"{run.label}: " if many else ""
        stores = data_stores(run)
        if not stores:
            blocks.append(Block("p", text=f"{tag}no store found for this run."))
            continue
        blocks.append(
            Block(
                "table",
                title=tag.rstrip(": "),
                header=[
                    "role",
                    "store",
                    "fingerprint",
                    "tokens",
                    "documents",
                    "shards",
                    "dtype",
                    "tokenizer",
                    "latest checkpoint",
                ],
                rows=[
                    [
                        r["role"],
                        r["path"],
                        r.get("fingerprint", r.get("note", "-")),
                        _f(r.get("tokens")),
                        _f(r.get("documents")),
                        _f(r.get("shards")),
                        r.get("dtype", "-"),
                        r.get("tokenizer", "-"),
                        r.get("checkpoint", "-"),
                    ]
                    for r in stores
                ],
            )
        )
    blocks.append(Block("h2", "Checkpoints", anchor="checkpoints"))
    for run in runs:
        tag = f"{run.label}: " if many else ""
        rows = []
        for c in run.checkpoints + run.abandoned:
            st = c.get("state") or {}
            rows.append(
                [
                    c["path"].name + (f" ({c['folder']}: another trajectory)" if c.get("folder") else ""),
                    _f(st.get("tokens")),
                    _dur(st.get("elapsed_s")),
                    _f(st.get("world_size")),
                    f"{c['bytes'] / 2**20:,.1f} MiB",
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["saved"]))
                    if _is_num(c.get("saved"))
                    else "-",
                    c["problem"] or "complete, sizes match",
                ]
            )
        if rows:
            blocks.append(
                Block(
                    "table",
                    title=tag.rstrip(": "),
                    header=["checkpoint", "tokens", "training time", "processes", "size", "saved", "state"],
                    rows=rows,
                )
            )
        else:
            blocks.append(Block("p", text=f"{tag}no checkpoint is kept in {run.run_dir / 'checkpoints'}."))
    return blocks


CSS = """
body{font:14px/1.45 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#1d232a;color:#fff;padding:18px 28px}header h1{margin:0;font-size:21px}
header p{margin:4px 0 0;color:#b8c0c8;font-size:13px}nav a{color:#9fd0ff;margin-right:14px;text-decoration:none}
main{padding:8px 28px 40px;max-width:1680px}h2{margin:26px 0 10px;font-size:17px;border-bottom:1px solid #d5d9de;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 6px;color:#4a5561}
table{border-collapse:collapse;background:#fff;margin:6px 0 12px;font-size:13px;box-shadow:0 1px 2px #0001}
th,td{border:1px solid #e1e4e8;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}table.kv td:first-child{font-weight:600;white-space:nowrap;color:#4a5561}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}
figure{margin:0;background:#fff;padding:6px;box-shadow:0 1px 2px #0001}figure img{width:100%;height:auto;display:block}
figcaption{font-size:12px;color:#5b6670;padding:2px 4px}
details{background:#fff;padding:6px 10px;margin:6px 0 12px;box-shadow:0 1px 2px #0001}
summary{cursor:pointer;font-weight:600}pre{font-size:12px;overflow:auto;margin:8px 0}
p.note{color:#4a5561;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0 14px}
.card{background:#fff;box-shadow:0 1px 2px #0002;padding:8px 14px;min-width:130px;border-top:3px solid #1f77b4}
.card .label{font-size:12px;color:#5b6670}.card .value{font-size:22px;font-weight:600}
.card .sub{font-size:11px;color:#7a848e}footer{color:#6b7580;font-size:12px;padding:0 28px 24px}
"""


def render_html(blocks: list[Block], title: str, subtitle: str, footer: str) -> str:
    e = html.escape
    nav = " ".join(f'<a href="#{b.anchor}">{e(b.title)}</a>' for b in blocks if b.kind == "h2" and b.anchor)
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>{e(title)}</h1><p>{e(subtitle)}</p><p><nav>{nav}</nav></p></header><main>",
    ]
    seen_anchor: set[str] = set()
    for b in blocks:
        if b.kind == "h2":
            aid = b.anchor if b.anchor and b.anchor not in seen_anchor else ""
            seen_anchor.add(b.anchor)
            out.append(f'<h2 id="{aid}">{e(b.title)}</h2>' if aid else f"<h2>{e(b.title)}</h2>")
        elif b.kind == "p":
            out.append(f'<p class="note">{e(b.text)}</p>')
        elif b.kind == "cards":
            out.append('<div class="cards">')
            out += [
                f'<div class="card"><div class="label">{e(a)}</div><div class="value">{e(v)}</div>'
                f'<div class="sub">{e(n)}</div></div>'
                for a, v, n in b.rows
            ]
            out.append("</div>")
        elif b.kind == "kv":
            out.append('<table class="kv">')
            out += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in b.rows]
            out.append("</table>")
        elif b.kind == "table":
            if b.title:
                out.append(f"<h3>{e(b.title)}</h3>")
            if not b.rows:
                out.append('<p class="note">none</p>')
                continue
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in b.rows]
            out.append("</table>")
        elif b.kind == "figures":
            out.append('<div class="grid">')
            for f in b.figures:
                data = base64.b64encode(f.png).decode("ascii")
                out.append(
                    f'<figure><img alt="{e(f.title)}" width="{int(FIG_W * DPI)}" height="{int(FIG_H * DPI)}" '
                    f'src="data:image/png;base64,{data}">'
                    + (f"<figcaption>{e(f.caption)}</figcaption>" if f.caption else "")
                    + "</figure>"
                )
            out.append("</div>")
        elif b.kind == "details":
            out.append(f"<details><summary>{e(b.title)}</summary><pre>{e(b.text)}</pre></details>")
    out.append(f"</main><footer>{e(footer)}</footer></body></html>")
    return "\n".join(out) + "\n"


def _md_cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], title: str, subtitle: str, footer: str, image_path) -> str:
    """Markdown of the blocks; `image_path(figure)` writes a figure's PNG and returns its link."""
    out = [f"# {title}", "", subtitle, ""]
    for b in blocks:
        if b.kind == "h2":
            out += [f"## {b.title}", ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind in ("kv", "table"):
            if b.title:
                out += [f"**{b.title}**", ""]
            header = b.header if b.kind == "table" else ["", ""]
            if not b.rows:
                out += ["none", ""]
                continue
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif b.kind == "figures":
            for f in b.figures:
                out += [f"![{f.title}]({image_path(f)})", ""]
        elif b.kind == "details":
            out += [
                f"<details><summary>{b.title}</summary>",
                "",
                "```toml",
                b.text.rstrip(),
                "```",
                "",
                "</details>",
                "",
            ]
    out += [f"_{footer}_", ""]
    return "\n".join(out)


def build_report(
    run_dirs: list[str | Path],
    out: str | Path | None = None,
    x: str = "step",
    smooth_window: int | None = None,
    title: str | None = None,
) -> Path:
    """Write the report of `run_dirs` to `out` (.html, or .md with PNGs beside it); returns its path."""
    if not run_dirs:
        raise FlameError("name at least one run directory")
    if x not in ("step", "tokens"):
        raise FlameError(f"--x {x!r}: choose step or tokens")
    if smooth_window is not None and smooth_window < 0:
        raise FlameError(f"--smooth {smooth_window}: give a number of records >= 0 (0 or 1 = off)")
    out = Path(out) if out else Path(run_dirs[0]) / "report.html"
    if out.is_dir():
        out = out / "report.html"
    elif not out.suffix:
        out = out.with_name(out.name + ".html")
    if out.suffix.lower() not in (".html", ".htm", ".md"):
        raise FlameError(f"cannot write {out}: a report is .html or .md", hint="end -o with .html or .md")
    labels = run_labels([str(d) for d in run_dirs])
    runs = [load_run(d, label) for d, label in zip(run_dirs, labels)]
    try:  # before the figures are drawn: an unwritable -o fails at once
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlameError(f"cannot write {out}: {e.strerror or e}", hint="choose another -o") from None
    summaries = [summarize(r) for r in runs]
    figures = make_figures(runs, x=x, smooth_window=smooth_window)
    blocks = build_blocks(runs, summaries, figures)
    from flame import __version__

    title = title or ("flame report: " + ", ".join(r.label for r in runs))
    subtitle = (
        f"{len(runs)} run(s): "
        + ", ".join(str(Path(d).resolve()) for d in run_dirs)
        + f" · made {time.strftime('%Y-%m-%d %H:%M')}"
    )
    footer = (
        f"Made by flame {__version__} from the run directories alone (metrics.jsonl, config.toml, "
        "checkpoints, store manifests). Medians are over the train records; the final train loss is "
        "the last record's (its log window)."
    )
    try:
        if out.suffix.lower() == ".md":
            stem = out.stem

            def image_path(f: Figure) -> str:
                p = out.with_name(f"{stem}-{f.name}.png")
                p.write_bytes(f.png)
                return p.name

            out.write_text(render_markdown(blocks, title, subtitle, footer, image_path), encoding="utf-8")
        else:
            out.write_text(render_html(blocks, title, subtitle, footer), encoding="utf-8")
    except OSError as e:
        raise FlameError(f"cannot write {out}: {e.strerror or e}", hint="choose another -o") from None
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flame report",
        description="A self-contained HTML (or Markdown) report of one run, or comparing several, "
        "from their run directories alone.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (their --train.run_dir)")
    p.add_argument(
        "-o",
        "--out",
        help="report.html, or report.md with PNGs beside it (default: <first RUN_DIR>/report.html)",
    )
    p.add_argument(
        "--x", choices=("step", "tokens"), default="step", help="x axis of the curves (default: step)"
    )
    p.add_argument(
        "--smooth",
        type=int,
        default=None,
        metavar="N",
        help="moving mean over N records for train curves (default: about 1/100 of the records from 200 records on; 0 = off)",
    )
    p.add_argument("--title", help="the page's title")
    return p


def cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    path = build_report(args.run_dirs, args.out, x=args.x, smooth_window=args.smooth, title=args.title)
    print(f"wrote {path}")
    return 0
