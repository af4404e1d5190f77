"""Build the model: a preset, any transformers causal-LM config.json, or `pkg.module:function`."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import torch
from torch import nn

from flame.config import ModelConfig
from flame.errors import ConfigError, FlameError

PRESETS: dict[str, dict] = {
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


def _import_modules(names: list[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"model.import_modules: cannot import '{name}': {e}") from None


def _hf_config(cfg: ModelConfig, vocab_size: int, context_len: int):
    """The transformers config, with model.overrides passed to its constructor (so derived
    fields such as head_dim follow them)."""
    from transformers import AutoConfig, LlamaConfig

    if cfg.name in PRESETS:
        fields = dict(
            vocab_size=vocab_size,
            max_position_embeddings=max(context_len, 128),
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            **PRESETS[cfg.name],
        )
        _check_overrides(LlamaConfig(), cfg.overrides)
        try:
            return LlamaConfig(**{**fields, **cfg.overrides})
        except Exception as e:  # transformers' strict config fields raise their own types
            raise ConfigError(f"model.overrides: the {cfg.name} preset rejects them: {_reason(e)}") from None
    path = Path(cfg.name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"model.name = {cfg.name!r} is neither a preset ({', '.join(PRESETS)}), a config.json, "
            "nor pkg.module:function"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"model.name: {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ConfigError(f"model.name: {path} has no 'model_type'; is it a transformers config.json?")
    try:
        fields = dict(raw)
        model_type = fields.pop("model_type")
        _check_overrides(AutoConfig.for_model(model_type, **fields), cfg.overrides)
        if cfg.vocab_size:
            fields["vocab_size"] = cfg.vocab_size
        return AutoConfig.for_model(model_type, **{**fields, **cfg.overrides})
    except ConfigError:
        raise
    except Exception as e:  # transformers raises many types for unknown model types
        if "Unrecognized model identifier" in str(e):
            raise ConfigError(
                f"model.name: {path} has model_type {raw['model_type']!r}, which transformers does not know "
                "(add the package that defines it to model.import_modules, e.g. fla)"
            ) from None
        raise ConfigError(f"model.name: transformers cannot read {path}: {str(e)[:300]}") from None


def _reason(e: BaseException) -> str:
    """The informative line of a (possibly multi-line, wrapped) exception message."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    if len(lines) > 1:  # a wrapper whose last line names the real error
        return lines[-1][:300]
    return f"{type(e).__name__}: {lines[0]}"[:300] if lines else type(e).__name__


def _check_overrides(hf, overrides: dict) -> None:
    unknown = [k for k in overrides if not hasattr(hf, k)]
    if unknown:
        raise ConfigError(f"model.overrides: the {hf.model_type} config has no field(s) {', '.join(unknown)}")


def build_model(cfg: ModelConfig, tokenizer_vocab: int, context_len: int) -> nn.Module:
    """The model on CPU in fp32, its vocabulary reconciled with the tokenizer's."""
    _import_modules(cfg.import_modules)
    if cfg.init_from:
        model = _from_pretrained(cfg.init_from)
    elif ":" in cfg.name and cfg.name not in PRESETS and not Path(cfg.name).exists():
        model = _from_function(cfg, tokenizer_vocab, context_len)
    else:
        from transformers import AutoModelForCausalLM

        hf = _hf_config(cfg, cfg.vocab_size or tokenizer_vocab, context_len)
        try:
            try:
                model = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa")
            except ValueError:
                model = AutoModelForCausalLM.from_config(hf)
        except Exception as e:  # impossible sizes or values, often from model.overrides
            edited = " with model.overrides" if cfg.overrides else ""
            raise ConfigError(
                f"model.name = {cfg.name!r}{edited}: transformers cannot build the model: {_reason(e)}"
            ) from None
    _reconcile_vocab(model, cfg, tokenizer_vocab)
    return model


