"""Build the model: a preset, any transformers causal-LM config.json, or `pkg.module:function`.

Everything that can only be known by building (the config is readable, the sizes are possible,
the vocabulary agrees with the tokenizer, the attention implementation is supported, packed
documents stay isolated) is checked here, before any data is read.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import inspect
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from flame import fla_cpu
from flame.config import MODEL_PRESETS, ModelConfig
from flame.errors import ConfigError

PRESETS: dict[str, dict] = MODEL_PRESETS
# config.json keys that flame sets itself (model.vocab_size, model.attn_implementation)
_FLAME_KEYS = ("vocab_size", "attn_implementation", "_attn_implementation")
# What attention_of reports for a transformers model with no interchangeable attention
# (state-space and linear-attention models: Mamba, Mamba2, RWKV, fla).
NATIVE = "native"

Log = Callable[[str], None]


def _import_modules(names: list[str], say: Log) -> None:
    if fla_cpu.wanted(names):
        try:
            say(fla_cpu.enable())
        except RuntimeError as e:
            raise ConfigError(f"model.import_modules: {e}") from None
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"model.import_modules: cannot import '{name}': {e}") from None


def is_function_spec(name: str) -> bool:
    """`pkg.module:function` or `path/to/file.py:function` (not a preset or an existing path)."""
    return ":" in name and name not in PRESETS and not Path(name).exists()


def model_label(cfg: ModelConfig) -> str:
    """What a run's console and records call its model."""
    return f"{cfg.init_from} (init_from)" if cfg.init_from else cfg.name


def vocab_rows(cfg: ModelConfig, tokenizer_vocab: int) -> int:
    """Embedding rows of a model built from scratch: model.vocab_size, else the tokenizer's size,
    rounded up to a multiple of model.pad_vocab_multiple."""
    rows = cfg.vocab_size or tokenizer_vocab
    if rows < tokenizer_vocab:
        if not cfg.resize_vocab:
            raise ConfigError(
                f"model.vocab_size = {rows} is smaller than the tokenizer's {tokenizer_vocab} tokens: set "
                "--model.vocab_size 0 (the tokenizer's size), or --model.resize_vocab true to grow it"
            )
        rows = tokenizer_vocab
    return _padded(rows, cfg.pad_vocab_multiple)


