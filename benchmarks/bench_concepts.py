"""Concepts: can a user find a concept's feature, and does steering make the model talk about it? (issue 11)

Side by side in one run on the embedded model and an SAE with its feature database (the quickstart's, or --sae):

1. Findability: for each concept, is a feature with on-topic top examples among the first 3 results of
   `features search` (hybrid)? On-topic, fixed before any run: the mean all-MiniLM-L6-v2 cosine of the
   feature's 5 top example windows with the concept's name is >= 0.30 AND higher than with any other concept
   of the list. The hits and their first example are printed for reading.
2. Steering toward each concept while the model answers neutral chat prompts (greedy, chat template), by:
   - none: the unsteered model;
   - prompt: "Talk about CONCEPT." in front of the user's message;
   - sae-clamp: what monoscope offered before (the feature `suggest_features` ranked first by log-prob gain,
     clamped at 2x / 4x / 8x its max activation at every position);
   - suggest: what `monoscope suggest` / `steer --toward` now choose (`plan_steering`: single features, a learned
     feature group, DiffMean's SAE features and the DiffMean vector, tried by generation on its own prompts;
     `features`: the best option made of SAE features only; `auto`: the best of all, a learned vector too when
     nothing else moves the text);
   - diffmean: mean activation on the concept's reference sentences minus the mean over the other concepts'
     (all tokens but the first), at the SAE's hook, length 0.5 / 1 / 2 x the hook's mean activation norm, at
     the generated positions or all;
   - learned-vector: `learn_steering_vector` (free direction, targets: three references and the model's own
     answers to suggest's prompts with "Talk about CONCEPT."), at 0.5 / 1 x the hook norm, generated or all.
   Judge: the completion's MiniLM cosine with the concept (a mention at >= 0.35; the mean), its perplexity under
   the unsteered model (given the prompt it answered), and its share of repeated trigrams. Strength and
   settings are chosen on the TUNING prompts (the best mention rate whose perplexity is <= 2x, resp. 3x,
   the unsteered one); the figures come from the REPORT prompts only, with a bootstrap 95 % interval over
   (concept, prompt) pairs. suggest chooses its own strength on its own prompts (neither set).
3. Time: `plan_steering` + one steered generation for each concept.

Prints a table, writes JSON and a plot (matplotlib: `pip install -e '.[bench]'`).

The 14 concepts of `CONCEPTS` were used while developing the methods. `--concept-set held-out` runs the same
benchmark on 14 others (music, cooking, money, cars, railways, elections, disease, ships, dogs, forests, fire,
books, schools, computers) that nothing was tuned on, for the figures a change is reported with.

Usage: python benchmarks/bench_concepts.py [--sae DIR] [--concept-set held-out] [--concepts 14] [--tokens 32] [--quick]
       [--out docs/img/concepts.png]
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

# Everyday concepts that bench_steer.py does not use, each with four reference sentences.
CONCEPTS = {
    "cats": [
        "The cat curled up on the sofa and purred.",
        "My kitten loves to chase mice and play with yarn.",
        "Cats have soft fur, whiskers and sharp claws.",
        "The cat meowed at the door to be let out.",
    ],
    "outer space": [
        "The astronauts floated inside the space station high above the Earth.",
        "The rocket launched toward the Moon.",
        "Distant galaxies are full of stars and planets.",
        "The telescope showed the rings of Saturn.",
    ],
    "war": [
        "The soldiers marched into battle with their rifles.",
        "The army attacked the enemy fortress at dawn.",
        "Thousands died in the long and bloody war.",
        "The generals signed a peace treaty to end the fighting.",
    ],
    "medicine": [
        "The doctor prescribed antibiotics for the infection.",
        "The nurse gave the patient an injection at the hospital.",
        "This drug lowers blood pressure.",
        "The surgeon operated on her heart.",
    ],
    "weddings": [
        "The bride wore a white dress and walked down the aisle.",
        "They exchanged rings and vows at the wedding.",
        "The groom kissed the bride as the guests cheered.",
        "The wedding reception had a big cake and dancing.",
    ],
    "the weather": [
        "It will rain tomorrow with strong winds from the north.",
        "The forecast says sunny skies and warm temperatures.",
        "A thunderstorm rolled in and the temperature dropped.",
        "Heavy snow fell all night and the roads froze.",
    ],
    "sports": [
        "The team scored a goal in the final minute of the match.",
        "She won the tennis tournament in straight sets.",
        "The players trained hard for the championship game.",
        "The runner crossed the finish line first.",
    ],
    "farming": [
        "The farmer planted wheat and corn in his fields.",
        "Cows and pigs were kept in the barn.",
        "The harvest was good this year thanks to the rain.",
        "They plowed the soil with a tractor.",
    ],
    "birds": [
        "A robin built its nest in the tree.",
        "The eagle spread its wings and soared over the valley.",
        "Birds sang at dawn from every branch.",
        "The parrot has bright green feathers.",
    ],
    "mathematics": [
        "The theorem was proved using induction.",
        "Solve the equation for x and simplify the fraction.",
        "A prime number has no divisors except one and itself.",
        "The area of a circle is pi times the radius squared.",
    ],
    "the law and courts": [
        "The judge sentenced him to five years in prison.",
        "The jury found the defendant not guilty.",
        "Her lawyer appealed the verdict to a higher court.",
        "The trial began with the prosecutor's opening statement.",
    ],
    "religion": [
        "They prayed to God at the church every Sunday.",
        "The priest read from the Bible.",
        "Many faiths believe in heaven and the soul.",
        "Monks meditate in the temple.",
    ],
    "chemistry": [
        "Mix the acid with the base to form a salt and water.",
        "The molecule has two hydrogen atoms and one oxygen atom.",
        "The chemical reaction released heat.",
        "Sodium is a reactive alkali metal.",
    ],
    "movies": [
        "The film won the Academy Award for best picture.",
        "The actor starred in a new action movie.",
        "We watched the movie at the cinema with popcorn.",
        "The director shot the scene again.",
    ],
}
# A second list, used for nothing but reports (findability and steering samples after a change): run with
# --concept-set held-out.
HELD_OUT_CONCEPTS = {
    "music": [
        "The band played a loud song on their guitars and drums.",
        "She sang the melody while he played the piano.",
        "The orchestra performed a symphony by Beethoven.",
        "He listens to jazz records every evening.",
    ],
    "cooking": [
        "Fry the onions in butter, then add the garlic.",
        "She baked bread in the oven for forty minutes.",
        "Stir the soup and season it with salt and pepper.",
        "The chef chopped vegetables for the stew.",
    ],
    "money": [
        "He saved a hundred dollars from his salary every month.",
        "The bank charges interest on the loan.",
        "She paid for the groceries in cash.",
        "Prices rose and the coins in his pocket bought less.",
    ],
    "cars": [
        "He drove his car down the highway at night.",
        "The mechanic changed the engine oil and the tires.",
        "She parked the car and locked the doors.",
        "The new sedan has a powerful engine and leather seats.",
    ],
    "railways": [
        "The train left the station at nine o'clock.",
        "The locomotive pulled forty freight wagons along the track.",
        "Passengers waited on the platform for the express.",
        "The railway line crosses the river on a steel bridge.",
    ],
    "elections": [
        "Voters went to the polls to choose a new president.",
        "The candidate won the election by a wide margin.",
        "Ballots were counted late into the night.",
        "The party campaigned for votes across the country.",
    ],
    "disease": [
        "The virus spread quickly and many people fell ill.",
        "Symptoms of the infection include fever and a cough.",
        "The epidemic killed thousands in the city.",
        "Doctors searched for a cure for the illness.",
    ],
    "ships": [
        "The ship sailed out of the harbour at dawn.",
        "The captain ordered the crew to raise the anchor.",
        "A large cargo vessel crossed the ocean.",
        "The sailors steered the boat through the storm.",
    ],
    "dogs": [
        "The dog wagged its tail and barked at the mailman.",
        "She took her puppy for a walk in the park.",
        "The dog fetched the ball and dropped it at my feet.",
        "Our old hound sleeps by the fireplace.",
    ],
    "forests": [
        "Tall pine trees covered the hills of the forest.",
        "They walked among the oaks and beeches in the woods.",
        "Deer live deep in the forest.",
        "Loggers cut down trees in the rainforest.",
    ],
    "fire": [
        "The flames spread through the dry grass.",
        "Firefighters put out the blaze in the building.",
        "Smoke rose from the burning house.",
        "We lit a campfire and sat around it.",
    ],
    "books": [
        "She read the novel from the first page to the last.",
        "The library lends books to everyone in town.",
        "The author wrote three chapters this week.",
        "He bought a paperback at the bookshop.",
    ],
    "schools": [
        "The teacher wrote the lesson on the blackboard.",
        "Pupils sat at their desks in the classroom.",
        "The students took an exam at the end of term.",
        "The school bell rang and the children ran outside.",
    ],
    "computers": [
        "The computer's processor and memory were upgraded.",
        "She typed on the keyboard and clicked the mouse.",
        "The laptop crashed and had to be restarted.",
        "He installed new software on his PC.",
    ],
}
TUNING_PROMPTS = ["What did you do yesterday?", "Give me some advice.", "Write a short paragraph."]
REPORT_PROMPTS = [
    "Tell me about your weekend.",
    "What should I do today?",
    "Write a short story.",
    "Describe your favourite place.",
    "What are you thinking about?",
]
ON_TOPIC = 0.30
QUICKSTART_SAE = Path("runs/quickstart/sae")


def bootstrap(values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (math.nan, math.nan)
    means = values[rng.integers(0, values.size, size=(n, values.size))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def findability(store, concepts: list[str]) -> dict:
    from monoscope.features.embedding import embed_texts
    from monoscope.features.search import search_features

    names = embed_texts(concepts)
    out = {}
    for ci, concept in enumerate(concepts):
        hits = search_features(store, concept, limit=3, mode="hybrid")
        rows = []
        for h in hits:
            examples = [e.text for e in store.examples(h.feature_id, "top", limit=5)]
            sims = embed_texts(examples) @ names.T if examples else np.zeros((1, len(concepts)))
            mean = sims.mean(0)
            on_topic = bool(mean[ci] >= ON_TOPIC and int(np.argmax(mean)) == ci)
            rows.append(
                {
                    "feature": h.feature_id,
                    "label": h.label,
                    "cosine": round(float(mean[ci]), 3),
                    "on_topic": on_topic,
                    "example": (examples[0][:90] if examples else ""),
                }
            )
        out[concept] = {"findable": any(r["on_topic"] for r in rows), "hits": rows}
    return out


class Runner:
    """Generates many rows (concept, prompt, steering) in batches and judges them."""

    def __init__(self, lm, tokens: int, judges: dict):
        self.lm, self.tokens, self.judges = lm, tokens, judges

    def run(self, rows: list[tuple[str, str, object]]) -> list[dict]:
        from monoscope.steer.batch import generate_batch
        from monoscope.steer.concepts import completion_nll, repetition

        gens = generate_batch(
            self.lm,
            [p for _, p, _ in rows],
            steerings=[s for _, _, s in rows],
            max_new_tokens=self.tokens,
            max_batch=64,
        )
        nll = completion_nll(self.lm, gens)
        out = []
        for (concept, prompt, _), g, n in zip(rows, gens, nll):
            sim = float(self.judges[concept].similarity([g.text])[0])
            ppl = math.inf if g.finish_reason == "error" else math.exp(n) if math.isfinite(n) else math.nan
            out.append(
                {
                    "concept": concept,
                    "prompt": prompt,
                    "text": g.text,
                    "similarity": sim,
                    "mention": sim >= 0.35,
                    "perplexity": ppl,
                    "repetition": repetition(g.ids),
                }
            )
        return out


def perplexity_mean(values) -> float:
    """Geometric mean of completions' perplexities; inf when any is not finite (a failed or empty completion
    counts as unreadable, not as missing)."""
    ppl = np.asarray(values, dtype=np.float64)
    finite = ppl[np.isfinite(ppl) & (ppl > 0)]
    if finite.size < ppl.size:
        return math.inf
    return float(np.exp(np.log(finite).mean())) if finite.size else math.nan


def summarise(rows: list[dict], base_ppl: float) -> dict:
    sims = np.array([r["similarity"] for r in rows])
    mention = np.array([float(r["mention"]) for r in rows])
    gm = perplexity_mean([r["perplexity"] for r in rows])
    return {
        "mention_rate": float(mention.mean()),
        "mention_ci": bootstrap(mention),
        "similarity": float(sims.mean()),
        "similarity_ci": bootstrap(sims),
        "perplexity": gm,
        "perplexity_ratio": gm / base_ppl if base_ppl else math.nan,
        "repetition": float(np.mean([r["repetition"] for r in rows])),
        "n": len(rows),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", default=None, help="SAE folder with features.db (default: runs/quickstart/sae)")
    parser.add_argument(
        "--concept-set",
        choices=("tuning", "held-out"),
        default="tuning",
        help="the concepts methods were developed on, or the held-out list used for reports only (default: tuning)",
    )
    parser.add_argument("--concepts", type=int, default=None, help="how many of the set's 14 concepts (default: all)")
    parser.add_argument(
        "--steer-concepts", type=int, default=None, help="steer toward only the first N of them (findability uses all)"
    )
    parser.add_argument(
        "--steer-skip",
        type=int,
        default=0,
        help="skip the first K concepts when steering (a second sample: --steer-skip 4 --steer-concepts 4)",
    )
    parser.add_argument("--tokens", type=int, default=32, help="tokens per completion (default: 32)")
    parser.add_argument(
        "--methods", default="none,prompt,sae-clamp,suggest,diffmean,learned-vector", help="comma-separated methods"
    )
    parser.add_argument(
        "--quick", action="store_true", help="findability and suggest on the TUNING prompts only (to compare SAEs)"
    )
    parser.add_argument(
        "--out", default="docs/img/concepts.png", help="PNG of the results (JSON beside it, under runs/)"
    )
    parser.add_argument("--json", default="runs/bench_concepts.json", help="where to write the results as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)

    from monoscope.features.store import FeatureStore
    from monoscope.model import EMBEDDED_MODEL, load_model
    from monoscope.sae.io import sae_hook_point
    from monoscope.steer import Steering, load_steering_sae, suggest_features
    from monoscope.steer.concepts import NEUTRAL_PROMPTS, ConceptJudge, hook_norm, learn_steering_vector
    from monoscope.steer.featuredb import FeatureDB, default_db_path
    from monoscope.steer.toward import TowardConfig, _best, plan_steering, prompted

    folder = Path(args.sae) if args.sae else QUICKSTART_SAE
    if not default_db_path(folder).is_file():
        print(f"no SAE with a feature database at {folder}: run `monoscope quickstart` or pass --sae", file=sys.stderr)
        return 2
    references = CONCEPTS if args.concept_set == "tuning" else HELD_OUT_CONCEPTS
    concepts = list(references)[: args.concepts]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.quick:
        methods = ["none", "prompt", "suggest"]
    report_prompts = TUNING_PROMPTS if args.quick else REPORT_PROMPTS
    lm = load_model(EMBEDDED_MODEL)
    sae = load_steering_sae(folder)
    db = FeatureDB(default_db_path(folder))
    store = FeatureStore(default_db_path(folder))
    hook = sae_hook_point(sae)
    unit = hook_norm(lm, hook)
    judges = {c: ConceptJudge(c) for c in concepts}
    runner = Runner(lm, args.tokens, judges)
    result: dict = {
        "sae": str(folder),
        "hook": hook,
        "concept_set": args.concept_set,
        "concepts": concepts,
        "tuning_prompts": TUNING_PROMPTS,
        "report_prompts": report_prompts,
        "tokens": args.tokens,
        "unit": unit,
        "torch_threads": torch.get_num_threads(),
        "methods": {},
    }
    started = time.perf_counter()

    print(
        f"[1/3] findability: is a feature with on-topic top examples in the top 3 of `features search`? ({len(concepts)} concepts)"
    )
    found = findability(store, concepts)
    result["findability"] = found
    for c, v in found.items():
        print(
            f"  {'yes' if v['findable'] else 'no ':<4} {c:<20} "
            + " | ".join(
                f"#{h['feature']} {h['cosine']:.2f}{'*' if h['on_topic'] else ''} {(h['label'] or '')[:28]!r}"
                for h in v["hits"]
            ),
            flush=True,
        )
    rate = float(np.mean([v["findable"] for v in found.values()]))
    print(f"  findable: {rate:.0%} (target >= 85 %)")
    result["findable_rate"] = rate

    def rows_for(prompts, make):  # make(concept) -> (steering or None, prompt transform)
        rows = []
        for c in concepts:
            steering, transform = make(c)
            rows.extend((c, transform(p), steering) for p in prompts)
        return rows

    plain = lambda p: p  # noqa: E731
    concepts = concepts[args.steer_skip :]
    concepts = concepts[: args.steer_concepts] if args.steer_concepts else concepts
    result["steered_concepts"] = concepts
    print(
        f"[2/3] steering: {len(concepts)} concepts x {len(report_prompts)} report prompts, {args.tokens} greedy tokens"
        + ("" if args.quick else f"; settings chosen on {len(TUNING_PROMPTS)} tuning prompts"),
        flush=True,
    )
    base_tune = runner.run(rows_for(TUNING_PROMPTS, lambda c: (None, plain))) if not args.quick else None
    base_report = runner.run(rows_for(report_prompts, lambda c: (None, plain)))
    base_ppl = summarise(base_report, 1.0)["perplexity"]
    base_tune_ppl = summarise(base_tune, 1.0)["perplexity"] if base_tune else base_ppl
    result["methods"]["none"] = {"report": summarise(base_report, base_ppl), "rows": base_report}

    def evaluate(name: str, settings: dict) -> None:
        """settings: {setting: make(concept)}; choose on TUNING per perplexity bound, report on REPORT."""
        tuned = {}
        for setting, make in settings.items():
            tuned[setting] = (
                summarise(runner.run(rows_for(TUNING_PROMPTS, make)), base_tune_ppl) if len(settings) > 1 else None
            )
            if tuned[setting]:
                t = tuned[setting]
                print(
                    f"    tuning {name} {setting}: mentions {t['mention_rate']:.2f} sim {t['similarity']:.3f} ppl x{t['perplexity_ratio']:.2f}",
                    flush=True,
                )
        entry = {"tuning": {k: v for k, v in tuned.items() if v}, "report": {}}
        for bound in (2.0, 3.0):
            ok = [s for s in settings if tuned[s] is None or tuned[s]["perplexity_ratio"] <= bound]
            if not ok:
                entry["report"][f"ppl<={bound:g}x"] = None
                continue
            best = max(ok, key=lambda s: (tuned[s]["mention_rate"], tuned[s]["similarity"]) if tuned[s] else (0, 0))
            key = f"ppl<={bound:g}x"
            done = next((v for v in entry["report"].values() if v and v["setting"] == best), None)
            if done is None:
                rows = runner.run(rows_for(report_prompts, settings[best]))
                done = {"setting": best, **summarise(rows, base_ppl), "rows": rows}
            entry["report"][key] = done
        result["methods"][name] = entry

    if "prompt" in methods:
        rows = runner.run(rows_for(report_prompts, lambda c: (None, lambda p, c=c: prompted(c, p))))
        result["methods"]["prompt"] = {"report": summarise(rows, base_ppl), "rows": rows}
    if "sae-clamp" in methods:
        old = {}
        for c in concepts:
            found_old = suggest_features(lm, sae, c, references=references[c][:2], db=db, top=1)
            old[c] = found_old[0].feature if found_old else None
        result["sae_clamp_features"] = old

        def clamp(mult):
            return lambda c: (
                (Steering(sae, max_activations=db).clamp(old[c], f"{mult}x") if old[c] is not None else None),
                plain,
            )

        evaluate("sae-clamp", {f"{m}x": clamp(m) for m in (2, 4, 8)})
    if "suggest" in methods:
        plans, timing = {}, {}
        for c in concepts:
            t0 = time.perf_counter()
            plan = plan_steering(lm, sae, c, references=references[c][:3], db=db, config=TowardConfig(method="auto"))
            feature_only = _best([o for o in plan.options if o.vector is None], plan.max_perplexity_ratio)
            plans[c] = (plan, feature_only)
            steered = runner.run([(c, report_prompts[0], plan.steering(sae, db) if plan.works else None)])
            timing[c] = time.perf_counter() - t0
            ch = plan.chosen
            print(
                f"  suggest {c!r}: {ch.describe() if ch else 'nothing'} (own prompts: sim {ch.similarity if ch else float('nan'):.3f}, "
                f"ppl x{ch.perplexity_ratio if ch else float('nan'):.2f}) in {timing[c]:.0f} s | {steered[0]['text'][:70]!r}",
                flush=True,
            )
        result["suggest_seconds"] = timing
        result["suggest_plans"] = {c: p.to_dict() for c, (p, _) in plans.items()}

        for name, pick in (
            ("suggest (auto)", lambda c: plans[c][0].chosen),
            ("suggest (features)", lambda c: plans[c][1]),
        ):
            rows = runner.run(
                rows_for(
                    report_prompts, lambda c, pick=pick: (pick(c).steering(sae, hook, db) if pick(c) else None, plain)
                )
            )
            result["methods"][name] = {
                "report": summarise(rows, base_ppl),
                "rows": rows,
                "kinds": {c: (pick(c).kind if pick(c) else None) for c in concepts},
            }
    if "diffmean" in methods:
        from monoscope.steer.vectors import mean_activations

        means = {c: mean_activations(lm, references[c], [hook], position="mean")[hook] for c in references}
        direction = {}
        for c in concepts:
            others = torch.stack([means[o] for o in references if o != c]).mean(0)
            d = means[c] - others
            direction[c] = d / d.norm()

        def dm(strength, where):
            return lambda c: (
                Steering(positions=where).add_vector(direction[c] * strength * unit, 1.0, hook=hook),
                plain,
            )

        evaluate("diffmean", {f"{s:g} {w}": dm(s, w) for s in (0.5, 1.0, 2.0) for w in ("generated", "all", "prompt")})
    if "learned-vector" in methods:
        from monoscope.steer.batch import generate_batch

        asked = [(c, p) for c in concepts for p in NEUTRAL_PROMPTS]
        answers = generate_batch(lm, [prompted(c, p) for c, p in asked], max_new_tokens=24, max_batch=64)
        vectors = {}
        for c in concepts:
            targets = [g.text for (cc, _), g in zip(asked, answers) if cc == c and g.text.strip()]
            fit = learn_steering_vector(lm, hook, references[c][:3] + targets, max_norm=unit)
            vectors[c] = fit.vector / fit.vector.norm().clamp_min(1e-12)
            print(f"  learned {c!r}: loss {fit.loss_before:.3f} -> {fit.loss_after:.3f}", flush=True)

        def lv(strength, where):
            return lambda c: (Steering(positions=where).add_vector(vectors[c] * strength * unit, 1.0, hook=hook), plain)

        evaluate("learned-vector", {f"{s:g} {w}": lv(s, w) for s in (0.5, 1.0) for w in ("generated", "all", "prompt")})

    print(
        f"[3/3] results on the {len(report_prompts)} report prompts ({len(concepts)} concepts; 95 % bootstrap intervals over (concept, prompt))"
    )
    print(
        f"  {'method':<20} {'setting':<10} {'bound':<9} {'mention rate':>20} {'similarity':>20} {'ppl ratio':>9} {'repeat':>6}"
    )
    table = []
    for name, entry in result["methods"].items():
        reports = entry["report"]
        items = reports.items() if isinstance(reports, dict) and "mention_rate" not in reports else [("-", reports)]
        for bound, r in items:
            if not r:
                print(f"  {name:<20} {'-':<10} {bound:<9} (no setting within the bound)")
                continue
            table.append((name, r.get("setting", "-"), bound, r))
            print(
                f"  {name:<20} {str(r.get('setting', '-')):<10} {bound:<9} {r['mention_rate']:>6.2f} [{r['mention_ci'][0]:.2f}, {r['mention_ci'][1]:.2f}]"
                f"   {r['similarity']:>6.3f} [{r['similarity_ci'][0]:.3f}, {r['similarity_ci'][1]:.3f}] {r['perplexity_ratio']:>9.2f} {r['repetition']:>6.2f}"
            )
    result["seconds"] = time.perf_counter() - started
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    print(f"  data: {args.json}   ({result['seconds']:.0f} s)")
    try:
        plot(table, Path(args.out), result)
        print(f"  plot: {args.out}")
    except ImportError:
        print("  (no plot: pip install matplotlib)")
    return 0


def plot(table, path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, setting, bound, r in table:
        ratio = min(r["perplexity_ratio"], 20.0)
        ax.errorbar(
            ratio,
            r["mention_rate"],
            yerr=[[r["mention_rate"] - r["mention_ci"][0]], [r["mention_ci"][1] - r["mention_rate"]]],
            fmt="o",
            capsize=3,
            label=f"{name} {setting if setting != '-' else ''} ({bound})".replace(" (-)", ""),
        )
    ax.axvline(2, color="grey", ls=":", lw=1)
    ax.axvline(3, color="grey", ls="--", lw=1)
    ax.set(
        xlabel="perplexity of the completions / unsteered (capped at 20)",
        ylabel="completions that mention the concept",
        title=f"steering toward {len(result.get('steered_concepts', result['concepts']))} concepts ({result['hook']}; report prompts)",
        ylim=(-0.02, 1.02),
    )
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
