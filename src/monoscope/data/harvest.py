"""Activation harvesting: corpus -> packed contexts -> forward passes that stop early -> activation batches.

`Harvester` yields per-forward-pass batches of activations (BOS positions dropped). `ActivationStream` turns
them into shuffled, normalised, fixed-size training batches straight from the model; `data.cache` writes
them to disk instead. Normalisation follows Anthropic (2024): one scalar per hook point so that
E||x|| = sqrt(d_model), estimated from a sample and stored with the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterator

import torch

from ..config import JsonConfig, require
from ..errors import MonoscopeError
from ..model import EMBEDDED_MODEL, LoadedModel, parse_points, resolve, run_to
from .corpus import Corpus, open_corpus
from .packing import batched_contexts, pack_contexts
from .shuffle import ShuffleBuffer

CACHE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class HarvestConfig(JsonConfig):
    """What to harvest: model, hook points, corpus, how many tokens, in what shape."""

    # `help` is what `monoscope harvest --help` says of the field's flag (its default is read from here too).
    model: str = EMBEDDED_MODEL
    hook_points: list[str] = field(default_factory=lambda: ["resid_post.15"])
    corpus: str = "starter"
    text_column: str = "text"
    split: str = "train"
    dataset_config: str | None = None
    tokens: int = field(default=200_000, metadata={"help": "tokens to harvest"})
    context_size: int = field(default=128, metadata={"help": "tokens per packed context, BOS included"})
    batch_size: int = field(default=16, metadata={"help": "contexts per forward pass"})
    seed: int = field(default=0, metadata={"help": "corpus shuffling seed"})
    device: str = "cpu"
    model_dtype: str = "auto"
    cache_dtype: str = field(default="float16", metadata={"help": "storage dtype"})
    shard_tokens: int = field(default=32_768, metadata={"help": "rows per shard file"})
    norm_sample_tokens: int = 16_384

    def __post_init__(self) -> None:
        if isinstance(self.hook_points, str):
            self.hook_points = [self.hook_points]
        self.hook_points = [str(p) for p in parse_points(self.hook_points)]
        require(self.tokens > 0, f"--tokens must be positive, got {self.tokens}")
        require(2 <= self.context_size <= 1_000_000, f"context size must be between 2 and 1e6, got {self.context_size}")
        require(self.batch_size > 0, f"batch size must be positive, got {self.batch_size}")
        require(
            self.cache_dtype in CACHE_DTYPES,
            f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype!r}",
        )
        require(self.shard_tokens > 0, f"shard size must be positive, got {self.shard_tokens}")
        require(self.norm_sample_tokens > 0, f"normalisation sample must be positive, got {self.norm_sample_tokens}")

    def open_corpus(self) -> Corpus:
        return open_corpus(
            self.corpus,
            seed=self.seed,
            text_column=self.text_column,
            split=self.split,
            dataset_config=self.dataset_config,
        )


@dataclass
class HarvestBatch:
    """Activations of one forward pass, flattened over (context, position) with BOS positions dropped."""

    activations: dict[str, torch.Tensor]  # hook point -> [n_tokens, d_model]
    token_ids: torch.Tensor  # [n_tokens]
    context_index: torch.Tensor  # [n_tokens], global index of the context in the packed stream
    position: torch.Tensor  # [n_tokens], position within its context (>= 1)
    n_contexts: int

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.numel())


class Harvester:
    """Runs the model over packed contexts and yields `HarvestBatch`es; deterministic for a given seed."""

    def __init__(self, loaded: LoadedModel, corpus: Corpus, hook_points: list[str], context_size: int, batch_size: int):
        self.loaded = loaded
        self.corpus = corpus
        self.hook_points = [str(p) for p in parse_points(hook_points)]
        for point in self.hook_points:
            resolve(loaded.model, point)  # fail now, before any tokenizing, on a bad layer or kind
        self.context_size = context_size
        self.batch_size = batch_size

    def contexts(self, skip_contexts: int = 0) -> Iterator[torch.Tensor]:
        contexts = pack_contexts(self.corpus.documents(), self.loaded.tokenizer, self.context_size)
        return islice(contexts, skip_contexts, None)

    def batches(self, skip_contexts: int = 0) -> Iterator[HarvestBatch]:
        device = self.loaded.device
        first_context = skip_contexts
        produced = False
        for ids in batched_contexts(self.contexts(skip_contexts), self.batch_size):
            produced = True
            n_ctx, ctx = ids.shape
            acts = run_to(self.loaded.model, self.hook_points, ids.to(device))
            body = {name: act[:, 1:, :].reshape(-1, act.shape[-1]) for name, act in acts.items()}
            positions = torch.arange(1, ctx).repeat(n_ctx)
            contexts = torch.arange(first_context, first_context + n_ctx).repeat_interleave(ctx - 1)
            yield HarvestBatch(body, ids[:, 1:].reshape(-1), contexts, positions, n_ctx)
            first_context += n_ctx
        if not produced and skip_contexts == 0:
            raise MonoscopeError(
                f"corpus {self.corpus.spec!r} is too small: it does not fill one context of {self.context_size} tokens"
            )


def check_finite(batch: HarvestBatch, where: str) -> None:
    for name, act in batch.activations.items():
        if not torch.isfinite(act).all():
            raise MonoscopeError(f"non-finite activations at {name} ({where}); try --model-dtype float32")


def scale_factor(sample: torch.Tensor) -> float:
    """The scalar s with E||s x|| = sqrt(d_model) on `sample` [n, d]."""
    mean_norm = sample.float().norm(dim=-1).mean().item()
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise MonoscopeError("cannot normalise: the activation sample has zero or non-finite norm")
    return math.sqrt(sample.shape[-1]) / mean_norm


class ActivationStream:
    """Shuffled, normalised training batches (`dict[hook point, Tensor[batch, d]]`) straight from the model.

    For the trainer's resume protocol, `iter_from(i)` restarts at batch i by replaying the deterministic
    stream (forward passes are re-run; use a cache to make resuming cheap).
    """

    def __init__(
        self,
        harvester: Harvester,
        batch_size: int,
        *,
        scale_factors: dict[str, float] | None = None,
        shuffle_tokens: int = 65_536,
        seed: int = 0,
        max_tokens: int | None = None,
        norm_sample_tokens: int = 16_384,
    ):
        self.harvester = harvester
        self.batch_size = batch_size
        self.shuffle_tokens = max(shuffle_tokens, batch_size)
        self.seed = seed
        self.max_tokens = max_tokens
        self.scale_factors = scale_factors or self._estimate_scales(norm_sample_tokens)

    def _estimate_scales(self, n_tokens: int) -> dict[str, float]:
        samples: dict[str, list[torch.Tensor]] = {p: [] for p in self.harvester.hook_points}
        seen = 0
        for batch in self.harvester.batches():
            for name, act in batch.activations.items():
                samples[name].append(act.float().cpu())
            seen += batch.n_tokens
            if seen >= n_tokens:
                break
        return {name: scale_factor(torch.cat(parts)[:n_tokens]) for name, parts in samples.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, batch_index: int) -> Iterator[dict[str, torch.Tensor]]:
        buffer = ShuffleBuffer(self.shuffle_tokens, seed=self.seed)
        emitted = 0
        fed = 0

        def out(rows: dict[str, torch.Tensor]):
            return {name: rows[name].float() * self.scale_factors[name] for name in self.harvester.hook_points}

        for batch in self.harvester.batches():
            check_finite(batch, f"after {fed} tokens")
            fed += batch.n_tokens
            buffer.add(batch.activations)
            for rows in buffer.drain(self.batch_size):
                if emitted >= batch_index:
                    yield out(rows)
                emitted += 1
                if self.max_tokens is not None and emitted * self.batch_size >= self.max_tokens:
                    return
        for rows in buffer.flush(self.batch_size):
            if emitted >= batch_index:
                yield out(rows)
            emitted += 1