def _padded(rows: int, multiple: int) -> int:
    return -(-rows // multiple) * multiple if multiple > 1 else rows


def _vocab_note(rows: int, tokenizer_vocab: int, why: str = "") -> str | None:
    if rows == tokenizer_vocab and not why:
        return None
    unused = rows - tokenizer_vocab
    extra = f", {unused:,} of them never used by the tokenizer" if unused > 0 else ""
    return f"model: {rows:,} vocabulary rows for the tokenizer's {tokenizer_vocab:,} tokens{extra}{why}"


def _hf_config(cfg: ModelConfig, rows: int, context_len: int, log: Log):
    """The transformers config (not yet bound to an attention implementation), with
    model.overrides passed to its constructor (so derived fields such as head_dim follow them)."""
    from transformers import AutoConfig, LlamaConfig

    if cfg.name in PRESETS:
        fields = dict(
            vocab_size=rows,
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
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"model.name: cannot read {path} as JSON: {e}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ConfigError(f"model.name: {path} has no 'model_type'; is it a transformers config.json?")
    fields = {k: v for k, v in raw.items() if k not in _FLAME_KEYS}
    model_type = fields.pop("model_type")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # transformers warns about special ids outside the new vocabulary; flame drops them below
    hf_logging.set_verbosity_error()
    try:
        _check_overrides(AutoConfig.for_model(model_type, **fields), cfg.overrides)
        hf = AutoConfig.for_model(model_type, **{**fields, "vocab_size": rows, **cfg.overrides})
    except ConfigError:
        raise
    except Exception as e:  # transformers raises many types for unknown model types
        if "Unrecognized model identifier" in str(e) or isinstance(e, KeyError):
            raise ConfigError(
                f"model.name: {path} has model_type {model_type!r}, which transformers does not know "
                "(add the package that defines it to model.import_modules, e.g. fla)"
            ) from None
        edited = " with model.overrides" if cfg.overrides else ""
        raise ConfigError(f"model.name: transformers cannot read {path}{edited}: {_reason(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    said = raw.get("vocab_size")
    if isinstance(said, int) and said != rows:
        log(f"model: vocab_size {said:,} in {path} replaced by {rows:,} (model.vocab_size {cfg.vocab_size})")
    for key in ("bos_token_id", "eos_token_id"):  # ids of a vocabulary no longer there
        v = getattr(hf, key, None)
        if isinstance(v, int) and v >= rows:
            setattr(hf, key, None)
    if "pad_token_id" not in cfg.overrides:
        # flame never pads; a pad id from another tokenizer would make nn.Embedding(padding_idx=...)
        # zero that row of this tokenizer's vocabulary and never train it (Gemma's default is 0)
        hf.pad_token_id = None
    return hf


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


def build_model(
    cfg: ModelConfig,
    tokenizer_vocab: int,
    context_len: int,
    *,
    varlen: bool = False,
    log: Log | None = None,
) -> nn.Module:
    """The model on CPU in fp32 (or on the meta device inside `torch.device("meta")`), its
    vocabulary reconciled with the tokenizer's and its attention implementation chosen.

    With `varlen`, it is proven to keep packed documents apart (see `check_varlen`). `log`
    receives one-line announcements (vocabulary rows that the tokenizer never uses).
    """
    say = log or (lambda _msg: None)
    _import_modules(cfg.import_modules, say)
    if cfg.init_from:
        model = _from_pretrained(cfg, tokenizer_vocab, say)
        rebuild = None
    elif is_function_spec(cfg.name):
        rows = vocab_rows(cfg, tokenizer_vocab)
        model = _from_function(cfg, rows, context_len)
        _reconcile_vocab(model, cfg, tokenizer_vocab, say)

        def rebuild() -> nn.Module:
            with torch.device("cpu"):
                return _from_function(cfg, rows, context_len)

    else:
        rows = vocab_rows(cfg, tokenizer_vocab)
        hf = _hf_config(cfg, rows, context_len, say)
        _check_depth(cfg, hf)
        model = _from_hf_config(cfg, hf)
        _check_positions(cfg, model, context_len)
        note = _vocab_note(rows, tokenizer_vocab, _pad_why(cfg, tokenizer_vocab))
        if note:
            say(note)
        rebuild = None
    if varlen:
        check_varlen(model, tokenizer_vocab, label=model_label(cfg), rebuild=rebuild, context_len=context_len)
    return model


def _check_depth(cfg: ModelConfig, hf) -> None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(hf, key, None)
        if isinstance(n, int) and n < 1:
            raise ConfigError(
                f"model.name = {cfg.name!r}: {key} = {n} builds a model without layers; give it at least 1"
            )


def _check_positions(cfg: ModelConfig, model: nn.Module, context_len: int) -> None:
    """Learned position embeddings shorter than the context fail with an index error mid-run."""
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if (
            isinstance(m, nn.Embedding)
            and ("pos" in leaf or leaf == "wpe")
            and m.num_embeddings < context_len
        ):
            raise ConfigError(
                f"model.name = {cfg.name!r}: its learned position embeddings ({name}) cover "
                f"{m.num_embeddings} positions, fewer than data.context_len = {context_len}: set the "
                f"config's position count (e.g. n_positions / max_position_embeddings) to at least "
                f"{context_len}, or use a smaller --data.context_len"
            )


def _pad_why(cfg: ModelConfig, tokenizer_vocab: int) -> str:
    if cfg.pad_vocab_multiple > 1 and vocab_rows(cfg, tokenizer_vocab) != (cfg.vocab_size or tokenizer_vocab):
        return f" (padded to a multiple of {cfg.pad_vocab_multiple})"
    return ""


# ---- attention implementation ---------------------------------------------------------------


def _causal_lm_class(hf):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(hf)]
    except KeyError:
        raise ConfigError(
            f"model.name: model_type {hf.model_type!r} has no causal-LM class in transformers "
            "(flame trains AutoModelForCausalLM models)"
        ) from None


def supported_attention(cls: type) -> list[str]:
    """The attention implementations a transformers model class declares (eager always)."""
    names = ["eager"]
    if getattr(cls, "_supports_sdpa", False):
        names.append("sdpa")
    if getattr(cls, "_supports_flex_attn", False):
        names.append("flex_attention")
    if getattr(cls, "_supports_flash_attn", False) or getattr(cls, "_supports_flash_attn_2", False):
        names += ["flash_attention_2", "flash_attention_3"]
    return names


def _request(cfg: ModelConfig) -> str | None:
    """The implementation to ask transformers for; None lets it pick sdpa, else eager."""
    return None if cfg.attn_implementation == "auto" else cfg.attn_implementation


def _from_hf_config(cfg: ModelConfig, hf) -> nn.Module:
    from transformers import AutoModelForCausalLM

    cls = _causal_lm_class(hf)
    try:
        # a fresh copy: transformers writes the chosen implementation into the config it is given;
        # fp32 weights whatever dtype a hub config.json names (autocast gives bf16 compute)
        return _default_loss_type(
            AutoModelForCausalLM.from_config(
                copy.deepcopy(hf), attn_implementation=_request(cfg), dtype=torch.float32
            )
        )
    except (ValueError, ImportError) as e:
        if _request(cfg) is not None and _is_attention_error(e):
            raise _attention_refused(cfg, cls, e) from None
        raise _build_error(cfg, e) from None
    except Exception as e:  # impossible sizes or values, often from model.overrides
        raise _build_error(cfg, e) from None


def _is_attention_error(e: BaseException) -> bool:
    text = str(e).lower()
    return any(w in text for w in ("attn", "attention", "flash", "sdpa", "flex"))


def _attention_refused(cfg: ModelConfig, cls: type, e: BaseException) -> ConfigError:
    want, names = cfg.attn_implementation, supported_attention(cls)
    head = f"model.attn_implementation = {want!r}: {cls.__name__}"
    if names == ["eager"]:
        return ConfigError(f"{head} has no interchangeable attention; leave --model.attn_implementation auto")
    if want not in names:
        return ConfigError(f"{head} does not support it; it supports {', '.join(names)} (or auto)")
    return ConfigError(f"{head} cannot use it here: {_reason(e)}; use one of {', '.join(names)} (or auto)")


def _build_error(cfg: ModelConfig, e: BaseException) -> ConfigError:
    edited = " with model.overrides" if cfg.overrides else ""
    return ConfigError(
        f"model.name = {cfg.name!r}{edited}: transformers cannot build the model: {_reason(e)}"
    )


def attention_of(model: nn.Module) -> str:
    """The attention implementation a built model uses: a transformers name (sdpa, eager, ...),
    'native' for a model with no interchangeable attention, or 'custom'."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return str(getattr(model, "attn_implementation", "custom"))
    if supported_attention(type(model)) == ["eager"]:
        return NATIVE
    return str(model.config._attn_implementation)


# ---- other sources ---------------------------------------------------------------------------


def _from_pretrained(cfg: ModelConfig, tokenizer_vocab: int, log: Log) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = cfg.init_from
    if not Path(path).is_dir():
        raise ConfigError(f"model.init_from: no such directory '{path}'")
    try:
        hf = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ConfigError(f"model.init_from: cannot read the config of {path}: {_reason(e)}") from None
    cls = _causal_lm_class(hf)
    try:
        if torch.get_default_device().type == "meta":  # an FSDP rank that receives rank 0's weights
            model = AutoModelForCausalLM.from_config(
                hf, dtype=torch.float32, attn_implementation=_request(cfg)
            )
        else:
            with quiet_progress():
                model = AutoModelForCausalLM.from_pretrained(
                    path, local_files_only=True, dtype=torch.float32, attn_implementation=_request(cfg)
                )
    except (ValueError, ImportError) as e:
        if _request(cfg) is not None and _is_attention_error(e):
            raise _attention_refused(cfg, cls, e) from None
        raise ConfigError(f"model.init_from: cannot load a model from {path}: {_reason(e)}") from None
    except Exception as e:
        raise ConfigError(f"model.init_from: cannot load a model from {path}: {_reason(e)}") from None
    _reconcile_vocab(model, cfg, tokenizer_vocab, log)
    return _default_loss_type(model)


@contextlib.contextmanager
def quiet_progress():
    """No transformers progress bars ("Loading weights") inside: a small local load is not a
    download, and a bar in flame's output (or a log file) is only noise. Warnings still show."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _default_loss_type(model: nn.Module) -> nn.Module:
    """Name the causal-LM loss on models whose class name does not say it (GPT-2's LMHeadModel):
    transformers falls back to the same loss, but prints that `loss_type=None` is unrecognized."""
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    return model


def _import_function(spec: str) -> Callable:
    mod_name, _, fn_name = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            file = Path(mod_name)
            if not file.is_file():
                raise ImportError(f"no such file '{mod_name}'")
            name = file.stem
            module = sys.modules.get(name)
            if module is None or Path(getattr(module, "__file__", "") or "").resolve() != file.resolve():
                loader = importlib.util.spec_from_file_location(name, file)
                module = importlib.util.module_from_spec(loader)
                sys.modules[name] = module  # so its classes pickle and compile like any module's
                loader.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(mod_name)
            except ModuleNotFoundError:  # `flame train` from the module's folder
                if str(Path.cwd()) in sys.path or "" in sys.path:
                    raise
                sys.path.append(str(Path.cwd()))
                module = importlib.import_module(mod_name)
        fn = getattr(module, fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"model.name = {spec!r}: cannot import: {e} (the module must be importable from the working "
            "directory or PYTHONPATH, or name a file: path/to/file.py:function)"
        ) from None
    if not callable(fn):
        raise ConfigError(f"model.name = {spec!r}: {fn_name} is not a function")
    return fn


def _from_function(cfg: ModelConfig, rows: int, context_len: int) -> nn.Module:
    fn = _import_function(cfg.name)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and other callables without a signature
        raise ConfigError(
            f"model.name = {cfg.name!r} is not a Python function flame can call with keywords "
            "(vocab_size, context_len): point it at a function that builds and returns your nn.Module"
        ) from None
    kwargs = dict(cfg.overrides)
    if "vocab_size" in params:
        kwargs["vocab_size"] = rows
    if "context_len" in params:
        kwargs.setdefault("context_len", context_len)
    if cfg.attn_implementation != "auto":
        if "attn_implementation" not in params:
            raise ConfigError(
                f"model.attn_implementation = {cfg.attn_implementation!r}: {cfg.name} takes no "
                "attn_implementation argument; leave --model.attn_implementation auto"
            )
        kwargs["attn_implementation"] = cfg.attn_implementation
    missing = [
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and n not in kwargs
    ]
    if missing:
        raise ConfigError(
            f"model.name = {cfg.name!r} needs argument(s) {', '.join(missing)} that flame does not pass "
            "(it passes vocab_size and context_len): give them in model.overrides, e.g. "
            f"--model.overrides '{{\"{missing[0]}\": ...}}'"
        )
    try:
        model = fn(**kwargs)
    except TypeError as e:  # a wrong keyword from model.overrides
        raise ConfigError(f"model.name = {cfg.name!r}: {_reason(e)} (check model.overrides)") from None
    except Exception as e:  # the user's own code failed: say so, without a traceback into flame
        raise ConfigError(f"model function {cfg.name!r} failed: {_reason(e)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name = {cfg.name!r} returned {type(model).__name__}, not an nn.Module")
    return model


# ---- vocabulary ------------------------------------------------------------------------------


def model_vocab(model: nn.Module) -> int | None:
    emb = _input_embedding(model)
    return None if emb is None else emb.num_embeddings


def _input_embedding(model: nn.Module) -> nn.Embedding | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return emb


def _reconcile_vocab(model: nn.Module, cfg: ModelConfig, tokenizer_vocab: int, log: Log) -> None:
    """A model whose rows were not set by flame: grow it if asked, else refuse; announce spare rows."""
    have = model_vocab(model)
    if have is None:
        return
    if have >= tokenizer_vocab:
        note = _vocab_note(have, tokenizer_vocab)
        if note:
            log(note)
        return
    if cfg.resize_vocab and hasattr(model, "resize_token_embeddings"):
        multiple = cfg.pad_vocab_multiple if cfg.pad_vocab_multiple > 1 else None
        model.resize_token_embeddings(tokenizer_vocab, pad_to_multiple_of=multiple)
        log(f"model: vocabulary grown from {have:,} to {model_vocab(model):,} rows (model.resize_vocab)")
        return
    if cfg.resize_vocab:
        raise ConfigError(
            f"the model has {have} vocabulary rows, the tokenizer {tokenizer_vocab}, and it cannot resize"
        )
    raise ConfigError(
        f"the model has {have} vocabulary rows but the tokenizer has {tokenizer_vocab} tokens: set "
        "model.vocab_size to at least that, or --model.resize_vocab true to grow the embeddings"
    )


# ---- varlen: packed documents must not see each other ----------------------------------------

_PROBE_DOCS = (7, 12, 5)  # three documents of different lengths packed in one row


def probe_rows(context_len: int) -> list[tuple[int, ...]]:
    """The packed rows of the varlen proof: documents of several lengths, up to a row of the full
    context, so a model that mixes tokens in chunks (of up to the context) or carries a state
    leaks in one of them: a long document before short ones and short ones before a long one,
    starting at chunk boundaries and away from them."""
    L = max(8, context_len)
    rows = [_PROBE_DOCS]
    if L > sum(_PROBE_DOCS):
        rows += [(L - 24, 12, 12), (5, L - 5), (L // 3, L // 3 + 5, L - 2 * (L // 3) - 5)]
        if L >= 140:
            rows.append((70, 64, L - 134) if L > 134 else (70, 64))
    return [tuple(n for n in r if n > 0) for r in rows]


def trained_probe_row(context_len: int) -> tuple[int, ...]:
    """The one row checked again on the trained weights: a long document, then two short ones."""
    L = max(8, context_len)
    return (L - 24, 12, 12) if L > 36 else _PROBE_DOCS


def check_varlen(
    model: nn.Module,
    tokenizer_vocab: int,
    *,
    label: str = "the model",
    rebuild: Callable[[], nn.Module] | None = None,
    context_len: int = 0,
) -> None:
    """Prove that `model` keeps packed documents apart, or raise a ConfigError with the fix.

    Rows of documents (`probe_rows`: lengths up to the full context) are packed as the loader
    packs them (position_ids restarting at 0, cu_seqlens, max_seqlen; passed as the trainer passes
    them) and each document's logits must equal the document's logits alone: within 1e-5 of their scale in fp32 on CPU, within 1%
    on CUDA (its kernels round differently for different lengths; a leak moves logits by tens of
    percent). It runs in eval mode without gradients and without touching the run's random state.
    CPU first, except for kernels that need CUDA (flash_attention_*, and flex_attention, whose CPU
    path mixes packed documents); CUDA, when there is one, also when the CPU forward fails (Triton
    kernels such as fla's). The probe is the model itself on CPU, else (on CUDA, on the meta
    device, or over 1B parameters) a copy: transformers, as few layers as meet every layer type
    once; a custom model, `rebuild()`.
    """
    accepts = forward_params(model)
    impl = attention_of(model)
    fix = _varlen_fix(model, impl)
    cuda = torch.cuda.is_available()
    devices = ["cpu", "cuda"] if cuda else ["cpu"]
    if cuda and (impl.startswith("flash") or impl == "flex_attention"):
        devices = ["cuda"]
    on_meta = any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))
    # a transformers model of over 1B parameters is probed through a shallow copy: seconds, not minutes
    on_meta = on_meta or (rebuild is None and count_params(model) > 1_000_000_000)
    failure = None
    for device in devices:
        try:
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
                diff = _probe(model, device, impl, on_meta, rebuild, accepts, tokenizer_vocab, context_len)
            break
        except Exception as e:
            failure = e
    else:
        raise ConfigError(
            f"data.varlen: cannot check that {label} keeps packed documents apart: its forward "
            f"failed on a {device} probe ({_reason(failure)}); {fix}"
        )
    if diff > (1e-5 if device == "cpu" else 1e-2):
        why = ""
        if not {"position_ids", "cu_seqlens"} & accepts:
            why = (
                " (its forward takes neither position_ids nor cu_seqlens, so it cannot see where they start)"
            )
        elif impl == NATIVE and "cu_seqlens" not in accepts:
            why = " (a recurrent or state-space model carries its state across them; its forward takes no cu_seqlens)"
        raise ConfigError(
            f"data.varlen: {label} (attention: {impl}) does not keep packed documents apart{why}: a "
            f"document's logits change by {diff:.3g} of their scale when other documents are packed "
            f"before it (tested on {device}); {fix}"
        )


def _probe(
    model: nn.Module,
    device: str,
    impl: str,
    on_meta: bool,
    rebuild: Callable[[], nn.Module] | None,
    accepts: set[str],
    tokenizer_vocab: int,
    context_len: int = 0,
) -> float:
    probe = model
    if device == "cuda" or on_meta:
        probe = _shallow_copy(model) if rebuild is None else rebuild()
    if device == "cuda":  # flash kernels take half precision only
        probe = probe.to(device=device, dtype=torch.bfloat16 if impl.startswith("flash") else None)
    rows = probe_rows(context_len) if context_len else [_PROBE_DOCS]
    return max(isolation(probe, accepts, tokenizer_vocab, device, lens) for lens in rows)


def _varlen_fix(model: nn.Module, impl: str) -> str:
    from transformers import PreTrainedModel

    fix = "set --data.varlen false (a document then also sees the ones before it in its window)"
    if isinstance(model, PreTrainedModel) and impl != NATIVE:
        names = [n for n in supported_attention(type(model)) if n in ("sdpa", "eager") and n != impl]
        if names:
            fix += f", or --model.attn_implementation {' / '.join(names)}"
    elif not isinstance(model, PreTrainedModel):
        fix += ", or make the model's forward take cu_seqlens and keep each document's tokens apart"
    return fix


@torch.no_grad()
def isolation(
    model: nn.Module,
    accepts: set[str],
    tokenizer_vocab: int,
    device: str | torch.device,
    lens: tuple[int, ...] = _PROBE_DOCS,
    outputs: Callable[[nn.Module, dict, set[str]], torch.Tensor] | None = None,
) -> float:
    """The largest difference between a document's outputs packed (documents `lens` in one row)
    and alone, relative to their scale. `outputs` gives a batch's per-position outputs (default:
    the logits; the last hidden states are as good a witness, and smaller)."""
    from flame.loss import model_logits

    outputs = outputs or model_logits
    vocab = min(tokenizer_vocab, model_vocab(model) or tokenizer_vocab)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, sum(lens)), generator=gen, device="cpu")
    starts = [0, *itertools.accumulate(lens)]

    def batch(x: torch.Tensor, sizes: tuple[int, ...]) -> dict:
        return {
            "input_ids": x.to(device),
            "position_ids": torch.cat([torch.arange(n, device=device) for n in sizes]).view(1, -1),
            "cu_seqlens": torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int32, device=device),
            "max_seqlen": max(sizes),
        }

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        packed = outputs(model, batch(ids, lens), accepts).float()
        diff = 0.0
        for k, n in enumerate(lens):
            s, e = starts[k], starts[k + 1]
            alone = outputs(model, batch(ids[:, s:e], (n,)), accepts).float()
            scale = max(1.0, alone.abs().max().item())
            diff = max(diff, (packed[0, s:e] - alone[0]).abs().max().item() / scale)
        return diff
    finally:
        for m, t in modes.items():
            m.training = t


def _shallow_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of a transformers model with as few layers as meet every layer type once."""
    hf = copy.deepcopy(model.config)
    n = getattr(hf, "num_hidden_layers", None)
    types = getattr(hf, "layer_types", None)
    if isinstance(n, int) and n > 1:
        keep = 1
        if isinstance(types, list) and types:
            keep = max(types.index(t) for t in set(types)) + 1
            hf.layer_types = types[:keep]
        hf.num_hidden_layers = keep
    with torch.device("cpu"):
        return type(model)._from_config(hf, attn_implementation=model.config._attn_implementation)


# ---- what the trainer passes -----------------------------------------------------------------


def forward_params(model: nn.Module) -> set[str]:
    """The batch keys the model's forward takes: named parameters, plus position_ids through
    **kwargs (transformers models), plus cu_seqlens / max_seqlen through **kwargs of a model from
    outside transformers (fla models read them there)."""
    params = inspect.signature(model.forward).parameters
    names = set(params)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        names.add("position_ids")
        if not type(model).__module__.startswith("transformers."):
            names |= {"cu_seqlens", "max_seqlen"}
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
