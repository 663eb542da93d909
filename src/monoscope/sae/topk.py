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

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import require
from .base import SAE, SAEConfig
from .registry import ArchConfig, Architecture, register
from .sparse import SparsePattern, gather_preacts, sparse_decode
from .training import StepContext, StepOutput, TrainingSAE, copy_weights, total_variance_of


@dataclass
class TopKConfig(ArchConfig):
    """TopK's training settings (also BatchTopK's, which adds its threshold's EMA)."""

    k: int = 32  # active latents per token (batchtopk: on average over the batch)
    aux_k: int | None = None  # dead latents in the AuxK term: d_in / 2 (Gao et al., appendix B.1), at most d_sae - k
    aux_coefficient: float = 1 / 32
    multi_topk: bool = False  # add the Multi-TopK term: FVU with 4k latents, weighted 1/8
    multi_topk_coefficient: float = 1 / 8

    k_field = "k"

    def __post_init__(self) -> None:
        require(isinstance(self.k, int) and self.k >= 1, f"k must be at least 1, got {self.k!r}")
        require(self.aux_k is None or self.aux_k >= 1, f"aux_k must be at least 1, got {self.aux_k}")
        require(self.aux_coefficient >= 0, "aux_coefficient must be >= 0")
        require(self.multi_topk_coefficient >= 0, "multi_topk_coefficient must be >= 0")

    def resolve(self, d_in: int, d_sae: int, total_steps: int) -> None:
        require(self.k < d_sae, f"k={self.k} must be smaller than d_sae={d_sae} (k latents are kept out of d_sae)")
        if self.aux_k is None:
            self.aux_k = max(1, min(d_in // 2, d_sae - self.k))

    def active_latents(self) -> int | None:
        return self.k

    def name_suffix(self) -> str:
        return f"k{self.k}"

    def selected_per_token(self) -> int:
        """(row, latent) pairs the step selects per token (BatchTopK first keeps 4k candidates a token)."""
        return self.k

    def step_memory(self, batch_size: int, d_in: int, d_sae: int, bf16_preacts: bool) -> dict[str, int]:
        # the pre-activations (fp32; bf16 under CUDA autocast), the selected pairs and their sparse patterns
        # (~48 bytes a pair), AuxK's copy of the dead latents' pre-activations (up to [batch, d_sae] when most
        # latents are dead) and, with Multi-TopK, a second selection of 4k latents a token.
        terms = {
            "preactivations": batch_size * d_sae * (2 if bf16_preacts else 4),
            "selection": batch_size * self.selected_per_token() * 48,
        }
        if self.aux_coefficient > 0:
            terms["auxk"] = batch_size * d_sae * 4
        if self.multi_topk:
            terms["multi_topk"] = batch_size * 4 * self.k * 48 + batch_size * d_in * 4
        return terms


class TopKSAE(SAE):
    """TopK SAE at inference: exactly k latents per token (fewer if some top-k pre-activations are <= 0)."""

    architecture = "topk"
    uses_k = True

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        require(cfg.k is not None, "a topk SAE needs k (the number of active latents per token)")
        assert cfg.k is not None
        require(1 <= cfg.k < cfg.d_sae, f"k must be between 1 and d_sae - 1 = {cfg.d_sae - 1}, got {cfg.k}")

    @classmethod
    def saelens_fields(cls, cfg: SAEConfig) -> dict[str, Any]:
        return {"k": cfg.k, "rescale_acts_by_decoder_norm": False}

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
    cfg: TopKConfig,
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
            assert cfg.aux_k is not None  # resolved by TrainConfig
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


class TopKTrainingSAE(TrainingSAE, TopKSAE):
    """TopK SAE with its training losses; saved as `TopKSAE`."""

    training_architecture = "topk"

    @property
    def arch_cfg(self) -> TopKConfig:
        assert isinstance(self.train_cfg.arch, TopKConfig)
        return self.train_cfg.arch

    def training_forward(self, x: Tensor, ctx: StepContext) -> StepOutput:
        x_centered, pre = centred_preacts(self, x, self.use_bf16)
        with torch.no_grad():
            selected, indices = pre.topk(self.k, dim=-1, sorted=False)
            pattern = SparsePattern.from_topk(indices, self.cfg.d_sae)
        loss, metrics, active = sparse_reconstruction_losses(
            self, self.arch_cfg, x, x_centered, pre, pattern, selected.float().reshape(-1), ctx
        )
        return StepOutput(loss=loss, metrics=metrics, fired=pattern.cols[active])

    def to_inference(self) -> SAE:
        return copy_weights(self, TopKSAE(SAEConfig.from_dict(self.cfg.to_dict())))


TOPK = register(
    Architecture(
        name="topk",
        saved_as=TopKSAE.architecture,
        config_class=TopKConfig,
        training_class=TopKTrainingSAE,
        inference_class=TopKSAE,
        description="TopK (Gao et al. 2024): exactly k latents per token; the default",
        k_meaning="exact for topk",
    )
)
