"""What the analysis pass accumulated, brought to the CPU as the rows the feature database stores.

`collect_statistics` and `collect_examples` read a finished `FeatureAccumulator` (and the scratch file of
context token ids the pass wrote); `decode_tokens` decodes the token ids the database will show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from .accumulate import ExampleSlots, FeatureAccumulator
from .store import ExampleRow, FeatureRow

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Statistics:
    """Per-feature statistics of the whole pass ([d_sae] tensors on the CPU)."""

    n_tokens: int  # tokens analysed (BOS excluded)
    n_contexts: int
    n_active: Tensor  # tokens each feature fired on
    n_active_contexts: Tensor  # contexts it fired in
    act_sum: Tensor  # float64 sums of its activations ...
    act_sumsq: Tensor  # ... and of their squares
    act_max: Tensor
    hist: Tensor  # [d_sae, HIST_BINS] counts of its non-zero activations
    unigram: Tensor  # [vocab] token counts of the analysed text

    @property
    def d_sae(self) -> int:
        return int(self.n_active.numel())

    @property
    def dead(self) -> list[bool]:
        """Whether each feature never fired."""
        return [int(n) == 0 for n in self.n_active.tolist()]

    def feature_rows(self) -> Iterator[FeatureRow]:
        n_active, act_sum = self.n_active, self.act_sum
        mean = torch.where(n_active > 0, act_sum / n_active.clamp_min(1), torch.full_like(act_sum, math.nan))
        mean_all = act_sum / max(1, self.n_tokens)
        std_all = (self.act_sumsq / max(1, self.n_tokens) - mean_all.square()).clamp_min(0).sqrt()
        for f in range(self.d_sae):
            active = int(n_active[f])
            yield (
                f,
                active,
                int(self.n_active_contexts[f]),
                active / max(1, self.n_tokens),
                None if active == 0 else float(mean[f]),
                float(self.act_max[f]),
                float(std_all[f]),
            )

    def histogram_rows(self) -> Iterator[tuple[int, int, bytes]]:
        """(feature, first occupied bin, int32 counts up to the last occupied bin) of the features that fired."""
        hist = self.hist.numpy()
        for f in range(self.d_sae):
            nz = np.flatnonzero(hist[f])
            if nz.size:
                yield (f, int(nz[0]), hist[f, nz[0] : nz[-1] + 1].astype("<i4").tobytes())


def collect_statistics(acc: FeatureAccumulator) -> Statistics:
    return Statistics(
        n_tokens=acc.n_tokens,
        n_contexts=acc.n_contexts,
        n_active=acc.n_active.cpu(),
        n_active_contexts=acc.n_active_contexts.cpu(),
        act_sum=acc.act_sum.cpu(),
        act_sumsq=acc.act_sumsq.cpu(),
        act_max=acc.act_max.cpu(),
        hist=acc.hist.cpu(),
        unigram=acc.unigram,
    )


def example_window(peak: int, left: int, right: int, body: int) -> tuple[int, int]:
    """(start, length) of the window around `peak`, inside positions 1..body."""
    start = max(1, peak - left)
    end = min(body, peak + right)
    return start, end - start + 1


@dataclass
class Examples:
    """Every feature's examples (on the CPU) and the token ids of the contexts they come from.

    Top examples: `top`, [d_sae, n_top] best first. Quantile examples: [d_sae, bins * per_quantile] slots, bin
    after bin (lowest first). Random (non-activating) examples: per feature, slots of the random context pool
    (`random_slot` where `random_valid`), each centred on `pool_centre`.
    """

    top: ExampleSlots
    quantile_context: Tensor  # [d_sae, bins * per_quantile], -1 where empty
    quantile_peak: Tensor
    quantile_value: Tensor
    quantile_acts: Tensor  # [d_sae, bins * per_quantile, window]
    per_quantile: int
    random_slot: Tensor  # [d_sae, n_random]
    random_valid: Tensor
    pool_context: Tensor  # [pool]
    pool_centre: Tensor
    contexts: np.ndarray  # [n_contexts, context_size] int32 token ids, BOS first
    window_left: int
    window_right: int

    @property
    def context_size(self) -> int:
        return int(self.contexts.shape[1])

    @property
    def body(self) -> int:
        """Positions 1..body of a context hold text (0 is BOS)."""
        return self.context_size - 1

    def random_slots(self, feature: int) -> list[int]:
        return self.random_slot[feature][self.random_valid[feature]].tolist()

    def slots(self, lo: int, hi: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(context, peak, value, acts) of features lo..hi's top then quantile slots, as one set per feature."""
        return (
            torch.cat([self.top.context[lo:hi], self.quantile_context[lo:hi]], 1),
            torch.cat([self.top.peak[lo:hi], self.quantile_peak[lo:hi]], 1),
            torch.cat([self.top.value[lo:hi], self.quantile_value[lo:hi]], 1),
            torch.cat([self.top.acts[lo:hi], self.quantile_acts[lo:hi]], 1),
        )

    def used_contexts(self) -> np.ndarray:
        """The ids of the contexts any example uses, sorted."""
        used = torch.cat(
            [
                self.top.context.flatten(),
                self.quantile_context.flatten(),
                self.pool_context[self.random_slot[self.random_valid]],
            ]
        )
        return torch.unique(used[used >= 0]).numpy()

    def context_rows(self, token_dtype: str) -> Iterator[tuple[int, bytes]]:
        for c in self.used_contexts():
            yield (int(c), self.contexts[c].astype(token_dtype).tobytes())

    def rows(self, acts_dtype: str) -> Iterator[ExampleRow]:
        """Each feature's top, quantile and random examples, with their windows' activations as `acts_dtype`."""
        left, right, body = self.window_left, self.window_right, self.body
        top = (
            self.top.context.numpy(),
            self.top.peak.numpy(),
            self.top.value.numpy(),
            self.top.acts.numpy().astype(acts_dtype),
        )
        quantile = (
            self.quantile_context.numpy(),
            self.quantile_peak.numpy(),
            self.quantile_value.numpy(),
            self.quantile_acts.numpy().astype(acts_dtype),
        )
        for f in range(top[0].shape[0]):
            yield from self._activating_rows(f, "top", *top, per_bin=None)
            yield from self._activating_rows(f, "quantile", *quantile, per_bin=self.per_quantile)
            for rank, s in enumerate(self.random_slots(f)):
                centre = int(self.pool_centre[s])
                start, length = example_window(centre, left, right, body)
                yield (f, "random", rank, None, int(self.pool_context[s]), start, length, centre, 0.0, None)

    def _activating_rows(
        self,
        f: int,
        kind: str,
        context: np.ndarray,
        peak: np.ndarray,
        value: np.ndarray,
        acts: np.ndarray,
        per_bin: int | None,
    ) -> Iterator[ExampleRow]:
        """The filled slots of feature f, ranked in slot order (quantile slots: bin = slot // per_bin)."""
        rank = 0
        for slot in range(context.shape[1]):
            c = int(context[f, slot])
            if c < 0:
                continue
            p = int(peak[f, slot])
            start, length = example_window(p, self.window_left, self.window_right, self.body)
            o = start - (p - self.window_left)
            yield (
                f,
                kind,
                rank,
                None if per_bin is None else slot // per_bin,
                c,
                start,
                length,
                p,
                float(value[f, slot]),
                acts[f, slot, o : o + length].tobytes(),
            )
            rank += 1


