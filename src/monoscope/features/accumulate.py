"""Streaming per-feature bookkeeping for the analysis pass, on sparse codes only.

Each forward pass gives sparse codes (token, latent, value) for the active pairs only: k per token for a
TopK SAE (pre-activations in row chunks of at most 2^24 values, then top-k), the non-zeros of chunked dense
codes otherwise. From them, with scatter/index_add over the active pairs (per batch, nothing bigger than a
reused [contexts x d_sae] buffer of context maxima is touched):

- counts, sums and maxima per feature, and a histogram over fixed log-spaced bins (`HIST_EDGES`);
- per (feature, context) the context's max and its position: the candidates for examples;
- top-N contexts per feature by max activation (`ExampleSlots` keyed by value);
- B quantile bins x S examples per feature, uniform reservoir samples (`ExampleSlots` keyed by a random
  number) of contexts whose max falls in each bin: quantiles of the feature's distribution of per-context
  maxima, as estimated so far from a second log-binned histogram (of those maxima);
- a reservoir of random contexts with, for each, the set of features that fired anywhere in it, from which
  each feature later draws non-activating contexts.

Each kept example carries the feature's activation on every token of a window around its max (captured
from the same sparse codes when the example enters its slot), so no second pass is needed. The token ids of
every context go to a scratch file, from which the windows' tokens are cut after the pass.

Memory with the defaults (20 top, 5x3 quantile, 33-token windows): about 4 KB per feature, 0.4 GB at
d_sae = 100k (65 MB at 16k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..sae import SAE, TopKSAE

#: Histogram bin edges: 10 per decade from 1e-4 to 1e4 (80 bins); values below/above land in the end bins.
HIST_LOG10_LOW = -4.0
HIST_BINS_PER_DECADE = 10
HIST_BINS = 80
HIST_EDGES = [10 ** (HIST_LOG10_LOW + i / HIST_BINS_PER_DECADE) for i in range(HIST_BINS + 1)]

FP16_MAX = 65504.0
_DENSE_ELEMENTS = 1 << 24  # dense codes computed this many elements at a time for non-TopK SAEs


@dataclass
class SparseCodes:
    """Active codes of a batch of n rows, padded per row: `values`/`indices` [n, m] (a zero value is an empty
    slot), with the flat (token, latent, value) triples of the active entries alongside."""

    values: Tensor  # float32 [n, m]
    indices: Tensor  # int64 [n, m]
    token: Tensor  # int64 [nnz], row of each active entry (ascending)
    latent: Tensor  # int64 [nnz]
    value: Tensor  # float32 [nnz], > 0

    @classmethod
    def from_padded(cls, values: Tensor, indices: Tensor) -> "SparseCodes":
        values = values.float()
        mask = values > 0
        n, m = values.shape
        token = torch.arange(n, device=values.device).unsqueeze(1).expand(n, m)[mask]
        return cls(values, indices, token, indices[mask], values[mask])

    @classmethod
    def from_triples(cls, n: int, token: Tensor, latent: Tensor, value: Tensor) -> "SparseCodes":
        """From row-sorted triples (as torch.nonzero gives them)."""
        counts = torch.bincount(token, minlength=n)
        m = max(1, int(counts.max())) if token.numel() else 1
        slot = torch.arange(token.numel(), device=token.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        values = torch.zeros((n, m), device=value.device)
        indices = torch.zeros((n, m), dtype=torch.int64, device=value.device)
        values[token, slot] = value.float()
        indices[token, slot] = latent
        return cls(values, indices, token, latent, value.float())


def sparse_codes(sae: SAE, x: Tensor) -> SparseCodes:
    """Active codes of `x` [n, d_in]: exact for every architecture, without a dense matrix for TopK."""
    with torch.inference_mode():
        flat, _ = sae._flat_input(x)
        rows = max(1, _DENSE_ELEMENTS // sae.cfg.d_sae)  # bounds the [rows, d_sae] pre-activations in memory
        if isinstance(sae, TopKSAE):
            # TopKSAE.activation's own selection, without sorting the k values (encode_topk sorts them)
            parts = [
                sae.pre_activations(flat[lo : lo + rows]).topk(sae.k, dim=-1, sorted=False)
                for lo in range(0, flat.shape[0], rows)
            ]
            values = torch.cat([v for v, _ in parts]) if len(parts) > 1 else parts[0][0]
            indices = torch.cat([i for _, i in parts]) if len(parts) > 1 else parts[0][1]
            return SparseCodes.from_padded(values.relu_(), indices)
        if sae.cfg.architecture == "topk":
            values, indices = sae.encode_topk(flat)
            return SparseCodes.from_padded(values, indices)
        tokens, latents, vals = [], [], []
        for start in range(0, flat.shape[0], rows):
            codes = sae.activation(sae.pre_activations(flat[start : start + rows]))
            t, f = torch.nonzero(codes > 0, as_tuple=True)
            tokens.append(t + start)
            latents.append(f)
            vals.append(codes[t, f].float())
        return SparseCodes.from_triples(flat.shape[0], torch.cat(tokens), torch.cat(latents), torch.cat(vals))


def histogram_bins(values: Tensor) -> Tensor:
    bins = torch.floor((torch.log10(values.clamp_min(1e-30)) - HIST_LOG10_LOW) * HIST_BINS_PER_DECADE)
    return bins.clamp_(0, HIST_BINS - 1).long()


class ExampleSlots:
    """For each of `n_groups` groups, the `slots` best candidates by score, with value, context, peak position
    and the window of activations around the peak.

    Rows are unordered while streaming (a newcomer takes the place of an entry it pushes out, so nothing else
    moves); `sort()` orders every row best first at the end.
    """

    def __init__(self, n_groups: int, slots: int, window: int, device: torch.device):
        self.n_groups, self.slots, self.window = n_groups, slots, window
        self.score = torch.full((n_groups, slots), -math.inf, device=device)
        self.floor = torch.full((n_groups,), -math.inf, device=device)  # each row's smallest score
        self.value = torch.zeros((n_groups, slots), device=device)
        self.context = torch.full((n_groups, slots), -1, dtype=torch.int64, device=device)
        self.peak = torch.zeros((n_groups, slots), dtype=torch.int32, device=device)
        self.acts = torch.zeros((n_groups, slots, window), dtype=torch.float16, device=device)

    def offer(
        self,
        group: Tensor,
        score: Tensor,
        value: Tensor,
        context: Tensor,
        peak: Tensor,
        windows: Callable[[Tensor], Tensor],
    ) -> int:
        """Merge candidates; `windows(idx)` gives the activation windows [len(idx), window] of candidates idx,
        asked only for the candidates that end up in a slot. Returns how many did."""
        keep = score > self.floor[group]
        if not bool(keep.any()):
            return 0
        idx = torch.nonzero(keep, as_tuple=True)[0]
        # order by group, best score first within a group; keep the first `slots` of each group
        order = idx[torch.argsort(score[idx], descending=True, stable=True)]
        order = order[torch.argsort(group[order], stable=True)]
        groups, counts = torch.unique_consecutive(group[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=order.device) - torch.repeat_interleave(starts, counts)
        row = torch.repeat_interleave(torch.arange(groups.numel(), device=order.device), counts)
        first = rank < self.slots
        order, rank, row = order[first], rank[first], row[first]
        n_groups, s, dev = groups.numel(), self.slots, score.device
        c_score = torch.full((n_groups, s), -math.inf, device=dev)
        c_index = torch.zeros((n_groups, s), dtype=torch.int64, device=dev)
        c_score[row, rank] = score[order]
        c_index[row, rank] = order
        # the best `s` of old and new per group; newcomers replace the old entries that did not make it
        top_score, pick = torch.cat([self.score[groups], c_score], 1).topk(s, dim=1)
        new = (pick >= s) & (top_score > -math.inf)  # an empty candidate slot may tie with an empty slot
        kept = torch.zeros((n_groups, s + 1), dtype=torch.bool, device=dev)
        kept.scatter_(1, torch.where(pick < s, pick, torch.full_like(pick, s)), True)
        freed = ~kept[:, :s]
        # pair the k-th newcomer of a row with the k-th freed slot of that row
        free_rank = torch.cumsum(freed, 1) - 1
        fr, fc = torch.nonzero(freed, as_tuple=True)
        slot_table = torch.zeros((n_groups, s), dtype=torch.int64, device=dev)
        slot_table[fr, free_rank[fr, fc]] = fc
        nr, nc = torch.nonzero(new, as_tuple=True)
        new_rank = (torch.cumsum(new, 1) - 1)[nr, nc]
        target_group = groups[nr]
        target_slot = slot_table[nr, new_rank]
        cand = c_index[nr, pick[nr, nc] - s]
        self.score[target_group, target_slot] = score[cand]
        self.value[target_group, target_slot] = value[cand].float()
        self.context[target_group, target_slot] = context[cand]
        self.peak[target_group, target_slot] = peak[cand].int()
        self.acts[target_group, target_slot] = windows(cand)
        self.floor[groups] = self.score[groups].min(1).values
        return int(cand.numel())

    def sort(self) -> "ExampleSlots":
        """Order every row best first (empty slots last)."""
        order = self.score.argsort(dim=1, descending=True, stable=True)
        self.score = self.score.gather(1, order)
        self.value = self.value.gather(1, order)
        self.context = self.context.gather(1, order)
        self.peak = self.peak.gather(1, order)
        self.acts = self.acts.gather(1, order.unsqueeze(-1).expand(-1, -1, self.window))
        return self

    def to(self, device: torch.device | str) -> "ExampleSlots":
        for name in ("score", "floor", "value", "context", "peak", "acts"):
            setattr(self, name, getattr(self, name).to(device))
        return self


class RandomContextPool:
    """A uniform reservoir of `size` contexts; for each, which features fired anywhere in it and a random
    window centre. Features later draw their non-activating examples from the contexts they did not fire in."""

    def __init__(self, size: int, d_sae: int, device: torch.device):
        self.size = size
        self.key = torch.full((size,), -math.inf, device=device)
        self.context = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.centre = torch.zeros(size, dtype=torch.int32, device=device)
        self.fired = torch.zeros((size, d_sae), dtype=torch.bool, device=device)

    def offer(
        self,
        first_context: int,
        n_contexts: int,
        centre: Tensor,
        pair_latent: Tensor,
        pair_context: Tensor,
        generator: torch.Generator,
    ) -> None:
        if self.size == 0:
            return
        device = self.key.device
        keys = torch.rand(n_contexts, generator=generator, device=device)
        combined = torch.cat([self.key, keys])
        _, top = combined.topk(min(self.size, combined.numel()))
        kept_old = torch.zeros(self.size, dtype=torch.bool, device=device)
        kept_old[top[top < self.size]] = True
        entering = top[top >= self.size] - self.size  # local indices of new contexts
        if entering.numel() == 0:
            return
        free = torch.nonzero(~kept_old, as_tuple=True)[0][: entering.numel()]
        self.key[free] = keys[entering]
        self.context[free] = entering + first_context
        self.centre[free] = centre[entering].int()
        self.fired[free] = False
        slot_of = torch.full((n_contexts,), -1, dtype=torch.int64, device=device)
        slot_of[entering] = free
        slots = slot_of[pair_context]
        hit = slots >= 0
        self.fired[slots[hit], pair_latent[hit]] = True

    def draw(self, n_per_feature: int, generator: torch.Generator, chunk: int = 4096) -> tuple[Tensor, Tensor]:
        """(slot [d_sae, n], valid [d_sae, n]): for each feature, up to n pool contexts it never fired in."""
        d_sae = self.fired.shape[1]
        n = min(n_per_feature, self.size)
        device = self.key.device
        slots = torch.zeros((d_sae, n), dtype=torch.int64, device=device)
        valid = torch.zeros((d_sae, n), dtype=torch.bool, device=device)
        if n == 0:
            return slots, valid
        present = self.context >= 0
        for lo in range(0, d_sae, chunk):
            ok = (~self.fired[:, lo : lo + chunk]).T & present  # [c, size]
            r = torch.rand(ok.shape, generator=generator, device=device)
            r = torch.where(ok, r, torch.full_like(r, -1.0))
            best, pick = r.topk(n, dim=1)
            slots[lo : lo + chunk] = pick
            valid[lo : lo + chunk] = best >= 0
        return slots, valid


class FeatureAccumulator:
    """Everything the analysis pass keeps per feature; `update` once per forward pass."""

    def __init__(
        self,
        d_sae: int,
        *,
        context_size: int,
        n_top: int,
        quantile_bins: int,
        per_quantile: int,
        random_pool: int,
        window_left: int,
        window_right: int,
        device: torch.device,
        seed: int = 0,
    ):
        self.d_sae = d_sae
        self.context_size = context_size
        self.left, self.right = window_left, window_right
        self.window = window_left + window_right + 1
        self.quantile_bins = quantile_bins
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.n_tokens = 0
        self.n_contexts = 0
        self.n_active = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.n_active_contexts = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.act_sumsq = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.act_max = torch.zeros(d_sae, dtype=torch.float32, device=device)
        self.hist = torch.zeros((d_sae, HIST_BINS), dtype=torch.int32, device=device)
        self.context_hist = torch.zeros((d_sae, HIST_BINS), dtype=torch.int32, device=device)  # of per-context maxima
        self.top = ExampleSlots(d_sae, n_top, self.window, device)
        self.quantile = ExampleSlots(d_sae * quantile_bins, per_quantile, self.window, device)
        self.pool = RandomContextPool(random_pool, d_sae, device)
        self.unigram = torch.zeros(0, dtype=torch.int64)
        self._cell_max: Tensor | None = None
        self._cell_pos: Tensor | None = None

    # ------------------------------------------------------------------ per batch

    def update(self, codes: SparseCodes, token_ids: Tensor, n_contexts: int) -> None:
        """Fold in one forward pass: `codes` over its n_contexts x (context_size - 1) rows (BOS dropped),
        in the order the harvester flattens them (context-major)."""
        body = self.context_size - 1
        n_rows = n_contexts * body
        first_context = self.n_contexts
        dev = self.device
        tok, lat, val = codes.token.to(dev), codes.latent.to(dev), codes.value.to(dev)
        self.n_tokens += n_rows
        self.n_contexts += n_contexts
        ids = token_ids.reshape(-1).cpu()
        counts = torch.bincount(ids)
        if counts.numel() > self.unigram.numel():
            counts[: self.unigram.numel()] += self.unigram
            self.unigram = counts
        else:
            self.unigram[: counts.numel()] += counts
        if lat.numel() == 0:
            self._offer_pool(first_context, n_contexts, lat, lat)
            return

        self.n_active.index_add_(0, lat, torch.ones_like(lat))
        self.act_sum.index_add_(0, lat, val.double())
        self.act_sumsq.index_add_(0, lat, val.double().square())
        self.act_max.scatter_reduce_(0, lat, val, reduce="amax")
        bins = histogram_bins(val)
        self.hist.view(-1).index_add_(0, lat * HIST_BINS + bins, torch.ones_like(bins, dtype=torch.int32))

        # per (context, feature): the context's max and its first position, in dense per-batch buffers
        local = tok // body
        pos = tok % body + 1
        cell = local * self.d_sae + lat
        cmax, cpos = self._cells(n_contexts)
        cmax.scatter_reduce_(0, cell, val, reduce="amax")
        at_max = val == cmax[cell]
        cpos.scatter_reduce_(0, cell, torch.where(at_max, pos, torch.full_like(pos, self.context_size)), reduce="amin")
        pairs = torch.nonzero(cmax, as_tuple=True)[0]
        pair_max = cmax[pairs]
        pair_pos = cpos[pairs]
        cmax[pairs] = 0.0  # leave the buffers clean for the next batch
        cpos[pairs] = self.context_size
        pair_local = pairs // self.d_sae
        pair_lat = pairs % self.d_sae
        pair_ctx = pair_local + first_context
        self.n_active_contexts.index_add_(0, pair_lat, torch.ones_like(pair_lat))
        pair_bins = histogram_bins(pair_max)
        self.context_hist.view(-1).index_add_(
            0, pair_lat * HIST_BINS + pair_bins, torch.ones_like(pair_bins, dtype=torch.int32)
        )

        # activation windows, looked up in the batch's (latent, row) keys, sorted once when first needed
        lookup: dict[str, Tensor] = {}

        def windows(idx: Tensor) -> Tensor:
            if idx.numel() == 0:
                return torch.zeros((0, self.window), dtype=torch.float16, device=dev)
            if not lookup:
                lookup["key"], order = torch.sort(lat * n_rows + tok)
                lookup["val"] = val[order]
            sorted_key, sorted_val = lookup["key"], lookup["val"]
            # the feature's entries in the window's rows are one contiguous run of the sorted keys
            first_pos = pair_pos[idx] - self.left  # position of window slot 0
            row0 = pair_local[idx] * body - 1  # row of position 0 of the context (BOS is not a row)
            base = pair_lat[idx] * n_rows + row0
            lo = torch.searchsorted(sorted_key, base + first_pos.clamp(min=1))
            hi = torch.searchsorted(sorted_key, base + (pair_pos[idx] + self.right).clamp(max=body), right=True)
            n = (hi - lo).clamp_(min=0)
            owner = torch.repeat_interleave(torch.arange(idx.numel(), device=dev), n)
            entry = (
                torch.arange(owner.numel(), device=dev) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n) + lo[owner]
            )
            offset = sorted_key[entry] - base[owner] - first_pos[owner]
            out = torch.zeros((idx.numel(), self.window), device=dev)
            out[owner, offset] = sorted_val[entry]
            return out.clamp_(max=FP16_MAX).half()

        self.top.offer(pair_lat, pair_max, pair_max, pair_ctx, pair_pos, windows)

        qbin = self.quantile_bin(pair_lat, pair_max)
        keys = torch.rand(pairs.numel(), generator=self.generator, device=dev)
        self.quantile.offer(pair_lat * self.quantile_bins + qbin, keys, pair_max, pair_ctx, pair_pos, windows)

        self._offer_pool(first_context, n_contexts, pair_lat, pair_local)

    def _offer_pool(self, first_context: int, n_contexts: int, pair_lat: Tensor, pair_local: Tensor) -> None:
        body = self.context_size - 1
        lo = min(body, 1 + self.left)
        hi = max(lo, body - self.right)
        centre = torch.randint(lo, hi + 1, (n_contexts,), generator=self.generator, device=self.device)
        self.pool.offer(first_context, n_contexts, centre, pair_lat, pair_local, self.generator)

    def _cells(self, n_contexts: int) -> tuple[Tensor, Tensor]:
        """Zeroed per-batch [n_contexts * d_sae] buffers for context maxima and their positions (reused)."""
        size = n_contexts * self.d_sae
        if self._cell_max is None or self._cell_pos is None or self._cell_max.numel() < size:
            self._cell_max = torch.zeros(size, device=self.device)
            self._cell_pos = torch.full((size,), self.context_size, dtype=torch.int64, device=self.device)
        return self._cell_max[:size], self._cell_pos[:size]

    def quantile_bin(self, latent: Tensor, value: Tensor) -> Tensor:
        """Which of the B quantile bins a context max `value` falls in, under the feature's distribution of
        context maxima so far (its histogram, read as a CDF interpolated inside bins)."""
        present = torch.zeros(self.d_sae, dtype=torch.bool, device=self.device)
        present[latent] = True
        features = torch.nonzero(present, as_tuple=True)[0]
        row_of = torch.zeros(self.d_sae, dtype=torch.int64, device=self.device)
        row_of[features] = torch.arange(features.numel(), device=self.device)
        inverse = row_of[latent]
        rows = self.context_hist[features].float()  # [U, HIST_BINS]
        cum = torch.cumsum(rows, 1)
        b = histogram_bins(value)
        within = rows[inverse, b]
        below = cum[inverse, b] - within
        total = cum[inverse, -1].clamp_min(1.0)
        # position inside the bin on the log scale (values are taken as log-uniform within a bin)
        frac = ((torch.log10(value.clamp_min(1e-30)) - HIST_LOG10_LOW) * HIST_BINS_PER_DECADE - b).clamp_(0.0, 1.0)
        cdf = (below + frac * within) / total
        return (cdf * self.quantile_bins).floor().clamp_(0, self.quantile_bins - 1).long()

    def draw_random(self, n_per_feature: int) -> tuple[Tensor, Tensor]:
        return self.pool.draw(n_per_feature, self.generator)
