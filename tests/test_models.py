"""Model building: every family in tests/zoo.py builds with the tokenizer's vocabulary and a known
attention implementation; mistakes are ConfigErrors before any data; varlen is proven to isolate."""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import metrics, tiny_overrides
from torch import nn
from zoo import NO_ATTENTION, ZOO, write_config

from flame.config import ModelConfig, load_config
from flame.data.tokenizer import load_tokenizer
from flame.errors import ConfigError
from flame.loss import model_logits
from flame.model import attention_of, build_model, forward_params, model_label, model_vocab

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CUSTOM = f"{EXAMPLES / 'custom_model.py'}:build"
ATTENTION = {  # what `auto` picks on CPU
    "gpt2": "sdpa",
    "llama": "sdpa",
    "mistral": "sdpa",
    "qwen2": "sdpa",
    "qwen3": "sdpa",
    "qwen3_moe": "sdpa",
    "mixtral": "sdpa",
    "gemma": "sdpa",
    "gemma2": "eager",  # transformers' Gemma2 has no sdpa path (attention logit soft-capping)
    "mamba": "native",
    "mamba2": "native",
    "rwkv": "native",
    "custom": "custom",
}


def _bpe(folder: Path, size: int) -> str:
    """A byte-level BPE tokenizer of exactly `size` tokens, trained on syllable soup."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    text = [
        " ".join("".join(rng.choice(syllables) for _ in range(rng.randrange(1, 4))) for _ in range(200))
        for _ in range(100)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return str(folder)


@pytest.fixture(scope="module")
def tok300(tmp_path_factory):
    tok = load_tokenizer(_bpe(tmp_path_factory.mktemp("bpe300"), 300))
    assert tok.vocab_size == 300
    return tok


def _name(tmp_path: Path, family: str, **extra) -> str:
    return CUSTOM if family == "custom" else write_config(tmp_path, family, **extra)


def _build(name: str, vocab: int, **kw) -> tuple[nn.Module, list[str]]:
    said: list[str] = []
    fields = {k: kw.pop(k) for k in list(kw) if k in ModelConfig.__dataclass_fields__}
    model = build_model(ModelConfig(name=name, **fields), vocab, 64, log=said.append, **kw)
    return model, said


def _packed(lens: tuple[int, ...], vocab: int, seed: int = 0) -> dict:
    """A varlen batch as the loader makes it: one row, positions restarting at every document."""
    ids = torch.randint(0, vocab, (1, sum(lens)), generator=torch.Generator().manual_seed(seed))
    return {
        "input_ids": ids,
        "position_ids": torch.cat([torch.arange(n) for n in lens]).view(1, -1),
        "cu_seqlens": torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32),
        "max_seqlen": max(lens),
    }


# ---- every family builds --------------------------------------------------------------------


@pytest.mark.parametrize("family", [*ZOO, "custom"])
def test_family_builds_with_tokenizer_vocab_and_trains_a_step(tmp_path, tok300, family):
    model, said = _build(_name(tmp_path, family), tok300.vocab_size)
    assert model_vocab(model) == 300
    assert said == []  # the rows are the tokenizer's: nothing to announce
    assert attention_of(model) == ATTENTION[family]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.head
    assert out.weight.shape[0] == 300
    batch = {"input_ids": torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))}
    logits = model_logits(model, batch, forward_params(model))
    assert logits.shape == (2, 16, 300)
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), batch["input_ids"][:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss).item()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.embed
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum().item() > 0
    # no row is frozen as padding (a config's pad id belongs to another tokenizer's vocabulary)
    assert getattr(emb, "padding_idx", None) is None
    assert emb.weight.abs().sum(1).min().item() > 0


@pytest.mark.parametrize("family", ["gemma", "gemma2", "llama"])
def test_a_config_pad_id_freezes_no_row(tmp_path, tok300, family):
    model, _ = _build(write_config(tmp_path, family, pad_token_id=0), tok300.vocab_size)
    emb = model.get_input_embeddings()
    assert emb.padding_idx is None and model.config.pad_token_id is None
    assert emb.weight[0].abs().sum().item() > 0


@pytest.mark.parametrize("family", ["llama", "mamba", "custom"])
def test_pad_vocab_multiple_rounds_rows_up_and_says_so(tmp_path, tok300, family):
    model, said = _build(_name(tmp_path, family), tok300.vocab_size, pad_vocab_multiple=64)
    assert model_vocab(model) == 320
    if family == "custom":  # rows set by the model's own function: flame counts the unused ones
        assert said == [
            "model: 320 vocabulary rows for the tokenizer's 300 tokens, 20 of them never used by the tokenizer"
        ]
    else:
        assert said == [
            "model: 320 vocabulary rows for the tokenizer's 300 tokens, 20 of them never used by the "
            "tokenizer (padded to a multiple of 64)"
        ]


# ---- vocabulary -----------------------------------------------------------------------------


@pytest.mark.slow
def test_config_json_vocab_is_replaced_by_the_tokenizers(tmp_path):
    tok = load_tokenizer(_bpe(tmp_path / "bpe", 2048))
    assert tok.vocab_size == 2048
    path = write_config(tmp_path, "qwen3", vocab_size=151_936)
    model, said = _build(path, tok.vocab_size)
    assert model_vocab(model) == 2048 and model.lm_head.weight.shape == (2048, 64)
    assert model.config.vocab_size == 2048
    assert said == [f"model: vocab_size 151,936 in {path} replaced by 2,048 (model.vocab_size 0)"]
    padded, _ = _build(path, 2000, pad_vocab_multiple=128)
    assert model_vocab(padded) == 2048


def test_explicit_vocab_smaller_is_refused_larger_is_announced(tmp_path, tok300):
    path = write_config(tmp_path, "llama")
    with pytest.raises(ConfigError) as e:
        _build(path, tok300.vocab_size, vocab_size=256)
    assert e.value.problems == [
        "model.vocab_size = 256 is smaller than the tokenizer's 300 tokens: set --model.vocab_size 0 "
        "(the tokenizer's size), or --model.resize_vocab true to grow it"
    ]
    grown, _ = _build(path, tok300.vocab_size, vocab_size=256, resize_vocab=True)
    assert model_vocab(grown) == 300
    model, said = _build(path, tok300.vocab_size, vocab_size=512)
    assert model_vocab(model) == 512
    assert said == [
        "model: 512 vocabulary rows for the tokenizer's 300 tokens, 212 of them never used by the tokenizer"
    ]


def test_weights_are_fp32_whatever_the_config_json_says(tmp_path):
    model, _ = _build(write_config(tmp_path, "qwen2", torch_dtype="bfloat16"), 300)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_out_of_range_special_ids_of_the_replaced_vocabulary_are_dropped(tmp_path, tok300):
    model, _ = _build(write_config(tmp_path, "gpt2"), tok300.vocab_size)  # gpt2's defaults say 50256
    assert (model.config.bos_token_id, model.config.eos_token_id) == (None, None)


def test_init_from_keeps_the_pretrained_vocabulary(tmp_path, tok300):
    from transformers import AutoModelForCausalLM
    from zoo import hf_config

    saved = tmp_path / "pretrained"
    AutoModelForCausalLM.from_config(hf_config("llama", vocab_size=400)).save_pretrained(saved)
    cfg = dict(init_from=str(saved))
    model, said = _build("tiny", tok300.vocab_size, **cfg)
    assert model_vocab(model) == 400 and attention_of(model) == "sdpa"
    assert said == [
        "model: 400 vocabulary rows for the tokenizer's 300 tokens, 100 of them never used by the tokenizer"
    ]
    with pytest.raises(ConfigError) as e:
        _build("tiny", 500, **cfg)
    assert e.value.problems == [
        "the model has 400 vocabulary rows but the tokenizer has 500 tokens: set model.vocab_size to at "
        "least that, or --model.resize_vocab true to grow the embeddings"
    ]
    grown, said = _build("tiny", 500, resize_vocab=True, pad_vocab_multiple=64, **cfg)
    assert model_vocab(grown) == 512
    assert said == ["model: vocabulary grown from 400 to 512 rows (model.resize_vocab)"]
    eager, _ = _build("tiny", 300, attn_implementation="eager", **cfg)
    assert attention_of(eager) == "eager"
    assert model_label(ModelConfig(init_from=str(saved))) == f"{saved} (init_from)"
    assert model_label(ModelConfig(name="llama-125m")) == "llama-125m"


def test_custom_function_receives_the_resolved_vocab(tmp_path, tok300):
    model, _ = _build(CUSTOM, tok300.vocab_size, vocab_size=350, pad_vocab_multiple=64)
    assert model_vocab(model) == 384 and model.head.out_features == 384


# ---- attention implementation ---------------------------------------------------------------


def test_attn_implementation_choice_and_refusals(tmp_path, tok300):
    llama = write_config(tmp_path, "llama")
    for impl in ("sdpa", "eager"):
        model, _ = _build(llama, 300, attn_implementation=impl)
        assert (attention_of(model), model.config._attn_implementation) == (impl, impl)
    with pytest.raises(ConfigError) as e:
        _build(write_config(tmp_path, "gemma2"), 300, attn_implementation="sdpa")
    assert e.value.problems == [
        "model.attn_implementation = 'sdpa': Gemma2ForCausalLM does not support it; it supports eager, "
        "flex_attention, flash_attention_2, flash_attention_3 (or auto)"
    ]
    with pytest.raises(ConfigError) as e:
        _build(write_config(tmp_path, "mamba"), 300, attn_implementation="sdpa")
    assert e.value.problems == [
        "model.attn_implementation = 'sdpa': MambaForCausalLM has no interchangeable attention; leave "
        "--model.attn_implementation auto"
    ]
    with pytest.raises(ConfigError) as e:
        _build(CUSTOM, 300, attn_implementation="eager")
    assert e.value.problems == [
        f"model.attn_implementation = 'eager': {CUSTOM} takes no attn_implementation argument; leave "
        "--model.attn_implementation auto"
    ]


def test_building_does_not_mutate_a_shared_config(tmp_path):
    """The old builder wrote sdpa into the config before its eager fallback, which then failed."""
    from flame import model as fm

    hf = fm._hf_config(ModelConfig(name=write_config(tmp_path, "rwkv")), 300, 64, lambda _: None)
    before = hf.to_dict()
    for _ in range(2):
        assert attention_of(fm._from_hf_config(ModelConfig(), hf)) == "native"
    assert hf.to_dict() == before


# ---- resolution before data: validate() and build errors --------------------------------------


@pytest.mark.parametrize(
    "args, problem",
    [
        (
            ["--model.name", "llama"],
            "model.name: 'llama' is not a preset (did you mean llama-125m?); give a preset (tiny, "
            "llama-125m), a transformers config.json (or its folder), pkg.module:function or "
            "path/to/file.py:function",
        ),
        (
            ["--model.name", "tyni"],
            "model.name: 'tyni' is not a preset (did you mean tiny?); give a preset (tiny, llama-125m), "
            "a transformers config.json (or its folder), pkg.module:function or path/to/file.py:function",
        ),
        (
            ["--model.name", "models/nope.json"],
            "model.name: no such file or directory 'models/nope.json'; give a preset (tiny, llama-125m), "
            "a transformers config.json (or its folder), pkg.module:function or path/to/file.py:function",
        ),
        (["--model.name", "nope.py:build"], "model.name: no such file 'nope.py' (in 'nope.py:build')"),
        (
            ["--model.attn_implementation", "flash_attention2"],
            "model.attn_implementation = 'flash_attention2' is not one of auto, eager, "
            "flash_attention_4, flash_attention_3, flash_attention_2, flex_attention, sdpa, paged|eager "
            "(did you mean flash_attention_2?)",
        ),
        (
            ["--model.overrides", '{"attn_implementation": "eager"}'],
            "model.overrides: attn_implementation is a knob of its own: use --model.attn_implementation instead",
        ),
        (
            ["--model.overrides", '{"vocab_size": 4096}'],
            "model.overrides: vocab_size is a knob of its own: use --model.vocab_size instead",
        ),
        (["--model.pad_vocab_multiple", "-8"], "model.pad_vocab_multiple = -8 must be >= 0"),
    ],
)
def test_validate_catches_model_mistakes_before_building(tmp_path, monkeypatch, args, problem):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(args)
    assert e.value.problems == [problem]


def test_validate_accepts_every_model_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, "llama")
    for name in ("llama-125m", path, str(Path(path).parent), "pkg.module:build", CUSTOM):
        assert load_config(["--model.name", name]).model.name == name
    assert load_config(["--model.init_from", "x", "--model.name", "whatever"]).model.init_from == "x"


def test_build_errors_are_config_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_type": "llama",')
    cases = {
        str(bad): f"model.name: cannot read {bad} as JSON: Expecting property name enclosed in double "
        "quotes: line 1 column 24 (char 23)",
        write_config(tmp_path, "llama", model_type="llamax"): f"model.name: {tmp_path}/zoo-llama/config.json "
        "has model_type 'llamax', which transformers does not know (add the package that defines it to "
        "model.import_modules, e.g. fla)",
        "no_such_module_xyz:build": "model.name = 'no_such_module_xyz:build': cannot import: No module named "
        "'no_such_module_xyz' (the module must be importable from the working directory or PYTHONPATH, or "
        "name a file: path/to/file.py:function)",
    }
    for name, problem in cases.items():
        with pytest.raises(ConfigError) as e:
            _build(name, 300)
        assert e.value.problems == [problem]
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(name=write_config(tmp_path, "gpt2", model_type="t5")), 300, 64)
    assert e.value.problems == [
        "model.name: model_type 't5' has no causal-LM class in transformers (flame trains "
        "AutoModelForCausalLM models)"
    ]


# ---- varlen: packed documents stay apart ------------------------------------------------------


# every attention family with every implementation flame accepts with varlen on CPU
VARLEN_CPU = [
    (f, i) for f in ZOO if f not in NO_ATTENTION for i in ("sdpa", "eager") if (f, i) != ("gemma2", "sdpa")
]


@pytest.mark.parametrize("family, impl", VARLEN_CPU)
def test_varlen_isolates_documents(tmp_path, tok300, family, impl):
    model, _ = _build(write_config(tmp_path, family), 300, attn_implementation=impl, varlen=True)
    assert attention_of(model) == impl
    _assert_isolated(model.eval())


def test_varlen_custom_model_with_cu_seqlens_isolates(tok300):
    model, _ = _build(CUSTOM, 300, varlen=True)
    assert {"position_ids", "cu_seqlens", "max_seqlen"} <= forward_params(model)
    _assert_isolated(model.eval())


def _assert_isolated(model: nn.Module) -> None:
    lens = (3, 17, 1, 9, 6)
    batch = _packed(lens, 300, seed=7)
    accepts = forward_params(model)
    with torch.no_grad():
        packed = model_logits(model, batch, accepts)
        for s, e in itertools.pairwise([0, *itertools.accumulate(lens)]):
            alone = model_logits(
                model, _packed((e - s,), 300) | {"input_ids": batch["input_ids"][:, s:e]}, accepts
            )
            assert (packed[0, s:e] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["mamba", "mamba2", "rwkv"])
def test_varlen_refused_for_state_space_models(tmp_path, family):
    path = write_config(tmp_path, family)
    with pytest.raises(ConfigError) as e:
        _build(path, 300, varlen=True)
    (msg,) = e.value.problems
    head, _, rest = msg.partition(": a document's logits change by ")
    assert head == (
        f"data.varlen: {path} (attention: native) does not keep packed documents apart (a recurrent or "
        "state-space model carries its state across them; its forward takes no cu_seqlens)"
    )
    assert rest.split(" of their scale")[1] == (
        " when other documents are packed before it (tested on cpu); set --data.varlen false (a "
        "document then also sees the ones before it in its window)"
    )


class _Leaky(nn.Module):
    """Takes cu_seqlens but attends across documents anyway."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 16)
        self.out = nn.Linear(16, vocab_size)

    def forward(self, input_ids, cu_seqlens=None, max_seqlen=None):
        x = self.emb(input_ids)
        return self.out(x.cumsum(1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1))


