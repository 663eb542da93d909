"""Steer toward a concept with what actually moves generation there: `plan_steering` behind `monoscope suggest`,
`monoscope steer --toward` and the UI's equalizer.

1. Targets. The model answers a few neutral chat prompts (`NEUTRAL_PROMPTS`) with "Talk about CONCEPT."
   prepended: its own fluent text about the concept. With the user's references (the concept's name is always
   one) they are what the candidates must make likely.
2. Candidates: `suggest.candidate_features`: the feature database's search for the concept (labels and what
   the features fire on) and the features most specific to the references and targets (without a database:
   the features more active on them than on neutral text). One fit ranks them all: non-negative weights over
   their decoder rows, learned so that the targets become likely (`learn_steering_vector` with a basis); a
   candidate's score is its share of the group (weight x decoder norm).
3. Options, each a vector added at the SAE's hook point, at all positions (the prompt too, its first token left
   alone) or at the prompt only (the model reads a prompt tilted toward the concept and then writes unsteered,
   which keeps it fluent: on the concept benchmark the option that most often wins), with its length set by a
   strength: the added vector's norm as a multiple of the hook's mean activation norm (`hook_norm`), so options
   of different kinds compare at equal force:
   - each of the `shortlist` best candidates alone, at each of `strengths`;
   - the group itself (features below `min_weight_share` of the largest dropped, so it is a handful of `add`
     edits), at each strength;
   - DiffMean (`contrast`): the mean activation on the targets and references minus the mean on the model's
     answers to the same prompts without "Talk about CONCEPT." (same style, no concept). As SAE features, the
     `contrast_features` whose mean activation grows most, each added by its growth (`contrast`); as the raw
     difference (`diffmean`, explained by the SAE features whose decoder rows point the same way) unless the
     method is `features`. DiffMean on the prompt positions beat the feature options on the benchmark;
   - a learned vector (`learn_steering_vector`, free direction) when the method is `vector`, or under `auto`
     when nothing else moves the text and no vector was tried (DiffMean off); it is explained like DiffMean.
   Then the `refine` most promising directions get one more strength, between the strongest that stayed fluent
   and the weakest that did not.
4. Measured effect: every option generates `test_tokens` tokens from each of `TEST_PROMPTS` (other prompts than
   the targets', so a strength is not chosen on the text it was learned from), all in one batch with the
   unsteered rows; the judge is all-MiniLM-L6-v2's cosine of each completion with the concept, the cost its
   perplexity under the unsteered model. The chosen option is the one with the highest mean cosine whose
   perplexity (geometric mean) is at most `max_perplexity_ratio` x unsteered.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..config import JsonConfig, require
from ..errors import MonoscopeError
from ..sae.io import sae_hook_point
from .concepts import (
    NEUTRAL_PROMPTS,
    ConceptJudge,
    Contrast,
    check_references,
    check_strength,
    completion_nll,
    contrast,
    explain_vector,
    geometric_mean,
    hook_norm,
    learn_steering_vector,
    repetition,
)

#: Prompts on which options are compared (not those the targets and learned weights come from).
TEST_PROMPTS = ("Can you help me with something?", "Tell me about your day.", "Share a thought with me.")
METHODS = ("auto", "features", "vector")


def prompted(concept: str, prompt: str) -> str:
    """The prompting baseline: the user's message with "Talk about CONCEPT." in front."""
    return f"Talk about {concept}. {prompt}"


