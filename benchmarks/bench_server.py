"""Serving many users: concurrent steered chats on `monoscope serve`, each client with its own steering spec,
junk requests mixed in; throughput and latency against one request at a time, measured side by side in one run.

1. A lone request, side by side (interleaved, median of `--lone` each): the old one-at-a-time path (transformers'
   `generate` under `steer()`, in this process, as the server ran it before batching) vs one request to the
   server (HTTP, the batch engine).
2. 1, 4, 8, 16 concurrent clients (`--clients`): each sends `--requests` steered chats of `--max-tokens` tokens
   (`ignore_eos`, so every chat is that long; streamed for odd clients) with its own spec (features, modes,
   values and strengths differ), plus a junk request after every `--junk-every` chats (unknown feature, bad
   value, a value that overflows when resolved, unknown vector, bad JSON, ...: each must get its 4xx). A
   dashboard client reads the feature database meanwhile. Reported: completions, junk 4xx, errors (a 5xx,
   a wrong status, a timeout), throughput (generated tokens / s) as a multiple of one at a time, p50/p95
   latency of the chats and p95 over the lone request.

Targets (issue 12): 8 clients >= 3x the one-at-a-time throughput, 16 clients >= 4x, p95 at 8 clients
<= 2.5x a lone request, no errors, a lone request no slower than the old path (>= 0.95x).

The server runs in this process (uvicorn on a background thread, 127.0.0.1, a free port) around `--sae`
(default: runs/quickstart/sae when it has a feature database, else a random TopK SAE on the embedded model,
analysed here over a few thousand tokens); `--url` uses a running server on this machine instead (then
step 1 is skipped and ratios are against one client).

Usage: python benchmarks/bench_server.py [--sae DIR | --url http://127.0.0.1:8000] [--clients 1,4,8,16] [--requests 4]
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUICKSTART_SAE = Path("runs/quickstart/sae")
PROMPTS = [
    "Tell me about your weekend.",
    "What should I cook tonight?",
    "Write a haiku about the sea.",
    "Explain what a bridge is.",
]
CHAT = "/v1/chat/completions"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Client:
    """One keep-alive HTTP connection to the server (as a browser or an SDK would use)."""

    def __init__(self, host: str, port: int, timeout: float):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def call(self, method: str, path: str, body: dict | bytes | None = None) -> tuple[int, bytes]:
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                payload = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self._reset()
                return resp.status, payload
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._reset()
                if attempt:
                    raise
            except Exception:
                self._reset()  # a broken exchange leaves the connection unusable
                raise
        raise AssertionError("unreachable")

    def _reset(self) -> None:
        self.conn.close()
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def close(self) -> None:
        self.conn.close()


def client_spec(index: int, features: list[int], sae: str) -> tuple[list[dict], float]:
    """A different steering spec per client: (items, strength)."""
    f = features[index % len(features)]
    g = features[(index * 7 + 3) % len(features)]
    kinds = [
        [{"feature": f, "mode": "clamp", "value": "4x", "sae": sae}],
        [{"feature": f, "mode": "add", "value": "2x", "sae": sae, "positions": "generated"}],
        [{"feature": f, "mode": "clamp", "value": "8x", "sae": sae}, {"feature": g, "mode": "ablate", "sae": sae}],
        [
            {"feature": f, "mode": "multiply", "value": 3.0, "sae": sae},
            {"feature": g, "mode": "clamp", "value": "2x", "sae": sae},
        ],
    ]
    return kinds[index % len(kinds)], [1.0, 0.5, 1.5, 1.0][(index // len(kinds)) % 4]


def chat_body(index: int, features: list[int], sae: str, max_tokens: int, stream: bool) -> dict:
    items, strength = client_spec(index, features, sae)
    return {
        "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "steering": items,
        "steering_strength": strength,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


def junk_requests(d_sae: int, sae: str) -> list[tuple[str, dict | bytes, int]]:
    """Bad requests a careless client sends, with the status each must get."""
    msg = [{"role": "user", "content": "hi"}]
    return [
        ("unknown feature", {"messages": msg, "steering": [{"feature": d_sae + 5, "value": 3, "sae": sae}]}, 400),
        ("unreadable value", {"messages": msg, "steering": [{"feature": 1, "value": "lots", "sae": sae}]}, 400),
        (
            "value overflowing once resolved",
            {"messages": msg, "steering": [{"feature": 1, "value": "900000x", "sae": sae}]},
            400,
        ),
        (
            "unknown mode",
            {"messages": msg, "steering": [{"feature": 1, "mode": "explode", "value": 3, "sae": sae}]},
            400,
        ),
        ("unknown vector", {"messages": msg, "steering": [{"vector": "nope"}]}, 400),
        ("unknown SAE", {"messages": msg, "steering": [{"feature": 1, "value": 3, "sae": "nope"}]}, 404),
        ("max_tokens too large", {"messages": msg, "max_tokens": 10**7}, 400),
        ("strength out of range", {"messages": msg, "steering_strength": 1e9}, 400),
        ("no messages", {"messages": []}, 400),
        ("bad JSON", b'{"messages": [', 400),
    ]


def fetch_setup(host: str, port: int) -> tuple[dict, list[int]]:
    probe = Client(host, port, 60)
    status, body = probe.call("GET", "/api/info")
    if status != 200:
        raise SystemExit(f"GET /api/info answered {status}: {body[:200]!r}")
    info = json.loads(body)
    sae = info["saes"][0]
    status, body = probe.call("GET", f"/api/features?order=max_activation&limit=40&sae={urllib.parse.quote(sae['id'])}")
    features = [f["id"] for f in json.loads(body)["features"]] if status == 200 else list(range(min(40, sae["d_sae"])))
    probe.close()
    return info, features


def completion_tokens(payload: bytes, stream: bool) -> int:
    if not stream:
        return int(json.loads(payload)["usage"]["completion_tokens"])
    for event in payload.decode().split("\n\n"):
        if event.startswith("data: {") and '"usage"' in event:
            usage = json.loads(event[6:]).get("usage")
            if usage:
                return int(usage["completion_tokens"])
    raise ValueError("a stream without usage")


def run_level(
    host: str,
    port: int,
    clients: int,
    requests: int,
    junk_every: int,
    max_tokens: int,
    info: dict,
    features: list[int],
    timeout: float,
) -> dict:
    sae = info["saes"][0]
    junk = junk_requests(sae["d_sae"], sae["id"])
    latencies: list[float] = []
    junk_ok, errors, tokens = [0], [], [0]
    dashboards: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    done = threading.Event()

    def worker(index: int) -> None:
        client = Client(host, port, timeout=timeout)
        stream = index % 2 == 1
        body = chat_body(index, features, sae["id"], max_tokens, stream)
        barrier.wait()
        try:
            for r in range(requests):
                start = time.perf_counter()
                try:
                    status, payload = client.call("POST", CHAT, body)
                except Exception as err:  # noqa: BLE001 - every failure is counted and reported
                    with lock:
                        errors.append(f"chat: {type(err).__name__}: {err}")
                    continue
                seconds = time.perf_counter() - start
                with lock:
                    try:
                        if status != 200 or (stream and b'"error"' in payload):
                            raise ValueError(f"HTTP {status}: {payload[:200]!r}")
                        tokens[0] += completion_tokens(payload, stream)
                        latencies.append(seconds)
                    except ValueError as err:
                        errors.append(f"chat: {err}")
                if junk_every and (r + 1) % junk_every == 0:
                    name, bad, expected = junk[(index + r) % len(junk)]
                    try:
                        status, payload = client.call("POST", CHAT, bad)
                    except Exception as err:  # noqa: BLE001
                        with lock:
                            errors.append(f"junk {name}: {type(err).__name__}: {err}")
                        continue
                    with lock:
                        if status == expected:
                            junk_ok[0] += 1
                        else:
                            errors.append(f"junk {name}: HTTP {status} (expected {expected}): {payload[:200]!r}")
        finally:
            client.close()

    def reader() -> None:  # the feature database while the model is busy
        client = Client(host, port, timeout=timeout)
        i = 0
        try:
            while not done.is_set():
                start = time.perf_counter()
                status, _ = client.call(
                    "GET", f"/api/features/{features[i % len(features)]}?sae={urllib.parse.quote(sae['id'])}"
                )
                if status == 200:
                    dashboards.append(time.perf_counter() - start)
                i += 1
                done.wait(0.2)
        finally:
            client.close()

    side = threading.Thread(target=reader, daemon=True)
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(worker, i) for i in range(clients)]
        barrier.wait()
        start = time.perf_counter()
        side.start()
        for f in futures:
            f.result()
        wall = time.perf_counter() - start
    done.set()
    side.join()
    return {
        "clients": clients,
        "completions": len(latencies),
        "junk_ok": junk_ok[0],
        "errors": errors,
        "wall": wall,
        "tokens": tokens[0],
        "p50": percentile(latencies, 0.5),
        "p95": percentile(latencies, 0.95),
        "dashboard_p95": percentile(dashboards, 0.95),
    }


# ---------------------------------------------------------------- a lone request, old path vs server


def old_path(lm, steering, prompt: str, max_tokens: int) -> int:
    """One steered chat the way the server ran every request before batching: transformers' generate in steer()."""
    import torch

    from monoscope.steer import steer
    from monoscope.steer.runtime import encode_prompt

    ids = encode_prompt(lm.tokenizer, [{"role": "user", "content": prompt}], device=lm.device)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    with steer(lm, steering) as handle, torch.inference_mode():
        handle.begin(ids.shape[-1])
        out = lm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return int(out.shape[-1] - ids.shape[-1])


