"""Training tokens/s per architecture: flame's step vs a bare PyTorch loop, side by side in one run.

    .venv/bin/python bench/models.py [--quick] [--families llama,mamba,...] [--vocab 32000]

Every family of the model zoo (tests/zoo.py: the configs the model-zoo tests train) at one fixed
size: hidden 128, 4 layers (the zoo's other widths scaled alike), a 4,096-token byte-level BPE
trained in-process, context 256, batch 8, fp32 on CPU. Both sides train the same model (built by
`flame.model.build_model` from the same seed) on the same batches (read from one prepared store;
the bare loop gets them pre-loaded, so flame's data reading counts as flame's time).

flame: `run_training` with log interval 10, checkpoints off. Bare: `logits = model(x).logits`;
cross-entropy of the shifted logits (the loss flame computes, without labels passed to the model);
`backward(); clip_grad_norm_; AdamW.step(); zero_grad(); sched.step()`. A Trainer callback runs one
bare step after every flame step, so both see the same machine load; each flame step is compared
with the mean of the bare steps right before and after it.

--vocab N (e.g. 32000 or 151936) gives every model N vocabulary rows (`model.vocab_size`, the bare
loop's model too), while the BPE stays at min(N, --bpe-vocab) tokens (a BPE trained on this small
corpus cannot reach 32k merges): rows past the tokenizer's are never targets, but every step
computes and normalizes over all N, as with a real vocabulary. flame then runs each family twice,
with `model.loss=fused` and `model.loss=logits` (--loss to choose), each beside its own bare loop,
which always builds the [B, T, V] logits. Under --quick, --vocab trains a smaller set of families
unless --families names them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/zoo.py: the zoo's configs
from common import documents, emit, machine, md_table, train_bpe, write_jsonl  # noqa: E402
from trainer_overhead import _world, bare_parts  # noqa: E402  the same bare loop's parts
from zoo import ZOO  # noqa: E402

# --quick --vocab: one of each kind of head (untied, tied, scaled logits, soft-capped, SSM)
_QUICK_VOCAB_FAMILIES = ("gpt2", "llama", "qwen3_moe", "gemma", "gemma2", "mamba2")

# the zoo's sizes are for hidden 64: these grow with the width
_WIDTH_KEYS = {
    "hidden_size",
    "n_embd",
    "intermediate_size",
    "moe_intermediate_size",
    "attention_hidden_size",
    "head_dim",
    "query_pre_attn_scalar",
}


def scaled(family: str, hidden: int, layers: int) -> dict:
    """ZOO[family] at `hidden` width and `layers` layers (head count kept, so head_dim grows;
    Mamba2 keeps its head_dim and grows its head count instead)."""
    f = hidden / 64
    out = {}
    for k, v in ZOO[family].items():
        if k in ("num_hidden_layers", "n_layer"):
            v = layers
        elif family == "mamba2" and k == "num_heads":
            v = round(v * f)
        elif k in _WIDTH_KEYS and not (family == "mamba2" and k == "head_dim"):
            v = round(v * f)
        out[k] = v
    return out


def one_family(
    family: str, store: Path, tmp: Path, args, steps: int, warmup: int, loss: str = "auto"
) -> dict:
    """flame and bare step times (seconds) of one family, interleaved step by step; `loss`: flame's
    model.loss (its path as used: r["loss"])."""
    import torch
    import torch.nn.functional as F

    from flame.config import load_config
    from flame.data.build import build_loader, resolve_tokenizer
    from flame.trainer import run_training

    folder = tmp / f"config-{family}-{loss}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(scaled(family, args.hidden, args.layers)))
    total = warmup + steps + 1  # +1: the first flame step has no start mark
    run_dir = tmp / f"run-{family}-{loss}"
    cfg = load_config(
        overrides={
            "model.name": str(folder / "config.json"),
            "model.vocab_size": args.vocab or 0,
            "model.loss": loss,
            "data.store": str(store),
            "data.context_len": args.context,
            "data.batch_size": args.batch,
            "train.run_dir": str(run_dir),
            "train.max_steps": total,
            "train.device": "cpu",
            "train.sample_tokens": 0,
            "log.interval": 10,
            "log.console": "off",
            "checkpoint.interval": 0,
        }
    )
    tok = resolve_tokenizer(cfg)
    ref = iter(build_loader(cfg, _world(), run_dir, tok, log=lambda m: None))
    batches = [next(ref)["input_ids"].clone() for _ in range(total)]
    model, opt, sched = bare_parts(cfg, tok.vocab_size)
    params = list(model.parameters())
    clip = cfg.train.grad_clip
    n_params = sum(p.numel() for p in params)

    def bare_step(x: torch.Tensor) -> None:
        logits = model(input_ids=x, use_cache=False).logits
        v = logits.shape[-1]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

    flame_t: list[float] = []
    bare_t: list[float] = []
    last_exit: list[float | None] = [None]
    path: list[str] = []

    def callback(trainer) -> None:
        t_in = time.perf_counter()
        if not path:
            path.append("fused" if trainer.loss.fused else "logits")
        if last_exit[0] is not None:
            flame_t.append(t_in - last_exit[0])
        t0 = time.perf_counter()
        bare_step(batches[trainer.step - 1])
        bare_t.append(time.perf_counter() - t0)
        last_exit[0] = time.perf_counter()

    with contextlib.redirect_stdout(io.StringIO()):
        run_training(cfg, callbacks=[callback])
    # flame_t[j] is flame step j + 2; bare_t[j] ran right before it and bare_t[j + 1] right after
    around = [(x + y) / 2 for x, y in zip(bare_t, bare_t[1:])]
    return {
        "loss": path[0],
        "rows": model.get_input_embeddings().weight.shape[0],
        "tokenizer": tok.vocab_size,
        "params": n_params,
        "flame": flame_t[warmup:],
        "bare": around[warmup:],
        "tokens": args.batch * args.context,
    }


def row(family: str, r: dict) -> list:
    med = statistics.median
    f, b = med(r["flame"]), med(r["bare"])
    ratio = med([x / y for x, y in zip(r["flame"], r["bare"])]) - 1
    return [
        family,
        r["loss"],
        f"{r['params'] / 1e6:.2f}M",
        f"{r['tokens'] / f:,.0f}",
        f"{r['tokens'] / b:,.0f}",
        f"{f * 1e3:.0f}",
        f"{b * 1e3:.0f}",
        f"{ratio * 100:+.1f}%",
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a ~1-minute version: 4 x 128 tokens a step, 8 measured steps (model sizes unchanged)",
    )
    ap.add_argument(
        "--families",
        default=None,
        help="comma-separated zoo families (default all; with --quick --vocab: "
        f"{','.join(_QUICK_VOCAB_FAMILIES)})",
    )
    ap.add_argument("--steps", type=int, default=None, help="measured steps per family (default 20)")
    ap.add_argument("--warmup", type=int, default=None, help="steps dropped at the start (default 3)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=None, help="tokens per sample (default 256)")
    ap.add_argument("--batch", type=int, default=None, help="samples per step (default 8)")
    ap.add_argument(
        "--vocab",
        type=int,
        default=0,
        help="model vocabulary rows, e.g. 32000 or 151936 (the BPE: min(this, --bpe-vocab)); flame runs "
        "with model.loss=fused and =logits (default: the BPE's own size, model.loss=auto)",
    )
    ap.add_argument("--bpe-vocab", type=int, default=4096, help="BPE vocabulary (trained in-process)")
    ap.add_argument(
        "--loss",
        default=None,
        help="comma-separated model.loss values to run flame with (auto, fused, logits); default "
        "fused,logits with --vocab, else auto",
    )
    args = ap.parse_args(argv)
    q = args.quick
    bpe = min(args.vocab, args.bpe_vocab) if args.vocab else args.bpe_vocab
    losses = [
        x.strip() for x in (args.loss or ("fused,logits" if args.vocab else "auto")).split(",") if x.strip()
    ]
    if bad := [x for x in losses if x not in ("auto", "fused", "logits")]:
        ap.error(f"unknown --loss values {bad}: auto, fused or logits")
    if args.families is None:
        args.families = ",".join(_QUICK_VOCAB_FAMILIES if q and args.vocab else ZOO)
    steps = args.steps or (8 if q else 20)
    warmup = args.warmup if args.warmup is not None else (2 if q else 3)
    args.context = args.context or (128 if q else 256)
    args.batch = args.batch or (4 if q else 8)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in ZOO]
    if unknown:
        ap.error(f"unknown families {unknown}; the zoo has {', '.join(ZOO)}")
    header = machine()

    import torch

    from flame.data.prepare import prepare

    rows = []
    with tempfile.TemporaryDirectory(prefix="flame-bench-models-") as td:
        tmp = Path(td)
        docs = documents(2 << 20)
        files = write_jsonl(docs, tmp / "corpus", 2)
        tok = train_bpe(docs, tmp / "tok", vocab_size=bpe, sample_bytes=1 << 20)
        store = tmp / "store"
        prepare([str(f) for f in files], str(tok), str(store), workers=1, progress=False, log=lambda m: None)
        # untimed: the process's one-time costs (lazy imports, thread pools) land on no family's figures
        with contextlib.suppress(Exception):  # a family that fails says so in its own row below
            one_family(families[0], store, tmp / "warm-up", args, 1, 0, losses[-1])
        tok_vocab, model_rows = bpe, args.vocab
        for family in families:
            for loss in losses:
                t0 = time.perf_counter()
                try:
                    r = one_family(family, store, tmp, args, steps, warmup, loss)
                except Exception as e:  # one family failing does not lose the others' figures
                    why = f"failed: {type(e).__name__}: {e}"
                    rows.append([family, f"{loss}: failed", "-", "-", "-", "-", "-", why[:160]])
                    print(f"{family} ({loss}): {why}", file=sys.stderr, flush=True)
                    continue
                rows.append(row(family, r))
                tok_vocab, model_rows = r["tokenizer"], r["rows"]
                took = time.perf_counter() - t0
                print(
                    f"{family} ({r['loss']}): {rows[-1][3]} vs {rows[-1][4]} tokens/s ({took:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    cmd = "bench/models.py" + (" --quick" if q else "") + (f" --vocab {args.vocab}" if args.vocab else "")
    if args.vocab:
        vocab_text = (
            f"{tok_vocab:,}-token byte-level BPE, models with {model_rows:,} vocabulary rows "
            "(`model.vocab_size`, the bare loop's model too: rows past the tokenizer's are never targets, "
            "but every step computes all of them)"
        )
    else:
        vocab_text = f"{tok_vocab:,}-token byte-level BPE"
    text = "\n".join(
        [
            f"# Training throughput per architecture (`.venv/bin/python {cmd}`)",
            "",
            f"Machine: {header}; {torch.get_num_threads()} torch threads.",
            f"{'Every zoo family' if len(families) == len(ZOO) else 'Zoo families'} at hidden {args.hidden}, "
            f"{args.layers} layers; {vocab_text}; {args.batch} x {args.context} tokens a step; fp32 on CPU, "
            "AdamW, clipping. "
            f"{steps} measured steps after {warmup} warmup step(s), each flame step paired with the "
            "mean of the bare steps right before and after it. flame: `run_training` (log interval 10, "
            "non-finite guard on, checkpoints off; `model.loss` "
            f"{' and '.join(losses)}, the path it used in the flame loss column: `trainer.loss.fused`); "
            "bare: forward without labels, cross-entropy of the shifted logits (always the [B, T, V] "
            "logits), backward, clip, AdamW, schedule.",
            "",
            md_table(
                [
                    "model",
                    "flame loss",
                    "parameters",
                    "flame tokens/s",
                    "bare tokens/s",
                    "flame ms/step",
                    "bare ms/step",
                    "flame vs bare (median of paired ratios)",
                ],
                rows,
            ),
            "",
            "No fused kernels on CPU: Mamba / Mamba2 / RWKV run transformers' reference paths (a Python "
            "loop over time steps for RWKV and Mamba's selective scan), so their absolute figures say "
            "little about a GPU; the flame-vs-bare column is what this table measures.",
        ]
    )
    emit("models" + (f"-vocab{args.vocab}" if args.vocab else ""), text)


if __name__ == "__main__":
    main()
