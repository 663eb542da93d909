"""Which optimiser learns fastest per token: held-out FVU after a fixed number of tokens, on real activations.

    .venv/bin/python benchmarks/bench_optimizers.py --activations runs/quickstart/activations \\
        --widths 4608,18432 --steps 100 --out build/bench-optim/short.jsonl

1. The cache's contexts are split by a seeded hash into train (80 %), `tune` (10 %) and `report` (10 %)
   sets, so held-out rows come from contexts never trained on, spread over the whole cache.
2. Every candidate (optimiser x learning-rate multiplier of its default rule) trains a TopK SAE with
   monoscope's trainer on the same shuffled training batches (`train_saes`: one pass, all candidates).
3. Each SAE (the saved form: schedule-free ones are the averaged weights) is scored on both held-out sets.
   Choose settings by the `tune` FVU only; the `report` FVU of the chosen settings is the figure to quote
   (`--summary` prints the choice and its report figure from the JSONL results).

Candidates: `adam` (warm-up 5 %, linear decay over the last 20 %), `signum` (schedule-free sign-SGD,
sparsify's default), `adam_sf` (schedule-free Adam, warm-up 5 %), each at multipliers of its current default
lr rule (`monoscope.sae.optim.default_lr`; `--multipliers`), plus any `--extra LABEL:KEY=VALUE,...` optimiser
configs (`lr_multiplier=` is relative to the same rule). Every result line records the lr actually used.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from monoscope.data import ActivationCache  # noqa: E402
from monoscope.sae import TrainConfig, evaluate_reconstruction, train_saes  # noqa: E402
from monoscope.sae.optim import OptimizerConfig, default_lr  # noqa: E402


def split_by_context(cache: ActivationCache, seed: int) -> dict[str, torch.Tensor]:
    """Normalised rows of the cache grouped into train / tune / report by a seeded hash of each row's context.

    A hash rather than a permutation: a context keeps its set when the cache grows (a longer harvest)."""
    rows = cache.read_all()
    contexts = torch.cat([cache.read_shard(i, column="context_index") for i in range(len(cache.shards))]).long()
    bucket = ((contexts * 2654435761 + seed * 40503 + 12345) % 2**32) * 10 // 2**32
    tune, report = bucket == 0, bucket == 1
    train = ~(tune | report)
    return {"train": rows[train], "tune": rows[tune], "report": rows[report]}


class ShuffledBatches:
    """Endless [batch, d] batches from `rows`, reshuffled every epoch with a fixed seed (same for every run)."""

    def __init__(self, rows: torch.Tensor, batch: int, seed: int, key: str) -> None:
        self.rows, self.batch, self.seed, self.key = rows, batch, seed, key

    def __iter__(self):
        for epoch in itertools.count():
            perm = torch.randperm(self.rows.shape[0], generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
            for start in range(0, perm.numel() - self.batch + 1, self.batch):
                yield {self.key: self.rows[perm[start : start + self.batch]]}


def candidates(
    names: list[str], multipliers: list[float], extra: list[str], d_sae: int, steps: int
) -> dict[str, OptimizerConfig]:
    out = {}
    for name in names:
        for m in multipliers:
            warmup = max(1, steps // 20) if name == "adam_sf" else None
            out[f"{name}-x{m:g}"] = OptimizerConfig(name=name, lr=default_lr(name, d_sae) * m, warmup_steps=warmup)
    for spec in extra:
        label, _, settings = spec.partition(":")
        fields: dict = {}
        for item in filter(None, settings.split(",")):
            key, _, value = item.partition("=")
            fields[key] = value if key == "name" else float(value) if "." in value or "e" in value else int(value)
        if "lr_multiplier" in fields:
            fields["lr"] = default_lr(fields["name"], d_sae) * fields.pop("lr_multiplier")
        out[label] = OptimizerConfig(**fields)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--activations", type=Path, default=REPO / "runs" / "quickstart" / "activations")
    parser.add_argument("--widths", default="4608", help="comma-separated d_sae values")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--optimizers", default="adam,signum,adam_sf")
    parser.add_argument("--multipliers", default="1", help="multipliers of each optimiser's default lr")
    parser.add_argument(
        "--extra", action="append", default=[], help="LABEL:name=adam,lr_multiplier=4,warmup_steps=10,..."
    )
    parser.add_argument("--group", type=int, default=6, help="SAEs trained together in one pass (memory)")
    parser.add_argument("--seed", type=int, default=0, help="split, shuffling and initialisation seed")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per SAE here")
    parser.add_argument("--summary", type=Path, nargs="*", help="only summarise these JSONL result files")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.summary:
        summarise(args.summary)
        return

    cache = ActivationCache(args.activations)
    data = split_by_context(cache, args.seed)
    print(
        f"{cache.path}: {cache.n_tokens:,} tokens -> train {data['train'].shape[0]:,}, tune {data['tune'].shape[0]:,}, "
        f"report {data['report'].shape[0]:,} (split by context); torch {torch.get_num_threads()} threads",
        flush=True,
    )
    multipliers = [float(m) for m in args.multipliers.split(",")]
    for d_sae in (int(w) for w in args.widths.split(",")):
        cands = candidates(
            args.optimizers.split(",") if args.optimizers else [], multipliers, args.extra, d_sae, args.steps
        )
        names = list(cands)
        for start in range(0, len(names), args.group):
            group = names[start : start + args.group]
            configs = {
                label: TrainConfig(
                    d_in=cache.d_model,
                    d_sae=d_sae,
                    k=args.k,
                    batch_size=args.batch,
                    total_tokens=args.steps * args.batch,
                    seed=args.seed,
                    hook_name="x",
                    optimizer=cands[label],
                )
                for label in group
            }
            began = time.perf_counter()
            with tempfile.TemporaryDirectory() as out:
                results = train_saes(
                    configs,
                    ShuffledBatches(data["train"], args.batch, args.seed, "x"),
                    out,
                    progress=False,
                    checkpoint_every_tokens=10 * args.steps * args.batch,
                    device="cpu",
                )
            seconds = time.perf_counter() - began
            for label in group:
                sae = results[label].sae
                row = {
                    "label": label,
                    "d_sae": d_sae,
                    "k": args.k,
                    "steps": args.steps,
                    "batch": args.batch,
                    "optimizer": configs[label].optim.to_dict(),
                    "group_seconds": round(seconds, 1),
                    "decoder_norm_min": float(sae.W_dec.detach().norm(dim=1).min()),
                }
                for split in ("tune", "report"):
                    m = evaluate_reconstruction(sae, data[split].split(4096))
                    row[f"{split}_fvu"], row[f"{split}_l0"], row[f"{split}_alive"] = m.fvu, m.l0, m.frac_alive
                print(json.dumps(row), flush=True)
                if args.out:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")


def summarise(paths: list[Path]) -> None:
    """Per (width, steps, optimiser): the lr chosen on `tune`, and its `report` FVU."""
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["d_sae"], row["steps"], row["label"].rsplit("-x", 1)[0])
        if key not in best or row["tune_fvu"] < best[key]["tune_fvu"]:
            best[key] = row
    print(
        f"{'d_sae':>6} {'steps':>6}  {'optimiser':<14}{'chosen lr':>10}  {'tune FVU':>9}  {'report FVU':>10}  {'alive':>6}"
    )
    for key in sorted(best, key=lambda k: (k[0], k[1], best[k]["tune_fvu"])):
        row = best[key]
        print(
            f"{key[0]:>6} {key[1]:>6}  {key[2]:<14}{row['optimizer']['lr']:>10.2e}  {row['tune_fvu']:>9.4f}  "
            f"{row['report_fvu']:>10.4f}  {row['report_alive']:>6.1%}"
        )


if __name__ == "__main__":
    main()
