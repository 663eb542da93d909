"""The training losses and their gradients against dense references, and what they are for: AuxK revives dead
latents, the decoder step keeps rows unit norm, JumpReLU's pseudo-gradients, known features recovered."""

from __future__ import annotations

import pytest
import torch

from monoscope.sae import SAETrainer, TrainConfig, evaluate_reconstruction, load_train_log, train_sae
from monoscope.sae.batchtopk import BatchTopKTrainingSAE
from monoscope.sae.jumprelu import JumpReLUTrainingSAE, _JumpReLU, _Step
from monoscope.sae.sparse import SparsePattern
from monoscope.sae.synthetic import SyntheticActivations
from monoscope.sae.topk import TopKTrainingSAE
from monoscope.sae.training import StepContext


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids waiting on the other at every op
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def checked_csr(monkeypatch):
    monkeypatch.setattr(SparsePattern, "check_invariants", True)


def _dense_codes(pre: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, pre, torch.zeros_like(pre)).relu()


def dense_topk_loss(sae, x: torch.Tensor, dead: torch.Tensor, batch_level: bool) -> torch.Tensor:
    """FVU + aux * AuxK + multi * Multi-TopK FVU, written densely with autograd (the formulas of topk.py)."""
    cfg = sae.train_cfg.arch
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    k = cfg.k
    if batch_level:
        flat = pre.detach().reshape(-1)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(k * x.shape[0]).indices] = True
        keep = keep.view_as(pre)
    else:
        keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, pre.detach().topk(k, dim=1).indices, True)
    x_hat = _dense_codes(pre, keep) @ sae.W_dec + sae.b_dec
    total_variance = (x - x.mean(0)).pow(2).sum()
    residual = x - x_hat
    loss = residual.pow(2).sum() / total_variance
    n_dead = int(dead.sum())
    if n_dead:
        k_aux = min(cfg.aux_k, n_dead)
        masked = torch.where(dead, pre.detach(), torch.full_like(pre, -torch.inf))
        aux_keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, masked.topk(k_aux, dim=1).indices, True)
        residual_hat = _dense_codes(pre, aux_keep) @ sae.W_dec
        scale = min(n_dead / cfg.aux_k, 1.0)
        loss = loss + cfg.aux_coefficient * scale * (residual_hat - residual.detach()).pow(2).sum() / total_variance
    if cfg.multi_topk:
        wide = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, pre.detach().topk(4 * k, dim=1).indices, True)
        wide_hat = _dense_codes(pre, wide) @ sae.W_dec + sae.b_dec
        loss = loss + cfg.multi_topk_coefficient * (x - wide_hat).pow(2).sum() / total_variance
    return loss


@pytest.mark.parametrize("cls,batch_level", [(TopKTrainingSAE, False), (BatchTopKTrainingSAE, True)])
def test_whole_sparse_loss_and_gradients_match_a_dense_reference(cls, batch_level):
    torch.manual_seed(0)
    d_in, d_sae = 12, 40
    cfg = TrainConfig(
        d_in=d_in,
        d_sae=d_sae,
        k=3,
        total_tokens=64,
        batch_size=32,
        architecture=cls.training_architecture,
        aux_k=5,
        aux_coefficient=0.5,
        multi_topk=True,
    )
    sae = cls(cfg)
    x = torch.randn(32, d_in) + 0.3
    sae.initialize(x, torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)  # so that pre-activations differ in sign and every branch runs
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[::3] = True
    output = sae.training_forward(x, StepContext(step=0, total_steps=2, dead_mask=dead))
    output.loss.backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    reference = dense_topk_loss(sae, x, dead, batch_level)
    reference.backward()
    assert float(output.metrics["aux_loss"]) > 0 and "multi_topk_fvu" in output.metrics
    assert output.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for name, p in sae.named_parameters():
        assert torch.allclose(sparse_grads[name], p.grad, atol=1e-6, rtol=1e-4), name


def test_decoder_step_removes_the_gradient_along_each_row_and_renormalises():
    torch.manual_seed(0)
    cfg = TrainConfig(d_in=8, d_sae=16, k=2, total_tokens=32, batch_size=32)
    sae = TopKTrainingSAE(cfg)
    sae.initialize(torch.randn(32, 8), torch.Generator().manual_seed(0))
    grad = torch.randn(16, 8)
    sae.W_dec.grad = grad.clone()
    rows = sae.W_dec.detach().clone()
    sae.before_optimizer_step()
    projected = sae.W_dec.grad
    assert torch.allclose(torch.linalg.vecdot(projected, rows), torch.zeros(16), atol=1e-6)  # no component along a row
    expected = grad - torch.linalg.vecdot(grad, rows).unsqueeze(1) * rows
    assert torch.allclose(projected, expected, atol=1e-6)
    with torch.no_grad():
        sae.W_dec.add_(projected, alpha=0.5)  # a step: tangent to first order, so the norm grows a little
    assert float(sae.W_dec.detach().norm(dim=1).max()) > 1.0
    sae.after_optimizer_step()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16), atol=1e-6)


