"""The flight recorder: rank-0 console progress, metrics.jsonl, optional TensorBoard / W&B sinks.

metrics.jsonl holds one JSON object per logged step (kind "train") or evaluation (kind "eval").
On resume from step S, lines past S (logged after that checkpoint, about to be redone) are cut,
so the file keeps exactly one line per step, and tokens / elapsed continue from the checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from flame.config import LogConfig
from flame.records import read_records

# Dense bf16 peak FLOP/s of one device, by a substring of torch.cuda.get_device_name().
# Order matters: the first match wins, so more specific names come first.
PEAK_FLOPS = {
    "B200": 2250e12,
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def device_peak_flops(device: torch.device, configured: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the configured figure, a known GPU's, or None (unknown, e.g. CPU)."""
    if configured:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def fmt_duration(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Drop records past `last_step` (and any torn last line) so a resumed run continues cleanly.

    Returns the highest step the file held before (0 if none): what external sinks already saw.
    """
    if not path.is_file():
        return 0
    keep, seen = [], 0
    for rec in read_records(path):
        step = rec.get("step", 0)
        if not isinstance(step, int) or isinstance(step, bool):
            continue  # a line flame did not write (hand-edited, another tool): not a step of this run
        seen = max(seen, step)
        if step <= last_step:
            keep.append(json.dumps(rec) + "\n")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # the original stays as it was
        tmp.unlink(missing_ok=True)
        from flame.errors import FlameError

        raise FlameError(
            f"cannot rewrite {path} for the resume: {e.strerror or e}",
            hint="free disk space (it needs about the file's size again) or fix the run directory's permissions",
        ) from None
    return seen


class Console:
    """Plain lines, or a rich progress bar under them when stdout is a terminal.

    Both write to stdout, so `auto` asks whether stdout is a terminal: `flame train | tee log`
    or a batch scheduler's log file gets plain lines, never escape codes or a silent bar.
    """

    def __init__(self, mode: str, total: int, start: int = 0):
        self.mode = mode
        if mode == "auto":
            self.mode = "rich" if _is_tty(sys.stdout) else "plain"
        self.total = total
        self._progress = None
        if self.mode == "rich":
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._progress.add_task("train", total=total, completed=start, info="")
            self._progress.start()

    def print(self, msg: str) -> None:
        if self.mode == "off":
            return
        if self._progress is not None:
            self._progress.console.print(msg, highlight=False, markup=False, soft_wrap=True)
        else:
            print(msg, flush=True)

    def step(self, rec: dict) -> None:
        line = (
            f"step {rec['step']}/{rec['total_steps']} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"gnorm {rec['grad_norm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s"
            + (f" | mfu {rec['mfu'] * 100:.1f}%" if rec.get("mfu") is not None else "")
            + f" | {fmt_duration(rec['elapsed_s'])} elapsed | eta {fmt_duration(rec['eta_s'])}"
        )
        if self._progress is not None:
            # the line stays in the scrollback; the bar below it shows progress and ETA
            self._progress.console.print(line, highlight=False, markup=False, soft_wrap=True)
            info = f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['tokens_per_s']:,.0f} tok/s"
            self._progress.update(self._task, completed=rec["step"], info=info)
        elif self.mode != "off":
            print(line, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()  # restores the cursor, also when training failed
            self._progress = None


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class MetricsLogger:
    """Rank 0 writes; other ranks' calls are no-ops."""

    def __init__(
        self, cfg: LogConfig, run_dir: Path, is_main: bool, total_steps: int, resume_step: int, config: dict
    ):
        self.cfg = cfg
        self.is_main = is_main
        self.path = run_dir / "metrics.jsonl"
        self.console = Console(cfg.console if is_main else "off", total_steps, resume_step)
        self._file = None
        self._sinks: list = []
        if not is_main:
            return
        logged_before = truncate_jsonl(self.path, resume_step)
        self._file = open(self.path, "a")
        if cfg.tensorboard:
            self._sinks.append(_TensorBoard(run_dir / "tb", resume_step, config))
        if cfg.wandb != "off":
            self._sinks.append(_WandB(cfg, run_dir, config, resume_step, logged_before, self.console.print))

    def info(self, msg: str) -> None:
        if self.is_main:
            self.console.print(msg)

    def log(self, rec: dict) -> None:
        if not self.is_main:
            return
        rec = {**rec, "time": time.time()}
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if rec.get("kind") == "train":
            self.console.step(rec)
        else:
            self.console.print(
                f"eval @ step {rec['step']} | loss {rec['loss']:.4f} | ppl {rec['perplexity']:.2f}"
            )
        for s in self._sinks:
            s.log(rec)

    def close(self) -> None:
        """Idempotent: the trainer calls it at the end and again when it is torn down."""
        self.console.close()
        if self._file:
            self._file.close()
            self._file = None
        sinks, self._sinks = self._sinks, []
        for s in sinks:
            s.close()


def batch_digest(input_ids: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(input_ids.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]


class BatchLog:
    """Per rank: which global samples each micro-batch held, and a hash of its tokens."""

    def __init__(self, run_dir: Path, rank: int, resume_step: int):
        d = run_dir / "batches"
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"rank-{rank}.jsonl"
        truncate_jsonl(self.path, resume_step)
        self._f = open(self.path, "a")

    def write(self, step: int, micro: int, batch: dict) -> None:
        rec = {"step": step, "micro": micro, "sha": batch_digest(batch["input_ids"])}
        if "samples" in batch:
            rec["samples"] = [int(x) for x in batch["samples"]]
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# Fields of a record that are not sink scalars: its kind (the tag prefix), its step (the x axis),
# and its wall time (the sinks stamp their own).
_SINK_SKIP = ("kind", "step", "time")


def sink_scalars(rec: dict) -> dict[str, float]:
    """Every number of a metrics.jsonl record, as the TensorBoard / W&B tag `<kind>/<field>`.

    A per-source dict, `{"sources": {name: {field: x}}}`, gives `<kind>/<field>/<name>` (so
    `train/loss/web` sits next to `train/loss`); any other nested dict gives
    `<kind>/<field>/<key>`. Strings, booleans, None and lists are left out (None is what a record
    holds for a number it does not know, e.g. `mfu` without a peak); NaN and infinities are kept:
    both sinks store them, and a NaN loss is what a user most needs to see.
    """
    kind = rec.get("kind", "train")
    out: dict[str, float] = {}

    def add(tag: str, v) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                add(f"{tag}/{k}", x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[tag] = v

    for k, v in rec.items():
        if k in _SINK_SKIP:
            continue
        if k == "sources" and isinstance(v, dict):
            for name, fields in v.items():
                if isinstance(fields, dict):
                    for f, x in fields.items():
                        add(f"{kind}/{f}/{name}", x)
        else:
            add(f"{kind}/{k}", v)
    return out


class _TensorBoard:
    def __init__(self, path: Path, resume_step: int, config: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step makes readers drop earlier files' events from this step on, so a resumed
        # curve never doubles back -- also when the run restarts from step 0 (no checkpoint yet)
        self.w = SummaryWriter(str(path), purge_step=resume_step + 1)
        if config is not None:
            from flame.config import to_toml

            # the resolved config of this (re)start, at its first step: a resumed run shows the
            # config each segment trained with (a fenced block, so the text tab keeps its lines)
            self.w.add_text("config", f"```toml\n{to_toml(config)}```", global_step=resume_step + 1)

    def log(self, rec: dict) -> None:
        for tag, v in sink_scalars(rec).items():
            self.w.add_scalar(tag, v, rec["step"])
        self.w.flush()

    def close(self) -> None:
        self.w.close()


def _new_run_id() -> str:
    """A W&B run id (8 lowercase letters and digits), kept in <run_dir>/wandb_id across restarts."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class _WandB:
    """W&B keeps a resumed run's history and refuses steps that do not increase, so steps already
    sent before a crash (`logged_before`) are not sent again; W&B keeps the earlier values of
    those steps (metrics.jsonl and TensorBoard have the redone ones)."""

    def __init__(
        self, cfg: LogConfig, run_dir: Path, config: dict, resume_step: int, logged_before: int, say=print
    ):
        import wandb

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else _new_run_id()
        id_file.write_text(run_id)
        self.floor = logged_before
        if logged_before > resume_step:
            say(
                f"note: W&B already has steps {resume_step + 1}-{logged_before} from before the restart "
                "and keeps those values; metrics.jsonl and TensorBoard get the redone steps"
            )
        self.run = wandb.init(
            project=cfg.wandb_project,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=cfg.wandb,
            config=config,
        )

    def log(self, rec: dict) -> None:
        if rec["step"] > self.floor:
            self.run.log(sink_scalars(rec), step=rec["step"])

    def close(self) -> None:
        self.run.finish()
