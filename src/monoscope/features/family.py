"""Feature families across SAEs of the same model and hook point (Scaling Monosemanticity's feature splitting).

A feature of a small dictionary often splits into several features of a wider one (San Francisco -> the
Golden Gate Bridge, its fog, its history). Its family in another SAE is found two ways:

- decoder cosine: the directions the two features write into the residual stream (no model needed);
- co-activation (with the source SAE's feature database): the Pearson correlation of the two features'
  activations on the analysed tokens the database keeps for the feature (its top, quantile and random
  contexts), so a match must fire where the feature fires and stay quiet where it is quiet.

Matches are sorted by decoder cosine, best first; the candidates are the best by either measure.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from ..errors import MonoscopeError
from ..sae import SAE
from ..sae.io import sae_hook_point, sae_model_name
from .store import FeatureStore, default_db_path

if TYPE_CHECKING:
    from ..model import LoadedModel


@dataclass
class FamilyMatch:
    feature: int
    cosine: float  # of the two decoder directions
    coactivation: float | None = None  # Pearson r on the analysed tokens (None without a database)
    label: str | None = None
    density: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FamilyInSAE:
    sae: str
    d_sae: int
    matches: list[FamilyMatch] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"sae": self.sae, "d_sae": self.d_sae, "matches": [m.to_dict() for m in self.matches]}


@dataclass
class Family:
    feature: int
    sae: str
    label: str | None
    across: list[FamilyInSAE]
    coactivation_tokens: int = 0  # tokens the co-activations were measured on (0: decoder cosine only)

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "sae": self.sae,
            "label": self.label,
            "coactivation_tokens": self.coactivation_tokens,
            "across": [a.to_dict() for a in self.across],
        }


def unit_decoder(sae: SAE) -> Tensor:
    w = sae.W_dec.detach().float()
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def check_same_space(source: SAE, other: SAE, source_name: str, other_name: str) -> None:
    """Two SAEs can be compared feature by feature only if they read the same activations."""
    if source.cfg.d_in != other.cfg.d_in:
        raise MonoscopeError(
            f"{other_name} reads d_in={other.cfg.d_in} activations but {source_name} reads d_in={source.cfg.d_in}; "
            "a family lives in SAEs of the same model and hook point"
        )
    hooks = (sae_hook_point(source), sae_hook_point(other))
    if None not in hooks and hooks[0] != hooks[1]:
        raise MonoscopeError(
            f"{other_name} reads {hooks[1]} but {source_name} reads {hooks[0]}; a family lives in SAEs of the same hook point"
        )
    models = (sae_model_name(source), sae_model_name(other))
    if None not in models and models[0] != models[1]:
        raise MonoscopeError(
            f"{other_name} was trained on {models[1]} but {source_name} on {models[0]}; a family lives in SAEs of the same model"
        )


def decoder_cosines(source: SAE, feature: int, other: SAE) -> Tensor:
    """[other.d_sae] cosine of `feature`'s decoder direction with every decoder direction of `other`."""
    row = unit_decoder(source)[feature]
    return unit_decoder(other) @ row


def analysed_contexts(store: FeatureStore, feature: int, limit: int = 64) -> list[int]:
    """Context ids the database keeps for `feature`: where it fires most, across its range, and where it does not."""
    seen: list[int] = []
    for ex in store.examples(feature, kind=None):
        if ex.context not in seen:
            seen.append(ex.context)
        if len(seen) >= limit:
            break
    return seen


@torch.inference_mode()
def activations_on_contexts(
    loaded: LoadedModel,
    hook: str,
    store: FeatureStore,
    contexts: Sequence[int],
    saes: Sequence[SAE],
) -> list[Tensor]:
    """Codes [tokens, d_sae] of each SAE on the stored contexts (the first position of each left out)."""
    from ..model import run_to

    out: list[list[Tensor]] = [[] for _ in saes]
    for context in contexts:  # contexts may differ in length: one at a time, no padding
        ids = torch.as_tensor(store.context_tokens(context), dtype=torch.long).unsqueeze(0).to(loaded.device)
        x = run_to(loaded.model, [hook], ids)[hook][0, 1:]
        for i, sae in enumerate(saes):
            out[i].append(sae.encode(x.to(sae.device, sae.dtype)).float().cpu())
    return [torch.cat(parts) if parts else torch.zeros(0, sae.cfg.d_sae) for parts, sae in zip(out, saes)]


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Correlation of a [n] with each column of b [n, m] (0 where either is constant)."""
    a = a - a.mean()
    b = b - b.mean(0, keepdim=True)
    denom = a.norm() * b.norm(dim=0)
    return torch.where(denom > 0, (a @ b) / denom.clamp_min(1e-12), torch.zeros_like(denom))


def feature_family(
    source: SAE,
    feature: int,
    others: Sequence[tuple[str, SAE]],
    *,
    source_name: str = "",
    top: int = 5,
    store: FeatureStore | None = None,
    other_stores: Sequence[FeatureStore | None] | None = None,
    loaded: LoadedModel | None = None,
    hook: str | None = None,
) -> Family:
    """The closest features of `feature` (of `source`) in each SAE of `others` ([(name, SAE)]).

    With `store` (the source's database) and `loaded` (the model), co-activation on the database's contexts
    for the feature is measured too; `other_stores` give the matches' labels and densities.
    """
    if not 0 <= int(feature) < source.cfg.d_sae:
        raise MonoscopeError(
            f"feature {feature} does not exist: {source_name or 'the SAE'} has {source.cfg.d_sae} features (0-{source.cfg.d_sae - 1})"
        )
    if not others:
        raise MonoscopeError("give at least one other SAE to look for the family in (--across DIR)")
    if top < 1:
        raise MonoscopeError(f"--top must be at least 1, got {top}")
    feature = int(feature)
    for name, other in others:
        check_same_space(source, other, source_name or "the source SAE", name)

    coacts: list[Tensor | None] = [None] * len(others)
    n_tokens = 0
    if store is not None and loaded is not None:
        contexts = analysed_contexts(store, feature)
        if contexts:
            codes = activations_on_contexts(
                loaded, hook or sae_hook_point(source) or "", store, contexts, [source, *[o for _, o in others]]
            )
            mine = codes[0][:, feature]
            n_tokens = int(mine.numel())
            coacts = [pearson(mine, c) for c in codes[1:]]

    across = []
    for i, (name, other) in enumerate(others):
        cos = decoder_cosines(source, feature, other)
        picked = set(torch.topk(cos, min(top, cos.numel())).indices.tolist())
        coact = coacts[i]
        if coact is not None:
            picked |= set(torch.topk(coact, min(top, cos.numel())).indices.tolist())
        ranked = sorted(picked, key=lambda j: float(cos[j]), reverse=True)
        ostore = other_stores[i] if other_stores and i < len(other_stores) else None
        records = {r.id: r for r in ostore.features(ranked)} if ostore is not None else {}
        matches = [
            FamilyMatch(
                int(j),
                round(float(cos[j]), 4),
                None if coact is None else round(float(coact[j]), 4),
                records[j].label if j in records else None,
                records[j].density if j in records else None,
            )
            for j in ranked
        ]
        across.append(FamilyInSAE(name, other.cfg.d_sae, matches))
    label = store.feature(feature).label if store is not None else None
    return Family(feature, source_name, label, across, n_tokens)


def open_store_if_any(sae_dir: str | os.PathLike) -> FeatureStore | None:
    path = default_db_path(sae_dir)
    return FeatureStore(path, sae_dir=sae_dir) if path.is_file() else None
