"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping ahead: improving reconstruction fidelity with JumpReLU SAEs").

z_i = pre_i * H(pre_i - theta_i), pre = W_enc^T (x - b_dec) + b_enc, one learned threshold per latent.

Training loss: sum_d (x - x_hat)^2 averaged over tokens + l0_coefficient * L0, with L0 = sum_i H(pre_i - theta_i).
The step function has no useful gradient, so the threshold gets a straight-through estimate with a
rectangle kernel K(u) = 1[|u| < 1/2] of width `jumprelu_bandwidth` (eps):
    d z_i / d theta_i  ~  -(theta_i / eps) K((pre_i - theta_i) / eps)
    d H_i / d theta_i  ~  -(1 / eps)       K((pre_i - theta_i) / eps)
(the pre-activation itself gets the exact gradient H for z and none through H). The threshold is trained
as log(theta), which keeps it positive. Decoder rows are kept at unit norm.

With `target_l0` set (JumpReLUConfig), L0 is chosen like TopK's k instead of through a coefficient: the thresholds
start at the quantile of the initial pre-activations that fires `target_l0` latents per token, the L0 penalty
is dropped, and after each step all log-thresholds shift together by 0.1 * log(batch L0 / target) (an
integral controller, as BatchTopK estimates its threshold). Each threshold still learns its own offset from
the reconstruction loss through the straight-through estimator. Why: with Adam a threshold moves ~lr per
step whatever the coefficient, so on runs of thousands of steps the penalty barely sets L0.

