"""The SAE base class and its config, shared by every architecture.

Parameters follow SAELens's names and shapes so a saved SAE is a SAELens folder:
`W_enc` [d_in, d_sae], `W_dec` [d_sae, d_in], `b_enc` [d_sae], `b_dec` [d_in] (+ `threshold` [d_sae] for
JumpReLU). `W_enc` is stored as the transpose of a contiguous [d_sae, d_in] buffer: each latent's encoder
vector is then contiguous in memory, which is what the sparse backward pass and per-latent look-ups touch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import JsonConfig, require
from ..errors import MonoscopeError
from .registry import inference_classes, inference_name
from .sparse import SparsePattern, sparse_decode

#: Keys SAELens keeps in cfg.json's `metadata` for an SAE trained on a language model.
SAELENS_METADATA_KEYS = (
    "model_name",
    "hook_name",
    "hook_head_index",
    "model_class_name",
    "context_size",
    "prepend_bos",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def default_metadata() -> dict[str, Any]:
    # `sae_lens_version` names the cfg.json layout (SAELens >= 6 reads `metadata` as a dict only when it is
    # set); `sae_lens_training_version` stays null because SAELens did not train the SAE.
    return {
        "model_name": None,
        "hook_name": None,
        "hook_head_index": None,
        "context_size": None,
        "prepend_bos": True,
        "dataset_path": None,
        "sae_lens_version": "6.0.0",
        "sae_lens_training_version": None,
    }


@dataclass
class SAEConfig(JsonConfig):
    """What an SAE is, with SAELens's cfg.json field names; `architecture` is the inference form."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    metadata: dict[str, Any] = field(default_factory=default_metadata)

    def __post_init__(self) -> None:
        require(isinstance(self.d_in, int) and self.d_in > 0, f"d_in must be a positive integer, got {self.d_in!r}")
        require(isinstance(self.d_sae, int) and self.d_sae > 0, f"d_sae must be a positive integer, got {self.d_sae!r}")
        runnable = inference_classes()
        require(
            self.architecture in runnable,
            f"unknown SAE architecture {self.architecture!r}; monoscope can run: {', '.join(runnable)}",
        )
        inference_class(self.architecture).check_config(self)
        require(self.dtype in DTYPES, f"unsupported dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        require(
            self.normalize_activations == "none",
            f"normalize_activations={self.normalize_activations!r} is not supported; monoscope folds its "
            "activation scale into the weights, so it is always 'none'",
        )
        require(
            self.reshape_activations == "none", "reshape_activations must be 'none' (hook_z SAEs are not supported)"
        )
        self.metadata = {**default_metadata(), **dict(self.metadata or {})}

    def to_saelens_dict(self) -> dict[str, Any]:
        """The cfg.json content: SAELens's fields only (a TopK config also carries `k`)."""
        out: dict[str, Any] = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": self.device,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "reshape_activations": self.reshape_activations,
            "metadata": dict(self.metadata),
        }
        return {**out, **inference_class(self.architecture).saelens_fields(self)}

    @classmethod
    def from_saelens_dict(cls, data: dict[str, Any]) -> "SAEConfig":
        """Read a cfg.json written by monoscope or SAELens; fields SAELens adds that monoscope does not use are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {key: value for key, value in data.items() if key in names}
        if data.get("normalize_activations") in (None, False):
            known["normalize_activations"] = "none"
        if not getattr(inference_classes().get(str(known.get("architecture"))), "uses_k", False):
            known.pop("k", None)
        if not isinstance(known.get("metadata"), dict):
            known["metadata"] = {key: data[key] for key in SAELENS_METADATA_KEYS if key in data}
        for required in ("d_in", "d_sae"):
            if required not in known:
                raise MonoscopeError(f"cfg.json has no {required!r}; it is not an SAE config")
        return cls(**known)


def inference_class(architecture: str) -> type[SAE]:
    """The class that runs a saved SAE whose cfg.json says `architecture` (a training name also works: relu)."""
    classes = inference_classes()
    found = classes.get(inference_name(architecture))
    if found is None:
        raise MonoscopeError(
            f"SAE architecture {architecture!r} is not supported; monoscope can load: {', '.join(classes)}"
        )
    assert issubclass(found, SAE)
    return found


class SAE(nn.Module):
    """An SAE at inference: `encode(x)` -> dense codes, `decode(z)`, `forward(x)` -> reconstruction.

    Inputs may have any leading shape [..., d_in]. `info` holds monoscope's own facts about the SAE (the
    contents of monoscope.json: hook point, model, activation scale, training stats), empty when unknown.
    """

    #: The name cfg.json gives this architecture (SAELens's).
    architecture: ClassVar[str] = ""
    #: Whether the config's `k` belongs to the architecture (written to and read from cfg.json).
    uses_k: ClassVar[bool] = False

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Refuse a config this architecture cannot run (called by `SAEConfig` on construction)."""

    @classmethod
    def saelens_fields(cls, cfg: SAEConfig) -> dict[str, Any]:
        """The architecture's own cfg.json fields, besides those every SAELens config has."""
        return {}

    @classmethod
    def adapt_saved_tensors(cls, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Saved tensors under the names this class loads (a folder may hold another form of a parameter)."""
        return tensors

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ValueError(
                f"{type(self).__name__} needs architecture {self.architecture!r}, got {cfg.architecture!r}"
            )
        self.cfg = cfg
        self.info: dict[str, Any] = {}
        kw = {"dtype": DTYPES[cfg.dtype], "device": torch.device(cfg.device)}
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, **kw).T)
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))

    # ---- shape helpers -------------------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def _flat_input(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """x [..., d_in] -> ([n, d_in] in the SAE's dtype and device, leading shape)."""
        if x.shape[-1] != self.cfg.d_in:
            raise MonoscopeError(f"activations have d={x.shape[-1]} but the SAE expects d_in={self.cfg.d_in}")
        lead = tuple(x.shape[:-1])
        return x.reshape(-1, self.cfg.d_in).to(device=self.device, dtype=self.dtype), lead

    # ---- the maps ------------------------------------------------------------------------------------

    def centered_input(self, x: Tensor) -> Tensor:
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_activations(self, x: Tensor) -> Tensor:
        """Encoder pre-activations [n, d_sae] of flat input [n, d_in]: one dense GEMM."""
        return torch.addmm(self.b_enc, self.centered_input(x), self.W_enc)

    def activation(self, pre: Tensor) -> Tensor:
        """Dense codes from pre-activations; each architecture defines it."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes [..., d_sae]."""
        flat, lead = self._flat_input(x)
        return self.activation(self.pre_activations(flat)).reshape(*lead, self.cfg.d_sae)

    def decode(self, z: Tensor) -> Tensor:
        """Reconstruction [..., d_in] from dense codes [..., d_sae]."""
        lead = tuple(z.shape[:-1])
        z = z.reshape(-1, self.cfg.d_sae).to(self.dtype)
        return (z @ self.W_dec + self.b_dec).reshape(*lead, self.cfg.d_in)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def encode_topk(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """The k largest codes per token as (values [..., k], latent indices [..., k]), for fast analysis.

        A zero value means that slot's latent does not fire (the token has fewer than k active latents).
        For a TopK SAE `k` defaults to its own k and this is exact; other architectures need `k`.
        """
        k = k or self.cfg.k
        if k is None:
            raise MonoscopeError(
                f"encode_topk on a {self.architecture} SAE needs k (how many latents per token to return)"
            )
        codes = self.encode(x)
        values, indices = codes.topk(min(k, self.cfg.d_sae), dim=-1)
        return values, indices

    def decode_topk(self, values: Tensor, indices: Tensor) -> Tensor:
        """Reconstruction from sparse codes (values, indices) [..., m]; reads only the m decoder rows per token."""
        lead = tuple(values.shape[:-1])
        m = values.shape[-1]
        pattern = SparsePattern.from_topk(indices.reshape(-1, m).to(self.device), self.cfg.d_sae)
        out = sparse_decode(values.reshape(-1).to(self.dtype), self.W_dec, pattern) + self.b_dec
        return out.reshape(*lead, self.cfg.d_in)

    # ---- transformations -----------------------------------------------------------------------------

    @torch.no_grad()
    def fold_activation_scale(self, scale: float) -> None:
        """Make the SAE take raw activations when it was trained on `scale * raw` activations.

        Exact for every architecture: pre-activations (and so codes, thresholds and the top-k choice) are
        unchanged, and the reconstruction comes out in raw units.
        """
        if scale <= 0:
            raise MonoscopeError(f"activation scale must be positive, got {scale}")
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    def weights(self) -> dict[str, Tensor]:
        """The tensors saved in sae_weights.safetensors, by SAELens name."""
        return {name: tensor.detach() for name, tensor in self.state_dict().items()}

    def extra_repr(self) -> str:
        k = f", k={self.cfg.k}" if self.cfg.k is not None else ""
        return f"architecture={self.architecture!r}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}{k}"
