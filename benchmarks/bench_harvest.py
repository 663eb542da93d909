"""Harvest speed and memory, measured side by side in one run on the embedded model (issue: foundation).

1. stop-early vs a full forward pass on the same batches, at the middle layer   (target >= 1.8x)
2. monoscope's harvest pipeline vs a plain hand-written register_forward_hook loop (target >= 0.95x)
3. peak RSS of harvests to disk of N and 4N tokens, each in a fresh process       (target: ~flat)

Usage: python benchmarks/bench_harvest.py [--tokens 8192] [--disk-tokens 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def timed(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def speed(tokens: int) -> dict:
    from monoscope.data import HarvestConfig, Harvester
    from monoscope.data.packing import batched_contexts
    from monoscope.model import EMBEDDED_MODEL, find_blocks, load_model

    loaded = load_model(EMBEDDED_MODEL)
    model, layer = loaded.model, loaded.n_layers // 2
    hook = f"resid_post.{layer}"
    cfg = HarvestConfig(hook_points=[hook], tokens=tokens)
    harvester = Harvester(loaded, cfg.open_corpus(), [hook], cfg.context_size, cfg.batch_size)
    n_contexts = tokens // (cfg.context_size - 1)
    contexts = [c for _, c in zip(range(n_contexts), harvester.contexts())]
    batches = list(batched_contexts(contexts, cfg.batch_size))
    n_tokens = sum(b[:, 1:].numel() for b in batches)

    def full_forward():
        out = []
        with torch.inference_mode():
            for ids in batches:
                hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states[layer + 1]
                out.append(hidden[:, 1:].reshape(-1, hidden.shape[-1]).clone())
        return out

    class Stop(Exception):
        pass

    def plain_hook_loop():
        out = []
        block = find_blocks(model)[layer]

        def grab(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            out.append(hidden[:, 1:].reshape(-1, hidden.shape[-1]).clone())
            raise Stop

        handle = block.register_forward_hook(grab)
        try:
            with torch.inference_mode():
                for ids in batches:
                    try:
                        model(ids, use_cache=False)
                    except Stop:
                        pass
        finally:
            handle.remove()
        return out

    def monoscope_harvest():
        out = []
        with torch.inference_mode():
            for batch in harvester.batches():
                out.append(batch.activations[hook])
                if sum(o.shape[0] for o in out) >= n_tokens:
                    break
        return out

    assert torch.allclose(torch.cat(plain_hook_loop()), torch.cat(monoscope_harvest())[:n_tokens], atol=1e-5)
    timed(plain_hook_loop, 1)  # warm-up
    t_full, t_plain, t_ours = timed(full_forward), timed(plain_hook_loop), timed(monoscope_harvest)
    return {
        "layer": hook,
        "tokens": n_tokens,
        "full_forward_tok_s": n_tokens / t_full,
        "plain_hook_loop_tok_s": n_tokens / t_plain,
        "monoscope_tok_s": n_tokens / t_ours,
        "stop_early_speedup": t_full / t_ours,
        "vs_plain_loop": t_plain / t_ours,
    }


def peak_rss_mib(tokens: int) -> float:
    code = (
        "import resource, sys, tempfile\n"
        "from monoscope.data import HarvestConfig, harvest_to_cache\n"
        "cfg = HarvestConfig(hook_points=['resid_post.15'], tokens=int(sys.argv[1]))\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    harvest_to_cache(cfg, d + '/cache', show_progress=False)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tokens)], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per timed pass")
    parser.add_argument("--disk-tokens", type=int, default=50_000, help="N for the memory check (N and 4N)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    s = speed(args.tokens)
    print(f"harvest at {s['layer']} of the embedded model, {s['tokens']} tokens per pass (best of 2):")
    print(f"  full forward pass      {s['full_forward_tok_s']:9.0f} tok/s")
    print(
        f"  plain hook loop        {s['plain_hook_loop_tok_s']:9.0f} tok/s  (hand-written register_forward_hook, stops after the layer)"
    )
    print(f"  monoscope harvest      {s['monoscope_tok_s']:9.0f} tok/s  (packing + hooks + stop-early)")
    print(f"  stop-early speedup     {s['stop_early_speedup']:9.2f}x  (target >= 1.8x)")
    print(f"  vs plain hook loop     {s['vs_plain_loop']:9.2f}x  (target >= 0.95x)")
    small, large = peak_rss_mib(args.disk_tokens), peak_rss_mib(4 * args.disk_tokens)
    print(
        f"peak RSS of a harvest to disk: {args.disk_tokens} tokens {small:.0f} MiB, {4 * args.disk_tokens} tokens {large:.0f} MiB "
        f"-> ratio {large / small:.2f} (bounded: ~1.0)"
    )
    print(json.dumps({**s, "rss_small_mib": small, "rss_large_mib": large}))


if __name__ == "__main__":
    main()
