"""What a steering edit is: feature edits on an SAE, direction edits on a hook point, and their values.

A value is a number in the SAE's own activation units, or a multiple of the feature's maximum activation
(`8x`), resolved against the feature database (or an estimate) when the steering is attached to a model.
Everything a user can get wrong (an unknown mode, a NaN, `1e9`, `12=clamp`) fails here, before any model work.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, SupportsIndex

import torch

from ..errors import MonoscopeError

if TYPE_CHECKING:
    from ..sae.base import SAE

FEATURE_MODES = ("clamp", "add", "multiply", "ablate")
DIRECTION_MODES = ("orthogonal", "cap", "add")
POSITIONS = ("all", "prompt", "generated")
MAX_ABS_VALUE = 1e6

_MODE_ALIASES = {
    "clamp": "clamp",
    "set": "clamp",
    "=": "clamp",
    "add": "add",
    "nudge": "add",
    "+": "add",
    "multiply": "multiply",
    "mul": "multiply",
    "scale": "multiply",
    "*": "multiply",
    "x": "multiply",
    "ablate": "ablate",
    "off": "ablate",
    "zero": "ablate",
}


def check_number(value: float | str, what: str) -> float:
    """A finite number with |value| <= 1e6, else a MonoscopeError that says so."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MonoscopeError(f"{what} must be a number, got {value!r}") from None
    if math.isnan(number) or math.isinf(number):
        raise MonoscopeError(f"{what} is {number}; give a finite number such as 4 or 8x")
    if abs(number) > MAX_ABS_VALUE:
        raise MonoscopeError(
            f"{what} is {number:g}, beyond +-{MAX_ABS_VALUE:g}; use a value in the range of the feature's activations (e.g. 4, or 8x its max)"
        )
    return number


@dataclass(frozen=True)
class Value:
    """A number, or (`relative=True`) a multiple of the feature's maximum activation."""

    number: float
    relative: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "number", check_number(self.number, "a steering value"))

    @classmethod
    def parse(cls, value: "Value | float | int | str") -> "Value":
        if isinstance(value, Value):
            return value
        if isinstance(value, bool):
            raise MonoscopeError(f"a steering value must be a number or a multiple like 8x, got {value!r}")
        if isinstance(value, (int, float)):
            return cls(float(value))
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return cls(float(value.item()))
        text = str(value).strip().lower().replace(" ", "")
        match = re.fullmatch(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)x", text) or re.fullmatch(
            r"x([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)", text
        )
        if match:
            return cls(float(match[1]), relative=True)
        try:
            number = float(text)
        except ValueError:
            raise MonoscopeError(
                f"cannot read steering value {value!r}; write a number (4, -2.5) or a multiple of the feature's max activation (8x)"
            ) from None
        return cls(number)

    def resolve(self, max_activation: float | None, what: str = "value") -> float:
        if not self.relative:
            return self.number
        if max_activation is None:
            raise MonoscopeError(
                f"{what} {self} is relative to the feature's max activation, which is unknown; give a plain number"
            )
        return check_number(self.number * float(max_activation), f"{what} {self} (x max activation {max_activation:g})")

    def __str__(self) -> str:
        return f"{self.number:g}x" if self.relative else f"{self.number:g}"


def parse_mode(mode: str) -> str:
    found = _MODE_ALIASES.get(str(mode).strip().lower())
    if found is None:
        raise MonoscopeError(f"unknown steering mode {mode!r}; use one of {', '.join(FEATURE_MODES)}")
    return found


def check_positions(positions: str | None) -> str | None:
    if positions is None:
        return None
    if positions not in POSITIONS:
        raise MonoscopeError(f"unknown positions {positions!r}; use one of {', '.join(POSITIONS)}")
    return positions


def check_feature_id(feature: object, d_sae: int | None = None, what: str = "feature id") -> int:
    if isinstance(feature, str) and re.fullmatch(r"\s*[-+]?\d+\s*", feature):
        feature = int(feature)
    if isinstance(feature, torch.Tensor) and feature.numel() == 1 and not feature.is_floating_point():
        feature = int(feature.item())
    try:
        if isinstance(feature, bool) or not isinstance(feature, SupportsIndex):
            raise TypeError
        index = operator.index(feature)
    except TypeError:
        raise MonoscopeError(f"{what} must be a whole number, got {feature!r}") from None
    if index < 0:
        raise MonoscopeError(f"{what} {index} is negative; feature ids run from 0 to d_sae - 1")
    if d_sae is not None and index >= d_sae:
        raise MonoscopeError(f"{what} {index} does not exist: this SAE has {d_sae} features (0-{d_sae - 1})")
    return index


