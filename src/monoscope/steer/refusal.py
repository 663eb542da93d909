"""Finding a refusal direction the way Arditi et al. (2024) do, and scoring where it lives.

Candidates: for every layer L and each of the last `positions` tokens of the prompt (with a chat template,
the template's tokens after the instruction), r = mean(resid_pre.L | harmful) - mean(resid_pre.L | harmless),
computed on a training half of both prompt sets.

Metric: the refusal log-odds at the first reply token, log p(R) - log(1 - p(R)) with R the first tokens of
the usual openings of a refusal ("I", "Sorry", "As", ...).

Each candidate is scored on the other (validation) half:
- `bypass`: the mean refusal log-odds on harmful prompts with r ablated everywhere (lower: the direction
  carries refusal);
- `induce`: the same on harmless prompts with r added at resid_pre.L at every position (higher: adding it
  makes the model refuse);
- `kl`: KL(original || ablated) of the next-token distribution at the last prompt position, on harmless
  prompts (lower: ablating it leaves ordinary behaviour alone).

The chosen candidate has the lowest `bypass` among those that pass the filters: layer < `max_layer_fraction`
of the depth (directions right before the unembedding act on tokens, not on concepts), `kl` <= `kl_max`, and
`induce` above the harmless prompts' own score (`induce` is measured only where `kl` passes). When none passes, the lowest `bypass` among the candidates
that pass the KL filter is taken (else the lowest `kl`), and the result says so (`passed_filters=False`): a
small model that almost never refuses gives such results.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from ..errors import MonoscopeError
from ..model import LoadedModel, edit, find_blocks, run_to
from ..progress import progress_bar
from .ablation import directional_ablation, unit
from .vectors import SteeringVector

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REFUSAL_OPENINGS = ("I", "Sorry", "As", "Unfortunately", "I'm", "I cannot", "No")


def builtin_prompts() -> tuple[list[str], list[str]]:
    """(harmful, harmless): the small prompt sets shipped with monoscope (steer/data/refusal_prompts.json)."""
    import json
    from importlib import resources

    data = json.loads(
        resources.files("monoscope.steer").joinpath("data/refusal_prompts.json").read_text(encoding="utf-8")
    )
    return list(data["harmful"]), list(data["harmless"])


@dataclass
class RefusalCandidate:
    layer: int
    position: int  # offset from the end of the prompt: -1 is its last token
    bypass: float
    induce: float | None  # measured where kl <= kl_max only
    kl: float
    norm: float
    passed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass
class RefusalSearch:
    vector: SteeringVector
    chosen: RefusalCandidate
    candidates: list[RefusalCandidate]
    baseline_harmful: float  # refusal log-odds on the harmful validation prompts, unedited
    baseline_harmless: float
    passed_filters: bool
    refusal_tokens: list[str] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "hook": self.vector.hooks[0],
            "chosen": self.chosen.to_dict(),
            "passed_filters": self.passed_filters,
            "baseline_harmful": self.baseline_harmful,
            "baseline_harmless": self.baseline_harmless,
            "refusal_tokens": self.refusal_tokens,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def refusal_token_ids(
    tokenizer: PreTrainedTokenizerBase, openings: Sequence[str] = REFUSAL_OPENINGS
) -> tuple[list[int], list[str]]:
    """First token of each opening, with and without a leading space (how a reply may start), deduplicated."""
    ids: list[int] = []
    for word in openings:
        if not word.strip():
            raise MonoscopeError("a refusal opening is empty; give words such as 'I' or 'Sorry'")
        for variant in (word, " " + word):
            enc = tokenizer(variant, add_special_tokens=False).input_ids
            if enc and enc[0] not in ids:
                ids.append(int(enc[0]))
    if not ids:
        raise MonoscopeError("none of the refusal openings encodes to a token")
    return ids, [str(tokenizer.decode([i])) for i in ids]


def refusal_log_odds(logits: Tensor, refusal_ids: Tensor) -> Tensor:
    """log p(R) - log(1 - p(R)) per row of logits [B, V], computed stably."""
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)
    log_r = torch.logsumexp(logp.index_select(-1, refusal_ids), -1)
    log_not = torch.log1p(-log_r.exp().clamp(max=1 - 1e-7))
    return log_r - log_not


def _encode(lm: LoadedModel, prompts: Sequence[str], chat_template: bool) -> list[Tensor]:
    from .runtime import encode_prompt

    return [encode_prompt(lm.tokenizer, p, raw=not chat_template)[0].cpu() for p in prompts]


def _batches(rows: list[Tensor], batch_size: int, left: bool = False):
    """(ids [B, T], mask [B, T], lengths [B]) padded on the right (real tokens keep positions 0..n-1) or, with
    `left`, on the left (every prompt ends at the last column; position ids then come from the mask)."""
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, r in enumerate(chunk):
            where = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, where] = r
            mask[i, where] = 1
        yield ids, mask, mask.sum(1)


@torch.inference_mode()
def _last_logits(lm: LoadedModel, rows: list[Tensor], batch_size: int) -> Tensor:
    """Next-token logits [N, V] after each prompt (whatever edits are active); the LM head runs on the last
    position only."""
    out = []
    for ids, mask, _ in _batches(rows, batch_size, left=True):
        kw = {
            "input_ids": ids.to(lm.device),
            "attention_mask": mask.to(lm.device),
            "position_ids": (mask.cumsum(-1) - 1).clamp_min(0).to(lm.device),
            "use_cache": False,
        }
        try:
            logits = lm.model(**kw, logits_to_keep=1).logits
        except TypeError:  # a model without logits_to_keep
            logits = lm.model(**kw).logits
        out.append(logits[:, -1].float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def _mean_resid_pre(
    lm: LoadedModel, rows: list[Tensor], layers: Sequence[int], positions: int, batch_size: int
) -> Tensor:
    """Mean resid_pre.L at each of the last `positions` tokens: [positions, layers, d] (index 0 = last token)."""
    hooks = [f"resid_pre.{layer}" for layer in layers]
    total = None
    for ids, mask, lengths in _batches(rows, batch_size):
        acts = run_to(lm.model, hooks, ids.to(lm.device), mask.to(lm.device))
        per_layer = []
        for h in hooks:
            x = acts[h].float().cpu()
            picked = torch.stack(
                [x[torch.arange(len(lengths)), (lengths - 1 - p).clamp_min(0)] for p in range(positions)]
            )  # [P, B, d]
            per_layer.append(picked.sum(1))
        s = torch.stack(per_layer, 1)  # [P, L, d]
        total = s if total is None else total + s
    if total is None:
        raise MonoscopeError("no prompts to average the residual stream over")
    return total / len(rows)


def _kl(base_logits: Tensor, new_logits: Tensor) -> float:
    p = torch.log_softmax(base_logits.float(), -1)
    q = torch.log_softmax(new_logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def find_refusal_direction(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    positions: int = 5,
    openings: Sequence[str] = REFUSAL_OPENINGS,
    chat_template: bool | None = None,
    val_fraction: float = 0.5,
    max_layer_fraction: float = 0.8,
    kl_max: float = 0.1,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    name: str = "refusal",
) -> RefusalSearch:
    """Score the (layer, position) candidates as in Arditi et al. and return the chosen direction."""
    harmful = [p for p in harmful if isinstance(p, str) and p.strip()]
    harmless = [p for p in harmless if isinstance(p, str) and p.strip()]
    if len(harmful) < 2 or len(harmless) < 2:
        raise MonoscopeError(
            f"need at least 2 harmful and 2 harmless prompts (got {len(harmful)} and {len(harmless)}): half make the "
            "candidate directions, the other half score them"
        )
    if not 0.0 < val_fraction < 1.0:
        raise MonoscopeError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if positions < 1:
        raise MonoscopeError(f"--positions must be at least 1, got {positions}")
    if not (kl_max > 0 and math.isfinite(kl_max)):
        raise MonoscopeError(f"--kl-max must be a positive number, got {kl_max}")
    n_layers = len(find_blocks(lm.model))
    # by default only the layers the filter allows: a direction right before the unembedding is not chosen anyway
    layers = (
        list(range(max(1, math.ceil(max_layer_fraction * n_layers))))
        if layers is None
        else sorted({int(layer) for layer in layers})
    )
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise MonoscopeError(
            f"layer(s) {bad or layers} do not exist: the model has {n_layers} layers (0-{n_layers - 1})"
        )
    if chat_template is None:
        chat_template = bool(getattr(lm.tokenizer, "chat_template", None))

    rng = random.Random(seed)
    harmful, harmless = rng.sample(harmful, len(harmful)), rng.sample(harmless, len(harmless))

    def split(items: list[str]) -> tuple[list[str], list[str]]:
        n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction)))
        return items[n_val:], items[:n_val]

    (harm_train, harm_val), (safe_train, safe_val) = split(harmful), split(harmless)
    ref_ids, ref_tokens = refusal_token_ids(lm.tokenizer, openings)
    ref = torch.tensor(ref_ids, dtype=torch.long)
    rows = {
        k: _encode(lm, v, chat_template)
        for k, v in {
            "harm_train": harm_train,
            "harm_val": harm_val,
            "safe_train": safe_train,
            "safe_val": safe_val,
        }.items()
    }
    shortest = min(len(r) for k in ("harm_train", "safe_train") for r in rows[k])
    positions = min(positions, shortest)

    diff = _mean_resid_pre(lm, rows["harm_train"], layers, positions, batch_size) - _mean_resid_pre(
        lm, rows["safe_train"], layers, positions, batch_size
    )
    base_harm = refusal_log_odds(_last_logits(lm, rows["harm_val"], batch_size), ref)
    base_safe_logits = _last_logits(lm, rows["safe_val"], batch_size)
    base_safe = refusal_log_odds(base_safe_logits, ref)

    candidates: list[RefusalCandidate] = []
    bar = progress_bar(positions * len(layers), "refusal candidates: bypass, KL", "cand", enabled=progress)
    try:  # stage 1: ablated, every candidate's bypass (harmful prompts) and KL (harmless prompts)
        for p in range(positions):
            for li, layer in enumerate(layers):
                r = diff[p, li]
                norm = float(r.norm())
                bypass, kl = math.inf, math.inf
                if math.isfinite(norm) and norm > 1e-12:
                    with directional_ablation(lm.model, r):
                        bypass = float(refusal_log_odds(_last_logits(lm, rows["harm_val"], batch_size), ref).mean())
                        kl = _kl(base_safe_logits, _last_logits(lm, rows["safe_val"], batch_size))
                candidates.append(RefusalCandidate(layer, -(p + 1), bypass, None, kl, norm))
                bar.update(1)
    finally:
        bar.close()

    # stage 2: the candidates that leave harmless prompts alone (KL) get the induce score (added, harmless prompts)
    gentle = [
        c for c in candidates if math.isfinite(c.bypass) and c.kl <= kl_max and c.layer < max_layer_fraction * n_layers
    ]
    bar = progress_bar(len(gentle), "refusal candidates: induce", "cand", enabled=progress)
    try:
        for c in gentle:
            push = diff[-c.position - 1, layers.index(c.layer)].to(device=lm.device)

            def add(x: Tensor, push: Tensor = push) -> Tensor:
                return x + push.to(x.dtype)

            with edit(lm.model, {f"resid_pre.{c.layer}": add}):
                c.induce = float(refusal_log_odds(_last_logits(lm, rows["safe_val"], batch_size), ref).mean())
            c.passed = c.induce > float(base_safe.mean())
            bar.update(1)
    finally:
        bar.close()

    passing = [c for c in candidates if c.passed]
    finite = [c for c in candidates if math.isfinite(c.bypass)]
    if not finite:
        raise MonoscopeError(
            "every candidate direction is zero: the harmful and harmless prompts give the same activations"
        )
    # without a passing candidate: the lowest bypass among those that leave harmless prompts alone, else the gentlest
    chosen = (
        min(passing, key=lambda c: c.bypass)
        if passing
        else min(gentle, key=lambda c: c.bypass)
        if gentle
        else min(finite, key=lambda c: c.kl)
    )
    direction = diff[-chosen.position - 1, layers.index(chosen.layer)]
    hook = f"resid_pre.{chosen.layer}"
    model_type = getattr(getattr(lm.model, "config", None), "model_type", None)
    meta = {
        "method": "refusal direction (Arditi et al. 2024): mean difference, chosen by bypass / induce / KL",
        "position": chosen.position,
        "chat_template": chat_template,
        "model_type": model_type,
        "n_positive": len(harm_train),
        "n_negative": len(safe_train),
        "passed_filters": bool(passing),
        "bypass": chosen.bypass,
        "induce": chosen.induce,
        "kl": chosen.kl,
        "baseline_harmful": float(base_harm.mean()),
        "baseline_harmless": float(base_safe.mean()),
        "refusal_tokens": ref_tokens,
    }
    vector = SteeringVector({hook: direction}, getattr(lm, "name", None), meta, name)
    return RefusalSearch(
        vector,
        chosen,
        candidates,
        float(base_harm.mean()),
        float(base_safe.mean()),
        bool(passing),
        ref_tokens,
        len(harm_train) + len(safe_train),
        len(harm_val) + len(safe_val),
    )


def bypass_score(
    lm: LoadedModel,
    direction: Tensor,
    prompts: Sequence[str],
    openings: Sequence[str] = REFUSAL_OPENINGS,
    chat_template: bool | None = None,
    batch_size: int = 8,
) -> float:
    """Mean refusal log-odds on `prompts` with `direction` ablated everywhere (an independent check of a search)."""
    if chat_template is None:
        chat_template = bool(getattr(lm.tokenizer, "chat_template", None))
    ref = torch.tensor(refusal_token_ids(lm.tokenizer, openings)[0], dtype=torch.long)
    rows = _encode(lm, prompts, chat_template)
    with directional_ablation(lm.model, unit(direction)):
        return float(refusal_log_odds(_last_logits(lm, rows, batch_size), ref).mean())