@dataclass
class TowardConfig(JsonConfig):
    """How `plan_steering` searches (see the module docstring)."""

    method: str = "auto"  # auto (features and DiffMean, a learned vector when none works), features, vector
    candidates: int = 12  # candidates from each of search and examples
    shortlist: int = 2  # single features tried by generation
    basis: int = 24  # at most this many candidates in the group's fit (0: no group)
    contrast: bool = True  # try DiffMean: its SAE features (contrast) and, unless method is features, the raw vector
    contrast_features: int = 8  # features in the contrast group
    strengths: tuple[float, ...] = (0.5, 1.0)  # added vector's norm / the hook's mean activation norm
    refine: int = 3  # families (direction x positions) given one more strength between the two tried
    test_tokens: int = 20
    target_tokens: int = 24
    learn_steps: int = 12
    # A margin under the 3x a reader still finds fluent: the plan's own estimate (3 prompts x 20 tokens) is noisy
    max_perplexity_ratio: float = 2.5
    min_gain: float = 0.05  # a feature option "works" when its mean cosine beats unsteered by this much
    min_weight_share: float = 0.02  # group features below this share of the largest weight are dropped
    # where options add: generated tokens only, everywhere, or the prompt only (the model reads a prompt tilted
    # toward the concept, then writes unsteered). Adding at the generated tokens alone won 2 of 8 concepts on the
    # concept benchmark, both with small gains, and costs a third of the plan's time: not tried by default.
    positions: tuple[str, ...] = ("all", "prompt")

    def __post_init__(self) -> None:
        require(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        require(
            self.candidates >= 1 and self.shortlist >= 0 and self.basis >= 0,
            "candidates must be >= 1; shortlist and basis >= 0",
        )
        require(self.contrast_features >= 1 and self.refine >= 0, "contrast_features must be >= 1 and refine >= 0")
        self.strengths = tuple(check_strength(s) for s in self.strengths)
        require(len(self.strengths) > 0 and all(s > 0 for s in self.strengths), "give at least one positive strength")
        require(
            self.test_tokens >= 1 and self.target_tokens >= 1 and self.learn_steps >= 1,
            "token counts and steps must be positive",
        )
        require(self.max_perplexity_ratio > 1, "max_perplexity_ratio must be above 1")
        self.positions = tuple(self.positions) if not isinstance(self.positions, str) else (self.positions,)
        require(
            len(self.positions) > 0 and all(p in ("generated", "all", "prompt") for p in self.positions),
            "positions must be generated, all and/or prompt",
        )


@dataclass
class Option:
    """One steering tried: `features` [(feature, add value in activation units)] or a `vector`, its measured effect."""

    kind: str  # feature / group / contrast (features) or vector / diffmean (a raw vector)
    strength: float
    features: list[tuple[int, float]] = field(default_factory=list)
    positions: str = "generated"
    vector: Tensor | None = None
    similarity: float = math.nan  # mean MiniLM cosine of its completions with the concept
    mention_rate: float = math.nan  # share of completions with cosine >= 0.35
    perplexity: float = math.nan  # geometric mean over its completions, under the unsteered model
    perplexity_ratio: float = math.nan  # / the unsteered completions' perplexity
    repetition: float = math.nan  # mean share of repeated trigrams
    texts: list[str] = field(default_factory=list)
    base: Any = field(default=None, repr=False, compare=False)  # shared by the options that differ only in strength

    def steering(self, sae: Any, hook: str, db: Any = None, label: str = "") -> Any:
        """This option as a `Steering` spec: its feature `add` edits, or its vector at `hook`, at its positions."""
        from .steering import Steering

        steering = Steering(sae, positions=self.positions, max_activations=db)
        for feature, value in self.features:
            steering.add(int(feature), float(value))
        if self.vector is not None:
            steering.add_vector(self.vector, 1.0, hook=hook, label=label)
        return steering

    def describe(self) -> str:
        if self.vector is not None:
            name = "DiffMean vector" if self.kind == "diffmean" else "learned vector"
            return f"{name}, strength {self.strength:g}, {self.positions} positions"
        feats = ", ".join(f"{f}+{v:.3g}" for f, v in self.features[:6]) + (" ..." if len(self.features) > 6 else "")
        return f"{self.kind} {feats} (strength {self.strength:g}, {self.positions} positions)"

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("vector", "base")}
        out["features"] = [{"feature": int(f), "value": float(v)} for f, v in self.features]
        for key in ("similarity", "mention_rate", "perplexity", "perplexity_ratio", "repetition"):
            out[key] = None if not math.isfinite(out[key]) else round(float(out[key]), 4)
        return out


