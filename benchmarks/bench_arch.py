"""Held-out FVU vs training tokens for each SAE architecture at matched L0 (issue 3), printed and drawn as a PNG.

    .venv/bin/python benchmarks/bench_arch.py                   # the quickstart's activations, L0 32, 1M tokens

Data: a harvest cache (default: the quickstart's, runs/quickstart/activations). Its last --held-out tokens
come from contexts the SAEs never train on; every evaluation uses all of them, with SAEBench's FVU
(1 - explained variance over the whole set) and L0 of the SAE's inference form (BatchTopK: its threshold).

Matched L0: TopK and BatchTopK take k = the target, JumpReLU takes it as `target_l0` (its thresholds are
steered to it; what `monoscope train --arch jumprelu --k K` does). ReLU + L1 reaches an L0 only through its
L1 coefficient, so it is calibrated first: pilot runs at a ladder of coefficients (trained together in one
pass), then the coefficient for the target L0 is interpolated on a log-log scale. The four final SAEs then
train together in one pass over the same batches, with the same seed, width, batch size and default
learning-rate rule, evaluated every --eval-every tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from monoscope.data import ActivationCache  # noqa: E402
from monoscope.sae import TrainConfig, train_saes  # noqa: E402
from monoscope.sae.trainer import load_train_log  # noqa: E402

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")
COEFFICIENT = {"relu": "l1_coefficient"}  # architectures whose L0 is set by a calibrated coefficient
LADDER = {"relu": (1.0, 3.0, 10.0)}


def shuffled_batches(rows: torch.Tensor, batch_size: int, seed: int, hook: str):
    """Endless epochs of random batches (as {hook: batch} chunks, the multi-SAE stream format)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows.shape[0], generator=generator)
        for start in range(0, rows.shape[0] - batch_size + 1, batch_size):
            yield {hook: rows[order[start : start + batch_size]]}


def train_together(
    configs: dict[str, TrainConfig], rows, held_out, hook, out: Path, eval_every: int, seed: int
) -> dict[str, list[dict]]:
    train_saes(
        configs,
        shuffled_batches(rows, next(iter(configs.values())).batch_size, seed, hook),
        out,
        held_out=held_out,
        eval_every_tokens=eval_every,
        resume=False,
        progress=True,
        checkpoint_every_tokens=max(c.total_tokens for c in configs.values()),
    )  # no mid-run checkpoints: nothing to resume here
    return {name: [e for e in load_train_log(out / name) if "held_out_fvu" in e] for name in configs}


def interpolate_coefficient(points: list[tuple[float, float]], target_l0: float) -> float:
    """The coefficient whose L0 is `target_l0`, from (coefficient, L0) pairs; log-log, extrapolating at the ends."""
    points = sorted((math.log(c), math.log(max(l0, 1e-3))) for c, l0 in points)
    goal = math.log(target_l0)
    # L0 falls as the coefficient grows: pick the neighbouring pair around the target (or the nearest end pair)
    pairs = list(zip(points, points[1:]))
    (x0, y0), (x1, y1) = next(
        ((a, b) for a, b in pairs if min(a[1], b[1]) <= goal <= max(a[1], b[1])),
        pairs[0] if goal > points[0][1] else pairs[-1],
    )
    slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
    slope = min(slope, -0.25)  # L0 barely moving with the coefficient: step at most e^4 (~55x) past the ladder
    x = x0 + (goal - y0) / slope
    return math.exp(min(max(x, points[0][0] - 4.0), points[-1][0] + 4.0))


