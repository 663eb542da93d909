"""Synthetic activations with the structure SAEs look for, so training can be tested and timed without an LLM.

Each token is a sparse non-negative combination of random unit "true feature" directions (feature
frequencies follow a power law, like real latents; magnitudes are exponential), plus a shared offset and
isotropic noise, scaled so that E||x|| = sqrt(d_in) (monoscope's normalisation). Chunks are generated from
(seed, chunk index), so the stream is reproducible and supports `iter_from` for exact resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass
class SyntheticActivations:
    """An iterable of `n_chunks` chunks [chunk_size, d_in]; `iter_from(i)` restarts at chunk i."""

    d_in: int
    n_features: int
    active_per_token: int = 16
    chunk_size: int = 4096
    n_chunks: int = 100
    noise: float = 0.1  # noise norm relative to the signal's
    seed: int = 0

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        directions = torch.randn(self.n_features, self.d_in, generator=g)
        self.directions = directions / directions.norm(dim=1, keepdim=True)
        ranks = torch.arange(1, self.n_features + 1, dtype=torch.float64)
        self.frequencies = (ranks**-0.7 / (ranks**-0.7).sum()).to(torch.float32)
        self.offset = torch.randn(self.d_in, generator=g) * 0.5
        self.scale = 1.0
        sample = self.sample(-1, 4096)
        self.scale = math.sqrt(self.d_in) / float(sample.norm(dim=1).mean())

    def sample(self, index: int, rows: int) -> Tensor:
        """`rows` tokens drawn with random stream `index` (indices outside the chunks make held-out sets)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 17)
        m = self.active_per_token
        features = torch.multinomial(self.frequencies, rows * m, replacement=True, generator=g).view(rows, m)
        magnitudes = torch.empty(rows, m).exponential_(1.0, generator=g) + 0.5
        signal = F.embedding_bag(features, self.directions, per_sample_weights=magnitudes, mode="sum")
        signal_norm = float(signal.norm(dim=1).mean())
        noise = torch.randn(rows, self.d_in, generator=g) * (self.noise * signal_norm / math.sqrt(self.d_in))
        return (signal + self.offset * signal_norm / math.sqrt(self.d_in) + noise) * self.scale

    def chunk(self, index: int) -> Tensor:
        return self.sample(index, self.chunk_size)

    def iter_from(self, batch_index: int) -> Iterator[Tensor]:
        for index in range(batch_index, self.n_chunks):
            yield self.chunk(index)

    def __iter__(self) -> Iterator[Tensor]:
        return self.iter_from(0)

    def __len__(self) -> int:
        return self.n_chunks
