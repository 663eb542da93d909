"""The optimisers: schedule-free sign-SGD / Adam against their definition, the averaged weights, state round trips."""

from __future__ import annotations

import pytest
import torch

from monoscope.errors import MonoscopeError
from monoscope.sae import OptimizerConfig, TrainConfig
from monoscope.sae.checkpoint import optimizer_tensors, restore_optimizer
from monoscope.sae.optim import ScheduleFree, default_lr, make_optimizer


def reference_schedule_free(w0: torch.Tensor, grads_at, lr: float, momentum: float, steps: int, base: str):
    """The paper's three sequences written out: y = (1-b) z + b x, z -= lr u(g(y)), x = (1 - c) x + c z."""
    x, z = w0.clone(), w0.clone()
    v = torch.zeros_like(w0)
    weight_sum = 0.0
    for t in range(steps):
        y = momentum * x + (1 - momentum) * z
        g = grads_at(y)
        if base == "sign":
            u = g.sign()
        else:
            v = 0.999 * v + 0.001 * g * g
            u = g / ((v / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8)
        z = z - lr * u
        weight_sum += lr**2
        c = lr**2 / weight_sum
        x = (1 - c) * x + c * z
    return x, momentum * x + (1 - momentum) * z


@pytest.mark.parametrize("base", ["sign", "adam"])
def test_schedule_free_follows_its_definition_and_averaged_swaps_exactly(base):
    torch.manual_seed(0)
    target = torch.randn(50)
    w0 = torch.zeros(50)

    def grads_at(w):
        return 2 * (w - target) + 0.1 * torch.sin(7 * w)

    p = torch.nn.Parameter(w0.clone())
    opt = ScheduleFree([p], lr=0.05, base=base, momentum=0.9, eps=1e-8)
    for _ in range(30):
        p.grad = grads_at(p.detach())
        opt.step()
    x_ref, y_ref = reference_schedule_free(w0, grads_at, 0.05, 0.9, 30, base)
    assert torch.allclose(p.detach(), y_ref, atol=1e-5)  # training holds y
    y = p.detach().clone()
    with opt.averaged():
        assert torch.allclose(p.detach(), x_ref, atol=1e-5)  # inside: the average x
    assert torch.equal(p.detach(), y)  # restored bit for bit


@pytest.mark.parametrize("name", ["adam", "signum", "adam_sf"])
def test_optimizer_state_round_trips_through_checkpoint_tensors(name):
    torch.manual_seed(0)
    cfg = OptimizerConfig(name=name).resolve(d_sae=64, total_steps=10)
    params = {"a": torch.nn.Parameter(torch.randn(8, 4)), "b": torch.nn.Parameter(torch.randn(4))}
    opt = make_optimizer(params.values(), cfg, torch.device("cpu"))
    grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(6)]

    def step(optimizer, named, g):
        for key, value in named.items():
            value.grad = g[key].clone()
        optimizer.step()

    for g in grads[:3]:
        step(opt, params, g)
    saved = {k: v.clone() for k, v in optimizer_tensors(opt, {id(p): n for n, p in params.items()}).items()}
    copies = {k: torch.nn.Parameter(v.detach().clone()) for k, v in params.items()}
    fresh = make_optimizer(copies.values(), cfg, torch.device("cpu"))
    restore_optimizer(fresh, copies, saved)
    for g in grads[3:]:
        step(opt, params, g)
        step(fresh, copies, g)
    for key in params:
        assert torch.equal(params[key], copies[key]), key


def test_default_rules_and_bad_settings():
    cfg = TrainConfig(d_in=64, d_sae=4096, total_tokens=100 * 4096)
    assert cfg.optim.lr == pytest.approx(default_lr(cfg.optim.name, 4096))
    adam = TrainConfig(d_in=64, d_sae=4096, total_tokens=100 * 4096, optimizer={"name": "adam"}).optim
    assert cfg.optim.name == "adam" and cfg.optim == adam
    assert adam.lr == pytest.approx(8e-4 * 2) and adam.warmup_steps == 5 and adam.decay_fraction == 0.2
    signum = TrainConfig(d_in=64, d_sae=4096, total_tokens=100 * 4096, optimizer={"name": "signum"}).optim
    assert signum.lr == pytest.approx(2.5e-3 * 2) and signum.warmup_steps == 0 and signum.decay_fraction == 0.0
    free = TrainConfig(d_in=64, d_sae=4096, total_tokens=100 * 4096, optimizer={"name": "adam_sf"}).optim
    assert free.lr == pytest.approx(1.6e-3 * 2) and free.warmup_steps == 5 and free.decay_fraction == 0.0
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    old = {**cfg.to_dict(), "lr": 1e-3, "lr_warmup_steps": 3, "lr_decay_fraction": 0.1}  # a config saved before nesting
    old.pop("optimizer")
    legacy = TrainConfig.from_dict(old).optim
    assert (legacy.name, legacy.lr, legacy.warmup_steps, legacy.decay_fraction) == ("adam", 1e-3, 3, 0.1)
    with pytest.raises(MonoscopeError, match="schedule-free momentum must be in"):
        OptimizerConfig(name="signum", momentum=0.0)
