"""SAE architectures at inference and the sparse kernels: shapes, sparse == dense, TopK sparsity, folding."""

from __future__ import annotations

import pytest
import torch

from monoscope.errors import MonoscopeError
from monoscope.sae import (
    JumpReLUSAE,
    ReLUSAE,
    SAEConfig,
    SparsePattern,
    TopKSAE,
    gather_preacts,
    geometric_median,
    sparse_decode,
)
from monoscope.sae.batchtopk import batch_topk


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: thread hand-offs cost more than the work, and the machine is shared.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_sae(cls, architecture: str, d_in: int = 16, d_sae: int = 64, k: int | None = 4, seed: int = 0):
    torch.manual_seed(seed)
    sae = cls(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k if architecture == "topk" else None))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae) * 0.3)
    return sae


ALL = [(TopKSAE, "topk"), (JumpReLUSAE, "jumprelu"), (ReLUSAE, "standard")]


@pytest.mark.parametrize("cls,architecture", ALL)
def test_shapes_and_leading_dimensions(cls, architecture):
    sae = random_sae(cls, architecture)
    assert sae.W_enc.shape == (16, 64) and sae.W_dec.shape == (64, 16)
    assert sae.b_enc.shape == (64,) and sae.b_dec.shape == (16,)
    x = torch.randn(3, 5, 16)
    codes = sae.encode(x)
    assert codes.shape == (3, 5, 64)
    assert sae.decode(codes).shape == (3, 5, 16)
    assert torch.allclose(sae(x), sae.decode(codes), atol=1e-5)
    flat = sae.encode(x.reshape(15, 16))
    assert torch.allclose(flat.reshape(3, 5, 64), codes)


def test_wrong_width_is_a_clear_error():
    sae = random_sae(TopKSAE, "topk")
    with pytest.raises(MonoscopeError, match="activations have d=12 but the SAE expects d_in=16"):
        sae.encode(torch.randn(4, 12))


def test_topk_l0_equals_k_and_encode_topk_matches_dense():
    sae = random_sae(TopKSAE, "topk", k=5)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every selected pre-activation positive, so exactly k fire
    x = torch.randn(200, 16)
    codes = sae.encode(x)
    assert torch.equal((codes > 0).sum(-1), torch.full((200,), 5))
    values, indices = sae.encode_topk(x)
    assert values.shape == indices.shape == (200, 5)
    assert torch.allclose(codes.gather(-1, indices), values)
    assert torch.all(values[:, :-1] >= values[:, 1:])  # sorted, largest first
    assert torch.allclose(sae.decode_topk(values, indices), sae.decode(codes), atol=1e-5)
    # the top-k choice is the k largest pre-activations
    pre = sae.pre_activations(x)
    assert torch.equal(torch.sort(indices, -1).values, torch.sort(pre.topk(5, -1).indices, -1).values)


def test_jumprelu_and_relu_activations():
    jump = random_sae(JumpReLUSAE, "jumprelu")
    x = torch.randn(50, 16)
    pre = jump.pre_activations(x)
    expected = torch.where(pre > jump.threshold, pre, torch.zeros_like(pre)).relu()
    assert torch.allclose(jump.encode(x), expected)
    relu = random_sae(ReLUSAE, "standard")
    assert torch.allclose(relu.encode(x), relu.pre_activations(x).relu())
    with pytest.raises(MonoscopeError, match="needs k"):
        relu.encode_topk(x)
    values, indices = relu.encode_topk(x, k=3)
    assert values.shape == (50, 3)


def _dense_reference(x, W_enc, b_enc, b_dec, W_dec, rows, cols, n_rows, n_cols):
    pre = (x - b_dec) @ W_enc + b_enc
    mask = torch.zeros(n_rows, n_cols, dtype=torch.bool)
    mask[rows, cols] = True
    codes = torch.where(mask, pre, torch.zeros_like(pre)).relu()
    return codes @ W_dec


