"""ReLU SAE with an L1 penalty, following Anthropic's April 2024 update ("Circuits Updates - April 2024").

z = ReLU(W_enc^T x + b_enc) (the input is not centred by b_dec), x_hat = W_dec^T z + b_dec.

Training loss: sum_d (x - x_hat)^2 averaged over tokens + lambda * sum_i z_i ||W_dec,i||, i.e. the L1
penalty is weighted by each latent's decoder norm, so there is no unit-norm constraint on the decoder
(shrinking a row cannot buy a smaller penalty). lambda (`l1_coefficient`, 5 for activations normalised
to E||x|| = sqrt(d_in)) warms up linearly from 0 over the first 5% of steps; the decoder starts with rows
of norm 0.1 and the encoder as its transpose; gradients are clipped to norm 1. Saved as SAELens's
"standard" architecture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import SAE, SAEConfig
from .config import TrainConfig
from .training import StepContext, StepOutput, TrainingMixin, total_variance_of, copy_weights, sae_config_for


class ReLUSAE(SAE):
    """ReLU SAE at inference (SAELens "standard")."""

    architecture = "standard"

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()


class ReLUTrainingSAE(TrainingMixin, ReLUSAE):
    """ReLU SAE with the decoder-norm-weighted L1 penalty; saved as `ReLUSAE`."""

    training_architecture = "relu"
    unit_norm_decoder = False

    def __init__(self, train_cfg: TrainConfig, device: str | torch.device = "cpu", **_: Any) -> None:
        self.train_cfg = train_cfg
        super().__init__(sae_config_for(train_cfg, "standard", device))

    def l1_coefficient_at(self, step: int, total_steps: int) -> float:
        warmup = int(total_steps * self.train_cfg.l1_warmup_fraction)
        scale = 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)
        return self.train_cfg.l1_coefficient * scale

    def training_forward(self, x: Tensor, ctx: StepContext) -> StepOutput:
        codes = self.pre_activations(x).relu()
        x_hat = codes @ self.W_dec + self.b_dec
        squared_error = (x - x_hat).pow(2).sum()
        reconstruction = squared_error / x.shape[0]
        sparsity = (codes * self.W_dec.norm(dim=1)).sum(-1).mean()
        coefficient = self.l1_coefficient_at(ctx.step, ctx.total_steps)
        loss = reconstruction + coefficient * sparsity
        total_variance = total_variance_of(x)
        active = codes.detach() > 0
        metrics = {
            "loss": loss.detach(),
            "fvu": squared_error.detach() / total_variance,
            "mse": squared_error.detach() / x.numel(),
            "l0": active.sum() / x.shape[0],
            "l1_loss": sparsity.detach(),
            "l1_coefficient": torch.tensor(coefficient),
        }
        return StepOutput(loss=loss, metrics=metrics, fired=active.any(0))

    def to_inference(self) -> ReLUSAE:
        return copy_weights(self, ReLUSAE(SAEConfig.from_dict(self.cfg.to_dict())))  # type: ignore[return-value]
