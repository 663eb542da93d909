"""What the decoder directions say on their own: logit effects, nearest features, a 2-D map.

- Logit effects: W_U @ (g * d) for each decoder row d (raw scale) with g the final norm's weight (mean-centred
  first for a LayerNorm, which removes the mean; 1 + weight for Gemma's RMSNorm), ignoring the norm's
  positive per-token scale. The top promoted and suppressed tokens per feature, computed blockwise.
- Nearest features: top-n by |cosine| of the unit decoder rows (sign kept), computed in row blocks so a
  100k-latent SAE never needs a d_sae x d_sae matrix.
- Map: UMAP (umap-learn, fixed random_state) of the unit decoder rows when it is installed and the SAE has
  at least `UMAP_MIN_FEATURES` latents, else the first two principal components; scaled to [0, 1].
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..model import find_blocks

UMAP_MIN_FEATURES = 1024


class _Progress(Protocol):
    def update(self, n: int) -> object: ...


_BLOCK_ELEMENTS = 1 << 25  # at most this many similarities / logits in memory at a time


def unit_rows(w: Tensor) -> Tensor:
    w = w.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__ == "RMSNorm":
        return True
    name = type(module).__name__.lower()
    return "norm" in name and not isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential))


def _output_embeddings(model: nn.Module) -> object:
    """The model's unembedding module (lm_head), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def final_norm(model: nn.Module) -> tuple[Tensor | None, bool]:
    """(effective multiplicative weight of the norm before the unembedding or None, whether it centres)."""
    try:
        blocks = find_blocks(model)
        inside = {id(m) for m in blocks.modules()}
    except Exception:  # noqa: BLE001 - a model without a block list: consider every module
        inside = set()
    head = _output_embeddings(model)
    chosen = None
    for _, module in model.named_modules():
        if id(module) in inside or module is head or module is model:
            continue
        if _is_norm(module):
            chosen = module
    if chosen is None:
        return None, False
    weight = getattr(chosen, "weight", None)
    name = type(chosen).__name__.lower()
    centres = isinstance(chosen, nn.LayerNorm) or ("layernorm" in name and "rms" not in name)
    if not isinstance(weight, torch.Tensor):
        return None, centres
    weight = weight.detach().float()
    if "gemma" in name:  # Gemma's RMSNorm multiplies by (1 + weight)
        weight = 1.0 + weight
    return weight, centres


def unembedding(model: nn.Module, vocab_size: int | None = None) -> Tensor:
    weight = getattr(_output_embeddings(model), "weight", None)
    if not isinstance(weight, torch.Tensor):
        from ..errors import MonoscopeError

        raise MonoscopeError(f"{type(model).__name__} has no output embedding (lm_head) to compute logit effects with")
    weight = weight.detach()
    if vocab_size is not None and 0 < vocab_size < weight.shape[0]:
        weight = weight[:vocab_size]  # rows past the tokenizer's vocabulary are padding
    return weight


def logit_directions(w_dec: Tensor, norm_weight: Tensor | None, centres: bool) -> Tensor:
    d = w_dec.detach().float()
    if centres:
        d = d - d.mean(dim=1, keepdim=True)
    if norm_weight is not None:
        d = d * norm_weight.to(d.device)
    return d


