"""Read SAEs written by other tools, and check an SAE against the model it is used with.

`foreign_format` says which reader a folder needs and `FOREIGN_READERS` holds them; `monoscope.sae.load_sae`
and `load_any_sae` (loader.py) dispatch to them. They read, into monoscope's inference classes (exactly, or
not at all):

- **SAELens folders** (`cfg.json` + `sae_weights.safetensors`): `standard`, `topk`, `jumprelu` (what
  `load_sae` reads natively), plus
  - `gated` (Rajamanoharan et al. 2024), converted *exactly* to JumpReLU: with
    `u = (x - b_dec) @ W_enc`, gated codes are `ReLU(e^r_mag u + b_mag) * [u + b_gate > 0]`; since
    `e^r_mag > 0` the gate is `pre > θ` for `pre = e^r_mag u + b_mag` and `θ = b_mag - e^r_mag b_gate`,
    i.e. a JumpReLU SAE with `W_enc · e^r_mag`, `b_enc = b_mag`, `threshold = θ` (θ may be negative);
  - `topk` with `rescale_acts_by_decoder_norm: true` (pre-activations times `||W_dec,i||`, codes divided
    by it before decoding), folded exactly into `W_enc, b_enc` (times the norm) and `W_dec` (divided);
  - older SAELens TopK configs (`architecture: standard`, `activation_fn_str: topk`,
    `activation_fn_kwargs: {k}`).
  SAELens normalisation other than `none` is refused (it depends on a dataset statistic the folder does
  not carry in a form monoscope can fold); transcoders and skip connections are refused.
- **EleutherAI sparsify** (`cfg.json` + `sae.safetensors`: `encoder.weight` [d_sae, d_in], `encoder.bias`,
  `W_dec` [d_sae, d_in], `b_dec`; cfg `k`, `num_latents` or `expansion_factor`, `d_in`): a TopK SAE
  (sparsify: `TopK(ReLU(W (x - b_dec) + b))`, the same codes as monoscope's `ReLU(TopK(...))`). A folder of
  per-hookpoint folders (`layers.6/`, ...) needs the sub-path. `groupmax`, transcoders, skip connections
  are refused.
- **Gemma Scope** `params.npz` (`W_enc` [d_in, d_sae], `W_dec`, `b_enc`, `b_dec`, `threshold`): JumpReLU
  without the `- b_dec` on the input (`apply_b_dec_to_input: false`), as in the Gemma Scope paper.
- **The Hugging Face hub**: `hf://org/repo/sub/path` (or `org/repo` with `subpath=`), fetched with
  `huggingface_hub.snapshot_download(allow_patterns="sub/path/*")`, then read as above. Works offline
  from the hub cache (`HF_HUB_OFFLINE=1`).

Hook names are mapped to monoscope hook points (`blocks.12.hook_resid_post`, `layers.12` -> `resid_post.12`;
Gemma Scope `layer_12` in a `-res` repo -> `resid_post.12`) and recorded in `sae.info["hook_point"]`; the
model name, when known, in `sae.info["model"]`. `sae.info["source"]` says where it came from.

Like monoscope's own folders, every converted SAE takes raw activations.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .._io import read_json
from ..errors import MonoscopeError
from .base import DTYPES, SAE, SAEConfig, default_metadata, inference_class
from .io import CFG_FILENAME, WEIGHTS_FILENAME, sae_model_name
from .registry import inference_classes, names

HF_PREFIX = "hf://"
SAELENS_WEIGHTS = WEIGHTS_FILENAME
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMASCOPE_PARAMS = "params.npz"

# Gemma Scope repositories -> (model id on the hub, hook kind of the SAEs in it).
_GEMMASCOPE_MODELS = {"2b": "google/gemma-2-2b", "9b": "google/gemma-2-9b", "27b": "google/gemma-2-27b"}
_GEMMASCOPE_KINDS = {"res": "resid_post", "mlp": "mlp_out"}


# ---------------------------------------------------------------- format detection


def is_hub_spec(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def foreign_format(spec: str | os.PathLike) -> str | None:
    """What `load_sae` cannot read natively: 'hub', 'sparsify', 'gemmascope', 'saelens' (a SAELens config that
    needs converting), 'multi' (a folder of per-hookpoint folders); None for a folder `load_sae` reads itself
    (or one that is not an SAE at all, which it then reports)."""
    if is_hub_spec(spec):
        return "hub"
    path = Path(spec)
    if path.is_file() and path.suffix == ".npz":
        return "gemmascope"
    if not path.is_dir():
        return None
    if (path / GEMMASCOPE_PARAMS).is_file() and not (path / SAELENS_WEIGHTS).is_file():
        return "gemmascope"
    if (path / SPARSIFY_WEIGHTS).is_file() and not (path / SAELENS_WEIGHTS).is_file():
        return "sparsify"
    if (path / CFG_FILENAME).is_file() and (path / SAELENS_WEIGHTS).is_file():
        try:
            cfg = read_json(path / CFG_FILENAME)
        except Exception:
            return None
        if isinstance(cfg, dict) and _saelens_needs_conversion(cfg):
            return "saelens"
        return None
    if not (path / CFG_FILENAME).exists() and sub_saes(path):
        return "multi"
    return None


def _saelens_needs_conversion(cfg: dict[str, Any]) -> bool:
    arch = str(cfg.get("architecture", "standard"))
    if arch not in (*inference_classes(), *names()):  # what read_sae_folder runs (a training name also works)
        return True
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        return True
    return arch == "standard" and str(cfg.get("activation_fn_str", "relu")) == "topk"


def sub_saes(folder: Path) -> list[str]:
    names = []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and ((child / "cfg.json").is_file() or (child / GEMMASCOPE_PARAMS).is_file()):
            names.append(child.name)
    return names


# ---------------------------------------------------------------- hub


def split_hub(spec: str, subpath: str | None) -> tuple[str, str]:
    text = spec[len(HF_PREFIX) :] if spec.startswith(HF_PREFIX) else spec
    parts = [p for p in text.strip("/").split("/") if p]
    if len(parts) < 2:
        raise MonoscopeError(f"{spec!r} is not a hub SAE: write hf://ORG/REPO[/SUB/PATH]")
    inner = "/".join(parts[2:] + [p for p in (subpath or "").strip("/").split("/") if p])
    return "/".join(parts[:2]), inner


def resolve_hub(repo: str, subpath: str = "") -> Path:
    """Download (or find in the hub cache) the files under `subpath` of hub repository `repo`; the local folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - transformers brings it
        raise MonoscopeError("loading SAEs from the hub needs huggingface_hub: pip install huggingface_hub") from err
    patterns = [f"{subpath}/*", subpath] if subpath else None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        root = Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=offline))
    except Exception as err:  # network errors, missing repos, offline cache misses: all user-fixable
        where = f"{repo}/{subpath}" if subpath else repo
        hint = (
            (
                "HF_HUB_OFFLINE is set and the files are not in the hub cache: unset it (or run "
                f"`huggingface-cli download {repo} --include '{subpath}/*'` where there is a network)"
            )
            if offline
            else "check the repository id and sub-path, your network, and HF_TOKEN for gated repositories"
        )
        raise MonoscopeError(
            f"could not fetch {where} from the Hugging Face hub ({type(err).__name__}); {hint}"
        ) from err
    folder = root / subpath if subpath else root
    if not folder.exists():
        raise MonoscopeError(f"{repo} has no {subpath!r}; check the sub-path (e.g. layer_12/width_16k/average_l0_82)")
    return folder


