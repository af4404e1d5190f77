"""Checkpoints: sharded model/optimizer state via torch.distributed.checkpoint, plus the run's state.

A checkpoint is a directory `<run_dir>/checkpoints/step-NNNNNNNN`. It is written under a temporary
name and renamed into place; the file COMPLETE (sizes and checksums of every file) is written
last, so a crash during a save never yields a checkpoint that looks usable. Older checkpoints are
removed only after a newer one is complete. At resume the newest checkpoint that verifies is used;
a damaged one is reported and skipped.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from flame.errors import CheckpointError
from flame.files import file_checksum

# torch.distributed.checkpoint costs ~0.6 s of import (DTensor, sympy) that every run would pay
# before its first step; it loads at the first save or load instead. `dcp` stays this proxy (a
# test may patch its attributes); CheckpointException is a stand-in until DCP loads, and every path
# that can raise DCP's exception calls into DCP first, which puts the real class in its place.


class CheckpointException(BaseException):  # replaced by DCP's own on first use; never raised
    pass


def _dcp():
    global CheckpointException
    import torch.distributed.checkpoint as real
    from torch.distributed.checkpoint.api import CheckpointException

    return real


class _LazyDCP:
    def __getattr__(self, name: str):
        return getattr(_dcp(), name)


dcp = _LazyDCP()


def get_state_dict(*args, **kwargs):
    _dcp()
    from torch.distributed.checkpoint.state_dict import get_state_dict as real

    return real(*args, **kwargs)


def set_state_dict(*args, **kwargs):
    _dcp()
    from torch.distributed.checkpoint.state_dict import set_state_dict as real

    return real(*args, **kwargs)


def get_model_state_dict(*args, **kwargs):
    _dcp()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict as real

    return real(*args, **kwargs)


def StateDictOptions(**kwargs):  # noqa: N802 -- DCP's class, built lazily
    _dcp()
    from torch.distributed.checkpoint.state_dict import StateDictOptions as real

    return real(**kwargs)


# DCP works without a process group; its note saying so is noise for single-process runs.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

# 2: the run state is JSON (trainer.json) and RNG files load with weights_only=True: reading a
# checkpoint runs no pickle of flame's own (DCP's .metadata is still a pickle: see docs/resuming.md)
FORMAT_VERSION = 2
MARKER = "COMPLETE"
STATE_FILE = "trainer.json"
TRUST_NOTE = (
    "A checkpoint directory is code: torch.distributed.checkpoint reads its .metadata with pickle, "
    "so load only checkpoints you or someone you trust wrote."
)


def read_trainer_state(ckpt: Path) -> dict:
    """The run state saved with a checkpoint: trainer.json, or a format-1 trainer.pt read with
    weights_only=True (plain Python values only: a crafted file cannot run code)."""
    ckpt = Path(ckpt)
    try:
        if (ckpt / STATE_FILE).is_file():
            state = json.loads((ckpt / STATE_FILE).read_text())
        elif (ckpt / "trainer.pt").is_file():
            state = torch.load(ckpt / "trainer.pt", weights_only=True, map_location="cpu")
        else:
            raise CheckpointError(f"checkpoint {ckpt} has no {STATE_FILE}", hint="is it a flame checkpoint?")
    except CheckpointError:
        raise
    except Exception as e:  # malformed JSON, a pickle with objects weights_only refuses, unreadable
        raise CheckpointError(f"checkpoint {ckpt}: its run state is unreadable: {_last_line(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {ckpt}: its run state is not a JSON object")
    if int(state.get("format", 1)) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {ckpt} has format {state.get('format')}; this flame reads up to {FORMAT_VERSION}",
            hint="resume it with the newer flame that wrote it",
        )
    return state


def is_checkpoint_dir(path: Path) -> bool:
    path = Path(path)
    return (path / MARKER).is_file() and ((path / STATE_FILE).is_file() or (path / "trainer.pt").is_file())


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step-{step:08d}"


def step_of(path: Path) -> int | None:
    """The step of a `step-N` directory; None for any other name."""
    try:
        return int(Path(path).name.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [
        p
        for p in ckpt_root.glob("step-*")
        if p.is_dir() and (p / MARKER).is_file() and ".tmp" not in p.name and step_of(p) is not None
    ]
    return sorted(found, key=step_of)


def find_checkpoint(
    run_dir: str | Path, step: int | None = None, *, checksums: bool = False, log=None
) -> Path:
    """The checkpoint a command reads: RUN_DIR's newest intact one (or its step N), or RUN_DIR itself
    when it is a checkpoint directory. A damaged newest one is reported through `log` and skipped;
    a damaged step N, or none usable, is an error naming each and why."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"no such run directory '{run_dir}'")
    if is_checkpoint_dir(run_dir):
        if step is not None:
            raise CheckpointError(f"{run_dir} is a checkpoint directory; --step applies to a run directory")
        chosen = [run_dir]
    else:
        root = run_dir / "checkpoints"
        done = list_checkpoints(root)
        if not done:
            raise CheckpointError(
                f"{run_dir} has no complete checkpoint (looked in {root})",
                hint="train first (a run saves at the end and every --checkpoint.interval steps), "
                "or give the run directory of a run that saved one",
            )
        if step is None:
            chosen = done[::-1]
        else:
            chosen = [p for p in done if step_of(p) == step]
            if not chosen:
                have = ", ".join(str(step_of(p)) for p in done)
                raise CheckpointError(
                    f"{run_dir} has no complete checkpoint of step {step} (it has steps {have})"
                )
    path, rejected = _first_intact(chosen, checksums, log if len(chosen) > 1 else None)
    if path is not None:
        return path
    if len(chosen) == 1:
        raise CheckpointError(f"checkpoint {chosen[0]} cannot be used: {rejected[0].split(': ', 1)[1]}")
    raise CheckpointError(
        f"no checkpoint in {run_dir / 'checkpoints'} is usable:\n    " + "\n    ".join(rejected),
        hint="restore the files, or give a copy of the run that has an intact checkpoint",
    )


