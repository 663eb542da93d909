"""Training configuration of one SAE, validated on construction; unset defaults are resolved to numbers.

Default rules (each field's comment says why):
- optimizer: see `optim.py` (name, learning-rate rule by width, warm-up, decay).
- dead_tokens: a latent is dead after this many tokens without firing. 10M as in Gao et al. and sparsify,
  but at most a twentieth of the run (and at least one batch), so short runs also revive dead latents.
- aux_k: d_in / 2 (Gao et al., appendix B.1), at most d_sae - k.
- max_grad_norm: 1.0 for ReLU (Anthropic's recipe clips), 0 (no clipping) for the others.
- threshold_ema (BatchTopK): 0.01 per step as in SAELens, raised to 20 / steps (at most 0.1) for runs
  under 2000 steps: the threshold drifts down while training, and the average must follow its end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..config import JsonConfig, require
from .optim import OptimizerConfig

#: Architectures the trainer can train; BatchTopK is saved (and loads) as JumpReLU, ReLU as SAELens's "standard".
TRAINING_ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")

DEFAULT_DEAD_TOKENS = 10_000_000


#: Flat optimiser keys of configs saved before the optimiser was nested (all trained with Adam).
_LEGACY_OPTIMIZER_KEYS = {"lr": "lr", "lr_warmup_steps": "warmup_steps", "lr_decay_fraction": "decay_fraction",
                          "adam_beta1": "beta1", "adam_beta2": "beta2", "adam_eps": "eps"}


@dataclass
class TrainConfig(JsonConfig):
    """Everything that determines one SAE's training; two runs with equal configs and data give equal SAEs."""

    d_in: int
    total_tokens: int
    d_sae: int | None = None
    expansion_factor: float | None = None
    architecture: str = "topk"
    k: int = 32  # active latents per token (topk), or on average over the batch (batchtopk)
    batch_size: int = 4096  # tokens per optimiser step
    seed: int = 0
    hook_name: str = ""  # key of this SAE's activations in a dict stream; also recorded in the saved SAE
    activation_scale: float = 1.0  # raw activations were multiplied by this; folded into the saved weights

    # optimiser and schedule (an OptimizerConfig, or its dict; unset values resolved by its rules)
    optimizer: OptimizerConfig | None = None
    max_grad_norm: float | None = None

    # initialisation
    geometric_median_iters: int = 10  # Weiszfeld iterations for b_dec's initial value; 0 uses the mean
    decoder_init_norm: float | None = None  # row norm of the initial decoder: 1 (0.1 for relu) when unset

    # TopK / BatchTopK
    dead_tokens: int | None = None
    aux_k: int | None = None
    aux_coefficient: float = 1 / 32
    multi_topk: bool = False  # add the Multi-TopK term: FVU with 4k latents, weighted 1/8
    multi_topk_coefficient: float = 1 / 8
    threshold_ema: float | None = None  # BatchTopK: weight of each step's minimum selected activation

    # ReLU + L1 (Anthropic April 2024)
    l1_coefficient: float = 5.0
    l1_warmup_fraction: float = 0.05

    # JumpReLU (Rajamanoharan et al. 2024)
    l0_coefficient: float = 1.0
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.5
    # With a target L0, the L0 penalty is replaced by a controller that holds L0 at it (see jumprelu.py).
    target_l0: float | None = None

    # speed
    bf16_autocast: bool = True  # encoder GEMM in bfloat16 on CUDA GPUs (ignored on CPU)

    def __post_init__(self) -> None:
        require(
            self.architecture in TRAINING_ARCHITECTURES,
            f"unknown SAE architecture {self.architecture!r}; choose one of {', '.join(TRAINING_ARCHITECTURES)}",
        )
        require(isinstance(self.d_in, int) and self.d_in > 0, f"d_in must be a positive integer, got {self.d_in!r}")
        if self.expansion_factor is not None:
            require(self.expansion_factor > 0, f"expansion factor must be positive, got {self.expansion_factor}")
            from_factor = int(round(self.expansion_factor * self.d_in))
            require(
                self.d_sae is None or self.d_sae == from_factor,
                f"d_sae={self.d_sae} disagrees with expansion factor {self.expansion_factor} x d_in {self.d_in} "
                f"= {from_factor}; give only one of them",
            )
            self.d_sae = from_factor
        require(self.d_sae is not None, "give the SAE width: d_sae (number of latents) or an expansion factor")
        assert self.d_sae is not None
        require(isinstance(self.d_sae, int) and self.d_sae > 0, f"d_sae must be a positive integer, got {self.d_sae!r}")
        require(isinstance(self.batch_size, int) and self.batch_size > 0, f"batch size must be a positive integer, got {self.batch_size!r}")
        require(isinstance(self.total_tokens, int) and self.total_tokens > 0, f"the number of training tokens must be positive, got {self.total_tokens!r}")
        require(
            self.total_tokens >= self.batch_size,
            f"training tokens ({self.total_tokens}) must be at least one batch ({self.batch_size}); "
            "train on more tokens or use a smaller batch size",
        )
        if self.architecture in ("topk", "batchtopk"):
            require(isinstance(self.k, int) and self.k >= 1, f"k must be at least 1, got {self.k!r}")
            require(
                self.k < self.d_sae,
                f"k={self.k} must be smaller than d_sae={self.d_sae} (k latents are kept out of d_sae)",
            )
        require(self.activation_scale > 0, f"activation scale must be positive, got {self.activation_scale}")
        optimizer = self.optimizer
        if optimizer is None:
            optimizer = OptimizerConfig()
        elif isinstance(optimizer, dict):
            optimizer = OptimizerConfig.from_dict(optimizer)
        require(isinstance(optimizer, OptimizerConfig), f"optimizer must be an OptimizerConfig or a dict, got {type(optimizer).__name__}")
        self.optimizer = optimizer.resolve(self.d_sae, self.total_steps, self.architecture)
        if self.max_grad_norm is None:
            self.max_grad_norm = 1.0 if self.architecture == "relu" else 0.0
        require(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        if self.decoder_init_norm is None:
            self.decoder_init_norm = 0.1 if self.architecture == "relu" else 1.0
        require(self.decoder_init_norm > 0, f"decoder_init_norm must be positive, got {self.decoder_init_norm}")
        require(self.geometric_median_iters >= 0, "geometric_median_iters must be >= 0")
        if self.dead_tokens is None:
            self.dead_tokens = max(self.batch_size, min(DEFAULT_DEAD_TOKENS, self.total_tokens // 20))
        require(self.dead_tokens > 0, f"dead_tokens must be positive, got {self.dead_tokens}")
        if self.aux_k is None:
            self.aux_k = max(1, min(self.d_in // 2, self.d_sae - (self.k if self.architecture in ("topk", "batchtopk") else 0)))
        require(self.aux_k >= 1, f"aux_k must be at least 1, got {self.aux_k}")
        require(self.aux_coefficient >= 0, "aux_coefficient must be >= 0")
        require(self.multi_topk_coefficient >= 0, "multi_topk_coefficient must be >= 0")
        if self.threshold_ema is None:
            self.threshold_ema = max(0.01, min(0.1, 20 / self.total_steps))
        require(0 < self.threshold_ema <= 1, f"threshold_ema must be in (0, 1], got {self.threshold_ema}")
        require(self.l1_coefficient >= 0, "l1_coefficient must be >= 0")
        require(0 <= self.l1_warmup_fraction <= 1, "l1_warmup_fraction must be in [0, 1]")
        require(self.l0_coefficient >= 0, "l0_coefficient must be >= 0")
        require(self.jumprelu_bandwidth > 0, "jumprelu_bandwidth must be positive")
        require(self.jumprelu_init_threshold > 0, "jumprelu_init_threshold must be positive")
        if self.target_l0 is not None:
            require(self.architecture == "jumprelu", "target_l0 is for the jumprelu architecture (topk/batchtopk take k)")
            require(0 < self.target_l0 < self.d_sae, f"target_l0 must be in (0, d_sae={self.d_sae}), got {self.target_l0}")

    @property
    def total_steps(self) -> int:
        """Optimiser steps: whole batches in total_tokens."""
        return self.total_tokens // self.batch_size

    @property
    def width(self) -> int:
        assert self.d_sae is not None
        return self.d_sae

    @property
    def optim(self) -> OptimizerConfig:
        """The resolved optimiser config (never None after construction)."""
        assert isinstance(self.optimizer, OptimizerConfig)
        return self.optimizer

    @property
    def lr(self) -> float:
        """The (peak) learning rate."""
        assert self.optim.lr is not None
        return self.optim.lr

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step `step` (0-based): see `OptimizerConfig.lr_at`."""
        return self.optim.lr_at(step, self.total_steps)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Also reads configs saved before the optimiser settings were nested (flat `lr`, `adam_*`: Adam)."""
        data = dict(data)
        legacy = {new: data.pop(old) for old, new in _LEGACY_OPTIMIZER_KEYS.items() if old in data}
        if legacy and "optimizer" not in data:
            data["optimizer"] = {"name": "adam", **legacy}
        return super().from_dict(data)

    def default_name(self) -> str:
        """A folder name for this SAE in a multi-SAE run."""
        parts = [self.hook_name or "sae", self.architecture, f"{self.d_sae}"]
        if self.architecture in ("topk", "batchtopk"):
            parts.append(f"k{self.k}")
        return "-".join(part.replace("/", "_") for part in parts)
