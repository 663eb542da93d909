"""Steering cost and effect, measured side by side in one run on the embedded model (issue 5: interventions).

1. overhead: tokens/s of greedy generation with 3 features clamped vs unsteered          (target >= 0.9x)
2. efficacy: for several concepts, the fraction of completions that mention the concept, steered by
   clamping the concept's feature at a sweep of multiples of its max activation vs unsteered; a completion
   "mentions" the concept when the cosine of its all-MiniLM-L6-v2 embedding with the concept's text is
   >= 0.35 (unrelated sentences score about 0.0-0.2 with a one- or two-word concept; a sentence about it 0.4+)
3. fluency cost: perplexity of the steered completions under the unsteered model, over the same sweep

The concept features come from the quickstart database (runs/quickstart/sae/features.db, label search) when
it exists, else from `--sae` (its database, else `suggest_features` without one). Without any SAE the
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

CONCEPTS = ["the ocean", "cooking food", "dogs", "music", "computer programming", "money"]
PROMPTS = ["Tell me about your weekend.", "What should I do today?", "Write a short story.", "Describe your favourite place."]
MENTION_THRESHOLD = 0.35
SWEEP = [0.0, 2.0, 4.0, 8.0, 16.0]
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

    sae = TopKSAE(SAEConfig(d_in=d_in, d_sae=8 * d_in, architecture="topk", k=32, metadata={"hook_name": hook, "model_name": model}))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.05)
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
    sae.info = {"hook_point": hook, "model": model}
    return sae.requires_grad_(False)


def overhead(lm, sae, tokens: int, repeats: int) -> dict:
    from monoscope.steer import Steering, steer
    from monoscope.steer.generation import encode_prompt

    ids = encode_prompt(lm.tokenizer, PROMPTS[0], device=lm.device)
    steering = Steering(sae, max_activations={f: 1.0 for f in range(sae.cfg.d_sae)}).clamp(1, 4.0).clamp(2, 4.0).clamp(3, 4.0)
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=lm.tokenizer.eos_token_id)

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
    return {"tokens": tokens, "unsteered_tok_s": round(plain_tps, 1), "steered_tok_s": round(steer_tps, 1), "ratio": round(steer_tps / plain_tps, 3)}


def concept_features(lm, sae, db, concepts: list[str]) -> dict[str, int]:
    from monoscope.steer import suggest_features

    out = {}
    for concept in concepts:
        if db is not None:
            hits = db.search(concept, top=1)
            if hits:
                out[concept] = hits[0][0]
                continue
        found = suggest_features(lm, sae, concept, db=db, top=1, candidates=12)
        if found:
            out[concept] = found[0].feature
    return out


@torch.inference_mode()
def completions(lm, steering, tokens: int) -> tuple[list[str], list[float]]:
    """Greedy completions of PROMPTS (batched, left-padded) and each one's perplexity under the unsteered model."""
    from monoscope.steer import steer

    tok = lm.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) if tok.chat_template else p for p in PROMPTS]
    side = tok.padding_side
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not tok.chat_template).to(lm.device)
    tok.padding_side = side
    with steer(lm, steering):
        out = lm.model.generate(**batch, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    n = batch.input_ids.shape[1]
    new = out[:, n:]
    mask = torch.cat([batch.attention_mask, (new != -1).long()], 1)
    logits = lm.model(input_ids=out, attention_mask=mask).logits[:, n - 1 : -1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), new.reshape(-1), reduction="none").view(new.shape)
    eos = tok.eos_token_id
    valid = torch.ones_like(new, dtype=torch.bool)
    if eos is not None:  # stop counting after the first EOS
        valid = (new == eos).long().cumsum(1).sub((new == eos).long()) == 0
    ppl = [math.exp(float(nll[i][valid[i]].mean())) if valid[i].any() else float("nan") for i in range(len(PROMPTS))]
    return [tok.decode(row, skip_special_tokens=True) for row in new], ppl


