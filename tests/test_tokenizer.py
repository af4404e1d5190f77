import json
import random
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flame.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from flame.errors import DataError

CORPUS = [
    "def main():\n    return 42\n",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — 東京 🚀 emoji and unicode",
    "import numpy as np\nx = np.zeros(3)\n",
] * 5


def random_text(rng: random.Random, n: int) -> str:
    """Mixed ASCII, BMP and astral code points (no lone surrogates: they are not text)."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.6:
            out.append(chr(rng.randrange(0, 128)))
        elif r < 0.85:
            out.append(chr(rng.choice([rng.randrange(128, 0xD800), rng.randrange(0xE000, 0x10000)])))
        else:
            out.append(chr(rng.randrange(0x10000, 0x110000)))
    return "".join(out)


def train_bpe(folder, specials=("<|endoftext|>",), vocab=300) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return str(folder)


def test_byte_encode_is_utf8_and_round_trips():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    rng = random.Random(0)
    texts = [random_text(rng, rng.randrange(0, 200)) for _ in range(50)] + [""]
    ids = tok.encode_batch(texts)
    for t, a in zip(texts, ids):
        assert a.dtype.kind == "i"
        assert a.tolist() == list(t.encode("utf-8"))
        assert tok.decode(a) == t
    # EOS decodes to its name between documents, and each side decodes on its own
    both = np.concatenate([ids[0], [256], ids[1]])
    assert tok.decode(both) == texts[0] + "<|endoftext|>" + texts[1]


def test_byte_export_encodes_identically_with_transformers(tmp_path):
    from transformers import AutoTokenizer

    tok = ByteTokenizer()
    tok.save_pretrained(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token_id == 256 and hf.eos_token == "<|endoftext|>"
    rng = random.Random(1)
    texts = [random_text(rng, rng.randrange(1, 300)) for _ in range(100)]
    texts += ["hello <|endoftext|> world\r\n\t  x", " leading space", "trailing  "]
    for t, ids in zip(texts, tok.encode_batch(texts)):
        assert hf.encode(t, add_special_tokens=False) == ids.tolist()
        assert hf(t)["input_ids"] == ids.tolist()
        assert hf.decode(ids.tolist()) == t
    # reloading the export gives the byte tokenizer back, with the same fingerprint
    again = load_tokenizer(str(tmp_path))
    assert isinstance(again, ByteTokenizer) and again.fingerprint == tok.fingerprint


def test_hf_tokenizer_encodes_like_tokenizers_and_finds_eos(tmp_path):
    d = train_bpe(tmp_path / "bpe")
    tok = load_tokenizer(d)
    raw = Tokenizer.from_file(f"{d}/tokenizer.json")
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == raw.token_to_id("<|endoftext|>")
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    for t, ids in zip(CORPUS, tok.encode_batch(CORPUS)):
        assert ids.tolist() == raw.encode(t, add_special_tokens=False).ids
        assert tok.decode(ids) == t
    # document text is data: a literal special-token string never becomes EOS
    ids = tok.encode_batch(["a <|endoftext|> b"])[0]
    assert tok.eos_id not in ids.tolist()
    assert tok.decode(ids) == "a <|endoftext|> b"


def test_hf_export_round_trip_with_transformers(tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(train_bpe(tmp_path / "bpe"))
    tok.save_pretrained(str(tmp_path / "out"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert hf.eos_token_id == tok.eos_id
    rng = random.Random(2)
    texts = CORPUS + [random_text(rng, 100) for _ in range(20)] + ["x <|endoftext|> y"]
    for t, ids in zip(texts, tok.encode_batch(texts)):
        assert hf.encode(t, add_special_tokens=False) == ids.tolist()
    copy = load_tokenizer(str(tmp_path / "out"))
    assert copy.fingerprint == tok.fingerprint


def test_fingerprint_same_tokenizer_any_path_and_differs_otherwise(tmp_path):
    d = train_bpe(tmp_path / "a")
    shutil.copytree(d, tmp_path / "b")
    a = load_tokenizer(d)
    assert load_tokenizer(str(tmp_path / "b")).fingerprint == a.fingerprint
    assert load_tokenizer(str(tmp_path / "b" / "tokenizer.json")).fingerprint == a.fingerprint
    other = load_tokenizer(train_bpe(tmp_path / "c", vocab=280))
    assert other.fingerprint != a.fingerprint
    assert ByteTokenizer().fingerprint == load_tokenizer("byte").fingerprint != a.fingerprint
    assert len(a.fingerprint) == 64 and int(a.fingerprint, 16) >= 0


def test_eos_from_tokenizer_config(tmp_path):
    d = train_bpe(tmp_path / "t", specials=("<s>", "<my_eos>"))
    with pytest.raises(DataError, match="no end-of-text token"):
        load_tokenizer(d)
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<my_eos>"}}))
    tok = load_tokenizer(d)
    assert tok.eos_id == Tokenizer.from_file(f"{d}/tokenizer.json").token_to_id("<my_eos>")


def test_common_eos_names(tmp_path):
    tok = load_tokenizer(train_bpe(tmp_path / "t", specials=("<pad>", "</s>")))
    assert tok.eos_id == 1


def test_load_errors_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot load"):
        load_tokenizer(str(bad))


def test_tokenizer_copy_is_written_once_and_an_earlier_one_is_kept(tmp_path):
    """The shared copy helper (a run's and a store's tokenizer copy): a copy with the same fingerprint
    is left alone, a copy from before the fingerprint file is recognised by loading it, and another
    tokenizer replaces it with the old copy kept where asked."""
    import os

    from flame.data.tokenizer import COPY_FINGERPRINT, copy_fingerprint, save_tokenizer_copy

    a = load_tokenizer(train_bpe(tmp_path / "a"))
    b = load_tokenizer(train_bpe(tmp_path / "b", vocab=280))
    assert a.fingerprint != b.fingerprint
    dest = tmp_path / "run" / "tokenizer"
    dest.parent.mkdir()
    assert copy_fingerprint(dest) is None
    save_tokenizer_copy(a, dest)
    assert (dest / COPY_FINGERPRINT).read_text().strip() == a.fingerprint
    assert load_tokenizer(str(dest)).fingerprint == a.fingerprint
    before = {f: os.stat(dest / f).st_mtime_ns for f in os.listdir(dest)}
    save_tokenizer_copy(a, dest)  # the same tokenizer: nothing rewritten
    assert {f: os.stat(dest / f).st_mtime_ns for f in os.listdir(dest)} == before
    (dest / COPY_FINGERPRINT).unlink()  # a copy made before the fingerprint file
    assert copy_fingerprint(dest) == a.fingerprint

    kept = tmp_path / "run" / "kept"
    save_tokenizer_copy(b, dest, keep_old_as=lambda old: kept if old == a.fingerprint else None)
    assert load_tokenizer(str(dest)).fingerprint == b.fingerprint == copy_fingerprint(dest)
    assert load_tokenizer(str(kept)).fingerprint == a.fingerprint
    assert sorted(p.name for p in dest.parent.iterdir()) == ["kept", "tokenizer"]  # no temporary left
