"""Steer toward a description: from a phrase ("talk like a pirate") to the features that make the model do it.

1. Candidates. With a feature database: its label search for the phrase (words and meaning,
   all-MiniLM-L6-v2 embeddings, fused) plus the features most specific to the phrase and the reference
   texts (`features_for_examples`, against the database's corpus baseline). Without one: the features whose
   mean activation on the phrase and references most exceeds theirs on a few neutral sentences.
2. Ranking by output effect: each candidate is added (x + v d_i at every position, v = `scale` x its max
   activation) while the model reads a neutral context followed by each reference text; its gain is the
   mean gain in log-probability per reference token over the unsteered model. The score is that gain minus
   the same gain on a few neutral sentences when that one is positive: a feature that makes text matching
   the phrase more likely scores high, whatever its label says, while one that makes any fluent text (or
   one frequent token) more likely gains on the neutral sentences too and does not. A loss on the neutral
   sentences is not credited: it would reward adds that break all text but break the references less.
   The add is `scale` = 2x the feature's max activation by default: at 4x most features already make every
   text less likely, and the ranking then favours the least destructive feature, not the most relevant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import MonoscopeError
from ..model import edit, last_logits, token_logprobs
from ..sae.io import sae_hook_point
from .concepts import mean_activations_and_codes
from .steering import check_sae_fits

DEFAULT_CONTEXT = "Here is what I have to say:\n"


@dataclass
class Suggestion:
    feature: int
    score: float  # gain - max(neutral_gain, 0): how much more the feature favours the references than any text
    source: str  # search (label search) / examples (specific to the texts) / activation (no database)
    label: str | None = None
    value: float = 0.0  # the add value used for scoring
    gain: float = 0.0  # mean log-prob gain per reference token when the feature is added
    neutral_gain: float = 0.0  # the same on NEUTRAL_TEXTS

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


NEUTRAL_TEXTS = (
    "The meeting is scheduled for Tuesday afternoon.",
    "Please find the attached document.",
    "It was a day like any other.",
    "The function returns a list of values.",
)


@torch.inference_mode()
def _activation_candidates(lm: Any, sae: Any, hook: str, texts: Sequence[str], n: int) -> list[tuple[int, float]]:
    """Features more active on `texts` than on neutral text (mean activation per token, difference)."""
    gap = (
        mean_activations_and_codes(lm, sae, hook, texts)[1]
        - mean_activations_and_codes(lm, sae, hook, NEUTRAL_TEXTS)[1]
    )
    order = torch.argsort(gap, descending=True)[:n]
    return [(int(i), float(gap[i])) for i in order if gap[i] > 0]


@torch.inference_mode()
def _reference_logprob(lm: Any, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Sum of log p(token) over positions >= start of each row: [B]."""
    n = ids.shape[1] - start  # positions start-1 .. T-2 predict the reference's tokens: the LM head runs on those only
    logits = last_logits(lm.model, ids, n + 1)[:, :-1]
    return token_logprobs(logits, ids[:, start:]).sum(1)


