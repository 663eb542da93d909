"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK sparse autoencoders").

Training keeps the k * batch largest ReLU pre-activations over the whole batch, so busy tokens can use
more latents than quiet ones while the mean stays k. Selecting over the batch makes a token's code depend
on its batch-mates, so inference uses a single threshold instead: a running average (EMA with weight
`threshold_ema`, started at the first step's value; see config.py) of the smallest activation the batch selection kept.
At inference a latent fires when its pre-activation exceeds that threshold, which is a JumpReLU SAE with
the same threshold for every latent: the form it is saved in (as SAELens does).

Losses as for TopK (FVU + AuxK on dead latents), unit-norm decoder, sparse forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import require
from .base import SAE, SAEConfig, inference_class
from .config import TrainConfig
from .registry import Architecture, register
from .sparse import SparsePattern
from .topk import TopKConfig, TopKSAE, centred_preacts, sparse_reconstruction_losses
from .training import StepContext, StepOutput, TrainingSAE, copy_weights


@dataclass
class BatchTopKConfig(TopKConfig):
    """TopK's settings plus the weight of each step's minimum selected activation in the inference threshold.

    threshold_ema: 0.01 per step as in SAELens, raised to 20 / steps (at most 0.1) for runs under 2000 steps:
    the threshold drifts down while training, and the average must follow its end.
    """

    threshold_ema: float | None = None

    def resolve(self, d_in: int, d_sae: int, total_steps: int) -> None:
        super().resolve(d_in, d_sae, total_steps)
        if self.threshold_ema is None:
            self.threshold_ema = max(0.01, min(0.1, 20 / total_steps))
        require(0 < self.threshold_ema <= 1, f"threshold_ema must be in (0, 1], got {self.threshold_ema}")

    def selected_per_token(self) -> int:
        return 4 * self.k


def batch_topk(pre: Tensor, k_total: int, per_row_cap: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k_total largest entries of `pre` [n, d] as (rows, cols, values) sorted by (row, col).

    A full top-k over n * d values is slow, so each row first keeps its `per_row_cap` largest entries and
    the batch selection runs on those. That is exact unless some row has more than `per_row_cap` entries
    in the batch's top k_total, which is checked; then the full selection runs.
    """
    n, d = pre.shape
    cap = min(per_row_cap, d)
    candidates, candidate_cols = pre.topk(cap, dim=-1, sorted=False)
    values, positions = candidates.reshape(-1).topk(k_total, sorted=False)
    kept_min = values.min()
    if cap < d and bool((candidates.min(dim=1).values > kept_min).any()):
        values, flat = pre.reshape(-1).topk(k_total, sorted=False)
        rows, cols = flat // d, flat % d
    else:
        rows = positions // cap
        cols = candidate_cols.reshape(-1)[positions]
    order = torch.argsort(rows * d + cols)
    return rows[order], cols[order], values[order]


class BatchTopKTrainingSAE(TrainingSAE, TopKSAE):
    """BatchTopK during training (k on average per token); `to_inference()` gives a JumpReLU SAE."""

    training_architecture = "batchtopk"

    def __init__(self, train_cfg: TrainConfig, device: str | torch.device = "cpu") -> None:
        super().__init__(train_cfg, device)
        assert isinstance(train_cfg.arch, BatchTopKConfig)
        self.arch_cfg = train_cfg.arch
        # Double precision: the EMA adds small increments over many steps.
        self.register_buffer("inference_threshold", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64, device=device))
        self.inference_threshold: Tensor
        self.threshold_updates: Tensor

    def training_forward(self, x: Tensor, ctx: StepContext) -> StepOutput:
        x_centered, pre = centred_preacts(self, x, self.use_bf16)
        n = x.shape[0]
        with torch.no_grad():
            rows, cols, selected = batch_topk(pre, self.k * n, per_row_cap=4 * self.k)
            pattern = SparsePattern.from_coo(rows, cols, n, self.cfg.d_sae)
            self._update_threshold(selected)
        loss, metrics, active = sparse_reconstruction_losses(
            self, self.arch_cfg, x, x_centered, pre, pattern, selected.float(), ctx
        )
        metrics["threshold"] = self.inference_threshold.detach().float()
        return StepOutput(loss=loss, metrics=metrics, fired=pattern.cols[active])

    @torch.no_grad()
    def _update_threshold(self, selected: Tensor) -> None:
        positive = selected[selected > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min().to(torch.float64)
        rate = self.arch_cfg.threshold_ema
        assert rate is not None  # resolved by TrainConfig
        first = self.threshold_updates == 0
        updated = torch.where(first, smallest, (1 - rate) * self.inference_threshold + rate * smallest)
        self.inference_threshold.copy_(updated)
        self.threshold_updates.add_(1)

    def to_inference(self) -> SAE:
        cfg = SAEConfig.from_dict({**self.cfg.to_dict(), "architecture": BATCHTOPK.saved_as, "k": None})
        sae = copy_weights(self, inference_class(BATCHTOPK.saved_as)(cfg))
        with torch.no_grad():  # one threshold for every latent
            sae.state_dict()["threshold"].fill_(float(self.inference_threshold))
        return sae


BATCHTOPK = register(
    Architecture(
        name="batchtopk",
        config_class=BatchTopKConfig,
        saved_as="jumprelu",
        training_class=BatchTopKTrainingSAE,
        description="BatchTopK (Bussmann et al. 2024): k latents per token on average; saved as jumprelu",
        k_meaning="on average for batchtopk",
    )
)
