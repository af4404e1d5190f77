"""MFU on this machine: the peak of an fp32 matmul loop, then a few models trained through flame.

1. Peak: the best FLOP/s of a large square sgemm loop (best of a few rounds), with the thread
   count training uses: the most this CPU does for the work MFU counts.
2. Each configuration trains through `flame.trainer.run_training` with `--log.peak_flops <peak>`;
   the table shows the median tokens/s per device of the logged steps after the first few, the
   FLOPs per token the run used and its source (from the train records: `flops_per_token`,
   `flops_source`), the logged MFU, and, side by side, the FLOPs per token that
   `flame.flops.resolve_flops_per_token` gives the same model (measured on the meta device) with
   the MFU it implies. Where the run already uses the measurement the two agree.

MFU must come out at most 100% in every row: a row above is reported below the table (a FLOPs
figure that counts work the model does not do, or a peak measured while the machine was busy).
No asserts; the table is printed and written to bench/out/mfu.md.

    .venv/bin/python bench/mfu.py [--quick] [--steps 12] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import documents, emit, machine, md_table, write_jsonl


@dataclass
class Case:
    name: str
    config: dict  # a transformers config.json (no vocab_size: flame takes the tokenizer's)
    context: int
    batch: int
    steps: int = 0  # 0 = the --steps default
    extra: dict = field(default_factory=dict)


def cases(quick: bool) -> list[Case]:
    h, layers = (128, 2) if quick else (256, 4)
    llama = dict(
        model_type="llama",
        hidden_size=h,
        intermediate_size=int(h * 2.75) // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=h // 32,
        num_key_value_heads=h // 32,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    ctx = 128 if quick else 256
    out = [
        Case("llama", llama, ctx, 8),
        Case(
            "llama, GQA (4 query heads per kv head), untied",
            {
                **llama,
                "num_attention_heads": h // 16,
                "num_key_value_heads": h // 64,
                "tie_word_embeddings": False,
            },
            ctx,
            8,
        ),
        Case("llama, long context", llama, ctx * 4, 2),
        Case(
            "mamba (transformers' reference scan)",
            dict(
                model_type="mamba",
                hidden_size=h,
                state_size=16,
                num_hidden_layers=layers,
                expand=2,
                conv_kernel=4,
            ),
            ctx // 2,
            4,
            steps=4 if quick else 6,
        ),
    ]
    return out


def sgemm_peak(threads: int, n: int = 2048, rounds: int = 5, reps: int = 8) -> float:
    """Best FLOP/s of `reps` back-to-back n x n fp32 matmuls, over `rounds`."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)  # warm-up
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def train(case: Case, corpus: Path, run_dir: Path, peak: float, steps: int) -> dict:
    from flame.config import load_config
    from flame.flops import resolve_flops_per_token
    from flame.trainer import run_training

    model_json = run_dir.with_suffix(".json")
    model_json.write_text(json.dumps(case.config))
    over = {
        "model.name": str(model_json),
        "data.inputs": [str(corpus)],
        "data.context_len": case.context,
        "data.batch_size": case.batch,
        "train.run_dir": str(run_dir),
        "train.max_steps": case.steps or steps,
        "train.device": "cpu",
        "train.sample_tokens": 0,
        "optim.warmup_steps": 2,
        "log.interval": 1,
        "log.console": "off",
        "log.peak_flops": peak,
        "checkpoint.interval": 0,
        **case.extra,
    }
    resolved: dict = {}

    def after_last_step(trainer) -> None:
        # the same model the run trains, resolved after its last logged step (costs no step time)
        if trainer.step == trainer.total_steps and not resolved:
            model = getattr(trainer.model, "module", trainer.model)
            lines: list[str] = []
            t0 = time.perf_counter()
            value, source = resolve_flops_per_token(model, case.context, log=lines.append)
            resolved.update(value=value, source=source, line=lines[-1], seconds=time.perf_counter() - t0)

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_training(load_config(overrides=over), callbacks=[after_last_step])
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    steady = train[3:] or train[-1:]  # the first steps warm up allocators and caches
    tps = statistics.median(r["tokens_per_s_per_device"] for r in steady)
    last = train[-1]
    fpt = last.get("flops_per_token")
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return dict(
        tps=tps,
        run_fpt=fpt,
        run_source=last.get("flops_source") or ("not recorded" if fpt is not None else "-"),
        run_mfu=statistics.median(mfu) if mfu else None,
        fpt=resolved["value"],
        source=resolved["source"],
        mfu=tps * resolved["value"] / peak,
        line=resolved["line"],
        resolve_s=resolved["seconds"],
    )


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller models, fewer steps")
    ap.add_argument(
        "--steps", type=int, default=0, help="training steps per configuration (default 12, quick 8)"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    import torch

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    steps = args.steps or (8 if args.quick else 12)
    header = f"machine: {machine()}; {threads} torch thread(s)"
    peak = sgemm_peak(threads, n=1024 if args.quick else 2048)
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "corpus"
        write_jsonl(documents(2 << 20 if args.quick else 8 << 20), corpus, files=4)
        for i, case in enumerate(cases(args.quick)):
            t0 = time.perf_counter()
            r = train(case, corpus, root / f"run-{i}", peak, steps)
            rows.append(
                [
                    case.name,
                    f"{case.batch} x {case.context}",
                    f"{r['tps']:,.0f}",
                    f"{_g(r['run_fpt'])} ({r['run_source']})",
                    _pct(r["run_mfu"]),
                    f"{_g(r['fpt'])} ({r['source']})",
                    _pct(r["mfu"]),
                ]
            )
            notes.append(
                f"- {case.name}: {r['line']} [{r['resolve_s']:.2f}s]; trained in {time.perf_counter() - t0:.0f}s"
            )
            for label, m in (("logged", r["run_mfu"]), ("resolved", r["mfu"])):
                if m is not None and m > 1.0:
                    notes.append(f"- **{case.name}: {label} MFU {100 * m:.1f}% is above 100%**")
    # the peak again, after the runs: on a shared machine a busy moment lowers it (and raises MFU)
    peak_after = sgemm_peak(threads, n=1024 if args.quick else 2048)
    table = md_table(
        [
            "model",
            "batch x context",
            "tokens/s",
            "FLOPs/token of the run (source)",
            "MFU logged",
            "FLOPs/token resolved (source)",
            "MFU resolved",
        ],
        rows,
    )
    text = "\n".join(
        [
            "## MFU on this CPU",
            "",
            header,
            f"fp32 sgemm peak: {peak / 1e9:.1f} GFLOP/s (best of 5 rounds of 8 square matmuls; "
            f"{peak_after / 1e9:.1f} GFLOP/s measured again after the runs), the `--log.peak_flops` "
            "of every run",
            "",
            table,
            "",
            "FLOPs per token (flame.flops):",
            *notes,
        ]
    )
    emit("mfu", text)


if __name__ == "__main__":
    main()
