"""Every knob of a run: typed dataclass sections, TOML + `--section.key value` overrides, validation.

Precedence: defaults < TOML file (`--config`) < command line. Every problem found is collected
and raised as one ConfigError (exit code 2) before any model or data is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flame.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A config field with a one-line help shown by --help."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# Built-in models: llama configs of these sizes (the vocabulary comes from the tokenizer).
MODEL_PRESETS: dict[str, dict] = {
    # ~0.9M parameters: the embedded default, trains in a couple of minutes on a laptop CPU.
    "tiny": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    # GPT-2-small-sized llama (~125M with a 32k vocabulary).
    "llama-125m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
    ),
}
# model.attn_implementation values known without importing transformers (it is asked about others)
ATTN_IMPLEMENTATIONS = (
    "auto",
    "sdpa",
    "eager",
    "flex_attention",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "paged|eager",
)


@dataclass
class ModelConfig:
    """What is trained: the architecture, its vocabulary and kernels."""

    name: str = _f(
        "tiny",
        "preset name (tiny, llama-125m), a path to a transformers config.json, pkg.module:function "
        "or path/to/file.py:function",
    )
    import_modules: list[str] = _f(
        [], "packages to import before building (e.g. fla, to register its models)"
    )
    vocab_size: int = _f(
        0, "vocabulary rows; 0 = the tokenizer's vocabulary size (also over a config.json's vocab_size)"
    )
    pad_vocab_multiple: int = _f(
        0, "round the vocabulary rows up to a multiple of this (e.g. 64 or 128, for speed); 0 = off"
    )
    resize_vocab: bool = _f(
        False, "grow the model's embeddings when the tokenizer is larger (else it is an error)"
    )
    attn_implementation: str = _f(
        "auto",
        "attention kernel: auto (sdpa where the model supports it, else eager), sdpa, eager, "
        "flex_attention, flash_attention_2, ... (any name transformers accepts)",
    )
    init_from: str = _f("", "Hugging Face model directory to load weights from (continued pretraining)")
    flops_per_token: float = _f(0.0, "training FLOPs per token for MFU; 0 = from the model or 6N + attention")
    loss: Literal["auto", "fused", "logits"] = _f(
        "auto",
        "how the loss is computed: fused (hidden states -> head -> cross-entropy in chunks, no "
        "[batch, time, vocab] logits), logits (from the model's logits), auto = fused where flame "
        "reproduces the model's head exactly, else logits (said once)",
    )
    loss_chunk: int = _f(0, "fused loss: tokens per chunk of logits; 0 = auto (about 64 MiB of fp32 logits)")
    overrides: dict = _f(
        {},
        "extra fields set on the transformers config: in a TOML file overrides = {hidden_size = 512}, on "
        "the command line JSON '{\"hidden_size\": 512}' (the TOML form '{hidden_size = 512}' works too)",
    )


@dataclass
class DataConfig:
    """What it is trained on: inputs or stores, tokenizer, sequence length, order."""

    inputs: list[str] = _f(
        [], "files, folders or globs of .txt/.jsonl(.gz/.zst)/.parquet, or hf:NAME / a saved HF dataset"
    )
    store: str = _f("", "a tokenized store made by `flame prepare` (memory-mapped; fastest)")
    mix: str = _f("", "weighted stores, e.g. 'a_store:0.7,b_store:0.3'")
    phases: list[dict] = _f(
        [],
        "mixture phases: [[data.phases]] tables of start_step (or start_tokens), mix and optional "
        "ramp_steps; on the command line a JSON list of objects (or a TOML inline array of tables)",
    )
    skip: str = _f("", "steps whose data is consumed without training, e.g. '1200-1250,3000'")
    epoch_shift: bool = _f(
        False, "shift each store's window grid by a keyed offset every epoch after the first"
    )
    tokenizer: str = _f("byte", "'byte' (built in) or a Hugging Face tokenizer directory or tokenizer.json")
    text_field: str = _f("text", "field holding the text in jsonl/parquet/HF records")
    context_len: int = _f(256, "tokens per training sequence")
    batch_size: int = _f(16, "sequences per micro-batch on each rank")
    seed: int = _f(1234, "seed of the data order (the shuffle)")
    shuffle: bool = _f(True, "shuffle samples (a stateless global permutation per epoch)")
    varlen: bool = _f(False, "pass document boundaries (cu_seqlens, position_ids) to the model")
    streaming: bool = _f(
        False, "tokenize raw inputs on the fly in loader workers instead of preparing a store"
    )
    window: int = _f(256, "streaming: samples packed and shuffled together in one window")
    num_workers: int = _f(0, "loader worker processes per rank (0 = read in the training process)")
    bad_records: Literal["skip", "error"] = _f(
        "skip", "skip (count, warn and summarise) or error on malformed records"
    )
    max_bad_fraction: float = _f(0.5, "stop when more than this fraction of records is bad")
    cache_dir: str = _f(
        "",
        "where raw inputs are prepared into stores keyed by their content, shared by runs; '' = "
        "$FLAME_CACHE, else $XDG_CACHE_HOME/flame, else ~/.cache/flame",
    )


@dataclass
class TrainConfig:
    """The run: its directory, length, precision and guards."""

    run_dir: str = _f("runs/default", "directory for config, metrics, checkpoints")
    max_steps: int = _f(300, "optimizer steps to train (0 = use max_tokens)")
    max_tokens: int = _f(0, "stop after this many tokens (when max_steps is 0)")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    seed: int = _f(0, "seed of model init and dropout")
    device: Literal["auto", "cpu", "cuda"] = _f(
        "auto", "where to train: auto = cuda when available, else cpu"
    )
    dtype: Literal["auto", "fp32", "bf16"] = _f("auto", "auto = bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = _f(False, "torch.compile the model")
    activation_checkpointing: bool = _f(False, "recompute block activations in the backward pass")
    deterministic: bool = _f(
        False,
        "torch.use_deterministic_algorithms: bit-identical runs and resumes where kernels add in a "
        "varying order (a mixture of experts' expert loop, gpt_oss; scatter/index_add on CUDA); slower",
    )
    max_bad_steps: int = _f(
        5, "stop after this many consecutive NaN/Inf steps, each skipped (0 = no guard, no per-step sync)"
    )
    spike_factor: float = _f(
        0.0, "skip updates whose loss exceeds this multiple of the running mean (0 = off)"
    )
    preempt_signals: list[str] = _f(["SIGTERM", "SIGUSR1"], "signals that checkpoint and exit cleanly")
    sample_tokens: int = _f(120, "tokens of text generated at the end of the run (0 = none)")


@dataclass
class OptimConfig:
    """The optimizer (AdamW, or Muon for the hidden matrices) and the learning-rate schedule."""

    lr: float = _f(3e-3, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to norms and biases)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    warmup_steps: int = _f(30, "linear warmup steps")
    schedule: Literal["cosine", "linear", "constant", "wsd"] = _f(
        "cosine", "learning-rate schedule after warmup (wsd: warmup-stable-decay)"
    )
    decay_fraction: float = _f(0.2, "wsd: fraction of steps spent in the final decay")
    fused: Literal["auto", "true", "false"] = _f("auto", "fused AdamW (auto = on CUDA)")
    name: Literal["adamw", "muon"] = _f(
        "adamw",
        "optimizer: adamw, or muon for the hidden 2-d weight matrices (attention and MLP projections) "
        "with AdamW (optim.lr, betas, eps) for embeddings, the output head, norms, biases and other shapes",
    )
    muon_lr: float = _f(0.02, "muon: peak learning rate of the hidden matrices (same schedule as optim.lr)")
    muon_weight_decay: float = _f(0.0, "muon: decoupled weight decay of the hidden matrices")
    muon_momentum: float = _f(0.95, "muon: momentum of the hidden matrices' update")
    muon_nesterov: bool = _f(True, "muon: Nesterov momentum")
    muon_ns_steps: int = _f(5, "muon: Newton-Schulz iterations orthogonalizing each update (1 to 99)")
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = _f(
        "original",
        "muon: lr scaling per matrix shape: original (sqrt(max(1, rows/cols)), Keller Jordan's) or "
        "match_rms_adamw (0.2 sqrt(max(rows, cols)): an update of AdamW's RMS, so muon_lr ~ optim.lr)",
    )


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    interval: int = _f(100, "save every this many steps (0 = only at the end and on preemption)")
    keep: int = _f(2, "keep the latest this many checkpoints")
    load: str = _f("", "resume from this checkpoint directory instead of the run's latest")
    resume: bool = _f(True, "resume automatically from the run directory's latest checkpoint")
    allow_config_change: bool = _f(False, "resume even when the data order or model shape would change")
    checksums: bool = _f(True, "record and verify checksums of checkpoint files")
    async_save: bool = _f(
        False,
        "write interval checkpoints in the background; each is marked COMPLETE only after every rank's write",
    )


@dataclass
class LogConfig:
    """Console, metrics.jsonl and optional sinks."""

    interval: int = _f(10, "log every this many steps")
    console: Literal["auto", "plain", "off", "rich"] = _f(
        "auto", "console progress: auto = a progress bar on a terminal, plain lines elsewhere"
    )
    tensorboard: bool = _f(False, "write TensorBoard event files to <run_dir>/tb")
    wandb: Literal["off", "online", "offline"] = _f("off", "Weights & Biases logging")
    wandb_project: str = _f("flame", "Weights & Biases project")
    peak_flops: float = _f(0.0, "peak FLOP/s of one device for MFU; 0 = known GPUs only")
    batches: bool = _f(False, "record each micro-batch's sample ids and token hash in <run_dir>/batches/")


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    interval: int = _f(0, "evaluate every this many steps and at the end (0 = off)")
    batches: int = _f(
        8,
        "batches of eval.batch_size windows per held-out set, spread over the whole set (the same "
        "windows at every evaluation, split across ranks); 0 = every window of the set",
    )
    batch_size: int = _f(0, "windows per forward pass on each rank (0 = data.batch_size)")
    at_start: bool = _f(False, "also evaluate before the first step (step 0)")
    inputs: list[str] = _f([], "held-out raw inputs ([] = data.store's / data.mix's <store>/val)")
    store: str = _f("", "held-out tokenized store ('' = data.store's / data.mix's <store>/val)")


@dataclass
class ParallelConfig:
    """Processes and how the model is spread over them."""

    strategy: Literal["auto", "none", "ddp", "fsdp"] = _f(
        "auto", "data parallelism: auto = none on one process, fsdp otherwise"
    )
    backend: Literal["auto", "nccl", "gloo"] = _f(
        "auto", "process-group backend: auto = nccl on CUDA, gloo on CPU"
    )
    init: Literal["auto", "rank0", "meta"] = _f(
        "auto",
        "fsdp weights: auto/rank0 (rank 0 builds on CPU and broadcasts: the same weights as one process), "
        "meta (each rank inits its shards: for models larger than host memory)",
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return to_toml(self.to_dict())


_SECTION_TYPES = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
    "eval": EvalConfig,
    "parallel": ParallelConfig,
}


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def choices_of(typ: Any) -> tuple[str, ...] | None:
    """The allowed values of a `Literal[...]` field type; None for any other type."""
    return typing.get_args(typ) if typing.get_origin(typ) is Literal else None


@functools.cache
def choice_fields() -> dict[str, tuple[str, ...]]:
    """{section.key: allowed values} of every field annotated `Literal[...]` (the one table of choices)."""
    return {
        f"{s}.{k}": c
        for s, cls in _SECTION_TYPES.items()
        for k, t in _field_types(cls).items()
        if (c := choices_of(t)) is not None
    }


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in _SECTION_TYPES.items() for k in _field_types(cls)]


def _suggest(key: str) -> str:
    keys = all_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:  # a known key name under the wrong section, or a typo of the key alone
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
        near = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.7)
        close = [leaves[near[0]]] if near else []
    return f" (did you mean {close[0]}?)" if close else " (see `flame train --help` for the keys)"


def _convert(key: str, typ: Any, value: Any, from_cli: bool) -> Any:
    """Convert a TOML or CLI value to the field's type, or raise ValueError with a readable reason."""
    origin = typing.get_origin(typ)
    if origin is Literal:  # a string; whether it is one of the choices is validate()'s (with a did-you-mean)
        return _convert(key, str, value, from_cli)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if (
            from_cli
            and isinstance(value, str)
            and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off")
        ):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_cli and isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise ValueError(f"expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if from_cli and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)
        raise ValueError(f"expected a string, got {value!r}")
    if origin is list and typing.get_args(typ) and typing.get_args(typ)[0] is dict:
        if from_cli and isinstance(value, str):
            text, value = value, _parse_inline(value)
            if value is None:
                raise ValueError(
                    f'expected a JSON list of tables like \'[{{"start_step": 0, "mix": "a:1"}}]\', got {text!r}'
                )
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ValueError(f"expected a list of tables, got {value!r}")
        return [dict(v) for v in value]
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if from_cli else [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of strings, got {value!r}")
        return list(value)
    if typ is dict or origin is dict:
        if from_cli and isinstance(value, str):
            text, value = value, _parse_inline(value)
            if value is None:
                raise ValueError(
                    f"expected a JSON object like '{{\"hidden_size\": 512}}' (or a TOML inline table like "
                    f"'{{hidden_size = 512}}'), got {text!r}"
                )
        if not isinstance(value, dict):
            raise ValueError(f"expected a table, got {value!r}")
        return value
    raise ValueError(f"unsupported type {typ}")  # our own bug, not the user's


def _parse_inline(text: str) -> Any:
    """A command-line value for a table or a list of tables: JSON, or the TOML inline form a config
    file uses (`{hidden_size = 512}`), so either spelling works; None when it is neither."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, KeyError):
        return None


def _apply(cfg: Config, items: dict[str, Any], origin: str, from_cli: bool, problems: list[str]) -> None:
    for key, value in items.items():
        section, _, name = key.partition(".")
        cls = _SECTION_TYPES.get(section)
        if cls is None or name not in _field_types(cls):
            problems.append(f"unknown key '{key}' in {origin}{_suggest(key)}")
            continue
        typ = _field_types(cls)[name]
        try:
            value = _convert(key, typ, value, from_cli)
        except ValueError as e:
            problems.append(f"{key} in {origin}: {e}")
            continue
        if key == "data.inputs" and from_cli and not value:
            # an empty value is a mistake (e.g. an unset shell variable), not a request for the default
            problems.append(
                "--data.inputs is given without a value: name files, folders or globs "
                "(or 'stdlib'), or leave the option out for the default corpus"
            )
            continue
        setattr(getattr(cfg, section), name, value)


def _flatten_toml(data: dict, problems: list[str], origin: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, body in data.items():
        if section not in _SECTION_TYPES:
            if isinstance(body, dict):
                near = difflib.get_close_matches(section, list(_SECTION_TYPES), n=1, cutoff=0.6)
                hint = (
                    f" (did you mean [{near[0]}]?)" if near else f" (sections: {', '.join(_SECTION_TYPES)})"
                )
                problems.append(f"unknown section [{section}] in {origin}{hint}")
            else:
                problems.append(
                    f"key '{section}' in {origin} must be inside a section like [train]{_suggest(section)}"
                )
            continue
        if not isinstance(body, dict):
            problems.append(f"[{section}] in {origin} must be a table")
            continue
        for k, v in body.items():
            flat[f"{section}.{k}"] = v
    return flat


def parse_cli_overrides(args: list[str], problems: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split `--config F --a.b v --c.d=v --flag` into the config path and a {key: value} dict."""
    config_path = None
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--"):
            problems.append(f"unexpected argument '{tok}' (options look like --section.key value)")
            i += 1
            continue
        key, eq, val = tok[2:].partition("=")
        key = key.replace("-", "_")
        values: list[str] = [val] if eq else []
        j = i + 1
        if not eq:
            while j < len(args) and not (
                args[j].startswith("--") and len(args[j]) > 2 and not _is_number(args[j])
            ):
                values.append(args[j])
                j += 1
        i = j
        if key == "config":
            if len(values) != 1:
                problems.append("--config takes one TOML file")
            else:
                config_path = values[0]
            continue
        typ = _type_of(key)
        if typ is None:
            problems.append(f"unknown option '--{key}'{_suggest(key)}")
            continue
        if typ is bool and not values:
            out[key] = "true"
        elif typing.get_origin(typ) is list:
            out[key] = ",".join(values)
        elif len(values) != 1:
            problems.append(f"--{key} takes one value, got {len(values)}")
        else:
            out[key] = values[0]
    return config_path, out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _type_of(key: str) -> Any:
    section, _, name = key.partition(".")
    cls = _SECTION_TYPES.get(section)
    if cls is None:
        return None
    return _field_types(cls).get(name)


def load_config(
    args: list[str] | None = None, toml_path: str | None = None, overrides: dict | None = None
) -> Config:
    """Build a validated Config from CLI args (and/or an explicit TOML path and override dict)."""
    problems: list[str] = []
    cli_path, cli_items = parse_cli_overrides(list(args or []), problems)
    path = cli_path or toml_path
    cfg = Config()
    if path:
        p = Path(path)
        if p.is_dir():
            problems.append(f"--config: '{path}' is a directory, not a TOML file")
        elif not p.is_file():
            problems.append(f"--config: no such file '{path}'")
        else:
            try:
                data = tomllib.loads(p.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path} is not valid TOML: {e}") from None
            except OSError as e:  # unreadable: permissions, a directory's I/O error
                raise ConfigError(
                    f"--config: cannot read '{path}': {e.strerror or e} (check its permissions)"
                ) from None
            _apply(cfg, _flatten_toml(data, problems, str(p)), str(p), False, problems)
    if overrides:
        _apply(cfg, overrides, "overrides", False, problems)
    _apply(cfg, cli_items, "the command line", True, problems)
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from a saved dict (a checkpoint or config.toml), validating as usual."""
    problems: list[str] = []
    cfg = Config()
    _apply(cfg, _flatten_toml(d, problems, "saved config"), "saved config", False, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def validate(cfg: Config) -> list[str]:
    """Every impossible value, each naming its key and the fix."""
    p: list[str] = []
    d, t, o, c, lg = cfg.data, cfg.train, cfg.optim, cfg.checkpoint, cfg.log
    p.extend(_numbers_in_range(cfg))
    for key, choices in choice_fields().items():
        s, n = key.split(".")
        v = getattr(getattr(cfg, s), n)
        if v not in choices:
            close = difflib.get_close_matches(str(v), choices, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            p.append(f"{key} = {v!r} is not one of {', '.join(choices)}{hint}")

    def positive(key: str, v: float, zero_ok: bool = False) -> None:
        if not math.isfinite(v):
            return  # reported by _numbers_in_range
        if v < 0 or (v == 0 and not zero_ok):
            p.append(f"{key} = {v} must be {'>= 0' if zero_ok else '> 0'}")

    positive("data.context_len", d.context_len)
    positive("data.batch_size", d.batch_size)
    positive("data.window", d.window)
    positive("data.num_workers", d.num_workers, zero_ok=True)
    positive("train.grad_accum", t.grad_accum)
    positive("train.max_steps", t.max_steps, zero_ok=True)
    positive("train.max_tokens", t.max_tokens, zero_ok=True)
    positive("train.grad_clip", t.grad_clip, zero_ok=True)
    positive("train.max_bad_steps", t.max_bad_steps, zero_ok=True)
    positive("train.sample_tokens", t.sample_tokens, zero_ok=True)
    positive("optim.lr", o.lr)
    positive("optim.weight_decay", o.weight_decay, zero_ok=True)
    positive("optim.warmup_steps", o.warmup_steps, zero_ok=True)
    positive("optim.eps", o.eps)
    positive("optim.muon_lr", o.muon_lr)
    positive("optim.muon_weight_decay", o.muon_weight_decay, zero_ok=True)
    positive("checkpoint.interval", c.interval, zero_ok=True)
    positive("checkpoint.keep", c.keep)
    positive("log.interval", lg.interval)
    positive("log.peak_flops", lg.peak_flops, zero_ok=True)
    positive("eval.interval", cfg.eval.interval, zero_ok=True)
    positive("eval.batches", cfg.eval.batches, zero_ok=True)
    positive("eval.batch_size", cfg.eval.batch_size, zero_ok=True)
    positive("model.vocab_size", cfg.model.vocab_size, zero_ok=True)
    positive("model.flops_per_token", cfg.model.flops_per_token, zero_ok=True)
    positive("model.pad_vocab_multiple", cfg.model.pad_vocab_multiple, zero_ok=True)
    positive("model.loss_chunk", cfg.model.loss_chunk, zero_ok=True)
    p.extend(_model_problems(cfg.model))
    nulls = _null_keys(cfg.model.overrides)
    if nulls:
        p.append(
            f"model.overrides: null at {', '.join(nulls)}, which TOML (the saved config.toml) cannot "
            "hold: leave the key out to keep the model's default"
        )
    if t.max_steps == 0 and t.max_tokens == 0:
        p.append(
            "train.max_steps and train.max_tokens are both 0: set one of them (e.g. --train.max_steps 1000)"
        )
    if not 0 <= o.min_lr_ratio <= 1:
        p.append(f"optim.min_lr_ratio = {o.min_lr_ratio} must be between 0 and 1")
    if not 0 < o.decay_fraction <= 1:
        p.append(f"optim.decay_fraction = {o.decay_fraction} must be in (0, 1]")
    for k, b in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2), ("optim.muon_momentum", o.muon_momentum)):
        if not 0 <= b < 1:
            p.append(f"{k} = {b} must be in [0, 1)")
    if not 1 <= o.muon_ns_steps <= 99:
        p.append(f"optim.muon_ns_steps = {o.muon_ns_steps} must be between 1 and 99 (5 is usual)")
    if not 0 < d.max_bad_fraction <= 1:
        p.append(f"data.max_bad_fraction = {d.max_bad_fraction} must be in (0, 1]")
    import signal as _signal

    for name in t.preempt_signals:
        sig = getattr(_signal, name, None) if name.startswith("SIG") and not name.startswith("SIG_") else None
        if not isinstance(sig, _signal.Signals):
            p.append(f"train.preempt_signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
        elif sig in (_signal.SIGKILL, _signal.SIGSTOP):
            p.append(f"train.preempt_signals: {name} cannot be caught; use e.g. SIGTERM or SIGUSR1")
    if t.spike_factor and t.spike_factor <= 1:
        p.append(f"train.spike_factor = {t.spike_factor} must be > 1 (or 0 to turn the guard off)")
    sources = sum(bool(x) for x in (d.inputs, d.store, d.mix, d.phases))
    if sources > 1:
        p.append("give only one of data.inputs, data.store, data.mix and data.phases")
    if d.streaming and (d.store or d.mix or d.phases):
        p.append(
            "data.streaming reads raw data.inputs; it cannot be used with data.store, data.mix or data.phases"
        )
    p.extend(_phase_problems(d.phases))
    if d.skip:
        from flame.data.packed import parse_skip

        try:
            parse_skip(d.skip)
        except ValueError as e:
            p.append(f"data.skip = {d.skip!r}: {e} (write e.g. '1200-1250,3000')")
    for key, value in (("data.store", d.store), ("eval.store", cfg.eval.store), ("checkpoint.load", c.load)):
        if value and not Path(value).exists():
            p.append(f"{key}: no such directory '{value}'")
    if d.mix:
        from flame.data.mixture import parse_mix

        try:
            for path, _w in parse_mix(d.mix):
                if not Path(path).exists():
                    p.append(f"data.mix: no such store '{path}'")
        except ValueError as e:
            p.append(f"data.mix: {e}")
    for key, specs in (("data.inputs", d.inputs), ("eval.inputs", cfg.eval.inputs)):
        for spec in specs:
            if not spec.strip():
                p.append(f"{key}: an entry is empty ('{spec}'): name files, folders or globs, or 'stdlib'")
            elif not _input_exists(spec):
                p.append(f"{key}: '{spec}' matches no file or directory")
    if (cfg.eval.interval or cfg.eval.at_start) and not (cfg.eval.store or cfg.eval.inputs):
        from flame.data.mixture import parse_mix

        try:
            stores = [path for path, _ in parse_mix(d.mix)] if d.mix else [d.store] if d.store else []
            stores += [path for ph in d.phases for path, _ in parse_mix(ph["mix"])]
        except (ValueError, KeyError, TypeError, AttributeError):  # reported above
            stores = []
        if not any(Path(s, "val").is_dir() for s in stores):
            key = "eval.interval" if cfg.eval.interval else "eval.at_start"
            p.append(
                f"{key} is set but there is no held-out data: set eval.store or eval.inputs, or prepare "
                "data.store / the data.mix stores with `flame prepare --val-fraction` (their <store>/val)"
            )
    if d.tokenizer != "byte" and not Path(d.tokenizer).exists():
        p.append(
            f"data.tokenizer: no such file or directory '{d.tokenizer}' (use 'byte' for the built-in tokenizer)"
        )
    return p


_PHASE_KEYS = ("start_step", "start_tokens", "mix", "ramp_steps")


def _phase_problems(phases: list[dict]) -> list[str]:
    """data.phases: each a start (start_step or start_tokens), a mix of existing stores, a ramp >= 0."""
    from flame.data.mixture import DataPlan, parse_named_mix

    p: list[str] = []
    last = -1
    for i, ph in enumerate(phases):
        key = f"data.phases[{i}]"
        extra = sorted(set(ph) - set(_PHASE_KEYS))
        if extra:
            p.append(f"{key}: unknown key(s) {', '.join(extra)} (a phase has {', '.join(_PHASE_KEYS)})")
        starts = [k for k in ("start_step", "start_tokens") if k in ph]
        if len(starts) != 1:
            p.append(f"{key}: give exactly one of start_step and start_tokens")
            continue
        for k in (*starts, "ramp_steps"):
            v = ph.get(k, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                p.append(f"{key}.{k} = {v!r} must be an integer >= 0")
        if i == 0 and ph.get(starts[0]) != 0:
            p.append(f"{key}: the first phase must start at 0 ({starts[0]} = 0)")
        if i == 0 and ph.get("ramp_steps"):
            p.append(f"{key}.ramp_steps: the first phase has no earlier phase to ramp from; remove it")
        if starts[0] == "start_step" and isinstance(ph["start_step"], int):
            if ph["start_step"] <= last:
                p.append(f"{key}.start_step = {ph['start_step']} must be after the previous phase's ({last})")
            last = ph["start_step"]
        if not isinstance(ph.get("mix"), str):
            p.append(
                f"{key}.mix: give the phase's weights as a string like 'web=stores/web:0.8,code=stores/code:0.2'"
            )
            continue
        try:
            for _name, path, _w in parse_named_mix(ph["mix"]):
                if not Path(path).exists():
                    p.append(f"{key}.mix: no such store '{path}'")
        except ValueError as e:
            p.append(f"{key}.mix: {e}")
    if not p and phases:
        try:
            DataPlan.from_specs([{**ph, "start_step": i} for i, ph in enumerate(phases)])
        except ValueError as e:
            p.append(f"data.phases: {e}")
    return p


def _model_problems(m: ModelConfig) -> list[str]:
    """What is wrong with the model section without building it (that happens before any data)."""
    import re

    p: list[str] = []
    name = m.name
    is_function = re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", name) is not None
    is_file_function = ":" in name and name.rpartition(":")[0].endswith(".py")
    if m.init_from:
        pass  # the weights' own config is the model; model.name is not used
    elif is_file_function:
        file = name.rpartition(":")[0]
        if not Path(file).is_file():
            p.append(f"model.name: no such file '{file}' (in {name!r})")
    elif name not in MODEL_PRESETS and not Path(name).exists() and not is_function:
        presets = list(MODEL_PRESETS)
        close = [x for x in presets if x.startswith(name)]
        close = close or difflib.get_close_matches(name, presets, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        looks_like_path = "/" in name or name.endswith(".json")
        what = f"no such file or directory '{name}'" if looks_like_path else f"{name!r} is not a preset"
        p.append(
            f"model.name: {what}{hint}; give a preset ({', '.join(presets)}), a transformers config.json "
            "(or its folder), pkg.module:function or path/to/file.py:function"
        )
    for key, knob in (
        ("vocab_size", "--model.vocab_size"),
        ("attn_implementation", "--model.attn_implementation"),
        ("_attn_implementation", "--model.attn_implementation"),
    ):
        if key in m.overrides:
            p.append(f"model.overrides: {key} is a knob of its own: use {knob} instead")
    impl = m.attn_implementation
    # hub kernels ('org/repo') and names registered by model.import_modules are checked when building
    if impl not in ATTN_IMPLEMENTATIONS and "/" not in impl and not m.import_modules:
        try:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            known = ["auto", "eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
        except ImportError:
            known = list(ATTN_IMPLEMENTATIONS)
        if impl not in known:
            close = difflib.get_close_matches(impl, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            p.append(f"model.attn_implementation = {impl!r} is not one of {', '.join(known)}{hint}")
    return p


# Upper bounds of integer knobs whose larger values would only fail later (allocations of
# petabytes, seeds numpy cannot hold); every other integer must fit in 62 bits.
INT_BOUNDS = {
    "data.context_len": 1 << 24,
    "data.batch_size": 1 << 20,
    "data.window": 1 << 24,
    "data.num_workers": 1024,
    "train.grad_accum": 1 << 20,
    "train.max_steps": 1 << 40,
    "eval.batches": 1 << 30,
    "eval.batch_size": 1 << 20,
}


def _numbers_in_range(cfg: Config) -> list[str]:
    """Every float knob finite (NaN or infinity would train NaN weights or switch a guard off
    silently), every integer knob within a bound that later code can hold."""
    out = []
    for section, cls in _SECTION_TYPES.items():
        body = getattr(cfg, section)
        for name, typ in _field_types(cls).items():
            key, v = f"{section}.{name}", getattr(body, name)
            if typ is float and not math.isfinite(v):
                out.append(f"{key} = {v} must be a finite number")
            elif typ is int and not isinstance(v, bool):
                bound = INT_BOUNDS.get(key, 1 << 62)
                if abs(v) > bound:
                    out.append(f"{key} = {v} is out of range: at most {bound:,} (2^{bound.bit_length() - 1})")
    return out


def _null_keys(value: Any, path: str = "") -> list[str]:
    """Dotted keys of a nested dict/list whose value is None (a JSON null TOML cannot write)."""
    if value is None:
        return [path or "the value"]
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in _null_keys(v, f"{path}.{key}" if path else str(key))]
    if isinstance(value, list):
        return [k for i, v in enumerate(value) for k in _null_keys(v, f"{path}[{i}]")]
    return []


def _input_exists(spec: str) -> bool:
    """Cheap existence check of an input spec (the full expansion happens when data is built)."""
    import glob

    if spec == "stdlib" or spec.startswith("hf:"):
        return True
    return Path(spec).exists() or bool(glob.glob(spec, recursive=True))


def toml_value(v: Any) -> str:
    """One value in TOML syntax (scalars, lists, inline tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(d: dict) -> str:
    """Write a nested dict of simple values as TOML (sections of scalars, lists and inline tables)."""
    val = toml_value

    lines = []
    for section, body in d.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {val(v)}" for k, v in body.items())
        lines.append("")
    return "\n".join(lines)


_META = {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR", dict: "JSON"}


def _meta(typ: Any) -> str:
    """How an option's value is written on the command line, for --help."""
    choices = choices_of(typ)
    if choices is not None:
        return "{" + ",".join(choices) + "}"
    if typing.get_origin(typ) is list:
        return "JSON" if typing.get_args(typ)[0] is dict else "LIST"
    return _META.get(typing.get_origin(typ) or typ, "VALUE")


HELP_LEGEND = (
    "Values: BOOL is true or false (a bare --flag means true); LIST is several values or one "
    "comma-separated; JSON is a JSON value (a TOML inline table like {hidden_size = 512} works too); "
    "{a,b} lists the choices."
)


def help_text(width: int = 100) -> str:
    """Every option with its type (and choices), default and one-line help, grouped by section and
    wrapped to `width` columns."""
    import textwrap

    width = max(width, 20)
    col = 34 if width >= 80 else 6  # narrow terminals: the help goes under the option
    out = []
    for section, cls in _SECTION_TYPES.items():
        out.append(textwrap.fill(f"[{section}] {(cls.__doc__ or '').strip()}", width, subsequent_indent="  "))
        inst = cls()
        for name, typ in _field_types(cls).items():
            default = getattr(inst, name)
            shown = toml_value(default)
            help = f"{cls.__dataclass_fields__[name].metadata['help']} (default: {shown})"
            left = f"  --{section}.{name} {_meta(typ)}"
            if len(left) + 2 <= col:
                first = left.ljust(col)
            else:  # the option on a line of its own, the help under it
                out.extend(textwrap.wrap(left, width, subsequent_indent=" " * 6, break_on_hyphens=False))
                first = " " * col
            out.extend(
                textwrap.wrap(
                    help, width, initial_indent=first, subsequent_indent=" " * col, break_on_hyphens=False
                )
            )
        out.append("")
    return "\n".join(out)


def changed_from_defaults(cfg: Config) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} of the values that differ from the embedded defaults."""
    default = Config().to_dict()
    return {
        section: changed
        for section, body in cfg.to_dict().items()
        if (changed := {k: v for k, v in body.items() if v != default[section][k]})
    }


def summary(cfg: Config, width: int = 100) -> str:
    """The config in a few lines: one per section, only the values that differ from the defaults."""
    import textwrap

    changed = changed_from_defaults(cfg)
    if not changed:
        return "config: the defaults"
    lines = ["config (what differs from the defaults):"]
    for section, body in changed.items():
        text = f"  [{section}] " + ", ".join(f"{k} = {toml_value(v)}" for k, v in body.items())
        lines.extend(textwrap.wrap(text, max(width, 20), subsequent_indent="    ", break_on_hyphens=False))
    return "\n".join(lines)


def resume_config(run_dir: str | Path, args: list[str]) -> Config:
    """`flame resume RUN_DIR [--key value ...]`: the run's saved config.toml, then the command line.

    The run continues where it is: train.run_dir is RUN_DIR (wherever it was started from), and a
    saved checkpoint.load / checkpoint.resume = false (a past rewind or restart) is not repeated,
    unless given again on the command line."""
    run_dir = Path(run_dir)
    path = run_dir / "config.toml"
    if not path.is_file():
        what = "does not exist" if not run_dir.exists() else "has no config.toml"
        raise ConfigError(
            f"'{run_dir}' is not a run directory (it {what}): `flame resume RUN_DIR` continues a run "
            "that started there; options look like --section.key value"
        )
    problems: list[str] = []
    cli_path, cli_items = parse_cli_overrides(list(args), problems)
    if cli_path:
        problems.append(
            f"--config: a resume reads {path}; to start a new run from it use "
            f"`flame train --config {path} --train.run_dir NEW_DIR`"
        )
    given = cli_items.get("train.run_dir")
    if given is not None and Path(given).resolve() != run_dir.resolve():
        problems.append(
            f"--train.run_dir {given}: a resume continues {run_dir}; to start a new run from its config use "
            f"`flame train --config {path} --train.run_dir {given}`"
        )
    if problems:
        raise ConfigError(problems)
    keep = {"train.run_dir": str(run_dir), "checkpoint.load": "", "checkpoint.resume": True}
    return load_config(args, toml_path=str(path), overrides=keep)


__all__ = [
    "Config",
    "load_config",
    "resume_config",
    "config_from_dict",
    "validate",
    "help_text",
    "summary",
    "changed_from_defaults",
    "choice_fields",
    "to_toml",
]
