"""One flash-linear-attention family through flame, in a process of its own.

`python tests/fla_family.py FAMILY WORKDIR` trains a tiny model of FAMILY with flame (fla's Triton
kernels run in Triton's interpreter on CPU, see flame.fla_cpu), then stops and resumes a second
run, exports the first, reloads the export in transformers and generates from both, and writes
what it saw to WORKDIR/report.json. tests/test_fla.py asserts on that report.

A process of its own because importing fla registers its model types with transformers' Auto
classes (its own "mamba", "mamba2", "rwkv7", ...): that must not leak into other tests.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

# tiny shapes that fla's chunk kernels accept (head dims of 16 and more); fuse_swiglu off because
# fla's fused SwiGLU backward fails under bf16 autocast on CPU (DeltaNet needs bf16)
FAMILIES: dict[str, dict] = {
    "gla": dict(model_type="gla", hidden_size=32, num_hidden_layers=2, num_heads=1, fuse_swiglu=False),
    "delta_net": dict(model_type="delta_net", hidden_size=32, num_hidden_layers=2, num_heads=1, fuse_swiglu=False),
    "gated_deltanet": dict(
        model_type="gated_deltanet", hidden_size=32, num_hidden_layers=2, num_heads=1, head_dim=32, fuse_swiglu=False
    ),
    "hgrn2": dict(
        model_type="hgrn2", hidden_size=32, num_hidden_layers=2, num_heads=1, expand_ratio=16, fuse_swiglu=False
    ),
    "rwkv7": dict(model_type="rwkv7", hidden_size=32, num_hidden_layers=2, head_dim=32),
    "mamba2": dict(
        model_type="mamba2", hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=32, state_size=16, expand=2
    ),
}
# DeltaNet's chunk kernel refuses fp32 ("does not support float32")
DTYPE = {"delta_net": "bf16"}
# fla's Mamba2 on CPU takes its PyTorch path, which ignores cu_seqlens: flame must refuse varlen
NO_VARLEN_ON_CPU = {"mamba2"}
STEPS, STOP_AT, CONTEXT = 4, 2, 32
PROMPT = "def f(x):\n    return"


def _corpus(folder: Path) -> Path:
    rng = random.Random(0)
    words = "the of and model data train token loss step batch learning rate value state chunk".split()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(24):
        text = f"Document {i}: " + " ".join(rng.choice(words) for _ in range(rng.randrange(20, 80))) + ".\n"
        text += f"def f{i}(x):\n    return x * {i}\n"
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


def _overrides(family: str, work: Path, run_dir: Path) -> dict:
    config = work / f"{family}.json"
    config.write_text(json.dumps({**FAMILIES[family], "fuse_cross_entropy": False}))
    return {
        "model.name": str(config),
        "model.import_modules": ["fla"],
        "data.inputs": [str(work / "corpus")],
        "data.tokenizer": "byte",
        "data.context_len": CONTEXT,
        "data.batch_size": 2,
        "data.varlen": family not in NO_VARLEN_ON_CPU,
        "train.run_dir": str(run_dir),
        "train.max_steps": STEPS,
        "train.dtype": DTYPE.get(family, "fp32"),
        "train.sample_tokens": 0,
        "optim.lr": 1e-2,
        "optim.warmup_steps": 1,
        "log.interval": 1,
        "log.console": "off",
        "checkpoint.interval": STOP_AT,
    }


def _losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in recs if r.get("kind") == "train"}


def _fused_against_logits(model, vocab: int) -> dict:
    """The largest relative differences of the fused loss from the logits path's (loss, grads)."""
    import torch

    from flame.head import TokenLoss, head_verdict, token_loss
    from flame.model import forward_params

    accepts = forward_params(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, CONTEXT + 1), generator=g)
    labels = ids.clone()
    labels[0, 5] = -100
    batch = {"input_ids": ids, "labels": labels}

    def run(loss):
        model.zero_grad(set_to_none=True)
        total, _, _ = loss(model, batch, accepts)
        (total * 0.01).backward()
        return float(total), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    verdict = head_verdict(model, "fused", accepts, vocab)
    fused = token_loss(model, verdict, chunk_tokens=16)
    (l_ref, g_ref), (l_got, g_got) = run(TokenLoss()), run(fused)
    model.zero_grad(set_to_none=True)
    model.eval()
    grad_err = max(
        float((g_got[k].double() - g_ref[k].double()).abs().max()) / max(float(g_ref[k].abs().max()), 1e-30)
        for k in g_ref
    )
    return {
        "fused_probe_accepts": fused.fused,
        "fused_loss_rel_diff": abs(l_got - l_ref) / abs(l_ref),
        "fused_grad_rel_diff": grad_err,
        "fused_grad_names_equal": sorted(g_ref) == sorted(g_got),
    }


