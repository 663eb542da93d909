"""Memory of the LM-loss evaluation on a 262k-token vocabulary (Gemma 3's): blockwise logits vs full logits.

    .venv/bin/python benchmarks/bench_eval_memory.py       # vocab 262144, hidden 640, 4 layers, 4,000 tokens

A Llama-architecture model with Gemma 3 270M's vocabulary and width (random weights, 4 layers: the output
layer is what matters here) evaluates an SAE-like patch on ~4,000 tokens (32 contexts of 128, batches of 8)
in a fresh subprocess per method, which reports its peak resident memory (VmHWM, reset after loading) over the model's own
size (after loading it):

- `blockwise`: `monoscope.sae.lm_eval.lm_loss_sums` (the forward pass stops at the output layer; the four
  passes' logits are made in blocks of tokens x vocabulary);
- `full logits`: the previous implementation, kept here for comparison: each pass returns full logits
  [batch, T, vocab], log-softmaxed in fp32, the clean ones held for the KL of the other passes.

Both give the same CE (printed). Target: blockwise grows peak memory by < 2 GB over the model's size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from monoscope.sae.lm_eval import TOKEN_BLOCK, VOCAB_BLOCK  # noqa: E402
from peak_memory import run_case  # noqa: E402

CASE = r"""
import json, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[3])
spec = json.loads(sys.argv[2])

from peak_memory import peak_kib, reset_peak
from transformers import LlamaConfig, LlamaForCausalLM
from monoscope.model import LoadedModel, capture, edit
from monoscope.sae.lm_eval import _keep_prefix, lm_loss_sums

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=4 * spec["hidden"],
                  num_hidden_layers=spec["layers"], num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                  tie_word_embeddings=True)
model = LlamaForCausalLM(cfg).eval()
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
ids = torch.randint(spec["vocab"], (spec["contexts"], spec["context"]))
batches = list(ids.split(spec["batch"]))
patch = lambda a: a * 0.9  # noqa: E731
with torch.inference_mode():  # first-use costs of the forward pass, before the baseline
    model(input_ids=batches[0][:1, :8])
base = reset_peak()
started = time.perf_counter()
if spec["method"] == "blockwise":
    sums = lm_loss_sums(LoadedModel(model, None, "big"), "resid_post.1", patch, batches)
    ce = float(sums["ce_clean"].sum() / sums["tokens"].sum())
else:
    total, n = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            with capture(model, "resid_post.1") as store:
                clean = model(input_ids=batch, use_cache=False).logits
            x = store["resid_post.1"]
            mean = x[:, 1:].reshape(-1, x.shape[-1]).float().mean(0)
            clean_logp = F.log_softmax(clean[:, 1:-1].float(), dim=-1)
            pred = clean[:, 1:-1].float()
            total += F.cross_entropy(pred.reshape(-1, pred.shape[-1]), batch[:, 2:].reshape(-1), reduction="sum").item()
            n += batch[:, 2:].numel()
            for fn in (patch, torch.zeros_like, lambda a: mean.to(a.dtype).expand_as(a)):
                with edit(model, {"resid_post.1": _keep_prefix(fn)}):
                    logits = model(input_ids=batch, use_cache=False).logits
                patched = F.log_softmax(logits[:, 1:-1].float(), dim=-1)
                (clean_logp.exp() * (clean_logp - patched)).sum(-1).sum().item()
    ce = total / n
seconds = time.perf_counter() - started
peak = peak_kib()
print(json.dumps({"model_gb": model_bytes / 1e9, "growth_gb": (peak - base) * 1024 / 1e9, "ce_clean": ce, "seconds": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", default="blockwise,full logits")
    args = parser.parse_args()
    contexts = -(-args.tokens // (args.context - 1))
    print(
        f"LM-loss evaluation memory: vocab {args.vocab:,}, hidden {args.hidden}, {args.layers} layers, "
        f"{contexts} contexts of {args.context} ({contexts * (args.context - 1):,} tokens), batches of {args.batch}; "
        f"blocks of {TOKEN_BLOCK} tokens x {VOCAB_BLOCK:,} vocabulary entries"
    )
    print(f"  {'method':<14}{'model GB':>10}{'peak growth GB':>16}{'CE clean':>10}{'seconds':>9}")
    rows = {}
    for method in args.methods.split(","):
        spec = {
            "vocab": args.vocab,
            "hidden": args.hidden,
            "layers": args.layers,
            "contexts": contexts,
            "context": args.context,
            "batch": args.batch,
            "method": method,
        }
        row = run_case(CASE, spec, method)
        if row is None:
            continue
        rows[method] = row
        print(
            f"  {method:<14}{row['model_gb']:>10.2f}{row['growth_gb']:>16.2f}{row['ce_clean']:>10.4f}{row['seconds']:>9.1f}"
        )
    if len(rows) == 2:
        a, b = rows["blockwise"], rows["full logits"]
        print(
            f"blockwise grows peak memory by {a['growth_gb']:.2f} GB ({b['growth_gb'] / max(a['growth_gb'], 1e-9):.1f}x less than "
            f"full logits, {b['growth_gb']:.2f} GB); target < 2 GB: {'met' if a['growth_gb'] < 2 else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
