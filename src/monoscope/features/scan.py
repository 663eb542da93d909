"""Which features fire on a text: per token, strongest first, with their labels.

The text is tokenised like the analysis contexts (BOS, then the text's tokens), the model runs to the SAE's
hook point and stops, and the SAE encodes every token but BOS (as in the analysis, BOS is left out).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import MonoscopeError
from ..model import LoadedModel, run_to
from ..sae import SAE
from .accumulate import SparseCodes, sparse_codes
from .store import FeatureRecord, FeatureStore


@dataclass
class FeatureHit:
    id: int
    activation: float
    label: str | None = None


@dataclass
class TokenFeatures:
    position: int  # position in the scanned sequence (0 is BOS, which is not scanned)
    token: str
    token_id: int
    features: list[FeatureHit]


@dataclass
class TopFeature:
    id: int
    max_activation: float
    n_tokens: int  # tokens it fired on
    position: int  # where it was strongest
    label: str | None = None
    density: float | None = None  # how often it fires in the analysed corpus


@dataclass
class ScanResult:
    text: str
    tokens: list[TokenFeatures]
    top: list[TopFeature]
    truncated: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenize_text(loaded: LoadedModel, text: str, max_tokens: int | None = None) -> tuple[torch.Tensor, bool]:
    """LongTensor [1, n] of BOS + the text's tokens, cut at `max_tokens` (the model's limit by default)."""
    from ..data.packing import special_ids

    if not text or not text.strip():
        raise MonoscopeError("the text to scan is empty")
    bos = special_ids(loaded.tokenizer)[0]
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise MonoscopeError("the text has no tokens")
    limit = (
        max_tokens
        or getattr(loaded.config, "max_position_embeddings", None)
        or getattr(loaded.config, "n_positions", None)
    )
    truncated = False
    if limit and len(ids) + 1 > int(limit):
        ids, truncated = ids[: int(limit) - 1], True
    return torch.tensor([[bos, *ids]], dtype=torch.long), truncated


def encode_text(
    sae: SAE, loaded: LoadedModel, hook: str, text: str, max_tokens: int | None = None
) -> tuple[list[int], SparseCodes, bool]:
    """(token ids without BOS, sparse codes over those tokens, whether the text was cut)."""
    ids, truncated = tokenize_text(loaded, text, max_tokens)
    acts = run_to(loaded.model, [hook], ids.to(loaded.device))[hook][0, 1:]
    return ids[0, 1:].tolist(), sparse_codes(sae, acts), truncated


def _labels(store: FeatureStore | None, ids: list[int]) -> dict[int, FeatureRecord]:
    if store is None or not ids:
        return {}
    return {r.id: r for r in store.features(sorted(set(ids)))}


def scan_text(
    text: str,
    *,
    sae: SAE,
    loaded: LoadedModel,
    hook: str | None = None,
    store: FeatureStore | None = None,
    top: int = 5,
    n_top_features: int = 20,
    max_tokens: int | None = None,
) -> ScanResult:
    """For each token, its `top` strongest features; and the `n_top_features` strongest features overall."""
    from ..sae.io import sae_hook_point

    hook = hook or sae_hook_point(sae)
    if hook is None:
        raise MonoscopeError("the SAE does not say which hook point it reads; pass hook=")
    if store is not None and store.n_features != sae.cfg.d_sae:
        raise MonoscopeError(
            f"the feature database {store.path} describes {store.n_features} features but the SAE has "
            f"{sae.cfg.d_sae}; re-run `monoscope analyze` for this SAE"
        )
    token_ids, codes, truncated = encode_text(sae, loaded, hook, text, max_tokens)
    tok, lat, val = codes.token.cpu(), codes.latent.cpu(), codes.value.cpu()
    # per token, strongest first
    order = torch.argsort(val, descending=True, stable=True)
    order = order[torch.argsort(tok[order], stable=True)]
    per_token: list[list[tuple[int, float]]] = [[] for _ in token_ids]
    for t, f, v in zip(tok[order].tolist(), lat[order].tolist(), val[order].tolist()):
        if len(per_token[t]) < top:
            per_token[t].append((f, v))
    # strongest overall
    overall: list[TopFeature] = []
    if lat.numel():
        feats, inverse = torch.unique(lat, return_inverse=True)
        best = torch.zeros(feats.numel()).scatter_reduce_(0, inverse, val, reduce="amax")
        counts = torch.bincount(inverse, minlength=feats.numel())
        at = torch.full((feats.numel(),), len(token_ids), dtype=torch.int64)
        at.scatter_reduce_(
            0, inverse, torch.where(val == best[inverse], tok, torch.full_like(tok, len(token_ids))), reduce="amin"
        )
        rank = torch.argsort(best, descending=True)[:n_top_features]
        overall = [TopFeature(int(feats[i]), float(best[i]), int(counts[i]), int(at[i]) + 1) for i in rank.tolist()]
    records = _labels(store, [f for hits in per_token for f, _ in hits] + [t.id for t in overall])
    strings = loaded.tokenizer.batch_decode([[i] for i in token_ids])
    tokens = [
        TokenFeatures(
            i + 1,
            strings[i],
            token_ids[i],
            [FeatureHit(f, v, getattr(records.get(f), "label", None)) for f, v in per_token[i]],
        )
        for i in range(len(token_ids))
    ]
    for item in overall:
        rec = records.get(item.id)
        if rec is not None:
            item.label, item.density = rec.label, rec.density
    notes = []
    if truncated:
        notes.append(f"the text was cut to {len(token_ids)} tokens (the model's limit)")
    if store is None:
        notes.append("no feature database: labels are missing (run `monoscope analyze`)")
    return ScanResult(text, tokens, overall, truncated, notes)
