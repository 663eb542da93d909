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

from dataclasses import dataclass

import torch
from torch import Tensor

from ..argtypes import non_negative_float
from ..config import require
from .base import SAE, SAEConfig
from .optim import GAO_LR_AT_16K
from .registry import ArchConfig, Architecture, CliFlag, register
from .training import StepContext, StepOutput, TrainingSAE, copy_weights, total_variance_of


@dataclass
class ReLUConfig(ArchConfig):
    """ReLU + L1's training settings (Anthropic April 2024): the L1 weight and its warm-up."""

    l1_coefficient: float = 5.0
    l1_warmup_fraction: float = 0.05

    default_max_grad_norm = 1.0  # Anthropic's recipe clips gradients
    default_decoder_init_norm = 0.1
    adam_lr_at_16k = GAO_LR_AT_16K
    apply_b_dec_to_input = False

    def __post_init__(self) -> None:
        require(self.l1_coefficient >= 0, "l1_coefficient must be >= 0")
        require(0 <= self.l1_warmup_fraction <= 1, "l1_warmup_fraction must be in [0, 1]")

    def step_memory(self, batch_size: int, d_in: int, d_sae: int, bf16_preacts: bool) -> dict[str, int]:
        # Dense [batch, d_sae] fp32 tensors alive at the peak of a step (measured with bench_memory.py).
        return {"dense_step": int(3.0 * batch_size * d_sae * 4)}


class ReLUSAE(SAE):
    """ReLU SAE at inference (SAELens "standard")."""

    architecture = "standard"

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()


class ReLUTrainingSAE(TrainingSAE, ReLUSAE):
    """ReLU SAE with the decoder-norm-weighted L1 penalty; saved as `ReLUSAE`."""

    training_architecture = "relu"
    unit_norm_decoder = False

    @property
    def arch_cfg(self) -> ReLUConfig:
        assert isinstance(self.train_cfg.arch, ReLUConfig)
        return self.train_cfg.arch

    def l1_coefficient_at(self, step: int, total_steps: int) -> float:
        warmup = int(total_steps * self.arch_cfg.l1_warmup_fraction)
        scale = 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)
        return self.arch_cfg.l1_coefficient * scale

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

    def to_inference(self) -> SAE:
        return copy_weights(self, ReLUSAE(SAEConfig.from_dict(self.cfg.to_dict())))


RELU = register(
    Architecture(
        name="relu",
        saved_as=ReLUSAE.architecture,
        config_class=ReLUConfig,
        training_class=ReLUTrainingSAE,
        inference_class=ReLUSAE,
        description="ReLU + L1 (Anthropic, April 2024): the L1 weight sets L0; saved as SAELens's standard",
        k_meaning="unused by relu",
        cli_flags=(
            CliFlag(
                "--l1-coefficient",
                "l1_coefficient",
                non_negative_float,
                "relu: weight of the L1 penalty, which sets L0 (default: 5)",
            ),
        ),
    )
)
