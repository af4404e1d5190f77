"""`flame export RUN_DIR [--step N] --out DIR [--dtype fp32|bf16]`: a checkpoint as a Hugging Face model.

The directory holds config.json, generation_config.json, model.safetensors and the run's
tokenizer, so `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
load it (offline), and `flame train --model.init_from DIR` continues pretraining from it. Before
anything reaches DIR, the tokenizer as transformers loads it is checked against the run's on a
fixed probe text (`flame.data.tokenizer.PROBE_TEXT`): same ids, same EOS, same decoded text, or
no export.
A custom (`pkg.module:function`) model has no transformers config: its weights are written as
model.safetensors and the command says so with a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from flame.checkpoint import TRUST_NOTE, find_checkpoint, load_model_weights, read_trainer_state
from flame.config import Config, config_from_dict
from flame.errors import CheckpointError, FlameError
from flame.runs import run_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _saved_config(ckpt: Path) -> tuple[Config, dict]:
    state = read_trainer_state(ckpt)
    return config_from_dict(state.get("config", {})), state


def build_for_export(cfg: Config, vocab: int) -> nn.Module:
    """The run's model on the CPU (weights to be loaded): what the trainer built, without init_from."""
    from flame.model import build_model

    m = cfg.model
    if m.init_from:  # the architecture is the init_from directory's config.json
        if not Path(m.init_from).is_dir():
            raise CheckpointError(
                f"the run started from model.init_from = '{m.init_from}', which no longer exists: "
                "its config.json gives the model's architecture",
                hint="restore that directory (only its config.json is read), or export from where the run started",
            )
        m.name, m.init_from = m.init_from, ""
    return build_model(m, vocab, cfg.data.context_len)


def export(
    run_dir: str | Path,
    out: str | Path,
    step: int | None = None,
    dtype: str = "fp32",
    force: bool = False,
    average: int = 1,
) -> Path:
    """Write the checkpoint of `run_dir` (newest, or `step`) as a Hugging Face model directory;
    with `average` K > 1, the mean of the weights of the K checkpoints ending there."""
    if average < 1:
        raise FlameError(f"--average {average}: give the number of checkpoints to average (1 or more)")
    if dtype not in DTYPES:
        raise FlameError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FlameError(f"--out {out} is a file, not a directory", hint="choose another --out")
    ckpt = find_checkpoint(run_dir, step, checksums=True, log=lambda m: print(m, file=sys.stderr))
    # the run directory around it, when it lies in one (a checkpoint directory may stand alone)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    _check_out(out, [Path(run_dir), ckpt, run], force)
    cfg, state = _saved_config(ckpt)
    print(f"exporting {ckpt}", file=sys.stderr)
    tok = run_tokenizer(run, cfg, state)
    torch.manual_seed(0)
    model = build_for_export(cfg, tok.vocab_size)
    load_model_weights(ckpt, model, "the model its config describes")
    if average > 1:
        _average_into(model, _last_checkpoints(run, ckpt, average))
    model = model.to(DTYPES[dtype]).eval()
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from transformers import PreTrainedModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one small directory: no "Writing model shards" bar

    tok.save_pretrained(str(tmp))
    if not isinstance(model, PreTrainedModel):
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"))
        _check_tokenizer(tok, tmp, out)
        _replace(tmp, out)
        raise FlameError(
            f"{cfg.model.name} is a custom model, not a transformers one: no config.json can be written, "
            f"so {out} is not a Hugging Face model directory. Its weights (step {state.get('step')}) are in "
            f"{out / 'model.safetensors'} and the tokenizer next to them",
            hint="load them with safetensors.torch.load_model(your_model, path), or train a transformers "
            "config (--model.name path/to/config.json) to export a directory from_pretrained loads",
        )
    eos = tok.eos_id
    model.config.eos_token_id = eos
    model.config.bos_token_id = eos  # documents are joined with EOS: it is what precedes a document
    model.config.pad_token_id = None
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(str(tmp), safe_serialization=True)
    _check_tokenizer(tok, tmp, out)
    _replace(tmp, out)
    return out


