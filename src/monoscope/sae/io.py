"""Saving and loading SAEs as SAELens folders.

A saved SAE is a folder with
- `cfg.json`: SAELens's config (d_in, d_sae, architecture, dtype, device, apply_b_dec_to_input,
  normalize_activations, reshape_activations, metadata{model_name, hook_name, ...}; `k` for TopK),
- `sae_weights.safetensors`: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]
  (+ threshold [d_sae] for JumpReLU),
- `monoscope.json`: monoscope's own facts (activation scale, hook point, model, corpus, training stats),
  kept apart so that SAELens (`SAE.load_from_disk`) reads the folder as one of its own.
Every file is written atomically. Nothing is pickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .._io import atomic_save_safetensors, atomic_write_json, read_json
from ..errors import MonoscopeError
from ..model.hooks import HookPoint
from .base import DTYPES, SAE, SAELENS_METADATA_KEYS, SAEConfig, inference_class
from .training import TrainingSAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
INFO_FILENAME = "monoscope.json"
INFO_FORMAT = "monoscope-sae/1"


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def save_sae(sae: SAE, folder: str | os.PathLike, info: Mapping[str, Any] | None = None) -> Path:
    """Write `sae` to `folder` (created if needed) in SAELens's format plus monoscope.json; returns the folder.

    A training-form SAE is converted to its inference form first. Keys of `info` that SAELens keeps in
    cfg.json's metadata (model_name, hook_name, context_size, prepend_bos, dataset_path, ...) are copied
    there too (the hook point as TransformerLens names it, as SAELens expects); all of `info` goes to
    monoscope.json and becomes `sae.info`.
    """
    if isinstance(sae, TrainingSAE):
        sae = sae.to_inference()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merged_info = {**sae.info, **dict(info or {})}
    cfg = sae.cfg.to_saelens_dict()
    for key in SAELENS_METADATA_KEYS:
        if merged_info.get(key) is not None:
            cfg["metadata"][key] = merged_info[key]
    hook = merged_info.get("hook_name") or merged_info.get("hook_point")
    if hook:  # SAELens attaches SAEs to models by TransformerLens hook name; monoscope.json keeps ours
        try:
            cfg["metadata"]["hook_name"] = HookPoint.parse(str(hook)).transformer_lens_name
        except MonoscopeError:
            cfg["metadata"]["hook_name"] = str(hook)
    cfg["device"] = str(sae.device)
    atomic_save_safetensors(folder / WEIGHTS_FILENAME, sae.weights(), metadata={"format": "pt"})
    atomic_write_json(folder / CFG_FILENAME, _json_safe(cfg))
    atomic_write_json(folder / INFO_FILENAME, _json_safe({"format": INFO_FORMAT, **merged_info}))
    sae.info = {"format": INFO_FORMAT, **merged_info}
    return folder


def _shape_text(shape: tuple[int, ...] | torch.Size) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def read_sae_folder(
    folder: str | os.PathLike, device: str | torch.device | None = None, dtype: str | None = None
) -> SAE:
    """Read an SAE folder in monoscope's (= SAELens's) own form; checks every tensor's shape against cfg.json.

    `device`/`dtype` override the saved ones (default: cfg.json's dtype, on the CPU). The result has
    `.cfg` (SAEConfig) and `.info` (monoscope.json's contents, empty when the folder has none). Use
    `monoscope.sae.load_sae`, which also reads the other formats (loader.py).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MonoscopeError(
            f"{folder} is not a folder; give the folder that holds cfg.json and sae_weights.safetensors"
        )
    cfg_path = folder / CFG_FILENAME
    weights_path = folder / WEIGHTS_FILENAME
    if not cfg_path.is_file():
        raise MonoscopeError(f"{folder} has no {CFG_FILENAME}; it is not a saved SAE")
    if not weights_path.is_file():
        raise MonoscopeError(f"{folder} has no {WEIGHTS_FILENAME}; the SAE's weights are missing")
    raw_cfg = read_json(cfg_path)
    if not isinstance(raw_cfg, dict):
        raise MonoscopeError(f"{cfg_path} is not a JSON object")
    architecture = str(raw_cfg.get("architecture", "standard"))
    sae_class = inference_class(architecture)
    raw_cfg = {**raw_cfg, "architecture": sae_class.architecture, "device": str(device or "cpu")}
    if dtype is not None:
        raw_cfg["dtype"] = dtype
    try:
        cfg = SAEConfig.from_saelens_dict(raw_cfg)
    except MonoscopeError as err:
        raise MonoscopeError(f"{cfg_path}: {err}") from err
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise MonoscopeError(
            f"{weights_path} could not be read ({err}); the file is damaged or not safetensors"
        ) from err
    tensors = sae_class.adapt_saved_tensors(tensors)
    sae = sae_class(cfg)
    expected = {name: tuple(tensor.shape) for name, tensor in sae.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise MonoscopeError(f"{weights_path} lacks {', '.join(missing)}, which a {cfg.architecture} SAE needs")
    if unexpected:
        raise MonoscopeError(
            f"{weights_path} has tensors a {cfg.architecture} SAE does not use: {', '.join(unexpected)}; "
            "check the architecture in cfg.json"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise MonoscopeError(
                f"{weights_path}: {name} has shape {_shape_text(tensors[name].shape)} but cfg.json "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) needs {_shape_text(shape)}"
            )
    with torch.no_grad():
        for name, parameter in sae.state_dict().items():
            parameter.copy_(tensors[name].to(DTYPES[cfg.dtype]))
    info_path = folder / INFO_FILENAME
    sae.info = read_json(info_path) if info_path.is_file() else {}
    if not isinstance(sae.info, dict):
        raise MonoscopeError(f"{info_path} is not a JSON object")
    return sae


def _recorded(sae: SAE, info_keys: tuple[str, ...], metadata_key: str) -> str | None:
    info, meta = getattr(sae, "info", None) or {}, getattr(getattr(sae, "cfg", None), "metadata", None) or {}
    return next(
        (str(v) for v in (*(info.get(k) for k in info_keys), meta.get(metadata_key)) if v not in (None, "")), None
    )


def sae_hook_point(sae: SAE) -> str | None:
    """The hook point the SAE reads, as monoscope names it: monoscope.json first, then SAELens's metadata."""
    name = _recorded(sae, ("hook_point", "hook_name"), "hook_name")
    return None if name is None else str(HookPoint.parse(name))


def sae_model_name(sae: SAE) -> str | None:
    """The model the SAE was trained on, as recorded (monoscope.json, then SAELens's metadata)."""
    return _recorded(sae, ("model", "model_name"), "model_name")
