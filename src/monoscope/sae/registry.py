"""The architecture registry, like SAELens's `registry.py`: it only collects what each architecture file registers.

Each architecture lives in one file (topk.py, batchtopk.py, jumprelu.py, relu.py) that ends with
`register(Architecture(...))`: its training name (`--arch`), its config fields (an `ArchConfig` dataclass
nested in `TrainConfig`), its training class, the inference class it is saved as (whose `architecture` is
the SAELens name written in cfg.json) and its own `monoscope train` flags. `sae/__init__.py` imports the
files, which registers them; every table of names (the CLI's choices, what cfg.json may say, the saved form
of each training architecture) is derived from the registrations here. docs/sae.md, "Adding an
architecture", lists the steps.

This module is a leaf of `monoscope.sae` (base.py, config.py and optim.py read it), so the classes are kept
as plain types here; `base.inference_class` and `training.training_class` return them typed.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import JsonConfig
from ..errors import MonoscopeError


@dataclass
class ArchConfig(JsonConfig):
    """The settings one architecture adds to `TrainConfig` (its `arch` field); subclasses validate in `__post_init__`.

    Class attributes give the architecture's defaults for the settings every architecture has, so no code
    outside the architecture's file asks which architecture it is.
    """

    #: Default gradient-norm clip (0: none) and initial decoder row norm.
    default_max_grad_norm: ClassVar[float] = 0.0
    default_decoder_init_norm: ClassVar[float] = 1.0
    #: Adam's learning rate at 2**14 latents when this architecture keeps its own recipe's (None: the optimiser's).
    adam_lr_at_16k: ClassVar[float | None] = None
    #: Whether the SAE subtracts b_dec from its input before encoding.
    apply_b_dec_to_input: ClassVar[bool] = True
    #: The field `monoscope train --k` sets (None: the architecture has no such knob).
    k_field: ClassVar[str | None] = None

    def resolve(self, d_in: int, d_sae: int, total_steps: int) -> None:
        """Set unset defaults that depend on the SAE's shape and run length, and check what needs them."""

    def active_latents(self) -> int | None:
        """Latents kept per token when the architecture fixes them (TopK's k), else None."""
        return None

    def name_suffix(self) -> str:
        """What tells SAEs of this architecture apart in a folder name (e.g. `k32`); empty when nothing does."""
        return ""

    def step_memory(self, batch_size: int, d_in: int, d_sae: int, bf16_preacts: bool) -> dict[str, int]:
        """Bytes of the activations one training step keeps alive beyond the batch itself, by term."""
        return {"dense_step": 6 * batch_size * d_sae * 4}


@dataclass(frozen=True)
class CliFlag:
    """A `monoscope train` flag that sets one field of one architecture's config (default None: the config's)."""

    flag: str
    field: str
    type: Callable[[str], Any]
    help: str

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Architecture:
    """One registered architecture."""

    name: str  # the training name: --arch, TrainConfig.architecture, monoscope.json's trained_architecture
    saved_as: str  # the inference form, by the name cfg.json gives it (SAELens's: topk, jumprelu, standard)
    config_class: type[ArchConfig]
    training_class: type  # a `training.TrainingSAE` subclass taking (TrainConfig, device)
    description: str  # one line for docs
    k_meaning: str  # what `monoscope train --k` means for it ("exact for topk")
    #: A `base.SAE` subclass whose `architecture` is `saved_as`; None when another architecture's is reused
    #: (BatchTopK is saved as JumpReLU).
    inference_class: type | None = None
    cli_flags: tuple[CliFlag, ...] = ()

    def config_from_cli(self, k: int, args: argparse.Namespace) -> ArchConfig:
        """The architecture config of one SAE of a `monoscope train` sweep: `--k` value `k` and this file's flags."""
        fields: dict[str, Any] = {}
        if self.config_class.k_field is not None:
            fields[self.config_class.k_field] = k
        for flag in self.cli_flags:
            value = getattr(args, flag.dest, None)
            if value is not None:
                fields[flag.field] = value
        return self.config_class(**fields)


_ARCHITECTURES: dict[str, Architecture] = {}


def register(architecture: Architecture) -> Architecture:
    """Add an architecture (called once, at the end of its file)."""
    if architecture.name in _ARCHITECTURES:
        raise ValueError(f"SAE architecture {architecture.name!r} is already registered")
    runs = architecture.inference_class
    if runs is not None and (
        getattr(runs, "architecture", None) != architecture.saved_as or architecture.saved_as in inference_classes()
    ):
        raise ValueError(f"{runs.__name__} must be the only class saved as {architecture.saved_as!r}")
    _ARCHITECTURES[architecture.name] = architecture
    return architecture


def architectures() -> tuple[Architecture, ...]:
    """Every registered architecture, in registration order (topk, the default, first)."""
    return tuple(_ARCHITECTURES.values())


def names() -> tuple[str, ...]:
    """The training names: `--arch` choices."""
    return tuple(_ARCHITECTURES)


def get(name: str) -> Architecture:
    if name not in _ARCHITECTURES:
        raise MonoscopeError(f"unknown SAE architecture {name!r}; choose one of {', '.join(_ARCHITECTURES)}")
    return _ARCHITECTURES[name]


def inference_classes() -> dict[str, type]:
    """Inference classes by the name cfg.json gives them (SAELens's), in registration order."""
    return {a.saved_as: a.inference_class for a in _ARCHITECTURES.values() if a.inference_class is not None}


def saved_as() -> dict[str, str]:
    """Training name -> the name it is saved under in cfg.json."""
    return {a.name: a.saved_as for a in _ARCHITECTURES.values()}


def inference_name(name: str) -> str:
    """The inference name for a cfg.json architecture, which may also be a training name (relu -> standard)."""
    return _ARCHITECTURES[name].saved_as if name in _ARCHITECTURES else name


def owners_of(field: str) -> list[str]:
    """The architectures whose config has `field`."""
    return [a.name for a in _ARCHITECTURES.values() if field in {f.name for f in dataclasses.fields(a.config_class)}]


def arch_config_from_flat(name: str, flat: Mapping[str, Any]) -> ArchConfig:
    """The `name` architecture's config from flat `TrainConfig` fields (old JSON): its own fields, the rest ignored."""
    config_class = get(name).config_class
    own = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{key: value for key, value in flat.items() if key in own})
