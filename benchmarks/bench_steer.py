"""Steering cost and effect, measured side by side in one run on the embedded model (issue 5: interventions).

1. overhead: tokens/s of greedy generation with 3 features clamped vs unsteered          (target >= 0.9x)
2. efficacy: for several concepts, the fraction of completions that mention the concept, steered by
   clamping the concept's feature at a sweep of multiples of its max activation vs unsteered; a completion
   "mentions" the concept when the cosine of its all-MiniLM-L6-v2 embedding with the concept's text is
   >= 0.35 (unrelated sentences score about 0.0-0.2 with a one- or two-word concept; a sentence about it 0.4+)
3. fluency cost: perplexity of the steered completions under the unsteered model, over the same sweep

Each concept's feature is the one `suggest_features` ranks first (`monoscope suggest`: candidates from the
database's label and example search, ranked by how much adding the feature raises the likelihood of text
about the concept), on the quickstart SAE and database (runs/quickstart/sae) or `--sae`. Without any SAE the
overhead is measured with a random TopK SAE of the quickstart's shape and the efficacy part is skipped.
The sweep is printed as a table and drawn to a PNG (matplotlib: `pip install -e '.[bench]'`).

Usage: python benchmarks/bench_steer.py [--sae DIR] [--tokens 64] [--out runs/bench_steer.png]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Each concept with two short texts about it: the references a user gives `monoscope suggest --reference`.
CONCEPTS = {
    "the ocean": ["The waves crashed against the shore.", "We sailed across the sea to a distant island."],
    "cooking food": [
        "She chopped the onions and stirred the soup.",
        "Bake the bread in a hot oven for twenty minutes.",
    ],
    "dogs": ["The dog wagged its tail and barked.", "My puppy loves to chase the ball in the park."],
    "music": ["The band played a song on guitar and drums.", "She sang a beautiful melody at the concert."],
    "computer programming": [
        "Write the code in Python and fix the bug in the loop.",
        "The compiler reported a syntax error.",
    ],
    "money": ["He paid a lot of money for the house.", "The bank raised the interest rate on loans."],
}
PROMPTS = [
    "Tell me about your weekend.",
    "What should I do today?",
    "Write a short story.",
    "Describe your favourite place.",
]
MENTION_THRESHOLD = 0.35
SWEEP = [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0]
QUICKSTART_SAE = Path("runs/quickstart/sae")


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def random_sae(d_in: int, hook: str, model: str):
    from monoscope.sae import SAEConfig, TopKSAE

    sae = TopKSAE(
        SAEConfig(
            d_in=d_in, d_sae=8 * d_in, architecture="topk", k=32, metadata={"hook_name": hook, "model_name": model}
        )
    )
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.05)
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
    sae.info = {"hook_point": hook, "model": model}
    return sae.requires_grad_(False)


def overhead(lm, sae, tokens: int, repeats: int) -> dict:
    from monoscope.steer import Steering, steer
    from monoscope.steer.runtime import encode_prompt

    ids = encode_prompt(lm.tokenizer, PROMPTS[0], device=lm.device)
    steering = (
        Steering(sae, max_activations={f: 1.0 for f in range(sae.cfg.d_sae)}).clamp(1, 4.0).clamp(2, 4.0).clamp(3, 4.0)
    )
    kw = dict(
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        attention_mask=torch.ones_like(ids),
        pad_token_id=lm.tokenizer.eos_token_id,
    )

    def plain():
        with torch.inference_mode():
            lm.model.generate(ids, **kw)

    def steered():
        with steer(lm, steering), torch.inference_mode():
            lm.model.generate(ids, **kw)

    plain(), steered()  # warm-up
    t_plain, t_steer = [], []
    for _ in range(repeats):  # interleaved, best of each
        t_plain.append(best_time(plain, 1))
        t_steer.append(best_time(steered, 1))
    plain_tps, steer_tps = tokens / min(t_plain), tokens / min(t_steer)
    median_ratio = float(np.median(t_plain) / np.median(t_steer))
    return {
        "tokens": tokens,
        "repeats": repeats,
        "unsteered_tok_s": round(plain_tps, 1),
        "steered_tok_s": round(steer_tps, 1),
        "ratio": round(steer_tps / plain_tps, 3),
        "median_ratio": round(median_ratio, 3),
    }


def concept_features(lm, sae, db, concepts: list[str]) -> dict[str, dict]:
    """Each concept's feature as a user finds it: `suggest_features` with the concept's reference texts (the
    database's search and example candidates, ranked by output effect; activation candidates without a
    database), best one."""
    from monoscope.steer import suggest_features

    out = {}
    for concept in concepts:
        found = suggest_features(lm, sae, concept, references=CONCEPTS[concept], db=db, top=1, candidates=24)
        if found:
            out[concept] = {
                "feature": found[0].feature,
                "label": found[0].label,
                "source": found[0].source,
                "score": round(found[0].score, 4),
            }
            print(
                f"  {concept!r}: feature {found[0].feature} ({found[0].source}, label {found[0].label!r})", flush=True
            )
    return out


def completions(lm, steering, tokens: int) -> tuple[list[str], list[float]]:
    """Greedy completions of PROMPTS (one batch, `generate_batch`) and each one's perplexity under the unsteered model."""
    from monoscope.steer import generate_batch

    out = generate_batch(lm, PROMPTS, steerings=steering, max_new_tokens=tokens)
    ppl = []
    with torch.inference_mode():
        for row in out:
            new = row.ids  # up to and including the EOS that ended the row, if one did
            if not new:
                ppl.append(float("nan"))
                continue
            ids = torch.tensor([row.prompt_ids + new], device=lm.device)
            logits = lm.model(input_ids=ids).logits[0, len(row.prompt_ids) - 1 : -1].float()
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(new, device=lm.device))
            ppl.append(math.exp(float(nll)))
    return [row.text for row in out], ppl


