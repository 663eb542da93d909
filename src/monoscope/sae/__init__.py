"""Sparse autoencoders: architectures, training, checkpoints, saving in SAELens's format, reconstruction metrics.

Architectures (training name -> saved as): topk -> topk (default), batchtopk -> jumprelu, jumprelu ->
jumprelu, relu -> standard. See docs/sae.md for the recipes and the rules behind the defaults.

    from monoscope.sae import TrainConfig, train_sae, load_sae, evaluate_reconstruction
    cfg = TrainConfig(d_in=576, d_sae=4608, k=32, total_tokens=50_000_000)
    result = train_sae(cfg, batches, "runs/sae")      # batches: iterable of [n, 576] float tensors
    sae = load_sae("runs/sae")                        # .cfg, .info, encode/decode/forward/encode_topk
"""

from .base import SAE, SAEConfig
from .batchtopk import BatchTopKTrainingSAE
from .config import TRAINING_ARCHITECTURES, TrainConfig
from .io import load_sae, save_sae
from .jumprelu import JumpReLUSAE, JumpReLUTrainingSAE
from .metrics import ReconstructionMetrics, evaluate_reconstruction
from .optim import OPTIMIZER_NAMES, OptimizerConfig, ScheduleFree, default_lr
from .registry import inference_class, training_class
from .relu import ReLUSAE, ReLUTrainingSAE
from .sparse import SparsePattern, gather_preacts, sparse_decode
from .stream import DataPosition
from .topk import TopKSAE, TopKTrainingSAE
from .trainer import SAETrainer, TrainResult, load_train_log, train_from_batches, train_sae, train_saes
from .training import StepContext, StepOutput, geometric_median

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
    "TRAINING_ARCHITECTURES",
    "OptimizerConfig",
    "OPTIMIZER_NAMES",
    "ScheduleFree",
    "default_lr",
    "save_sae",
    "load_sae",
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
