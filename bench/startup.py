"""Start-up of `flame train`: what the imports cost, and the wall time from the command to the first step.

    .venv/bin/python bench/startup.py [--quick] [--runs 3] [--steps 3] [--src DIR]

`--src` measures another source tree of flame (e.g. `git archive HEAD src | tar -x -C /tmp/old`,
then `--src /tmp/old/src`) to compare before and after a change.

1. Imports: `python -X importtime -c "import flame.trainer"` (what every `flame train` pays before
   it reads its config), the largest cumulative costs, and whether the heavy optional modules are
   pulled in at import (they should load only when a run uses them).
2. Wall time: `python -m flame train` with the tiny default for a few steps, in a fresh run
   directory, `--runs` times (median). The times come from the run's own records: the start
   record of starts.jsonl (set-up done) and the first train record of metrics.jsonl (first step
   done, `--log.interval 1`), each minus the time the command was launched. One warm-up run first
   prepares the embedded corpus into the shared cache, so the runs measure start-up, not a prepare.

3. Beside it, a bare script in a fresh interpreter: `import torch, transformers`, build the same
   llama (the tiny preset's config), take one step (forward, cross-entropy, backward, AdamW) on a
   batch of the same shape, and stamp the time; flame's command -> first step over the bare
   script's command -> first step is the ratio (the floor: at most 1.1x).

A machine shared with other work inflates every figure; the table prints the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, md_table, median  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# modules a tiny CPU run needs only later, or never: each costs tenths of a second at import
HEAVY = (
    "torch.distributed.checkpoint",
    "torch.distributed.tensor",
    "torch._dynamo",
    "transformers",
    "transformers.masking_utils",
    "sympy",
    "datasets",
    "pyarrow",
    "torch.utils.tensorboard",
    "matplotlib",
)


SRC = ROOT / "src"


def _env() -> dict:
    src = str(SRC)
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{path}" if path else src, OMP_NUM_THREADS="1")


def import_times(module: str) -> dict[str, tuple[float, int]]:
    """{module: (cumulative seconds, nesting depth)} of one `import module` in a fresh interpreter."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        env=_env(),
        check=True,
    )
    out: dict[str, tuple[float, int]] = {}
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m and m[4] not in out:  # the first (outermost) import of a module is the one that paid
            out[m[4]] = (int(m[2]) / 1e6, len(m[3]) // 2)
    return out


def import_table(module: str, top: int) -> str:
    times = import_times(module)
    total = times.get(module, (float("nan"), 0))[0]
    ranked = sorted(
        ((s, name) for name, (s, depth) in times.items() if 1 <= depth <= 3 and name != module),
        reverse=True,
    )
    rows, shown = [], set()
    for s, name in ranked:
        if any(name.startswith(p + ".") for p in shown):  # a child of a row already shown
            continue
        rows.append([name, f"{s:.3f}"])
        shown.add(name)
        if len(rows) == top:
            break
    heavy = [[name, f"{times[name][0]:.3f}" if name in times else "not imported"] for name in HEAVY]
    return (
        f"`import {module}`: {total:.3f} s in all\n\n"
        + md_table(["largest cumulative imports", "s"], rows)
        + "\n\n"
        + md_table(["heavy module", f"s at `import {module}`"], heavy)
    )


def _first(path: Path, kind: str) -> dict | None:
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == kind:
            return rec
    return None


def one_run(steps: int, extra: list[str]) -> dict[str, float]:
    """Seconds from launching `flame train` to its start record, to its first step, and to its exit."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "flame", "train", "--train.run_dir", str(run)]
        cmd += ["--train.max_steps", str(steps), "--log.interval", "1", "--train.sample_tokens", "0"]
        t0 = time.time()
        r = subprocess.run(cmd + extra, capture_output=True, text=True, env=_env())
        end = time.time()
        if r.returncode != 0:
            raise SystemExit(f"flame train failed ({r.returncode}):\n{r.stderr[-3000:]}")
        start, first = _first(run / "starts.jsonl", "start"), _first(run / "metrics.jsonl", "train")
        return {
            "setup": start["time"] - t0,
            "first": first["time"] - t0,
            "step1": first["time"] - start["time"],
            "exit": end - t0,
        }


BARE = """
import json, sys, time
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
cfg = json.loads(sys.argv[1])
b, t = int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**cfg))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, cfg["vocab_size"], (b, t))
logits = model(input_ids=x).logits
F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
opt.step()
opt.zero_grad()
print(time.time())
"""


def bare_run() -> float:
    """Seconds from launching the bare script to its first step done."""
    from flame.config import Config
    from flame.model import PRESETS

    c = Config()
    cfg = dict(
        vocab_size=257,
        max_position_embeddings=max(c.data.context_len, 128),
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        attn_implementation="sdpa",
        **PRESETS[c.model.name],
    )
    cmd = [sys.executable, "-c", BARE, json.dumps(cfg), str(c.data.batch_size), str(c.data.context_len)]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if r.returncode != 0:
        raise SystemExit(f"the bare script failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return float(r.stdout.strip().splitlines()[-1]) - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 run of 2 steps")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=12, help="rows of the import table")
    ap.add_argument(
        "--src", type=Path, default=None, help="the flame source tree to measure (default: this one)"
    )
    a = ap.parse_args()
    global SRC
    if a.src is not None:
        SRC = a.src.resolve()
    runs, steps = (1, 2) if a.quick else (a.runs, a.steps)

    parts = [f"# flame start-up\n\n{machine()}; flame from {SRC}\n", import_table("flame.trainer", a.top)]

    one_run(1, [])  # warm-up: prepares (or finds) the embedded corpus in the shared cache
    results, bare = [], []
    for _ in range(runs):  # interleaved: both see the same machine load
        results.append(one_run(steps, []))
        bare.append(bare_run())
    rows = []
    for key, label in [
        ("setup", "command -> set-up done (start record)"),
        ("first", "command -> first step done (first train record)"),
        ("step1", "first step itself (first record - start record)"),
        ("exit", f"command -> exit ({steps} steps, final checkpoint)"),
    ]:
        xs = [r[key] for r in results]
        rows.append([label, f"{median(xs):.2f}", " ".join(f"{x:.2f}" for x in xs)])
    rows.append(
        ["bare script: command -> first step done", f"{median(bare):.2f}", " ".join(f"{x:.2f}" for x in bare)]
    )
    ratio = median([r["first"] for r in results]) / median(bare)
    parts.append(
        f"`flame train` (tiny default, {steps} steps, `--log.interval 1`), median of {runs}, beside the "
        "bare script (import torch + transformers, build the same llama, one step):\n\n"
        + md_table(["from the command", "median s", "runs"], rows)
        + f"\n\nflame's first step / the bare script's: **{ratio:.2f}x** (floor: <= 1.1x)"
    )
    load = os.getloadavg()[0]
    parts.append(f"load average at the end: {load:.1f}")
    name = "startup-quick" if a.quick else "startup"
    emit(name if a.src is None else f"{name}-{a.src.resolve().parent.name}", "\n\n".join(parts))


if __name__ == "__main__":
    main()
