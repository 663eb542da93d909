"""Attribution (activation x gradient with the SAE spliced in) against actually ablating the features."""

from __future__ import annotations

import pytest
import torch
from tests.test_steer_core import make_sae

from monoscope.errors import MonoscopeError
from monoscope.model import load_model, run_to
from monoscope.steer import attribute
from monoscope.steer.attribution import ablation_effect

CASES = [
    ("Q: What is the capital of France?\nA:", " Paris", "resid_post.0"),
    ("The quick brown fox jumps over the lazy", " dog", "resid_post.1"),
    ("def add(a, b):\n    return", " a", "resid_pre.1"),
]


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().float()
    rb = torch.tensor(b).argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.mark.parametrize("prompt,target,hook", CASES)
def test_attribution_matches_ablation_in_a_near_linear_case(lm, prompt, target, hook):
    # Small decoder rows keep each feature's share of the residual small, so the model is near-linear in it.
    sae = make_sae(hook=hook, model=lm.name, k=8, seed=len(prompt))
    with torch.no_grad():
        sae.W_dec.mul_(0.03)
    result = attribute(lm, sae, prompt, target, top=6)
    assert len(result.features) >= 4
    feats = [f.feature for f in result.features]
    attr = [f.attribution for f in result.features]
    effect = ablation_effect(lm, sae, prompt, target, feats)
    for f, a in zip(feats, attr):
        assert effect[f] == pytest.approx(a, rel=0.15, abs=1e-3)
    assert spearman(attr, [effect[f] for f in feats]) > 0.8
    top_by_ablation = max(feats, key=lambda f: abs(effect[f]))
    assert top_by_ablation == feats[0]
    # the splice keeps the forward pass: the logit reported is the clean one (summed over the target's tokens)
    logits, logprobs = teacher_forced(lm, prompt, target)
    assert result.logit == pytest.approx(logits, abs=1e-4)
    assert result.logprob == pytest.approx(logprobs, abs=1e-4)