Defaults are for activations normalised to E||x|| = sqrt(d_in) (monoscope's normalisation): there
pre-activations are O(1), hence an initial threshold of 0.5; the bandwidth (0.05) and L0 coefficient (1.0)
are SAELens's defaults for the same normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import require
from .base import SAE, SAEConfig
from .config import TrainConfig
from .optim import GAO_LR_AT_16K
from .registry import ArchConfig, Architecture, register
from .training import StepContext, StepOutput, TrainingSAE, copy_weights, total_variance_of


@dataclass
class JumpReLUConfig(ArchConfig):
    """JumpReLU's training settings (Rajamanoharan et al. 2024; defaults as SAELens's, see the module docstring)."""

    l0_coefficient: float = 1.0
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.5
    # With a target L0, the L0 penalty is replaced by a controller that holds L0 at it (see the module docstring).
    target_l0: float | None = None

    adam_lr_at_16k = GAO_LR_AT_16K
    k_field = "target_l0"

    def __post_init__(self) -> None:
        require(self.l0_coefficient >= 0, "l0_coefficient must be >= 0")
        require(self.jumprelu_bandwidth > 0, "jumprelu_bandwidth must be positive")
        require(self.jumprelu_init_threshold > 0, "jumprelu_init_threshold must be positive")
        if self.target_l0 is not None:  # `monoscope train --k` gives a whole number
            self.target_l0 = float(self.target_l0)

    def resolve(self, d_in: int, d_sae: int, total_steps: int) -> None:
        if self.target_l0 is not None:
            require(0 < self.target_l0 < d_sae, f"target_l0 must be in (0, d_sae={d_sae}), got {self.target_l0}")

    def step_memory(self, batch_size: int, d_in: int, d_sae: int, bf16_preacts: bool) -> dict[str, int]:
        # Dense [batch, d_sae] fp32 tensors alive at the peak of a step: the forward saves pre-activations and
        # codes; the backward adds their gradients and the pseudo-gradient's temporaries (bench_memory.py).
        return {"dense_step": int(4.75 * batch_size * d_sae * 4)}


class JumpReLUSAE(SAE):
    """JumpReLU SAE at inference: a latent fires when its pre-activation exceeds its threshold."""

    architecture = "jumprelu"

    @classmethod
    def adapt_saved_tensors(cls, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        if "threshold" not in tensors and "log_threshold" in tensors:  # a training form's parameter
            tensors = {**tensors}
            tensors["threshold"] = tensors.pop("log_threshold").exp()
        return tensors

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self._init_threshold()

    def _init_threshold(self) -> None:
        self.threshold = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu() * (pre > self.threshold)


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_threshold = (-(threshold / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = (-(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0)
        return None, grad_threshold, None


TARGET_L0_GAIN = 0.1  # log-threshold shift per unit of log(L0 / target), per step


class JumpReLUTrainingSAE(TrainingSAE, JumpReLUSAE):
    """JumpReLU with a log-threshold parameter and the STE losses; saved as `JumpReLUSAE`."""

    training_architecture = "jumprelu"

    def __init__(self, train_cfg: TrainConfig, device: str | torch.device = "cpu") -> None:
        super().__init__(train_cfg, device)
        if self.arch_cfg.target_l0 is not None:
            # The controller's input, a buffer so that data-parallel ranks average it like BatchTopK's threshold
            # and take the same step; not saved (it is recomputed every step). NaN: no step measured yet.
            unmeasured = torch.full((), math.nan, dtype=torch.float32, device=device)
            self.register_buffer("batch_l0", unmeasured, persistent=False)
        self.batch_l0: Tensor

    @property
    def arch_cfg(self) -> JumpReLUConfig:
        assert isinstance(self.train_cfg.arch, JumpReLUConfig)
        return self.train_cfg.arch

    def _init_threshold(self) -> None:
        # Trained through its logarithm, which keeps it positive; `threshold` is derived from it.
        initial = math.log(self.arch_cfg.jumprelu_init_threshold)
        self.log_threshold = nn.Parameter(torch.full((self.cfg.d_sae,), initial, dtype=self.dtype, device=self.device))

    @property
    def threshold(self) -> Tensor:  # type: ignore[override]
        return self.log_threshold.exp()

    @torch.no_grad()
    def initialize(self, sample: Tensor, generator: torch.Generator) -> None:
        super().initialize(sample, generator)
        target = self.arch_cfg.target_l0
        if target is not None:  # one threshold for all latents, at which the initial SAE fires `target` per token
            pre = self.pre_activations(sample.to(device=self.W_enc.device, dtype=self.dtype)).flatten().float()
            keep = max(1, min(pre.numel(), round(target / self.cfg.d_sae * pre.numel())))
            threshold = float(pre.topk(keep).values[-1].clamp_min(1e-3))
            self.log_threshold.fill_(math.log(threshold))

    def training_forward(self, x: Tensor, ctx: StepContext) -> StepOutput:
        cfg = self.arch_cfg
        pre = self.pre_activations(x)
        threshold = self.log_threshold.exp()
        codes = _JumpReLU.apply(pre, threshold, cfg.jumprelu_bandwidth)
        x_hat = codes @ self.W_dec + self.b_dec
        squared_error = (x - x_hat).pow(2).sum()
        reconstruction = squared_error / x.shape[0]
        l0 = _Step.apply(pre, threshold, cfg.jumprelu_bandwidth).sum(-1).mean()
        if cfg.target_l0 is None:
            loss = reconstruction + cfg.l0_coefficient * l0
        else:  # L0 is held by the controller in after_optimizer_step, not by a penalty
            loss = reconstruction
            self.batch_l0.copy_(l0.detach())
        total_variance = total_variance_of(x)
        active = codes.detach() > 0
        metrics = {
            "loss": loss.detach(),
            "fvu": squared_error.detach() / total_variance,
            "mse": squared_error.detach() / x.numel(),
            "l0": active.sum() / x.shape[0],
            "l0_loss": l0.detach(),
            "mean_threshold": threshold.detach().mean(),
        }
        return StepOutput(loss=loss, metrics=metrics, fired=active.any(0))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        target = self.arch_cfg.target_l0
        if target is not None and not bool(self.batch_l0.isnan()):
            # Shift every threshold together, by a fraction of the log-ratio of this batch's L0 to the target.
            self.log_threshold.add_(TARGET_L0_GAIN * torch.log(self.batch_l0.clamp_min(0.5) / target))
            self.batch_l0.fill_(math.nan)

    def to_inference(self) -> SAE:
        sae = copy_weights(self, JumpReLUSAE(SAEConfig.from_dict(self.cfg.to_dict())))
        with torch.no_grad():
            sae.threshold.copy_(self.threshold)
        return sae


JUMPRELU = register(
    Architecture(
        name="jumprelu",
        saved_as=JumpReLUSAE.architecture,
        config_class=JumpReLUConfig,
        training_class=JumpReLUTrainingSAE,
        inference_class=JumpReLUSAE,
        description="JumpReLU (Rajamanoharan et al. 2024): a learned threshold per latent; --k sets the target L0",
        k_meaning="the target L0 for jumprelu",
    )
)
