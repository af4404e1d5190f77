"""`flame prepare` with worker processes started before the settings check (a new store)."""

import hashlib
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flame.data.prepare import prepare
from flame.data.tokenizer import _sha256_json, load_tokenizer


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([f"def f{i}(x):\n    return x * {i}\n" for i in range(300)], trainer)
    tok.save(str(d / "tokenizer.json"))
    return str(d)


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory) -> str:
    rng = random.Random(1)
    words = ["alpha", "beta", "γάμμα", "東京", "🚀", "def", "return", "\n", "x"]
    p = tmp_path_factory.mktemp("in") / "one.jsonl"
    lines = [
        json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randrange(1, 80)))})
        for _ in range(600)
    ]
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def _shards(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.iterdir())
        if p.suffix in (".tokens", ".docs")
    }


def _prepare(inp: str, tok: str, out: Path, workers: int) -> dict:
    return prepare([inp], tok, str(out), workers=workers, progress=False, unit_bytes=4096, log=lambda m: None)


def test_new_store_same_bytes_whatever_the_workers(bpe, big_jsonl, tmp_path):
    one = _prepare(big_jsonl, bpe, tmp_path / "w1", 1)
    two = _prepare(big_jsonl, bpe, tmp_path / "w2", 2)
    assert len(one["shards"]) > 2
    assert _shards(tmp_path / "w1") == _shards(tmp_path / "w2")
    assert (
        one["tokenizer"]["fingerprint"] == two["tokenizer"]["fingerprint"] == load_tokenizer(bpe).fingerprint
    )
    # a resumed run (the store is begun: no early start) redoes only the shard whose record is gone
    (tmp_path / "w2" / "units" / "u000001.json").unlink()
    (tmp_path / "w2" / "manifest.json").unlink()
    again = _prepare(big_jsonl, bpe, tmp_path / "w2", 2)
    assert again["shards"] == two["shards"]
    assert _shards(tmp_path / "w2") == _shards(tmp_path / "w1")


def test_begun_store_with_other_settings_is_refused(bpe, big_jsonl, tmp_path):
    """A begun store starts no worker before its settings are checked; other settings are refused."""
    from flame.errors import DataError

    _prepare(big_jsonl, bpe, tmp_path / "s", 2)
    with pytest.raises(DataError, match="different"):
        prepare([big_jsonl], "byte", str(tmp_path / "s"), workers=2, progress=False, log=lambda m: None)


def test_fingerprint_is_computed_when_asked(bpe):
    tok = load_tokenizer(bpe)
    assert "fingerprint" not in vars(tok)  # workers that never ask do not pay for it
    want = _sha256_json({"tokenizer": json.loads(tok._tok.to_str()), "eos_id": tok.eos_id})
    assert tok.fingerprint == want
    assert load_tokenizer(str(Path(bpe) / "tokenizer.json")).fingerprint == want