def lone_side_by_side(service, host: str, port: int, features: list[int], max_tokens: int, repeats: int) -> dict:
    from monoscope.server import schemas as S

    sae = next(iter(service.saes.values())).id
    body = chat_body(0, features, sae, max_tokens, stream=False)
    items = [S.SteeringItem(**item) for item in body["steering"]]
    steering, _ = service.steering(items, body["steering_strength"], "all")
    client = Client(host, port, timeout=600)
    old, new = [], []
    try:
        client.call("POST", CHAT, body)  # warm-up, both paths
        old_path(service.lm, steering, PROMPTS[0], 4)
        for _ in range(repeats):  # interleaved, so that a noisy moment hits both
            start = time.perf_counter()
            n = old_path(service.lm, steering, PROMPTS[0], max_tokens)
            old.append(time.perf_counter() - start)
            assert n == max_tokens, n
            start = time.perf_counter()
            status, payload = client.call("POST", CHAT, body)
            new.append(time.perf_counter() - start)
            assert status == 200, payload[:200]
    finally:
        client.close()
    return {"old": statistics.median(old), "new": statistics.median(new), "old_all": old, "new_all": new}


def default_sae(tmp: Path) -> Path:
    """runs/quickstart/sae when analysed; else a random TopK SAE on the embedded model, analysed over 4096 tokens."""
    if (QUICKSTART_SAE / "features.db").is_file():
        return QUICKSTART_SAE
    import torch

    from monoscope.features import AnalysisConfig, analyze_sae
    from monoscope.model import EMBEDDED_MODEL, load_model
    from monoscope.sae import SAEConfig, TopKSAE, save_sae

    print("no runs/quickstart/sae/features.db: a random TopK SAE on the embedded model, analysed over 4096 tokens")
    lm = load_model(EMBEDDED_MODEL)
    hook = f"resid_post.{lm.n_layers // 2}"
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=lm.d_model, d_sae=8 * lm.d_model, architecture="topk", k=32))
    with torch.no_grad():
        w = torch.randn(sae.cfg.d_sae, lm.d_model)
        w = w / w.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
    folder = tmp / "sae"
    save_sae(
        sae,
        folder,
        info={
            "model": EMBEDDED_MODEL,
            "hook_point": hook,
            "context_size": 128,
            "corpus": {"spec": "starter", "seed": 0},
        },
    )
    analyze_sae(folder, tokens=4096, loaded=lm, progress=False, config=AnalysisConfig(map="pca", embeddings=False))
    return folder


