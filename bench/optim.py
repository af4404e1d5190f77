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
Floor (issue 22): Muon reaches AdamW's final held-out loss in <= 0.8x AdamW's steps with <= 1.1x
its time per step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
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
        "checkpoint.interval": 0,
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
    return {"evals": evals, "final": evals[-1][1], "ms": ms, "wall": wall, "optim": optim}


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
    out, rows, notes = [], [], []
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
                rows.append(
                    [
                        cname,
                        label,
                        f"{lr:g}",
                        f"{best['final']:.4f}",
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