def plot(curves: dict[str, list[dict]], path: Path, target_l0: float, source: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fvu, ax_l0) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in curves.items():
        tokens = [p["tokens"] / 1e6 for p in points]
        label = f"{name} (final L0 {points[-1]['held_out_l0']:.1f}, FVU {points[-1]['held_out_fvu']:.3f})"
        ax_fvu.plot(tokens, [p["held_out_fvu"] for p in points], "-o", ms=3, label=label)
        ax_l0.plot(tokens, [p["held_out_l0"] for p in points], "-o", ms=3, label=name)
    ax_fvu.set(
        xlabel="training tokens (millions)",
        ylabel="held-out FVU (1 - explained variance)",
        yscale="log",
        title=f"held-out FVU at matched L0 ~ {target_l0:g}",
    )
    ax_l0.axhline(target_l0, color="grey", lw=0.8, ls="--")
    ax_l0.set(xlabel="training tokens (millions)", ylabel="held-out L0", yscale="log", title="held-out L0")
    ax_fvu.legend(fontsize=8)
    fig.suptitle(source, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--activations", default="runs/quickstart/activations", help="harvest cache (default: the quickstart's)"
    )
    parser.add_argument("--hook", default=None, help="hook point in the cache (default: its only one)")
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--l0", type=float, default=32.0, help="target L0 (default: 32)")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per SAE (default: 1M)")
    parser.add_argument("--pilot-tokens", type=int, default=250_000, help="tokens per calibration run (default: 250k)")
    parser.add_argument(
        "--held-out", type=int, default=16_384, help="held-out tokens at the end of the cache (default: 16384)"
    )
    parser.add_argument("--eval-every", type=int, default=65_536, help="tokens between evaluations (default: 65536)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench_arch.png", help="PNG of the curves (JSON next to it)")
    args = parser.parse_args()
    started = time.perf_counter()

    cache = ActivationCache(args.activations)
    hook = cache.hook(args.hook)
    rows = cache.read_all(hook)  # normalised to E||x|| = sqrt(d), as training sees it
    if rows.shape[0] < args.held_out + 4 * args.batch_size:
        raise SystemExit(
            f"{args.activations} holds {rows.shape[0]} tokens: too few for {args.held_out} held out + training"
        )
    train_rows, held_out = rows[: -args.held_out], rows[-args.held_out :]
    print(
        f"{cache.model_name} {hook}: {train_rows.shape[0]:,} training tokens (epochs as needed), {held_out.shape[0]:,} held out; "
        f"d_sae {args.d_sae}, target L0 {args.l0:g}, {torch.get_num_threads()} threads"
    )

    def config(arch: str, tokens: int, **extra) -> TrainConfig:
        return TrainConfig(
            d_in=rows.shape[1],
            d_sae=args.d_sae,
            architecture=arch,
            k=int(args.l0),
            total_tokens=tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            hook_name=hook,
            **extra,
        )

    coefficients: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-arch-") as tmp:
        print(
            f"[1/2] calibrating the ReLU L1 coefficient: {sum(map(len, LADDER.values()))} pilot runs of {args.pilot_tokens:,} tokens"
        )
        pilots = {
            f"{arch}-{c:g}": config(arch, args.pilot_tokens, **{COEFFICIENT[arch]: c})
            for arch, ladder in LADDER.items()
            for c in ladder
        }
        pilot_logs = train_together(
            pilots, train_rows, held_out, hook, Path(tmp) / "pilot", args.pilot_tokens, args.seed
        )
        for arch, ladder in LADDER.items():
            points = [(c, pilot_logs[f"{arch}-{c:g}"][-1]["held_out_l0"]) for c in ladder]
            print(f"  {arch} pilots: {points}", flush=True)
            coefficients[arch] = interpolate_coefficient(points, args.l0)
            print(
                f"  {arch:<9} {COEFFICIENT[arch]}: "
                + ", ".join(f"{c:g} -> L0 {l0:.1f}" for c, l0 in points)
                + f"  => {coefficients[arch]:.3g}"
            )

        print(
            f"[2/2] training the four architectures together: {args.tokens:,} tokens each, held-out eval every {args.eval_every:,}"
        )
        sparsity = {arch: {COEFFICIENT[arch]: c} for arch, c in coefficients.items()} | {
            "jumprelu": {"target_l0": args.l0}
        }
        finals = {arch: config(arch, args.tokens, **sparsity.get(arch, {})) for arch in ARCHITECTURES}
        curves = train_together(finals, train_rows, held_out, hook, Path(tmp) / "final", args.eval_every, args.seed)

    print(f"\n{'tokens':>10} " + " ".join(f"{a + ' FVU':>14} {'L0':>6}" for a in ARCHITECTURES))
    for i in range(max(map(len, curves.values()))):
        cells = []
        for arch in ARCHITECTURES:
            p = curves[arch][i] if i < len(curves[arch]) else None
            cells.append(f"{p['held_out_fvu']:>14.4f} {p['held_out_l0']:>6.1f}" if p else " " * 21)
        tokens = next(curves[a][i]["tokens"] for a in ARCHITECTURES if i < len(curves[a]))
        print(f"{tokens:>10,} " + " ".join(cells))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = (
        f"{cache.model_name} {hook}, d_sae {args.d_sae}, batch {args.batch_size}, {held_out.shape[0]:,} held-out tokens"
    )
    plot(curves, out, args.l0, source)
    report = {
        "activations": str(args.activations),
        "hook": hook,
        "d_sae": args.d_sae,
        "target_l0": args.l0,
        "coefficients": coefficients,
        "final": {
            a: {"tokens": c[-1]["tokens"], "held_out_fvu": c[-1]["held_out_fvu"], "held_out_l0": c[-1]["held_out_l0"]}
            for a, c in curves.items()
        },
        "curves": {
            a: [{k: p[k] for k in ("tokens", "held_out_fvu", "held_out_l0")} for p in c] for a, c in curves.items()
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(f"\nplot: {out}   data: {out.with_suffix('.json')}   ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
