"""Held-out data for evaluation: which windows of a held-out store an evaluation reads, and how a
rank's batches of them look.

Window i of a held-out store is tokens [i*L, (i+1)*L), i in [0, N), N = tokens // L (as in
training, nothing padded, the last partial window dropped). An evaluation reads either every
window once (`count = 0`) or `count` windows spread over the whole store: the store is cut into
`count` equal strata and one window is picked in each at a keyed offset. The key is fixed, so
every evaluation (and every run on the same store with the same context length) reads the same
windows, whatever the seed or the number of ranks.

The selected windows are dealt to ranks in passes: pass p of rank r holds selected windows
[(p*W + r)*B, ... + B). Every rank runs the same number of passes (so the collectives inside a
sharded model never wait for a rank that has run out); rows past the end are filler windows
whose labels are all -100, so they count nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from flame.data.order import mix64
from flame.data.packed import varlen_fields
from flame.data.store import TokenStore
from flame.errors import DataError

IGNORE = -100
_KEY = 0x6576616C5F776E64  # "eval_wnd": the fixed key of the spread selection


class HeldOut:
    """One held-out store, the windows an evaluation reads from it, and their batches."""

    def __init__(self, store: TokenStore, name: str, context_len: int, count: int = 0):
        self.store = store
        self.name = name
        self.L = context_len
        self.num_windows = store.num_tokens // context_len
        if self.num_windows == 0:
            raise DataError(
                f"held-out store {store.path} holds {store.num_tokens} tokens, fewer than one window of "
                f"{context_len}",
                hint="use more held-out data (e.g. a larger `flame prepare --val-fraction`) or a smaller "
                "--data.context_len",
            )
        # count 0, or at least the whole store: every window once
        self.count = self.num_windows if count <= 0 or count >= self.num_windows else int(count)

    @property
    def whole(self) -> bool:
        return self.count == self.num_windows

    def windows(self, lo: int, hi: int) -> np.ndarray:
        """Window indices of selected positions [lo, hi) (int64, increasing in the position)."""
        j = np.arange(lo, hi, dtype=np.int64)
        if self.whole:
            return j
        n, c = self.num_windows, self.count
        if n * c < 1 << 62:  # stratum j is windows [j*n//c, (j+1)*n//c): at least one of them
            first = j * n // c
            size = (j + 1) * n // c - first
        else:  # products past int64: exact in Python integers
            first = np.array([i * n // c for i in range(lo, hi)], np.int64)
            size = np.array([(i + 1) * n // c for i in range(lo, hi)], np.int64) - first
        offset = (mix64(j.view(np.uint64) ^ np.uint64(_KEY)) % size.astype(np.uint64)).astype(np.int64)
        return first + offset

    def passes(self, batch_size: int, world: int) -> int:
        """Forward passes every rank runs to cover the selection."""
        return -(-self.count // (batch_size * world))

    def batch(self, p: int, rank: int, world: int, batch_size: int, varlen: bool) -> dict:
        """Pass p of a rank: input_ids and labels (plus varlen fields), host tensors, and `real`, the
        number of rows that are selected windows (the rest are filler with labels -100)."""
        lo = min((p * world + rank) * batch_size, self.count)
        hi = min(lo + batch_size, self.count)
        idx = self.windows(lo, hi)
        real = len(idx)
        if real < batch_size:  # filler: window 0 again, counted nowhere
            idx = np.concatenate([idx, np.zeros(batch_size - real, np.int64)])
        starts = idx * self.L
        out = np.empty((batch_size, self.L), dtype=np.int64)
        self.store.read_windows(starts, out)
        if not varlen:
            labels = out.copy()
            labels[real:] = IGNORE
            return {"input_ids": torch.from_numpy(out), "labels": torch.from_numpy(labels), "real": real}
        cu, pos, longest = varlen_fields([self.store], np.zeros(batch_size, np.int64), starts, self.L)
        flat = out.reshape(1, -1)
        labels = flat.copy()
        labels[0, cu[1:-1]] = IGNORE  # no prediction across a boundary, as in training
        labels[0, real * self.L :] = IGNORE
        return {
            "input_ids": torch.from_numpy(flat),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos).view(1, -1),
            "cu_seqlens": torch.from_numpy(cu),
            "max_seqlen": longest,
            "real": real,
        }
