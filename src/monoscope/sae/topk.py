"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"); the default architecture.

z = ReLU(TopK(W_enc^T (x - b_dec) + b_enc)),  x_hat = W_dec^T z + b_dec.

Training loss (as in Gao et al. and sparsify, normalised by the batch's total variance so it reads as a
fraction of variance unexplained):
    FVU + aux_coefficient * AuxK  [+ multi_topk_coefficient * FVU with 4k latents]
AuxK: the top `aux_k` dead latents (no firing for `dead_tokens` tokens) reconstruct the main residual
x - x_hat, which gives dead latents a gradient; it is scaled by min(#dead / aux_k, 1) (sparsify) so a few
dead latents do not dominate. Decoder rows stay unit norm.

Speed: the encoder is one dense GEMM (bf16 on CUDA when enabled) followed by a row-wise top-k; everything
after that, forward and backward, goes through `sparse.py` and touches only the k selected latents.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import SAE, SAEConfig
from .config import TrainConfig
from .sparse import SparsePattern, gather_preacts, sparse_decode
from .training import StepContext, StepOutput, TrainingMixin, copy_weights, sae_config_for, total_variance_of


class TopKSAE(SAE):
    """TopK SAE at inference: exactly k latents per token (fewer if some top-k pre-activations are <= 0)."""

    architecture = "topk"

    @property
    def k(self) -> int:
        assert self.cfg.k is not None
        return self.cfg.k

    def activation(self, pre: Tensor) -> Tensor:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def encode_topk(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """(values, indices) [..., k] without building dense codes; values sorted in decreasing order."""
        flat, lead = self._flat_input(x)
        k = min(k or self.k, self.k)
        values, indices = self.pre_activations(flat).topk(k, dim=-1, sorted=True)
        return values.relu().reshape(*lead, k), indices.reshape(*lead, k)

    def forward(self, x: Tensor) -> Tensor:
        values, indices = self.encode_topk(x)
        return self.decode_topk(values, indices)


def centred_preacts(sae: SAE, x: Tensor, use_bf16: bool) -> tuple[Tensor, Tensor]:
    """(x - b_dec, pre-activations) without autograd; the GEMM in bf16 when asked (CUDA only).

    On CPU the [batch, d_sae] pre-activations are written into one buffer kept on the SAE from step to step
    (they live only within a step): a fresh one each step is a new large allocation, which glibc maps anew,
    and faulting its pages in cost ~10 % of a TopK step on the 2-core machine.
    """
    with torch.no_grad():
        x_centered = sae.centered_input(x)
        if x.device.type == "cpu" and not use_bf16:
            shape = (x_centered.shape[0], sae.W_enc.shape[1])
            buffer = getattr(sae, "_preact_buffer", None)  # a plain attribute: not in the state dict or checkpoints
            if buffer is None or buffer.shape != shape or buffer.dtype != x_centered.dtype:
                buffer = sae._preact_buffer = torch.empty(shape, dtype=x_centered.dtype)
            return x_centered, torch.addmm(sae.b_enc, x_centered, sae.W_enc, out=buffer)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pre = torch.addmm(sae.b_enc, x_centered, sae.W_enc)
    return x_centered, pre


def sparse_reconstruction_losses(
    sae: SAE,
    cfg: TrainConfig,
    x: Tensor,
    x_centered: Tensor,
    pre: Tensor,
    pattern: SparsePattern,
    selected: Tensor,
    ctx: StepContext,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Shared by TopK and BatchTopK: (loss, metrics, active-pair mask) for the latents chosen in `pattern`.

    `selected` holds the pre-activation values at the pattern (already computed, no grad).
    """
    b_dec = sae.b_dec if sae.cfg.apply_b_dec_to_input else None
    values = gather_preacts(selected, x, x_centered, sae.W_enc, sae.b_enc, b_dec, pattern).relu()
    x_hat = sparse_decode(values, sae.W_dec, pattern) + sae.b_dec
    residual = x - x_hat
    total_variance = total_variance_of(x)
    flat_residual = residual.reshape(-1)
    squared_error = torch.dot(flat_residual, flat_residual)
    fvu = squared_error / total_variance
    loss = fvu
    zero = x.new_zeros(())
    aux_loss = zero
    if ctx.dead_mask is not None and cfg.aux_coefficient > 0:
        dead = torch.nonzero(ctx.dead_mask).flatten()
        n_dead = dead.numel()
        if n_dead > 0:
            assert cfg.aux_k is not None
            k_aux = min(cfg.aux_k, n_dead)
            with torch.no_grad():
                aux_values, aux_positions = pre.index_select(1, dead).topk(k_aux, dim=-1, sorted=False)
                aux_pattern = SparsePattern.from_topk(dead[aux_positions], sae.cfg.d_sae)
            aux_codes = gather_preacts(
                aux_values.float().reshape(-1), x, x_centered, sae.W_enc, sae.b_enc, b_dec, aux_pattern
            ).relu()
            residual_hat = sparse_decode(aux_codes, sae.W_dec, aux_pattern)
            scale = min(n_dead / cfg.aux_k, 1.0)
            aux_loss = scale * (residual_hat - residual.detach()).pow(2).sum() / total_variance
            loss = loss + cfg.aux_coefficient * aux_loss
    metrics = {
        "fvu": fvu.detach(),
        "mse": squared_error.detach() / x.numel(),
        "aux_loss": aux_loss.detach(),
    }
    if cfg.multi_topk and cfg.multi_topk_coefficient > 0:
        k4 = min(4 * cfg.k, sae.cfg.d_sae)
        with torch.no_grad():
            wide_values, wide_indices = pre.topk(k4, dim=-1, sorted=False)
            wide_pattern = SparsePattern.from_topk(wide_indices, sae.cfg.d_sae)
        wide_codes = gather_preacts(
            wide_values.float().reshape(-1), x, x_centered, sae.W_enc, sae.b_enc, b_dec, wide_pattern
        ).relu()
        wide_fvu = (x - sparse_decode(wide_codes, sae.W_dec, wide_pattern) - sae.b_dec).pow(2).sum() / total_variance
        loss = loss + cfg.multi_topk_coefficient * wide_fvu
        metrics["multi_topk_fvu"] = wide_fvu.detach()
    active = values.detach() > 0
    metrics["l0"] = active.sum() / x.shape[0]
    metrics["loss"] = loss.detach()
    return loss, metrics, active


class TopKTrainingSAE(TrainingMixin, TopKSAE):
    """TopK SAE with its training losses; saved as `TopKSAE`."""

    training_architecture = "topk"

    def __init__(self, train_cfg: TrainConfig, device: str | torch.device = "cpu", **_: Any) -> None:
        self.train_cfg = train_cfg
        super().__init__(sae_config_for(train_cfg, "topk", device))
        self.use_bf16 = bool(train_cfg.bf16_autocast and torch.device(device).type == "cuda")

    def training_forward(self, x: Tensor, ctx: StepContext) -> StepOutput:
        x_centered, pre = centred_preacts(self, x, self.use_bf16)
        with torch.no_grad():
            selected, indices = pre.topk(self.k, dim=-1, sorted=False)
            pattern = SparsePattern.from_topk(indices, self.cfg.d_sae)
        loss, metrics, active = sparse_reconstruction_losses(
            self, self.train_cfg, x, x_centered, pre, pattern, selected.float().reshape(-1), ctx
        )
        return StepOutput(loss=loss, metrics=metrics, fired=pattern.cols[active])

    def to_inference(self) -> TopKSAE:
        cfg = SAEConfig.from_dict(self.cfg.to_dict())
        return copy_weights(self, TopKSAE(cfg))  # type: ignore[return-value]
