"""Time to build `flame report` for synthesised runs of 10k and 100k logged steps.

    .venv/bin/python bench/report.py [--quick]

Each run logs every step (the worst case: a record per step, with per-source fields of a 2-store
mixture), evaluates every 1,000 steps and restarts twice. The report is built in a fresh process
per run (imports included), as `flame report` would be; it reports the seconds spent parsing,
drawing and rendering (`build_report(..., timings=)`), the process's wall and CPU time.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, md_table  # noqa: E402


def synthesise(run: Path, steps: int) -> int:
    """A metrics.jsonl of `steps` train records; returns its size in bytes."""
    run.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    t0, off = 1.7e9, 0.0
    restarts = {int(steps * 0.3) + 1, int(steps * 0.7) + 1}
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            if s in restarts:
                off += 600.0
            el = s * 0.5
            loss = 2 + 8 * math.exp(-s / 5000) + rng.gauss(0, 0.05)
            sources = {
                n: {"loss": loss + d, "target_tokens": 100, "tokens": 100, "tokens_total": int(s * 16384 * w),
                    "share": w, "target_share": w}
                for n, w, d in (("web", 0.7, 0.1), ("code", 0.3, -0.2))
            }  # fmt: skip
            rec = {
                "kind": "train", "step": s, "total_steps": steps, "epoch": s / 30000, "loss": loss,
                "target_tokens": 8 * 2047, "lr": 3e-4 * min(1, s / 2000), "grad_norm": 0.5 + rng.random(),
                "tokens": s * 16384, "tokens_per_s": 32768 + rng.gauss(0, 500), "tokens_per_s_per_device": 4096.0,
                "mfu": 0.41, "flops_per_token": 7.6e8, "flops_source": "measured", "attention": "sdpa",
                "memory_gib": 21.5, "data_wait": abs(rng.gauss(0.01, 0.005)), "elapsed_s": el, "eta_s": 1.0,
                "percent": 100 * s / steps, "bad_steps": 0, "sources": sources, "time": t0 + el + off,
            }  # fmt: skip
            f.write(json.dumps(rec) + "\n")
            if s % 1000 == 0:
                ev = {"kind": "eval", "step": s, "loss": loss + 0.05, "perplexity": math.exp(loss),
                      "bpb": loss / 2.1, "tokens": 100000, "time": t0 + el + off}  # fmt: skip
                f.write(json.dumps(ev) + "\n")
    return (run / "metrics.jsonl").stat().st_size


_CHILD = """
import json, sys, time
from flame.report import build_report
t = {}
build_report([sys.argv[1]], sys.argv[2], timings=t)
print(json.dumps(t))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the 10k-step run only")
    ap.add_argument("--repeat", type=int, default=1, help="builds per run; the fastest is shown (default 1)")
    args = ap.parse_args(argv)
    sizes = [10_000] if args.quick else [10_000, 100_000]
    rows = []
    with tempfile.TemporaryDirectory(prefix="flame-bench-report-") as td:
        for n in sizes:
            run = Path(td) / f"run-{n}"
            size = synthesise(run, n)
            out = Path(td) / f"report-{n}.html"
            best = None
            for _ in range(max(1, args.repeat)):
                cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-c", _CHILD, str(run), str(out)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                total = time.perf_counter() - t0
                cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
                t = json.loads(done.stdout.strip().splitlines()[-1])
                if best is None or total < best[0]:
                    best = (total, cpu, t)
            total, cpu, t = best
            rows.append(
                [
                    f"{n:,}",
                    f"{int(t['records']):,}",
                    f"{size / 2**20:.0f} MiB",
                    f"{t['read_s']:.2f}",
                    f"{t['figures_s']:.2f}",
                    f"{t['render_s']:.2f}",
                    f"{total:.2f}",
                    f"{cpu:.2f}",
                    f"{out.stat().st_size / 2**10:.0f} KiB",
                ]
            )
            print(f"{n} steps: {total:.2f} s ({cpu:.2f} s CPU)", file=sys.stderr, flush=True)
    text = "\n".join(
        [
            f"# flame report build time (`.venv/bin/python bench/report.py{' --quick' if args.quick else ''}`)",
            "",
            f"Machine: {machine()}. A record every step (2-source mixture fields), an eval every 1,000 steps, "
            "2 restarts; one fresh process per report, imports included. parse: reading the run directory "
            "and the headline numbers; figures: drawing the PNGs (after matplotlib's import, which overlaps "
            "the parse); render: the page. total: the process's wall time; cpu: its CPU time (user + "
            "system, all threads), steadier than wall time on a shared machine.",
            "",
            md_table(
                [
                    "steps",
                    "records",
                    "metrics.jsonl",
                    "parse s",
                    "figures s",
                    "render s",
                    "total s",
                    "cpu s",
                    "report.html",
                ],
                rows,
            ),
        ]
    )
    emit("report" + ("-quick" if args.quick else ""), text)


if __name__ == "__main__":
    main()
