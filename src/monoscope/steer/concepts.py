"""The pieces of steering toward a concept, measured on generated text.

- `ConceptJudge`: how far a completion moved toward a concept: all-MiniLM-L6-v2 cosine between the
  completion and the concept's text, "mentions" at >= 0.35 (unrelated sentences score 0.0-0.2 against a one-
  or two-word concept, a sentence about it 0.4 and more).
- `completion_nll`: the mean negative log-likelihood per token of each completion under the unsteered model
  (its exp is the completion's perplexity: the fluency cost of a steering).
- `learn_steering_vector`: one vector at the hook, optimised so that reference texts become likely as answers
  to neutral chat prompts (the vector added at the answer's positions, as in generation), within a norm bound
  (a fraction of the hook's typical activation norm: the fluency guard). With `basis` (rows of the SAE's
  decoder) it learns non-negative weights of those features instead: a feature group with learned strengths
  that steers exactly like feature `add` edits. The prompt's keys and values do not depend on the vector (it
  acts at the answer's positions only) and are computed once; each step runs the answers alone on top of them.
- `hook_norm`: the mean norm of the activation at a hook point over a few neutral chat turns, the unit of every
  strength here (a strength of 1 adds a vector as long as a typical activation).
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import MonoscopeError
from ..model import edit
from .runtime import Generation, encode_prompt

MENTION_THRESHOLD = 0.35

#: Prompts on which `suggest` measures candidates (the concept benchmark reports on other prompts).
NEUTRAL_PROMPTS = (
    "Tell me something interesting.",
    "What is on your mind today?",
    "Write a few sentences about anything you like.",
    "Say something nice.",
)

MAX_REFERENCES = 64
MAX_REFERENCE_CHARS = 2000


def check_references(references: Sequence[str], *, allow_empty: bool = False) -> list[str]:
    """Non-blank references, stripped; one-line errors for none (unless allowed), too many, or too long."""
    refs = [r.strip() for r in references if r and r.strip()]
    if not refs and not allow_empty:
        raise MonoscopeError("no reference text: give at least one short text about the concept (--reference TEXT)")
    if len(refs) > MAX_REFERENCES:
        raise MonoscopeError(
            f"{len(refs)} reference texts is too many (at most {MAX_REFERENCES}); a handful of short sentences is enough"
        )
    long = [r for r in refs if len(r) > MAX_REFERENCE_CHARS]
    if long:
        raise MonoscopeError(
            f"a reference text has {len(long[0]):,} characters (at most {MAX_REFERENCE_CHARS:,}); give short sentences about the concept"
        )
    return refs


def check_strength(value: float, name: str = "strength") -> float:
    value = float(value)
    if not math.isfinite(value) or abs(value) > 1e3:
        raise MonoscopeError(
            f"{name} {value!r} would make the activations NaN or inf; give a finite number (a few units at most)"
        )
    return value


# ---------------------------------------------------------------- fluency


def _pad_left(rows: Sequence[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r) :] = r
        mask[i, longest - len(r) :] = 1
    return ids, mask


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad if pad is not None else 0)


def _completion_ids(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """A completion's tokens up to (not including) the first EOS."""
    ids = list(ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


@torch.inference_mode()
def completion_nll(lm: Any, generations: Sequence[Generation], *, batch_size: int = 32) -> list[float]:
    """Mean negative log-likelihood per token of each completion given its prompt, under the unsteered model
    (NaN for an empty completion). exp() of it is the completion's perplexity."""
    out: list[float] = [math.nan] * len(generations)
    completions = [_completion_ids(lm.tokenizer, g.ids) for g in generations]
    todo = [i for i, c in enumerate(completions) if c]
    pad = _pad_id(lm.tokenizer)
    for lo in range(0, len(todo), batch_size):
        chunk = todo[lo : lo + batch_size]
        rows = [torch.tensor(list(generations[i].prompt_ids) + completions[i]) for i in chunk]
        ids, mask = _pad_left(rows, pad)
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        position_ids = (mask.cumsum(1) - 1).clamp_min(0)
        logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()
        for row, i in enumerate(chunk):
            n = len(completions[i])
            out[i] = float(-logp[row, -n:].mean())
    return out


def perplexities(lm: Any, generations: Sequence[Generation]) -> np.ndarray:
    return np.exp(np.asarray(completion_nll(lm, generations), dtype=np.float64))


def geometric_mean(values: Sequence[float] | np.ndarray) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr) & (arr > 0)]
    return float(np.exp(np.log(arr).mean())) if arr.size else math.nan


