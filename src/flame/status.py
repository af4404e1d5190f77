"""`flame status RUN_DIR`: where a run stands, read from its directory alone (nothing is locked,
written or verified): the step and tokens reached, the last checkpoint, the last metrics, whether a
live process holds the run, and whether it finished."""

from __future__ import annotations

import json
import sys
import time
import tomllib
from pathlib import Path

from flame.errors import FlameError
from flame.records import read_records

USAGE = """usage: flame status RUN_DIR [--json]

Where a run stands: the step and tokens reached, the last checkpoint (a resume starts there), the
last metrics line, whether a live process holds the run directory, and whether the run finished.
Reads the directory only. --json prints the same as one JSON object.
"""


def _saved_config(run_dir: Path) -> dict:
    try:
        return tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}


def run_status(run_dir: str | Path) -> dict:
    """The state of a run directory as a plain dict (what `flame status --json` prints)."""
    from flame.checkpoint import list_checkpoints, read_trainer_state, step_of
    from flame.runguard import RunLock

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FlameError(f"no such run directory '{run_dir}'", hint="give the --train.run_dir of a run")
    config = _saved_config(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not config and not metrics.is_file():
        raise FlameError(
            f"{run_dir} is not a flame run directory (no config.toml, no metrics.jsonl)",
            hint="give the --train.run_dir of a run",
        )
    last_train = last_eval = None
    for rec in read_records(metrics):
        if rec.get("kind") == "train":
            last_train = rec
        elif rec.get("kind") == "eval":
            last_eval = rec
    ckpt = None
    found = list_checkpoints(run_dir / "checkpoints")
    if found:
        path = found[-1]
        try:
            state = read_trainer_state(path)
        except FlameError as e:  # a damaged newest checkpoint: say so, a resume would skip it
            state = {"error": e.message}
        ckpt = {
            "step": step_of(path),
            "tokens": state.get("tokens"),
            "path": str(path),
            "time": (path / "COMPLETE").stat().st_mtime,
            **({"error": state["error"]} if "error" in state else {}),
        }
    train_cfg = config.get("train", {})
    total = (last_train or {}).get("total_steps") or train_cfg.get("max_steps") or None
    step = max((last_train or {}).get("step", 0), ckpt["step"] if ckpt else 0)
    tokens = (last_train or {}).get("tokens", 0)
    if ckpt and ckpt["step"] >= step and ckpt.get("tokens") is not None:
        tokens = ckpt["tokens"]
    last = None
    if last_train is not None:
        last = {k: last_train.get(k) for k in ("step", "loss", "lr", "tokens_per_s", "time")}
    return {
        "run_dir": str(run_dir),
        "step": step,
        "total_steps": total,
        "tokens": tokens,
        # the final checkpoint is written at the end: with it, a resume has nothing left to do
        "finished": bool(ckpt and total and ckpt["step"] >= total),
        "checkpoint": ckpt,
        "checkpoints": [step_of(p) for p in found],
        "last_metrics": last,
        "last_eval": None if last_eval is None else {k: last_eval.get(k) for k in ("step", "loss", "time")},
        "process": RunLock(run_dir).holder(),
        "starts": sum(1 for _ in read_records(run_dir / "starts.jsonl")),
        "config": str(run_dir / "config.toml") if config else None,
    }


def _when(t: float | None, now: float) -> str:
    if not isinstance(t, (int, float)):
        return "?"
    ago = max(0.0, now - t)
    rel = f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min" if ago < 7200 else f"{ago / 3600:.1f} h"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(t))} ({rel} ago)"


def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "?"


def format_status(s: dict, now: float | None = None) -> str:
    """`flame status` for a person: one line per fact."""
    now = time.time() if now is None else now
    total = f" of {s['total_steps']:,}" if s["total_steps"] else ""
    state = "finished" if s["finished"] else "running" if s["process"] else "stopped"
    lines = [
        f"run {s['run_dir']}: {state}",
        f"  step        {s['step']:,}{total}, {s['tokens']:,} tokens",
    ]
    c = s["checkpoint"]
    if c is None:
        lines.append("  checkpoint  none yet (a resume starts from step 0)")
    else:
        kept = ", ".join(str(x) for x in s["checkpoints"])
        lines.append(
            f"  checkpoint  step {c['step']:,}, saved {_when(c['time'], now)}: {c['path']} (kept: {kept})"
        )
        if c.get("error"):
            lines.append(f"              damaged: {c['error']}")
    m = s["last_metrics"]
    if m is None:
        lines.append("  metrics     none yet")
    else:
        lines.append(
            f"  metrics     step {m['step']:,}: loss {_num(m['loss'], '.4f')}, lr {_num(m['lr'], '.3g')}, "
            f"{_num(m['tokens_per_s'], ',.0f')} tok/s, at {_when(m['time'], now)}"
        )
    if s["last_eval"] is not None:
        e = s["last_eval"]
        lines.append(f"  eval        step {e['step']:,}: loss {_num(e['loss'], '.4f')}")
    p = s["process"]
    lines.append(
        f"  process     pid {p['pid']} on {p['host']} holds the run directory"
        if p
        else "  process     none holds the run directory"
    )
    if s["config"]:
        tail = "" if s["finished"] or p else f" (continue with `flame resume {s['run_dir']}`)"
        lines.append(f"  config      {s['config']}{tail}")
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    as_json = "--json" in argv
    rest = [a for a in argv if a != "--json"]
    if len(rest) != 1 or rest[0].startswith("-"):
        raise FlameError(
            "flame status takes one RUN_DIR" + (f" (got {' '.join(rest)})" if rest else ""),
            hint="flame status RUN_DIR [--json]",
        )
    s = run_status(rest[0])
    print(json.dumps(s) if as_json else format_status(s))
    sys.stdout.flush()
    return 0


__all__ = ["cli", "run_status", "format_status"]
