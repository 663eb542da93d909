"""A mixing buffer: consecutive tokens of one context are highly correlated, so training batches are drawn
from a buffer of many contexts, shuffled, and half of it emitted at a time (as SAELens does)."""

from __future__ import annotations

from typing import Iterator

import torch


class ShuffleBuffer:
    """Holds rows of several aligned tensors (one per hook point) and emits shuffled fixed-size batches."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return next(iter(self.rows.values())).shape[0] if self.rows else 0

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        if not self.rows:
            self.rows = {k: v.detach() for k, v in rows.items()}
        else:
            self.rows = {k: torch.cat([self.rows[k], rows[k].detach()]) for k in self.rows}

    def _shuffle(self) -> None:
        perm = torch.randperm(len(self), generator=self.generator)
        self.rows = {k: v[perm.to(v.device)] for k, v in self.rows.items()}

    def _emit(self, n_rows: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        emitted = {k: v[:n_rows] for k, v in self.rows.items()}
        self.rows = {k: v[n_rows:] for k, v in self.rows.items()}
        for start in range(0, n_rows, batch_size):
            yield {k: v[start : start + batch_size] for k, v in emitted.items()}

    def drain(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """While full, shuffle and emit half the buffer as whole batches."""
        while len(self) >= self.capacity:
            self._shuffle()
            n_out = max(batch_size, (len(self) // 2) // batch_size * batch_size)
            yield from self._emit(n_out, batch_size)

    def flush(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """At the end of the stream: shuffle what is left and emit its whole batches."""
        if len(self) >= batch_size:
            self._shuffle()
            yield from self._emit(len(self) // batch_size * batch_size, batch_size)