def test_jumprelu_pseudo_gradients_follow_the_rectangle_kernel():
    eps = 0.1
    threshold = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0], requires_grad=True)
    # inside the window |pre - theta| < eps/2 (first two, above and below), outside it, and a second latent
    pre = torch.tensor([[1.04, 0.97, 1.3, 0.5, 2.01]], requires_grad=True)
    upstream = torch.tensor([[2.0, 3.0, 5.0, 7.0, 11.0]])
    codes = _JumpReLU.apply(pre, threshold, eps)
    assert torch.equal(codes.detach(), torch.tensor([[1.04, 0.0, 1.3, 0.0, 2.01]]))
    codes.backward(upstream)
    inside = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(threshold.grad, -(threshold.detach() / eps) * inside * upstream[0])
    assert torch.allclose(pre.grad, upstream * (pre.detach() > threshold.detach()))
    threshold.grad = None
    pre.grad = None
    steps = _Step.apply(pre, threshold, eps)
    assert torch.equal(steps.detach(), torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]]))
    steps.backward(upstream)
    assert torch.allclose(threshold.grad, -(1.0 / eps) * inside * upstream[0])
    assert pre.grad is None  # H passes no gradient to the pre-activation


def test_jumprelu_l0_penalty_raises_thresholds_near_active_pre_activations():
    torch.manual_seed(0)
    cfg = TrainConfig(
        d_in=8,
        d_sae=16,
        total_tokens=64,
        batch_size=64,
        architecture="jumprelu",
        l0_coefficient=1.0,
        jumprelu_bandwidth=0.5,
    )
    sae = JumpReLUTrainingSAE(cfg)
    x = torch.randn(64, 8)
    sae.initialize(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec.zero_()  # no reconstruction gradient: only the L0 term moves the thresholds
    output = sae.training_forward(x, StepContext(step=0, total_steps=1))
    output.loss.backward()
    pre = sae.pre_activations(x).detach()
    theta = sae.log_threshold.exp().detach()
    near = ((pre - theta).abs() < cfg.arch.jumprelu_bandwidth / 2).sum(0).float()
    # d L0 / d log(theta) = theta * d L0 / d theta = -theta * (1/eps) * (# tokens in the window) / n_tokens
    expected = -theta * near / (cfg.arch.jumprelu_bandwidth * x.shape[0])
    assert torch.allclose(sae.log_threshold.grad, expected, atol=1e-5)
    assert bool((sae.log_threshold.grad[near > 0] < 0).all())  # descent raises those thresholds: fewer firings


class _WeakenedStart(SAETrainer):
    """Starts with half the latents' encoder columns shrunk, so they never make the top k: dead latents."""

    def _initialise(self, runs, inputs):
        super()._initialise(runs, inputs)
        for run in runs:
            with torch.no_grad():
                run.sae.W_enc[:, : run.cfg.width // 2] *= 0.02


def test_auxk_revives_dead_latents(tmp_path):
    data = SyntheticActivations(d_in=16, n_features=96, active_per_token=4, chunk_size=256, n_chunks=120, seed=2)
    held_out = data.sample(99_999, 2048)
    alive = {}
    for aux in (0.0, 1 / 32):
        cfg = TrainConfig(
            d_in=16,
            d_sae=64,
            k=4,
            total_tokens=256 * 120,
            batch_size=256,
            aux_coefficient=aux,
            dead_tokens=256 * 2,
            optimizer={"name": "adam", "lr": 3e-3},
        )
        sae = _WeakenedStart({"sae": cfg}, tmp_path / f"aux{aux}", single=True, progress=False).fit(data)["sae"].sae
        log = load_train_log(tmp_path / f"aux{aux}")
        assert log[3]["dead_frac"] >= 0.45  # the weakened half is dead early on
        _, densities = evaluate_reconstruction(sae, [held_out], return_densities=True)
        alive[aux] = float((densities[:32] > 0).float().mean())
    assert alive[0.0] < 0.2  # without AuxK they stay dead
    assert alive[1 / 32] > alive[0.0] + 0.4  # AuxK gives them a gradient and they come back


@pytest.mark.parametrize("optimizer", ["adam", "signum"])
def test_training_recovers_known_features(tmp_path, optimizer):
    """On synthetic data made of known directions, the frequent ones reappear as decoder rows."""
    data = SyntheticActivations(
        d_in=32, n_features=48, active_per_token=3, chunk_size=512, n_chunks=250, noise=0.02, seed=4
    )
    cfg = TrainConfig(d_in=32, d_sae=96, k=3, total_tokens=512 * 250, batch_size=512, optimizer={"name": optimizer})
    sae = train_sae(cfg, data, tmp_path, progress=False).sae
    decoder = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    best = (data.directions @ decoder.T).max(dim=1).values  # each true feature's closest decoder row
    frequent = data.frequencies.argsort(descending=True)[:24]
    recovered = float((best[frequent] > 0.9).float().mean())
    assert recovered >= 0.75, best[frequent]