def _last_checkpoints(run: Path, ckpt: Path, k: int) -> list[Path]:
    """The k complete checkpoints of the run ending at `ckpt`, oldest first; each verified."""
    from flame.checkpoint import list_checkpoints, step_of, verify

    if run == ckpt:
        raise FlameError("--average needs a run directory (its checkpoints), not a lone checkpoint")
    done = [p for p in list_checkpoints(run / "checkpoints") if step_of(p) <= step_of(ckpt)]
    if len(done) < k:
        have = ", ".join(str(step_of(p)) for p in done)
        raise FlameError(
            f"--average {k}: the run has {len(done)} checkpoint(s) up to step {step_of(ckpt)} ({have})",
            hint="average fewer, or keep more while training (--checkpoint.keep)",
        )
    chosen = done[-k:]
    for p in chosen:
        problem = verify(p, True)
        if problem is not None:
            raise CheckpointError(f"--average: checkpoint {p} cannot be used: {problem}")
    steps = ", ".join(str(step_of(p)) for p in chosen)
    print(f"averaging the weights of {k} checkpoints (steps {steps})", file=sys.stderr)
    return chosen


def _average_into(model: nn.Module, ckpts: list[Path]) -> None:
    """model's floating-point weights := the mean of theirs in `ckpts` (summed in fp64); integer
    buffers (counters) are the last checkpoint's."""
    sums: dict[str, torch.Tensor] = {}
    for p in ckpts:
        load_model_weights(p, model, "the model its config describes")
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                sums[k] = sums[k] + v.double() if k in sums else v.double()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in sums:
                v.copy_(sums[k] / len(ckpts))


def _check_tokenizer(tok, tmp: Path, out: Path) -> None:
    """Refuse (removing `tmp`, leaving `out` as it was) unless transformers, loading `tmp` as a user
    will, tokenizes exactly as the run did. Its model type can make transformers pick a tokenizer
    class that rebuilds tokenizer.json; the directory then asks for the file as it is, and is
    checked again."""
    from flame.data.tokenizer import keep_tokenizer_json, transformers_mismatch

    problem = transformers_mismatch(tok, str(tmp))
    if problem is None:
        return
    keep_tokenizer_json(str(tmp))
    if transformers_mismatch(tok, str(tmp)) is None:
        return
    shutil.rmtree(tmp, ignore_errors=True)
    raise FlameError(
        f"not exported: AutoTokenizer.from_pretrained({str(out)!r}) would not tokenize as the run did, "
        f"so the model would see other token ids than it was trained on. {problem}",
        hint="train with a tokenizer that transformers loads unchanged for this model type, or use the "
        "checkpoint with flame itself (flame generate RUN_DIR)",
    )


EXPORT_MARKER = ".flame-export"  # written into every export: what --force may replace


def _check_out(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an --out that is, holds or lies inside an input (the run, its checkpoint); --force
    replaces only a previous export, never a directory flame did not write."""
    if out.is_symlink():  # replacing would remove the link's target or only the link: neither is asked
        raise FlameError(
            f"--out {out} is a symbolic link (to {os.readlink(out)}): flame writes exports only to a "
            "real directory",
            hint="pass the directory it points to as --out, or remove the link first",
        )
    o = out.resolve()
    for src in inputs:
        r = src.resolve()
        if o == r or r.is_relative_to(o) or o.is_relative_to(r):
            raise FlameError(
                f"--out {out} would overwrite {src}, which this export reads (it is, holds or lies inside it)",
                hint="choose an --out outside the run directory, e.g. exports/<name>",
            )
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FlameError(
                f"--out {out} exists and is not empty", hint="choose another --out, or pass --force"
            )
        if not (out / EXPORT_MARKER).is_file():
            raise FlameError(
                f"--out {out} is not an earlier flame export (no {EXPORT_MARKER} file): --force replaces only those",
                hint="choose another --out, or remove that directory yourself",
            )


def _replace(tmp: Path, out: Path) -> None:
    (tmp / EXPORT_MARKER).write_text("written by flame export; --force may replace this directory\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="flame export",
        description="Write a checkpoint of a run as a Hugging Face model directory "
        "(config.json, model.safetensors, generation_config.json, tokenizer).",
        epilog=TRUST_NOTE,
    )
    p.add_argument("run_dir", help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--step", type=int, default=None, help="export the checkpoint of this step")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights' dtype (default fp32)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--average",
        type=int,
        default=1,
        metavar="K",
        help="export the mean of the weights of the last K checkpoints (ending at --step); default 1",
    )
    a = p.parse_args(argv)
    out = export(a.run_dir, a.out, a.step, a.dtype, a.force, a.average)
    print(f"exported to {out} ({a.dtype})")
    print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    print(f"continue pretraining from it: flame train --model.init_from {out} ...")
    return 0


__all__ = ["export", "find_checkpoint", "cli"]