def retarget(sae: SAE, device: str | torch.device | None, dtype: str | None) -> SAE:
    """`sae` as a new SAE with the given device and dtype (default: its dtype, on the CPU)."""
    if dtype is not None and dtype not in DTYPES:
        raise MonoscopeError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    cfg = SAEConfig.from_dict({**sae.cfg.to_dict(), "dtype": dtype or sae.cfg.dtype, "device": str(device or "cpu")})
    return _build(cfg, {k: v for k, v in sae.state_dict().items()}, sae.info)


def _build(cfg: SAEConfig, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> SAE:
    sae = inference_class(cfg.architecture)(cfg)
    expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    for name, shape in expected.items():
        if name not in tensors:
            raise MonoscopeError(f"the SAE lacks {name}, which a {cfg.architecture} SAE needs")
        if tuple(tensors[name].shape) != shape:
            raise MonoscopeError(
                f"{name} has shape {list(tensors[name].shape)} but d_in={cfg.d_in}, d_sae={cfg.d_sae} needs {list(shape)}"
            )
    with torch.no_grad():
        for name, target in sae.state_dict().items():
            target.copy_(tensors[name].to(device=target.device, dtype=target.dtype))
    sae.info = dict(info)
    return sae


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise MonoscopeError(f"{path} could not be read ({err}); the file is damaged or not safetensors") from err


def _dtype_name(t: torch.Tensor) -> str:
    for name, dt in DTYPES.items():
        if dt == t.dtype:
            return name
    return "float32"


# ---------------------------------------------------------------- SAELens


def _load_saelens_converted(folder: Path, hub: tuple[str, str] | None = None) -> SAE:
    cfg = read_json(folder / "cfg.json")
    tensors = _read_safetensors(folder / SAELENS_WEIGHTS)
    arch = str(cfg.get("architecture", "standard"))
    norm = cfg.get("normalize_activations")
    if norm not in (None, False, "none"):
        raise MonoscopeError(
            f"{folder}: normalize_activations={norm!r} is not supported (the SAE expects inputs rescaled by a dataset "
            "statistic); fold the scale into its weights with SAELens (`fold_activation_norm_scaling_factor`) and save again"
        )
    if cfg.get("reshape_activations", "none") not in (None, "none"):
        raise MonoscopeError(
            f"{folder}: reshape_activations={cfg.get('reshape_activations')!r} (hook_z SAEs) is not supported"
        )
    meta = (
        cfg.get("metadata")
        if isinstance(cfg.get("metadata"), dict)
        else {
            key: cfg[key]
            for key in ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path")
            if key in cfg
        }
    )
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    info = {"format": "saelens", "converted_from": arch}
    if arch == "gated":
        needed = {"W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag"}
        if not needed <= set(tensors):
            # (wording kept from before gated support, which tests/test_sae_io.py matches)
            raise MonoscopeError(
                f"{folder}: SAE architecture 'gated' is not supported; monoscope can load: topk, jumprelu, standard, and "
                f"gated SAEs with {', '.join(sorted(needed))} (converted exactly to jumprelu), but the weights have "
                f"{', '.join(sorted(tensors))}"
            )
        with torch.no_grad():
            scale = tensors["r_mag"].double().exp()
            w_enc = (tensors["W_enc"].double() * scale).to(tensors["W_enc"].dtype)
            threshold = (tensors["b_mag"].double() - scale * tensors["b_gate"].double()).to(tensors["b_mag"].dtype)
        out = {
            "W_enc": w_enc,
            "W_dec": tensors["W_dec"],
            "b_enc": tensors["b_mag"],
            "b_dec": tensors["b_dec"],
            "threshold": threshold,
        }
        sae_cfg = SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            architecture="jumprelu",
            dtype=_dtype_name(tensors["W_dec"]),
            apply_b_dec_to_input=apply_b_dec,
            metadata={**default_metadata(), **meta},
        )
        return _build(sae_cfg, out, info)
    if arch == "standard" and str(cfg.get("activation_fn_str", "relu")) == "topk":
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if "k" not in kwargs:
            raise MonoscopeError(f"{folder}: a topk SAE needs activation_fn_kwargs.k in cfg.json")
        arch, cfg = "topk", {**cfg, "k": int(kwargs["k"])}
    if arch == "topk":
        k = cfg.get("k")
        if k is None:
            raise MonoscopeError(f"{folder}: a topk SAE needs k in cfg.json")
        out = {name: tensors[name] for name in ("W_enc", "W_dec", "b_enc", "b_dec") if name in tensors}
        if len(out) != 4:
            raise MonoscopeError(
                f"{folder}: a topk SAE needs W_enc, W_dec, b_enc, b_dec; found {', '.join(sorted(tensors))}"
            )
        if cfg.get("rescale_acts_by_decoder_norm"):
            with torch.no_grad():
                n = out["W_dec"].double().norm(dim=-1)
                out["W_enc"] = (out["W_enc"].double() * n).to(out["W_enc"].dtype)
                out["b_enc"] = (out["b_enc"].double() * n).to(out["b_enc"].dtype)
                out["W_dec"] = (out["W_dec"].double() / n[:, None]).to(out["W_dec"].dtype)
            info["folded"] = "rescale_acts_by_decoder_norm"
        sae_cfg = SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            architecture="topk",
            k=int(k),
            dtype=_dtype_name(out["W_dec"]),
            apply_b_dec_to_input=apply_b_dec,
            metadata={**default_metadata(), **meta},
        )
        return _build(sae_cfg, out, info)
    raise MonoscopeError(
        f"{folder}: SAELens architecture {arch!r} is not supported; monoscope reads standard, topk, jumprelu and gated "
        "(converted exactly to jumprelu)"
    )


