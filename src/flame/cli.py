"""`flame train | prepare | plot | report | check | export | inspect | generate` — thin wrappers over the library."""

from __future__ import annotations

import os
import sys

from flame.errors import FlameError

USAGE = """usage: flame <command> [options]

commands:
  train      train a model (no options: a tiny llama on the Python standard library, ~2 min on a CPU)
  prepare    tokenize a corpus once into a store that training memory-maps
  plot       plot metrics of one or more runs to a PNG
  report     a self-contained HTML (or Markdown) report of one or more runs
  check      prove that a setup resumes exactly: train, stop, resume, compare
  export     write a checkpoint as a Hugging Face model directory
  inspect    show the exact batch a run trained on at a step
  generate   sample text from a run or an exported model

`flame <command> --help` lists a command's options.
"""

TRAIN_USAGE = """usage: flame train [--config FILE.toml] [--section.key VALUE ...]

Trains with the embedded defaults below, overridden by a TOML file, overridden by the command line.
A run directory that has checkpoints resumes from the latest. Multi-process: torchrun ... -m flame train.
Booleans take true/false (a bare --flag means true); lists take several values or a comma-separated one.

"""


def _train(argv: list[str]) -> int:
    from flame.config import help_text, load_config

    if "-h" in argv or "--help" in argv:
        print(TRAIN_USAGE + help_text())
        return 0
    cfg = load_config(argv)
    if int(os.environ.get("RANK", "0")) == 0:
        print("resolved config:\n" + cfg.to_toml(), flush=True)
    from flame.trainer import run_training

    result = run_training(cfg)
    return 0 if result["stopped"] in ("done", "preempted") else 3


def _lazy(module: str) -> int:
    import importlib

    return importlib.import_module(module)


COMMANDS = {
    "train": _train,
    "prepare": lambda a: _lazy("flame.data.prepare").cli(a),
    "plot": lambda a: _lazy("flame.plot").cli(a),
    "report": lambda a: _lazy("flame.report").cli(a),
    "check": lambda a: _lazy("flame.check").cli(a),
    "export": lambda a: _lazy("flame.export").cli(a),
    "inspect": lambda a: _lazy("flame.inspect").cli(a),
    "generate": lambda a: _lazy("flame.inspect").generate_cli(a),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
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
        return int(cmd(argv[1:]) or 0)
    except FlameError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
