"""Which features push the model toward a target token: activation x gradient, with the SAE spliced in.

At the SAE's hook point the activation is rewritten as x = decode(f) + error, with the codes f = encode(x)
as leaves and the reconstruction error held constant, so the forward pass is unchanged. For a target token
t after the prompt, feature i's attribution is sum over positions (but the first, an attention sink the SAE
does not model) of f_i * d(logit_t)/d(f_i): to first order, how much the target's logit would drop if
feature i were ablated everywhere (x -> x - f_i d_i). A target of several tokens is read after the prompt
(teacher forcing) and its objective is the sum over its tokens (of logits, or of log-probs: the log-probability
of the whole target). One forward and one backward pass give every feature's attribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import MonoscopeError
from ..model import LoadedModel, edit, last_logits, token_logprobs
from ..progress import progress_bar
from ..sae.io import sae_hook_point
from .runtime import encode_prompt
from .steering import check_sae_fits

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..sae.base import SAE


@dataclass
class FeatureAttribution:
    feature: int
    attribution: float  # contribution to the target's logit (or log-prob)
    activation: float  # the feature's largest activation over the prompt
    last_activation: float  # its activation at the last position
    label: str | None = None


@dataclass
class Attribution:
    prompt: str
    target: str
    target_id: int  # the target's first token
    target_token: str  # the text of all its tokens
    logit: float  # summed over the target's tokens
    logprob: float  # the log-probability of the whole target
    hook: str
    features: list[FeatureAttribution] = field(default_factory=list)
    total: float = 0.0  # sum of all features' attributions
    error_attribution: float = 0.0  # the reconstruction error's own attribution (activation x gradient)
    target_ids: list[int] = field(default_factory=list)  # every token of the target

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _bos_offset(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor) -> int:
    """1 (the first position, BOS or not, is an attention sink the SAE does not model: left out) unless the prompt is one token."""
    return 1 if ids.shape[-1] > 1 else 0


MAX_TARGET_TOKENS = 64


def target_token_ids(tokenizer: PreTrainedTokenizerBase, target: str | int | list[int], vocab: int) -> list[int]:
    """The target's token ids (a string is tokenized without special tokens), checked against the vocabulary."""
    if isinstance(target, str):
        if not target:
            raise MonoscopeError("the target is empty; give the text to explain, e.g. --target ' Paris'")
        ids = [int(i) for i in tokenizer(target, add_special_tokens=False).input_ids]
        if not ids:
            raise MonoscopeError(f"the target {target!r} encodes to no tokens")
    else:
        ids = [int(target)] if isinstance(target, int) else [int(i) for i in target]
        if not ids:
            raise MonoscopeError("the target has no tokens")
    if len(ids) > MAX_TARGET_TOKENS:
        raise MonoscopeError(f"the target has {len(ids)} tokens; attribute at most {MAX_TARGET_TOKENS} at once")
    for tid in ids:
        if not 0 <= tid < vocab:
            raise MonoscopeError(f"target token id {tid} is outside the vocabulary (0-{vocab - 1})")
    return ids


def _prompt_and_target(
    lm: LoadedModel, prompt: str, target: str | int | list[int], raw: bool
) -> tuple[torch.Tensor, list[int]]:
    """Token ids [1, T] of the prompt followed by all but the target's last token, and the target's ids."""
    head = getattr(lm.model.get_output_embeddings(), "weight", None)
    if not isinstance(head, torch.Tensor):
        raise MonoscopeError(f"{lm.name} has no LM head (output embedding) weight: attribution needs a causal LM")
    vocab = head.shape[0]
    target_ids = target_token_ids(lm.tokenizer, target, vocab)
    ids = encode_prompt(lm.tokenizer, prompt, raw=raw, device=lm.device)
    forced = torch.tensor([target_ids[:-1]], dtype=ids.dtype, device=ids.device)
    return torch.cat([ids, forced], 1), target_ids


