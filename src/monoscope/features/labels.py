"""Heuristic labels, offline, for every feature: what it fires on and what it promotes.

A label reads `' bridge', ' Golden' → ' Gate', ' Bridge'`: first the most characteristic tokens the
feature fires on, then (after the arrow) the tokens its decoder direction promotes most.

Characteristic tokens are scored like TF-IDF over the feature's stored examples (top and quantile windows):
tf(t) = the feature's activation on tokens t (each divided by the feature's max) as a share of all its
activation in the examples, idf(t) = log((N + 1) / (count(t) + 1)) with count(t) the token's frequency in
the analysed corpus (N tokens). Frequent filler tokens are discounted, and a feature that fires on one rare
token gets that token. Up to 3 tokens with a score of at least a quarter of the best are kept.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MAX_TOKEN_CHARS = 24


def show_token(text: str) -> str:
    """A token as it appears in labels: quoted (so leading spaces show), newlines escaped, shortened."""
    if len(text) > MAX_TOKEN_CHARS:
        text = text[: MAX_TOKEN_CHARS - 1] + "…"
    return repr(text)


@torch.inference_mode()
def characteristic_tokens(
    acts: Tensor,
    token_ids: Tensor,
    max_act: Tensor,
    unigram: Tensor,
    total_tokens: int,
    n: int = 3,
    min_share: float = 0.25,
    chunk: int = 2048,
) -> list[list[int]]:
    """For each feature, up to n token ids by TF-IDF over its example windows.

    acts, token_ids: [d_sae, S, W] activations and token ids of the windows (token id < 0: outside a context).
    """
    d_sae = acts.shape[0]
    vocab = max(int(unigram.numel()), int(token_ids.max().item()) + 1 if token_ids.numel() else 1)
    counts = torch.zeros(vocab, dtype=torch.float64)
    counts[: unigram.numel()] = unigram.double()
    idf = torch.log((total_tokens + 1.0) / (counts + 1.0))
    out: list[list[int]] = [[] for _ in range(d_sae)]
    for lo in range(0, d_sae, chunk):
        a = acts[lo : lo + chunk].float()
        t = token_ids[lo : lo + chunk]
        scale = max_act[lo : lo + chunk].float().clamp_min(1e-12).view(-1, 1, 1)
        on = (a > 0) & (t >= 0)
        f_local, s_idx, w_idx = torch.nonzero(on, as_tuple=True)
        if f_local.numel() == 0:
            continue
        weight = (a / scale)[f_local, s_idx, w_idx].double()
        tok = t[f_local, s_idx, w_idx].long()
        key, inverse = torch.unique(f_local * vocab + tok, return_inverse=True)
        summed = torch.zeros(key.numel(), dtype=torch.float64).index_add_(0, inverse, weight)
        feat = key // vocab
        tokk = key % vocab
        total = torch.zeros(a.shape[0], dtype=torch.float64).index_add_(0, feat, summed)
        score = summed / total[feat].clamp_min(1e-12) * idf[tokk]
        order = torch.argsort(score, descending=True, stable=True)
        order = order[torch.argsort(feat[order], stable=True)]
        feats, cnt = torch.unique_consecutive(feat[order], return_counts=True)
        starts = torch.cumsum(cnt, 0) - cnt
        rank = torch.arange(order.numel()) - torch.repeat_interleave(starts, cnt)
        best = torch.repeat_interleave(score[order][starts], cnt)
        keep = (rank < n) & (score[order] >= min_share * best) & (score[order] > 0)
        for f, tk in zip(feat[order][keep].tolist(), tokk[order][keep].tolist()):
            out[lo + f].append(tk)
    return out


def format_label(fire_tokens: list[str], promoted: list[str], dead: bool = False) -> str:
    left = "(never fired)" if dead else (", ".join(show_token(t) for t in fire_tokens) or "(no clear token)")
    if promoted:
        return f"{left} → " + ", ".join(show_token(t) for t in promoted)
    return left


def heuristic_labels(
    acts: Tensor,
    token_ids: Tensor,
    max_act: Tensor,
    n_active: Tensor,
    unigram: Tensor,
    total_tokens: int,
    promoted_ids: Tensor | None,
    token_text: Callable[[int], str],
    *,
    n_tokens: int = 3,
    n_promoted: int = 3,
) -> list[str]:
    """One readable label per feature (see the module docstring)."""
    fire = characteristic_tokens(acts, token_ids, max_act, unigram, total_tokens, n=n_tokens)
    labels = []
    for f in range(acts.shape[0]):
        promoted = [] if promoted_ids is None else [token_text(int(t)) for t in promoted_ids[f, :n_promoted].tolist()]
        labels.append(format_label([token_text(t) for t in fire[f]], promoted, dead=int(n_active[f]) == 0))
    return labels
