"""Steering toward a concept: the learned vector (and learned feature weights), plan_steering's measured ranking,
`suggest` / `steer --toward` on the command line, and their one-line errors. Tiny random Llama, real MiniLM judge."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tests.test_steer_core import make_sae

from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.model import edit, load_model
from monoscope.sae import save_sae
from monoscope.steer.concepts import (
    ReferenceObjective,
    check_references,
    explain_vector,
    learn_steering_vector,
    repetition,
)
from monoscope.steer.toward import TEST_PROMPTS, Option, TowardConfig, _refinements, plan_steering

HOOK = "resid_post.0"
REFS = ["the quick brown fox jumps", "a brown fox runs over the dog"]
PROMPTS = ["Q: tell me something\nA:", "Hello there,"]
SMALL = dict(shortlist=2, basis=4, learn_steps=3, test_tokens=4, target_tokens=4, candidates=8)


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def sae(tiny_llama_dir):
    return make_sae(model=str(tiny_llama_dir))


def test_the_objective_with_cached_prompts_equals_a_full_forward(lm):
    """The prompt's keys and values are computed once; the loss must equal one forward over prompt + answer with
    the vector added at the answer's positions only."""
    objective = ReferenceObjective(lm, HOOK, REFS[:1], PROMPTS[:1])
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    prompt = lm.tokenizer(PROMPTS[0], return_tensors="pt").input_ids[0]
    answer = lm.tokenizer(" " + REFS[0], add_special_tokens=False, return_tensors="pt").input_ids[0]
    ids = torch.cat([prompt, answer]).unsqueeze(0)
    keep = torch.zeros(1, ids.shape[1], 1)
    keep[:, len(prompt) :] = 1
    with torch.no_grad(), edit(lm.model, {HOOK: lambda x: x + keep * v}):
        logits = lm.model(ids).logits[0, len(prompt) - 1 : -1].float()
    expected = -torch.log_softmax(logits, -1).gather(-1, answer.unsqueeze(-1)).mean()
    with torch.no_grad():
        assert float(objective(v)) == pytest.approx(float(expected), abs=1e-4)


def test_learned_vector_raises_the_references_likelihood_within_its_bound(lm, sae):
    fit = learn_steering_vector(lm, HOOK, REFS, prompts=PROMPTS, max_norm=3.0, steps=6)
    assert fit.loss_after < fit.loss_before
    assert float(fit.vector.norm()) <= 3.0 + 1e-4
    assert fit.history[0] == pytest.approx(fit.loss_before, abs=1e-5)
    basis = sae.W_dec.detach()[:8]
    grouped = learn_steering_vector(lm, HOOK, REFS, prompts=PROMPTS, max_norm=3.0, steps=6, basis=basis)
    assert grouped.weights is not None and bool((grouped.weights >= 0).all())
    assert torch.allclose(grouped.vector, grouped.weights @ basis, atol=1e-4)
    assert grouped.loss_after <= grouped.loss_before and float(grouped.vector.norm()) <= 3.0 + 1e-4
    top = explain_vector(grouped.vector, sae, top=3)
    cos = [c for _, c in top]
    assert len(top) == 3 and cos == sorted(cos, reverse=True)
    strongest = int(torch.argmax(grouped.weights * basis.norm(dim=1)))
    assert strongest in [f for f, _ in explain_vector(grouped.vector, sae, top=8)]


def test_the_norm_bound_is_in_the_hooks_units_so_only_nonfinite_or_nonpositive_is_refused(lm):
    """Gemma 3's residual norms run to thousands: a bound of 6,000 units is ordinary there (it once stopped
    `suggest` on Gemma 3 270M with a NaN warning)."""
    fit = learn_steering_vector(lm, HOOK, REFS, prompts=PROMPTS, max_norm=6000.0, steps=1)
    assert fit.max_norm == 6000.0 and float(fit.vector.norm()) <= 6000.0 * (1 + 1e-5)
    for bad in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(MonoscopeError, match="norm bound"):
            learn_steering_vector(lm, HOOK, REFS, prompts=PROMPTS, max_norm=bad, steps=1)


def test_plan_measures_every_option_and_returns_a_steering_it_can_apply(lm, sae):
    plan = plan_steering(lm, sae, "fox", references=REFS, config=TowardConfig(method="auto", **SMALL))
    assert plan.options and all(math.isfinite(o.similarity) for o in plan.options)
    kinds = {o.kind for o in plan.options}
    cfg = TowardConfig(**SMALL)
    assert {"feature", "contrast", "diffmean"} <= kinds
    assert "vector" not in kinds  # DiffMean's vector was tried: no learned-vector fallback
    first_round = [o for o in plan.options if o.kind == "feature" and o.strength in cfg.strengths]
    assert len(first_round) == cfg.shortlist * len(cfg.strengths) * len(cfg.positions)
    for o in plan.options:
        assert len(o.texts) == len(TEST_PROMPTS) and o.perplexity > 0
        # the added vector's length is the strength in units of the hook's activation norm, whatever its kind
        v = o.vector if o.vector is not None else sum(val * sae.W_dec[f] for f, val in o.features)
        assert float(v.norm()) == pytest.approx(o.strength * plan.unit, rel=1e-3)
    out = json.loads(json.dumps(plan.to_dict()))
    assert (
        out["concept"] == "fox"
        and out["positions"] in ("generated", "all", "prompt")
        and len(out["options"]) == len(plan.options)
    )
    if plan.chosen is not None:
        assert plan.chosen in plan.options and plan.chosen.perplexity_ratio <= plan.max_perplexity_ratio
        assert plan.chosen.similarity > plan.unsteered_similarity
        plan.steering(sae).compile(lm)
    else:
        assert plan.notes