@dataclass
class SteeringPlan:
    """What `plan_steering` chose, the options it compared, and how long it took."""

    concept: str
    hook: str
    chosen: Option | None
    options: list[Option]
    unsteered_similarity: float
    unsteered_perplexity: float
    unit: float  # the hook's mean activation norm: strength 1 adds a vector this long
    candidates: list[Any] = field(
        default_factory=list
    )  # Suggestions; score = the candidate's share of the learned group
    explanation: list[tuple[int, float]] = field(default_factory=list)  # (feature, cosine) of a chosen vector
    labels: dict[int, str] = field(default_factory=dict)
    learned: dict[str, Any] = field(default_factory=dict)  # loss before/after of learned weights/vectors
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    max_perplexity_ratio: float = 3.0

    @property
    def works(self) -> bool:
        return self.chosen is not None

    @property
    def positions(self) -> str:
        return self.chosen.positions if self.chosen is not None else "generated"

    def steering(self, sae: Any, db: Any = None) -> Any:
        """The chosen option as a `Steering` spec (feature `add` edits, or the vector), at `positions`."""
        if self.chosen is None:
            raise MonoscopeError(f"nothing was found that steers toward {self.concept!r}")
        return self.chosen.steering(sae, self.hook, db, label=f"toward {self.concept}")

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return None if not math.isfinite(x) else round(float(x), 4)

        chosen = self.chosen.to_dict() if self.chosen is not None else None
        if chosen is not None:
            for f in chosen["features"]:
                f["label"] = self.labels.get(f["feature"])
        return {
            "concept": self.concept,
            "hook": self.hook,
            "positions": self.positions,
            "works": self.works,
            "chosen": chosen,
            "explanation": [
                {"feature": f, "cosine": round(c, 4), "label": self.labels.get(f)} for f, c in self.explanation
            ],
            "unsteered_similarity": num(self.unsteered_similarity),
            "unsteered_perplexity": num(self.unsteered_perplexity),
            "unit": num(self.unit),
            "options": [o.to_dict() for o in self.options],
            "learned": self.learned,
            "notes": self.notes,
            "seconds": round(self.seconds, 1),
        }


def _score_options(
    lm: Any, judge: ConceptJudge, options: list[Option], prompts: Sequence[str], hook: str, sae: Any, tokens: int
) -> tuple[float, float]:
    """Generate every option (and the unsteered model) on `prompts` in one batch; fill in each option's effect.
    Returns the unsteered (similarity, perplexity)."""
    from .batch import generate_batch

    specs: list[Any] = [None] + [o.steering(sae, hook) for o in options]
    rows = [(i, p) for i in range(len(specs)) for p in prompts]
    gens = generate_batch(
        lm,
        [p for _, p in rows],
        steerings=[specs[i] for i, _ in rows],
        max_new_tokens=tokens,
        max_batch=max(16, len(rows)),
    )
    texts = [g.text for g in gens]
    sims = judge.similarity(texts)
    nll = np.asarray(completion_nll(lm, gens), dtype=np.float64)
    ppl = np.exp(nll)
    per = {i: [j for j, (k, _) in enumerate(rows) if k == i] for i in range(len(specs))}
    base_sim, base_ppl = float(sims[per[0]].mean()), geometric_mean(ppl[per[0]])
    for n, o in enumerate(options, 1):
        idx = per[n]
        o.similarity = float(sims[idx].mean())
        o.mention_rate = float((sims[idx] >= judge.threshold).mean())
        failed = any(gens[j].finish_reason == "error" for j in idx)
        o.perplexity = math.inf if failed else geometric_mean(ppl[idx])
        o.perplexity_ratio = o.perplexity / base_ppl if math.isfinite(base_ppl) and base_ppl > 0 else math.nan
        o.repetition = float(np.mean([repetition(gens[j].ids) for j in idx]))
        o.texts = [texts[j] for j in idx]
    return base_sim, base_ppl