def output_effect(
    lm: Any,
    sae: Any,
    hook: str,
    values: dict[int, float],
    references: Sequence[str],
    *,
    context: str = DEFAULT_CONTEXT,
    chunk: int = 16,
) -> dict[int, float]:
    """For each feature f: mean over `references` of the log-prob gain per token of the reference (read after
    `context`) when values[f] * W_dec[f] is added at `hook` at every position."""
    tok = lm.tokenizer
    ctx_ids = tok(context or "\n", return_tensors="pt").input_ids[0]
    rows = []
    for ref in references:
        ref_ids = tok(ref, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if len(ref_ids) == 0:
            continue
        rows.append(torch.cat([ctx_ids, ref_ids]).unsqueeze(0).to(lm.device))
    if not rows:
        raise MonoscopeError("no reference text to score features with")
    start = max(1, len(ctx_ids))
    n_tokens = torch.tensor([r.shape[1] - start for r in rows], dtype=torch.float32).clamp_min(1)

    base = (
        torch.stack([_reference_logprob(lm, r, start) for r in rows]).flatten().cpu()
    )  # each reference on its own: no padding
    feats = list(values)
    out: dict[int, float] = {}
    for lo in range(0, len(feats), chunk):  # one forward per reference for a chunk of candidates, one per row
        group = feats[lo : lo + chunk]
        push = torch.stack([values[f] * sae.W_dec[f].detach().float() for f in group])  # [n, d]

        def add(x: torch.Tensor, push: torch.Tensor = push) -> torch.Tensor:
            return x + push.to(device=x.device, dtype=x.dtype).unsqueeze(1)

        with edit(lm.model, {hook: add}):
            gains = torch.stack(
                [_reference_logprob(lm, r.expand(len(group), -1), start) for r in rows], 1
            ).cpu()  # [n, refs]
        for f, gain in zip(group, gains):
            out[int(f)] = float(((gain - base) / n_tokens).mean())
    return out


def candidate_features(
    lm: Any,
    sae: Any,
    phrase: str,
    texts: Sequence[str],
    *,
    db: Any = None,
    candidates: int = 24,
    hook: str,
    search_mode: str = "hybrid",
) -> dict[int, Suggestion]:
    """Candidate features for `phrase` (score 0): with a database, its search for the phrase and the features most
    specific to `texts` (the phrase, references, ...); without one, the features more active on `texts` than
    on neutral sentences. `db` is a `FeatureDB` (already checked against the SAE) or None."""
    pool: dict[int, Suggestion] = {}
    if db is not None:
        for f, _ in db.search(phrase, top=candidates, mode=search_mode):
            pool.setdefault(f, Suggestion(f, 0.0, "search"))
        from ..features.search import features_for_examples

        for hit in features_for_examples(list(texts), sae=sae, loaded=lm, hook=hook, store=db.store, limit=candidates):
            pool.setdefault(hit.feature_id, Suggestion(hit.feature_id, 0.0, "examples"))
    else:
        for f, _ in _activation_candidates(lm, sae, hook, list(texts), candidates):
            pool.setdefault(f, Suggestion(f, 0.0, "activation"))
    return pool


def suggest_features(
    lm: Any,
    sae: Any,
    phrase: str,
    *,
    references: Sequence[str] = (),
    db: Any = None,
    top: int = 10,
    candidates: int = 24,
    scale: float = 2.0,
    context: str = DEFAULT_CONTEXT,
    hook: str | None = None,
    max_activations: dict[int, float] | None = None,
    search_mode: str = "hybrid",
) -> list[Suggestion]:
    """Features to steer with so the model moves toward `phrase`, best first (see the module docstring).

    `references`: short texts that would match the phrase (the phrase itself is always one). `db`: a
    `FeatureDB` or features.db path for search and labels. `scale`: the add value per candidate, as a
    multiple of its max activation (estimated when there is no database).
    """
    from .featuredb import FeatureDB, estimate_max_activations

    phrase = (phrase or "").strip()
    if not phrase:
        raise MonoscopeError("the description is empty; say what to steer toward, e.g. 'talk like a pirate'")
    hook = hook or sae_hook_point(sae)
    if hook is None:
        raise MonoscopeError("the SAE does not say which hook point it reads; pass --hook")
    check_sae_fits(sae, lm.model, hook, lm)
    if db is not None and not isinstance(db, FeatureDB):
        db = FeatureDB(db)
    if db is not None:
        db.check_fits(sae)
    refs = [phrase, *[r for r in references if r and r.strip()]]
    pool = candidate_features(lm, sae, phrase, refs, db=db, candidates=candidates, hook=hook, search_mode=search_mode)
    if not pool:
        return []

    feats = sorted(pool)
    maxima = dict(max_activations or {})
    missing = [f for f in feats if f not in maxima]
    if missing and db is not None:
        maxima.update(db.max_activations(missing))
        missing = [f for f in feats if f not in maxima]
    if missing:
        maxima.update(estimate_max_activations(lm, sae, hook, missing))

    values = {f: scale * max(maxima.get(f, 0.0), 1e-6) for f in feats}
    gains = output_effect(lm, sae, hook, values, refs, context=context)
    neutral = output_effect(lm, sae, hook, values, NEUTRAL_TEXTS, context=context)
    for f in feats:
        found = pool[f]
        found.value, found.gain, found.neutral_gain = values[f], gains[f], neutral[f]
        found.score = gains[f] - max(neutral[f], 0.0)
    if db is not None:
        for f, label in db.labels(feats).items():
            pool[f].label = label
    ranked = sorted(pool.values(), key=lambda s: s.score, reverse=True)
    return ranked[: max(1, int(top))]
