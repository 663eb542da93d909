"""Stage 2: corpus -> packed contexts -> activations (streamed, normalised, shuffled, optionally cached)."""

from .cache import ActivationCache, CacheBatches, HarvestReport, harvest_to_cache
from .corpus import Corpus, open_corpus
from .harvest import ActivationStream, HarvestBatch, HarvestConfig, Harvester, scale_factor
from .packing import pack_contexts
from .shuffle import ShuffleBuffer
from .starter import starter_documents

__all__ = [
    "ActivationCache",
    "ActivationStream",
    "CacheBatches",
    "Corpus",
    "HarvestBatch",
    "HarvestConfig",
    "HarvestReport",
    "Harvester",
    "ShuffleBuffer",
    "harvest_to_cache",
    "open_corpus",
    "pack_contexts",
    "scale_factor",
    "starter_documents",
]