def _best(options: Sequence[Option], max_ratio: float) -> Option | None:
    fluent = [
        o
        for o in options
        if math.isfinite(o.perplexity_ratio) and o.perplexity_ratio <= max_ratio and math.isfinite(o.similarity)
    ]
    return max(fluent, key=lambda o: (o.similarity, -len(o.features))) if fluent else None


def _family(option: Option) -> tuple:
    """Options that differ only in strength: same kind, positions and direction."""
    return (option.kind, option.positions, id(option.base))


def _refinements(options: Sequence[Option], max_ratio: float, top: int) -> list[Option]:
    """One more strength for each of the `top` most promising families: between the strongest that stayed fluent
    and the weakest that did not (geometric mean), or below the weakest when none stayed fluent. Two strengths
    a factor of two apart are a coarse grid, and the best fluent steering is usually just under the bound."""
    families: dict[tuple, list[Option]] = {}
    for o in options:
        if math.isfinite(o.similarity):
            families.setdefault(_family(o), []).append(o)
    ranked = sorted(families.values(), key=lambda fam: -max(o.similarity for o in fam))
    out: list[Option] = []
    for fam in ranked[:top]:
        fluent = [o.strength for o in fam if o.perplexity_ratio <= max_ratio]
        broken = [o.strength for o in fam if not o.perplexity_ratio <= max_ratio]
        low, high = max(fluent, default=None), min((s for s in broken if s > max(fluent, default=0.0)), default=None)
        if low is not None and high is not None:
            strength = math.sqrt(low * high)
        elif low is None and high is not None:
            strength = high / 2
        else:
            continue
        template = min(fam, key=lambda o: o.strength)
        scale = strength / template.strength
        out.append(
            Option(
                template.kind,
                strength,
                [(f, v * scale) for f, v in template.features],
                template.positions,
                None if template.vector is None else template.vector * scale,
                base=template.base,
            )
        )
    return out


def _direction_options(
    kind: str, features: list[tuple[int, float]], vector: Tensor | None, length: float, unit: float, cfg: TowardConfig
) -> list[Option]:
    """`features` (add values) or `vector`, of norm `length`, at each strength (x `unit`) and position set."""
    if not length > 0:
        return []
    base = object()
    out = []
    for strength in cfg.strengths:
        scale = strength * unit / length
        for where in cfg.positions:
            out.append(
                Option(
                    kind,
                    strength,
                    [(f, v * scale) for f, v in features],
                    where,
                    None if vector is None else vector * scale,
                    base=base,
                )
            )
    return out


def _group_options(
    lm: Any,
    sae: Any,
    hook: str,
    candidates: list[Any],
    learn_refs: list[str],
    norms: Tensor,
    unit: float,
    cfg: TowardConfig,
    learned: dict[str, Any],
) -> list[Option]:
    """The candidates as one group: non-negative weights over their decoder rows that make the targets likely.
    Ranks the candidates in place (score: share of the group)."""
    ids = [c.feature for c in candidates]
    decoder = sae.W_dec.detach().float().cpu()
    fit = learn_steering_vector(
        lm, hook, learn_refs, max_norm=max(cfg.strengths) * unit, basis=decoder[ids], steps=cfg.learn_steps
    )
    learned["group"] = {
        "loss_before": round(fit.loss_before, 4),
        "loss_after": round(fit.loss_after, 4),
        "steps": fit.steps,
        "candidates": len(ids),
    }
    weights = fit.weights if fit.weights is not None else torch.zeros(len(ids))
    share = weights * norms[ids]
    total = float(share.sum())
    for c, w in zip(candidates, share.tolist()):
        c.score = w / total if total > 0 else 0.0
    candidates.sort(key=lambda c: -c.score)
    keep = [
        (ids[i], float(weights[i]))
        for i in torch.argsort(share, descending=True).tolist()
        if share[i] >= cfg.min_weight_share * float(share.max()) and share[i] > 0
    ]
    if not keep:
        return []
    length = float((torch.tensor([w for _, w in keep]) @ decoder[[f for f, _ in keep]]).norm())
    return _direction_options("group", keep, None, length, unit, cfg)


