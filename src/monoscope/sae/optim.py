"""Optimisers for SAE training: Adam with a schedule, and schedule-free sign-SGD / Adam (Defazio et al. 2024).

`OptimizerConfig` (nested in `TrainConfig` as `optimizer`) names the optimiser and its settings; unset
values are resolved from the SAE width, the architecture and the run length (`resolve`), so a saved config
says what ran.

- `adam` (the default): torch's Adam (fused on CPU/CUDA) with linear warm-up over min(1000, 5 %) of the
  steps and a linear decay to 0 over the last 20 %. lr = 8e-4 / sqrt(d_sae / 2**14) for TopK and
  BatchTopK: Gao et al.'s width rule (2e-4 at 16k latents, as in sparsify's Adam) with 4x its constant.
  By held-out FVU after 100 steps of 4096 tokens (benchmarks/bench_optimizers.py, quickstart activations,
  d_sae 4608) 4x and 8x are about level (0.050, 0.045; 1x: 0.096, twice as high), but 8x starts to kill
  latents (0.3 % dead there, 14 % on a small synthetic problem; 16x: 18 %), and long runs favour the lower
  peak. JumpReLU and ReLU keep 2e-4 (their recipes were tuned with it).
- `signum`: schedule-free sign-SGD, sparsify's default (ScheduleFreeWrapper(SignSGD), momentum 0.95).
  lr 2.5e-3 / sqrt(d_sae / 2**14), half sparsify's 5e-3, which was worse here.
- `adam_sf`: schedule-free Adam (AdamWScheduleFree without weight decay), warm-up as Adam's,
  lr 1.6e-3 / sqrt(d_sae / 2**14).

Schedule-free optimisers keep two copies of every parameter: `z` (the plain SGD / Adam iterate, in the
optimiser state) and `x`, the running average of the z's, which is the model to use and save. Gradients
are taken at `y = momentum * x + (1 - momentum) * z`, which is what the parameters hold while training.
Here `x` is never stored: it is recovered from y and z (`x = lerp(y, z, 1 - 1/momentum)`), so the state
is one extra copy (plus Adam's second moment for `adam_sf`). `ScheduleFree.averaged()` swaps x into the
parameters for evaluation or saving and restores y bit for bit afterwards, so evaluating or saving in the
middle of a run does not change it. (Decoder rows are renormalised in y, as sparsify does; the saved
average is then close to, not exactly at, unit norm.)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from ..config import JsonConfig, require
from .registry import get as get_architecture

OPTIMIZER_NAMES = ("adam", "signum", "adam_sf")
SCHEDULE_FREE = ("signum", "adam_sf")

#: Learning rate at 2**14 latents; the resolved lr is this / sqrt(d_sae / 2**14) (wider SAEs take smaller steps).
BASE_LR_AT_16K = {"adam": 8e-4, "signum": 2.5e-3, "adam_sf": 1.6e-3}
#: Gao et al.'s Adam learning rate at 2**14 latents, which the JumpReLU and ReLU recipes were tuned with and keep
#: (their `ArchConfig.adam_lr_at_16k`).
GAO_LR_AT_16K = 2e-4


@dataclass
class OptimizerConfig(JsonConfig):
    """Which optimiser trains the SAE, and how; see the module docstring. None means "the default rule"."""

    name: str = "adam"
    lr: float | None = None  # default: BASE_LR_AT_16K[name] / sqrt(d_sae / 2**14)
    warmup_steps: int | None = None  # linear warm-up; default: adam and adam_sf min(1000, 5% of steps), signum 0
    decay_fraction: float | None = (
        None  # linear decay to 0 over this last fraction of steps (adam: 0.2; schedule-free: 0)
    )
    beta1: float = 0.9  # adam: first-moment decay
    beta2: float = 0.999  # adam and adam_sf: second-moment decay
    eps: float = 6.25e-10  # adam and adam_sf (Gao et al.: the normalised loss has small gradients)
    momentum: float = 0.95  # schedule-free: y = momentum * x + (1 - momentum) * z (sparsify: 0.95)

    def __post_init__(self) -> None:
        require(
            self.name in OPTIMIZER_NAMES, f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}"
        )
        require(
            self.lr is None or (math.isfinite(self.lr) and self.lr > 0),
            f"learning rate must be positive, got {self.lr}",
        )
        require(
            self.warmup_steps is None or self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"
        )
        require(
            self.decay_fraction is None or 0 <= self.decay_fraction <= 1,
            f"decay_fraction must be in [0, 1], got {self.decay_fraction}",
        )
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "Adam betas must be in [0, 1)")
        require(self.eps > 0, f"eps must be positive, got {self.eps}")
        require(0 < self.momentum <= 1, f"schedule-free momentum must be in (0, 1], got {self.momentum}")

    @property
    def schedule_free(self) -> bool:
        return self.name in SCHEDULE_FREE

    def resolve(self, d_sae: int, total_steps: int, architecture: str = "topk") -> "OptimizerConfig":
        """This config with every unset value set by its default rule."""
        lr = self.lr if self.lr is not None else default_lr(self.name, d_sae, architecture)
        warmup = self.warmup_steps
        if warmup is None:
            warmup = 0 if self.name == "signum" else max(1, min(1000, total_steps // 20))
        decay = self.decay_fraction if self.decay_fraction is not None else (0.0 if self.schedule_free else 0.2)
        return OptimizerConfig(self.name, lr, warmup, decay, self.beta1, self.beta2, self.eps, self.momentum)

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate for optimiser step `step` (0-based): linear warm-up, flat, linear decay to 0."""
        assert self.lr is not None and self.warmup_steps is not None and self.decay_fraction is not None
        scale = 1.0
        if self.warmup_steps > 0 and step < self.warmup_steps:
            scale = (step + 1) / self.warmup_steps
        decay_steps = int(total_steps * self.decay_fraction)
        decay_start = total_steps - decay_steps
        if decay_steps > 0 and step >= decay_start:
            scale = min(scale, (total_steps - step) / decay_steps)
        return self.lr * scale


