"""`flame generate` trusts a model's cache only after checking it: a cache that loses the state
between steps (as fla 0.6.0's models do under transformers 5, which passes the cache as `cache=`
while they read `past_key_values=`) is detected on the prompt, announced, and generation goes on
without it, with the no-cache loop's exact output."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flame import generate
from flame.generate import cache_error, sample_ids

VOCAB = 97


class Forgetful(LlamaForCausalLM):
    """A llama whose forward drops the cache it is given: every decode step sees one token."""

    def forward(self, *args, cache=None, **kwargs):
        return super().forward(*args, cache=None, **kwargs)


def _model(cls):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return cls(cfg).eval()


PROMPT = [5, 17, 3, 44, 9, 61, 2, 30]


def test_a_sound_cache_is_used_and_matches_the_loop(capsys):
    model = _model(LlamaForCausalLM)
    with torch.no_grad():
        assert cache_error(model, PROMPT, "cpu") <= 1e-5
    cached = sample_ids(model, PROMPT, 12, 32, temperature=0)
    assert "cache" not in capsys.readouterr().err
    assert cached == sample_ids(model, PROMPT, 12, 32, temperature=0, use_cache=False)


def test_a_cache_that_loses_the_state_is_refused_and_the_output_is_exact(capsys):
    model = _model(Forgetful)
    with torch.no_grad():
        assert cache_error(model, PROMPT, "cpu") > 0.05
    out = sample_ids(model, PROMPT, 12, 32, temperature=0)
    err = capsys.readouterr().err
    assert "Forgetful's cache gives other logits than its forward" in err and "without the cache" in err
    reference = sample_ids(model, PROMPT, 12, 32, temperature=0, use_cache=False)
    assert out == reference
    # the control: with its cache trusted, this model generates something else
    ids = list(PROMPT)
    with torch.no_grad():
        generate._with_cache(model, ids, 12, 0.0, 0, 1.0, None, 0, "cpu")
    assert ids[len(PROMPT) :] != reference
    # checked once per model: a second call says nothing more
    sample_ids(model, PROMPT, 4, 32, temperature=0)
    assert "cache" not in capsys.readouterr().err


def test_bf16_with_fla_s_fused_swiglu_is_refused_in_the_interpreter(monkeypatch):
    """The refusal itself, without fla in this process: only while Triton's interpreter runs fla."""
    from types import SimpleNamespace

    from flame import fla_cpu

    fused = SimpleNamespace(config=SimpleNamespace(fuse_swiglu=True))
    plain = SimpleNamespace(config=SimpleNamespace(fuse_swiglu=False))
    assert fla_cpu.bf16_problem(fused, True) is None  # the interpreter is not in use
    monkeypatch.setattr(fla_cpu, "_ENABLED", True)
    said = fla_cpu.bf16_problem(fused, True)
    assert said and "fuse_swiglu" in said and "--model.overrides" in said
    assert fla_cpu.bf16_problem(fused, False) is None
    assert fla_cpu.bf16_problem(plain, True) is None