def collect_examples(
    acc: FeatureAccumulator,
    tokens_file: Path,
    context_size: int,
    *,
    quantile_bins: int,
    per_quantile: int,
    n_random: int,
) -> Examples:
    """Sort the accumulator's example slots best first, draw each feature's random examples, and map the
    scratch file of context token ids."""
    cpu = torch.device("cpu")
    d_sae, n_contexts = acc.d_sae, acc.n_contexts
    top = acc.top.to(cpu).sort()
    quantile = acc.quantile.to(cpu).sort()
    random_slot, random_valid = acc.draw_random(n_random)
    if n_contexts:
        contexts = np.memmap(tokens_file, dtype=np.int32, mode="c", shape=(n_contexts, context_size))
    else:
        contexts = np.zeros((0, context_size), np.int32)
    slots = quantile_bins * per_quantile
    return Examples(
        top=top,
        quantile_context=quantile.context.view(d_sae, slots),
        quantile_peak=quantile.peak.view(d_sae, slots),
        quantile_value=quantile.value.view(d_sae, slots),
        quantile_acts=quantile.acts.view(d_sae, slots, acc.window),
        per_quantile=per_quantile,
        random_slot=random_slot.cpu(),
        random_valid=random_valid.cpu(),
        pool_context=acc.pool.context.cpu(),
        pool_centre=acc.pool.centre.cpu(),
        contexts=contexts,
        window_left=acc.left,
        window_right=acc.right,
    )


@dataclass
class TokenTexts:
    """The decoded text of every token id the database shows (in a stored context or a logit effect)."""

    strings: dict[int, str]

    def text(self, token_id: int) -> str:
        return self.strings.get(int(token_id), f"<{int(token_id)}>")

    def window(self, contexts: np.ndarray, context: int, start: int, length: int) -> str:
        return "".join(self.text(t) for t in contexts[context, start : start + length])

    def rows(self) -> list[tuple[int, str]]:
        return sorted(self.strings.items())


def decode_tokens(tokenizer: PreTrainedTokenizerBase, examples: Examples, extra_ids: Iterable[Tensor]) -> TokenTexts:
    """Decode the tokens of every context an example uses, and the token ids in `extra_ids`."""
    used = examples.used_contexts()
    used_ids = np.unique(examples.contexts[used]) if used.size else np.zeros(0, np.int64)
    strings = dict(zip(used_ids.tolist(), tokenizer.batch_decode([[int(i)] for i in used_ids.tolist()])))
    for ids in extra_ids:
        missing = sorted(set(ids.flatten().tolist()) - set(strings))
        strings.update(zip(missing, tokenizer.batch_decode([[i] for i in missing])))
    return TokenTexts(strings)
