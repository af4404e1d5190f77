"""The loss at real vocabularies: flame's fused and logits paths beside F.cross_entropy and a bare
transformers `labels=` loop, side by side in one run.

    .venv/bin/python bench/loss.py [--quick] [--only loss,step]

Each case runs in a fresh process, so its peak RSS (ru_maxrss) is its own; time is the best of
`--repeat` forward + backward passes after one warm-up. fp32 on CPU.

loss rows (hidden 256, B x T tokens, vocabulary V; inputs made once, outside the timing):
  - F.cross_entropy: `F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
    reduction="sum")` on materialised logits (what a bare loop writes; the slice copies them)
  - flame logits: `flame.loss.per_token_ce(logits, labels).sum()` on the same logits
  - head + F.cross_entropy: the same, with the logits computed from hidden states by the head
  - flame fused: `flame.head.fused_ce(hidden, weight, None, labels)` (no [B, T, V] tensor)
step rows (a 2-layer llama, hidden 256, tied head, AdamW): one whole optimizer step
  - bare: `model(input_ids=x, labels=x).loss.backward(); clip; step; zero_grad`
  - flame: `Trainer.train_step` + its update, with model.loss fused and logits
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import emit, machine, md_table  # noqa: E402

HIDDEN = 256


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _best(fn, repeat: int) -> float:
    fn()  # warm-up: first-touch page faults and one-time allocations
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _loss_case(kind: str, vocab: int, b: int, t: int, repeat: int) -> dict:
    import torch
    import torch.nn.functional as F

    from flame.head import fused_ce
    from flame.loss import per_token_ce

    torch.manual_seed(0)
    labels = torch.randint(0, vocab, (b, t))
    hidden = torch.randn(b, t, HIDDEN, requires_grad=True)
    weight = (torch.randn(vocab, HIDDEN) * 0.02).requires_grad_()
    logits = None
    if kind in ("F.cross_entropy", "flame logits"):
        logits = (torch.randn(b, t, vocab) * 2).requires_grad_()

    def bare(z):
        return F.cross_entropy(z[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), reduction="sum")

    def step():
        for x in (hidden, weight, logits):
            if x is not None:
                x.grad = None
        if kind == "F.cross_entropy":
            loss = bare(logits)
        elif kind == "flame logits":
            loss = per_token_ce(logits, labels).sum()
        elif kind == "head + F.cross_entropy":
            loss = bare(F.linear(hidden, weight))
        elif kind == "head + flame logits":
            loss = per_token_ce(F.linear(hidden, weight), labels).sum()
        else:
            loss = fused_ce(hidden, weight, None, labels)[0]
        loss.backward()
        return float(loss.detach())

    sec = _best(step, repeat)
    return {"seconds": sec, "loss": step(), "peak_gib": _peak_gib()}


def _step_case(kind: str, vocab: int, b: int, t: int, repeat: int) -> dict:
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=t,
        tie_word_embeddings=True,
    )  # fmt: skip
    x = torch.randint(0, vocab, (b, t))
    if kind == "bare labels=":
        model = LlamaForCausalLM._from_config(hf, attn_implementation="sdpa")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        sec = _best(step, repeat)
        return {"seconds": sec, "loss": step(), "peak_gib": _peak_gib()}

    from flame.config import load_config
    from flame.trainer import Trainer

    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps(hf.to_dict()))
    (d / "corpus.txt").write_text("flame " * 2000)
    over = {
        "model.name": str(d / "config.json"),
        "model.vocab_size": vocab,
        "model.loss": kind.split()[-1],
        "data.inputs": [str(d / "corpus.txt")],
        "data.context_len": t,
        "data.batch_size": b,
        "train.run_dir": str(d / "run"),
        "train.max_steps": 1000,
        "log.console": "off",
        "checkpoint.interval": 0,
        "eval.interval": 0,
    }
    tr = Trainer(load_config(overrides=over))
    tr.setup()
    batch = {"input_ids": x, "num_targets": b * (t - 1)}

    def step():
        loss_sum, targets = tr.train_step([batch])
        tr._update(loss_sum, targets)
        tr.optimizer.zero_grad(set_to_none=True)
        return float(loss_sum) / targets

    sec = _best(step, repeat)
    out = {"seconds": sec, "loss": step(), "peak_gib": _peak_gib(), "fused": tr.loss.fused}
    tr.close()
    return out


def _child(args) -> None:
    fn = _loss_case if args.group == "loss" else _step_case
    print(json.dumps(fn(args.case, args.vocab, args.batch, args.time, args.repeat)))


def _run(group: str, case: str, vocab: int, b: int, t: int, repeat: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--group", group, "--case", case]
    cmd += ["--vocab", str(vocab), "--batch", str(b), "--time", str(t), "--repeat", str(repeat)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


LOSS_CASES = [
    "F.cross_entropy",
    "flame logits",
    "head + F.cross_entropy",
    "head + flame logits",
    "flame fused",
]
STEP_CASES = ["bare labels=", "flame fused", "flame logits"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="vocab 32,000 and 151,936 at 4 x 1,024 only")
    ap.add_argument("--only", default="loss,step", help="loss, step or both")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--group", default="loss", help=argparse.SUPPRESS)
    ap.add_argument("--case", default="", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=32000, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--time", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    groups = args.only.split(",")
    shapes = [(4, 1024)] if args.quick else [(8, 1024), (4, 2048)]
    vocabs = [32000, 151936] if args.quick else [32000, 128256, 151936]
    parts = [
        f"# bench/loss.py\n\n{machine()}; fp32; hidden {HIDDEN}; best of {args.repeat} after a warm-up\n"
    ]
    if "loss" in groups:
        rows = []
        for v in vocabs:
            for b, t in shapes:
                res = {c: _run("loss", c, v, b, t, args.repeat) for c in LOSS_CASES}
                base, head = res["F.cross_entropy"], res["head + F.cross_entropy"]
                for c in LOSS_CASES:
                    r = res[c]
                    ref = head if c.startswith(("head", "flame fused")) else base
                    rows.append([f"{v:,}", f"{b} x {t:,}", c, f"{r['seconds']:.2f} s",
                                 f"{ref['seconds'] / r['seconds']:.2f}x", f"{r['peak_gib']:.2f} GiB",
                                 f"{r['loss']:.6g}"])  # fmt: skip
                print(md_table(["vocab", "tokens", "loss", "fwd+bwd", "speed vs F.ce", "peak RSS", "loss"],
                               rows[-len(LOSS_CASES):]), flush=True)  # fmt: skip
        parts.append(
            "## The loss alone (speed vs F.cross_entropy on the same input: logits, or hidden + head)\n"
        )
        parts.append(
            md_table(["vocab", "tokens", "loss", "fwd+bwd", "speed vs F.ce", "peak RSS", "loss"], rows)
        )
    if "step" in groups:
        rows = []
        for v in [151936] if args.quick else [32000, 151936]:
            b, t = 4, 1024
            res = {c: _run("step", c, v, b, t, args.repeat) for c in STEP_CASES}
            bare = res["bare labels="]
            for c in STEP_CASES:
                r = res[c]
                rows.append([f"{v:,}", f"{b} x {t:,}", c, f"{r['seconds']:.2f} s",
                             f"{r['seconds'] / bare['seconds']:.2f}x", f"{r['peak_gib']:.2f} GiB",
                             f"{r['peak_gib'] / bare['peak_gib']:.2f}x", f"{r['loss']:.6g}"])  # fmt: skip
            print(md_table(["vocab", "tokens", "step", "time", "time vs bare", "peak RSS", "RSS vs bare", "loss"],
                           rows[-len(STEP_CASES):]), flush=True)  # fmt: skip
        parts.append(
            "\n## One optimizer step, 2-layer llama (hidden 256, tied), beside a bare transformers loop\n"
        )
        parts.append(
            md_table(
                ["vocab", "tokens", "step", "time", "time vs bare", "peak RSS", "RSS vs bare", "loss"], rows
            )
        )
    emit("loss", "\n".join(parts))


if __name__ == "__main__":
    main()
