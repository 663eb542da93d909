"""The feature database, checked against brute-force recomputation on the same tokens.

One analysis of a small TopK SAE on the tiny Llama (shared by the module) with a planted feature: latent 0
reads the token embedding (hook resid_pre.0) of the token 'az' and fires on it and on nothing else.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

from monoscope.data import Harvester, open_corpus
from monoscope.errors import MonoscopeError
from monoscope.features import AnalysisConfig, FeatureStore, analyze_sae
from monoscope.features.accumulate import HIST_EDGES
from monoscope.model import load_model
from monoscope.sae import JumpReLUSAE, SAEConfig, TopKSAE, save_sae

CONTEXT = 16
TOKENS = 2400
PLANTED = 0


def _info(model_dir, corpus, hook):
    return {
        "model": str(model_dir),
        "hook_point": hook,
        "context_size": CONTEXT,
        "corpus": {"spec": str(corpus), "seed": 0},
    }


def planted_sae(loaded, token_id: int, d_sae: int = 64, k: int = 4, seed: int = 0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    emb = loaded.model.get_input_embeddings().weight.detach()
    scale = 1.0 / emb.norm(dim=1).mean()
    sae = TopKSAE(SAEConfig(d_in=emb.shape[1], d_sae=d_sae, architecture="topk", k=k))
    with torch.no_grad():
        w = torch.randn(d_sae, emb.shape[1], generator=g)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True) * 0.05)
        sae.W_enc.copy_(w.T * scale)
        e = emb[token_id]
        sae.W_enc[:, PLANTED] = e / e.dot(e) * 10.0  # pre-activation 10 on the token itself
        sae.b_enc.zero_()
        sae.b_enc[PLANTED] = -5.0
        sae.b_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def az_id(tokenizer):
    return tokenizer.convert_tokens_to_ids("az")


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, tiny_llama_dir, text_corpus, llama, az_id):
    folder = tmp_path_factory.mktemp("sae-planted")
    sae = planted_sae(llama, az_id)
    save_sae(sae, folder, info=_info(tiny_llama_dir, text_corpus, "resid_pre.0"))
    report = analyze_sae(folder, tokens=TOKENS, loaded=llama, progress=False, config=AnalysisConfig(map="pca"))
    return folder, report


def dense_codes(loaded, sae, corpus_dir, hook, n_contexts, batch_size=16):
    """Dense codes [contexts, CONTEXT - 1, d_sae] and the contexts [contexts, CONTEXT], recomputed from scratch."""
    from monoscope.sae import load_sae

    sae = load_sae(sae) if not isinstance(sae, torch.nn.Module) else sae
    harvester = Harvester(loaded, open_corpus(str(corpus_dir)), [hook], CONTEXT, batch_size)
    contexts = torch.stack([c for _, c in zip(range(n_contexts), harvester.contexts())])
    codes = []
    with torch.no_grad():
        for lo in range(0, n_contexts, batch_size):
            from monoscope.model import run_to

            acts = run_to(loaded.model, [hook], contexts[lo : lo + batch_size])[hook][:, 1:]
            codes.append(sae.encode(acts))
    return torch.cat(codes), contexts


@pytest.fixture(scope="module")
def dense(analysed, llama, text_corpus):
    folder, report = analysed
    return dense_codes(llama, folder, text_corpus, "resid_pre.0", report.contexts)


def check_against_dense(store: FeatureStore, codes: torch.Tensor, contexts: torch.Tensor, n_top: int) -> None:
    n_ctx, body, d_sae = codes.shape
    flat = codes.reshape(-1, d_sae)
    on = flat > 0
    assert store.tokens_analysed == n_ctx * body
    records = store.features()
    density = np.array([r.density for r in records])
    np.testing.assert_allclose(density, on.double().mean(0).numpy(), rtol=1e-9)
    np.testing.assert_allclose([r.max_activation for r in records], flat.max(0).values.numpy(), rtol=1e-5)
    means = (flat.sum(0) / on.sum(0).clamp_min(1)).numpy()
    for r in records:
        if r.n_active:
            assert r.mean_activation == pytest.approx(float(means[r.id]), rel=1e-4)
        else:
            assert r.mean_activation is None
    context_max = codes.max(1).values  # [contexts, d_sae]
    for f in range(d_sae):
        # top examples are the n_top largest per-context maxima, each with its window
        top = store.examples(f, "top")
        expected = context_max[:, f].sort(descending=True).values
        expected = expected[expected > 0][:n_top]
        np.testing.assert_allclose([e.max_activation for e in top], expected.numpy(), rtol=1e-5)
        assert len({e.context for e in top}) == len(top)
        for e in store.examples(f, None):
            ids = contexts[e.context, e.start : e.start + len(e.tokens)]
            assert e.token_ids == ids.tolist()
            truth = codes[e.context, e.start - 1 : e.start - 1 + len(e.tokens), f]
            np.testing.assert_allclose(e.activations, truth.numpy(), rtol=2e-3, atol=1e-3)
            if e.kind == "random":
                assert codes[e.context, :, f].max() == 0  # the feature fires nowhere in the context
                continue
            assert 0 <= e.peak < len(e.tokens)  # the window holds the max token
            assert e.activations[e.peak] == pytest.approx(e.max_activation, rel=2e-3)
            assert e.max_activation == pytest.approx(float(context_max[e.context, f]), rel=1e-5)
        # histogram: counts of the feature's non-zero activations in the stored log bins
        edges, counts = store.histogram(f)
        values = flat[:, f][on[:, f]].double().numpy()
        assert sum(counts) == values.size
        if values.size:
            full = np.histogram(np.clip(values, HIST_EDGES[0], HIST_EDGES[-1] * 0.999), bins=HIST_EDGES)[0]
            nz = np.flatnonzero(full)
            assert counts == full[nz[0] : nz[-1] + 1].tolist()
            assert edges[0] <= values.min() or edges[0] == HIST_EDGES[0]


def test_statistics_examples_and_histograms_match_dense_recomputation(analysed, dense):
    codes, contexts = dense
    folder, report = analysed
    with FeatureStore.for_sae(folder) as store:
        check_against_dense(store, codes, contexts, n_top=20)
        assert store.meta["contexts_analysed"] == report.contexts == codes.shape[0]


def test_quantile_examples_cover_the_activation_range(analysed, dense):
    codes, _ = dense
    folder, _ = analysed
    with FeatureStore.for_sae(folder) as store:
        f = int((codes > 0).sum((0, 1)).argmax())  # the most frequent feature has examples in every bin
        quantile = store.examples(f, "quantile")
        bins = [e.bin for e in quantile]
        assert bins == sorted(bins) and set(bins) == set(range(5))
        lows = np.mean([e.max_activation for e in quantile if e.bin == 0])
        highs = np.mean([e.max_activation for e in quantile if e.bin == 4])
        assert lows < highs


def test_the_planted_feature(analysed, dense, az_id, tokenizer):
    codes, contexts = dense
    folder, _ = analysed
    fires_on = contexts[:, 1:][codes[:, :, PLANTED] > 0]
    assert fires_on.numel() > 0 and set(fires_on.tolist()) == {az_id}
    with FeatureStore.for_sae(folder) as store:
        top = store.examples(PLANTED, "top")
        assert all(e.tokens[e.peak] == "az" for e in top)
        assert "'az'" in store.feature(PLANTED).label  # the heuristic label names its token
        from monoscope.features.search import search_words

        assert search_words(store, "az")[0][0] == PLANTED


def test_neighbours_and_logit_effects_match_brute_force(analysed, llama):
    from monoscope.sae import load_sae

    folder, _ = analysed
    sae = load_sae(folder)
    w_dec = sae.W_dec.detach()
    unit = w_dec / w_dec.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    cos.fill_diagonal_(0)
    norm_weight = llama.model.model.norm.weight.detach()  # Llama's final RMSNorm
    w_u = llama.model.lm_head.weight.detach()
    with FeatureStore.for_sae(folder) as store:
        for f in range(sae.cfg.d_sae):
            nb = store.neighbours(f)
            order = cos[f].abs().argsort(descending=True)[:10]
            assert [n.id for n in nb] == order.tolist()
            np.testing.assert_allclose([n.cosine for n in nb], cos[f, order].numpy(), atol=1e-5)
            logits = w_u @ (norm_weight * w_dec[f])
            effects = store.logit_effects(f)
            up = logits.topk(10)
            assert [t.token_id for t in effects["up"]] == up.indices.tolist()
            np.testing.assert_allclose([t.value for t in effects["up"]], up.values.numpy(), rtol=1e-4, atol=1e-6)
            down = logits.topk(10, largest=False)
            assert [t.token_id for t in effects["down"]] == down.indices.tolist()
        xy = store.map_coords()
        assert xy.shape == (sae.cfg.d_sae, 2) and np.isfinite(xy).all() and xy.min() >= 0 and xy.max() <= 1


def test_store_layout_and_read_only(analysed):
    folder, report = analysed
    db = folder / "features.db"
    assert report.db == db and not list(folder.glob(".features.db.*"))  # no temporary left behind
    with FeatureStore.for_sae(folder) as store:
        assert store.meta["schema_version"] == 1 and store.meta["hook_point"] == "resid_pre.0"
        assert store.meta["model"] and store.meta["d_sae"] == 64 and store.meta["created"]
        with pytest.raises(sqlite3.OperationalError):
            store.conn.execute("DELETE FROM features")  # readers hold a read-only connection
        labels = store.labels(3)
        assert labels[0].source == "heuristic" and 0.0 <= labels[0].embedding_score <= 1.0
        with pytest.raises(MonoscopeError, match="feature 64 does not exist: this SAE has 64 features"):
            store.examples(64)


def test_heuristic_labels_carry_held_out_scores(analysed):
    folder, _ = analysed
    store = FeatureStore(folder / "features.db")
    live = [r.id for r in store.features() if not r.dead]
    scores = store.label_scores(live)
    assert len(scores) >= len(live) // 2 and all(0.0 <= v <= 1.0 for v in scores.values())
    for fid in live[:5]:
        sources = [lab.source for lab in store.labels(fid)]
        assert sources[0] == "heuristic" and set(sources) <= {"heuristic", "heuristic-tokens"}
    store.close()


def test_labels_search_by_words_and_meaning(tmp_path, analysed):
    import shutil

    from monoscope.features import search_features

    folder, _ = analysed
    db = tmp_path / "copy.db"
    shutil.copy(folder / "features.db", db)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM label_embeddings WHERE label_id <= 10")  # as if analysed without them
    store = FeatureStore(db)
    assert store.missing_label_vectors() == 10
    store.add_label(
        7,
        "llm:test",
        "mentions of the Golden Gate Bridge in San Francisco",
        detection=0.9,
        fuzzing=0.8,
        embedding_score=0.7,
    )
    store.add_label(9, "llm:test", "Python import statements and module names")
    store.add_label(11, "llm:test", "questions about the capital of France")
    assert (
        store.feature(7).label.startswith("mentions of the Golden Gate") and store.feature(7).label_source == "llm:test"
    )
    assert [lab.source for lab in store.labels(7)] == ["heuristic", "llm:test"]
    assert search_features(store, "bridges", mode="words")[0].feature_id == 7  # stemmed word match
    hits = search_features(store, "a famous suspension bridge in California", mode="meaning")
    assert hits[0].feature_id == 7
    assert store.missing_label_vectors() == 0  # embedded once and saved
    hybrid = search_features(store, "python modules", limit=5)
    assert hybrid[0].feature_id == 9 and hybrid[0].words_rank == 1 and hybrid[0].meaning_rank == 1
    store.close()


def test_scan_and_search_by_example(analysed, llama, az_id):
    from monoscope.features import features_for_examples, scan_text
    from monoscope.sae import load_sae

    folder, _ = analysed
    sae = load_sae(folder)
    with FeatureStore.for_sae(folder) as store:
        result = scan_text("The lazy dog sat by the lazy fox.", sae=sae, loaded=llama, store=store, top=3)
        ids = llama.tokenizer("The lazy dog sat by the lazy fox.", add_special_tokens=False).input_ids
        assert [t.token_id for t in result.tokens] == ids
        for t in result.tokens:
            acts = [h.activation for h in t.features]
            assert len(acts) <= 3 and acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
            assert all(h.label for h in t.features)
            assert (t.token_id == az_id) == (PLANTED in [h.id for h in t.features])
        assert result.top[0].id == PLANTED and result.top[0].n_tokens == ids.count(az_id)

        hits = features_for_examples(["a lazy cat", "lazy afternoons", "so lazy"], sae=sae, loaded=llama, store=store)
        assert hits[0].feature_id == PLANTED and hits[0].fired_in == 1.0
        contrasted = features_for_examples(["the lazy dog"], sae=sae, loaded=llama, contrast=["the quick dog"])
        assert contrasted[0].feature_id == PLANTED


def test_interrupted_analysis_leaves_the_previous_database(analysed, llama):
    folder, _ = analysed
    db = folder / "features.db"
    before = db.read_bytes()

    def stop(tokens: int) -> None:
        if tokens > 500:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        analyze_sae(
            folder,
            tokens=TOKENS,
            loaded=llama,
            progress=False,
            on_batch=stop,
            config=AnalysisConfig(map="none", embeddings=False),
        )
    assert db.read_bytes() == before
    assert not list(folder.glob(".features.db.*"))

    fresh = folder.parent / "fresh.db"
    with pytest.raises(KeyboardInterrupt):
        analyze_sae(folder, tokens=TOKENS, loaded=llama, db=fresh, progress=False, on_batch=stop)
    assert not fresh.exists() and not list(folder.parent.glob(".fresh.db.*"))


def test_rerun_keeps_explain_labels(tmp_path, tiny_llama_dir, text_corpus, llama, az_id):
    folder = tmp_path / "sae"
    save_sae(planted_sae(llama, az_id, d_sae=32), folder, info=_info(tiny_llama_dir, text_corpus, "resid_pre.0"))
    cfg = AnalysisConfig(map="none", embeddings=False, tokens=600)
    analyze_sae(folder, loaded=llama, progress=False, config=cfg)
    with FeatureStore.for_sae(folder) as store:
        store.add_label(2, "llm:test", "something", detection=0.5, embed=False)
    report = analyze_sae(folder, loaded=llama, progress=False, config=cfg)
    assert report.labels_carried == 1
    with FeatureStore.for_sae(folder) as store:
        assert store.feature(2).label == "something" and len(store.labels(2)) == 2


def test_paths_with_uri_characters(tmp_path, tiny_llama_dir, text_corpus, llama, az_id):
    """Databases are read through SQLite URIs: a folder with spaces, '?', '#' and '%' in its name still works,
    re-analysis included (the labels of the database it replaces are carried over)."""
    folder = tmp_path / "my sae?mode=rw#1 %41"
    save_sae(planted_sae(llama, az_id, d_sae=16), folder, info=_info(tiny_llama_dir, text_corpus, "resid_pre.0"))
    cfg = AnalysisConfig(map="none", embeddings=False, tokens=300)
    analyze_sae(folder, loaded=llama, progress=False, config=cfg)
    with FeatureStore.for_sae(folder) as store:
        store.add_label(3, "human", "an odd path", embed=False)
    report = analyze_sae(folder, loaded=llama, progress=False, config=cfg)
    assert report.labels_carried == 1
    with FeatureStore.for_sae(folder) as store:
        assert store.path.parent.name == "my sae?mode=rw#1 %41"
        assert store.feature(3).label == "an odd path" and store.n_features == 16


def test_jumprelu_sae_at_a_later_layer(tmp_path, tiny_llama_dir, text_corpus, llama):
    """The non-TopK path (dense codes, non-zeros) against the same dense recomputation."""
    from monoscope.model import run_to

    g = torch.Generator().manual_seed(1)
    ids = llama.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    typical = run_to(llama.model, ["resid_post.1"], ids)["resid_post.1"][0, 1:].norm(dim=-1).mean()
    sae = JumpReLUSAE(SAEConfig(d_in=32, d_sae=48, architecture="jumprelu"))
    with torch.no_grad():
        w = torch.randn(48, 32, generator=g)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T / typical)  # pre-activations ~ N(0, 1)
        sae.threshold.fill_(1.0)
    folder = tmp_path / "jr"
    save_sae(sae, folder, info=_info(tiny_llama_dir, text_corpus, "resid_post.1"))
    report = analyze_sae(
        folder, loaded=llama, progress=False, config=AnalysisConfig(tokens=900, map="pca", embeddings=False, n_top=5)
    )
    codes, contexts = dense_codes(llama, folder, text_corpus, "resid_post.1", report.contexts)
    assert codes.gt(0).sum(-1).float().mean() > 1  # several latents per token
    with FeatureStore.for_sae(folder) as store:
        check_against_dense(store, codes, contexts, n_top=5)


def test_bad_input_is_a_clear_error(tmp_path, tiny_llama_dir, text_corpus, llama):
    wide = TopKSAE(SAEConfig(d_in=16, d_sae=32, architecture="topk", k=2))
    save_sae(wide, tmp_path / "wide", info=_info(tiny_llama_dir, text_corpus, "resid_post.1"))
    with pytest.raises(MonoscopeError, match="d_in=16 .* width 32 at resid_post.1"):
        analyze_sae(tmp_path / "wide", loaded=llama, progress=False)
    ok = TopKSAE(SAEConfig(d_in=32, d_sae=32, architecture="topk", k=2))
    save_sae(ok, tmp_path / "deep", info=_info(tiny_llama_dir, text_corpus, "resid_post.7"))
    with pytest.raises(MonoscopeError, match="resid_post.7 does not exist"):
        analyze_sae(tmp_path / "deep", loaded=llama, progress=False)
    save_sae(ok, tmp_path / "ok", info=_info(tiny_llama_dir, text_corpus, "resid_post.1"))
    (tmp_path / "tiny.txt").write_text("too short")
    with pytest.raises(MonoscopeError, match="too small"):
        analyze_sae(tmp_path / "ok", loaded=llama, corpus=str(tmp_path / "tiny.txt"), progress=False)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(MonoscopeError, match="contains no text"):
        analyze_sae(tmp_path / "ok", loaded=llama, corpus=str(tmp_path / "empty.txt"), progress=False)
    with pytest.raises(MonoscopeError, match="run `monoscope analyze --sae"):
        FeatureStore.for_sae(tmp_path / "ok")
    with pytest.raises(MonoscopeError, match="does not exist"):
        analyze_sae(tmp_path / "missing", loaded=llama, progress=False)


def test_an_sae_from_another_model_of_the_same_width_warns(tmp_path, tiny_llama_dir, text_corpus, llama):
    from monoscope.features.loading import open_sae_and_model

    sae = TopKSAE(SAEConfig(d_in=32, d_sae=32, architecture="topk", k=2))
    save_sae(
        sae,
        tmp_path / "other",
        info={**_info(tiny_llama_dir, text_corpus, "resid_post.1"), "model": "some-org/a-fine-tune"},
    )
    with pytest.warns(UserWarning, match="trained on 'some-org/a-fine-tune' but is being used with"):
        _, _, hook = open_sae_and_model(tmp_path / "other", loaded=llama)
    assert hook == "resid_post.1"


def test_auroc_and_embedding_score():
    from monoscope.features.embedding import auroc, embedding_score

    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 40).astype(float)  # many ties
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert auroc(pos, neg) == pytest.approx(pairs)
    assert np.isnan(auroc([], [1.0]))
    score = embedding_score(
        "Python source code",
        ["import os\nprint(os.getcwd())", "def add(a, b):\n    return a + b"],
        ["The quick brown fox jumps over the lazy dog.", "There once was a man from Peru."],
    )
    assert score == 1.0


def test_final_norm_of_gpt2_centres_and_scales(tiny_gpt2_dir):
    from monoscope.features.geometry import final_norm, logit_effects

    gpt2 = load_model(str(tiny_gpt2_dir)).model
    with torch.no_grad():
        gpt2.transformer.ln_f.weight.uniform_(0.5, 1.5)
    weight, centres = final_norm(gpt2)
    assert centres and torch.equal(weight, gpt2.transformer.ln_f.weight.detach())
    d = torch.randn(3, 32)
    up_v, up_i, _, _ = logit_effects(d, gpt2.lm_head.weight.detach(), weight, centres, n=5)
    expected = (gpt2.lm_head.weight.detach() @ ((d - d.mean(1, keepdim=True)) * weight).T).T.topk(5)
    assert torch.equal(up_i, expected.indices) and torch.allclose(up_v, expected.values, atol=1e-5)
