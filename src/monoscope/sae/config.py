"""Training configuration of one SAE, validated on construction; unset defaults are resolved to numbers.

`TrainConfig` holds what every architecture shares and nests two configs: `optimizer` (an `OptimizerConfig`,
see optim.py) and `arch`, the architecture's own settings (an `ArchConfig` registered by its file: TopKConfig,
BatchTopKConfig, JumpReLUConfig, ReLUConfig). For convenience the architecture's fields may also be given as
keywords (`TrainConfig(d_in=576, d_sae=4608, k=32, total_tokens=...)`), and `from_dict` still reads the flat
JSON written before the nesting (train_config.json, checkpoints, monoscope.json's training config).

Default rules of the shared fields (each architecture's file gives its own):
- optimizer: see `optim.py` (name, learning-rate rule by width, warm-up, decay).
- dead_tokens: a latent is dead after this many tokens without firing. 10M as in Gao et al. and sparsify,
  but at most a twentieth of the run (and at least one batch), so short runs also revive dead latents.
- max_grad_norm, decoder_init_norm: the architecture's defaults (ReLU clips at 1 and starts with rows of norm
  0.1, the others do not clip and start at norm 1).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import JsonConfig, require
from ..errors import MonoscopeError
from .optim import OptimizerConfig
from .registry import ArchConfig, arch_config_from_flat, architectures, owners_of
from .registry import get as get_architecture
from .registry import names as architecture_names

DEFAULT_DEAD_TOKENS = 10_000_000

#: Flat optimiser keys of configs saved before the optimiser was nested (all trained with Adam).
_LEGACY_OPTIMIZER_KEYS = {
    "lr": "lr",
    "lr_warmup_steps": "warmup_steps",
    "lr_decay_fraction": "decay_fraction",
    "adam_beta1": "beta1",
    "adam_beta2": "beta2",
    "adam_eps": "eps",
}


@dataclass(init=False)
class TrainConfig(JsonConfig):
    """Everything that determines one SAE's training; two runs with equal configs and data give equal SAEs."""

    d_in: int
    total_tokens: int
    d_sae: int | None = None
    expansion_factor: float | None = None
    architecture: str = "topk"  # the training name (architecture_names()); `arch` holds its settings
    arch: ArchConfig = field(default_factory=ArchConfig)
    batch_size: int = 4096  # tokens per optimiser step
    seed: int = 0
    hook_name: str = ""  # key of this SAE's activations in a dict stream; also recorded in the saved SAE
    activation_scale: float = 1.0  # raw activations were multiplied by this; folded into the saved weights

    # optimiser and schedule (an OptimizerConfig, or its dict; unset values resolved by its rules)
    optimizer: OptimizerConfig | None = None
    max_grad_norm: float | None = None

    # initialisation
    geometric_median_iters: int = 10  # Weiszfeld iterations for b_dec's initial value; 0 uses the mean
    decoder_init_norm: float | None = None  # row norm of the initial decoder: the architecture's default when unset

    dead_tokens: int | None = None  # a latent that has not fired for this many tokens is dead

    # speed
    bf16_autocast: bool = True  # encoder GEMM in bfloat16 on CUDA GPUs (ignored on CPU)

    def __init__(
        self,
        d_in: int,
        total_tokens: int,
        d_sae: int | None = None,
        expansion_factor: float | None = None,
        architecture: str | None = None,
        arch: ArchConfig | Mapping[str, Any] | None = None,
        *,
        batch_size: int = 4096,
        seed: int = 0,
        hook_name: str = "",
        activation_scale: float = 1.0,
        optimizer: OptimizerConfig | Mapping[str, Any] | None = None,
        max_grad_norm: float | None = None,
        geometric_median_iters: int = 10,
        decoder_init_norm: float | None = None,
        dead_tokens: int | None = None,
        bf16_autocast: bool = True,
        **arch_fields: Any,
    ) -> None:
        """`arch` (a config or its dict) or, flat, the architecture's fields as keywords (`k=32`)."""
        if isinstance(arch, ArchConfig):
            own = next((a.name for a in architectures() if a.config_class is type(arch)), None)
            require(own is not None, f"{type(arch).__name__} is not a registered architecture's config")
            assert own is not None
            require(architecture in (None, own), f"architecture={architecture!r} but arch is a {own} config")
            architecture = own
        architecture = architecture or "topk"
        require(
            architecture in architecture_names(),
            f"unknown SAE architecture {architecture!r}; choose one of {', '.join(architecture_names())}",
        )
        if arch is None:
            arch = _arch_from_keywords(architecture, arch_fields)
        elif arch_fields:
            raise MonoscopeError(f"give {', '.join(sorted(arch_fields))} inside arch=..., not next to it")
        elif isinstance(arch, ArchConfig):
            arch = copy.copy(arch)  # resolved below for this config's shape: not shared with the caller's
        else:
            arch = get_architecture(architecture).config_class.from_dict(arch)
        self.d_in, self.total_tokens, self.d_sae, self.expansion_factor = d_in, total_tokens, d_sae, expansion_factor
        self.architecture, self.arch = architecture, arch
        self.batch_size, self.seed, self.hook_name = batch_size, seed, hook_name
        self.activation_scale = activation_scale
        if isinstance(optimizer, Mapping):
            optimizer = OptimizerConfig.from_dict(optimizer)
        self.optimizer = optimizer
        self.max_grad_norm, self.geometric_median_iters = max_grad_norm, geometric_median_iters
        self.decoder_init_norm, self.dead_tokens, self.bf16_autocast = decoder_init_norm, dead_tokens, bf16_autocast
        self.__post_init__()

    def __post_init__(self) -> None:
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
        require(
            isinstance(self.batch_size, int) and self.batch_size > 0,
            f"batch size must be a positive integer, got {self.batch_size!r}",
        )
        require(
            isinstance(self.total_tokens, int) and self.total_tokens > 0,
            f"the number of training tokens must be positive, got {self.total_tokens!r}",
        )
        require(
            self.total_tokens >= self.batch_size,
            f"training tokens ({self.total_tokens}) must be at least one batch ({self.batch_size}); "
            "train on more tokens or use a smaller batch size",
        )
        self.arch.resolve(self.d_in, self.d_sae, self.total_steps)
        require(self.activation_scale > 0, f"activation scale must be positive, got {self.activation_scale}")
        optimizer = self.optimizer or OptimizerConfig()
        require(
            isinstance(optimizer, OptimizerConfig),
            f"optimizer must be an OptimizerConfig or a dict, got {type(optimizer).__name__}",
        )
        self.optimizer = optimizer.resolve(self.d_sae, self.total_steps, self.architecture)
        if self.max_grad_norm is None:
            self.max_grad_norm = self.arch.default_max_grad_norm
        require(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        if self.decoder_init_norm is None:
            self.decoder_init_norm = self.arch.default_decoder_init_norm
        require(self.decoder_init_norm > 0, f"decoder_init_norm must be positive, got {self.decoder_init_norm}")
        require(self.geometric_median_iters >= 0, "geometric_median_iters must be >= 0")
        if self.dead_tokens is None:
            self.dead_tokens = max(self.batch_size, min(DEFAULT_DEAD_TOKENS, self.total_tokens // 20))
        require(self.dead_tokens > 0, f"dead_tokens must be positive, got {self.dead_tokens}")

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
        """Read `to_dict()`'s JSON, and the flat JSON of older versions: the architecture's fields at the top level
        (those of other architectures, which those versions also wrote, are dropped) and flat `lr`, `adam_*` (Adam)."""
        data = dict(data)
        legacy = {new: data.pop(old) for old, new in _LEGACY_OPTIMIZER_KEYS.items() if old in data}
        if legacy and "optimizer" not in data:
            data["optimizer"] = {"name": "adam", **legacy}
        shared = {f.name for f in dataclasses.fields(cls)}
        flat = {key: data.pop(key) for key in list(data) if key not in shared}
        if "arch" not in data:
            data["arch"] = arch_config_from_flat(data.get("architecture") or "topk", flat)
        elif flat:
            known = ", ".join(sorted(shared))
            raise MonoscopeError(f"TrainConfig: unknown field(s) {', '.join(sorted(flat))}; known: {known}")
        return cls(**data)

    def default_name(self) -> str:
        """A folder name for this SAE in a multi-SAE run."""
        parts = [self.hook_name or "sae", self.architecture, f"{self.d_sae}", self.arch.name_suffix()]
        return "-".join(part.replace("/", "_") for part in parts if part)


def _arch_from_keywords(architecture: str, fields: Mapping[str, Any]) -> ArchConfig:
    """The architecture config from flat keywords. Another architecture's field is ignored at its default (as
    before the nesting, when every config had every field) and so is `k` (`monoscope train --k` is unused by
    relu); set to anything else it is an error."""
    config_class = get_architecture(architecture).config_class
    own = {f.name for f in dataclasses.fields(config_class)}
    for key in sorted(set(fields) - own):
        owners = owners_of(key)
        if not owners:
            raise MonoscopeError(f"TrainConfig has no field {key!r}")
        owner_field = next(f for f in dataclasses.fields(get_architecture(owners[0]).config_class) if f.name == key)
        if key == "k" or fields[key] == owner_field.default:
            continue
        raise MonoscopeError(
            f"{key} is for the {' and '.join(owners)} architecture{'s' if len(owners) > 1 else ''}, not {architecture}"
        )
    return config_class(**{key: value for key, value in fields.items() if key in own})