def _from_pretrained(path: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise ConfigError(f"model.init_from: no such directory '{path}'")
    try:
        if torch.get_default_device().type == "meta":  # an FSDP rank that receives rank 0's weights
            from transformers import AutoConfig

            hf = AutoConfig.from_pretrained(path, local_files_only=True)
            return AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as e:
        raise ConfigError(f"model.init_from: cannot load a model from {path}: {e}") from None


def _from_function(cfg: ModelConfig, vocab: int, context_len: int) -> nn.Module:
    mod_name, _, fn_name = cfg.name.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.name = {cfg.name!r}: cannot import: {e}") from None
    params = inspect.signature(fn).parameters
    kwargs = dict(cfg.overrides)
    if "vocab_size" in params:
        kwargs.setdefault("vocab_size", cfg.vocab_size or vocab)
    if "context_len" in params:
        kwargs.setdefault("context_len", context_len)
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name = {cfg.name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def model_vocab(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return None if emb is None else emb.num_embeddings


def _reconcile_vocab(model: nn.Module, cfg: ModelConfig, tokenizer_vocab: int) -> None:
    have = model_vocab(model)
    if have is None or have >= tokenizer_vocab:
        return
    if cfg.resize_vocab and hasattr(model, "resize_token_embeddings"):
        model.resize_token_embeddings(tokenizer_vocab)
        return
    if cfg.resize_vocab:
        raise ConfigError(
            f"the model has {have} vocabulary rows, the tokenizer {tokenizer_vocab}, and it cannot resize"
        )
    raise ConfigError(
        f"the model has {have} vocabulary rows but the tokenizer has {tokenizer_vocab} tokens: set "
        "model.vocab_size to at least that, or --model.resize_vocab true to grow the embeddings"
    )


MODEL_KEYS = ("input_ids", "labels", "position_ids", "cu_seqlens", "max_seqlen")


def forward_loss(model: nn.Module, batch: dict, accepts: set[str]) -> torch.Tensor:
    """Mean next-token loss of a batch; passes only the keys the model's forward accepts."""
    kw = {"input_ids": batch["input_ids"], "labels": batch.get("labels", batch["input_ids"])}
    for k in ("position_ids", "cu_seqlens", "max_seqlen"):
        if k in batch and k in accepts:
            kw[k] = batch[k]
    if "use_cache" in accepts:  # no KV cache in training: it would hold every layer's keys and values
        kw["use_cache"] = False
    out = model(**kw)
    loss = out if isinstance(out, torch.Tensor) else getattr(out, "loss", None)
    if loss is None and isinstance(out, (tuple, list)):
        loss = out[0]
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise FlameError(
            f"the model's forward returned {type(out).__name__} without a scalar .loss",
            hint="a custom model's forward(input_ids, labels) must return the loss or an object with .loss",
        )
    return loss


def forward_params(model: nn.Module) -> set[str]:
    params = inspect.signature(model.forward).parameters
    names = set(params)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        names.add("position_ids")  # HF models take it through **kwargs too
    return names


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: nn.Module, context_len: int, override: float = 0.0) -> float:
    """Training FLOPs per token: the model's own figure, else 6N + 12 * layers * hidden * context.

    N counts every weight that takes part in a matmul: the input embedding is a lookup, so it is
    left out unless it is tied to the output projection.
    """
    if override:
        return override
    for name in ("num_flops_per_token", "flops_per_token"):
        f = getattr(model, name, None)
        if f is not None:
            return float(f(context_len) if callable(f) else f)
    n = count_params(model)
    emb_fn = getattr(model, "get_input_embeddings", None)
    out_fn = getattr(model, "get_output_embeddings", None)
    emb = emb_fn() if callable(emb_fn) else None
    out = out_fn() if callable(out_fn) else None
    if emb is not None and (out is None or out.weight is not emb.weight):
        n -= emb.weight.numel()
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    hidden = getattr(cfg, "hidden_size", 0) or 0
    return 6.0 * n + 12.0 * layers * hidden * context_len
