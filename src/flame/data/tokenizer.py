"""Tokenizers: the built-in byte tokenizer and Hugging Face `tokenizers` files, behind one small API.

Document text is data: a literal "<|endoftext|>" inside a document is encoded as ordinary text,
never as the special id, so only flame itself places EOS between documents.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from flame.errors import DataError

MARKER = "flame_tokenizer.json"
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[EOS]")


class Tokenizer:
    """What the data engine needs from a tokenizer."""

    spec: str
    vocab_size: int
    eos_id: int
    fingerprint: str

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (int32 arrays), without EOS."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def save_pretrained(self, out_dir: str) -> None:
        """Write a directory `transformers.AutoTokenizer.from_pretrained` loads, encoding identically."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_hf_dir(tok, out_dir: str, eos_token: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        # text is data: literal special-token strings are not turned into special ids (as in flame)
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000_000,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"eos_token": eos_token}, f, indent=2)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what the ByteLevel pre-tokenizer emits)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; EOS is 256. Needs no files and no training."""

    EOS = "<|endoftext|>"

    def __init__(self):
        self.spec = "byte"
        self.vocab_size = 257
        self.eos_id = 256
        self.fingerprint = _sha256_json({"flame_byte_tokenizer": 1, "eos_id": 256, "vocab_size": 257})

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # errors="replace" only matters for lone surrogates, which sources already reject
        return [np.frombuffer(t.encode("utf-8", "replace"), np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids) -> str:
        # EOS shows as its name, as HF tokenizers decode it; each document's bytes decode on their own
        a = np.asarray(ids, dtype=np.int64).ravel()
        if ((a < 0) | (a > 256)).any():
            raise ValueError(f"byte tokenizer ids must be in [0, 256], got {a[(a < 0) | (a > 256)][:5]}")
        parts = np.split(a, np.flatnonzero(a == self.eos_id))
        pieces = [parts[0].astype(np.uint8).tobytes().decode("utf-8", "replace")]
        pieces += [self.EOS + p[1:].astype(np.uint8).tobytes().decode("utf-8", "replace") for p in parts[1:]]
        return "".join(pieces)

    def to_hf(self):
        """The same tokenizer as a `tokenizers.Tokenizer`: byte-level BPE with no merges."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTok

        vocab = {sym: b for b, sym in bytes_to_unicode().items()}
        tok = HFTok(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(self.EOS, special=True, normalized=False)])
        assert tok.token_to_id(self.EOS) == self.eos_id
        return tok

    def save_pretrained(self, out_dir: str) -> None:
        _write_hf_dir(self.to_hf(), out_dir, self.EOS)
        # lets load_tokenizer(out_dir) give back this tokenizer (same fingerprint, numpy fast path)
        with open(os.path.join(out_dir, MARKER), "w") as f:
            json.dump({"kind": "byte"}, f)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer: a tokenizer.json file, or a directory holding one."""

    def __init__(self, spec: str):
        from tokenizers import Tokenizer as HFTok

        self.spec = spec
        p = Path(spec)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise DataError(
                f"tokenizer '{spec}': no tokenizer.json found",
                hint="give 'byte', a tokenizer.json file, or a directory saved by a fast (Rust) tokenizer; "
                "convert a slow one with AutoTokenizer.from_pretrained(d).save_pretrained(new_dir)",
            )
        try:
            self._tok = HFTok.from_file(str(file))
        except Exception as e:
            raise DataError(
                f"tokenizer '{spec}': cannot load {file}: {e}",
                hint="the file must be a tokenizer.json written by the Hugging Face `tokenizers` library",
            ) from None
        self._tok.encode_special_tokens = True
        self._tok.no_truncation()
        self._tok.no_padding()
        self._fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token, self.eos_id = self._find_eos(file.parent)
        # the loaded definition, not the file's bytes: a saved copy of this tokenizer hashes the same
        self.fingerprint = _sha256_json({"tokenizer": json.loads(self._tok.to_str()), "eos_id": self.eos_id})

    def _find_eos(self, folder: Path) -> tuple[str, int]:
        names = []
        for cfg in ("tokenizer_config.json", "special_tokens_map.json"):
            name = _token_name(_read_json(folder / cfg).get("eos_token"))
            if name:
                names.append(name)
        for name in [*names, *EOS_NAMES]:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return name, tid
        raise DataError(
            f"tokenizer '{self.spec}' has no end-of-text token (looked for eos_token in "
            f"tokenizer_config.json and for {', '.join(EOS_NAMES)})",
            hint='add one, e.g. tok.add_special_tokens(["<|endoftext|>"]), save it, '
            'and/or set "eos_token" in tokenizer_config.json next to tokenizer.json',
        )

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encs = self._fast(texts, add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save_pretrained(self, out_dir: str) -> None:
        _write_hf_dir(self._tok, out_dir, self.eos_token)


def load_tokenizer(spec: str) -> Tokenizer:
    """'byte' (built in), a Hugging Face tokenizer directory, or a tokenizer.json path."""
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.exists(spec):
        raise DataError(
            f"tokenizer '{spec}': no such file or directory",
            hint="use 'byte' for the built-in byte tokenizer, or a path to a tokenizer directory / tokenizer.json",
        )
    if _read_json(Path(spec) / MARKER).get("kind") == "byte":
        tok = ByteTokenizer()
        tok.spec = spec
        return tok
    return HFTokenizer(spec)
