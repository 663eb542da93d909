"""Which features push the model toward a target token: activation x gradient, with the SAE spliced in.

At the SAE's hook point the activation is rewritten as x = decode(f) + error, with the codes f = encode(x)
as leaves and the reconstruction error held constant, so the forward pass is unchanged. For a target token
t after the prompt, feature i's attribution is sum over positions (but the first, an attention sink the SAE does not model) of f_i * d(logit_t)/d(f_i): to first
order, how much the target's logit would drop if feature i were ablated everywhere (x -> x - f_i d_i).
One forward and one backward pass give every feature's attribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MonoscopeError
from ..model import edit
from .generation import encode_prompt
from ..sae.io import sae_hook_point
from .steering import check_sae_fits


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
    target_id: int
    target_token: str
    logit: float
    logprob: float
    hook: str
    features: list[FeatureAttribution] = field(default_factory=list)
    total: float = 0.0  # sum of all features' attributions
    error_attribution: float = 0.0  # the reconstruction error's own attribution (activation x gradient)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _bos_offset(tokenizer: Any, ids: torch.Tensor) -> int:
    """1 (the first position, BOS or not, is an attention sink the SAE does not model: left out) unless the prompt is one token."""
    return 1 if ids.shape[-1] > 1 else 0


def target_token_id(tokenizer: Any, target: str | int) -> tuple[int, str]:
    if isinstance(target, int):
        return target, tokenizer.decode([target])
    if not target:
        raise MonoscopeError("the target is empty; give the token to explain, e.g. --target ' Paris'")
    ids = tokenizer(target, add_special_tokens=False).input_ids
    if not ids:
        raise MonoscopeError(f"the target {target!r} encodes to no tokens")
    return int(ids[0]), tokenizer.decode([ids[0]])


def attribute(
    lm: Any,
    sae: Any,
    prompt: str,
    target: str | int,
    *,
    hook: str | None = None,
    top: int = 20,
    metric: str = "logit",
    raw: bool = True,
    labels: dict[int, str] | None = None,
) -> Attribution:
    """Attribution of the prediction of `target` (its first token) after `prompt` to the SAE's features.

    `metric`: `logit` (default) or `logprob`. `raw=False` applies the chat template to the prompt.
    """
    if metric not in ("logit", "logprob"):
        raise MonoscopeError(f"unknown metric {metric!r}; use logit or logprob")
    model, tokenizer = lm.model, lm.tokenizer
    hook = hook or sae_hook_point(sae)
    if hook is None:
        raise MonoscopeError("the SAE does not say which hook point it reads; pass --hook")
    check_sae_fits(sae, model, hook, lm)
    tid, token = target_token_id(tokenizer, target)
    vocab = model.get_output_embeddings().weight.shape[0]
    if not 0 <= tid < vocab:
        raise MonoscopeError(f"target token id {tid} is outside the vocabulary (0-{vocab - 1})")
    ids = encode_prompt(tokenizer, prompt, raw=raw, device=lm.device)
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
        logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, -1)
        objective = logits[tid] if metric == "logit" else logprobs[tid]
        objective.backward()
    logits, logprobs = logits.detach(), logprobs.detach()
    codes, error = store["codes"], store["error"]
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
        prompt=prompt, target=str(target), target_id=tid, target_token=token, logit=float(logits[tid]), logprob=float(logprobs[tid]),
        hook=str(hook), features=feats, total=float(scores.sum()), error_attribution=error_attr,
    )


@torch.inference_mode()
def ablation_effect(lm: Any, sae: Any, prompt: str, target: str | int, features: list[int], *, hook: str | None = None, raw: bool = True) -> dict[int, float]:
    """For each feature: target logit (clean) - target logit with the feature ablated at every position.

    The exact counterpart of `attribute`'s first-order estimate (the same splice: the error term is kept).
    """
    model, tokenizer = lm.model, lm.tokenizer
    hook = hook or sae_hook_point(sae)
    tid, _ = target_token_id(tokenizer, target)
    ids = encode_prompt(tokenizer, prompt, raw=raw, device=lm.device)
    skip = _bos_offset(tokenizer, ids)
    clean = float(model(input_ids=ids, use_cache=False).logits[0, -1, tid])
    out = {}
    for f in features:
        def ablate(x: torch.Tensor, f: int = f) -> torch.Tensor:
            act = sae.encode(x[:, skip:])[..., f : f + 1]
            return torch.cat([x[:, :skip], (x[:, skip:] - act * sae.W_dec[f]).to(x.dtype)], 1)

        with edit(model, {hook: ablate}):
            out[int(f)] = clean - float(model(input_ids=ids, use_cache=False).logits[0, -1, tid])
    return out