def leaky(vocab_size: int) -> nn.Module:
    return _Leaky(vocab_size)


def test_varlen_refused_for_a_custom_model_that_ignores_cu_seqlens(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    with pytest.raises(ConfigError) as e:
        _build("test_models:leaky", 300, varlen=True)
    (msg,) = e.value.problems
    assert msg.startswith(
        "data.varlen: test_models:leaky (attention: custom) does not keep packed documents apart: "
    )
    assert msg.endswith(
        "set --data.varlen false (a document then also sees the ones before it in its window), or make "
        "the model's forward take cu_seqlens and keep each document's tokens apart"
    )
    assert _build("test_models:leaky", 300)[0] is not None  # fine without varlen


def test_varlen_probe_on_meta_uses_a_copy_and_keeps_the_rng(tmp_path):
    path = write_config(tmp_path, "gemma2")  # sliding and full layers: the copy keeps one of each
    torch.manual_seed(0)
    with torch.device("meta"):
        model, _ = _build(path, 300, varlen=True)
    after_probe = torch.rand(3)
    torch.manual_seed(0)
    with torch.device("meta"):
        _build(path, 300)
    assert torch.equal(after_probe, torch.rand(3))
    assert all(p.is_meta for p in model.parameters())
    with torch.device("meta"), pytest.raises(ConfigError):
        _build(write_config(tmp_path, "mamba"), 300, varlen=True)
    with torch.device("meta"):
        custom, _ = _build(CUSTOM, 300, varlen=True)  # probed through a CPU rebuild
    assert all(p.is_meta for p in custom.parameters())


def test_shallow_copy_keeps_one_layer_of_each_type(tmp_path):
    from flame.model import _shallow_copy

    with torch.device("meta"):
        model, _ = _build(write_config(tmp_path, "gemma2", num_hidden_layers=6), 300)
    copy = _shallow_copy(model)
    assert copy.config.layer_types == ["sliding_attention", "full_attention"]
    assert len(copy.model.layers) == 2 and not any(p.is_meta for p in copy.parameters())
    assert copy.config._attn_implementation == "eager"


def test_forward_params_passes_cu_seqlens_through_kwargs_only_outside_transformers():
    class Kw(nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    assert forward_params(Kw()) == {"input_ids", "kwargs", "position_ids", "cu_seqlens", "max_seqlen"}


# ---- the example custom model trains through flame ------------------------------------------


def _train_losses(run_dir: Path, overrides: dict) -> dict[int, float]:
    from flame.trainer import run_training

    run_training(load_config(overrides=overrides))
    recs = metrics(run_dir)
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


@pytest.mark.parametrize("varlen", [False, True])
def test_example_custom_model_trains(tmp_path, corpus, monkeypatch, varlen):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    run = tmp_path / "run"
    extra = {"model.name": "custom_model:build", "model.overrides": {"hidden": 32}, "data.varlen": varlen}
    extra |= {"train.max_steps": 12, "optim.lr": 3e-3}
    losses = _train_losses(run, tiny_overrides(run, corpus, **extra))
    assert list(losses) == list(range(1, 13))
    assert losses[12] < losses[1] * 0.85
    assert "custom_model" in sys.modules
