"""How much of the model's behaviour an SAE keeps: next-token loss with the reconstruction spliced in.

Definitions follow SAEBench / SAELens so figures compare across tools. On held-out contexts, at every
position after BOS (BOS is not modelled by the SAE and stays untouched):

- CE_clean: the model as is; CE_sae: the hook point's activation replaced by the SAE's reconstruction;
  CE_zero: replaced by zeros; CE_mean: replaced by the mean activation of the batch.
- ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean), and the same with the mean-ablation baseline.
- KL: KL(clean || patched) of next-token distributions; kl_div_score = (KL_zero - KL_sae) / KL_zero.
- delta_loss = CE_sae - CE_clean.

Which text: `evaluate_sae` samples contexts (seeded, uniformly) from the whole held-out region, the contexts
after the ones the SAE was trained on (up to `region_contexts` of them, 10,000 by default), rather than one window: figures
from one contiguous window vary a lot with where it falls. Every metric comes with a bootstrap interval
over contexts (`intervals`: 95 % percentile interval, 1000 resamples), so a figure says how far it would
move on another sample of the same text.

Memory: logits are never materialised for the whole batch. The model's forward pass is stopped at its
output layer (the final hidden states are read there), and the four passes' logits are computed from those
in blocks of tokens x vocabulary with running log-sum-exps, so memory stays bounded for any vocabulary
(a 262k-token vocabulary needs a few hundred MB, not several GB). The first batch checks the blockwise
logits against the model's own on the first positions of one context; a model whose output layer they do not reproduce (an
unusual logit transform) is evaluated from its own logits, one context at a time.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from ..data import Corpus
from ..data.packing import batched_contexts, pack_contexts
from ..errors import MonoscopeError
from ..model import LoadedModel, capture, edit
from ..model.hooks import StopForward
from ..progress import progress_bar
from .base import SAE
from .metrics import SUM_KEYS, bootstrap_intervals, reconstruction_from_sums, reconstruction_sums

Patch = Callable[[torch.Tensor], torch.Tensor]

#: Variants of each forward pass, in the order their final hidden states are stacked.
VARIANTS = ("clean", "sae", "zero", "mean")
#: Per-context sums behind the LM metrics.
LM_SUM_KEYS = ("tokens", "ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl_sae", "kl_zero")
TOKEN_BLOCK = 256
VOCAB_BLOCK = 16_384
#: Held-out contexts the sample is drawn from by default (at least; 50x the contexts needed when that is more):
#: all of the starter corpus's held-out text; a streamed corpus is read no further.
DEFAULT_REGION_CONTEXTS = 10_000
#: Positions of one context on which blockwise logits are checked against the model's own.
CHECK_POSITIONS = 16


@dataclass
class LMLossMetrics:
    tokens: int
    ce_clean: float
    ce_sae: float
    ce_zero_ablation: float
    ce_mean_ablation: float
    ce_loss_score: float
    ce_loss_score_mean_ablation: float
    kl_sae: float
    kl_zero_ablation: float
    kl_div_score: float
    delta_loss: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# Counts of latents over the whole sample (alive, denser than 1 % / 10 %) get no interval: a bootstrap
# resample repeats some contexts and drops others, so it sees fewer distinct tokens and its counts are
# biased (the point estimate fell outside its own "interval"); they describe the sample, not a mean.
LATENT_COUNTS = ("frac_alive", "frac_dense_1pct", "frac_dense_10pct")


def _keep_prefix(patch: Patch, untouched: int = 1) -> Patch:
    """`patch` applied to every position but the first `untouched` (BOS, and any the SAE is not judged on)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :untouched], patch(x[:, untouched:]).to(x.dtype)], dim=1)

    return apply


