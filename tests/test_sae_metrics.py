"""Reconstruction metrics accumulate over the whole set and match a direct computation."""

from __future__ import annotations

import json

import pytest
import torch

from monoscope.errors import MonoscopeError
from monoscope.sae import JumpReLUSAE, SAEConfig, TopKSAE, evaluate_reconstruction


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_sae(cls, architecture):
    torch.manual_seed(0)
    sae = cls(SAEConfig(d_in=10, d_sae=40, architecture=architecture, k=3 if architecture == "topk" else None))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
        sae.b_enc[:5] = -50.0  # five latents that never fire
        sae.b_enc[5:7] = 50.0  # two that always fire
        if architecture == "jumprelu":
            sae.threshold.fill_(0.2)
    return sae


@pytest.mark.parametrize("cls,architecture", [(TopKSAE, "topk"), (JumpReLUSAE, "jumprelu")])
def test_metrics_match_a_direct_computation(cls, architecture):
    sae = make_sae(cls, architecture)
    torch.manual_seed(1)
    x = torch.randn(333, 10) * 1.5 + 0.7
    batches = [x[:100], x[100:101], x[101:250].reshape(1, 149, 10), x[250:]]  # uneven, one with a leading dim
    metrics = evaluate_reconstruction(sae, batches)

    x64 = x.double()
    codes = sae.encode(x)
    x_hat = sae.decode(codes).double()
    error = (x64 - x_hat).pow(2).sum(1).mean()
    variance = x64.pow(2).sum(1).mean() - x64.mean(0).pow(2).sum()
    density = (codes > 0).double().mean(0)
    expected = {
        "tokens": 333,
        "l0": (codes > 0).double().sum(1).mean().item(),
        "mse": (x64 - x_hat).pow(2).mean().item(),
        "explained_variance": (1 - error / variance).item(),
        "fvu": (error / variance).item(),
        "cosine_similarity": torch.nn.functional.cosine_similarity(x64, x_hat, dim=1).mean().item(),
        "shrinkage": (x_hat.pow(2).sum() / (x64 * x_hat).sum()).item(),
        "frac_alive": (density > 0).double().mean().item(),
        "frac_dense_1pct": (density > 0.01).double().mean().item(),
        "frac_dense_10pct": (density > 0.1).double().mean().item(),
    }
    for name, value in expected.items():
        assert getattr(metrics, name) == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert metrics.frac_alive <= 35 / 40  # the five silenced latents are dead
    assert metrics.frac_dense_10pct >= 2 / 40  # the two forced ones fire on every token
    assert json.loads(json.dumps(metrics.to_dict())) == metrics.to_dict()


def test_fvu_is_not_a_mean_of_per_batch_fvus():
    sae = make_sae(TopKSAE, "topk")
    torch.manual_seed(2)
    # Two batches with very different means: per-batch variances would each miss the between-batch spread.
    a = torch.randn(200, 10) + 5.0
    b = torch.randn(200, 10) - 5.0
    whole = evaluate_reconstruction(sae, [torch.cat([a, b])])
    split = evaluate_reconstruction(sae, [a, b])
    assert split.fvu == pytest.approx(whole.fvu, rel=1e-9)
    per_batch = (evaluate_reconstruction(sae, [a]).fvu + evaluate_reconstruction(sae, [b]).fvu) / 2
    assert abs(per_batch - whole.fvu) > 0.1 * whole.fvu


def test_max_tokens_densities_and_errors():
    sae = make_sae(TopKSAE, "topk")
    x = torch.randn(300, 10)
    metrics, densities = evaluate_reconstruction(sae, [x[:150], x[150:]], max_tokens=200, return_densities=True)
    assert metrics.tokens == 200
    assert densities.shape == (40,)
    assert torch.allclose(densities, (sae.encode(x[:200]) > 0).float().mean(0))
    with pytest.raises(MonoscopeError, match="held-out batches are empty"):
        evaluate_reconstruction(sae, [])
    with pytest.raises(MonoscopeError, match="activations have d=7"):
        evaluate_reconstruction(sae, [torch.randn(4, 7)])