def _contrast_options(sae: Any, diff: Contrast, unit: float, cfg: TowardConfig) -> list[Option]:
    """DiffMean between the concept's texts and neutral answers: as the SAE features that carry the difference
    (`contrast`: the `contrast_features` largest gaps in mean feature activation, each added by its gap) unless the
    method is `vector`, and as the raw activation difference (`diffmean`) unless it is `features`."""
    out: list[Option] = []
    gap = diff.features
    top = [int(i) for i in torch.argsort(gap, descending=True)[: cfg.contrast_features] if gap[i] > 0]
    if top and cfg.method != "vector":
        decoder = sae.W_dec.detach().float().cpu()
        length = float((gap[top] @ decoder[top]).norm())
        out += _direction_options("contrast", [(f, float(gap[f])) for f in top], None, length, unit, cfg)
    if cfg.method != "features":
        out += _direction_options("diffmean", [], diff.activation, float(diff.activation.norm()), unit, cfg)
    return out


def plan_steering(
    lm: Any,
    sae: Any,
    concept: str,
    *,
    references: Sequence[str] = (),
    db: Any = None,
    config: TowardConfig | None = None,
    hook: str | None = None,
) -> SteeringPlan:
    """Choose how to steer `lm` toward `concept` with `sae`'s features or a vector (module docstring)."""
    from .batch import generate_batch
    from .featuredb import FeatureDB
    from .steering import check_sae_fits
    from .suggest import NEUTRAL_TEXTS, candidate_features

    started = time.perf_counter()
    cfg = config or TowardConfig()
    concept = (concept or "").strip()
    if not concept:
        raise MonoscopeError("the concept is empty; say what to steer toward, e.g. 'the ocean'")
    refs = check_references([concept, *references])
    hook = hook or sae_hook_point(sae)
    if hook is None:
        raise MonoscopeError("the SAE does not say which hook point it reads; pass --hook")
    if db is not None and not isinstance(db, FeatureDB):
        db = FeatureDB(db)
    unit = hook_norm(lm, hook)
    judge = ConceptJudge(concept)
    notes: list[str] = []

    # the model's own answers to neutral prompts, asked to talk about the concept (targets) and not (contrast)
    asked = [prompted(concept, p) for p in NEUTRAL_PROMPTS] + list(NEUTRAL_PROMPTS)
    answers = [
        g.text.strip() for g in generate_batch(lm, asked, max_new_tokens=cfg.target_tokens, max_batch=len(asked))
    ]
    targets = [t for t in answers[: len(NEUTRAL_PROMPTS)] if t]
    plain_answers = [t for t in answers[len(NEUTRAL_PROMPTS) :] if t]
    learn_refs = refs[1:] + targets or refs

    candidates: list[Any] = []
    norms = sae.W_dec.detach().float().norm(dim=1).cpu()
    options: list[Option] = []
    learned: dict[str, Any] = {}
    check_sae_fits(sae, lm.model, hook, lm)
    if cfg.method != "vector":
        if db is not None:
            db.check_fits(sae)
        pool = candidate_features(lm, sae, concept, refs + targets, db=db, candidates=cfg.candidates, hook=hook)
        candidates = list(pool.values())
    if len(candidates) >= 2 and cfg.basis >= 2:
        candidates = candidates[: cfg.basis]
        options += _group_options(lm, sae, hook, candidates, learn_refs, norms, unit, cfg, learned)
    for c in candidates[: cfg.shortlist]:
        options += _direction_options("feature", [(c.feature, 1.0)], None, float(norms[c.feature]), unit, cfg)
    if cfg.contrast:
        options += _contrast_options(
            sae, contrast(lm, sae, hook, learn_refs, plain_answers + list(NEUTRAL_TEXTS)), unit, cfg
        )
    if not candidates and cfg.method == "features":
        notes.append(
            f"no SAE feature is a candidate for {concept!r}: nothing in the feature database or the references points to one; "
            "try the learned vector (--method vector)"
        )

    def add_vector_options() -> list[Option]:
        fit = learn_steering_vector(lm, hook, learn_refs, max_norm=max(cfg.strengths) * unit, steps=cfg.learn_steps)
        learned["vector"] = {
            "loss_before": round(fit.loss_before, 4),
            "loss_after": round(fit.loss_after, 4),
            "steps": fit.steps,
        }
        return _direction_options("vector", [], fit.vector, float(fit.vector.norm()), unit, cfg)

    if cfg.method == "vector":
        options += add_vector_options()
    base_sim = base_ppl = math.nan
    if options:
        base_sim, base_ppl = _score_options(lm, judge, options, TEST_PROMPTS, hook, sae, cfg.test_tokens)
    chosen = _best(options, cfg.max_perplexity_ratio)
    # A learned vector only when no vector was tried yet: with DiffMean's vector in the first round it won none of
    # the 3 benchmark concepts (of 16) that reached this fallback, and cost each plan 25-30 s.
    vector_tried = any(o.vector is not None for o in options)
    if cfg.method == "auto" and not candidates and vector_tried:
        notes.append(
            f"no SAE feature is a candidate for {concept!r}: only the DiffMean vector was tried "
            "(--method vector learns a free steering vector)"
        )
    if cfg.method == "auto" and not vector_tried and (chosen is None or chosen.similarity < base_sim + cfg.min_gain):
        if not candidates:
            notes.append(f"no SAE feature is a candidate for {concept!r}; a learned steering vector was used instead")
        else:
            notes.append(
                f"no feature option moved the text toward {concept!r} (mean cosine +{cfg.min_gain:g} at perplexity <= "
                f"{cfg.max_perplexity_ratio:g}x); a learned steering vector was tried too"
            )
        extra = add_vector_options()
        if extra:
            sim, ppl = _score_options(lm, judge, extra, TEST_PROMPTS, hook, sae, cfg.test_tokens)
            if math.isnan(base_sim):
                base_sim, base_ppl = sim, ppl
            options += extra
    if cfg.refine > 0 and options:
        extra = _refinements(options, cfg.max_perplexity_ratio, cfg.refine)
        if extra:
            _score_options(lm, judge, extra, TEST_PROMPTS, hook, sae, cfg.test_tokens)
            options += extra
    chosen = _best(options, cfg.max_perplexity_ratio)
    if chosen is not None and chosen.similarity <= base_sim:
        notes.append(f"nothing tried moved the text toward {concept!r} more than the unsteered model")
        chosen = None
    explanation = explain_vector(chosen.vector, sae) if chosen is not None and chosen.vector is not None else []
    labels: dict[int, str] = {}
    if db is not None:
        wanted = (
            {f for o in options for f, _ in o.features} | {f for f, _ in explanation} | {c.feature for c in candidates}
        )
        labels = db.labels(wanted)
        for c in candidates:
            c.label = labels.get(c.feature)
    return SteeringPlan(
        concept,
        hook,
        chosen,
        options,
        base_sim,
        base_ppl,
        unit,
        candidates,
        explanation,
        labels,
        learned,
        notes,
        time.perf_counter() - started,
        cfg.max_perplexity_ratio,
    )
