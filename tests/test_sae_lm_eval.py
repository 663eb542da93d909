"""LM-loss evaluation with an SAE spliced in: a lossless SAE scores 1, a dead one scores like zero-ablation."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from monoscope.data import open_corpus
from monoscope.errors import MonoscopeError
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
    return evaluate_sae(
        sae, loaded, corpus, hook_point="resid_post.0", tokens=300, context_size=16, batch_size=4, show_progress=False
    )


def test_lossless_sae_keeps_the_model_exactly(loaded, text_corpus):
    result = run(split_sign_sae(32), loaded, text_corpus)
    assert result["ce_sae"] == pytest.approx(result["ce_clean"], abs=1e-5)
    assert result["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert result["kl_sae"] == pytest.approx(0.0, abs=1e-5)
    assert result["fvu"] == pytest.approx(0.0, abs=1e-6) and result["explained_variance"] == pytest.approx(
        1.0, abs=1e-6
    )
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


def dense_lm_sums(model, hook_point, patches, ids):
    """The reference: full logits of every pass, cross-entropy and KL over the whole vocabulary at once."""
    from monoscope.model import edit
    from monoscope.sae.lm_eval import _keep_prefix

    with torch.inference_mode():
        logits = [model(input_ids=ids).logits]
        for patch in patches:
            with edit(model, {hook_point: _keep_prefix(patch)}):
                logits.append(model(input_ids=ids).logits)
    logp = [torch.log_softmax(lg[:, 1:-1].float(), -1) for lg in logits]
    targets = ids[:, 2:]
    ce = [-lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(1) for lp in logp]
    kl = [(logp[0].exp() * (logp[0] - lp)).sum(-1).sum(1) for lp in logp[1:3]]
    return ce, kl


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_blockwise_logits_match_full_logits_for_a_262k_vocabulary(softcap):
    """Logits in blocks over tokens and vocabulary give the full-vocabulary CE and KL, with a logit softcap too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from monoscope.model import LoadedModel
    from monoscope.sae.lm_eval import lm_loss_sums

    torch.manual_seed(0)
    vocab = 262_144
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    if softcap is not None:  # the Gemma 2/3 output transform, read from the config
        model.config.final_logit_softcapping = softcap
        forward = model.forward

        def capped(*args, **kwargs):
            out = forward(*args, **kwargs)
            out.logits = torch.tanh(out.logits / softcap) * softcap
            return out

        model.forward = capped
    loaded = LoadedModel(model, None, "big-vocab")
    ids = torch.randint(vocab, (3, 12))
    ids[:, 0] = 1
    shrink = lambda a: a * 0.5  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the blockwise path, not the fallback that warns
        sums = lm_loss_sums(loaded, "resid_post.0", shrink, [ids], token_block=7, vocab_block=50_000)

    def mean_patch(a):
        return a.reshape(-1, a.shape[-1]).float().mean(0).to(a.dtype).expand_as(a)

    ce, kl = dense_lm_sums(model, "resid_post.0", [shrink, torch.zeros_like, mean_patch], ids)
    for name, reference in zip(("ce_clean", "ce_sae", "ce_zero", "ce_mean"), ce):
        assert torch.allclose(sums[name], reference.double(), rtol=1e-4, atol=1e-3), name
    assert torch.allclose(sums["kl_sae"], kl[0].double(), rtol=1e-3, atol=1e-4)
    assert torch.allclose(sums["kl_zero"], kl[1].double(), rtol=1e-3, atol=1e-4)
    assert sums["tokens"].tolist() == [10.0] * 3


def test_contexts_are_sampled_across_the_held_out_region():
    from monoscope.sae.lm_eval import sample_contexts

    contexts = [torch.tensor([i]) for i in range(1000)]
    chosen, region = sample_contexts(contexts, 20, skip=100, region=800, seed=0)
    positions = [int(c) for c in chosen]
    assert region == 800 and len(positions) == 20 and positions == sorted(positions)
    assert min(positions) >= 100 and max(positions) < 900
    assert max(positions) - min(positions) > 400  # spread over the region, not one window
    again, _ = sample_contexts(contexts, 20, skip=100, region=800, seed=0)
    other, _ = sample_contexts(contexts, 20, skip=100, region=800, seed=1)
    assert [int(c) for c in again] == positions and [int(c) for c in other] != positions
    few, region = sample_contexts(contexts[:110], 20, skip=100, region=800, seed=0)
    assert region == 10 and len(few) == 10


def test_every_mean_metric_has_a_bootstrap_interval(loaded, text_corpus):
    sae = split_sign_sae(32)
    with torch.no_grad():
        sae.W_dec.mul_(0.7)  # an imperfect SAE: metrics vary from context to context
    result = run(sae, loaded, text_corpus)
    assert result["contexts"] == 20 and result["held_out_region_contexts"] > result["contexts"]
    for key in (
        "fvu",
        "l0",
        "mse",
        "cosine_similarity",
        "ce_clean",
        "ce_sae",
        "ce_loss_score",
        "delta_loss",
        "kl_div_score",
        "ce_loss_score_mean_ablation",
    ):
        low, high = result["intervals"][key]
        assert low <= high, key
    for key in ("frac_alive", "frac_dense_1pct", "frac_dense_10pct"):  # whole-sample counts: biased under resampling
        assert key not in result["intervals"] and 0 <= result[key] <= 1, key
    for key in ("fvu", "ce_loss_score", "delta_loss"):
        low, high = result["intervals"][key]
        assert low < result[key] < high, key
    assert result["delta_loss"] == pytest.approx(result["ce_sae"] - result["ce_clean"])


def test_untouched_positions_are_neither_replaced_nor_scored(loaded, text_corpus):
    corpus = open_corpus(str(text_corpus))
    sae = split_sign_sae(32)
    result = evaluate_sae(
        sae,
        loaded,
        corpus,
        hook_point="resid_post.0",
        tokens=280,
        context_size=16,
        batch_size=4,
        show_progress=False,
        untouched_positions=2,
        bootstrap_samples=50,
    )
    assert result["untouched_positions"] == 2 and result["contexts"] == 20
    assert result["tokens"] == 20 * 14 and result["lm_tokens"] == 20 * 13  # 16 - 2 positions; predictions from them
    assert result["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(MonoscopeError, match="untouched positions must be from 1"):
        evaluate_sae(
            sae, loaded, corpus, hook_point="resid_post.0", tokens=100, context_size=16, untouched_positions=15
        )