def main(family: str, work: Path) -> dict:
    import torch

    from flame.config import load_config
    from flame.trainer import run_training

    _corpus(work / "corpus")
    report: dict = {"family": family, "dtype": DTYPE.get(family, "fp32"), "seconds": {}}
    clock = [time.perf_counter()]

    def lap(phase: str) -> None:
        now = time.perf_counter()
        report["seconds"][phase] = round(now - clock[0], 1)
        clock[0] = now

    report["varlen"] = family not in NO_VARLEN_ON_CPU
    if not report["varlen"]:
        from flame.errors import ConfigError

        try:
            run_training(load_config(overrides={**_overrides(family, work, work / "v"), "data.varlen": True}))
            report["varlen_refusal"] = None
        except ConfigError as e:
            report["varlen_refusal"] = str(e)

    full = work / "full"
    run_training(load_config(overrides=_overrides(family, work, full)))
    report["losses"] = _losses(full)
    starts = [json.loads(x) for x in (full / "starts.jsonl").read_text().splitlines() if x.strip()]
    report["loss_path"] = starts[-1].get("loss")
    lap("train")

    part = work / "part"
    cfg = load_config(overrides=_overrides(family, work, part))

    def stop(trainer):
        if trainer.step == STOP_AT:
            trainer.stop_signal = "test"

    first = run_training(cfg, callbacks=[stop])
    report["stopped_at"] = first["step"]
    report["resumed_to"] = run_training(cfg)["step"]
    report["resumed_losses"] = _losses(part)
    lap("stop and resume")

    from flame.inspect import load_for_generation

    ours, tok, _, _ = load_for_generation(full, None, torch.device("cpu"))
    again, _, _, _ = load_for_generation(part, None, torch.device("cpu"))
    a, b = ours.state_dict(), again.state_dict()
    report["weights_equal_after_resume"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ours.eval()
    bf16 = report["dtype"] == "bf16"

    if not bf16:  # the fused loss equals the loss from the logits: loss and every gradient
        report.update(_fused_against_logits(ours, tok.vocab_size))
    lap("fused against logits")

    # export, reload in transformers, the same logits
    from transformers import AutoModelForCausalLM

    from flame.data.tokenizer import PROBE_TEXT
    from flame.export import export

    out = export(full, work / "export")
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    report["exported_model_type"] = hf.config.model_type
    ids = tok.encode_batch([PROBE_TEXT])[0].tolist()
    x = torch.tensor([ids[:CONTEXT], ids[CONTEXT : 2 * CONTEXT]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        theirs = hf(input_ids=x).logits.float()
        mine = ours(input_ids=x)
        mine = (mine if torch.is_tensor(mine) else mine.logits).float()
    report["export_logits_max_diff"] = (theirs - mine).abs().max().item()
    report["export_logits_scale"] = mine.abs().max().item()
    lap("export")

    # varlen: the trained weights keep packed documents apart; without cu_seqlens they would not
    from flame.loss import model_logits
    from flame.model import forward_params, isolation, trained_probe_row

    accepts = forward_params(ours)
    row = trained_probe_row(CONTEXT)

    def without_boundaries(model, batch, accepts):
        return model_logits(model, {"input_ids": batch["input_ids"]}, accepts)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        report["isolation_with_cu_seqlens"] = isolation(ours, accepts, tok.vocab_size, "cpu", lens=row)
        report["isolation_without"] = isolation(
            ours, accepts, tok.vocab_size, "cpu", lens=row, outputs=without_boundaries
        )
    lap("isolation")

    # generate: flame's greedy generate on the run and on the export, transformers' on the export
    import contextlib
    import io

    from flame.cli import main as flame_main

    def flame_generate(path, *extra: str) -> tuple[str, str]:
        out, err = io.StringIO(), io.StringIO()
        args = ["generate", str(path), "--prompt", PROMPT, "--max-tokens", "8", "--temperature", "0", *extra]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = flame_main(args)
        return (out.getvalue().removesuffix("\n") if rc == 0 else f"<exit {rc}>"), err.getvalue()

    report["generate_run"], report["generate_run_said"] = flame_generate(full)
    report["generate_run_no_cache"], _ = flame_generate(full, "--no-cache")
    report["generate_export"], _ = flame_generate(out)
    # transformers' own generate on the export, and how far its cache is from the forward
    from flame.generate import cache_error

    prompt = tok.encode_batch([PROMPT])[0].tolist()
    with torch.no_grad():
        report["cache_error"] = cache_error(hf, prompt, "cpu")
        x = torch.tensor([prompt])
        new = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False)
    new = new[0, len(prompt) :].tolist()
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    report["generate_transformers"] = PROMPT + tok.decode(new)
    lap("generate")
    return report


if __name__ == "__main__":
    fam, workdir = sys.argv[1], Path(sys.argv[2])
    workdir.mkdir(parents=True, exist_ok=True)
    result = main(fam, workdir)
    (workdir / "report.json").write_text(json.dumps(result, indent=1))
