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
from typing import Any, Iterable

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
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    device = sae.device
    f64 = torch.float64
    tokens = 0
    active_total = torch.zeros((), dtype=f64, device=device)
    squared_error = torch.zeros((), dtype=f64, device=device)
    squared_norm = torch.zeros((), dtype=f64, device=device)
    sum_x = torch.zeros(d_in, dtype=f64, device=device)
    cosine_total = torch.zeros((), dtype=f64, device=device)
    recon_norm = torch.zeros((), dtype=f64, device=device)
    x_dot_recon = torch.zeros((), dtype=f64, device=device)
    fire_counts = torch.zeros(d_sae, dtype=f64, device=device)
    for batch in batches:
        if batch.shape[-1] != d_in:
            raise MonoscopeError(f"activations have d={batch.shape[-1]} but the SAE expects d_in={d_in}")
        x = batch.reshape(-1, d_in).to(device=device, dtype=sae.dtype)
        if max_tokens is not None:
            x = x[: max(0, max_tokens - tokens)]
        if x.shape[0] == 0:
            break
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
        active = codes > 0
        active_total += active.sum()
        fire_counts += active.sum(0)
        x64, x_hat64 = x.to(f64), x_hat.to(f64)
        squared_error += (x64 - x_hat64).pow(2).sum()
        squared_norm += x64.pow(2).sum()
        sum_x += x64.sum(0)
        norms = x64.norm(dim=1) * x_hat64.norm(dim=1)
        cosine_total += ((x64 * x_hat64).sum(1) / norms.clamp_min(1e-12)).sum()
        recon_norm += x_hat64.pow(2).sum()
        x_dot_recon += (x64 * x_hat64).sum()
        tokens += x.shape[0]
        if max_tokens is not None and tokens >= max_tokens:
            break
    if tokens == 0:
        raise MonoscopeError("no activations to evaluate on: the held-out batches are empty")
    mean_x = sum_x / tokens
    total_variance = squared_norm / tokens - mean_x.pow(2).sum()
    mean_error = squared_error / tokens
    explained = 1.0 - float(mean_error / total_variance.clamp_min(1e-30))
    densities = fire_counts / tokens
    metrics = ReconstructionMetrics(
        tokens=tokens,
        l0=float(active_total / tokens),
        mse=float(squared_error / (tokens * d_in)),
        explained_variance=explained,
        fvu=1.0 - explained,
        cosine_similarity=float(cosine_total / tokens),
        shrinkage=float(recon_norm / x_dot_recon) if float(x_dot_recon) != 0 else float("nan"),
        frac_alive=float((fire_counts > 0).to(f64).mean()),
        frac_dense_1pct=float((densities > 0.01).to(f64).mean()),
        frac_dense_10pct=float((densities > 0.1).to(f64).mean()),
    )
    if return_densities:
        return metrics, densities.to(torch.float32)
    return metrics
