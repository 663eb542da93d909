"""Is the choice or the option set what limits `steer --toward`? (issue 11)

`plan_steering` (behind `suggest` / `steer --toward`) tries ~20 options per concept on 3 prompts x 20 tokens and
picks one. This benchmark generates with EVERY option the plan tried on bench_concepts.py's 5 REPORT prompts
(32 greedy tokens, the same judge) and on 6 more prompts (20 tokens), in one run, and prints, per concept and on
average:

- plan: the option the plan chose;
- re-measured: the 4 options the plan ranked highest (perplexity within 1.5x its bound) generated again on the 6
  more prompts, chosen on all 9 (a second measurement against the winner's luck of ~20 noisy estimates);
- more prompts alone: every option chosen on the 6 more prompts only (mean cosine, perplexity there within 2.5x,
  3x or 4.2x), a choice made on completions independent of the report's;
- hindsight: the option with the most mentions on the report prompts themselves at perplexity <= 3x. No rule
  can know this; it is the ceiling of the option set, and an optimistic one (chosen on the set it is scored on).

It also prints how the plan's perplexity ratio (20 tokens) compares with the ratio on the report prompts (32
tokens): the median of report / plan over every option.

Usage: python benchmarks/bench_concepts_ceiling.py [--sae DIR] [--concepts weddings,birds,...] [--json PATH]
       python benchmarks/bench_concepts_ceiling.py --from-json runs/bench_concepts_ceiling.json  # print again
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_concepts import (  # noqa: E402
    CONCEPTS,
    HELD_OUT_CONCEPTS,
    QUICKSTART_SAE,
    REPORT_PROMPTS,
    Runner,
    perplexity_mean,
)

MORE_PROMPTS = [
    "What would you like to talk about?",
    "Tell me a little about yourself.",
    "Write something for me.",
    "What's new?",
    "Describe a typical morning.",
    "Give me an idea for a short text.",
]
SAMPLES_2_AND_3 = "weddings,the weather,sports,farming,birds,mathematics,the law and courts,religion"
MENTION = 0.35


def measure(args) -> dict:
    import torch

    from monoscope.model import EMBEDDED_MODEL, load_model
    from monoscope.sae.io import sae_hook_point
    from monoscope.steer import load_steering_sae
    from monoscope.steer.concepts import ConceptJudge
    from monoscope.steer.featuredb import FeatureDB, default_db_path
    from monoscope.steer.toward import TowardConfig, plan_steering

    torch.manual_seed(0)
    references = {**CONCEPTS, **HELD_OUT_CONCEPTS}
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    unknown = [c for c in concepts if c not in references]
    if unknown:
        raise SystemExit(f"unknown concepts {unknown}: choose among {', '.join(references)}")
    folder = Path(args.sae)
    lm, sae = load_model(EMBEDDED_MODEL), load_steering_sae(folder)
    db, hook = FeatureDB(default_db_path(folder)), sae_hook_point(sae)
    judges = {c: ConceptJudge(c) for c in concepts}
    report, more = Runner(lm, 32, judges), Runner(lm, 20, judges)
    out: dict = {"sae": str(folder), "report_prompts": REPORT_PROMPTS, "more_prompts": MORE_PROMPTS, "concepts": {}}
    for c in concepts:
        started = time.perf_counter()
        plan = plan_steering(lm, sae, c, references=references[c][:3], db=db, config=TowardConfig(method="auto"))
        planned = time.perf_counter() - started
        specs = [None] + [o.steering(sae, hook, db) for o in plan.options]
        on_report = report.run([(c, p, s) for s in specs for p in REPORT_PROMPTS])
        on_more = more.run([(c, p, s) for s in specs for p in MORE_PROMPTS])
        n_r, n_m = len(REPORT_PROMPTS), len(MORE_PROMPTS)
        rows = []
        for i in range(len(specs)):
            o = plan.options[i - 1] if i else None
            rows.append(
                {
                    "option": o.describe() if o else "unsteered",
                    "plan_similarity": o.similarity if o else None,
                    "plan_ratio": o.perplexity_ratio if o else 1.0,
                    "report": [(r["similarity"], r["perplexity"]) for r in on_report[i * n_r : (i + 1) * n_r]],
                    "more": [(r["similarity"], r["perplexity"]) for r in on_more[i * n_m : (i + 1) * n_m]],
                    "text": on_report[i * n_r]["text"][:80],
                }
            )
        out["concepts"][c] = {
            "plan_seconds": planned,
            "bound": plan.max_perplexity_ratio,
            "chosen": next((i for i, o in enumerate(plan.options, 1) if o is plan.chosen), None),
            "rows": rows,
        }
        print(f"  {c}: plan {planned:.0f} s, every option generated in {time.perf_counter() - started - planned:.0f} s")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return out


def summarise(data: dict) -> None:
    alone_bounds = (2.5, 3.0, 4.2)
    picks: dict[str, list[tuple[float, float]]] = {"plan": [], "re-measured": []}
    picks.update({f"more prompts alone, <= {b:g}x": [] for b in alone_bounds})
    picks["hindsight"] = []
    length_bias = []
    print(f"  {'concept':<20} {'plan':>12} {'re-measured':>12} {'hindsight':>12}   (mentions / perplexity ratio)")
    for c, entry in data["concepts"].items():
        rows, bound = entry["rows"], entry["bound"]
        base_r = perplexity_mean([p for _, p in rows[0]["report"]])
        base_m = perplexity_mean([p for _, p in rows[0]["more"]])
        options = rows[1:]
        for o in options:
            o["mentions"] = float(np.mean([s >= MENTION for s, _ in o["report"]]))
            o["ratio"] = perplexity_mean([p for _, p in o["report"]]) / base_r
            more_ratio = perplexity_mean([p for _, p in o["more"]]) / base_m
            n_plan, n_more = 3, len(o["more"])  # the plan's own estimate is over its 3 TEST_PROMPTS
            o["more_similarity"], o["more_ratio"] = float(np.mean([s for s, _ in o["more"]])), more_ratio
            o["pooled_similarity"] = (n_plan * o["plan_similarity"] + sum(s for s, _ in o["more"])) / (n_plan + n_more)
            o["pooled_ratio"] = (
                math.exp((n_plan * math.log(o["plan_ratio"]) + n_more * math.log(more_ratio)) / (n_plan + n_more))
                if all(math.isfinite(x) and x > 0 for x in (o["plan_ratio"], more_ratio))
                else math.inf
            )
            if all(math.isfinite(x) and x > 0 for x in (o["ratio"], o["plan_ratio"])):
                length_bias.append(math.log(o["ratio"] / o["plan_ratio"]))
        chosen = options[entry["chosen"] - 1] if entry["chosen"] else None
        finalists = sorted(
            [o for o in options if o["plan_ratio"] <= 1.5 * bound and math.isfinite(o["plan_similarity"])],
            key=lambda o: -o["plan_similarity"],
        )[:4]
        fluent = [o for o in finalists if o["pooled_ratio"] <= bound]
        second = max(fluent, key=lambda o: o["pooled_similarity"]) if fluent else None
        for b in alone_bounds:
            fluent_there = [o for o in options if o["more_ratio"] <= b]
            o = max(fluent_there, key=lambda o: o["more_similarity"]) if fluent_there else None
            picks[f"more prompts alone, <= {b:g}x"].append((o["mentions"], o["ratio"]) if o else (0.0, 1.0))
        within = [o for o in options if o["ratio"] <= 3]
        best = max(within, key=lambda o: (o["mentions"], -o["ratio"])) if within else None
        cells = []
        for name, o in (("plan", chosen), ("re-measured", second), ("hindsight", best)):
            pick = (o["mentions"], o["ratio"]) if o else (0.0, 1.0)
            picks[name].append(pick)
            cells.append(f"{pick[0]:.1f} / {pick[1]:.2f}x" if o else "none (0)")
        print(f"  {c:<20} " + " ".join(f"{cell:>12}" for cell in cells))
    for name, values in picks.items():
        m = np.array([v[0] for v in values])
        print(
            f"  {name:<28} mentions {m.mean():.2f} over {len(m)} concepts x {len(data['report_prompts'])} prompts, "
            f"perplexity <= 3x for {np.mean([v[1] <= 3 for v in values]):.0%}"
        )
    if length_bias:
        print(
            f"  perplexity ratio on the report prompts (32 tokens) / the plan's (20 tokens), median over "
            f"{len(length_bias)} options: {math.exp(float(np.median(length_bias))):.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", default=str(QUICKSTART_SAE), help="SAE folder with features.db")
    parser.add_argument("--concepts", default=SAMPLES_2_AND_3, help="comma-separated concepts of bench_concepts.py")
    parser.add_argument("--json", default="runs/bench_concepts_ceiling.json", help="where to write every generation")
    parser.add_argument("--from-json", default=None, help="summarise a saved run instead of measuring")
    args = parser.parse_args()
    data = json.loads(Path(args.from_json).read_text()) if args.from_json else measure(args)
    summarise(data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