@torch.inference_mode()
def logit_effects(
    w_dec: Tensor,
    w_u: Tensor,
    norm_weight: Tensor | None = None,
    centres: bool = False,
    n: int = 10,
    progress: _Progress | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(up_values, up_ids, down_values, down_ids), each [d_sae, n]: the most promoted and most suppressed
    tokens of each decoder row through the final norm's weight and the unembedding."""
    d_sae = w_dec.shape[0]
    vocab = w_u.shape[0]
    n = min(n, vocab)
    device = w_u.device
    block = max(1, min(4096, _BLOCK_ELEMENTS // max(1, vocab)))
    up_v = torch.empty((d_sae, n))
    up_i = torch.empty((d_sae, n), dtype=torch.int64)
    dn_v = torch.empty((d_sae, n))
    dn_i = torch.empty((d_sae, n), dtype=torch.int64)
    for lo in range(0, d_sae, block):
        d = logit_directions(w_dec[lo : lo + block].to(device), norm_weight, centres)
        logits = d.to(w_u.dtype) @ w_u.T
        logits = logits.float()
        v, i = logits.topk(n, dim=1)
        up_v[lo : lo + block], up_i[lo : lo + block] = v.cpu(), i.cpu()
        v, i = logits.topk(n, dim=1, largest=False)
        dn_v[lo : lo + block], dn_i[lo : lo + block] = v.cpu(), i.cpu()
        if progress is not None:
            progress.update(d.shape[0])
    return up_v, up_i, dn_v, dn_i


@torch.inference_mode()
def nearest_features(w_dec: Tensor, n: int = 10, progress: _Progress | None = None) -> tuple[Tensor, Tensor]:
    """(neighbour ids [d_sae, n], cosines [d_sae, n]): by |cosine| of the decoder rows, sign kept, self excluded."""
    unit = unit_rows(w_dec)
    d_sae = unit.shape[0]
    n = min(n, d_sae - 1)
    block = max(1, min(4096, _BLOCK_ELEMENTS // max(1, d_sae)))
    ids = torch.empty((d_sae, n), dtype=torch.int64)
    cos = torch.empty((d_sae, n))
    for lo in range(0, d_sae, block):
        sims = unit[lo : lo + block] @ unit.T  # [b, d_sae]
        rows = torch.arange(sims.shape[0], device=sims.device)
        sims[rows, rows + lo] = 0.0
        magnitude = sims.abs()
        magnitude[rows, rows + lo] = -1.0  # never choose itself
        _, pick = magnitude.topk(n, dim=1)
        ids[lo : lo + block] = pick.cpu()
        cos[lo : lo + block] = sims.gather(1, pick).cpu()
        if progress is not None:
            progress.update(sims.shape[0])
    return ids, cos


def _scale01(xy: np.ndarray) -> np.ndarray:
    lo, hi = xy.min(0), xy.max(0)
    return ((xy - lo) / np.where(hi - lo > 0, hi - lo, 1.0)).astype(np.float32)


def feature_map(w_dec: Tensor, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """([d_sae, 2] coordinates in [0, 1], the method used: 'umap' or 'pca')."""
    unit = unit_rows(w_dec).cpu()
    d_sae = unit.shape[0]
    if method == "auto":
        method = "umap" if d_sae >= UMAP_MIN_FEATURES and _has_umap() else "pca"
    if method == "umap":
        if not _has_umap():
            from ..errors import MonoscopeError

            raise MonoscopeError("the UMAP map needs umap-learn: pip install umap-learn (or use --map pca)")
        import umap

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reducer = umap.UMAP(
                n_components=2,
                n_neighbors=min(15, d_sae - 1),
                min_dist=0.1,
                metric="euclidean",
                random_state=seed,
                init="spectral" if d_sae > 16 else "random",
            )
            xy = reducer.fit_transform(unit.numpy())
        return _scale01(np.asarray(xy, dtype=np.float64)), "umap"
    if method != "pca":
        from ..errors import MonoscopeError

        raise MonoscopeError(f"unknown map method {method!r}; use auto, umap, pca or none")
    if d_sae < 3:
        return np.zeros((d_sae, 2), dtype=np.float32), "pca"
    centred = unit - unit.mean(0, keepdim=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(centred, q=min(6, *centred.shape), center=False, niter=4)
    xy = (centred @ v[:, :2]).double().numpy()
    if xy.shape[1] < 2:
        xy = np.concatenate([xy, np.zeros((d_sae, 2 - xy.shape[1]))], 1)
    # a fixed sign per axis, so the map does not flip between runs
    signs = np.sign(xy[np.abs(xy).argmax(0), range(2)])
    return _scale01(xy * np.where(signs == 0, 1, signs)), "pca"


def _has_umap() -> bool:
    import importlib.util

    return importlib.util.find_spec("umap") is not None


# ---------------------------------------------------------------- the analysis steps


@dataclass
class LogitEffects:
    """Each feature's most promoted (`up`) and suppressed (`down`) tokens: [d_sae, n] values and token ids."""

    up_values: Tensor
    up_ids: Tensor
    down_values: Tensor
    down_ids: Tensor
    final_norm: str  # 'layernorm' (centres, then scales), 'weighted' (scales) or 'none'

    def top_promoted(self, feature: int, n: int) -> list[int]:
        return self.up_ids[feature, :n].tolist()

    def rows(self) -> Iterator[tuple[int, str, int, int, float]]:
        """(feature, 'up' | 'down', rank, token id, value), feature by feature, 'up' first."""
        for f in range(self.up_ids.shape[0]):
            for r in range(self.up_ids.shape[1]):
                yield (f, "up", r, int(self.up_ids[f, r]), float(self.up_values[f, r]))
            for r in range(self.down_ids.shape[1]):
                yield (f, "down", r, int(self.down_ids[f, r]), float(self.down_values[f, r]))


def compute_logit_effects(
    w_dec: Tensor,
    model: nn.Module,
    vocab_size: int,
    n: int,
    progress: _Progress | None = None,
) -> LogitEffects:
    """The logit effects of every decoder row through `model`'s final norm and unembedding (the first
    `vocab_size` rows: those past the tokenizer's vocabulary are padding)."""
    w_u = unembedding(model, vocab_size)
    norm_weight, centres = final_norm(model)
    up_v, up_i, dn_v, dn_i = logit_effects(w_dec.to(w_u.device), w_u, norm_weight, centres, n, progress=progress)
    kind = "layernorm" if centres else ("weighted" if norm_weight is not None else "none")
    return LogitEffects(up_v, up_i, dn_v, dn_i, kind)


@dataclass
class Neighbours:
    """Each feature's nearest features by decoder cosine: [d_sae, n] ids and cosines (n = 0 for one feature)."""

    ids: Tensor
    cosines: Tensor

    def rows(self) -> Iterator[tuple[int, int, int, float]]:
        for f in range(self.ids.shape[0]):
            for r in range(self.ids.shape[1]):
                yield (f, r, int(self.ids[f, r]), float(self.cosines[f, r]))


def find_neighbours(w_dec: Tensor, n: int, progress: _Progress | None = None) -> Neighbours:
    d_sae = w_dec.shape[0]
    if d_sae <= 1:
        return Neighbours(torch.zeros((d_sae, 0), dtype=torch.int64), torch.zeros((d_sae, 0)))
    return Neighbours(*nearest_features(w_dec, n, progress=progress))


@dataclass
class FeatureMap:
    """The 2-D layout of the features ([d_sae, 2] in [0, 1]), or none (`method` None) when not asked for."""

    xy: np.ndarray | None
    method: str | None

    def rows(self) -> Iterator[tuple[int, float, float]]:
        if self.xy is not None:
            for f in range(self.xy.shape[0]):
                yield (f, float(self.xy[f, 0]), float(self.xy[f, 1]))


def make_map(w_dec: Tensor, method: str, seed: int) -> FeatureMap:
    """`method`: auto, umap, pca or none."""
    if method == "none":
        return FeatureMap(None, None)
    return FeatureMap(*feature_map(w_dec, method, seed))
