"""The model zoo: every model family flame supports trains, resumes exactly, exports, and round-trips
through transformers, from a hand-written config.json and a real byte-level BPE tokenizer.

Per family (tests/zoo.py), on CPU at tiny sizes:
  (a) trains a few steps through `run_training` with the loss falling;
  (b) a run stopped at step K and resumed logs the same per-step losses as the run that never stopped;
  (c) `flame export` gives a directory that `AutoModelForCausalLM` / `AutoTokenizer` load, with logits
      within 1e-5 of flame's own model (built by flame from the checkpoint) and the same token ids
      for the probe text;
  (d) greedy `flame generate` (the model's `generate()`, KV cache) equals transformers' greedy
      `generate` on the exported model, and the no-cache loop's greedy output.
Custom models (`pkg.module:function`: tests/models_for_tests.py's bigram; `file.py:function`: the
README's examples/custom_model.py) do (a), (b), their documented export (weights and tokenizer, and
a clear error that no transformers directory can be written) and `flame generate` (no-cache loop).

One tokenizer and corpus serve the whole module; each family trains once uninterrupted (used by
every check) and once stopped and resumed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import metrics, tiny_overrides
from zoo import ZOO, write_config

from flame.cli import main
from flame.config import load_config
from flame.data.tokenizer import PROBE_TEXT, load_tokenizer, transformers_mismatch
from flame.errors import FlameError
from flame.export import export
from flame.trainer import run_training

pytestmark = pytest.mark.slow

FAMILIES = sorted(ZOO)
CUSTOM = {
    "custom": "models_for_tests:bigram",
    "example": f"{Path(__file__).resolve().parent.parent / 'examples' / 'custom_model.py'}:build",
}
STEPS, STOP_AT = 8, 4
PROMPT = "def f(x):\n    return"


def _documents() -> list[str]:
    """About 40 KB of varied text: prose, numbers, code, whitespace runs and other scripts."""
    rng = random.Random(0)
    words = "the of and model data train token loss step batch learning rate value".split()
    scripts = ["naïve café", "straße", "ελληνικά", "русский текст", "中文文本", "日本語", "한국어", "🚀🔥"]
    docs = []
    for i in range(60):
        parts = [f"Document {i}: " + " ".join(rng.choice(words) for _ in range(rng.randrange(20, 60))) + "."]
        parts.append(f"In {2000 + i} we saw {rng.randrange(10**6)} tokens at {rng.random():.4f} loss.")
        parts.append(f"def f{i}(x, y={i}):\n    if x  >  y:\n\treturn [x, y]  # {i}\n    return None\n\n")
        parts.append(rng.choice(scripts) + "   " + rng.choice(scripts) + "\r\n")
        rng.shuffle(parts)
        docs.append("".join(parts))
    return docs


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(corpus dir, tokenizer dir): text files and a 600-token byte-level BPE trained on them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("zoo")
    corpus = root / "corpus"
    corpus.mkdir()
    docs = _documents()
    for i, doc in enumerate(docs):
        (corpus / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    return corpus, root / "tok"


class Runs:
    """Training runs of the module, made on first use and kept."""

    def __init__(self, root, corpus, tok):
        self.root, self.corpus, self.tok = root, corpus, tok
        self.done: dict[tuple[str, str], object] = {}

    def overrides(self, family: str, run_dir) -> dict:
        name = CUSTOM[family] if family in CUSTOM else write_config(self.root, family)
        over = tiny_overrides(
            run_dir,
            self.corpus,
            **{
                "model.name": name,
                "model.overrides": {},
                "model.vocab_size": 0,
                "data.tokenizer": str(self.tok),
                "data.context_len": 32,
                "data.batch_size": 4,
                "train.max_steps": STEPS,
                "optim.lr": 3e-3,
            },
        )
        return over

    def full(self, family: str):
        """The uninterrupted run's directory (checkpoint at the end)."""
        key = (family, "full")
        if key not in self.done:
            run_dir = self.root / f"full-{family}"
            run_training(load_config(overrides=self.overrides(family, run_dir)))
            self.done[key] = run_dir
        return self.done[key]

    def resumed(self, family: str):
        """A run stopped after step STOP_AT and resumed to the end."""
        key = (family, "resumed")
        if key not in self.done:
            run_dir = self.root / f"part-{family}"
            cfg = load_config(overrides=self.overrides(family, run_dir))

            def stop(trainer):
                if trainer.step == STOP_AT:
                    trainer.stop_signal = "test"

            first = run_training(cfg, callbacks=[stop])
            assert first["stopped"] == "preempted" and first["step"] == STOP_AT
            assert run_training(cfg)["step"] == STEPS
            self.done[key] = run_dir
        return self.done[key]


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    corpus, tok = assets
    return Runs(tmp_path_factory.mktemp("runs"), corpus, tok)


