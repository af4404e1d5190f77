"""Streaming mode: read, tokenize and pack raw inputs on the fly, with a resume state of a few integers.

The arithmetic (DESIGN.md, "The arithmetic of the streaming mode"):

- Inputs become a sorted list of n units (`streaming_units`). The units of all epochs form one
  endless sequence of *slots*: slot g is unit perm(seed, g // n)(g % n) of epoch g // n.
- There are S = world_size * max(1, num_workers) streams; stream s = rank * workers + worker reads
  slots s, s + S, s + 2S, ... So each epoch's units are dealt to the streams disjointly, round
  robin over a keyed shuffle, and a stream runs straight from its last unit of epoch e into its
  first unit of epoch e + 1: streams never end, so every rank yields batches forever and an epoch
  boundary cannot hang a multi-rank run.
- More streams than units (S > n) needs no special case: a stream whose turn in epoch e finds no
  unit left reads its slot of a later epoch (stream s starts in epoch s // n). Streams then run in
  different epochs at the same time; every epoch is still read exactly once, slot by slot.
- A stream's tokens are its documents, each followed by EOS, concatenated. Windows of M =
  data.window samples of L = context_len tokens are cut from that stream back to back; each window
  is emitted in the order of a permutation keyed by (seed, stream, window index). The next window
  starts at the token where this one ended, so no token is ever dropped: there is no "final
  partial window" because a stream's token stream never ends (the tail of one epoch shares its
  window with the head of the next).
- State of a stream = (slot, document position, token offset in that document, window index,
  samples emitted from the window): the window start, never buffer contents. Resuming opens the
  slot's unit at the document (a byte seek for uncompressed jsonl/txt, skipped records otherwise),
  re-tokenizes one window and skips what was emitted.

A micro-batch holds B consecutive samples of one stream. With W workers the rank's micro-batches
come from its W streams in turn (torchdata's StatefulDataLoader, which also collects each worker's
stream state with every batch); with num_workers = 0 the one stream runs in the training process.
Resuming needs the same world size and worker count (use a prepared store for elastic runs).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from flame.data.order import epoch_permutation, mix64
from flame.data.sources import (
    TEXT_UNIT_BYTES,
    BadRecords,
    Unit,
    expand_inputs,
    kind_of,
    plan_units,
    read_unit,
)
from flame.data.tokenizer import Tokenizer
from flame.errors import ConfigError, DataError, FlameError

STATE_VERSION = 1
_MARK = "flame_stream"  # tags a stream's state inside torchdata's loader state
_ERROR = "_flame_stream_error"  # a user-facing error raised in a worker, carried to the main process
_MAX_UNIT = 64 << 20
_MIN_UNIT = 1 << 20
_M64 = (1 << 64) - 1


def streaming_units(paths: list[str]) -> list[Unit]:
    """Units of the inputs, sorted. Text files split as `flame prepare` splits them (64 MiB, so a
    .txt document means the same thing in both modes); jsonl/parquet/saved datasets into about
    1/64 of the corpus (1 to 64 MiB), so that a few big files still feed many streams."""
    total = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
    target = min(_MAX_UNIT, max(_MIN_UNIT, total // 64))
    text = [p for p in paths if kind_of(p) == "text"]
    rest = [p for p in paths if kind_of(p) != "text"]
    units = plan_units(text, TEXT_UNIT_BYTES) + plan_units(rest, target)
    return sorted(units, key=lambda u: (u.path, u.start))


def slot_unit(slot: int, n: int, seed: int, shuffle: bool) -> int:
    """Index of the unit in slot `slot` (epoch slot // n)."""
    epoch, j = divmod(slot, n)
    return int(epoch_permutation(n, seed, epoch, shuffle)(j))


def window_order(m: int, seed: int, stream: int, window: int, shuffle: bool) -> np.ndarray:
    """The order in which a window's m samples are emitted, keyed by (seed, stream, window)."""
    if not shuffle:
        return np.arange(m, dtype=np.int64)
    key = (int(mix64(seed)[0]) * 0x100000001B3 + stream) & _M64
    return np.asarray(epoch_permutation(m, key, window)(np.arange(m)), dtype=np.int64)


@dataclass
class StreamSpec:
    """Everything a stream needs; the same on every rank and worker."""

    units: list[Unit]
    tokenizer: Tokenizer
    context_len: int
    window: int
    seed: int
    shuffle: bool
    batch_size: int
    varlen: bool
    num_streams: int
    text_field: str = "text"
    bad_records: str = "skip"
    max_bad_fraction: float = 0.5

    @property
    def num_units(self) -> int:
        return len(self.units)


# ---------------------------------------------------------------- one stream


@dataclass
class _Chunk:
    """Tokens of a run of documents of one slot, each followed by EOS."""

    slot: int
    tokens: np.ndarray  # int64
    starts: np.ndarray  # offset of each document in `tokens`
    positions: list[int]  # each document's Doc.position (where read_unit can resume)


class _Reader:
    """A cursor over a stream's tokens: fills buffers and says where it stands."""

    def __init__(self, chunks, skip: int):
        self.chunks = chunks
        self.chunk: _Chunk = next(chunks)
        self.p = skip
        first_len = self.chunk.starts[1] if len(self.chunk.starts) > 1 else len(self.chunk.tokens)
        if skip >= first_len:
            raise DataError(
                "streaming: the saved data position lies past the end of its document "
                "(the corpus or tokenizer changed since the checkpoint)",
                hint="resume with the same inputs and tokenizer, or pass --checkpoint.allow_config_change true",
            )

    def position(self) -> tuple[int, int, int]:
        """(slot, document position, token offset in that document) of the next token."""
        c = self.chunk
        d = int(np.searchsorted(c.starts, self.p, side="right")) - 1
        return c.slot, c.positions[d], self.p - int(c.starts[d])

    def read(self, out: np.ndarray, doc_start: np.ndarray) -> None:
        """Fill `out` with the next tokens; mark in `doc_start` where a document begins."""
        i, n = 0, len(out)
        while i < n:
            c = self.chunk
            take = min(len(c.tokens) - self.p, n - i)
            out[i : i + take] = c.tokens[self.p : self.p + take]
            lo, hi = np.searchsorted(c.starts, [self.p, self.p + take], side="left")
            doc_start[i + c.starts[lo:hi] - self.p] = True
            i += take
            self.p += take
            if self.p == len(c.tokens):  # look ahead, so position() always names a real token
                self.chunk = next(self.chunks)
                self.p = 0


class TokenStream:
    """Stream `stream` of `spec.num_streams`: micro-batches of B samples, forever; resumable."""

    def __init__(self, spec: StreamSpec, stream: int, state: dict | None = None):
        self.spec, self.stream = spec, stream
        if state is None:
            state = initial_state(stream)
        if state["stream"] != stream:
            raise ValueError(f"state of stream {state['stream']} given to stream {stream}")
        self.slot, self.doc, self.tok = state["slot"], state["doc"], state["tok"]
        self.window, self.emitted = state["window"], state["emitted"]
        self.bad = BadRecords(spec.bad_records, spec.max_bad_fraction)
        self._reader: _Reader | None = None
        self._win: np.ndarray | None = None
        self._budget = min(8 << 20, max(1 << 16, 2 * spec.window * spec.context_len))

    def state_dict(self) -> dict:
        return {
            _MARK: STATE_VERSION,
            "stream": self.stream,
            "slot": self.slot,
            "doc": self.doc,
            "tok": self.tok,
            "window": self.window,
            "emitted": self.emitted,
        }

    # -- reading
    def _chunks(self):
        """Tokenized chunks from the window start's slot on, forever."""
        spec, tok = self.spec, self.spec.tokenizer
        n, slot, start = spec.num_units, self.slot, self.doc
        empty_run = 0
        units_read, tokens_read = 0, 0  # over the corpus's unit count x streams: a pass or more
        while True:
            unit = spec.units[slot_unit(slot, n, spec.seed, spec.shuffle)]
            got = False
            docs, chars = [], 0
            for doc in read_unit(unit, spec.text_field, self.bad, start):
                docs.append(doc)
                chars += len(doc.text)
                if chars >= self._budget:
                    chunk = self._encode(slot, docs, tok)
                    tokens_read += len(chunk.tokens)
                    yield chunk
                    got, docs, chars = True, [], 0
            if docs:
                chunk = self._encode(slot, docs, tok)
                tokens_read += len(chunk.tokens)
                yield chunk
                got = True
            units_read += 1
            if units_read == n * spec.num_streams and 0 < tokens_read < spec.context_len:
                # the rule of prepared mode too: a pass over the data holds at least one sample
                raise DataError(
                    f"streaming: a pass over the {n} input unit(s) gave {tokens_read} tokens, fewer than one "
                    f"sample of data.context_len = {spec.context_len}: every sample would repeat the corpus",
                    hint="use more data or a smaller --data.context_len",
                )
            empty_run = 0 if got else empty_run + 1
            if empty_run > 8 * n + 8:
                raise DataError(
                    f"streaming: stream {self.stream} read {empty_run} units in a row without a usable "
                    f"document (the last one {unit.path}); the corpus is empty or unusable for this stream",
                    hint="check the inputs and data.text_field; with fewer units than streams, "
                    "use fewer loader workers or processes",
                )
            slot += spec.num_streams
            start = None

    def _encode(self, slot: int, docs: list, tok: Tokenizer) -> _Chunk:
        ids = tok.encode_batch([d.text for d in docs])
        lens = np.fromiter((len(a) + 1 for a in ids), dtype=np.int64, count=len(ids))
        ends = np.cumsum(lens)
        tokens = np.empty(int(ends[-1]), dtype=np.int64)
        for a, e in zip(ids, ends):
            tokens[e - len(a) - 1 : e - 1] = a
        tokens[ends - 1] = tok.eos_id
        return _Chunk(slot, tokens, ends - lens, [d.position for d in docs])

    def _open(self) -> _Reader:
        chunks = self._chunks()
        reader = _Reader(chunks, self.tok)
        if self.doc is not None and reader.chunk.positions[0] != self.doc:
            raise DataError(
                f"streaming: the saved data position (document at {self.doc} of slot {self.slot}) is not "
                "where it was: the inputs changed since the checkpoint",
                hint="resume with the same inputs, or pass --checkpoint.allow_config_change true",
            )
        return reader

    def _fill(self) -> None:
        m, L = self.spec.window, self.spec.context_len
        if self._reader is None:
            self._reader = self._open()
        self._win = np.empty((m, L), dtype=np.int64)
        self._doc_start = np.zeros((m, L), dtype=bool)
        self._reader.read(self._win.reshape(-1), self._doc_start.reshape(-1))
        self._doc_start[:, 0] = True  # every sample starts a segment
        self._next = self._reader.position()
        self._order = window_order(m, self.spec.seed, self.stream, self.window, self.spec.shuffle)

    def next_sample(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [L], document-start flags [L]) of the next sample."""
        if self._win is None:
            self._fill()
        j = self._order[self.emitted]
        out = self._win[j], self._doc_start[j]
        self.emitted += 1
        if self.emitted == self.spec.window:  # the state names the next window's start at once
            self.slot, self.doc, self.tok = self._next
            self.window += 1
            self.emitted = 0
            self._win = None
        return out

    def next_batch(self) -> dict:
        B, L = self.spec.batch_size, self.spec.context_len
        ids = np.empty((B, L), dtype=np.int64)
        starts = np.empty((B, L), dtype=bool)
        for b in range(B):
            ids[b], starts[b] = self.next_sample()
        return make_batch(ids, starts if self.spec.varlen else None)


def initial_state(stream: int, slot: int | None = None) -> dict:
    """The state of a stream that has read nothing (from its first slot, or from `slot`)."""
    return {
        _MARK: STATE_VERSION,
        "stream": stream,
        "slot": stream if slot is None else slot,
        "doc": None,
        "tok": 0,
        "window": 0,
        "emitted": 0,
    }


def make_batch(ids: np.ndarray, doc_start: np.ndarray | None) -> dict:
    """The model's batch: input_ids [B, L], or with document starts the flattened varlen layout."""
    t = torch.from_numpy(ids)
    if doc_start is None:
        return {"input_ids": t}
    B, L = ids.shape
    cu = np.concatenate([np.flatnonzero(doc_start.reshape(-1)), [B * L]]).astype(np.int32)
    seg = np.diff(cu)
    pos = np.arange(B * L, dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), seg)
    flat = t.view(1, -1)
    labels = flat.clone()
    labels[0, torch.from_numpy(cu[1:-1].astype(np.int64))] = -100  # no prediction across a boundary
    return {
        "input_ids": flat,
        "labels": labels,
        "position_ids": torch.from_numpy(pos).view(1, -1),
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": int(seg.max()),
        "num_targets": B * L - 1 - (len(cu) - 2),  # every position after the first but boundaries
    }


