"""`monoscope export neuronpedia|parquet` on a small feature database built here with the store's own builder."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from monoscope.features.store import DB_FILENAME, SCHEMA_VERSION, StoreBuilder
from monoscope.sae import SAEConfig, TopKSAE, save_sae

D_SAE, D_IN = 6, 4
EDGES = [0.0, 0.5, 1.0, 2.0, 4.0]


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sae")
    sae = TopKSAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=2))
    with torch.no_grad():
        sae.W_dec.copy_(torch.arange(D_SAE * D_IN, dtype=torch.float32).reshape(D_SAE, D_IN))
    save_sae(sae, folder, {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "hook_point": "resid_post.15"})
    tokens = ["<bos>", " the", " cat", " sat", " on", " mat"]
    with StoreBuilder(folder / DB_FILENAME) as b:
        b.set_meta(
            {
                "schema_version": SCHEMA_VERSION,
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "hook_point": "resid_post.15",
                "d_sae": D_SAE,
                "d_in": D_IN,
                "tokens_analysed": 100,
                "contexts_analysed": 2,
                "context_size": 6,
                "corpus": {"spec": "starter"},
                "created": "2026-01-01T00:00:00",
                "hist_edges": EDGES,
                "token_dtype": "<u2",
                "acts_dtype": "<f2",
            }
        )
        b.insert("tokens", ["id", "text"], list(enumerate(tokens)))
        b.insert(
            "contexts",
            ["id", "token_ids"],
            [(c, np.array([0, 1, 2, 3, 4, 5], dtype="<u2").tobytes()) for c in range(2)],
        )
        feats, examples, hist, effects, neigh, labels = [], [], [], [], [], []
        for f in range(D_SAE):
            dead = f == D_SAE - 1
            feats.append(
                (
                    f,
                    0 if dead else 10 + f,
                    0 if dead else 2,
                    0.0 if dead else 0.1,
                    None if dead else 1.0,
                    0.0 if dead else 2.0 + f,
                    0.0 if dead else 0.5,
                )
            )
            if not dead:
                acts = np.array([0, 0.5, 2.0 + f, 0, 0.1], dtype="<f2")
                examples.append((f, "top", 0, None, 0, 1, 5, 3, 2.0 + f, acts.tobytes()))
                examples.append((f, "quantile", 0, 1, 1, 1, 5, 2, 0.5, (acts / 4).astype("<f2").tobytes()))
                examples.append((f, "random", 0, None, 1, 1, 5, 3, 0.0, None))
                hist.append((f, 1, np.array([3, 4, 2], dtype="<i4").tobytes()))
                effects += [(f, "up", 0, 2, 0.9), (f, "down", 0, 3, -0.4)]
                neigh.append((f, 0, (f + 1) % D_SAE, 0.25))
                labels.append((f, "heuristic", f"' cat' #{f} → ' mat'", None, None, None, "2026-01-01"))
        labels.append((0, "llm:gpt-4o-mini", "cats sitting", 0.8, 0.7, None, "2026-01-02"))
        b.insert(
            "features",
            ["id", "n_active", "n_contexts", "density", "mean_activation", "max_activation", "std_activation"],
            feats,
        )
        b.insert(
            "examples",
            ["feature_id", "kind", "rank", "bin", "context", "start", "length", "peak", "activation", "activations"],
            examples,
        )
        b.insert("histograms", ["feature_id", "first_bin", "counts"], hist)
        b.insert("logit_effects", ["feature_id", "direction", "rank", "token_id", "value"], effects)
        b.insert("neighbours", ["feature_id", "rank", "neighbour_id", "cosine"], neigh)
        b.insert(
            "labels", ["feature_id", "source", "text", "detection", "fuzzing", "embedding_score", "created"], labels
        )
        b.refresh_labels()
        b.finish()
    return folder


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "monoscope", *args], capture_output=True, text=True, timeout=120)


def _jsonl_gz(path):
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def test_neuronpedia_layout(sae_dir, tmp_path):
    out = _cli("export", "neuronpedia", "--sae", str(sae_dir), "--out", str(tmp_path), "--batch-size", "4", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    folder = tmp_path / "smollm2-135m-instruct" / "15-monoscope-res-6"
    assert report["folder"] == str(folder)
    for name in ("release.jsonl", "model.jsonl", "source.jsonl", "sourceset.jsonl"):
        assert len((folder / name).read_text().splitlines()) == 1
    source = json.loads((folder / "source.jsonl").read_text())
    assert (
        source["id"] == "15-monoscope-res-6"
        and source["setName"] == "monoscope-res-6"
        and source["modelId"] == "smollm2-135m-instruct"
    )
    assert sorted(p.name for p in (folder / "features").iterdir()) == ["batch-0.jsonl.gz", "batch-1.jsonl.gz"]
    features = _jsonl_gz(folder / "features" / "batch-0.jsonl.gz") + _jsonl_gz(folder / "features" / "batch-1.jsonl.gz")
    assert [f["index"] for f in features] == [str(i) for i in range(D_SAE)]
    f1 = features[1]
    assert (
        f1["layer"] == "15-monoscope-res-6" and f1["maxActApprox"] == 3.0 and f1["frac_nonzero"] == pytest.approx(0.1)
    )
    assert f1["pos_str"] == [" cat"] and f1["neg_str"] == [" sat"] and f1["topkCosSimIndices"] == [2]
    assert f1["freq_hist_data_bar_heights"] == [3, 4, 2] and len(f1["freq_hist_data_bar_values"]) == 3
    assert f1["hasVector"] and f1["vector"] == [4.0, 5.0, 6.0, 7.0] and f1["hookName"] == "blocks.15.hook_resid_post"
    acts = _jsonl_gz(folder / "activations" / "batch-0.jsonl.gz")
    assert len(acts) == 4 * 2  # top + quantile per live feature; random (non-activating) ones are not exported
    top1 = next(a for a in acts if a["index"] == "1" and a["binMin"] == -1)
    assert (
        top1["tokens"] == [" the", " cat", " sat", " on", " mat"]
        and top1["maxValue"] == 3.0
        and top1["maxValueTokenIndex"] == 2
    )
    assert len(top1["id"]) == 25
    expl = _jsonl_gz(folder / "explanations" / "batch-0.jsonl.gz")
    llm = [e for e in expl if e["typeName"] == "llm"]
    assert (
        llm[0]["description"] == "cats sitting"
        and llm[0]["explanationModelName"] == "gpt-4o-mini"
        and llm[0]["index"] == "0"
    )


def test_parquet_tables(sae_dir, tmp_path):
    out = _cli("export", "parquet", "--sae", str(sae_dir), "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    features = pq.read_table(tmp_path / "features.parquet").to_pylist()
    assert len(features) == D_SAE and features[0]["label"] == "cats sitting" and features[-1]["n_active"] == 0
    examples = pq.read_table(tmp_path / "examples.parquet").to_pylist()
    assert len(examples) == 3 * (D_SAE - 1)
    ex = next(e for e in examples if e["feature_id"] == 2 and e["kind"] == "top")
    assert ex["tokens"][2] == " sat" and ex["activations"][2] == pytest.approx(4.0) and ex["peak"] == 2
    assert pq.read_table(tmp_path / "labels.parquet").num_rows == D_SAE
    assert pq.read_table(tmp_path / "neighbours.parquet").num_rows == D_SAE - 1
    assert json.loads((tmp_path / "meta.json").read_text())["hook_point"] == "resid_post.15"


def test_export_without_database(tmp_path):
    out = _cli("export", "parquet", "--sae", str(tmp_path), "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "monoscope analyze" in out.stderr