def test_without_diffmean_auto_falls_back_to_a_learned_vector_when_nothing_moves_the_text(lm, sae):
    cfg = TowardConfig(method="auto", contrast=False, min_gain=10.0, refine=0, **SMALL)  # no gain can reach 10
    plan = plan_steering(lm, sae, "fox", references=REFS, config=cfg)
    assert "vector" in {o.kind for o in plan.options} and "diffmean" not in {o.kind for o in plan.options}
    assert any("learned steering vector" in n for n in plan.notes)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(concept="  "), "concept is empty"),
        (dict(concept="fox", references=["x"] * 65), "too many"),
        (dict(concept="fox", references=["word " * 500]), "characters"),
    ],
)
def test_plan_bad_input_is_one_line(lm, sae, kwargs, message):
    with pytest.raises(MonoscopeError, match=message):
        plan_steering(lm, sae, **kwargs)


def test_config_and_helpers_refuse_nonsense():
    with pytest.raises(MonoscopeError, match="NaN"):
        TowardConfig(strengths=(float("nan"),))
    with pytest.raises(MonoscopeError, match="method"):
        TowardConfig(method="magic")
    with pytest.raises(MonoscopeError, match="no reference"):
        check_references(["", "   "])
    assert repetition([1, 2, 3, 1, 2, 3, 1, 2, 3]) > 0.4 and repetition([1, 2, 3, 4, 5]) == 0.0


@pytest.fixture(scope="module")
def sae_dir(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("toward-sae") / "sae"
    return save_sae(
        make_sae(model=str(tiny_llama_dir)), folder, info={"hook_point": HOOK, "model": str(tiny_llama_dir)}
    )


def test_steer_toward_json_and_suggest_json(sae_dir, capsys):
    code = main(
        [
            "steer",
            "--sae",
            str(sae_dir),
            "--toward",
            "fox",
            "--reference",
            REFS[0],
            "--method",
            "vector",
            "--prompt",
            PROMPTS[0],
            "--max-new-tokens",
            "5",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    if code == 0:
        out = json.loads(captured.out)
        assert {"prompt", "unsteered", "steered", "features", "vectors", "toward"} <= set(out)
        assert (
            out["toward"]["chosen"]["kind"] in ("vector", "diffmean")
            and out["vectors"]
            and out["toward"]["explanation"]
        )
    else:  # nothing moved the tiny model's text toward 'fox': one line that says so and what to try
        assert code == 2 and captured.err.count("\n") == 1 and "found nothing that steers toward 'fox'" in captured.err
    assert (
        main(["suggest", "--sae", str(sae_dir), "fox", "--reference", REFS[0], "--method", "features", "--json"]) == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(
        {"feature", "score", "source", "kind", "chosen", "similarity", "perplexity_ratio"} <= set(r) for r in rows
    )
    measured = [r for r in rows if r["similarity"] is not None and not r["chosen"]]
    assert [r["similarity"] for r in measured] == sorted((r["similarity"] for r in measured), reverse=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--toward", "  "], "--toward is empty"),
        (["--toward", "fox", "--feature", "1=add:2"], "leave out --feature"),
        (["--reference", "a fox"], "--reference goes with --toward"),
        (["--toward", "fox", "--strength", "nan"], "--strength is nan"),
    ],
)
def test_steer_toward_bad_input_exits_2_with_one_line(sae_dir, capsys, args, message):
    assert main(["steer", "--sae", str(sae_dir), *args, "--prompt", PROMPTS[0], "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_refinement_tries_a_strength_between_fluent_and_broken():
    """Two strengths a factor of two apart are a coarse grid: the next try sits between the strongest fluent one
    and the weakest broken one of the most promising directions, or halves a direction that broke at every strength."""
    base_a, base_b, base_c = object(), object(), object()

    def option(strength, ratio, sim, base, feature):
        return Option(
            "feature",
            strength,
            [(feature, 10.0 * strength)],
            "prompt",
            similarity=sim,
            perplexity_ratio=ratio,
            base=base,
        )

    options = [
        option(0.5, 1.5, 0.2, base_a, 1),
        option(1.0, 6.0, 0.6, base_a, 1),  # fluent at 0.5, broken at 1
        option(0.5, 4.0, 0.5, base_b, 2),
        option(1.0, 9.0, 0.5, base_b, 2),  # broken at both
        option(0.5, 1.1, 0.1, base_c, 3),
        option(1.0, 1.2, 0.15, base_c, 3),
    ]  # fluent at both: nothing to refine
    extra = {o.features[0][0]: o for o in _refinements(options, 2.5, top=3)}
    assert set(extra) == {1, 2}
    assert extra[1].strength == pytest.approx(math.sqrt(0.5)) and extra[1].features[0][1] == pytest.approx(
        10 * math.sqrt(0.5)
    )
    assert extra[2].strength == pytest.approx(0.25) and extra[2].features[0][1] == pytest.approx(2.5)
    assert _refinements(options, 2.5, top=1)[0].features[0][0] == 1  # only the most promising direction