# ---------------------------------------------------------------- worker side


class StreamDataset(IterableDataset):
    """A rank's streams as a torchdata-stateful IterableDataset: loader worker i runs local stream
    (i + rotation) % W, so a resumed run continues with the stream that was next."""

    def __init__(self, spec: StreamSpec, first: int, states: list[dict], rotation: int = 0):
        self.spec, self.first, self.states, self.rotation = spec, first, states, rotation
        self._stream: TokenStream | None = None

    def _get(self) -> TokenStream:
        if self._stream is None:
            info = get_worker_info()
            w = ((info.id if info is not None else 0) + self.rotation) % len(self.states)
            self._stream = TokenStream(self.spec, self.first + w, self.states[w])
        return self._stream

    def __iter__(self):
        stream = self._get()
        while True:
            try:
                batch = stream.next_batch()
            except FlameError as e:  # reach the user as the same clear error, not a worker traceback
                yield {_ERROR: (type(e).__name__, e.message, e.hint)}
                return
            yield batch

    def state_dict(self) -> dict:
        return self._get().state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._stream = None
        self.states[(state["stream"] - self.first) % len(self.states)] = state


def _find_states(obj: Any, out: list[dict]) -> list[dict]:
    """The stream states inside torchdata's (nested) loader state."""
    if isinstance(obj, dict):
        if _MARK in obj:
            out.append(obj)
        else:
            for v in obj.values():
                _find_states(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _find_states(v, out)
    return out


def _raise_worker_error(err: tuple) -> None:
    import flame.errors as errors

    name, message, hint = err
    cls = getattr(errors, name, FlameError)
    if cls is errors.ConfigError:
        cls = FlameError
    raise cls(message, hint=hint)


# ---------------------------------------------------------------- the loader


class StreamingLoader:
    """A rank's iterator over streamed micro-batches; same interface as PreparedLoader."""

    kind = "streaming"

    def __init__(
        self,
        spec: StreamSpec,
        rank: int,
        world_size: int,
        num_workers: int,
        accum: int,
        fingerprint: str = "",
        legacy_fingerprint: str = "",
        log=None,
    ):
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.workers = max(1, num_workers)
        if spec.num_streams != world_size * self.workers:
            raise ValueError("spec.num_streams must be world_size * max(1, num_workers)")
        self.first = rank * self.workers
        self.accum = accum
        self.global_batch = spec.batch_size * world_size * accum
        self.micro = 0
        self.fingerprint = fingerprint
        self.legacy_fingerprint = legacy_fingerprint or fingerprint  # runs that saved relative paths
        self._states = [initial_state(self.first + w) for w in range(self.workers)]
        self._next_local = 0  # which local stream gives the next micro-batch
        self._live: TokenStream | None = None
        self._dl = None
        self._dl_yielded = 0
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))

    @classmethod
    def from_config(cls, cfg, inputs: list[str], tok: Tokenizer, world) -> StreamingLoader:
        d = cfg.data
        paths = expand_inputs(inputs)
        units = streaming_units(paths)
        if not units or all(os.path.isfile(u.path) and os.path.getsize(u.path) == 0 for u in units):
            raise DataError(
                f"streaming: the inputs {inputs} hold no data (every file is empty)",
                hint="point --data.inputs at a corpus with text",
            )
        workers = max(1, d.num_workers)
        spec = StreamSpec(
            units=units,
            tokenizer=tok,
            context_len=d.context_len,
            window=d.window,
            seed=d.seed,
            shuffle=d.shuffle,
            batch_size=d.batch_size,
            varlen=d.varlen,
            num_streams=world.world_size * workers,
            text_field=d.text_field,
            bad_records=d.bad_records,
            max_bad_fraction=d.max_bad_fraction,
        )
        return cls(
            spec,
            world.rank,
            world.world_size,
            d.num_workers,
            cfg.train.grad_accum,
            fingerprint=data_fingerprint(spec, paths),
            legacy_fingerprint=data_fingerprint(spec, paths, relative=True),
            log=print if world.is_main else (lambda m: None),
        )

    @property
    def tokens_per_micro(self) -> int:
        return self.spec.batch_size * self.spec.context_len

    # -- iteration
    def __iter__(self):
        self._sync()
        if self.num_workers == 0:
            self._live = TokenStream(self.spec, self.first, self._states[0])
            while True:
                b = self._live.next_batch()
                self.micro += 1
                yield b
        from torchdata.stateful_dataloader import StatefulDataLoader

        from flame.data.order import ignore_stop_signals

        ds = StreamDataset(self.spec, self.first, [dict(s) for s in self._states], self._next_local)
        with warnings.catch_warnings():  # torchdata's own deprecation noise, nothing the user can act on
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self._dl = StatefulDataLoader(
                ds,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=4,
                persistent_workers=False,
                worker_init_fn=functools.partial(ignore_stop_signals, main_pid=os.getpid()),
                snapshot_every_n_steps=1,  # each batch carries its worker's stream state
            )
        self._dl_yielded = 0
        for b in self._dl:
            if _ERROR in b:
                _raise_worker_error(b[_ERROR])
            self.micro += 1
            self._dl_yielded += 1
            self._next_local = (self._next_local + 1) % self.workers
            yield b

    def _sync(self) -> None:
        """Bring the saved stream states up to the last micro-batch handed out."""
        if self._live is not None:
            self._states[0] = self._live.state_dict()
        elif self._dl is not None and self._dl_yielded:
            for st in _find_states(self._dl.state_dict(), []):
                self._states[st["stream"] - self.first] = dict(st)

    def local_states(self) -> list[dict]:
        self._sync()
        return [dict(s) for s in self._states]

    def epoch(self) -> float:
        """Passes over the data so far, estimated from the units the rank's streams have finished."""
        self._sync()
        n = self.spec.num_units
        return sum((s["slot"] - s["stream"]) / n for s in self._states) / self.workers

    # -- state
    def state_dict(self) -> dict:
        if self.micro % self.accum:
            raise RuntimeError("data state is only taken between optimizer steps")
        streams = {str(s["stream"]): s for s in self.local_states()}
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            # rank 0 writes the checkpoint's data state: it carries every rank's streams
            parts: list = [None] * self.world_size
            dist.all_gather_object(parts, streams)
            streams = {k: v for p in parts for k, v in p.items()}
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "world_size": self.world_size,
            "workers": self.workers,
            "num_units": self.spec.num_units,
            "step": self.micro // self.accum,
            "global_batch": self.global_batch,  # informational: the stream states do not depend on it
            "next_local": self._next_local,
            "streams": streams,
        }

    def load_state_dict(self, state: dict, allow_change: bool = False) -> None:
        if state.get("kind") != self.kind or state.get("version") != STATE_VERSION:
            raise DataError(
                f"the checkpoint's data state is of kind {state.get('kind')!r}, this run reads {self.kind}"
            )
        problem, hint = layout_problem(state, self.world_size, self.workers) or (None, None)
        if problem is None and state["fingerprint"] not in (self.fingerprint, self.legacy_fingerprint):
            problem = "the data (inputs, tokenizer, context length, window, seed or shuffle) differs from the checkpoint's"
            hint = "resume with the same data settings, or pass --checkpoint.allow_config_change true"
        self._reset()
        self.micro = state["step"] * self.accum
        if problem is not None:
            if not allow_change:
                raise DataError(problem, hint=hint)
            # start every stream afresh at the first epoch no saved stream has begun
            n_old = max(1, state["num_units"])
            epoch = max((s["slot"] // n_old for s in state["streams"].values()), default=-1) + 1
            base = epoch * self.spec.num_units
            self._states = [initial_state(s, base + s) for s in range(self.first, self.first + self.workers)]
            self._next_local = 0
            self._log(f"note: {problem}; the data streams restart at epoch {epoch}")
            return
        mine = []
        for s in range(self.first, self.first + self.workers):
            st = state["streams"].get(str(s))
            if st is None:
                raise DataError(f"the checkpoint's data state has no position for stream {s}")
            mine.append(dict(st))
        self._states = mine
        self._next_local = state["next_local"] % self.workers

    def _reset(self) -> None:
        self._live = None
        self._dl = None
        self._dl_yielded = 0


def layout_problem(state: dict, world_size: int, workers: int) -> tuple[str, str] | None:
    """(problem, hint) when a saved streaming position belongs to another layout (processes x streams
    per process), else None. Streams cannot be re-split: the hint names the resume that works, the
    checkpoint's own layout, and the way to keep this one (the streams restart at an epoch boundary)."""
    saved = (state.get("world_size"), state.get("workers"))
    if state.get("kind") != StreamingLoader.kind or None in saved or saved == (world_size, workers):
        return None
    w0, k0 = saved
    where = (
        "in one process (no torchrun)" if w0 == 1 else f"on {w0} processes (torchrun --nproc_per_node {w0})"
    )
    nw = f"--data.num_workers {k0}" if k0 > 1 else "--data.num_workers 0 (or 1)"
    problem = (
        f"the checkpoint's streaming position belongs to {w0} process(es) with {k0} stream(s) each "
        f"(data.num_workers); this run has {world_size} with {workers}, and streams cannot be re-split"
    )
    hint = (
        f"resume {where} with {nw}, as the checkpoint was taken; or pass --checkpoint.allow_config_change "
        "true to keep this layout and restart the streams at the next epoch boundary (a run that must "
        "change its world size mid-way is better fed from a prepared store, --data.store)"
    )
    return problem, hint


def check_resume_layout(state: dict, world_size: int, num_workers: int) -> None:
    """Refuse a streaming resume on another layout with the fix that works (ConfigError, exit 2).

    Called before anything else about the resume is worked out: on another world size the trainer
    would otherwise first suggest a data.batch_size that keeps the global batch, and then refuse
    that too, because the streams themselves cannot move."""
    found = layout_problem(state, world_size, max(1, num_workers))
    if found is not None:
        raise ConfigError(f"{found[0]}: {found[1]}")


def data_fingerprint(spec: StreamSpec, paths: list[str], relative: bool = False) -> str:
    """What the sample stream depends on (not the batch size or the varlen layout). Input paths count
    as absolute paths, so the same files named relatively or absolutely give one fingerprint;
    `relative` gives the form runs saved before flame recorded absolute paths."""
    h = hashlib.sha256()
    units = []
    for u in spec.units:
        d = asdict(u)
        if not d["path"].startswith("hf:") and os.path.exists(d["path"]):
            d["path"] = os.path.relpath(d["path"]) if relative else os.path.abspath(d["path"])
        units.append(d)
    h.update(json.dumps(units).encode())
    h.update(json.dumps([os.path.getsize(p) if os.path.isfile(p) else -1 for p in paths]).encode())
    settings = (
        spec.tokenizer.fingerprint,
        spec.context_len,
        spec.window,
        spec.seed,
        spec.shuffle,
        spec.text_field,
    )
    h.update(json.dumps(settings).encode())
    return h.hexdigest()[:16]


__all__ = [
    "StreamingLoader",
    "check_resume_layout",
    "layout_problem",
    "StreamDataset",
    "StreamSpec",
    "TokenStream",
    "initial_state",
    "make_batch",
    "slot_unit",
    "streaming_units",
    "window_order",
]
