"""Fixtures for the server and UI tests (a pytest plugin: `pytest_plugins = ["server_fixtures"]`), so that the
test modules share one real server per session.

- `served_sae`: a small TopK SAE (d_in 32, d_sae 64, k 4) on resid_post.0 of the tiny Llama from conftest,
  with random encoder/decoder directions scaled so that features fire, and its feature database from the
  features package's analysis on the tiny corpus (PCA map, no label embeddings).
- `server`: `monoscope.server` on a real uvicorn on 127.0.0.1 (a free port), on a background thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

CONTEXT = 16
TOKENS = 2400


def build_sae(
    lm: Any, folder: Path, model_dir: Path, corpus_dir: Path, d_sae: int = 64, k: int = 4, seed: int = 0
) -> Path:
    """A random TopK SAE on resid_post.0 whose features fire on real text, saved with its feature database."""
    from monoscope.features import AnalysisConfig, analyze_sae
    from monoscope.model import run_to
    from monoscope.sae import SAEConfig, TopKSAE, save_sae

    g = torch.Generator().manual_seed(seed)
    ids = lm.tokenizer(
        "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b", return_tensors="pt"
    ).input_ids
    acts = run_to(lm.model, ["resid_post.0"], ids)["resid_post.0"][0]
    scale = float(acts.norm(dim=-1).mean())
    sae = TopKSAE(SAEConfig(d_in=acts.shape[-1], d_sae=d_sae, architecture="topk", k=k))
    with torch.no_grad():
        w = torch.randn(d_sae, acts.shape[-1], generator=g)
        w = w / w.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w * scale)
        sae.W_enc.copy_(w.T / scale)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    info = {
        "model": str(model_dir),
        "hook_name": "resid_post.0",
        "hook_point": "resid_post.0",
        "context_size": CONTEXT,
        "corpus": {"spec": str(corpus_dir), "seed": 0},
    }
    save_sae(sae, folder, info=info)
    analyze_sae(folder, tokens=TOKENS, loaded=lm, progress=False, config=AnalysisConfig(map="pca", embeddings=False))
    return folder


@pytest.fixture(scope="session")
def served_sae(tmp_path_factory, tiny_llama_dir, text_corpus) -> Path:
    from monoscope.model import load_model

    lm = load_model(str(tiny_llama_dir))
    return build_sae(lm, tmp_path_factory.mktemp("served-sae") / "sae", tiny_llama_dir, text_corpus)


@pytest.fixture(scope="session")
def service(served_sae):
    from monoscope.server import Service

    svc = Service.load([str(served_sae)], max_tokens_limit=200, max_queue=32)
    yield svc
    svc.close()


@pytest.fixture(scope="session")
def server(service):
    from monoscope.server import ServerThread, create_app

    with ServerThread(create_app(service)) as running:
        yield running
