"""Sparse autoencoders: architectures, training, checkpoints, saving in SAELens's format, reconstruction metrics.

Architectures (training name -> saved as): topk -> topk (default), batchtopk -> jumprelu, jumprelu ->
jumprelu, relu -> standard. See docs/sae.md for the recipes and the rules behind the defaults.

    from monoscope.sae import TopKConfig, TrainConfig, train_sae, load_sae, evaluate_reconstruction
    cfg = TrainConfig(d_in=576, d_sae=4608, arch=TopKConfig(k=32), total_tokens=50_000_000)
    result = train_sae(cfg, batches, "runs/sae")      # batches: iterable of [n, 576] float tensors
    sae = load_sae("runs/sae")                        # .cfg, .info, encode/decode/forward/encode_topk
"""

# The architectures, each registered by its own file (registry.py); this order is the order of --arch's choices.
# isort: off
from .topk import TopKConfig, TopKSAE, TopKTrainingSAE
from .batchtopk import BatchTopKConfig, BatchTopKTrainingSAE
from .jumprelu import JumpReLUConfig, JumpReLUSAE, JumpReLUTrainingSAE
from .relu import ReLUConfig, ReLUSAE, ReLUTrainingSAE
# isort: on

from .base import SAE, SAEConfig, inference_class
from .config import TrainConfig
from .io import save_sae
from .loader import load_any_sae, load_sae
from .metrics import ReconstructionMetrics, evaluate_reconstruction
from .optim import OPTIMIZER_NAMES, OptimizerConfig, ScheduleFree, default_lr
from .registry import ArchConfig, Architecture, register
from .registry import names as _architecture_names
from .sparse import SparsePattern, gather_preacts, sparse_decode
from .stream import DataPosition
from .trainer import SAETrainer, TrainResult, load_train_log, train_from_batches, train_sae, train_saes
from .training import StepContext, StepOutput, TrainingSAE, geometric_median, training_class

#: Architectures the trainer can train (--arch); BatchTopK is saved (and loads) as JumpReLU, ReLU as "standard".
TRAINING_ARCHITECTURES = _architecture_names()

__all__ = [
    "SAE",
    "SAEConfig",
    "TopKSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "TopKTrainingSAE",
    "BatchTopKTrainingSAE",
    "JumpReLUTrainingSAE",
    "ReLUTrainingSAE",
    "TrainConfig",
    "ArchConfig",
    "Architecture",
    "register",
    "TopKConfig",
    "BatchTopKConfig",
    "JumpReLUConfig",
    "ReLUConfig",
    "TrainingSAE",
    "TRAINING_ARCHITECTURES",
    "OptimizerConfig",
    "OPTIMIZER_NAMES",
    "ScheduleFree",
    "default_lr",
    "save_sae",
    "load_sae",
    "load_any_sae",
    "SAETrainer",
    "TrainResult",
    "train_sae",
    "train_saes",
    "train_from_batches",
    "load_train_log",
    "ReconstructionMetrics",
    "evaluate_reconstruction",
    "DataPosition",
    "StepContext",
    "StepOutput",
    "SparsePattern",
    "gather_preacts",
    "sparse_decode",
    "geometric_median",
    "inference_class",
    "training_class",
]
