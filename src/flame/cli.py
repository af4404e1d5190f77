"""`flame train | resume | status | prepare | plot | report | check | export | inspect | generate` —
thin wrappers over the library."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flame.errors import ConfigError, FlameError

if TYPE_CHECKING:
    from flame.config import Config

USAGE = """usage: flame <command> [options]

commands:
  train      train a model (no options: a tiny llama on Python's standard library, ~2 min on a CPU)
  resume     continue a run from its directory: flame resume RUN_DIR [--section.key VALUE ...]
  status     where a run stands: step, tokens, last checkpoint and metrics, a live process
  prepare    tokenize a corpus once into a store that training memory-maps
  plot       plot metrics of one or more runs to a PNG
  report     a self-contained HTML (or Markdown) report of one or more runs
  check      prove that a setup resumes exactly: train, stop, resume, compare
  export     write a checkpoint as a Hugging Face model directory
  inspect    show the exact batch a run trained on at a step
  generate   sample text from a run or an exported model

Options: a setting that is a config key is spelt --section.key VALUE in every command (flame prepare
--data.inputs ... --data.tokenizer ... --data.store STORE, then flame train --data.store STORE); a
command's own options, which no config key holds, are --kebab-case (--val-fraction, --world-size).
Older spellings (--input, --output, --text-field, ...) still work and print a note naming the new one.

`flame <command> --help` lists a command's options.
"""

TRAIN_USAGE = """usage: flame train [RUN_DIR] [--config FILE.toml] [--section.key VALUE ...]

Trains with the embedded defaults below, overridden by a TOML file, overridden by the command line. \
A run directory that has checkpoints resumes from the latest. \
Given an existing RUN_DIR first, it continues that run from its saved config.toml (as flame resume).
Multi-process: torchrun ... -m flame train.
"""

RESUME_USAGE = """usage: flame resume RUN_DIR [--section.key VALUE ...]

Continues the run in RUN_DIR from its latest checkpoint with the settings it saved (RUN_DIR/config.toml), \
changed by the options given, e.g. flame resume runs/x --train.max_steps 20000. \
Settings that would change the data order or the model are refused unless \
--checkpoint.allow_config_change true. A checkpoint.load or checkpoint.resume = false saved by an \
earlier start (a rewind, a restart) is not repeated unless given again. The options are those of \
flame train --help.
"""

# A rank other than 0 waits this long for rank 0 to report the same error before reporting its own.
RANK0_WAIT_S = 60.0


class UsageError(FlameError):
    """A command line that names no run or a wrong positional (exit code 2, as for config errors)."""

    exit_code = 2


def _width() -> int:
    return shutil.get_terminal_size((100, 24)).columns


def _wrap(text: str, width: int) -> str:
    """Wrap each line of a usage text to the terminal width, continuing under its text column."""
    import re

    out = []
    for line in text.splitlines():
        indent = line[: len(line) - len(line.lstrip())]
        # "  train      train a model" and "usage: flame train [...]": continue under the text
        table = re.match(r"\s+\S+\s{2,}|usage: flame \S+ ", line)
        wrapped = textwrap.wrap(
            line.strip(),
            width,
            initial_indent=indent,
            subsequent_indent=" " * len(table.group(0)) if table else indent,
            break_on_hyphens=False,
        )
        out.extend(wrapped or [""])
    return "\n".join(out)


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def train_config(argv: list[str], resume: bool = False) -> Config:
    """The Config of `flame train [RUN_DIR] ARGS` / `flame resume RUN_DIR ARGS`."""
    from flame.config import load_config, resume_config

    if argv and not argv[0].startswith("-"):
        run_dir = argv[0]
        if not (Path(run_dir) / "config.toml").is_file():
            what = "does not exist" if not Path(run_dir).exists() else "has no config.toml"
            raise UsageError(
                f"'{run_dir}' is not a run directory (it {what})",
                hint="to continue a run give the directory of one that started (its --train.run_dir); "
                "to start one, options look like --section.key value (flame train --help)",
            )
        return resume_config(run_dir, argv[1:])
    if resume:
        raise UsageError(
            "flame resume needs the run directory first", hint="flame resume RUN_DIR [--key value ...]"
        )
    return load_config(argv)


def _train(argv: list[str], resume: bool = False) -> int:
    if "-h" in argv or "--help" in argv:
        from flame.config import HELP_LEGEND, help_text

        width = _width()
        usage = RESUME_USAGE if resume else TRAIN_USAGE
        print(_wrap(usage + "\n" + HELP_LEGEND, width) + "\n\n" + help_text(width))
        return 0
    cfg = train_config(argv, resume)
    if _rank() == 0:
        from flame.config import summary

        # the trainer writes the whole resolved config there when the run starts
        full = Path(cfg.train.run_dir) / "config.toml"
        print(f"{summary(cfg, _width())}\nfull config: {full}", flush=True)
    from flame.trainer import run_training

    result = run_training(cfg)
    return 0 if result["stopped"] in ("done", "preempted") else 3


def _lazy(module: str):
    import importlib

    return importlib.import_module(module)


COMMANDS = {
    "train": _train,
    "resume": lambda a: _train(a, resume=True),
    "status": lambda a: _lazy("flame.status").cli(a),
    "prepare": lambda a: _lazy("flame.data.prepare").cli(a),
    "plot": lambda a: _lazy("flame.plot").cli(a),
    "report": lambda a: _lazy("flame.report").cli(a),
    "check": lambda a: _lazy("flame.check").cli(a),
    "export": lambda a: _lazy("flame.export").cli(a),
    "inspect": lambda a: _lazy("flame.inspect").cli(a),
    "generate": lambda a: _lazy("flame.inspect").generate_cli(a),
}


# ---------------------------------------------------------------- one error message for all ranks


def _error_store():
    """A key-value store every rank of this launch reaches, or None: torchrun's own (its agent
    hosts it at MASTER_ADDR:MASTER_PORT, up before any rank starts), else the process group's."""
    try:
        from datetime import timedelta

        import torch.distributed as dist

        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=timedelta(seconds=30),
            )
        if dist.is_available() and dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
    except Exception:  # no torch, no store: each rank decides alone
        return None
    return None


