"""AdamW against Muon (optim.name = muon: Muon on the hidden matrices, AdamW on the rest), same
model and tokens, each at its best lr of a small sweep, on two corpora, side by side in one run.

    .venv/bin/python bench/optim.py [--quick] [--steps N]

The model is this machine's default (the `tiny` llama preset, byte tokenizer, data.context_len
256 x data.batch_size 16, fp32 on CPU); every run sees the same batches in the same order (data
seed and train seed fixed) and differs only in the optimizer. Corpora (no download):
  - stdlib: the embedded default corpus (this interpreter's top-level standard library .py files)
  - prose: Python's reference documentation text (pydoc_data.topics: English prose with snippets),
    which is not part of the embedded corpus
Each is cut into ~2 KB documents; every 10th document is held out (eval.inputs), evaluated every
--eval-every steps on the same windows. Sweep: AdamW optim.lr in {1e-3, 3e-3, 1e-2}; Muon
optim.muon_lr in {0.01, 0.02, 0.04} (its AdamW part, embeddings and norms, at optim.lr 3e-3).
Best = the lowest final held-out loss. Reported per corpus for the best of each:
  - final held-out loss
  - steps to reach AdamW's final held-out loss (the first evaluation at or below it; the
    evaluation grid makes it a multiple of --eval-every), and the training time that takes
    (steps x ms per step, evaluation excluded)
  - ms per optimizer step: the median of the logged windows after the first (tokens per step /
    tokens per second, which leaves evaluation and checkpoint time out)
  - the held-out loss of the mean of the weights of the last 5 checkpoints (every run keeps them:
    checkpoint.interval = steps / 10, checkpoint.keep = 5), beside the last one's: `flame export
    --average 5` into a temporary directory, loaded with transformers' from_pretrained and
    evaluated by flame's own evaluator on the same held-out windows. The last checkpoint, exported
    and evaluated the same way, must give the run's logged final held-out loss within 1e-4 (checked
    and printed), so the two columns differ only by the averaging.
Floor (issue 22): Muon reaches AdamW's final held-out loss in <= 0.8x AdamW's steps with <= 1.1x
its time per step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import _cut, emit, machine, md_table  # noqa: E402

ADAMW_LRS = (1e-3, 3e-3, 1e-2)
AVERAGE = 5  # checkpoints averaged
CHECK_TOL = 1e-4  # re-evaluated last checkpoint vs the run's logged final held-out loss
MUON_LRS = (0.01, 0.02, 0.04)


def _stdlib_docs() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for p in sorted(root.glob("*.py")):  # what data.inputs = 'stdlib' reads
        docs.extend(_cut(p.read_text(encoding="utf-8", errors="replace"), 2048))
    return docs


def _prose_docs() -> list[str]:
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        docs.extend(_cut(topics[name], 2048))
    return docs


def _write(docs: list[str], folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    train, val = folder / "train.jsonl", folder / "val.jsonl"
    with open(train, "w") as ft, open(val, "w") as fv:
        for i, d in enumerate(docs):
            (fv if i % 10 == 9 else ft).write(json.dumps({"text": d}) + "\n")
    return train, val


def _run(
    tmp: Path, corpus: tuple[Path, Path], run: str, steps: int, eval_every: int, data: dict, **optim
) -> dict:
    from flame.config import load_config
    from flame.trainer import run_training

    run_dir = tmp / run
    over = {
        "data.inputs": [str(corpus[0])],
        "eval.inputs": [str(corpus[1])],
        "eval.interval": eval_every,
        "eval.batches": 4,
        **data,
        "train.max_steps": steps,
        "train.run_dir": str(run_dir),
        "train.sample_tokens": 0,
        "train.device": "cpu",
        "optim.warmup_steps": max(1, steps // 10),
        # AVERAGE checkpoints kept over the end of training: the average's inputs
        "checkpoint.interval": max(1, steps // 10),
        "checkpoint.keep": AVERAGE,
        "log.interval": 10,
        "log.console": "off",
        **{f"optim.{k}": v for k, v in optim.items()},
    }
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        run_training(load_config(overrides=over))
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["loss"]) for r in recs if r["kind"] == "eval"]
    train = [r for r in recs if r["kind"] == "train"]
    tok_step = train[-1]["tokens"] / train[-1]["step"]
    ms = statistics.median(1000 * tok_step / r["tokens_per_s"] for r in train[1:] or train)
    return {
        "evals": evals,
        "final": evals[-1][1],
        "ms": ms,
        "wall": wall,
        "optim": optim,
        "over": over,
        "dir": run_dir,
        "steps": steps,
    }


def _heldout(run: dict, tmp: Path, average: int) -> float:
    """Held-out loss of `flame export --average K` of the run (K = 1: its last checkpoint), loaded
    with from_pretrained and evaluated by flame's evaluator on the run's own held-out windows."""
    import torch
    from transformers import AutoModelForCausalLM

    from flame.config import load_config
    from flame.data.build import resolve_tokenizer
    from flame.evaluate import build_evaluator
    from flame.export import export
    from flame.model import forward_params
    from flame.parallel import World

    out = tmp / f"{run['dir'].name}-export-avg{average}"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        export(run["dir"], out, average=average)
        cfg = load_config(overrides=run["over"])
        world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        ev = build_evaluator(cfg, world, run["dir"], resolve_tokenizer(cfg), log=lambda m: None)
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    loss = ev.run(model, forward_params(model), step=run["steps"])[0]["loss"]
    shutil.rmtree(out, ignore_errors=True)
    return loss


def _averaged(run: dict, tmp: Path, checks: list[str]) -> float | None:
    """The held-out loss of the average of the last AVERAGE checkpoints (None: fewer kept), after
    checking that the same path on the last checkpoint alone reproduces the logged final loss."""
    from flame.checkpoint import list_checkpoints, step_of

    kept = [step_of(p) for p in list_checkpoints(run["dir"] / "checkpoints")][-AVERAGE:]
    last = _heldout(run, tmp, 1)
    diff = abs(last - run["final"])
    checks.append(
        f"{run['dir'].name}: last checkpoint re-evaluated {last:.6f} vs logged final {run['final']:.6f}, "
        f"|diff| {diff:.1e} "
        + ("<=" if diff <= CHECK_TOL else "> (FAILED: the columns are not comparable)")
        + f" {CHECK_TOL:g}; averaged steps {', '.join(map(str, kept))}"
    )
    return _heldout(run, tmp, AVERAGE) if len(kept) >= AVERAGE else None


def _reach(evals: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, loss in evals if loss <= target + 1e-9), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="20 steps of context 128 x batch 8 per run, the sweep on the first corpus only (< 10 min on 2 cores)",
    )
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default 600, quick 20)")
    ap.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default steps/20)")
    args = ap.parse_args()
    steps = args.steps or (20 if args.quick else 600)
    every = args.eval_every or max(1, steps // (5 if args.quick else 20))
    # quick: a quarter of the tokens per step (context 128 x batch 8), smaller evaluations
    data = {"data.context_len": 128, "data.batch_size": 8, "eval.batches": 2} if args.quick else {}
    best_i: dict = {}
    import torch

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    start = time.perf_counter()
    out, rows, notes, checks = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="flame-bench-optim-") as d:
        tmp = Path(d)
        for cname, docs in (("stdlib", _stdlib_docs()), ("prose", _prose_docs())):
            corpus = _write(docs, tmp / cname)
            runs = {"adamw": [], "muon": []}
            # quick: the second corpus reuses the first one's best lrs (no sweep of its own)
            picks = range(3) if not (args.quick and best_i) else [best_i["adamw"]]
            for i in picks:  # interleaved, so a change of machine load hits both alike
                j = best_i.get("muon", i) if args.quick and best_i else i
                runs["adamw"].append(
                    _run(tmp, corpus, f"{cname}-a{i}", steps, every, data, name="adamw", lr=ADAMW_LRS[i])
                )
                runs["muon"].append(
                    _run(tmp, corpus, f"{cname}-m{j}", steps, every, data, name="muon", muon_lr=MUON_LRS[j])
                )
            sweep = [
                [
                    cname,
                    k,
                    r["optim"].get("muon_lr", r["optim"].get("lr")),
                    f"{r['final']:.4f}",
                    f"{r['ms']:.1f}",
                ]
                for k in runs
                for r in runs[k]
            ]
            out.append(sweep)
            a = min(runs["adamw"], key=lambda r: r["final"])
            m = min(runs["muon"], key=lambda r: r["final"])
            if not best_i:
                best_i = {
                    "adamw": ADAMW_LRS.index(a["optim"]["lr"]),
                    "muon": MUON_LRS.index(m["optim"]["muon_lr"]),
                }
            target = a["final"]
            ra, rm = _reach(a["evals"], target), _reach(m["evals"], target)
            # every run's ms/step is noisy on a shared machine: the median over the sweep's 3 runs
            ms_a = statistics.median(r["ms"] for r in runs["adamw"])
            ms_m = statistics.median(r["ms"] for r in runs["muon"])
            for label, best, reach, ms in (("adamw", a, ra, ms_a), ("muon", m, rm, ms_m)):
                lr = best["optim"].get("muon_lr", best["optim"].get("lr"))
                avg = _averaged(best, tmp, checks)
                rows.append(
                    [
                        cname,
                        label,
                        f"{lr:g}",
                        f"{best['final']:.4f}",
                        f"{avg:.4f}" if avg is not None else "-",
                        reach if reach is not None else f"> {steps}",
                        f"{reach * ms / 1000:.1f}" if reach is not None else "-",
                        f"{ms:.1f}",
                    ]
                )
            step_ratio = rm / ra if rm is not None and ra else None
            ms_ratio = ms_m / ms_a
            ok = step_ratio is not None and step_ratio <= 0.8 and ms_ratio <= 1.1
            notes.append(
                f"{cname}: muon/adamw steps to AdamW's final held-out loss "
                + (f"{step_ratio:.2f}x" if step_ratio is not None else "not reached")
                + f", time per step {ms_ratio:.2f}x -> floor (<= 0.8x steps, <= 1.1x time) "
                + ("met" if ok else "NOT met")
            )
    head = [
        "corpus",
        "optimizer",
        "best lr",
        "final held-out loss",
        f"avg of last {AVERAGE} ckpts",
        "steps to AdamW's final",
        "time to it (s)",
        "ms/step",
    ]
    text = "\n".join(
        [
            "# AdamW vs Muon" + (" (--quick)" if args.quick else ""),
            "",
            f"{machine()}; tiny llama preset, context {128 if args.quick else 256} x batch "
            f"{8 if args.quick else 16}, {steps} steps per run, "
            f"held-out loss every {every} steps; whole run {time.perf_counter() - start:.0f} s",
            "",
            md_table(head, rows),
            "",
            *[f"- {n}" for n in notes],
            "",
            f"Averaged: the mean of the weights of the last {AVERAGE} checkpoints (checkpoint.interval "
            f"{max(1, steps // 10)}). The export + evaluation path checked on each best run's last checkpoint:",
            "",
            *[f"- {c}" for c in checks],
            "",
            "Sweep (final held-out loss, ms/step of each run):",
            "",
            md_table(
                ["corpus", "optimizer", "lr", "final held-out loss", "ms/step"], [r for s in out for r in s]
            ),
        ]
    )
    emit("optim" + ("-quick" if args.quick else ""), text)


if __name__ == "__main__":
    main()