def _first_intact(candidates, checksums: bool, log) -> tuple[Path | None, list[str]]:
    """The first candidate that verifies, and 'name: problem' for each one before it that did not."""
    rejected = []
    for path in candidates:
        problem = verify(path, checksums)
        if problem is None:
            return path, rejected
        rejected.append(f"{path.name}: {problem}")
        if log is not None:
            log(f"warning: checkpoint {path} is damaged ({problem}); trying the previous one")
    return None, rejected


def checkpoint_covering(run_dir: str | Path, step: int) -> Path | None:
    """The earliest kept checkpoint at or after `step` (the settings of the process that trained that
    step, unless it died first), else the latest; None when the run has none."""
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    later = [c for c in found if step_of(c) >= step]
    return later[0] if later else (found[-1] if found else None)


def verify(path: Path, checksums: bool = True) -> str | None:
    """None when the checkpoint at `path` is intact, else what is wrong with it."""
    marker = path / MARKER
    if not marker.is_file():
        return "it is incomplete (no COMPLETE marker)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, OSError):
        return "its COMPLETE marker is unreadable"
    if not isinstance(files, dict) or not all(
        isinstance(m, dict) and isinstance(m.get("size"), int) for m in files.values()
    ):
        return "its COMPLETE marker is malformed"
    for name, meta in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"its COMPLETE marker names a file outside it ({name})"
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{name} has {f.stat().st_size} bytes, expected {meta['size']}"
        if checksums and meta.get("sha256") and file_checksum(f) != meta["sha256"]:
            return f"{name} fails its checksum"
    return None


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        return None


