"""Reconstruction metrics of an SAE on held-out activations (the language-model-free part of SAEBench's core eval).

All quantities are accumulated over the whole set as sums (in float64), never as means of per-batch means:
- l0: mean number of active latents per token;
- mse: mean over tokens and dimensions of (x - x_hat)^2;
- explained_variance: 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2), fvu = 1 - explained_variance;
- cosine_similarity: mean over tokens of cos(x, x_hat);
- shrinkage: E||x_hat||^2 / E[x . x_hat] (SAEBench's relative reconstruction bias; 1 is unbiased, < 1
  means the SAE shrinks its reconstructions);
- frac_alive: latents that fired at least once; frac_dense_1pct / frac_dense_10pct: latents firing on
  more than 1% / 10% of tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ..errors import MonoscopeError
from .base import SAE


@dataclass
class ReconstructionMetrics:
    """Metrics over a held-out set; `to_dict()` is JSON-ready."""

    tokens: int
    l0: float
    mse: float
    explained_variance: float
    fvu: float
    cosine_similarity: float
    shrinkage: float
    frac_alive: float
    frac_dense_1pct: float
    frac_dense_10pct: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Per-group sums that every reconstruction metric is a function of (float64; fire_counts int64 [d_sae]).
SUM_KEYS = (
    "tokens",
    "active",
    "squared_error",
    "squared_norm",
    "sum_x",
    "cosine",
    "recon_norm",
    "x_dot_recon",
    "fire_counts",
)


@torch.no_grad()
def reconstruction_sums(sae: SAE, x: Tensor, groups: int = 1) -> dict[str, Tensor]:
    """The sums behind every metric for `x` [groups * n, d_in] (SAE units), per group of n consecutive rows.

    Each value has a leading [groups] dimension. Groups are what the bootstrap resamples (contexts in
    `lm_eval`); with groups=1 they are the sums of the whole set.
    """
    d_in = sae.cfg.d_in
    x = x.reshape(-1, d_in).to(device=sae.device, dtype=sae.dtype)
    if x.shape[0] % groups:
        raise ValueError(f"{x.shape[0]} rows do not split into {groups} equal groups")
    codes = sae.encode(x)
    x_hat = sae.decode(codes)
    f64 = torch.float64
    n = x.shape[0] // groups
    x64, x_hat64 = x.to(f64).view(groups, n, d_in), x_hat.to(f64).view(groups, n, d_in)
    active = (codes > 0).view(groups, n, -1)
    norms = x64.norm(dim=-1) * x_hat64.norm(dim=-1)
    return {
        "tokens": torch.full((groups,), float(n), dtype=f64, device=x.device),
        "active": active.sum((1, 2)).to(f64),
        "squared_error": (x64 - x_hat64).pow(2).sum((1, 2)),
        "squared_norm": x64.pow(2).sum((1, 2)),
        "sum_x": x64.sum(1),
        "cosine": ((x64 * x_hat64).sum(-1) / norms.clamp_min(1e-12)).sum(1),
        "recon_norm": x_hat64.pow(2).sum((1, 2)),
        "x_dot_recon": (x64 * x_hat64).sum((1, 2)),
        "fire_counts": active.sum(1).to(torch.int64),
    }


def reconstruction_from_sums(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Metrics from (summed or bootstrap-weighted) sums; any leading dimensions are kept."""
    tokens = sums["tokens"]
    mean_x = sums["sum_x"] / tokens.unsqueeze(-1)
    total_variance = sums["squared_norm"] / tokens - mean_x.pow(2).sum(-1)
    explained = 1.0 - (sums["squared_error"] / tokens) / total_variance.clamp_min(1e-30)
    fire = sums["fire_counts"].to(torch.float64)
    densities = fire / tokens.unsqueeze(-1)
    d_in = sums["sum_x"].shape[-1]
    return {
        "l0": sums["active"] / tokens,
        "mse": sums["squared_error"] / (tokens * d_in),
        "explained_variance": explained,
        "fvu": 1.0 - explained,
        "cosine_similarity": sums["cosine"] / tokens,
        "shrinkage": torch.where(sums["x_dot_recon"] != 0, sums["recon_norm"] / sums["x_dot_recon"], torch.nan),
        "frac_alive": (fire > 0).to(torch.float64).mean(-1),
        "frac_dense_1pct": (densities > 0.01).to(torch.float64).mean(-1),
        "frac_dense_10pct": (densities > 0.1).to(torch.float64).mean(-1),
    }


def bootstrap_intervals(
    per_group: dict[str, Tensor],
    metrics_of: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    *,
    samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    chunk: int = 50,
) -> dict[str, list[float]]:
    """Percentile bootstrap over groups: each replicate draws the groups with replacement (multinomial
    counts as weights on the per-group sums [G, ...]) and recomputes every metric; returns [low, high]."""
    n_groups = next(iter(per_group.values())).shape[0]
    if n_groups < 2 or samples < 1:
        return {}
    generator = torch.Generator().manual_seed(seed)
    replicates: dict[str, list[Tensor]] = {}
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        draws = torch.randint(n_groups, (size, n_groups), generator=generator)
        weights = torch.zeros(size, n_groups, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones(size, n_groups, dtype=torch.float64)
        )
        weighted = {}
        for key, value in per_group.items():
            flat = value.to(device="cpu", dtype=torch.float64).reshape(n_groups, -1)
            weighted[key] = (weights @ flat).reshape(size, *value.shape[1:])
        for key, value in metrics_of(weighted).items():
            replicates.setdefault(key, []).append(value.reshape(size))
    tail = (1 - level) / 2
    out = {}
    for key, values in replicates.items():
        stacked = torch.cat(values)
        stacked = stacked[torch.isfinite(stacked)]
        if stacked.numel():
            out[key] = [float(torch.quantile(stacked, tail)), float(torch.quantile(stacked, 1 - tail))]
    return out


@torch.no_grad()
def evaluate_reconstruction(
    sae: SAE,
    batches: Iterable[Tensor],
    max_tokens: int | None = None,
    return_densities: bool = False,
) -> ReconstructionMetrics | tuple[ReconstructionMetrics, Tensor]:
    """Metrics of `sae` over `batches` of activations [..., d_in] in the units the SAE takes.

    With `return_densities`, also returns each latent's firing frequency [d_sae].
    """
    d_in = sae.cfg.d_in
    tokens = 0
    total: dict[str, Tensor] | None = None
    for batch in batches:
        if batch.shape[-1] != d_in:
            raise MonoscopeError(f"activations have d={batch.shape[-1]} but the SAE expects d_in={d_in}")
        x = batch.reshape(-1, d_in)
        if max_tokens is not None:
            x = x[: max(0, max_tokens - tokens)]
        if x.shape[0] == 0:
            break
        sums = reconstruction_sums(sae, x)
        total = sums if total is None else {key: total[key] + sums[key] for key in SUM_KEYS}
        tokens += x.shape[0]
        if max_tokens is not None and tokens >= max_tokens:
            break
    if total is None:
        raise MonoscopeError("no activations to evaluate on: the held-out batches are empty")
    values = {key: float(value[0]) for key, value in reconstruction_from_sums(total).items()}
    metrics = ReconstructionMetrics(tokens=tokens, **values)
    if return_densities:
        return metrics, (total["fire_counts"][0].to(torch.float64) / tokens).to(torch.float32)
    return metrics