@pytest.mark.parametrize("variable_per_row", [False, True])
def test_sparse_kernels_match_dense_values_and_gradients(variable_per_row, monkeypatch):
    monkeypatch.setattr(SparsePattern, "check_invariants", True)  # torch checks every CSR built (sorted columns)
    torch.manual_seed(1)
    B, D, S, K = 40, 12, 50, 4
    params = {
        "W_enc": torch.randn(S, D).T,  # [D, S] in the library's transposed layout
        "b_enc": torch.randn(S) * 0.1,
        "b_dec": torch.randn(D) * 0.1,
        "W_dec": torch.randn(S, D),
    }
    x0 = torch.randn(B, D)
    with torch.no_grad():
        pre = (x0 - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    if variable_per_row:
        rows, cols, selected = batch_topk(pre, K * B, per_row_cap=2 * K)
        pattern = SparsePattern.from_coo(rows, cols, B, S)
        assert pattern.row_ptr[-1] == K * B
    else:
        selected, indices = pre.topk(K, dim=-1)
        pattern = SparsePattern.from_topk(indices, S)
        selected = selected.reshape(-1)
    target = torch.randn(B, D)

    def run(sparse: bool):
        leaves = {name: value.clone().requires_grad_(True) for name, value in params.items()}
        x = x0.clone().requires_grad_(True)
        if sparse:
            values = gather_preacts(
                selected, x, (x - leaves["b_dec"]).detach(), leaves["W_enc"], leaves["b_enc"], leaves["b_dec"], pattern
            ).relu()
            out = sparse_decode(values, leaves["W_dec"], pattern)
        else:
            out = _dense_reference(
                x, leaves["W_enc"], leaves["b_enc"], leaves["b_dec"], leaves["W_dec"], pattern.rows, pattern.cols, B, S
            )
        ((out - target) ** 2).sum().backward()
        return out.detach(), {name: leaf.grad for name, leaf in leaves.items()}, x.grad

    out_sparse, grads_sparse, gx_sparse = run(True)
    out_dense, grads_dense, gx_dense = run(False)
    for csr in (pattern.csr(torch.ones(pattern.nnz)), pattern.csr_transposed(torch.ones(pattern.nnz))):
        crow, col = csr.crow_indices(), csr.col_indices()
        for r in range(crow.numel() - 1):
            assert bool((col[crow[r] + 1 : crow[r + 1]] > col[crow[r] : crow[r + 1] - 1]).all())
    assert torch.allclose(out_sparse, out_dense, atol=1e-4)
    for name in params:
        assert torch.allclose(grads_sparse[name], grads_dense[name], atol=1e-3, rtol=1e-4), name
    assert torch.allclose(gx_sparse, gx_dense, atol=1e-3, rtol=1e-4)


def test_batch_topk_selection_is_exact_even_when_one_row_dominates():
    torch.manual_seed(2)
    pre = torch.randn(30, 40)
    pre[3] += 100.0  # row 3 holds far more than the per-row cap of the batch's top entries
    rows, cols, values = batch_topk(pre, 60, per_row_cap=8)
    expected = pre.reshape(-1).topk(60).values
    assert torch.allclose(values.sort().values, expected.sort().values)
    assert torch.equal(pre[rows, cols], values)
    keys = rows * 40 + cols
    assert torch.all(keys[1:] > keys[:-1])  # sorted by (row, col)


@pytest.mark.parametrize("cls,architecture", ALL)
def test_folding_the_activation_scale_is_exact(cls, architecture):
    sae = random_sae(cls, architecture)
    x = torch.randn(30, 16)
    scale = 3.7
    expected_codes = sae.encode(x * scale)
    expected_out = sae(x * scale) / scale
    sae.fold_activation_scale(scale)
    assert torch.allclose(sae.encode(x), expected_codes, atol=1e-4)
    assert torch.allclose(sae(x), expected_out, atol=1e-4)


def test_geometric_median_resists_outliers():
    torch.manual_seed(3)
    points = torch.randn(500, 4) * 0.1 + torch.tensor([1.0, 2.0, 3.0, 4.0])
    points[:20] += 1000.0
    median = geometric_median(points, iters=20).float()
    assert torch.allclose(median, torch.tensor([1.0, 2.0, 3.0, 4.0]), atol=0.05)
    assert (points.mean(0) - median).norm() > 10


def test_bad_inference_configs_are_rejected():
    with pytest.raises(MonoscopeError, match="k must be between 1 and d_sae"):
        SAEConfig(d_in=8, d_sae=16, architecture="topk", k=16)
    with pytest.raises(MonoscopeError, match="unknown SAE architecture 'gated'"):
        SAEConfig(d_in=8, d_sae=16, architecture="gated")
    with pytest.raises(MonoscopeError, match="d_sae must be a positive integer"):
        SAEConfig(d_in=8, d_sae=0, architecture="standard")