def teacher_forced(lm, prompt: str, target: str) -> tuple[float, float]:
    """Summed logits and log-probs of the target's tokens read after the prompt, by plain transformers."""
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    target_ids = lm.tokenizer(target, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = lm.model(torch.cat([ids, torch.tensor([target_ids])], 1)).logits[0, ids.shape[1] - 1 : -1]
    picked = torch.arange(len(target_ids)), torch.tensor(target_ids)
    return float(logits[picked].sum()), float(torch.log_softmax(logits, -1)[picked].sum())


def test_a_several_token_target_is_attributed_as_a_whole(lm):
    prompt, target = "The quick brown fox", " jumps over the lazy dog"
    sae = make_sae(hook="resid_post.1", model=lm.name, k=8, seed=3)
    with torch.no_grad():
        sae.W_dec.mul_(0.03)
    result = attribute(lm, sae, prompt, target, top=6, metric="logprob")
    assert len(result.target_ids) > 1 and result.target_ids == lm.tokenizer(target, add_special_tokens=False).input_ids
    assert result.target_token == target
    assert result.logprob == pytest.approx(teacher_forced(lm, prompt, target)[1], abs=1e-4)
    feats = [f.feature for f in result.features]
    effect = ablation_effect(lm, sae, prompt, target, feats, metric="logprob")
    assert spearman([f.attribution for f in result.features], [effect[f] for f in feats]) > 0.8
    for f in result.features:
        assert effect[f.feature] == pytest.approx(f.attribution, rel=0.2, abs=2e-3)


def test_attribution_bad_inputs(lm):
    sae = make_sae(model=lm.name)
    with pytest.raises(MonoscopeError, match="empty"):
        attribute(lm, sae, "Hello", "")
    with pytest.raises(MonoscopeError, match="outside the vocabulary"):
        attribute(lm, sae, "Hello", [3, 10**9])
    with pytest.raises(MonoscopeError, match="at most 64"):
        attribute(lm, sae, "Hello", " dog" * 100)
    with pytest.raises(MonoscopeError, match="width"):
        attribute(lm, make_sae(d_in=48, model=lm.name), "Hello", " world")


def test_suggestions_rank_by_output_effect(lm):
    """A feature whose decoder row writes the reference tokens' unembedding ranks first, one that writes the
    neutral sentences' tokens is scored by how much more it favours the reference than them; end to end."""
    from monoscope.steer import suggest_features
    from monoscope.steer.suggest import NEUTRAL_TEXTS, output_effect

    hook = "resid_post.1"
    sae = make_sae(hook=hook, model=lm.name, seed=4)
    reference = "the lazy dog"
    unembed = lm.model.get_output_embeddings().weight
    push = unembed[lm.tokenizer(reference, add_special_tokens=False).input_ids].sum(0)
    generic = unembed[[i for t in NEUTRAL_TEXTS for i in lm.tokenizer(t, add_special_tokens=False).input_ids]].sum(0)

    def mean_activation(texts):
        return torch.stack(
            [  # the first position (an attention sink) left out, as the candidates' means do
                run_to(lm.model, [hook], lm.tokenizer(t, return_tensors="pt").input_ids)[hook][0, 1:].mean(0)
                for t in texts
            ]
        ).mean(0)

    reads_reference = mean_activation([reference]) - mean_activation(NEUTRAL_TEXTS)
    with torch.no_grad():
        sae.W_dec[9] = push / push.norm()
        sae.W_dec[10] = generic / generic.norm()
        sae.W_enc[:, 9] = sae.W_enc[:, 10] = (
            16 * reads_reference / reads_reference.norm()
        )  # both fire on the reference: candidates
    scores = output_effect(lm, sae, hook, {f: 0.3 for f in range(12)}, [reference])
    assert max(scores, key=scores.get) == 9 and scores[9] > 0
    found = suggest_features(lm, sae, reference, top=64, max_activations={f: 1.0 for f in range(64)})
    assert 0 < len(found) <= 64 and all(a.score >= b.score for a, b in zip(found, found[1:]))
    by_feature = {s.feature: s for s in found}
    assert {9, 10} <= set(by_feature), sorted(by_feature)
    assert all(
        s.score == pytest.approx(s.gain - max(s.neutral_gain, 0.0)) for s in found
    )  # no credit for breaking neutral text
    assert found[0].feature == 9 and by_feature[9].gain > by_feature[9].neutral_gain
    assert (
        by_feature[10].neutral_gain > by_feature[10].gain and by_feature[10].score < 0
    )  # favours any text, not the reference
    with pytest.raises(MonoscopeError, match="empty"):
        suggest_features(lm, sae, "  ")


def test_map_by_ablation_ranks_every_active_feature_by_its_exact_effect(lm):
    from monoscope.steer.attribution import map_by_ablation

    prompt, target, hook = CASES[0]
    sae = make_sae(hook=hook, model=lm.name, k=8, seed=3)
    result = map_by_ablation(lm, sae, prompt, target, max_features=12)
    feats = [f.feature for f in result.features]
    assert 4 <= len(feats) <= 12 and len(set(feats)) == len(feats)
    exact = ablation_effect(lm, sae, prompt, target, feats)
    assert [f.ablation for f in result.features] == pytest.approx([exact[f] for f in feats], abs=1e-5)
    assert [abs(f.ablation) for f in result.features] == sorted(
        (abs(f.ablation) for f in result.features), reverse=True
    )
    attr = {f.feature: f.attribution for f in attribute(lm, sae, prompt, target, top=12).features}
    assert all(f.attribution == pytest.approx(attr[f.feature], abs=1e-6) for f in result.features)
    assert result.spearman == pytest.approx(
        spearman([f.ablation for f in result.features], [f.attribution for f in result.features]), abs=1e-6
    )
    assert 0.0 <= result.top_overlap <= 1.0
    with pytest.raises(MonoscopeError, match="at least 1"):
        map_by_ablation(lm, sae, prompt, target, max_features=0)
