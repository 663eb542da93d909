"""Sparse encoder and decoder products for SAEs whose codes have few active latents per token.

A TopK SAE with d_sae latents and k active per token only needs k decoder rows and k encoder columns per
token. Autograd on dense codes would do two more full [batch, d_in] x [d_in, d_sae] GEMMs in the backward
pass (one for the encoder weights, one for the decoder weights) and the training step would cost about
three times the forward encoder GEMM. Here the active (token, latent) pairs are kept as a `SparsePattern`
and the two weight gradients become sparse-times-dense products over those pairs only, so the step costs
little more than the one dense GEMM that computes the pre-activations (which is needed to pick the top k).

Both products are custom autograd Functions:
- `gather_preacts`: the pre-activation values at the active pairs; its backward scatters the incoming
  gradient into the selected encoder columns (one sparse x dense product) and the encoder bias, and sends
  the decoder bias its share through the centring `x - b_dec` with one matrix-vector product.
- `sparse_decode`: sum of the active decoder rows weighted by their codes (an `embedding_bag`); its
  backward touches only the selected decoder rows (one sparse x dense product) and gets the code
  gradients by a sampled dense-dense product (SDDMM) on the same pattern.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F

# PyTorch warns once per process that sparse CSR support is "beta" (the kernels used here are stable):
# use up that one warning here, silently.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.sparse_csr_tensor(
        torch.zeros(2, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0), (1, 1)
    )


@dataclass
class SparsePattern:
    """The active (token, latent) pairs of a batch: `rows[n]` is the token, `cols[n]` the latent.

    Pairs are ordered by token (`row_ptr` delimits each token's pairs); within a token, `from_topk` keeps
    top-k's order. The CSR matrices handed to torch always have sorted column indices, as the format asks
    (some CUDA kernels assume it): `csr` sorts each token's pairs by latent, once, lazily, and `unsort` maps
    values given in that order back. The by-latent ordering needed for the weight gradients is also computed
    lazily, in the backward pass.
    """

    #: Ask torch to check every CSR matrix built here (sorted, in-range indices); tests turn it on.
    check_invariants: ClassVar[bool] = False

    rows: Tensor
    cols: Tensor
    n_rows: int
    n_cols: int
    row_ptr: Tensor
    per_row: int | None = None
    _by_col: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)
    _row_sorted: tuple[Tensor | None, Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_topk(cls, indices: Tensor, n_cols: int) -> "SparsePattern":
        """Pattern of a [n_rows, k] index tensor (k latents per token, as TopK produces)."""
        n_rows, k = indices.shape
        device = indices.device
        rows = torch.arange(n_rows, device=device).repeat_interleave(k)
        row_ptr = torch.arange(0, n_rows * k + 1, k, device=device)
        return cls(rows, indices.reshape(-1), n_rows, n_cols, row_ptr, per_row=k)

    @classmethod
    def from_coo(cls, rows: Tensor, cols: Tensor, n_rows: int, n_cols: int) -> "SparsePattern":
        """Pattern of pairs already sorted by (row, col) (token, then latent)."""
        counts = torch.bincount(rows, minlength=n_rows)
        row_ptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
        row_ptr[1:] = counts.cumsum(0)
        return cls(rows, cols, n_rows, n_cols, row_ptr)

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    def by_col(self) -> tuple[Tensor, Tensor, Tensor]:
        """(permutation sorting pairs by latent, col_ptr [n_cols + 1], rows in that order)."""
        if self._by_col is None:
            # Stable (tokens stay in order within a latent) and on int32 keys, which torch sorts ~100x
            # faster than int64 ones on CPU.
            keys = self.cols.to(torch.int32) if self.n_cols < 2**31 else self.cols
            order = torch.argsort(keys, stable=True)
            counts = torch.bincount(self.cols, minlength=self.n_cols)
            col_ptr = torch.zeros(self.n_cols + 1, dtype=torch.int64, device=self.cols.device)
            col_ptr[1:] = counts.cumsum(0)
            self._by_col = (order, col_ptr, self.rows[order])
        return self._by_col

    def row_sorted(self) -> tuple[Tensor | None, Tensor]:
        """(permutation putting each token's pairs in increasing latent order, or None if they are; sorted cols)."""
        if self._row_sorted is None:
            if self.per_row is None or self.per_row == 1:
                self._row_sorted = (None, self.cols)
            else:
                sorted_cols, order = self.cols.view(self.n_rows, self.per_row).sort(dim=1)
                offsets = torch.arange(0, self.nnz, self.per_row, device=self.cols.device).unsqueeze(1)
                self._row_sorted = ((order + offsets).reshape(-1), sorted_cols.reshape(-1))
        return self._row_sorted

    def csr(self, values: Tensor) -> Tensor:
        """[n_rows, n_cols] CSR matrix holding `values` (given in pattern order) at the pattern."""
        order, cols = self.row_sorted()
        return torch.sparse_csr_tensor(
            self.row_ptr,
            cols,
            values if order is None else values[order],
            (self.n_rows, self.n_cols),
            check_invariants=self.check_invariants,
        )

    def unsort(self, csr_values: Tensor) -> Tensor:
        """Values of a `csr` matrix (sorted order) back in pattern order."""
        order, _ = self.row_sorted()
        if order is None:
            return csr_values
        out = torch.empty_like(csr_values)
        out[order] = csr_values
        return out

    def csr_transposed(self, values: Tensor) -> Tensor:
        """[n_cols, n_rows] CSR matrix holding `values` (given in token order) at the transposed pattern."""
        order, col_ptr, rows_by_col = self.by_col()
        return torch.sparse_csr_tensor(  # rows stay in increasing order within a latent: the sort is stable
            col_ptr, rows_by_col, values[order], (self.n_cols, self.n_rows), check_invariants=self.check_invariants
        )


class _GatherPreacts(torch.autograd.Function):
    """values[n] = x_centered[rows[n]] . W_enc[:, cols[n]] + b_enc[cols[n]], with a sparse backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        values: Tensor,
        x: Tensor,
        x_centered: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor | None,
        pattern: SparsePattern,
    ) -> Tensor:
        ctx.pattern = pattern
        ctx.has_b_dec = b_dec is not None
        ctx.save_for_backward(x_centered, W_enc)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_centered, W_enc = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad = grad.to(W_enc.dtype)
        _, need_x, _, need_w, need_b_enc, need_b_dec, _ = ctx.needs_input_grad
        grad_x = grad_w = grad_b_enc = grad_b_dec = None
        if need_w:
            # [d_sae, d_in] = G^T @ x_centered, touching only the selected latents' rows.
            grad_w = torch.sparse.mm(pattern.csr_transposed(grad), x_centered.to(W_enc.dtype)).T
        if need_b_enc or need_b_dec or need_x:
            per_latent = torch.zeros(pattern.n_cols, dtype=grad.dtype, device=grad.device)
            per_latent.index_add_(0, pattern.cols, grad)
            if need_b_enc:
                grad_b_enc = per_latent
            if need_b_dec and ctx.has_b_dec:
                # x_centered = x - b_dec for every token, so b_dec gets minus the sum over tokens of the
                # input gradient: -W_enc @ (per-latent sum of G). One matrix-vector product.
                grad_b_dec = -(W_enc @ per_latent)
        if need_x:
            grad_x = torch.sparse.mm(pattern.csr(grad), W_enc.T)
        return None, grad_x, None, grad_w, grad_b_enc, grad_b_dec, None


def gather_preacts(
    values: Tensor,
    x: Tensor,
    x_centered: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    pattern: SparsePattern,
) -> Tensor:
    """Differentiable pre-activations at `pattern`, given their already computed `values` (no grad).

    `x_centered` is `x - b_dec` (or `x` when the SAE does not centre its input, then `b_dec` is None).
    Gradients flow to `W_enc` (selected columns only), `b_enc`, `b_dec` and, if it requires grad, `x`.
    """
    return _GatherPreacts.apply(values.detach(), x, x_centered.detach(), W_enc, b_enc, b_dec, pattern)  # type: ignore[no-any-return]


class _SparseDecode(torch.autograd.Function):
    """out[t] = sum over pairs n of token t of values[n] * W_dec[cols[n]] (no bias), sparse backward."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, W_dec: Tensor, pattern: SparsePattern) -> Tensor:  # type: ignore[override]
        ctx.pattern = pattern
        ctx.save_for_backward(values, W_dec)
        values = values.to(W_dec.dtype)
        if pattern.per_row is not None:
            return F.embedding_bag(
                pattern.cols.view(pattern.n_rows, pattern.per_row),
                W_dec,
                per_sample_weights=values.view(pattern.n_rows, pattern.per_row),
                mode="sum",
            )
        return F.embedding_bag(
            pattern.cols,
            W_dec,
            offsets=pattern.row_ptr,
            per_sample_weights=values,
            mode="sum",
            include_last_offset=True,
        )

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        values, W_dec = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad_out = grad_out.to(W_dec.dtype).contiguous()
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            # grad_values[n] = W_dec[cols[n]] . grad_out[rows[n]]: (grad_out @ W_dec^T) sampled at the pattern.
            sampled = torch.sparse.sampled_addmm(
                pattern.csr(torch.zeros_like(values, dtype=W_dec.dtype)), grad_out, W_dec.T, beta=0.0
            )
            grad_values = pattern.unsort(sampled.values()).to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.sparse.mm(pattern.csr_transposed(values.to(W_dec.dtype)), grad_out)
        return grad_values, grad_w, None


def sparse_decode(values: Tensor, W_dec: Tensor, pattern: SparsePattern) -> Tensor:
    """Decoder output without bias for codes given as `values` at `pattern`; [n_rows, d_in]."""
    return _SparseDecode.apply(values, W_dec, pattern)  # type: ignore[no-any-return]
