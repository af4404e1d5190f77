"""One writer per run directory, and refusing resumes that would silently change the run."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
from collections.abc import Iterable
from pathlib import Path

from flame.config import Config
from flame.errors import CheckpointError, ConfigError, FlameError
from flame.procs import pid_alive


class RunLock:
    """An flock on <run_dir>/.lock: released by the kernel when the process dies, so a stale
    lock left by a killed run is simply taken over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                owner = {}
            os.close(fd)
            who = f"process {owner.get('pid', '?')} on {owner.get('host', '?')}"
            raise FlameError(
                f"run directory {self.path.parent} is in use by {who}",
                hint="wait for it to finish, stop it, or choose another --train.run_dir",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self._fd = fd

    @classmethod
    def claim(cls, run_dir: Path) -> RunLock:
        """Create the run directory if needed and lock it, with a clear error when it cannot be."""
        run_dir = Path(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise FlameError(
                f"train.run_dir '{run_dir}' is a file, not a directory",
                hint="choose another --train.run_dir",
            ) from None
        except OSError as e:
            raise FlameError(
                f"cannot create train.run_dir '{run_dir}': {e.strerror or e}",
                hint="choose another --train.run_dir, or fix the permissions of its parent",
            ) from None
        lock = cls(run_dir)
        try:
            lock.acquire()
        except OSError as e:  # a read-only or full filesystem, a directory without write permission
            raise FlameError(
                f"cannot write to train.run_dir '{run_dir}': {e.strerror or e}",
                hint="a run writes its lock, metrics and checkpoints there: choose a writable --train.run_dir",
            ) from None
        return lock

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _held_elsewhere(self) -> bool:
        """Whether some process holds the lock: try a shared lock without waiting, release at once."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def holder(self) -> dict | None:
        """{"pid", "host"} of the live process that holds the lock, without taking it (for
        `flame status`); None when none does. Linux: the kernel's table of flock locks
        (/proc/locks) is the truth, the pid written in the file may be a dead run's."""
        try:
            st = os.stat(self.path)
            owner = json.loads(self.path.read_bytes() or b"{}")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        owner = owner if isinstance(owner, dict) else {}
        host = owner.get("host")
        if isinstance(host, str) and host and host != socket.gethostname():
            # another node's process: this host's lock table cannot see it, so only a probe of the
            # lock itself tells (flock on a shared filesystem); an unreleased lock means held there
            return {"pid": owner.get("pid"), "host": host} if self._held_elsewhere() else None
        inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        try:
            table = Path("/proc/locks").read_text()
        except OSError:  # not Linux: a process of that pid alive on this host is the best guess
            pid = owner.get("pid")
            if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
                return None
            return {"pid": pid, "host": owner.get("host")} if pid_alive(pid) else None
        for line in table.splitlines():
            f = line.split()  # "1: FLOCK  ADVISORY  WRITE 18972 fe:00:2678927 0 EOF"
            if len(f) >= 6 and f[1] == "FLOCK" and f[5] == inode:
                return {"pid": int(f[4]), "host": socket.gethostname()}
        return None


def stop_signals(names: Iterable[str]) -> list[signal.Signals]:
    """The signals that checkpoint and stop a run at the end of its step: train.preempt_signals,
    and always SIGINT, so Ctrl-C keeps the work done (a second Ctrl-C still exits at once)."""
    out: list[signal.Signals] = []
    for name in [*names, "SIGINT"]:
        sig = getattr(signal, name, None)
        if not isinstance(sig, signal.Signals):
            raise ConfigError(f"train.preempt_signals: unknown signal {name!r}")
        if sig not in out:
            out.append(sig)
    return out


class StopSignals:
    """While installed, the first of `signals` calls `on_first(name)` (the trainer checkpoints at
    the end of the step and stops); a second one exits at once with 128 + its number, as an
    uncaught signal would. `restore` puts the earlier handlers back (Ctrl-C interrupts again); as a
    context manager it installs on entry and restores on exit."""

    def __init__(self, signals: list[signal.Signals], on_first) -> None:
        self.signals = signals
        self.on_first = on_first
        self.seen = 0
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.seen += 1
        if self.seen > 1:
            raise SystemExit(128 + signum)  # a second signal: leave at once
        self.on_first(signal.Signals(signum).name)

    def install(self) -> StopSignals:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        previous, self._previous = self._previous, {}
        for sig, old in previous.items():
            signal.signal(sig, old)

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


def _get(d: dict, key: str):
    section, _, name = key.partition(".")
    return d.get(section, {}).get(name)


def check_resume_compatible(saved: dict, cfg: Config, frozen: tuple[str, ...]) -> list[str]:
    """Refuse a resume whose settings would change the data order or the model; list harmless changes."""
    from flame.runs import absolute_paths

    now = absolute_paths(cfg.to_dict())
    saved = absolute_paths(saved) if saved else saved  # a run saved before paths were made absolute
    changed = [k for k in frozen if saved and _get(saved, k) != _get(now, k)]
    if changed and not cfg.checkpoint.allow_config_change:
        lines = [f"{k}: {_get(saved, k)!r} in the checkpoint, {_get(now, k)!r} now" for k in changed]
        raise CheckpointError(
            "resuming would change the data order or the model:\n    " + "\n    ".join(lines),
            hint="resume with the checkpoint's settings, start a new --train.run_dir, "
            "or pass --checkpoint.allow_config_change true",
        )
    notes = [f"warning: resuming with changed {k} (allowed)" for k in changed]
    for section, body in now.items():
        for k, v in body.items():
            key = f"{section}.{k}"
            if key not in frozen and saved and key != "checkpoint.load" and _get(saved, key) != v:
                notes.append(f"note: {key} changed since the checkpoint: {_get(saved, key)!r} -> {v!r}")
    return notes
