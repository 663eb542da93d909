"""Load an SAE together with the model it reads, and check that they fit each other.

The model, hook point, context size and corpus default to what the SAE recorded: `monoscope.json`
(`model`, `hook_point`, `context_size`, `corpus`) first, then SAELens's cfg.json metadata (`model_name`,
`hook_name`, `context_size`), so SAEs trained elsewhere work too when their model is loadable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import MonoscopeError
from ..model import HookPoint, LoadedModel, load_model, run_to
from ..sae import SAE, load_sae
from ..sae.interop import check_model_match
from ..sae.io import sae_hook_point, sae_model_name


def _first(*values: Any) -> Any:
    return next((v for v in values if v not in (None, "")), None)


def sae_context_size(sae: SAE, default: int = 128) -> int:
    info, meta = sae.info or {}, sae.cfg.metadata or {}
    value = _first(info.get("context_size"), meta.get("context_size"))
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def sae_corpus(sae: SAE) -> dict[str, Any]:
    """The corpus the SAE was trained on, as open_corpus keywords (`spec`, `seed`, ...); starter when unknown."""
    corpus = (sae.info or {}).get("corpus")
    if isinstance(corpus, str):
        return {"spec": corpus}
    if isinstance(corpus, dict) and corpus.get("spec"):
        return {k: corpus[k] for k in ("spec", "seed", "text_column", "split", "dataset_config") if corpus.get(k) is not None}
    return {"spec": "starter"}


def check_compatible(sae: SAE, loaded: LoadedModel, hook: str) -> None:
    """Fail with a clear message when the SAE cannot read the model at `hook` (bad layer, wrong width); warn
    loudly when it was trained on another model of the same width."""
    check_model_match(sae, loaded.name, None)
    ids = torch.tensor([[_bos_id(loaded.tokenizer), _bos_id(loaded.tokenizer)]], device=loaded.device)
    width = run_to(loaded.model, [hook], ids)[hook].shape[-1]
    if width != sae.cfg.d_in:
        raise MonoscopeError(
            f"the SAE reads d_in={sae.cfg.d_in} activations but {loaded.name} has width {width} at {hook}; "
            "pass the model the SAE was trained on (--model) or check the hook point"
        )


def _bos_id(tokenizer) -> int:
    from ..data.packing import special_ids

    return special_ids(tokenizer)[0]


def open_sae(sae_dir: str | os.PathLike, device: str | torch.device | None = "cpu") -> SAE:
    """An SAE folder (monoscope, SAELens, sparsify, Gemma Scope) or an `hf://org/repo/sub/path` spec."""
    path = Path(sae_dir)
    if not str(sae_dir).startswith("hf://") and not path.exists():
        raise MonoscopeError(f"SAE folder {path} does not exist; pass the folder `monoscope train` wrote (with cfg.json)")
    from ..model import resolve_device

    return load_sae(sae_dir if str(sae_dir).startswith("hf://") else path, device=resolve_device(device))


def open_sae_and_model(
    sae_dir: str | os.PathLike,
    *,
    model: str | None = None,
    hook: str | None = None,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = "auto",
    loaded: LoadedModel | None = None,
) -> tuple[SAE, LoadedModel, str]:
    """(SAE, model, hook point), with the model and hook taken from the SAE's own records unless given."""
    sae = open_sae(sae_dir, device)
    hook_point = str(HookPoint.parse(hook)) if hook else sae_hook_point(sae)
    if hook_point is None:
        raise MonoscopeError(f"{sae_dir} does not say which hook point it reads (no hook_point in monoscope.json); pass --hook")
    if loaded is None:
        name = model or sae_model_name(sae)
        if name is None:
            raise MonoscopeError(f"{sae_dir} does not say which model it reads (no model in monoscope.json); pass --model")
        loaded = load_model(name, device=device, dtype=dtype)
    if loaded.device != sae.device:
        sae = sae.to(loaded.device)
    check_compatible(sae, loaded, hook_point)
    return sae, loaded, hook_point
