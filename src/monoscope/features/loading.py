"""Load an SAE together with the model it reads, and check that they fit each other.

The model and hook point default to what the SAE recorded (`sae.recorded.SAERecord`: monoscope.json first,
then SAELens's cfg.json metadata), so SAEs trained elsewhere work too when their model is loadable.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import MonoscopeError
from ..model import LoadedModel, load_model, run_to
from ..sae import SAE, load_sae
from ..sae.interop import check_model_match
from ..sae.recorded import SAERecord


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
        raise MonoscopeError(
            f"SAE folder {path} does not exist; pass the folder `monoscope train` wrote (with cfg.json)"
        )
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
    record = SAERecord.of(sae)
    hook_point = record.hook_point(hook, what=str(sae_dir))
    if loaded is None:
        loaded = load_model(record.model_name(model, what=str(sae_dir)), device=device, dtype=dtype)
    if loaded.device != sae.device:
        sae = sae.to(loaded.device)
    check_compatible(sae, loaded, hook_point)
    return sae, loaded, hook_point