def _losses(run_dir) -> dict[int, float]:
    recs = metrics(run_dir)
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


# ---------------------------------------------------------------- (a) train, (b) resume


@pytest.mark.slow
@pytest.mark.parametrize("family", [*FAMILIES, *CUSTOM])
def test_trains_with_the_loss_falling(runs, family):
    loss = _losses(runs.full(family))
    assert sorted(loss) == list(range(1, STEPS + 1))
    first, last = loss[1], sum(loss[s] for s in (STEPS - 1, STEPS)) / 2
    assert last < first - 0.1, loss


@pytest.mark.slow
@pytest.mark.parametrize("family", [*FAMILIES, *CUSTOM])
def test_resume_gives_the_same_losses(runs, family):
    a, b = _losses(runs.full(family)), _losses(runs.resumed(family))
    assert list(b) == list(range(1, STEPS + 1))  # one record per step, none twice
    assert b == a  # by equality: the same batches, the same arithmetic


# ---------------------------------------------------------------- (c) export


def _flame_model(run_dir):
    """flame's own model of the run, built by flame from its latest checkpoint."""
    from flame.inspect import load_for_generation

    model, tok, _, _ = load_for_generation(run_dir, None, torch.device("cpu"))
    return model.eval(), tok


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    out: dict[str, object] = {}

    def get(family):
        if family not in out:
            out[family] = export(runs.full(family), tmp_path_factory.mktemp("export") / family)
        return out[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_with_the_same_logits_and_tokens(runs, exported, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = exported(family)
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours, tok = _flame_model(runs.full(family))
    assert hf.config.model_type == ZOO[family]["model_type"]
    assert hf.get_input_embeddings().weight.shape[0] == tok.vocab_size  # the tokenizer's vocabulary

    ids = tok.encode_batch([PROBE_TEXT])[0].tolist()
    assert hf_tok.encode(PROBE_TEXT, add_special_tokens=False) == ids
    assert hf_tok(PROBE_TEXT)["input_ids"] == ids  # nothing added around the text
    assert hf_tok.eos_token_id == tok.eos_id
    assert hf_tok.decode(ids) == tok.decode(ids) == PROBE_TEXT

    x = torch.tensor([ids[:32], ids[32:64]])
    with torch.no_grad():
        theirs = hf(input_ids=x).logits
        mine = ours(input_ids=x)
        mine = mine if torch.is_tensor(mine) else mine.logits
    assert theirs.shape == mine.shape == (2, 32, tok.vocab_size)
    assert (theirs - mine).abs().max().item() <= 1e-5


def test_byte_tokenizer_round_trips_for_every_model_type(tmp_path):
    """The built-in byte tokenizer, exported next to any zoo config, encodes as flame does."""
    tok = load_tokenizer("byte")
    for family in FAMILIES:
        folder = tmp_path / family
        tok.save_pretrained(str(folder))
        (folder / "config.json").write_text(json.dumps(ZOO[family]))
        problem = transformers_mismatch(tok, str(folder))
        if problem is not None:  # a model type whose tokenizer class rebuilds tokenizer.json
            from flame.data.tokenizer import keep_tokenizer_json

            keep_tokenizer_json(str(folder))
            assert transformers_mismatch(tok, str(folder)) is None, (family, problem)


def test_qwen2_tokenizer_class_is_kept_from_rebuilding_the_tokenizer(runs, exported):
    """transformers gives qwen2 directories Qwen2Tokenizer, which replaces the pre-tokenizer (digits
    one by one, a Unicode normalizer): export keeps tokenizer.json as it is, and the check holds."""
    out = exported("qwen2")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config.get("trust_remote_code") is True
    config.pop("trust_remote_code")
    (out.parent / "plain").mkdir()
    for f in out.iterdir():
        (out.parent / "plain" / f.name).write_bytes(f.read_bytes())
    (out.parent / "plain" / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(out))
    problem = transformers_mismatch(tok, str(out.parent / "plain"))
    assert problem is not None and "Qwen2Tokenizer" in problem  # without it, "12345" is 5 tokens
    assert transformers_mismatch(tok, str(out)) is None


def test_export_refuses_a_tokenizer_transformers_would_change(runs, tmp_path, monkeypatch):
    import flame.data.tokenizer as tokenizer

    monkeypatch.setattr(tokenizer, "keep_tokenizer_json", lambda folder: None)  # no remedy left
    out = tmp_path / "out"
    with pytest.raises(FlameError, match=r"not exported: .*Qwen2Tokenizer.*first difference at token"):
        export(runs.full("qwen2"), out)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, no leftovers


@pytest.mark.parametrize("family", CUSTOM)
def test_custom_model_exports_its_weights_and_tokenizer(runs, tmp_path, family):
    from safetensors.torch import load_model
    from transformers import AutoTokenizer

    from flame.export import build_for_export
    from flame.inspect import load_run_config

    run_dir = runs.full(family)
    out = tmp_path / family
    with pytest.raises(FlameError, match="is a custom model, not a transformers one"):
        export(run_dir, out)
    assert not (out / "config.json").exists()
    ours, tok = _flame_model(run_dir)
    again = build_for_export(load_run_config(run_dir), tok.vocab_size).eval()
    load_model(again, str(out / "model.safetensors"))
    x = torch.tensor([tok.encode_batch([PROBE_TEXT])[0][:32].tolist()])
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok.encode(PROBE_TEXT, add_special_tokens=False) == tok.encode_batch([PROBE_TEXT])[0].tolist()


# ---------------------------------------------------------------- (d) generate


def _flame_generate(capsys, path, *extra) -> str:
    args = ["generate", str(path), "--prompt", PROMPT, "--max-tokens", "12", "--temperature", "0", *extra]
    capsys.readouterr()  # what came before (a run trained on first use)
    assert main(args) == 0
    return capsys.readouterr().out.removesuffix("\n")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_transformers_and_the_no_cache_loop(runs, exported, family, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flame.generate import sample_ids

    run_dir, out = runs.full(family), exported(family)
    text = _flame_generate(capsys, run_dir)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT), text  # not EOS at once
    assert _flame_generate(capsys, run_dir, "--no-cache") == text
    assert _flame_generate(capsys, out) == text  # the exported directory, through flame

    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    x = hf_tok(PROMPT, return_tensors="pt").input_ids
    new = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)[
        0, x.shape[1] :
    ]
    new = new.tolist()
    if hf_tok.eos_token_id in new:
        new = new[: new.index(hf_tok.eos_token_id)]
    assert PROMPT + hf_tok.decode(new) == text

    # past the context (32 tokens) the window slides: cache first, then the loop, as the loop alone
    model, tok = _flame_model(run_dir)
    prompt = tok.encode_batch([PROMPT])[0].tolist()
    cached = sample_ids(model, prompt, 40, 32, temperature=0, eos_id=None)
    assert len(cached) == 40
    assert cached == sample_ids(model, prompt, 40, 32, temperature=0, eos_id=None, use_cache=False)


def test_sampling_is_fixed_by_the_seed(runs, capsys):
    run_dir = runs.full("llama")
    args = ["--temperature", "1.0", "--top-k", "20", "--top-p", "0.9"]
    a = _flame_generate(capsys, run_dir, *args, "--seed", "1")
    assert _flame_generate(capsys, run_dir, *args, "--seed", "1") == a
    others = {_flame_generate(capsys, run_dir, *args, "--seed", str(s)) for s in (2, 3, 4)}
    assert others - {a}  # another seed, another sample


@pytest.mark.parametrize("family", CUSTOM)
def test_custom_model_generates_with_the_loop(runs, family, capsys):
    run_dir = runs.full(family)
    text = _flame_generate(capsys, run_dir)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT), text
    assert _flame_generate(capsys, run_dir, "--no-cache") == text
