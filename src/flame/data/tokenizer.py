"""Tokenizers: the built-in byte tokenizer and Hugging Face `tokenizers` files, behind one small API.

Document text is data: a literal "<|endoftext|>" inside a document is encoded as ordinary text,
never as the special id, so only flame itself places EOS between documents.
"""

from __future__ import annotations

import functools
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
        # the generic fast tokenizer: tokenizer.json as it is (a model-specific class may rebuild it)
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        "pad_token": eos_token,  # as in generation_config.json; padding never reaches training
        # no other special token, and none added around a text: flame encodes text alone
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        # text is data: literal special-token strings are not turned into special ids (as in flame)
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000_000,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"eos_token": eos_token, "pad_token": eos_token}, f, indent=2)


# Text an exported tokenizer must encode exactly as flame does: several scripts, digit runs,
# whitespace runs (spaces, tabs, CR LF, blank lines), code, emoji (also ZWJ sequences), a
# decomposed accent (unchanged only without a Unicode normalizer) and a literal special token.
PROBE_TEXT = (
    "The year 2024: 12345 + 678 = 13023; pi ~ 3.14159, 1e-9, 0x1F, 1,000,000.\n"
    "naïve café Ünïcödé, straße; ελληνικά, русский текст, 中文文本, 日本語のテキスト, 한국어, "
    "العربية, हिन्दी, עברית.\n"
    "Emoji: 🚀🔥 👩‍💻 🇫🇷 ✓; decomposed: cafe\u0301 vs café.\n"
    'def f(x, y=2):\n    """Doc."""\n\tif x  >=  y:\n\t\treturn {\'a\': [1, 2]}  # ok\n\n\n'
    "    trailing   spaces   \r\n  <|endoftext|> and </s> are plain text here.   "
)


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def transformers_mismatch(tok: Tokenizer, folder: str) -> str | None:
    """Why `AutoTokenizer.from_pretrained(folder)` does not encode like `tok`, or None when it does.

    Compared on PROBE_TEXT (plus the tokenizer's own EOS string as text): the ids with and without
    `add_special_tokens`, the EOS id, the number of tokens, and the decoded text.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its notes about the class it picked are reported below instead
    try:
        hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        return f"transformers cannot load it: {e}"
    finally:
        hf_logging.set_verbosity(verbosity)
    name = type(hf).__name__
    text = PROBE_TEXT + f" {getattr(tok, 'eos_token', ByteTokenizer.EOS)} "
    ours = tok.encode_batch([text])[0].tolist()
    for label, theirs in (
        ("encode(text, add_special_tokens=False)", hf.encode(text, add_special_tokens=False)),
        ("tokenizer(text)", hf(text)["input_ids"]),
    ):
        if theirs != ours:
            i = _first_difference(ours, theirs)
            return (
                f"transformers loads it as {name}, whose {label} gives {len(theirs)} tokens where flame's "
                f"gives {len(ours)}; first difference at token {i}: flame {ours[i : i + 4]} "
                f"({tok.decode(ours[i : i + 4])!r}), transformers {theirs[i : i + 4]} "
                f"({hf.decode(theirs[i : i + 4])!r})"
            )
    if hf.eos_token_id != tok.eos_id:
        return f"transformers loads it as {name}, whose EOS id is {hf.eos_token_id}, not {tok.eos_id}"
    if len(hf) != tok.vocab_size:
        return f"transformers loads it as {name} with {len(hf)} tokens, not {tok.vocab_size}"
    decoded = hf.decode(ours, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if decoded != tok.decode(ours):
        return f"transformers loads it as {name}, which decodes the probe text differently: {decoded!r}"
    return None


def keep_tokenizer_json(folder: str) -> None:
    """Make transformers load <folder>/tokenizer.json as it is, also where a model type's tokenizer
    class would rebuild it from the vocabulary (transformers 5 does so for some types, e.g. qwen2:
    Qwen2Tokenizer replaces the pre-tokenizer and adds a normalizer, whatever tokenizer_class says).

    The class's constructor reads the file as it is when `trust_remote_code` reaches it; no code is
    loaded (the directory has none, and no auto_map).
    """
    path = os.path.join(folder, "tokenizer_config.json")
    config = _read_json(Path(path))
    config["trust_remote_code"] = True
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


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

    @functools.cached_property
    def fingerprint(self) -> str:
        # the loaded definition, not the file's bytes: a saved copy of this tokenizer hashes the same.
        # Computed when asked (about half a second for 100k ids): prepare's workers never need it
        return _sha256_json({"tokenizer": json.loads(self._tok.to_str()), "eos_id": self.eos_id})

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


def _has_type(node, name: str) -> bool:
    """Whether a tokenizer.json component (or any part of a Sequence of them) is of type `name`."""
    if isinstance(node, dict):
        return node.get("type") == name or any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for (int64 [vocab_size]); 0 for EOS and specials.

    Exact for the byte tokenizer (1 per byte id) and for byte-level BPE (a ByteLevel decoder: each
    character of a token is one byte of the GPT-2 byte<->unicode map). Other tokenizers get an
    approximation: the bytes of the token decoded on its own, with a SentencePiece word-start
    marker counted as its space and a byte-fallback token `<0xHH>` as one byte. Bits per byte uses it.
    """
    if isinstance(tok, ByteTokenizer):
        out = np.ones(tok.vocab_size, np.int64)
        out[tok.eos_id] = 0
        return out
    hf = getattr(tok, "_tok", None)
    if hf is None:  # another implementation of the interface: decode each id on its own
        out = np.array([len(tok.decode([i]).encode("utf-8")) for i in range(tok.vocab_size)], np.int64)
        out[tok.eos_id] = 0
        return out
    spec = json.loads(hf.to_str())
    vocab = hf.get_vocab(with_added_tokens=False)  # token string -> id
    size = max([tok.vocab_size, *(i + 1 for i in vocab.values())])
    out = np.zeros(size, np.int64)
    if _has_type(spec.get("decoder"), "ByteLevel"):
        char_byte = set(bytes_to_unicode().values())
        for piece, i in vocab.items():
            out[i] = len(piece) if all(c in char_byte for c in piece) else len(piece.encode("utf-8"))
    else:
        ids = sorted(vocab.values())
        texts = hf.decode_batch([[i] for i in ids], skip_special_tokens=False)
        fallback = _has_type(spec.get("decoder"), "ByteFallback")
        by_id = dict(zip(ids, texts))
        for piece, i in vocab.items():
            text = by_id[i]
            if fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out[i] = 1
            else:
                out[i] = len(text.encode("utf-8")) + (piece.startswith("▁") and not text.startswith(" "))
    for added in spec.get("added_tokens", []):  # literal text unless special
        out[added["id"]] = 0 if added.get("special") else len(added["content"].encode("utf-8"))
    out[tok.eos_id] = 0
    return out