def efficacy(lm, sae, db, tokens: int, concepts: list[str]) -> dict:
    from monoscope.features.embedding import embed_texts
    from monoscope.sae.io import sae_hook_point
    from monoscope.steer import Steering
    from monoscope.steer.featuredb import estimate_max_activations

    chosen = concept_features(lm, sae, db, concepts)
    if not chosen:
        return {"skipped": "no feature found for any concept"}
    features = {c: v["feature"] for c, v in chosen.items()}
    maxima = (
        db.max_activations(features.values())
        if db is not None
        else estimate_max_activations(lm, sae, sae_hook_point(sae), features.values())
    )
    concept_emb = {c: embed_texts([c])[0] for c in features}
    rows = {c: [] for c in features}
    for concept, feature in features.items():
        for mult in SWEEP:
            steering = Steering(sae, max_activations=maxima)
            if mult:
                steering.clamp(feature, f"{mult}x")
            texts, ppl = completions(lm, steering, tokens)
            sims = embed_texts(texts) @ concept_emb[concept]
            rows[concept].append(
                {
                    "multiple": mult,
                    "mention_rate": float((sims >= MENTION_THRESHOLD).mean()),
                    "mean_similarity": float(sims.mean()),
                    "perplexity": float(np.nanmean(ppl)),
                    "example": texts[0][:120],
                }
            )
            print(
                f"  {concept:<22} feature {feature:>6}  clamp {mult:>4g}x  mentions {rows[concept][-1]['mention_rate']:.2f}  "
                f"sim {rows[concept][-1]['mean_similarity']:.2f}  ppl {rows[concept][-1]['perplexity']:8.1f}  | {texts[0][:60]!r}",
                flush=True,
            )
    curve = []
    for i, mult in enumerate(SWEEP):
        curve.append(
            {
                "multiple": mult,
                "mention_rate": float(np.mean([rows[c][i]["mention_rate"] for c in rows])),
                "mean_similarity": float(np.mean([rows[c][i]["mean_similarity"] for c in rows])),
                "perplexity": float(np.exp(np.nanmean([math.log(rows[c][i]["perplexity"]) for c in rows]))),
            }
        )
    return {"features": features, "chosen": chosen, "threshold": MENTION_THRESHOLD, "curve": curve, "per_concept": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve, per = result["curve"], result["per_concept"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    panels = [("mention_rate", "mean"), ("mean_similarity", "mean"), ("perplexity", "geometric mean")]
    for concept, rows in per.items():
        label = f"{concept} (#{result['features'][concept]})"
        for ax, (key, _) in zip(axes, panels):
            ax.plot([r["multiple"] for r in rows], [r[key] for r in rows], alpha=0.5, label=label)
    for ax, (key, summary) in zip(axes, panels):
        ax.plot([c["multiple"] for c in curve], [c[key] for c in curve], "k-o", lw=2, label=summary)
        ax.legend(fontsize=7)
    xlabel = "clamp (x the feature's max activation)"
    axes[0].set(
        xlabel=xlabel,
        ylabel="completions that mention the concept",
        title=f"efficacy (MiniLM cosine >= {result['threshold']})",
        ylim=(-0.02, 1.02),
    )
    axes[1].set(
        xlabel=xlabel, ylabel="MiniLM cosine of completion and concept", title="closeness to the concept (mean)"
    )
    axes[2].set(xlabel=xlabel, ylabel="perplexity under the unsteered model", yscale="log", title="fluency cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sae", default=None, help="SAE folder on the embedded model (default: runs/quickstart/sae when it exists)"
    )
    parser.add_argument("--tokens", type=int, default=64, help="tokens per generation for the overhead (default: 64)")
    parser.add_argument(
        "--efficacy-tokens", type=int, default=32, help="tokens per completion for efficacy (default: 32)"
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="interleaved plain/steered generations for the overhead (default: 7)"
    )
    parser.add_argument(
        "--concepts", type=int, default=len(CONCEPTS), help=f"how many of the {len(CONCEPTS)} concepts (default: all)"
    )
    parser.add_argument("--out", default="runs/bench_steer.png", help="PNG of the efficacy / fluency sweep")
    args = parser.parse_args()
    torch.manual_seed(0)

    from monoscope.model import EMBEDDED_MODEL, load_model
    from monoscope.steer import load_steering_sae
    from monoscope.steer.featuredb import FeatureDB, default_db_path

    lm = load_model(EMBEDDED_MODEL)
    folder = Path(args.sae) if args.sae else (QUICKSTART_SAE if (QUICKSTART_SAE / "cfg.json").is_file() else None)
    sae = load_steering_sae(folder) if folder else None
    db = FeatureDB(default_db_path(folder)) if folder and default_db_path(folder).is_file() else None
    report: dict = {
        "model": EMBEDDED_MODEL,
        "sae": str(folder) if folder else None,
        "database": str(db.path) if db else None,
        "torch_threads": torch.get_num_threads(),
    }

    print(
        f"[1/2] overhead: {args.tokens} greedy tokens, 3 features clamped vs unsteered ({args.repeats} of each, interleaved)"
    )
    bench_sae = sae if sae is not None else random_sae(lm.d_model, f"resid_post.{lm.n_layers // 2}", EMBEDDED_MODEL)
    report["overhead"] = overhead(lm, bench_sae, args.tokens, args.repeats)
    o = report["overhead"]
    print(
        f"  unsteered {o['unsteered_tok_s']} tok/s, steered {o['steered_tok_s']} tok/s (best of each): ratio {o['ratio']:.3f}x, "
        f"ratio of medians {o['median_ratio']:.3f}x (target >= 0.9x)"
    )

    print("[2/2] efficacy and fluency over a clamp sweep")
    if sae is None:
        print(
            "  skipped: no SAE (run `monoscope quickstart` and `monoscope analyze --sae runs/quickstart/sae`, or pass --sae)"
        )
    else:
        result = efficacy(lm, sae, db, args.efficacy_tokens, list(CONCEPTS)[: args.concepts])
        report["efficacy"] = result
        if "curve" in result:
            print(
                f"  {'clamp':>6} {'mention rate':>13} {'similarity':>11} {'perplexity':>11}   (mention: MiniLM cosine >= {MENTION_THRESHOLD})"
            )
            for c in result["curve"]:
                print(
                    f"  {c['multiple']:>5g}x {c['mention_rate']:>13.2f} {c['mean_similarity']:>11.3f} {c['perplexity']:>11.1f}"
                )
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            plot(result, out)
            out.with_suffix(".json").write_text(json.dumps(report, indent=2))
            print(f"  plot: {out}   data: {out.with_suffix('.json')}")
    print(
        json.dumps(
            {k: v for k, v in report.items() if k != "efficacy"} | {"curve": report.get("efficacy", {}).get("curve")},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