def lm_metrics_from_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LM metrics from (summed or bootstrap-weighted) per-context sums; leading dimensions are kept."""
    n = sums["tokens"]
    ce = {key: sums[key] / n for key in LM_SUM_KEYS if key != "tokens"}

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den != 0, num / den, torch.nan)

    return {
        "ce_clean": ce["ce_clean"],
        "ce_sae": ce["ce_sae"],
        "ce_zero_ablation": ce["ce_zero"],
        "ce_mean_ablation": ce["ce_mean"],
        "ce_loss_score": ratio(ce["ce_zero"] - ce["ce_sae"], ce["ce_zero"] - ce["ce_clean"]),
        "ce_loss_score_mean_ablation": ratio(ce["ce_mean"] - ce["ce_sae"], ce["ce_mean"] - ce["ce_clean"]),
        "kl_sae": ce["kl_sae"],
        "kl_zero_ablation": ce["kl_zero"],
        "kl_div_score": ratio(ce["kl_zero"] - ce["kl_sae"], ce["kl_zero"]),
        "delta_loss": ce["ce_sae"] - ce["ce_clean"],
    }


class _OutputLayer:
    """The model's output layer applied blockwise: final hidden states -> logits for a block of the vocabulary."""

    def __init__(self, model: torch.nn.Module) -> None:
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        self.head = head if isinstance(head, torch.nn.Linear) else None
        config = getattr(model, "config", None)
        get_text_config = getattr(config, "get_text_config", None)
        text_config = get_text_config() if callable(get_text_config) else config
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.multiply = getattr(text_config, "logit_scale", None)  # Cohere
        self.divide = getattr(text_config, "logits_scaling", None)  # Granite
        self.vocab = int(self.head.weight.shape[0]) if self.head is not None else 0

    def final_hidden(self, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
        """[B, T, h] inputs of the output layer, the forward pass stopped before it; None if it never ran."""
        if self.head is None:
            return None
        store: list[torch.Tensor] = []

        def grab(module, args):
            store.append(args[0].detach())
            raise StopForward

        handle = self.head.register_forward_pre_hook(grab)
        try:
            model(input_ids=ids, use_cache=False)
        except StopForward:
            pass
        finally:
            handle.remove()
        return store[0] if store else None

    def logits(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """float32 logits [n, stop - start] of hidden [n, h] for vocabulary entries start:stop."""
        assert self.head is not None
        weight = self.head.weight[start:stop]
        bias = None if self.head.bias is None else self.head.bias[start:stop]
        out = F.linear(hidden.to(weight.dtype), weight, bias).float()
        if self.multiply is not None:
            out = out * float(self.multiply)
        if self.divide is not None:
            out = out / float(self.divide)
        if self.softcap is not None:
            out = torch.tanh(out / float(self.softcap)) * float(self.softcap)
        return out


def _token_losses(logit_blocks: Iterator[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token and variant: (CE [V, n], KL(clean || variant) [V, n]) from logit blocks [V, n, vocab block].

    Running log-sum-exps over the vocabulary blocks; for KL also the running sum of
    exp(l_clean - max_clean) (l_clean - l_variant): KL = that / sum exp(l_clean - max) - lse_clean + lse_variant.
    """
    m: torch.Tensor | None = None
    s = t = target_logit = torch.zeros(())
    offset = 0
    for block in logit_blocks:
        width = block.shape[-1]
        block_max = block.max(-1).values
        if m is None:
            m = torch.full_like(block_max, -torch.inf)
            s = torch.zeros_like(block_max)
            t = torch.zeros_like(block_max)
            target_logit = torch.zeros_like(block_max)
        new_m = torch.maximum(m, block_max)
        exp = torch.exp(block - new_m.unsqueeze(-1))
        rescale = torch.exp(m - new_m)
        s = s * rescale + exp.sum(-1)
        clean_weights = exp[0]  # exp(l_clean - max_clean)
        t = t * rescale[0] + (clean_weights.unsqueeze(0) * (block[0].unsqueeze(0) - block)).sum(-1)
        m = new_m
        inside = (targets >= offset) & (targets < offset + width)
        local = (targets - offset).clamp(0, width - 1)
        picked = block.gather(-1, local.expand(block.shape[0], -1).unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(inside.unsqueeze(0), picked, target_logit)
        offset += width
    assert m is not None, "no logit blocks"
    lse = m + torch.log(s)
    ce = lse - target_logit
    kl = t / s[0].unsqueeze(0) - lse[0].unsqueeze(0) + lse
    return ce, kl


def _per_context_sums(ce: torch.Tensor, kl: torch.Tensor, n_contexts: int) -> dict[str, torch.Tensor]:
    """Sum per-token CE/KL [V, B * P] over each context's P positions into the LM sums [B]."""
    per_context = ce.shape[-1] // n_contexts
    ce = ce.double().view(len(VARIANTS), n_contexts, per_context).sum(-1)
    kl = kl.double().view(len(VARIANTS), n_contexts, per_context).sum(-1)
    positions = ce.new_full((n_contexts,), float(per_context))
    out = {"tokens": positions}
    for index, name in enumerate(VARIANTS):
        out[f"ce_{name}"] = ce[index]
    out["kl_sae"], out["kl_zero"] = kl[1], kl[2]
    return out


@torch.inference_mode()
def lm_loss_sums(
    loaded: LoadedModel,
    hook_point: str,
    reconstruct: Patch,
    context_batches: Iterable[torch.Tensor],
    on_activations: Callable[[torch.Tensor], None] | None = None,
    *,
    untouched: int = 1,
    token_block: int = TOKEN_BLOCK,
    vocab_block: int = VOCAB_BLOCK,
) -> dict[str, torch.Tensor]:
    """Clean / SAE / zero / mean forward passes on each batch of contexts [B, T] (BOS first); per-context sums.

    The first `untouched` positions (BOS at least) keep their activations in every pass; the losses are those
    of the predictions made from the other positions. `reconstruct` maps raw activations [B, T-u, d] to their
    reconstruction; `on_activations` receives the clean raw activations of the patched positions
    ([B, T-u, d]) so reconstruction metrics can be computed in the same pass.
    Returns `LM_SUM_KEYS` -> [n_contexts] (float64).
    """
    model = loaded.model
    head = _OutputLayer(model)
    blockwise: bool | None = None  # decided on the first batch
    collected: dict[str, list[torch.Tensor]] = {key: [] for key in LM_SUM_KEYS}
    for ids in context_batches:
        ids = ids.to(loaded.device)
        with capture(model, hook_point) as store:
            clean_hidden = head.final_hidden(model, ids)
        if hook_point not in store:
            raise MonoscopeError(f"the forward pass never reached hook point {hook_point}")
        x = store[hook_point]
        if on_activations is not None:
            on_activations(x[:, untouched:])
        mean = x[:, untouched:].reshape(-1, x.shape[-1]).float().mean(0)
        patches = {
            "sae": reconstruct,
            "zero": lambda a: torch.zeros_like(a),
            "mean": lambda a, mean=mean: mean.to(a.dtype).expand_as(a),
        }
        if (
            blockwise is None
        ):  # checked on a prefix of one context (causal: its hidden states are those of the full pass)
            prefix = min(ids.shape[1], CHECK_POSITIONS)
            blockwise = clean_hidden is not None and _blockwise_matches(
                model, head, ids[:1, :prefix], clean_hidden[:1, :prefix]
            )
            if not blockwise:
                warnings.warn(
                    "the model's output layer is not a plain linear layer this evaluation reproduces; "
                    "using its own logits, one context at a time",
                    stacklevel=2,
                )
        targets = ids[:, untouched + 1 :].reshape(-1)
        if blockwise:
            assert clean_hidden is not None  # blockwise only when the model gave its final hidden states
            hidden = [clean_hidden]
            for patch in patches.values():
                with edit(model, {hook_point: _keep_prefix(patch, untouched)}):
                    patched = head.final_hidden(model, ids)
                assert patched is not None  # the same model ran the same way as for clean_hidden
                hidden.append(patched)
            # positions u .. T-2 predict tokens u+1 .. T-1
            stacked = torch.stack([h[:, untouched:-1] for h in hidden]).reshape(len(VARIANTS), -1, hidden[0].shape[-1])
            ce_parts, kl_parts = [], []
            for start in range(0, targets.numel(), token_block):
                rows = stacked[:, start : start + token_block]
                flat = rows.reshape(-1, rows.shape[-1])
                blocks = (
                    head.logits(flat, v, min(v + vocab_block, head.vocab)).view(len(VARIANTS), rows.shape[1], -1)
                    for v in range(0, head.vocab, vocab_block)
                )
                ce, kl = _token_losses(blocks, targets[start : start + token_block])
                ce_parts.append(ce)
                kl_parts.append(kl)
            sums = _per_context_sums(torch.cat(ce_parts, 1), torch.cat(kl_parts, 1), ids.shape[0])
        else:
            sums = _sums_from_model_logits(model, hook_point, patches, ids, vocab_block, untouched)
        for key in LM_SUM_KEYS:
            collected[key].append(sums[key].cpu())
    if not collected["tokens"]:
        raise MonoscopeError("no held-out contexts to evaluate on; use a larger corpus or fewer --skip-contexts")
    return {key: torch.cat(values) for key, values in collected.items()}


def _blockwise_matches(model: torch.nn.Module, head: _OutputLayer, ids: torch.Tensor, hidden: torch.Tensor) -> bool:
    """Whether blockwise logits from the final hidden states equal the model's own logits on one context."""
    reference = model(input_ids=ids, use_cache=False).logits[0].float()
    if reference.shape[-1] != head.vocab:
        return False
    ours = torch.cat(
        [head.logits(hidden[0], v, min(v + VOCAB_BLOCK, head.vocab)) for v in range(0, head.vocab, VOCAB_BLOCK)], -1
    )
    scale = float(reference.abs().max().clamp_min(1.0))
    tolerance = max(1e-3, 4 * torch.finfo(head.head.weight.dtype).eps) if head.head is not None else 1e-3
    return bool((ours - reference).abs().max() <= tolerance * scale)


def _sums_from_model_logits(
    model: torch.nn.Module,
    hook_point: str,
    patches: dict[str, Patch],
    ids: torch.Tensor,
    vocab_block: int,
    untouched: int,
) -> dict[str, torch.Tensor]:
    """The fallback: the model's own logits, one context at a time (memory: one context's logits x 4)."""
    parts = []
    for row in range(ids.shape[0]):
        one = ids[row : row + 1]
        logits = [model(input_ids=one, use_cache=False).logits[0, untouched:-1].float()]
        for patch in patches.values():
            with edit(model, {hook_point: _keep_prefix(patch, untouched)}):
                logits.append(model(input_ids=one, use_cache=False).logits[0, untouched:-1].float())
        stacked = torch.stack(logits)
        blocks = (stacked[..., v : v + vocab_block] for v in range(0, stacked.shape[-1], vocab_block))
        ce, kl = _token_losses(blocks, one[0, untouched + 1 :])
        parts.append(_per_context_sums(ce, kl, 1))
    return {key: torch.cat([p[key] for p in parts]) for key in LM_SUM_KEYS}


def lm_loss_metrics(
    loaded: LoadedModel,
    hook_point: str,
    reconstruct: Patch,
    context_batches: Iterable[torch.Tensor],
    on_activations: Callable[[torch.Tensor], None] | None = None,
) -> LMLossMetrics:
    """`lm_loss_sums` summed over all contexts, as metrics."""
    sums = {
        key: value.sum()
        for key, value in lm_loss_sums(loaded, hook_point, reconstruct, context_batches, on_activations).items()
    }
    values = {key: float(value) for key, value in lm_metrics_from_sums(sums).items()}
    return LMLossMetrics(tokens=int(sums["tokens"]), **values)


def held_out_skip(sae_info: dict, corpus: Corpus) -> int:
    """Contexts to skip so evaluation text was not seen in training (same corpus and seed), else 0."""
    from .recorded import RecordedCorpus

    same = RecordedCorpus.from_info(sae_info).is_source_of(corpus)  # the corpus may be recorded as a plain spec
    return int(sae_info.get("harvest_contexts") or 0) if same else 0


def sample_contexts(
    contexts: Iterable[torch.Tensor], n: int, *, skip: int, region: int, seed: int
) -> tuple[list[torch.Tensor], int]:
    """A seeded uniform sample of `n` contexts from the `region` contexts after the first `skip` (fewer if the
    text ends sooner), in text order; also returns how many contexts the region held (reservoir sampling)."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, torch.Tensor]] = []
    seen = 0
    for index, context in enumerate(contexts):
        if index < skip:
            continue
        if seen >= region:
            break
        if len(reservoir) < n:
            reservoir.append((seen, context))
        else:
            slot = rng.randrange(seen + 1)
            if slot < n:
                reservoir[slot] = (seen, context)
        seen += 1
    reservoir.sort(key=lambda pair: pair[0])
    return [context for _, context in reservoir], seen


def evaluate_sae(
    sae: SAE,
    loaded: LoadedModel,
    corpus: Corpus,
    *,
    hook_point: str,
    tokens: int,
    context_size: int,
    batch_size: int = 8,
    skip_contexts: int = 0,
    show_progress: bool = True,
    seed: int = 0,
    region_contexts: int | None = None,
    bootstrap_samples: int = 1000,
    untouched_positions: int = 1,
) -> dict:
    """Reconstruction and LM-loss metrics of an SAE (taking raw activations) on held-out text, with intervals.

    `tokens` held-out tokens are taken as whole contexts sampled from the `region_contexts` contexts after the
    first `skip_contexts` (default region: `DEFAULT_REGION_CONTEXTS`, or 50x the contexts needed if more). `intervals` maps every metric to its
    bootstrap interval over contexts. The first `untouched_positions` of each context (BOS: 1) are neither
    replaced nor scored; 2 also leaves out the first token after BOS, which carries outsized activations in
    some models (SmolLM2: norms up to ~150x the median, most of the variance of a sample).
    """
    from .interop import check_model_match

    check_model_match(sae, loaded.name, loaded.d_model)
    if not 1 <= untouched_positions < context_size - 1:
        raise MonoscopeError(
            f"untouched positions must be from 1 (BOS) to {context_size - 2}, got {untouched_positions}"
        )
    n_contexts = max(1, -(-tokens // (context_size - untouched_positions)))
    region = region_contexts if region_contexts is not None else max(DEFAULT_REGION_CONTEXTS, 50 * n_contexts)
    if region < 1:
        raise MonoscopeError(f"the held-out region must hold at least one context, got {region}")
    chosen, region_seen = sample_contexts(
        pack_contexts(corpus.documents(), loaded.tokenizer, context_size),
        n_contexts,
        skip=skip_contexts,
        region=region,
        seed=seed,
    )
    if not chosen:
        raise MonoscopeError(
            f"no held-out text after the first {skip_contexts:,} contexts of the corpus; use a larger corpus, "
            "another --corpus, or another --seed"
        )
    recon_parts: list[dict[str, torch.Tensor]] = []
    bar = progress_bar(
        total=len(chosen) * (context_size - untouched_positions), desc="eval", unit="tok", enabled=show_progress
    )

    def batches():
        for batch in batched_contexts(chosen, batch_size):
            yield batch
            bar.update(batch[:, untouched_positions:].numel())

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return sae(x.float()).to(x.dtype)

    def on_activations(x: torch.Tensor) -> None:
        recon_parts.append({k: v.cpu() for k, v in reconstruction_sums(sae, x.float(), groups=x.shape[0]).items()})

    try:
        lm = lm_loss_sums(
            loaded, hook_point, reconstruct, batches(), on_activations=on_activations, untouched=untouched_positions
        )
    finally:
        bar.close()
    recon = {key: torch.cat([part[key] for part in recon_parts]) for key in SUM_KEYS}
    recon_values = {
        key: float(value)
        for key, value in reconstruction_from_sums({k: v.sum(0, keepdim=True) for k, v in recon.items()}).items()
    }
    lm_values = {key: float(value) for key, value in lm_metrics_from_sums({k: v.sum() for k, v in lm.items()}).items()}

    def all_metrics(weighted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lm_part = {key: weighted[f"lm.{key}"] for key in LM_SUM_KEYS}
        recon_part = {key: weighted[f"recon.{key}"] for key in SUM_KEYS}
        values = {**reconstruction_from_sums(recon_part), **lm_metrics_from_sums(lm_part)}
        return {key: value for key, value in values.items() if key not in LATENT_COUNTS}

    per_context = {**{f"lm.{k}": v for k, v in lm.items()}, **{f"recon.{k}": v for k, v in recon.items()}}
    intervals = bootstrap_intervals(per_context, all_metrics, samples=bootstrap_samples, seed=seed)
    return {
        "hook_point": hook_point,
        "model": loaded.name,
        "held_out_from_context": skip_contexts,
        "held_out_region_contexts": region_seen,
        "contexts": len(chosen),
        "sample_seed": seed,
        "untouched_positions": untouched_positions,
        "tokens": int(recon["tokens"].sum()),
        **recon_values,
        "lm_tokens": int(lm["tokens"].sum()),
        **lm_values,
        "interval_level": 0.95,
        "bootstrap_samples": bootstrap_samples,
        "intervals": intervals,
    }