# ---------------------------------------------------------------- sparsify


def _load_sparsify(folder: Path, hub: tuple[str, str] | None = None) -> SAE:
    cfg = read_json(folder / "cfg.json")
    if not isinstance(cfg, dict) or "d_in" not in cfg:
        raise MonoscopeError(f"{folder / 'cfg.json'} has no d_in; it is not a sparsify SAE config")
    if cfg.get("transcode"):
        raise MonoscopeError(
            f"{folder} is a sparsify transcoder (it predicts another site's output); only SAEs are supported"
        )
    if cfg.get("skip_connection") or cfg.get("embed_skip") or cfg.get("gram_lookup"):
        raise MonoscopeError(
            f"{folder}: sparsify coders with skip connections or n-gram lookup tables are not supported"
        )
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise MonoscopeError(f"{folder}: sparsify activation {activation!r} is not supported (only topk)")
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("num_latents") or 0) or int(d_in * cfg.get("expansion_factor", 32))
    tensors = _read_safetensors(folder / SPARSIFY_WEIGHTS)
    if "W_dec" not in tensors:
        raise MonoscopeError(
            f"{folder / SPARSIFY_WEIGHTS} has no W_dec (saved without its decoder); it cannot reconstruct"
        )
    try:
        out = {
            "W_enc": tensors["encoder.weight"].T.contiguous(),
            "b_enc": tensors["encoder.bias"],
            "W_dec": tensors["W_dec"],
            "b_dec": tensors["b_dec"],
        }
    except KeyError as err:
        raise MonoscopeError(
            f"{folder / SPARSIFY_WEIGHTS} lacks {err.args[0]}; found {', '.join(sorted(tensors))}"
        ) from None
    hook = folder.name
    meta = {**default_metadata(), "hook_name": hook}
    sae_cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture="topk",
        k=int(cfg.get("k", 32)),
        dtype=_dtype_name(out["W_dec"]),
        apply_b_dec_to_input=True,
        metadata=meta,
    )
    return _build(sae_cfg, out, {"format": "sparsify", "hook_name": hook})


