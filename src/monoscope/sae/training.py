"""What every training-form SAE shares: initialisation, the decoder unit-norm constraint, step I/O types.

A training class subclasses `TrainingSAE` and its inference class (so `encode`/`decode` work mid-training),
and adds `training_forward` (losses and metrics for one batch), optional auxiliary state (buffers, saved in
checkpoints) and `to_inference()`, the form that is saved. Its file registers it (registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

from .base import SAE, SAEConfig
from .config import TrainConfig
from .registry import get as get_architecture


@dataclass
class StepContext:
    """What a training forward pass may need besides the batch."""

    step: int
    total_steps: int
    dead_mask: Tensor | None = None  # [d_sae] bool, latents that have not fired for `dead_tokens` tokens


@dataclass
class StepOutput:
    """Loss to minimise, scalar metrics to log (detached tensors), and which latents fired in the batch."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    fired: Tensor | None = None  # latent indices or a [d_sae] bool mask


def total_variance_of(x: Tensor) -> Tensor:
    """Sum over tokens and dimensions of (x - mean over tokens)^2: the batch's FVU denominator.

    As sum(x^2) - n ||mean||^2: two dot products and a mean instead of several passes over the batch.
    """
    flat = x.reshape(-1)
    mean = x.mean(0)
    return (torch.dot(flat, flat) - x.shape[0] * torch.dot(mean, mean)).clamp_min(1e-12)


def geometric_median(points: Tensor, iters: int = 10, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to `points` [n, d].

    Used for b_dec's initial value (Gao et al. 2024): robust to the few very large activations that pull
    the mean away from where most tokens are.
    """
    points = points.to(torch.float64)
    median = points.mean(0)
    for _ in range(iters):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(eps)
        median = (weights[:, None] * points).sum(0) / weights.sum()
    return median


def sae_config_for(cfg: TrainConfig, architecture: str, device: str | torch.device) -> SAEConfig:
    """The inference config of the SAE that `cfg` trains, with `architecture` the inference form."""
    return SAEConfig(
        d_in=cfg.d_in,
        d_sae=cfg.width,
        architecture=architecture,
        k=cfg.arch.active_latents(),
        device=str(device),
        apply_b_dec_to_input=cfg.arch.apply_b_dec_to_input,
        metadata={"hook_name": cfg.hook_name or None},
    )


class TrainingSAE(SAE):
    """The training form of an SAE; subclasses also subclass their inference class: `(TrainingSAE, TopKSAE)`."""

    #: The name this class trains under (--arch); its inference class's `architecture` is the saved form.
    training_architecture: ClassVar[str] = ""
    #: Keep decoder rows at unit norm (project the gradient, renormalise after each step).
    unit_norm_decoder: ClassVar[bool] = True

    def __init__(self, train_cfg: TrainConfig, device: str | torch.device = "cpu") -> None:
        self.train_cfg = train_cfg  # before the inference class's __init__, which may read it (_init_threshold)
        super().__init__(sae_config_for(train_cfg, self.architecture, device))
        self.use_bf16 = bool(train_cfg.bf16_autocast and torch.device(device).type == "cuda")

    @torch.no_grad()
    def initialize(self, sample: Tensor, generator: torch.Generator) -> None:
        """Random decoder directions, encoder = decoder transpose, b_dec = geometric median of `sample`."""
        d_sae, d_in = self.W_dec.shape
        directions = torch.randn(d_sae, d_in, generator=generator, dtype=torch.float32)
        directions /= directions.norm(dim=1, keepdim=True)
        assert self.train_cfg.decoder_init_norm is not None
        self.W_dec.copy_(directions * self.train_cfg.decoder_init_norm)
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        sample = sample.to(torch.float32)
        if self.train_cfg.geometric_median_iters > 0:
            median = geometric_median(sample, self.train_cfg.geometric_median_iters)
        else:
            median = sample.mean(0)
        self.b_dec.copy_(median)

    def training_forward(self, x: Tensor, ctx: StepContext) -> StepOutput:
        raise NotImplementedError

    def to_inference(self) -> SAE:
        raise NotImplementedError

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove each decoder row's gradient component along the row, so the step keeps its norm to first order."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            grad = self.W_dec.grad
            parallel = torch.linalg.vecdot(grad, self.W_dec).unsqueeze(1)
            grad.addcmul_(parallel, self.W_dec, value=-1.0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Put decoder rows back at unit norm (the optimiser's step is not exactly tangent)."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


def training_class(architecture: str) -> type[TrainingSAE]:
    """The class that trains `architecture` (a training name: --arch)."""
    found = get_architecture(architecture).training_class
    assert issubclass(found, TrainingSAE)
    return found


S = TypeVar("S", bound=SAE)


def copy_weights(source: SAE, target: S) -> S:
    """Copy the four shared parameters from `source` into `target` (same shapes) and return `target`."""
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(target, name).copy_(getattr(source, name))
    return target
