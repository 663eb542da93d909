"""How much of the model's behaviour an SAE keeps: next-token loss with the reconstruction spliced in.

Definitions follow SAEBench / SAELens so figures compare across tools. On held-out contexts, at every
position after BOS (BOS is not modelled by the SAE and stays untouched):

- CE_clean: the model as is; CE_sae: the hook point's activation replaced by the SAE's reconstruction;
  CE_zero: replaced by zeros; CE_mean: replaced by the mean activation of the batch.
- ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean), and the same with the mean-ablation baseline.
- KL: KL(clean || patched) of next-token distributions; kl_div_score = (KL_zero - KL_sae) / KL_zero.
- delta_loss = CE_sae - CE_clean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import islice
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..data import Corpus
from ..data.packing import batched_contexts, pack_contexts
from ..errors import MonoscopeError
from ..model import LoadedModel, capture, edit
from ..progress import progress_bar
from .base import SAE
from .metrics import evaluate_reconstruction

Patch = Callable[[torch.Tensor], torch.Tensor]


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


def _keep_bos(patch: Patch) -> Patch:
    def apply(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], patch(x[:, 1:]).to(x.dtype)], dim=1)

    return apply


def _next_token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-position CE of predicting token p+1 from positions p >= 1: [B, T-2]."""
    pred = logits[:, 1:-1].float()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, 2:].reshape(-1), reduction="none").view(pred.shape[:2])


def _kl(clean_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    patched = F.log_softmax(logits[:, 1:-1].float(), dim=-1)
    return (clean_logp.exp() * (clean_logp - patched)).sum(-1)


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else float("nan")


@torch.inference_mode()
def lm_loss_metrics(
    loaded: LoadedModel,
    hook_point: str,
    reconstruct: Patch,
    context_batches: Iterable[torch.Tensor],
    on_activations: Callable[[torch.Tensor], None] | None = None,
) -> LMLossMetrics:
    """Run clean / SAE / zero / mean forward passes on each batch of contexts [B, T] (BOS first).

    `reconstruct` maps raw activations [B, T-1, d] to their reconstruction; `on_activations` receives the
    clean raw activations after BOS ([n, d]) so reconstruction metrics can be computed in the same pass.
    """
    model = loaded.model
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "mean": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    n = 0
    for ids in context_batches:
        ids = ids.to(loaded.device)
        with capture(model, hook_point) as store:
            clean_logits = model(input_ids=ids, use_cache=False).logits
        x = store[hook_point]
        if on_activations is not None:
            on_activations(x[:, 1:].reshape(-1, x.shape[-1]))
        mean = x[:, 1:].reshape(-1, x.shape[-1]).float().mean(0)
        clean_logp = F.log_softmax(clean_logits[:, 1:-1].float(), dim=-1)
        patches = {
            "sae": reconstruct,
            "zero": lambda a: torch.zeros_like(a),
            "mean": lambda a: mean.to(a.dtype).expand_as(a),
        }
        sums["clean"] += _next_token_losses(clean_logits, ids).sum().item()
        for name, patch in patches.items():
            with edit(model, {hook_point: _keep_bos(patch)}):
                logits = model(input_ids=ids, use_cache=False).logits
            sums[name] += _next_token_losses(logits, ids).sum().item()
            if name in ("sae", "zero"):
                sums[f"kl_{name}"] += _kl(clean_logp, logits).sum().item()
        n += ids[:, 2:].numel()
    if n == 0:
        raise MonoscopeError("no held-out contexts to evaluate on; use a larger corpus or fewer --skip-contexts")
    ce = {k: v / n for k, v in sums.items()}
    return LMLossMetrics(
        tokens=n,
        ce_clean=ce["clean"],
        ce_sae=ce["sae"],
        ce_zero_ablation=ce["zero"],
        ce_mean_ablation=ce["mean"],
        ce_loss_score=_ratio(ce["zero"] - ce["sae"], ce["zero"] - ce["clean"]),
        ce_loss_score_mean_ablation=_ratio(ce["mean"] - ce["sae"], ce["mean"] - ce["clean"]),
        kl_sae=ce["kl_sae"],
        kl_zero_ablation=ce["kl_zero"],
        kl_div_score=_ratio(ce["kl_zero"] - ce["kl_sae"], ce["kl_zero"]),
        delta_loss=ce["sae"] - ce["clean"],
    )


def held_out_skip(sae_info: dict, corpus: Corpus) -> int:
    """Contexts to skip so evaluation text was not seen in training (same corpus and seed), else 0."""
    trained_on = sae_info.get("corpus") or {}
    same = trained_on.get("spec") == corpus.spec and trained_on.get("seed") == corpus.seed
    return int(sae_info.get("harvest_contexts") or 0) if same else 0


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
) -> dict:
    """Reconstruction metrics and LM-loss metrics of an SAE (taking raw activations) on held-out text."""
    from .interop import check_model_match

    check_model_match(sae, loaded.name, loaded.d_model)
    contexts = pack_contexts(corpus.documents(), loaded.tokenizer, context_size)
    n_contexts = max(1, -(-tokens // (context_size - 1)))
    contexts = islice(contexts, skip_contexts, skip_contexts + n_contexts)
    activations: list[torch.Tensor] = []
    bar = progress_bar(total=n_contexts * (context_size - 1), desc="eval", unit="tok", enabled=show_progress)

    def batches():
        for batch in batched_contexts(contexts, batch_size):
            yield batch
            bar.update(batch[:, 1:].numel())

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return sae(x.float()).to(x.dtype)

    try:
        lm = lm_loss_metrics(loaded, hook_point, reconstruct, batches(), on_activations=lambda a: activations.append(a.float().cpu()))
    finally:
        bar.close()
    recon = evaluate_reconstruction(sae, activations)
    return {"hook_point": hook_point, "model": loaded.name, "held_out_from_context": skip_contexts, **recon.to_dict(), **{f"lm_{k}" if k == "tokens" else k: v for k, v in lm.to_dict().items()}}