# ---------------------------------------------------------------- Gemma Scope


def _load_gemmascope(path: Path, hub: tuple[str, str] | None = None) -> SAE:
    if path.is_dir():
        path = path / GEMMASCOPE_PARAMS
    try:
        with np.load(path) as data:
            arrays = {name: np.asarray(data[name]) for name in data.files}
    except Exception as err:
        raise MonoscopeError(f"{path} could not be read as .npz ({err})") from err
    needed = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    missing = [name for name in needed if name not in arrays]
    if missing:
        raise MonoscopeError(f"{path} lacks {', '.join(missing)}; a Gemma Scope params.npz has {', '.join(needed)}")
    d_in, d_sae = arrays["W_enc"].shape
    tensors = {name: torch.from_numpy(np.ascontiguousarray(arrays[name])) for name in needed}
    tensors = {
        name: (t.float() if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else t)
        for name, t in tensors.items()
    }
    info: dict[str, Any] = {"format": "gemmascope"}
    where = "/".join(hub) if hub else str(path.parent)
    layer = re.search(r"layer_(\d+)", where)
    repo = hub[0] if hub else where
    size = re.search(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)", repo)
    meta = default_metadata()
    if size:
        model = _GEMMASCOPE_MODELS.get(size[1])
        if model:
            info["model"] = model + ("-it" if size[2] == "it" else "")
            meta["model_name"] = info["model"]
        kind = _GEMMASCOPE_KINDS.get(size[3])
        if kind and layer:
            info["hook_point"] = f"{kind}.{int(layer[1])}"
            meta["hook_name"] = f"blocks.{int(layer[1])}.hook_{kind}"
    elif layer:
        info["layer"] = int(layer[1])
    cfg = SAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        architecture="jumprelu",
        dtype=_dtype_name(tensors["W_dec"]),
        apply_b_dec_to_input=False,
        metadata=meta,
    )
    return _build(cfg, tensors, info)