def optimizer_config(optimizer: "str | OptimizerConfig | None" = None, lr: float | None = None) -> OptimizerConfig:
    """An optimiser config from a name or config (None: the default optimiser), with `lr` set when given."""
    if optimizer is None:
        cfg = OptimizerConfig()
    elif isinstance(optimizer, str):
        cfg = OptimizerConfig(name=optimizer)
    else:
        cfg = optimizer
    if lr is not None:
        cfg = OptimizerConfig.from_dict({**cfg.to_dict(), "lr": lr})
    return cfg


def default_lr(name: str, d_sae: int, architecture: str = "topk") -> float:
    """The optimiser's base lr scaled by 1 / sqrt(d_sae / 2**14) (Gao et al. 2024, sparsify)."""
    own = get_architecture(architecture).config_class.adam_lr_at_16k
    base = own if name == "adam" and own is not None else BASE_LR_AT_16K[name]
    return base / math.sqrt(d_sae / 2**14)


class ScheduleFree(torch.optim.Optimizer):
    """Schedule-free optimiser (Defazio et al. 2024, "The Road Less Scheduled") with a sign or Adam step.

    `base="sign"`: z moves by lr * sign(g) (sparsify's ScheduleFreeWrapper(SignSGD)); `base="adam"`: by
    lr * g / (sqrt(v / (1 - beta2^t)) + eps) (AdamWScheduleFree). The parameters hold y while training;
    see `averaged()`. The lr of each step is read from the param group (the trainer sets warm-up there); the
    average weighs step t by max lr so far ** 2, as in the reference implementation.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        *,
        base: str = "sign",
        momentum: float = 0.95,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_lr_power: float = 2.0,
    ) -> None:
        if base not in ("sign", "adam"):
            raise ValueError(f"unknown schedule-free base step {base!r}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            beta2=beta2,
            eps=eps,
            weight_lr_power=weight_lr_power,
            k=0,
            weight_sum=0.0,
            lr_max=0.0,
        )
        super().__init__(params, defaults)
        self.base = base

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        assert closure is None, "closures are not supported"
        for group in self.param_groups:
            k = group["k"]
            lr = group["lr"]
            momentum = group["momentum"]
            lr_max = group["lr_max"] = max(lr, group["lr_max"])
            weight = lr_max ** group["weight_lr_power"]
            weight_sum = group["weight_sum"] = group["weight_sum"] + weight
            c = weight / weight_sum if weight_sum > 0 else 0.0
            bias_correction2 = 1 - group["beta2"] ** (k + 1)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone()
                    if self.base == "adam":
                        state["exp_avg_sq"] = torch.zeros_like(p)
                z = state["z"]
                grad = p.grad
                if self.base == "sign":
                    direction = grad.sign()
                else:
                    v = state["exp_avg_sq"]
                    v.mul_(group["beta2"]).addcmul_(grad, grad, value=1 - group["beta2"])
                    direction = grad / v.div(bias_correction2).sqrt_().add_(group["eps"])
                # y_{t+1} = lerp(y_t, z_t, c) + lr (momentum (1 - c) - 1) u;  z_{t+1} = z_t - lr u
                p.lerp_(z, c)
                p.add_(direction, alpha=lr * (momentum * (1 - c) - 1))
                z.sub_(direction, alpha=lr)
            group["k"] = k + 1

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Within this block the parameters hold the averaged weights x; y is restored exactly on exit."""
        saved: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    z = self.state[p].get("z") if p in self.state else None
                    if z is None:
                        continue
                    saved.append((p, p.detach().clone()))
                    p.lerp_(z, 1 - 1 / group["momentum"])
        try:
            yield
        finally:
            with torch.no_grad():
                for p, y in saved:
                    p.copy_(y)

    def scalar_state(self) -> dict[str, Tensor]:
        """The per-group counters (step, weight sum, max lr), exactly, for checkpoints."""
        out = {}
        for index, group in enumerate(self.param_groups):
            for key in ("k", "weight_sum", "lr_max"):
                out[f"group{index}.{key}"] = torch.tensor(float(group[key]), dtype=torch.float64)
        return out

    def load_scalar_state(self, tensors: dict[str, Tensor]) -> None:
        for index, group in enumerate(self.param_groups):
            group["k"] = int(tensors[f"group{index}.k"].item())
            group["weight_sum"] = float(tensors[f"group{index}.weight_sum"].item())
            group["lr_max"] = float(tensors[f"group{index}.lr_max"].item())


def make_optimizer(parameters: Iterable[Tensor], cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimiser `cfg` names, over `parameters` (cfg must be resolved)."""
    assert cfg.lr is not None
    params = list(parameters)
    if cfg.name == "signum":
        return ScheduleFree(params, cfg.lr, base="sign", momentum=cfg.momentum)
    if cfg.name == "adam_sf":
        return ScheduleFree(params, cfg.lr, base="adam", momentum=cfg.momentum, beta2=cfg.beta2, eps=cfg.eps)
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(params, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.Adam(params, **kwargs)


@contextlib.contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The weights to evaluate and save: the schedule-free average inside this block, else as they are."""
    if isinstance(optimizer, ScheduleFree):
        with optimizer.averaged():
            yield
    else:
        yield
