"""LM-loss evaluation with an SAE spliced in: a lossless SAE scores 1, a dead one scores like zero-ablation."""

from __future__ import annotations

import math

import pytest
import torch

from monoscope.data import open_corpus
from monoscope.model import load_model
from monoscope.sae import SAEConfig, TopKSAE
from monoscope.sae.lm_eval import evaluate_sae, held_out_skip


def split_sign_sae(d: int) -> TopKSAE:
    """Latents x_i+ and x_i- (ReLU of x and -x) with k = d: reconstructs every input exactly."""
    sae = TopKSAE(SAEConfig(d_in=d, d_sae=2 * d, architecture="topk", k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def run(sae, loaded, text_corpus):
    corpus = open_corpus(str(text_corpus))
    return evaluate_sae(sae, loaded, corpus, hook_point="resid_post.0", tokens=300, context_size=16, batch_size=4, show_progress=False)


def test_lossless_sae_keeps_the_model_exactly(loaded, text_corpus):
    result = run(split_sign_sae(32), loaded, text_corpus)
    assert result["ce_sae"] == pytest.approx(result["ce_clean"], abs=1e-5)
    assert result["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert result["kl_sae"] == pytest.approx(0.0, abs=1e-5)
    assert result["fvu"] == pytest.approx(0.0, abs=1e-6) and result["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert result["ce_zero_ablation"] != pytest.approx(result["ce_clean"])
    assert result["tokens"] >= 300 and result["lm_tokens"] > 0


def test_dead_sae_scores_like_zero_ablation(loaded, text_corpus):
    sae = split_sign_sae(32)
    with torch.no_grad():
        sae.W_dec.zero_()
    result = run(sae, loaded, text_corpus)
    assert result["ce_sae"] == pytest.approx(result["ce_zero_ablation"], abs=1e-5)
    assert result["ce_loss_score"] == pytest.approx(0.0, abs=1e-4)
    assert result["kl_div_score"] == pytest.approx(0.0, abs=1e-4)
    assert math.isfinite(result["ce_loss_score_mean_ablation"])


def test_held_out_text_starts_after_the_training_contexts(text_corpus):
    corpus = open_corpus(str(text_corpus), seed=0)
    info = {"corpus": {"spec": str(text_corpus), "seed": 0}, "harvest_contexts": 42}
    assert held_out_skip(info, corpus) == 42
    assert held_out_skip(info, open_corpus(str(text_corpus), seed=1)) == 0
    assert held_out_skip({}, corpus) == 0