def _rng_state() -> dict:
    """RNG states as tensors and plain values only, so they load with weights_only=True."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _dist() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj):
    if dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


class Checkpointer:
    def __init__(
        self, run_dir: str | Path, keep: int, checksums: bool = True, log=print, async_save: bool = False
    ):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.checksums = checksums
        self.log = log
        self.async_save = async_save
        self._pending: dict | None = None  # a background save not yet sealed
        self._group = None  # gloo groups of their own: the background writer's collectives,
        self._control = None  # and the main thread's "has every rank finished writing?" votes
        self._verified: set[Path] = set()  # checked by find_latest: not hashed a second time on load

    def save(self, step: int, model, optimizer, trainer_state: dict, background: bool = False) -> Path:
        """Write a checkpoint of `step` on every rank; returns its directory.

        With `background` (and async_save on) the model and optimizer state are copied to host
        memory and written by a thread while training goes on; the checkpoint is sealed (COMPLETE
        marker, renamed into place, older ones pruned) by a later poll(), wait() or save() once
        every rank's write has finished. Until then it is a temporary directory that a resume
        ignores, as after a crash mid-save.
        """
        self.wait()
        rank, world = _dist()
        final = step_dir(self.root, step)
        made = None
        if rank == 0:
            tmp = final.with_name(final.name + f".tmp{os.getpid()}-{int(time.time())}")
            try:
                tmp.mkdir(parents=True, exist_ok=False)
                made = (tmp, None)
            except OSError as e:
                made = (tmp, f"cannot create checkpoint directory {tmp}: {e}")
        tmp, problem = _broadcast(made)  # the others wait for the directory, and fail with rank 0
        if problem:
            raise CheckpointError(problem)
        try:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            torch.save(_rng_state(), tmp / f"rng-{rank}.pt")
            if rank == 0:
                blob = json.dumps({**trainer_state, "format": FORMAT_VERSION, "world_size": world})
                (tmp / STATE_FILE).write_text(blob)
            state = {"model": model_sd, "optim": optim_sd}
            if background and self.async_save:
                future = dcp.async_save(
                    state, checkpoint_id=str(tmp / "state"), process_group=self._writer_group()
                )
                self._pending = {"future": future, "tmp": tmp, "final": final, "step": step}
                return final
            dcp.save(state, checkpoint_id=str(tmp / "state"))
        except (OSError, CheckpointException) as e:
            self._failed(step, tmp, e)
        self._finish(step, tmp, final)
        return final

    def _writer_group(self):
        if self._group is None and dist.is_initialized():  # collective: every rank's first background save
            self._group = dist.new_group(backend="gloo")
            self._control = dist.new_group(backend="gloo")
        return self._group

    def _all(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (never on the writer thread's group: its collectives
        run concurrently with ours)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._control)
        return bool(t.item())

    def _failed(self, step: int, tmp: Path, e: BaseException):
        if _dist()[0] == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        # DCP wraps the real error; its last line names it. A full disk often surfaces as a torn
        # write ("unexpected pos ..."): say what it is
        free = _free_bytes(self.root)
        if getattr(e, "errno", None) == errno.ENOSPC or (free is not None and free < 64 << 20):
            reason = f"no space left on device ({(free or 0) / 2**20:.1f} MiB free in {self.root}): {reason}"
        raise CheckpointError(
            f"saving the checkpoint of step {step} failed: {reason}",
            hint="earlier checkpoints are intact; free disk space or fix permissions of the run directory",
        ) from None

    def _finish(self, step: int, tmp: Path, final: Path) -> None:
        """Seal a fully written temporary checkpoint and move it into place (after every rank wrote)."""
        rank, _ = _dist()
        if dist.is_initialized():
            dist.barrier()
        try:
            if rank == 0:
                self._seal(tmp)
                if final.exists():  # a half-removed older copy of the same step
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self._fsync_dir(self.root)
                self._prune()
        except OSError as e:
            self._failed(step, tmp, e)
        if dist.is_initialized():
            dist.barrier()

    def poll(self) -> Path | None:
        """Seal a background save if every rank has finished writing it; returns its directory then.

        Cheap when nothing is pending; otherwise one tiny all-reduce (every rank must call it at
        the same step).
        """
        p = self._pending
        if p is None:
            return None
        return self.wait() if self._all(p["future"].done()) else None

    def wait(self) -> Path | None:
        """Wait for a background save to be written, then seal it; returns its directory (None if none)."""
        p, self._pending = self._pending, None
        if p is None:
            return None
        try:
            p["future"].result()
            ok = 1
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if isinstance(e, KeyboardInterrupt):
                raise
            ok, error = 0, e
        if not self._all(bool(ok)):  # one rank's failed write fails the checkpoint on every rank
            self._failed(
                p["step"], p["tmp"], error if not ok else RuntimeError("another rank's write failed")
            )
        self._finish(p["step"], p["tmp"], p["final"])
        self.log(f"saved checkpoint {p['final']} (written in the background)")
        return p["final"]

    def _seal(self, path: Path) -> None:
        files = {}
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            meta = {"size": f.stat().st_size}
            if self.checksums:
                meta["sha256"] = file_checksum(f)
            files[str(f.relative_to(path))] = meta
        tmp = path / (MARKER + ".tmp")
        with open(tmp, "w") as fh:
            json.dump({"files": files, "time": time.time()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path / MARKER)

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass

    def _prune(self) -> None:
        done = list_checkpoints(self.root)
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step-*.tmp*"):  # leftovers of saves that crashed
            shutil.rmtree(stale, ignore_errors=True)

    def find_latest(self) -> Path | None:
        """The newest checkpoint that verifies (rank 0 decides; every rank gets the answer).

        None when the run has no checkpoint. When it has some and none is usable, that is an
        error listing each and why: restarting from step 0 must be the user's choice
        (`--checkpoint.resume false`), never a silent one.
        """
        rank, _ = _dist()
        choice, rejected = None, []
        if rank == 0:
            path, rejected = _first_intact(reversed(list_checkpoints(self.root)), self.checksums, self.log)
            if path is not None:
                choice = str(path)
                self._verified.add(path)
            incomplete = [p for p in self.root.glob("step-*.tmp*")] if self.root.is_dir() else []
            if incomplete and choice is None and not list_checkpoints(self.root):
                self.log(f"warning: ignoring {len(incomplete)} incomplete checkpoint(s) in {self.root}")
        choice, rejected = _broadcast((choice, rejected))
        if choice is None and rejected:
            raise CheckpointError(
                f"no checkpoint in {self.root} is usable:\n    " + "\n    ".join(rejected),
                hint="restore the files, resume from a copy with --checkpoint.load PATH, or start over with "
                "--checkpoint.resume false (the damaged checkpoints are moved aside, not deleted)",
            )
        return Path(choice) if choice else None

    def set_aside_after(self, step: int) -> Path | None:
        """Move this run's checkpoints of steps after `step` into `checkpoints/abandoned-<time>/`.

        They belong to a trajectory the run no longer follows (a rewind with --checkpoint.load, or a
        restart with --checkpoint.resume false): left in place, the next automatic resume would
        continue that old trajectory, and pruning would count them and delete the new branch's
        checkpoints. Nothing is deleted. Returns the folder (on every rank), or None.
        """
        rank, _ = _dist()
        moved = None
        if rank == 0 and self.root.is_dir():
            later = [
                p
                for p in self.root.glob("step-*")
                if p.is_dir() and ".tmp" not in p.name and step_of(p) is not None and step_of(p) > step
            ]
            if later:
                dest = self.root / time.strftime("abandoned-%Y%m%d-%H%M%S")
                n = 0
                while dest.exists():
                    n += 1
                    dest = dest.with_name(dest.name.split("~")[0] + f"~{n}")
                dest.mkdir()
                for p in sorted(later):
                    os.replace(p, dest / p.name)
                self._fsync_dir(self.root)
                moved = str(dest)
        moved = _broadcast(moved)
        if moved:
            self.log(
                f"note: checkpoints after step {step} belong to another trajectory of this run; moved "
                f"them to {moved} (nothing deleted)"
            )
        return Path(moved) if moved else None

    def trainer_state(self, path: Path) -> dict:
        """The run state saved with a checkpoint (step, data position, config), verified first."""
        rank, _ = _dist()
        if not path.is_dir():
            what = "is a file, not a directory" if path.exists() else "does not exist"
            raise CheckpointError(
                f"checkpoint {path} {what}", hint="--checkpoint.load takes a step-N directory"
            )
        problem = verify(path, self.checksums) if rank == 0 and path not in self._verified else None
        problem = _broadcast(problem)
        if problem:
            raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
        return read_trainer_state(path)

    def load(self, path: Path, model, optimizer, trainer_state: dict | None = None) -> dict:
        """Restore model, optimizer and RNG in place; returns the trainer state (verified and read
        here unless the caller already did so with `trainer_state()`)."""
        rank, _ = _dist()
        if trainer_state is None:
            trainer_state = self.trainer_state(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        try:
            dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "state"))
        except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: {_last_line(e)}",
                hint="resume with the model settings it was saved with, or start a new run directory",
            ) from None
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        rng = path / f"rng-{rank}.pt"
        if rng.is_file():
            try:
                _set_rng_state(torch.load(rng, weights_only=True))
            except Exception as e:
                raise CheckpointError(
                    f"checkpoint {path}: {rng.name} is unreadable: {_last_line(e)}"
                ) from None
        return trainer_state


def full_model_state(model) -> dict:
    """The unsharded model state dict on CPU (gathered on every rank)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _last_line(e: BaseException) -> str:
    """The line of a DCP error that names the real problem (it wraps each rank's traceback)."""
    lines = str(e).strip().splitlines()
    return lines[-1][:300] if lines else type(e).__name__


def load_model_weights(path: Path, model, what: str = "this model") -> None:
    """Load only the model part of a checkpoint (for export, generate, evaluation); a checkpoint
    that does not fit `what` is a CheckpointError."""
    sd = get_model_state_dict(model)
    try:
        dcp.load({"model": sd}, checkpoint_id=str(path / "state"))
        model.load_state_dict(sd)
    except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
        raise CheckpointError(f"checkpoint {path} does not fit {what}: {_last_line(e)}") from None
