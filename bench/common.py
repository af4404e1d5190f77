"""Shared helpers of the benchmarks: a local corpus, a locally trained BPE, timers, memory, tables.

Nothing here downloads anything: the corpus is the running interpreter's standard library sources
cut into ~2 KB documents, and the tokenizer is a byte-level BPE trained on it in-process.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "out"
EOS = "<|endoftext|>"

# the src layout works without an editable install too
_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))


# ---------------------------------------------------------------- corpus


def stdlib_files() -> list[Path]:
    """The standard library's .py files (recursive, without any site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def documents(target_bytes: int, doc_bytes: int = 2048) -> list[str]:
    """About `target_bytes` of text as documents of ~`doc_bytes`, cut at line ends.

    Cycles over the standard library if it is smaller than the target (a repeat is marked so
    documents stay distinct).
    """
    docs: list[str] = []
    total = 0
    rounds = 0
    files = stdlib_files()
    while total < target_bytes:
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            if rounds:
                text = f"# copy {rounds}\n" + text
            for doc in _cut(text, doc_bytes):
                docs.append(doc)
                total += len(doc.encode("utf-8"))
                if total >= target_bytes:
                    return docs
        rounds += 1
    return docs


def _cut(text: str, size: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        piece = text[start:end]
        if piece.strip():
            yield piece
        start = end


def write_jsonl(docs: Sequence[str], folder: Path, files: int) -> list[Path]:
    """Documents as `files` jsonl files of {"text": ...} records (consecutive runs of documents)."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // files)
    paths = []
    for i in range(files):
        p = folder / f"part-{i:03d}.jsonl"
        with open(p, "w", encoding="utf-8") as f:
            for d in docs[i * per : (i + 1) * per]:
                f.write(json.dumps({"text": d}) + "\n")
        paths.append(p)
    return paths


def train_bpe(
    docs: Sequence[str], folder: Path, vocab_size: int = 16384, sample_bytes: int = 8 << 20
) -> Path:
    """A byte-level BPE with an EOS token, trained on the first `sample_bytes` of `docs`.

    Written as a directory (tokenizer.json + tokenizer_config.json) that flame and transformers load.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sample, n = [], 0
    for d in docs:
        sample.append(d)
        n += len(d)
        if n >= sample_bytes:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "model_max_length": 10**12}
        )
    )
    return folder


# ---------------------------------------------------------------- timing and memory


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished, reaped descendants."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def stop_forkserver() -> None:
    """Stop multiprocessing's forkserver (if one runs) so the CPU time of the workers it reaped
    counts in `cpu_seconds` (private API, used by CPython's own tests; a no-op if it changes)."""
    try:
        from multiprocessing import forkserver

        forkserver._forkserver._stop()
    except Exception:
        pass


def rss_anon_kib(pid: int | str = "self") -> int:
    """Anonymous resident memory (RssAnon, KiB) of a process: heap and stacks, not mapped files."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/<pid>/status (Linux only)")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------- formatting


def si(x: float, unit: str = "") -> str:
    for prefix, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def nbytes(x: float) -> str:
    for prefix, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= div:
            return f"{x / div:.3g} {prefix}"
    return f"{x:.0f} B"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def machine() -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{os.cpu_count()} cores, load {load:.1f} at start, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def emit(name: str, text: str) -> Path:
    """Print a report and keep it as bench/out/<name>.md."""
    print(text, flush=True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.md"
    path.write_text(text + "\n")
    print(f"\n(written to {path})", flush=True)
    return path