#: The reader of each foreign format: (folder or file, (hub repo, sub-path) when fetched from the hub) -> SAE.
FOREIGN_READERS: dict[str, Callable[[Path, "tuple[str, str] | None"], SAE]] = {
    "gemmascope": _load_gemmascope,
    "sparsify": _load_sparsify,
    "saelens": _load_saelens_converted,
}


# ---------------------------------------------------------------- models


def _canonical_model(name: str | None) -> str | None:
    if not name:
        return None
    text = str(name).strip().rstrip("/").lower()
    text = text.split("/")[-1]  # org/model and model compare equal
    return re.sub(r"[^a-z0-9.]+", "-", text)


def same_model(a: str, b: str) -> bool:
    """Whether two model names (hub ids with or without the org, folders, the embedded name) mean one model."""
    a, b = str(a).rstrip("/"), str(b).rstrip("/")
    if a == b or _canonical_model(a) == _canonical_model(b):
        return True
    try:
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    except OSError:
        return False


def check_model_match(
    sae: SAE, model_name: str | None, d_model: int | None, *, cli: bool = False, category: type[Warning] = UserWarning
) -> str | None:
    """Refuse an SAE whose width differs from the model's; warn loudly when it was trained on another model.

    Every place that puts an SAE on a model (features, steering, eval, server) calls this: a same-width SAE
    from another model (e.g. the base model of a fine-tune) otherwise runs silently and means nothing.
    Returns the warning text (None when the names agree or one is unknown). `cli=True` also prints the warning
    to stderr as `monoscope: warning: ...`, so it is seen even where Python warnings are filtered.
    """
    if d_model is not None and int(d_model) != sae.cfg.d_in:
        raise MonoscopeError(
            f"the SAE reads d_in={sae.cfg.d_in} activations but the model's width is d_model={d_model}: it was trained on another "
            "model; use the model the SAE was trained on (--model)"
        )
    trained = sae_model_name(sae)
    if not trained or not model_name or same_model(trained, model_name):
        return None
    message = (
        f"this SAE was trained on {trained!r} but is being used with {model_name!r}; its features may mean "
        "nothing there (same width, different model)"
    )
    warnings.warn(message, category, stacklevel=3)
    if cli:
        print(f"monoscope: warning: {message}", file=sys.stderr, flush=True)
    return message