def efficacy(lm, sae, db, tokens: int, concepts: list[str]) -> dict:
    from monoscope.features.embedding import embed_texts
    from monoscope.steer import Steering
    from monoscope.steer.featuredb import estimate_max_activations
    from monoscope.steer.steering import sae_hook

    features = concept_features(lm, sae, db, concepts)
    if not features:
        return {"skipped": "no feature found for any concept"}
    maxima = db.max_activations(features.values()) if db is not None else estimate_max_activations(lm, sae, sae_hook(sae), features.values())
    concept_emb = {c: embed_texts([c])[0] for c in features}
    rows = {c: [] for c in features}
    for concept, feature in features.items():
        for mult in SWEEP:
            steering = Steering(sae, max_activations=maxima)
            if mult:
                steering.clamp(feature, f"{mult}x")
            texts, ppl = completions(lm, steering, tokens)
            sims = embed_texts(texts) @ concept_emb[concept]
            rows[concept].append({"multiple": mult, "mention_rate": float((sims >= MENTION_THRESHOLD).mean()), "mean_similarity": float(sims.mean()),
                                  "perplexity": float(np.nanmean(ppl)), "example": texts[0][:120]})
            print(f"  {concept:<22} feature {feature:>6}  clamp {mult:>4g}x  mentions {rows[concept][-1]['mention_rate']:.2f}  "
                  f"sim {rows[concept][-1]['mean_similarity']:.2f}  ppl {rows[concept][-1]['perplexity']:8.1f}  | {texts[0][:60]!r}", flush=True)
    curve = []
    for i, mult in enumerate(SWEEP):
        curve.append({"multiple": mult,
                      "mention_rate": float(np.mean([rows[c][i]["mention_rate"] for c in rows])),
                      "perplexity": float(np.exp(np.nanmean([math.log(rows[c][i]["perplexity"]) for c in rows])))})
    return {"features": features, "threshold": MENTION_THRESHOLD, "curve": curve, "per_concept": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve, per = result["curve"], result["per_concept"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for concept, rows in per.items():
        label = f"{concept} (#{result['features'][concept]})"
        axes[0].plot([r["multiple"] for r in rows], [r["mention_rate"] for r in rows], alpha=0.5, label=label)
        axes[1].plot([r["multiple"] for r in rows], [r["perplexity"] for r in rows], alpha=0.5, label=label)
    axes[0].plot([c["multiple"] for c in curve], [c["mention_rate"] for c in curve], "k-o", lw=2, label="mean")
    axes[1].plot([c["multiple"] for c in curve], [c["perplexity"] for c in curve], "k-o", lw=2, label="geometric mean")
    axes[0].set(xlabel="clamp (x the feature's max activation)", ylabel="completions that mention the concept",
                title=f"efficacy (MiniLM cosine >= {result['threshold']})", ylim=(-0.02, 1.02))
    axes[1].set(xlabel="clamp (x the feature's max activation)", ylabel="perplexity under the unsteered model", yscale="log",
                title="fluency cost")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", default=None, help="SAE folder on the embedded model (default: runs/quickstart/sae when it exists)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per generation for the overhead (default: 64)")
    parser.add_argument("--efficacy-tokens", type=int, default=32, help="tokens per completion for efficacy (default: 32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concepts", type=int, default=4, help=f"how many of {len(CONCEPTS)} concepts (default: 4)")
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
    report: dict = {"model": EMBEDDED_MODEL, "sae": str(folder) if folder else None, "database": str(db.path) if db else None,
                    "torch_threads": torch.get_num_threads()}

    print(f"[1/2] overhead: {args.tokens} greedy tokens, 3 features clamped vs unsteered (best of {args.repeats}, interleaved)")
    bench_sae = sae if sae is not None else random_sae(lm.d_model, f"resid_post.{lm.n_layers // 2}", EMBEDDED_MODEL)
    report["overhead"] = overhead(lm, bench_sae, args.tokens, args.repeats)
    o = report["overhead"]
    print(f"  unsteered {o['unsteered_tok_s']} tok/s, steered {o['steered_tok_s']} tok/s: ratio {o['ratio']:.3f}x (target >= 0.9x)")

    print("[2/2] efficacy and fluency over a clamp sweep")
    if sae is None:
        print("  skipped: no SAE (run `monoscope quickstart` and `monoscope analyze --sae runs/quickstart/sae`, or pass --sae)")
    else:
        result = efficacy(lm, sae, db, args.efficacy_tokens, CONCEPTS[: args.concepts])
        report["efficacy"] = result
        if "curve" in result:
            print(f"  {'clamp':>6} {'mention rate':>13} {'perplexity':>11}   (mention: MiniLM cosine >= {MENTION_THRESHOLD})")
            for c in result["curve"]:
                print(f"  {c['multiple']:>5g}x {c['mention_rate']:>13.2f} {c['perplexity']:>11.1f}")
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            plot(result, out)
            print(f"  plot: {out}")
    print(json.dumps({k: v for k, v in report.items() if k != "efficacy"} | {"curve": report.get("efficacy", {}).get("curve")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
