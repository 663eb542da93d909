"""Which classes implement each architecture, like SAELens's `registry.py`.

Training architectures (what the trainer trains) map to a training class; inference architectures (what
cfg.json says, in SAELens's names) map to the class that runs a saved SAE. BatchTopK trains as its own
class and is saved as JumpReLU; ReLU is saved as SAELens's "standard".
"""

from __future__ import annotations

from ..errors import MonoscopeError
from .base import SAE
from .batchtopk import BatchTopKTrainingSAE
from .config import TRAINING_ARCHITECTURES
from .jumprelu import JumpReLUSAE, JumpReLUTrainingSAE
from .relu import ReLUSAE, ReLUTrainingSAE
from .topk import TopKSAE, TopKTrainingSAE

TRAINING_CLASSES: dict[str, type] = {
    "topk": TopKTrainingSAE,
    "batchtopk": BatchTopKTrainingSAE,
    "jumprelu": JumpReLUTrainingSAE,
    "relu": ReLUTrainingSAE,
}

INFERENCE_CLASSES: dict[str, type[SAE]] = {
    "topk": TopKSAE,
    "jumprelu": JumpReLUSAE,
    "standard": ReLUSAE,
}

#: Names a cfg.json may use for an architecture monoscope runs under another name.
ARCHITECTURE_ALIASES = {"relu": "standard", "batchtopk": "jumprelu"}

#: The inference architecture each training architecture is saved as.
SAVED_AS = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}

assert set(TRAINING_CLASSES) == set(TRAINING_ARCHITECTURES)


def training_class(architecture: str) -> type:
    if architecture not in TRAINING_CLASSES:
        raise MonoscopeError(f"unknown SAE architecture {architecture!r}; choose one of {', '.join(TRAINING_CLASSES)}")
    return TRAINING_CLASSES[architecture]


def inference_class(architecture: str) -> type[SAE]:
    name = ARCHITECTURE_ALIASES.get(architecture, architecture)
    if name not in INFERENCE_CLASSES:
        raise MonoscopeError(
            f"SAE architecture {architecture!r} is not supported; monoscope can load: {', '.join(INFERENCE_CLASSES)}"
        )
    return INFERENCE_CLASSES[name]
