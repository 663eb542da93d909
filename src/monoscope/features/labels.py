"""Heuristic labels, offline, for every feature: what it fires on and what it promotes.

A label reads `' bridge', ' Golden' → ' Gate', ' Bridge'`: first the most characteristic tokens the
feature fires on, then (after the arrow) the tokens its decoder direction promotes most.

Concept labels (`shared_words`) read `ocean, sea, waves`: the English words that the feature's example windows
share (context words around the activation count, weighted by the activation), TF-IDF against the analysed
corpus. `monoscope analyze` makes both kinds of label from half of the examples, keeps the one whose
embedding tells those examples from random text best, and scores it on the other half (out of sample).

Characteristic tokens are scored like TF-IDF over the feature's stored examples (top and quantile windows):
tf(t) = the feature's activation on tokens t (each divided by the feature's max) as a share of all its
activation in the examples, idf(t) = log((N + 1) / (count(t) + 1)) with count(t) the token's frequency in
the analysed corpus (N tokens). Frequent filler tokens are discounted, and a feature that fires on one rare
token gets that token. Up to 3 tokens with a score of at least a quarter of the best are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Sequence

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .collect import Examples, Statistics, TokenTexts

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


# ---------------------------------------------------------------- concept labels: the words the examples share

#: Function words never make a concept label.
STOPWORDS = frozenset(
    """
a about above after again against all almost also although always am among an and another any anyone anything are
around as at away back be became because become been before being below between both but by came can cannot could
did do does doing done down during each either else enough even ever every few for from further get gets getting
give given go goes going gone got had has have having he her here hers herself him himself his how however i if in
into is it its itself just last least less let like made make makes many may me might more most much must my myself
never new next no nor not now of off often on once one only onto or other others our ours ourselves out over own
per perhaps rather really said same say says see seem seen shall she should since so some something still such
take than that the their theirs them themselves then there therefore these they thing things this those though
through thus to together too took two under until up upon us use used using very was way we well were what when
where whether which while who whom whose why will with within without would yet you your yours yourself yourselves
""".split()
)


def word_table(
    token_texts: "Sequence[str]", vocabulary: "Collection[str]", min_chars: int = 3
) -> tuple[Tensor, list[str]]:
    """Map token ids to words: a token that is a whole English word (`vocabulary`, lower case) after a space,
    not a function word, maps to that word's index; any other token to -1. Returns ([vocab] ids, words)."""
    words: dict[str, int] = {}
    table = torch.full((len(token_texts),), -1, dtype=torch.long)
    for tid, text in enumerate(token_texts):
        if not text or not text.startswith(" "):
            continue
        word = text[1:].lower()
        if len(word) < min_chars or not word.isalpha() or word in STOPWORDS or word not in vocabulary:
            continue
        table[tid] = words.setdefault(word, len(words))
    return table, list(words)


@torch.inference_mode()
def shared_words(
    token_ids: Tensor,
    weights: Tensor,
    token_word: Tensor,
    word_idf: Tensor,
    n: int = 3,
    min_windows: int = 2,
    min_window_share: float = 0.2,
    min_share: float = 0.3,
) -> list[list[int]]:
    """For each feature, up to n word ids its example windows share, best first.

    token_ids: [F, S, W] token ids of the windows (< 0: none); weights: [F, S] each window's weight (its
    activation / the feature's max; 0 leaves a window out). A word's score is the weight of the windows it
    appears in (once per window: context words around the activation count as much as the token that fires),
    as a share of all the windows' weight, times its idf; it must appear in at least `min_windows` windows and
    `min_window_share` of them, and score at least `min_share` x the best.
    """
    F, S, _ = token_ids.shape
    n_words = int(word_idf.numel())
    out: list[list[int]] = [[] for _ in range(F)]
    if n_words == 0:
        return out
    valid = token_ids >= 0
    words = torch.where(
        valid, token_word[token_ids.clamp_min(0).clamp_max(token_word.numel() - 1)], torch.full_like(token_ids, -1)
    )
    f_idx, s_idx, w_idx = torch.nonzero(words >= 0, as_tuple=True)
    if f_idx.numel() == 0:
        return out
    word = words[f_idx, s_idx, w_idx]
    # one entry per (feature, window, word)
    key = torch.unique((f_idx * S + s_idx) * n_words + word)
    fs, word = key // n_words, key % n_words
    f, s = fs // S, fs % S
    w = weights[f, s].double()
    keep = w > 0
    f, word, w = f[keep], word[keep], w[keep]
    pair, inverse = torch.unique(f * n_words + word, return_inverse=True)
    tf = torch.zeros(pair.numel(), dtype=torch.float64).index_add_(0, inverse, w)
    df = torch.zeros(pair.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(w))
    pf, pw = pair // n_words, pair % n_words
    total = weights.double().sum(1).clamp_min(1e-12)
    windows = (weights > 0).sum(1).double()
    score = tf / total[pf] * word_idf.double()[pw]
    ok = (df >= min_windows) & (df >= min_window_share * windows[pf]) & (score > 0)
    pf, pw, score = pf[ok], pw[ok], score[ok]
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(pf[order], stable=True)]
    best: dict[int, float] = {}
    for feature, wid, sc in zip(pf[order].tolist(), pw[order].tolist(), score[order].tolist()):
        top = best.setdefault(feature, sc)
        if len(out[feature]) < n and sc >= min_share * top:
            out[feature].append(wid)
    return out