# written beside a tokenizer copy: a start compares one line instead of loading (and hashing) the copy
COPY_FINGERPRINT = "flame-fingerprint.txt"


def copy_fingerprint(folder: str | Path) -> str | None:
    """The fingerprint of the tokenizer copy in `folder`: the line written beside it, else by loading
    it (copies made before that file existed); None when there is none or it cannot be read."""
    folder = Path(folder)
    try:
        return (folder / COPY_FINGERPRINT).read_text().strip() or None
    except OSError:
        pass
    try:
        return load_tokenizer(str(folder)).fingerprint
    except Exception:  # absent, incomplete or unreadable: the caller writes a new copy
        return None


def save_tokenizer_copy(tok: Tokenizer, folder: str | Path, keep_old_as=None) -> None:
    """Make `folder` a copy of `tok` (its files and its fingerprint), unless it is one already.

    Written into a temporary sibling of a unique name first (the fingerprint file last) and moved
    into place; a writer that finds another one's copy of the same tokenizer already in place is
    done (parts of one store prepared at once). A crash leaves the old copy, the new one, or none
    (the next start writes it). `keep_old_as(old_fingerprint) -> Path`: where a different earlier
    copy is moved instead of deleted. Raises what writing raises (OSError, or the tokenizers
    library's own error)."""
    import errno
    import shutil
    import tempfile

    final = Path(folder)
    old = copy_fingerprint(final)
    if old == tok.fingerprint:
        return
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{final.name}.tmp"))
    try:
        tok.save_pretrained(str(tmp))
        (tmp / COPY_FINGERPRINT).write_text(tok.fingerprint + "\n")
        old = copy_fingerprint(final)  # again: another writer may have finished meanwhile
        if old == tok.fingerprint:
            return
        if old is not None and keep_old_as is not None and final.is_dir():
            kept = Path(keep_old_as(old))
            shutil.rmtree(kept, ignore_errors=True)
            os.replace(final, kept)
        if final.is_dir():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError as e:  # another writer's copy landed in between: fine if it is this tokenizer
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or copy_fingerprint(final) != tok.fingerprint:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