def report(levels: list[dict], lone: dict | None, max_tokens: int) -> dict:
    base_level = next((lv for lv in levels if lv["clients"] == 1), None)
    if lone is not None:
        one_at_a_time = max_tokens / lone["old"]
        lone_latency = lone["new"]
        print(
            f"\na lone {max_tokens}-token steered chat (median of {len(lone['old_all'])}, interleaved): old path {lone['old']:.2f} s, "
            f"server {lone['new']:.2f} s -> speed {lone['old'] / lone['new']:.3f}x of the old path (target >= 0.95x)"
        )
        basis = "the old path one at a time"
    else:
        if base_level is None:
            raise SystemExit("with --url, include 1 in --clients: ratios are against one client")
        one_at_a_time = base_level["tokens"] / base_level["wall"]
        lone_latency = base_level["p50"]
        basis = "one client"
    print(f"one at a time: {one_at_a_time:.1f} tok/s ({basis}); lone request {lone_latency:.2f} s\n")
    print(
        f"{'clients':>7} {'chats':>6} {'junk 4xx':>9} {'errors':>7} {'wall s':>7} {'tok/s':>7} {'x 1-at-a-time':>14} {'p50 s':>6} {'p95 s':>6} "
        f"{'p95/lone':>9} {'dashboard p95 ms':>17}"
    )
    summary = {"one_at_a_time_tok_s": one_at_a_time, "lone_s": lone_latency, "levels": []}
    for lv in levels:
        tps = lv["tokens"] / lv["wall"]
        row = {
            **{k: v for k, v in lv.items() if k != "errors"},
            "errors": len(lv["errors"]),
            "tok_s": tps,
            "speedup": tps / one_at_a_time,
            "p95_over_lone": lv["p95"] / lone_latency,
        }
        summary["levels"].append(row)
        print(
            f"{lv['clients']:>7} {lv['completions']:>6} {lv['junk_ok']:>9} {len(lv['errors']):>7} {lv['wall']:>7.1f} {tps:>7.1f} "
            f"{row['speedup']:>13.2f}x {lv['p50']:>6.2f} {lv['p95']:>6.2f} {row['p95_over_lone']:>8.2f}x {lv['dashboard_p95'] * 1e3:>17.0f}"
        )
        for err in lv["errors"][:5]:
            print(f"        error: {err}")
    by = {row["clients"]: row for row in summary["levels"]}
    checks = []
    if 8 in by:
        checks.append(("8 clients >= 3x one at a time", by[8]["speedup"] >= 3.0))
        checks.append(("p95 at 8 clients <= 2.5x a lone request", by[8]["p95_over_lone"] <= 2.5))
    if 16 in by:
        checks.append(("16 clients >= 4x one at a time", by[16]["speedup"] >= 4.0))
    if lone is not None:
        checks.append(("lone request >= 0.95x the old path", lone["old"] / lone["new"] >= 0.95))
    checks.append(("no errors (every junk request got its 4xx)", all(not lv["errors"] for lv in levels)))
    print()
    for name, ok in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {name}")
    summary["checks"] = {name: ok for name, ok in checks}
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sae", help="SAE folder to serve in this process (default: runs/quickstart/sae, else a random one)"
    )
    ap.add_argument("--url", help="an already running server on this machine, e.g. http://127.0.0.1:8000")
    ap.add_argument("--clients", default="1,4,8,16", help="concurrency levels, comma-separated (default: 1,4,8,16)")
    ap.add_argument("--requests", type=int, default=4, help="steered chats per client per level (default: 4)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens of each chat (default: 32)")
    ap.add_argument(
        "--junk-every", type=int, default=1, help="a junk request after every N chats of a client; 0: none (default: 1)"
    )
    ap.add_argument("--lone", type=int, default=5, help="lone requests of each path, interleaved (default: 5; 0 skips)")
    ap.add_argument("--max-batch", type=int, default=16, help="the served engine's max batch (default: 16)")
    ap.add_argument(
        "--timeout", type=float, default=600.0, help="seconds before a request counts as hung (default: 600)"
    )
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    levels = sorted({int(x) for x in args.clients.split(",") if x.strip()})
    if not levels or levels[0] < 1 or levels[-1] > 256 or not 1 <= args.requests <= 1000:
        ap.error("--clients must be 1-256 and --requests 1-1000")
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            parsed = urllib.parse.urlsplit(args.url)
            host = parsed.hostname or ""
            if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
                ap.error("--url must be a server on this machine (loopback), e.g. http://127.0.0.1:8000")
            port = parsed.port or 80
            info, features = fetch_setup(host, port)
            results = [
                run_level(host, port, c, args.requests, args.junk_every, args.max_tokens, info, features, args.timeout)
                for c in levels
            ]
            summary = report(results, None, args.max_tokens)
        else:
            import torch

            from monoscope.server import ServerThread, Service, create_app

            folder = Path(args.sae) if args.sae else default_sae(Path(tmp))
            service = Service.load([str(folder)], max_queue=max(64, 4 * levels[-1]), max_batch=args.max_batch)
            print(
                f"serving {folder} ({service.served_name}, max batch {service.worker.max_batch}) on a background thread; "
                f"torch threads {torch.get_num_threads()}",
                flush=True,
            )
            try:
                with ServerThread(create_app(service)) as server:
                    info, features = fetch_setup("127.0.0.1", server.port)
                    lone = (
                        lone_side_by_side(service, "127.0.0.1", server.port, features, args.max_tokens, args.lone)
                        if args.lone
                        else None
                    )
                    results = []
                    for c in levels:
                        results.append(
                            run_level(
                                "127.0.0.1",
                                server.port,
                                c,
                                args.requests,
                                args.junk_every,
                                args.max_tokens,
                                info,
                                features,
                                args.timeout,
                            )
                        )
                        print(
                            f"  {c} clients: {results[-1]['completions']} chats in {results[-1]['wall']:.1f} s",
                            flush=True,
                        )
                    summary = report(results, lone, args.max_tokens)
                    summary["peak_batch"] = service.worker.stats.peak_batch
            finally:
                service.close()
    summary.update({"max_tokens": args.max_tokens, "requests_per_client": args.requests})
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if all(summary["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