# ---------------------------------------------------------------- the analysis step


@dataclass
class HeuristicLabels:
    """Each feature's token label and concept-label candidates (the words its examples share), and which of its
    examples made them: `making` [d_sae, top + quantile slots] marks the even top ranks and the even quantile
    slots whose context is not a scoring top example's; the other examples score the labels out of sample."""

    token_labels: list[str]
    shared: list[list[int]]  # word ids per feature, best first (empty without a word list)
    words: list[str]
    making: Tensor

    def options(self, feature: int) -> list[str]:
        """The labels to choose from: the token label, then the shared words and the best word alone."""
        options = [self.token_labels[feature]]
        if self.shared and self.shared[feature]:
            options.append(", ".join(self.words[w] for w in self.shared[feature]))
            if len(self.shared[feature]) > 1:
                options.append(self.words[self.shared[feature][0]])
        return options


def making_examples(examples: Examples) -> Tensor:
    """[d_sae, top + quantile slots]: the examples that make labels (see `HeuristicLabels`)."""
    top_context, quantile_context = examples.top.context, examples.quantile_context
    n_top = top_context.shape[1]
    scoring_top_ctx = top_context[:, 1::2]
    q_in_scoring = (quantile_context.unsqueeze(-1) == scoring_top_ctx.unsqueeze(1)).any(-1) & (quantile_context >= 0)
    making = torch.zeros(top_context.shape[0], n_top + quantile_context.shape[1], dtype=torch.bool)
    making[:, 0:n_top:2] = True
    making[:, n_top::2] = ~q_in_scoring[:, 0::2]
    return making


def _word_idf(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, words: Collection[str], unigram: Tensor, n_tokens: int
) -> tuple[Tensor, list[str], Tensor]:
    """(token -> word id table, the words, each word's idf over the analysed tokens)."""
    vocab_texts = tokenizer.batch_decode([[i] for i in range(vocab_size)])
    token_word, word_list = word_table(vocab_texts, words)
    counts_of_tokens = unigram.double()
    counts = torch.zeros(len(word_list), dtype=torch.float64)
    mapped = token_word[: counts_of_tokens.numel()] >= 0
    counts.index_add_(0, token_word[: counts_of_tokens.numel()][mapped], counts_of_tokens[mapped])
    return token_word, word_list, torch.log((n_tokens + 1.0) / (counts + 1.0))


def make_heuristic_labels(
    stats: Statistics,
    examples: Examples,
    texts: TokenTexts,
    promoted_ids: Tensor,
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    words: Collection[str] | None,
    chunk: int = 2048,
) -> HeuristicLabels:
    """Token labels from every feature's examples; with `words` (an English word list), token labels and
    concept-label candidates from the making half of the examples only."""
    d_sae, n_tokens = stats.d_sae, stats.n_tokens
    body, context_size = examples.body, examples.context_size
    offsets = torch.arange(-examples.window_left, examples.window_right + 1)
    making = making_examples(examples)
    concepts = None if words is None else _word_idf(tokenizer, vocab_size, words, stats.unigram, n_tokens)
    contexts = torch.from_numpy(np.asarray(examples.contexts))
    fire_tokens: list[list[int]] = []
    shared: list[list[int]] = []
    for lo in range(0, d_sae, chunk):
        ctx, peak, peak_value, acts = examples.slots(lo, lo + chunk)
        pos = peak.long().unsqueeze(-1) + offsets
        ok = (ctx.unsqueeze(-1) >= 0) & (pos >= 1) & (pos <= body)
        if contexts.shape[0]:
            toks = contexts[ctx.clamp_min(0).unsqueeze(-1).expand_as(pos), pos.clamp(0, context_size - 1)].long()
        else:
            toks = torch.zeros_like(pos)
        toks = torch.where(ok, toks, torch.full_like(toks, -1))
        fmax = stats.act_max[lo : lo + chunk]
        if concepts is None:
            fire_tokens.extend(characteristic_tokens(acts, toks, fmax, stats.unigram, n_tokens, n=3))
            continue
        token_word, _, word_idf = concepts
        part = making[lo : lo + chunk]
        fire_tokens.extend(characteristic_tokens(acts * part.unsqueeze(-1), toks, fmax, stats.unigram, n_tokens, n=3))
        peak_value = peak_value.float()
        weight = torch.where(
            (ctx >= 0) & part, peak_value / fmax.float().clamp_min(1e-12).unsqueeze(1), torch.zeros_like(peak_value)
        )
        shared.extend(shared_words(toks, weight, token_word, word_idf, n=3))
    dead = stats.dead
    token_labels = [
        format_label(
            [texts.text(t) for t in fire_tokens[f]], [texts.text(t) for t in promoted_ids[f, :3].tolist()], dead=dead[f]
        )
        for f in range(d_sae)
    ]
    return HeuristicLabels(token_labels, shared, concepts[1] if concepts is not None else [], making)
