"""Cutting an activation stream into fixed-size training batches, and knowing where in it we are.

The source yields chunks: tensors [n, d] (or [..., d], flattened), or dicts {hook name: tensor} whose
tensors all have the same number of rows. Chunks may have any size; the trainer needs batches of exactly
`batch_size` rows, so chunks are concatenated and split. The position after each batch is
(index of the chunk holding the next unused row, rows of it already used), which is what a checkpoint
records and what resuming restarts from:
- a source with a method `iter_from(batch_index)` is asked to restart at that chunk (cheap for files);
- any other iterable is iterated from the start again and the consumed chunks are read and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor

from ..errors import MonoscopeError

Chunk = Mapping[str, Tensor]


@dataclass(frozen=True)
class DataPosition:
    """The first unused row of the stream: chunk `batch_index`, after its first `row_offset` rows."""

    batch_index: int = 0
    row_offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"batch_index": self.batch_index, "row_offset": self.row_offset}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DataPosition":
        return cls(int(data["batch_index"]), int(data["row_offset"]))


def open_stream(source: Any, start: DataPosition) -> Iterator[Any]:
    """An iterator over the source's chunks from chunk `start.batch_index` on."""
    iter_from: Callable[[int], Iterable[Any]] | None = getattr(source, "iter_from", None)
    if callable(iter_from):
        return iter(iter_from(start.batch_index))
    iterator = iter(source)
    for skipped in range(start.batch_index):
        try:
            next(iterator)
        except StopIteration:
            raise MonoscopeError(
                f"the activation stream ended after {skipped} batches while skipping to batch {start.batch_index} "
                "to resume; resume needs the same data as the interrupted run"
            ) from None
    return iterator


def _as_chunk(item: Any, keys: tuple[str, ...], single_key: str | None) -> dict[str, Tensor]:
    if isinstance(item, Tensor):
        if single_key is None:
            raise MonoscopeError(
                "the activation stream yields plain tensors but several SAEs are being trained; "
                "yield dicts {hook name: tensor} instead"
            )
        tensors = {single_key: item}
    elif isinstance(item, Mapping) and single_key is not None and single_key not in item and len(item) == 1:
        tensors = {single_key: next(iter(item.values()))}
    elif isinstance(item, Mapping):
        absent = [key for key in keys if key not in item]
        if absent:
            have = ", ".join(map(str, item.keys())) or "nothing"
            raise MonoscopeError(
                f"the activation stream has no {', '.join(map(repr, absent))}; its batches hold: {have}"
            )
        tensors = {key: item[key] for key in keys}
    else:
        raise MonoscopeError(f"activation batches must be tensors or dicts of tensors, got {type(item).__name__}")
    rows = None
    for key, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise MonoscopeError(f"activations for {key!r} must be a tensor, got {type(tensor).__name__}")
        if tensor.ndim < 2:
            raise MonoscopeError(f"activations for {key!r} must have shape [tokens, d], got {list(tensor.shape)}")
        tensor = tensor.reshape(-1, tensor.shape[-1])
        tensors[key] = tensor
        if rows is not None and tensor.shape[0] != rows:
            raise MonoscopeError(
                f"the tensors of one batch have different numbers of tokens ({rows} and {tensor.shape[0]})"
            )
        rows = tensor.shape[0]
    return tensors


class BatchStream:
    """Yields {key: [batch_size, d] tensor} batches from a chunk stream and tracks the `DataPosition`."""

    def __init__(
        self, source: Any, batch_size: int, keys: tuple[str, ...], single_key: str | None, start: DataPosition
    ) -> None:
        self.batch_size = batch_size
        self.keys = keys
        self.single_key = single_key
        self._iterator = open_stream(source, start)
        self._pending: list[tuple[dict[str, Tensor], int, int]] = []  # (chunk, chunk index, first unused row)
        self._next_index = start.batch_index
        self._skip_rows = start.row_offset
        self.position = start

    def _fetch(self) -> bool:
        try:
            item = next(self._iterator)
        except StopIteration:
            return False
        chunk = _as_chunk(item, self.keys, self.single_key)
        index = self._next_index
        self._next_index += 1
        start = 0
        if self._skip_rows:
            start = self._skip_rows
            self._skip_rows = 0
        rows = next(iter(chunk.values())).shape[0]
        if start < rows:
            self._pending.append((chunk, index, start))
        return True

    def _available(self) -> int:
        return sum(next(iter(chunk.values())).shape[0] - start for chunk, _, start in self._pending)

    def next_batch(self) -> dict[str, Tensor] | None:
        """The next full batch, or None when the stream ends (a final partial batch is not used)."""
        while self._available() < self.batch_size:
            if not self._fetch():
                return None
        pieces: dict[str, list[Tensor]] = {key: [] for key in self.keys}
        needed = self.batch_size
        while needed:
            chunk, index, start = self._pending[0]
            rows = next(iter(chunk.values())).shape[0]
            take = min(needed, rows - start)
            for key in self.keys:
                pieces[key].append(chunk[key][start : start + take])
            needed -= take
            if start + take == rows:
                self._pending.pop(0)
            else:
                self._pending[0] = (chunk, index, start + take)
        if self._pending:
            _, index, start = self._pending[0]
            self.position = DataPosition(index, start)
        else:
            self.position = DataPosition(self._next_index, 0)
        return {key: parts[0] if len(parts) == 1 else torch.cat(parts) for key, parts in pieces.items()}


def peek_width(source: Any, key: str | None = None) -> tuple[int, Any]:
    """The activation width d of the source's first chunk, and a source to use in its place.

    A one-shot iterator loses the chunk it is peeked at, so it is handed back with that chunk put first.
    """
    import itertools

    iter_from: Callable[[int], Iterable[Any]] | None = getattr(source, "iter_from", None)
    if callable(iter_from):
        first = next(iter(iter_from(0)), None)
        replacement = source
    else:
        iterator = iter(source)
        first = next(iterator, None)
        replacement = source if iterator is not source else itertools.chain([first], iterator)
    if first is None:
        raise MonoscopeError("the activation stream is empty")
    if isinstance(first, Tensor):
        return int(first.shape[-1]), replacement
    if isinstance(first, Mapping):
        if key is None and len(first) == 1:
            key = next(iter(first))
        if key not in first:
            raise MonoscopeError(
                f"the activation stream has no {key!r}; its batches hold: {', '.join(map(str, first))}"
            )
        return int(first[key].shape[-1]), replacement
    raise MonoscopeError(f"activation batches must be tensors or dicts of tensors, got {type(first).__name__}")