@dataclass
class Condition:
    """Apply an edit only at positions where `feature` (on the edit's SAE unless `sae` is given) is above `threshold`."""

    feature: int
    threshold: Value = field(default_factory=lambda: Value(0.0))
    sae: SAE | None = None

    def __post_init__(self) -> None:
        self.feature = check_feature_id(self.feature, what="condition feature id")
        self.threshold = Value.parse(self.threshold)

    @classmethod
    def parse(cls, text: str, sae: SAE | None = None) -> "Condition":
        """`ID>THRESHOLD` (threshold a number or a multiple like 0.5x), or just `ID` (active at all)."""
        match = re.fullmatch(r"\s*(\d+)\s*(?:>\s*(\S+))?\s*", str(text))
        if not match:
            raise MonoscopeError(f"cannot read condition {text!r}; write FEATURE>THRESHOLD, e.g. 123>0.5 or 123>0.2x")
        return cls(int(match[1]), Value.parse(match[2]) if match[2] else Value(0.0), sae)

    def __str__(self) -> str:
        return f"{self.feature}>{self.threshold}"


@dataclass
class FeatureEdit:
    """One feature of one SAE: clamp / add / multiply / ablate, at some positions, maybe conditionally."""

    sae: SAE
    feature: int
    mode: str
    value: Value = field(default_factory=lambda: Value(0.0))
    positions: str | None = None
    condition: Condition | None = None
    hook: str | None = None

    def __post_init__(self) -> None:
        self.mode = parse_mode(self.mode)
        d_sae = getattr(getattr(self.sae, "cfg", None), "d_sae", None)
        self.feature = check_feature_id(self.feature, d_sae)
        self.value = Value(0.0) if self.mode == "ablate" else Value.parse(self.value)
        self.positions = check_positions(self.positions)
        if self.condition is not None and not isinstance(self.condition, Condition):
            self.condition = Condition.parse(str(self.condition))

    def describe(self) -> str:
        text = f"{self.feature}={self.mode}" + ("" if self.mode == "ablate" else f":{self.value}")
        if self.positions and self.positions != "all":
            text += f" @{self.positions}"
        if self.condition is not None:
            text += f" if {self.condition}"
        return text


@dataclass
class DirectionEdit:
    """A direction at a hook point: `orthogonal` (x -> x + (c - 1)(x.r)r, r unit; c = 0 ablates), `cap`
    (component along r capped at `value`), or `add` (x -> x + value * v, v as given)."""

    hook: str
    direction: torch.Tensor
    mode: str
    value: float
    positions: str | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if self.mode not in DIRECTION_MODES:
            raise MonoscopeError(f"unknown direction mode {self.mode!r}; use one of {', '.join(DIRECTION_MODES)}")
        self.value = check_number(self.value, f"the {self.mode} value")
        self.positions = check_positions(self.positions)
        direction = torch.as_tensor(self.direction).detach().float().flatten().cpu()
        if direction.numel() == 0 or not torch.isfinite(direction).all():
            raise MonoscopeError("a steering direction must be a non-empty vector of finite numbers")
        if self.mode != "add":
            norm = direction.norm()
            if norm <= 1e-12:
                raise MonoscopeError(f"the direction for {self.mode} is zero; it needs a nonzero vector")
            direction = direction / norm
        self.direction = direction

    def describe(self) -> str:
        name = self.label or "direction"
        what = {
            "orthogonal": f"component x{self.value:g}",
            "cap": f"component capped at {self.value:g}",
            "add": f"add x{self.value:g}",
        }[self.mode]
        where = f" @{self.positions}" if self.positions and self.positions != "all" else ""
        return f"{name} at {self.hook}: {what}{where}"


def parse_feature_spec(text: str) -> tuple[int, str, Value]:
    """`ID=MODE:VALUE` (MODE clamp/add/multiply/ablate), `ID=VALUE` (clamp) or `ID=ablate` -> (id, mode, value)."""
    raw = str(text).strip()
    match = re.fullmatch(r"(-?\d+)\s*=\s*(.+)", raw)
    if not match:
        raise MonoscopeError(
            f"cannot read feature spec {text!r}; write ID=MODE:VALUE, e.g. 1234=clamp:8x or 56=add:4 or 7=ablate"
        )
    feature = check_feature_id(match[1])
    rest = match[2].strip()
    if ":" in rest:
        mode_text, value_text = rest.split(":", 1)
        mode = parse_mode(mode_text)
        if not value_text.strip():
            raise MonoscopeError(
                f"feature spec {text!r} has no value after {mode_text}:; write e.g. {feature}={mode}:4"
            )
        value = Value.parse(value_text) if mode != "ablate" else Value(0.0)
        return feature, mode, value
    if rest.lower() in _MODE_ALIASES and _MODE_ALIASES[rest.lower()] == "ablate":
        return feature, "ablate", Value(0.0)
    if rest.lower() in _MODE_ALIASES:
        raise MonoscopeError(f"feature spec {text!r} has no value; write e.g. {feature}={rest}:4")
    return feature, "clamp", Value.parse(rest)