def _target_scores(
    model: torch.nn.Module, ids: torch.Tensor, target_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed logits and summed log-probs of the target's tokens after prompt + target[:-1] (`ids`); the LM head
    runs on the target's positions only."""
    rows = last_logits(model, ids, len(target_ids))[0]
    index = torch.tensor(target_ids, device=rows.device)
    return rows.gather(1, index[:, None]).float().sum(), token_logprobs(rows, index).sum()


def attribute(
    lm: LoadedModel,
    sae: SAE,
    prompt: str,
    target: str | int | list[int],
    *,
    hook: str | None = None,
    top: int = 20,
    metric: str = "logit",
    raw: bool = True,
    labels: dict[int, str] | None = None,
) -> Attribution:
    """Attribution of the prediction of `target` after `prompt` to the SAE's features.

    `target`: text (all its tokens, summed), a token id, or a list of token ids. `metric`: `logit` (default) or
    `logprob` (with several tokens: the log-probability of the whole target). `raw=False` applies the chat
    template to the prompt.
    """
    if metric not in ("logit", "logprob"):
        raise MonoscopeError(f"unknown metric {metric!r}; use logit or logprob")
    model, tokenizer = lm.model, lm.tokenizer
    hook = hook or sae_hook_point(sae)
    if hook is None:
        raise MonoscopeError("the SAE does not say which hook point it reads; pass --hook")
    check_sae_fits(sae, model, hook, lm)
    ids, target_ids = _prompt_and_target(lm, prompt, target, raw)
    skip = _bos_offset(tokenizer, ids)
    store: dict[str, torch.Tensor] = {}

    def splice(x: torch.Tensor) -> torch.Tensor:
        body = x[:, skip:].detach()
        codes = sae.encode(body).detach().requires_grad_(True)
        recon = sae.decode(codes)
        error = (body.to(recon.dtype) - recon).detach().requires_grad_(True)
        store["codes"], store["error"] = codes, error
        return torch.cat([x[:, :skip], (recon + error).to(x.dtype)], 1)

    with torch.enable_grad(), edit(model, {hook: splice}):
        logit, logprob = _target_scores(model, ids, target_ids)
        (logit if metric == "logit" else logprob).backward()
    codes, error = store["codes"], store["error"]
    if codes.grad is None or error.grad is None:
        raise MonoscopeError(f"the target's score does not depend on {hook}: no gradient reached the SAE's codes")
    scores = (codes * codes.grad).detach()[0].sum(0).float()
    error_attr = float((error * error.grad).detach().sum())
    order = torch.argsort(scores.abs(), descending=True)[: max(0, int(top))]
    act_max = codes.detach()[0].amax(0)
    last = codes.detach()[0, -1]
    feats = [
        FeatureAttribution(int(i), float(scores[i]), float(act_max[i]), float(last[i]), (labels or {}).get(int(i)))
        for i in order.tolist()
        if float(scores[i]) != 0.0
    ]
    return Attribution(
        prompt=prompt,
        target=str(target),
        target_id=target_ids[0],
        target_token=str(tokenizer.decode(target_ids)),
        logit=float(logit.detach()),
        logprob=float(logprob.detach()),
        hook=str(hook),
        features=feats,
        total=float(scores.sum()),
        error_attribution=error_attr,
        target_ids=target_ids,
    )


@torch.inference_mode()
def ablation_effect(
    lm: LoadedModel,
    sae: SAE,
    prompt: str,
    target: str | int | list[int],
    features: list[int],
    *,
    hook: str | None = None,
    raw: bool = True,
    metric: str = "logit",
    progress: bool = True,
) -> dict[int, float]:
    """For each feature: the target's logit (or log-prob) clean minus with the feature ablated at every position.

    The exact counterpart of `attribute`'s first-order estimate (the same splice: the error term is kept).
    """
    model, tokenizer = lm.model, lm.tokenizer
    hook = hook or sae_hook_point(sae)
    if hook is None:
        raise MonoscopeError("the SAE does not say which hook point it reads; pass --hook")
    ids, target_ids = _prompt_and_target(lm, prompt, target, raw)
    skip = _bos_offset(tokenizer, ids)
    if metric not in ("logit", "logprob"):
        raise MonoscopeError(f"unknown metric {metric!r}; use logit or logprob")
    pick = 0 if metric == "logit" else 1

    def score() -> float:
        return float(_target_scores(model, ids, target_ids)[pick])

    clean = score()
    out = {}
    with progress_bar(len(features), "ablating features", "feature", enabled=progress) as bar:
        for f in features:

            def ablate(x: torch.Tensor, f: int = f) -> torch.Tensor:
                act = sae.encode(x[:, skip:])[..., f : f + 1]
                return torch.cat([x[:, :skip], (x[:, skip:] - act * sae.W_dec[f]).to(x.dtype)], 1)

            with edit(model, {hook: ablate}):
                out[int(f)] = clean - score()
            bar.update(1)
    return out


@dataclass
class FeatureEffect:
    feature: int
    ablation: float  # the target's score clean minus with the feature ablated at every position (exact)
    attribution: float  # the first-order estimate of the same
    activation: float
    label: str | None = None


@dataclass
class AblationMap:
    """Every active feature of a prompt ranked by what ablating it does to the target, beside its attribution."""

    prompt: str
    target: str
    hook: str
    metric: str
    features: list[FeatureEffect]  # by |ablation|, largest first
    spearman: float  # rank correlation of ablation and attribution over the active features
    top_overlap: float  # share of the 10 largest by |ablation| also among the 10 largest by |attribution|

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x)).float()


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (NaN with fewer than two points)."""
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(torch.tensor(a)), _ranks(torch.tensor(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float(ra @ rb) / denom if denom > 0 else float("nan")


def map_by_ablation(
    lm: LoadedModel,
    sae: SAE,
    prompt: str,
    target: str | int | list[int],
    *,
    hook: str | None = None,
    metric: str = "logit",
    raw: bool = True,
    max_features: int = 256,
    labels: dict[int, str] | None = None,
) -> AblationMap:
    """Ablate each active feature of the prompt (up to `max_features`, by |attribution|) and rank them by the
    exact effect on the target, with the attribution beside it: how far the one-pass estimate can be trusted."""
    if max_features < 1:
        raise MonoscopeError(f"max_features must be at least 1, got {max_features}")
    full = attribute(lm, sae, prompt, target, hook=hook, top=max_features, metric=metric, raw=raw)
    picked = [f for f in full.features if f.activation > 0]
    exact = ablation_effect(
        lm, sae, prompt, target, [f.feature for f in picked], hook=full.hook, raw=raw, metric=metric
    )
    effects = [
        FeatureEffect(f.feature, exact[f.feature], f.attribution, f.activation, (labels or {}).get(f.feature))
        for f in picked
    ]
    effects.sort(key=lambda e: abs(e.ablation), reverse=True)
    by_attr = {e.feature for e in sorted(effects, key=lambda e: abs(e.attribution), reverse=True)[:10]}
    top = effects[:10]
    overlap = sum(e.feature in by_attr for e in top) / len(top) if top else float("nan")
    return AblationMap(
        prompt,
        str(target),
        full.hook,
        metric,
        effects,
        spearman([e.ablation for e in effects], [e.attribution for e in effects]),
        overlap,
    )
