"""One SAE loader for every format: monoscope's own folders (= SAELens's) and the foreign ones interop.py reads.

    load_sae("runs/sae")                                     # a folder save_sae or SAELens wrote
    load_sae("hf://google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_5")
    load_any_sae("EleutherAI/sae-llama-3-8b-32x", subpath="layers.24")  # org/repo + sub-path: the hub

`load_sae` returns a native folder exactly as saved; every other source goes through `load_any_sae`, which
also records where the SAE came from (`info["source"]`) and its hook point and model as monoscope names
them (`info["hook_point"]`, `info["model"]`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import MonoscopeError
from ..model.hooks import HookPoint
from .base import SAE
from .interop import (
    FOREIGN_READERS,
    HF_PREFIX,
    foreign_format,
    is_hub_spec,
    resolve_hub,
    retarget,
    split_hub,
    sub_saes,
)
from .io import read_sae_folder


def load_sae(
    spec: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    *,
    subpath: str | None = None,
) -> SAE:
    """Load an SAE from any source `load_any_sae` reads; a native folder comes back exactly as saved.

    `device`/`dtype` override the saved ones (default: the saved dtype, on the CPU). The result has `.cfg`
    (SAEConfig) and `.info` (monoscope.json's contents, empty when the folder has none).
    """
    if subpath is None and foreign_format(spec) is None:
        return read_sae_folder(spec, device=device, dtype=dtype)
    return load_any_sae(spec, subpath, device=device, dtype=dtype)


def load_any_sae(
    spec: str | os.PathLike,
    subpath: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | None = None,
) -> SAE:
    """Load an SAE from a monoscope/SAELens/sparsify/Gemma Scope folder, a `params.npz`, or the hub.

    `spec`: a path, `hf://org/repo[/sub/path]`, or `org/repo` (hub) when no such path exists locally.
    `subpath`: a folder inside `spec` (a hub repository or a local folder of several SAEs).
    """
    source = str(spec)
    hub_name = not Path(spec).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source) and subpath is not None
    if is_hub_spec(spec) or hub_name:
        repo, inner = split_hub(source, subpath)
        folder = resolve_hub(repo, inner)
        source = f"{HF_PREFIX}{repo}" + (f"/{inner}" if inner else "")
        hub = (repo, inner)
    else:
        folder = Path(spec)
        if subpath:
            folder = folder / subpath
            source = str(folder)
        hub = None
    if not folder.exists():
        raise MonoscopeError(f"{folder} does not exist; give an SAE folder, a params.npz file or hf://org/repo/path")
    kind = foreign_format(folder)
    if kind == "multi":
        names = sub_saes(folder)
        raise MonoscopeError(
            f"{source} holds {len(names)} SAEs ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); "
            "say which one: give its sub-folder (--sae-subpath NAME, or hf://org/repo/NAME)"
        )
    if kind is None:
        sae = read_sae_folder(folder, device=device, dtype=dtype)
        device = dtype = None
    else:
        sae = FOREIGN_READERS[kind](folder, hub)
    sae.info.setdefault("source", source)
    _record_hook_and_model(sae)
    if dtype is not None or device is not None:
        sae = retarget(sae, device, dtype)
    return sae


def _record_hook_and_model(sae: SAE) -> None:
    info, meta = sae.info, sae.cfg.metadata or {}
    if not info.get("hook_point"):
        name = info.get("hook_name") or meta.get("hook_name")
        if name:
            try:
                info["hook_point"] = str(HookPoint.parse(str(name)))
            except MonoscopeError:
                info.setdefault("foreign_hook_name", str(name))
    if not info.get("model") and meta.get("model_name"):
        info["model"] = meta["model_name"]