# ---------------------------------------------------------------- judging


class ConceptJudge:
    """Cosine (all-MiniLM-L6-v2) of completions with a concept's text; `mentions` at >= `threshold`."""

    def __init__(self, concept: str, threshold: float = MENTION_THRESHOLD):
        from ..features.embedding import embed_texts

        self.concept = concept
        self.threshold = threshold
        self.vector = embed_texts([concept])[0]

    def similarity(self, texts: Sequence[str]) -> np.ndarray:
        from ..features.embedding import embed_texts

        if not texts:
            return np.zeros(0, dtype=np.float32)
        return embed_texts([t if t.strip() else "." for t in texts]) @ self.vector

    def mentions(self, texts: Sequence[str]) -> np.ndarray:
        return self.similarity(texts) >= self.threshold


def repetition(text_ids: Sequence[int], n: int = 3) -> float:
    """Share of repeated n-grams in a completion (0: none; near 1: a loop like 'were were were')."""
    grams = [tuple(text_ids[i : i + n]) for i in range(len(text_ids) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


# ---------------------------------------------------------------- units


_NORMS: "weakref.WeakKeyDictionary[Any, dict[str, float]]" = weakref.WeakKeyDictionary()


@torch.inference_mode()
def hook_norm(lm: Any, hook: str) -> float:
    """Mean norm of the activation at `hook` over a few neutral chat turns (first token left out)."""
    from ..model import run_to

    cached = _NORMS.setdefault(lm.model, {})
    if hook not in cached:
        norms = []
        for prompt in NEUTRAL_PROMPTS:
            ids = encode_prompt(lm.tokenizer, prompt, device=lm.device)
            x = run_to(lm.model, [hook], ids)[hook][0, 1:].float()
            norms.append(x.norm(dim=-1))
        cached[hook] = float(torch.cat(norms).mean())
    return cached[hook]


# ---------------------------------------------------------------- the learned steering vector


@dataclass
class LearnedVector:
    """A vector learned at `hook` (raw activation units) and how well it fits the references."""

    vector: Tensor  # [d]
    hook: str
    max_norm: float
    loss_before: float  # mean NLL per reference token, unsteered
    loss_after: float  # the same with the vector
    steps: int
    weights: Tensor | None = None  # [m] the basis rows' weights, when learned over a basis (SAE features)
    history: list[float] = field(default_factory=list)


class ReferenceObjective:
    """Mean NLL per token of reference answers to chat prompts, with a vector added at `hook` at the answers'
    positions (as steering at the generated positions does during generation).

    The prompts' keys and values do not depend on the vector and are computed once; each call runs only the
    answers on top of a copy of them.
    """

    def __init__(self, lm: Any, hook: str, references: Sequence[str], prompts: Sequence[str], max_rows: int = 12):
        import inspect

        self.lm, self.hook, self.model = lm, hook, lm.model
        tok = lm.tokenizer
        chat = bool(getattr(tok, "chat_template", None))
        eos = getattr(tok, "eos_token_id", None)
        answers = []
        for ref in references:
            ids = tok(
                ref.strip() if chat else " " + ref.strip(), add_special_tokens=False, return_tensors="pt"
            ).input_ids[0][:64]
            if chat and eos is not None:
                ids = torch.cat([ids, torch.tensor([eos])])
            if len(ids) >= 2:
                answers.append(ids)
        if not answers:
            raise MonoscopeError("the reference texts encode to no tokens; give short sentences about the concept")
        prompt_ids = [encode_prompt(tok, p)[0].cpu() for p in prompts]
        pairs = [(p, r) for r in range(len(answers)) for p in range(len(prompt_ids))]
        pairs = pairs[:: max(1, len(pairs) // max(1, max_rows))][:max_rows]  # spread over prompts and references
        device = lm.device
        pad = _pad_id(tok)
        p_ids, p_mask = _pad_left([prompt_ids[p] for p, _ in pairs], pad)
        rows = [answers[r] for _, r in pairs]
        longest = max(len(a) for a in rows)
        a_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        a_mask = torch.zeros_like(a_ids)
        for i, a in enumerate(rows):
            a_ids[i, : len(a)] = a
            a_mask[i, : len(a)] = 1
        p_ids, p_mask, self.a_ids, a_mask = p_ids.to(device), p_mask.to(device), a_ids.to(device), a_mask.to(device)
        self.full_mask = torch.cat([p_mask, a_mask], 1)
        self.a_pos = p_mask.sum(1, keepdim=True) + torch.arange(longest, device=device).unsqueeze(0)
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        with torch.no_grad():
            prefix = self.model(
                input_ids=p_ids, attention_mask=p_mask, position_ids=(p_mask.cumsum(1) - 1).clamp_min(0), use_cache=True
            )
        self.cache = getattr(prefix, "cache", None) or prefix.past_key_values
        # the answer's first token is predicted at the prompt's last position, before any steering: a constant
        self.first_logp = torch.log_softmax(prefix.logits[:, -1].float(), -1).gather(-1, self.a_ids[:, :1]).squeeze(-1)
        self.target_mask = a_mask[:, 1:].float()
        self.n_tokens = self.target_mask.sum() + len(rows)
        self.rows = len(rows)

    def __call__(self, vector: Tensor | None) -> Tensor:
        fns = {} if vector is None else {self.hook: lambda x: x + vector.to(x.dtype)}
        with edit(self.model, fns):
            logits = (
                self.model(
                    input_ids=self.a_ids,
                    attention_mask=self.full_mask,
                    position_ids=self.a_pos,
                    use_cache=True,
                    **{self.cache_arg: copy.deepcopy(self.cache)},
                )
                .logits[:, :-1]
                .float()
            )
        logp = torch.log_softmax(logits, -1).gather(-1, self.a_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return -((logp * self.target_mask).sum() + self.first_logp.sum()) / self.n_tokens


def learn_steering_vector(
    lm: Any,
    hook: str,
    references: Sequence[str],
    *,
    prompts: Sequence[str] = NEUTRAL_PROMPTS,
    max_norm: float | None = None,
    basis: Tensor | None = None,
    steps: int = 12,
    lr: float | None = None,
    max_rows: int = 12,
) -> LearnedVector:
    """Learn a vector at `hook` that makes `references` likely as answers to `prompts` (see the module docstring).

    `max_norm`: the bound on the vector's norm (default: the hook's mean activation norm). `basis`: [m, d] rows
    (SAE decoder rows) to learn non-negative weights over instead of a free vector. `lr`: the first step's
    length as a fraction of the bound (default 0.3), decaying linearly over `steps` normalised gradient steps.
    """
    refs = check_references(references)
    if steps < 1:
        raise MonoscopeError("steps must be at least 1")
    bound = float(max_norm) if max_norm is not None else hook_norm(lm, hook)
    # In the hook's own units, which are model-specific (Gemma 3's residual norms run to thousands): finite and
    # positive is the whole check, not the few-units cap of a strength.
    if not math.isfinite(bound) or bound <= 0:
        raise MonoscopeError(f"the norm bound {bound!r} must be a positive finite number (the hook's activation units)")
    objective = ReferenceObjective(lm, hook, refs, prompts, max_rows)
    device = lm.device
    d = lm.model.get_input_embeddings().weight.shape[1]
    if basis is not None:
        basis = basis.detach().float().to(device)
        if basis.dim() != 2 or basis.shape[1] != d or basis.shape[0] == 0:
            raise MonoscopeError(f"the basis must be [features, {d}] rows; got {tuple(basis.shape)}")
        param = torch.zeros(basis.shape[0], device=device, requires_grad=True)
    else:
        param = torch.zeros(d, device=device, requires_grad=True)

    def vector() -> Tensor:
        return param @ basis if basis is not None else param

    # normalised gradient steps of a length that decays linearly from `step_size` (activation units for a free
    # vector; for weights, scaled by the basis rows' mean norm), each followed by the projections
    row_norm = float(basis.norm(dim=1).mean()) if basis is not None else 1.0
    step_size = (lr if lr is not None else 0.3) * bound / max(row_norm, 1e-12)
    with torch.no_grad():
        before = float(objective(None))
    history = []
    flags = [p.requires_grad for p in lm.model.parameters()]
    for p in lm.model.parameters():
        p.requires_grad_(False)
    try:
        for step in range(steps):
            loss = objective(vector())
            (grad,) = torch.autograd.grad(loss, [param])
            with torch.no_grad():
                param.sub_(step_size * (1 - step / steps) * grad / grad.norm().clamp_min(1e-12))
                if basis is not None:
                    param.clamp_(min=0)
                norm = float(vector().norm())
                if norm > bound:
                    param.mul_(bound / norm)
            history.append(float(loss.detach()))
        with torch.no_grad():
            final = vector().detach()
            after = float(objective(final))
    finally:
        for p, flag in zip(lm.model.parameters(), flags):
            p.requires_grad_(flag)
    if not torch.isfinite(final).all():
        raise MonoscopeError("learning the steering vector diverged (NaN); try a smaller norm bound")
    return LearnedVector(
        final.cpu(), hook, bound, before, after, steps, param.detach().cpu() if basis is not None else None, history
    )


def explain_vector(vector: Tensor, sae: Any, top: int = 8) -> list[tuple[int, float]]:
    """(feature, cosine) of the SAE decoder rows closest in direction to `vector`, best first."""
    w = sae.W_dec.detach().float().cpu()
    v = vector.detach().float().cpu()
    cos = (w @ v) / (w.norm(dim=1).clamp_min(1e-12) * v.norm().clamp_min(1e-12))
    order = torch.argsort(cos, descending=True)[:top]
    return [(int(i), float(cos[i])) for i in order]


# ---------------------------------------------------------------- contrast (DiffMean)


@dataclass
class Contrast:
    """What separates text about a concept from neutral text at one hook, per token (first token left out)."""

    activation: Tensor  # [d] mean activation on the concept's texts minus on the neutral ones (DiffMean)
    features: Tensor  # [d_sae] the same difference of the SAE's feature activations


@torch.inference_mode()
def mean_activations_and_codes(lm: Any, sae: Any, hook: str, texts: Sequence[str]) -> tuple[Tensor, Tensor, int]:
    """The mean activation at `hook` and the mean SAE code per token over `texts` (each text weighs the same), and
    how many texts counted. The first position is left out, BOS or not: it is an attention sink many times the
    others' norm (SmolLM2 adds no BOS, so its first word is the sink) and would decide both means."""
    from ..model import run_to

    acts, codes, n = torch.zeros(sae.W_dec.shape[1]), torch.zeros(sae.W_dec.shape[0]), 0
    for text in texts:
        ids = lm.tokenizer(text, return_tensors="pt").input_ids.to(lm.device)
        if ids.shape[1] < 2:
            continue
        x = run_to(lm.model, [hook], ids)[hook][0, 1:]
        acts += x.float().mean(0).cpu()
        codes += sae.encode(x.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)).float().mean(0).cpu()
        n += 1
    return acts / max(n, 1), codes / max(n, 1), n


def contrast(lm: Any, sae: Any, hook: str, positive: Sequence[str], negative: Sequence[str]) -> Contrast:
    """DiffMean at `hook` between `positive` and `negative` texts, in activations and in SAE features."""
    pos_acts, pos_codes, n_pos = mean_activations_and_codes(lm, sae, hook, [t for t in positive if t.strip()])
    neg_acts, neg_codes, n_neg = mean_activations_and_codes(lm, sae, hook, [t for t in negative if t.strip()])
    if n_pos == 0 or n_neg == 0:
        raise MonoscopeError("no text of two or more tokens to contrast")
    return Contrast(pos_acts - neg_acts, pos_codes - neg_codes)