def _error_key() -> str:
    return f"flame/error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/rank0"


def _wait_for(store, key: str, seconds: float) -> str | None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if store.check([key]):
                return store.get(key).decode("utf-8", "replace")
        except Exception:
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def report_error(e: FlameError, rank: int, world: int, store=None, wait_s: float = RANK0_WAIT_S) -> None:
    """Print a user error once per launch, not once per rank.

    Rank 0 prints it, then tells the store. Another rank waits (up to wait_s) for rank 0's word:
    when rank 0 failed with the same message (or this rank only echoes rank 0's), it stays quiet;
    otherwise (only this rank failed, or differently) it prints its own, prefixed with its rank.
    A quiet rank still exits non-zero. Waiting also keeps torchrun from killing rank 0 (as it
    does when any rank exits) before rank 0 has printed."""
    lines = [f"error: {e.message}"] + ([f"  hint: {e.hint}"] if e.hint else [])
    echo = e.message.startswith("rank 0 stopped: ")  # parallel.on_main_rank's copy of rank 0's error
    if world > 1 and rank != 0:
        first = _wait_for(store, _error_key(), wait_s) if store is not None else None
        if echo or (first is not None and first == e.message):
            return
        if store is None and isinstance(e, ConfigError):
            return  # every rank reads the same config: rank 0 reports it
        lines = [f"[rank {rank}] {line}" for line in lines]
    print("\n".join(lines), file=sys.stderr, flush=True)
    if world > 1 and rank == 0 and store is not None:
        try:
            store.set(_error_key(), e.message)
        except Exception:
            pass


def _report(e: FlameError) -> None:
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    rank = _rank()
    store = _error_store() if world > 1 else None
    report_error(e, rank, world, store)


def _quiet_stdout() -> None:
    """After the reader of our stdout went away (`flame ... | head`): send the rest nowhere, so
    that the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, what a C tool killed by the closed pipe reports


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_wrap(USAGE, _width()))
        sys.stdout.flush()
        return 0
    if argv[0] in ("-V", "--version"):
        from flame import __version__

        print(f"flame {__version__}")
        return 0
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        import difflib

        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f" (did you mean `flame {close[0]}`?)" if close else ""
        print(f"error: unknown command '{argv[0]}'{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        code = int(cmd(argv[1:]) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return code
    except FlameError as e:
        _report(e)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
