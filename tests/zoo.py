"""Tiny hand-written transformers configs, one per model family flame supports.

Shared by the model tests: each entry is the content of a `config.json` (with `model_type`),
small enough (hidden 64, 2 layers) that a CPU forward takes milliseconds. The entries carry no
`vocab_size`: flame takes the tokenizer's (pass `vocab_size=` to `write_config` to test that
rule, or to `hf_config` to build a model without flame).
"""

from __future__ import annotations

import json
from pathlib import Path

_ROPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

ZOO: dict[str, dict] = {
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "llama": dict(model_type="llama", **_ROPE),
    "mistral": dict(model_type="mistral", sliding_window=None, **_ROPE),
    "qwen2": dict(model_type="qwen2", **_ROPE),
    "qwen3": dict(model_type="qwen3", head_dim=16, **_ROPE),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        **_ROPE,
    ),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, **_ROPE),
    "gemma": dict(model_type="gemma", head_dim=16, **_ROPE),
    "gemma2": dict(
        model_type="gemma2",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=256,
        **_ROPE,
    ),
    "mamba": dict(
        model_type="mamba",
        hidden_size=64,
        state_size=8,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
    ),
    "mamba2": dict(
        model_type="mamba2",
        hidden_size=64,
        state_size=8,
        num_hidden_layers=2,
        expand=2,
        num_heads=8,
        head_dim=16,
        n_groups=1,
        conv_kernel=4,
        chunk_size=32,
    ),
    "rwkv": dict(
        model_type="rwkv",
        hidden_size=64,
        attention_hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        context_length=512,
    ),
}

# Families whose forward has no attention (and therefore no attention implementation).
NO_ATTENTION = {"mamba", "mamba2", "rwkv"}


def write_config(tmp_path: Path, name: str, **extra) -> str:
    """Write ZOO[name] (plus `extra` fields) as tmp_path/<name>/config.json; returns the path."""
    folder = Path(tmp_path) / f"zoo-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps({**ZOO[name], **extra}, indent=1))
    return str(path)


def hf_config(name: str, **extra):
    """The transformers config object of ZOO[name] (for tests that build without flame)."""
    from transformers import AutoConfig

    fields = {**ZOO[name], **extra}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
