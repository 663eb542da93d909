"""Load on `monoscope serve`: many concurrent clients on loopback, a mix of steered chat completions (streamed
and not) and feature-database requests; no request may fail; latency p50/p95 per kind.

What it shows: generation is queued on one model thread (requests wait their turn, none fails), while the
feature endpoints (dashboards, search, map) keep answering from the web server's threads.

The server runs in this process (uvicorn on a background thread, 127.0.0.1, a free port) around `--sae`
(default: runs/quickstart/sae when it has a feature database, else a random TopK SAE on the embedded model,
analysed here over a few thousand tokens), or is an already running one given with `--url` (loopback only).
Bounded: `--clients` clients each send `--requests` requests, and everything stops after `--max-seconds`.

Usage: python benchmarks/bench_server.py [--sae DIR | --url http://127.0.0.1:8000] [--clients 16] [--requests 12]
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import random
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUICKSTART_SAE = Path("runs/quickstart/sae")
PROMPTS = ["Tell me about your weekend.", "What should I cook tonight?", "Write a haiku about the sea.", "Explain what a bridge is."]
SEARCHES = ["bridge", "code", "number", "the", "ocean", "food", "name", "question"]
TEXTS = ["The Golden Gate Bridge is a suspension bridge.", "def add(a, b):\n    return a + b", "I had pasta for dinner last night."]
# kind -> weight in the mix
MIX = {"chat": 25, "chat_stream": 15, "feature": 30, "search": 15, "scan": 10, "map": 5}


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

    def call(self, method: str, path: str, body: dict | None = None, stream: bool = False) -> tuple[int, bytes, float | None]:
        """(status, body, seconds to the first streamed event or None)."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (0, 1):
            try:
                start = time.perf_counter()
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                first = None
                if stream and resp.status == 200:
                    chunks = [resp.readline()]
                    first = time.perf_counter() - start
                    chunks.append(resp.read())
                    payload = b"".join(chunks)
                else:
                    payload = resp.read()
                return resp.status, payload, first
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


def request_for(kind: str, rng: random.Random, d_sae: int, sae: str, features: list[int], max_tokens: int) -> tuple[str, str, dict | None, bool]:
    steering = [{"feature": rng.choice(features), "mode": "clamp", "value": f"{rng.choice([2, 4, 8])}x", "sae": sae}] if rng.random() < 0.7 else []
    if kind in ("chat", "chat_stream"):
        body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": max_tokens, "temperature": 0.7,
                "seed": rng.randrange(1000), "steering": steering, "stream": kind == "chat_stream"}
        return "POST", "/v1/chat/completions", body, kind == "chat_stream"
    if kind == "feature":
        return "GET", f"/api/features/{rng.randrange(d_sae)}?sae={urllib.parse.quote(sae)}", None, False
    if kind == "search":
        return "GET", f"/api/search?q={urllib.parse.quote(rng.choice(SEARCHES))}&mode=words&sae={urllib.parse.quote(sae)}", None, False
    if kind == "scan":
        return "POST", "/api/scan", {"text": rng.choice(TEXTS), "sae": sae}, False
    if kind == "map":
        return "GET", f"/api/map?sae={urllib.parse.quote(sae)}", None, False
    raise ValueError(kind)


def run_load(host: str, port: int, clients: int, per_client: int, max_seconds: float, max_tokens: int, seed: int) -> dict:
    probe = Client(host, port, 60)
    status, body, _ = probe.call("GET", "/api/info")
    if status != 200:
        raise SystemExit(f"GET /api/info answered {status}: {body[:200]!r}")
    info = json.loads(body)
    sae = info["saes"][0]
    status, body, _ = probe.call("GET", f"/api/features?order=max_activation&limit=50&sae={urllib.parse.quote(sae['id'])}")
    features = [f["id"] for f in json.loads(body)["features"]] if status == 200 else list(range(min(50, sae["d_sae"])))
    probe.close()
    kinds = [k for k, w in MIX.items() for _ in range(w)]
    latencies: dict[str, list[float]] = defaultdict(list)
    first_event: list[float] = []
    errors: list[str] = []
    tokens = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds
    barrier = threading.Barrier(clients)

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        client = Client(host, port, timeout=max_seconds + 30)
        barrier.wait()
        try:
            for _ in range(per_client):
                if time.monotonic() > deadline:
                    return
                kind = rng.choice(kinds)
                method, path, body, stream = request_for(kind, rng, sae["d_sae"], sae["id"], features, max_tokens)
                start = time.perf_counter()
                try:
                    status, payload, first = client.call(method, path, body, stream)
                except Exception as err:  # noqa: BLE001 - every failure is counted and reported
                    with lock:
                        errors.append(f"{kind}: {type(err).__name__}: {err}")
                    continue
                seconds = time.perf_counter() - start
                with lock:
                    if status != 200:
                        errors.append(f"{kind}: HTTP {status}: {payload[:200]!r}")
                        continue
                    latencies[kind].append(seconds)
                    if first is not None:
                        first_event.append(first)
                    if kind == "chat":
                        tokens[0] += json.loads(payload)["usage"]["completion_tokens"]
                    elif kind == "chat_stream":
                        tokens[0] += payload.count(b'"content":"') - 1
        finally:
            client.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - start
    return {"latencies": latencies, "first_event": first_event, "errors": errors, "wall": wall, "tokens": tokens[0], "info": info}


def report(result: dict, clients: int) -> None:
    lat = result["latencies"]
    total = sum(len(v) for v in lat.values())
    print(f"\n{clients} concurrent clients, {total} requests in {result['wall']:.1f} s ({total / result['wall']:.1f} req/s), "
          f"{len(result['errors'])} errors; model {result['info']['model']}")
    print(f"  {'kind':<14}{'n':>5}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    for kind in MIX:
        values = lat.get(kind, [])
        if values:
            print(f"  {kind:<14}{len(values):>5}{percentile(values, 0.5) * 1e3:>10.0f}{percentile(values, 0.95) * 1e3:>10.0f}{max(values) * 1e3:>10.0f}")
    if result["first_event"]:
        fe = result["first_event"]
        print(f"  {'stream TTFB':<14}{len(fe):>5}{percentile(fe, 0.5) * 1e3:>10.0f}{percentile(fe, 0.95) * 1e3:>10.0f}{max(fe) * 1e3:>10.0f}")
    gen = sum(lat.get("chat", [])) + sum(lat.get("chat_stream", []))
    print(f"  generated about {result['tokens']} tokens ({result['tokens'] / result['wall']:.1f} tok/s over the run)")
    fast = lat.get("feature", []) + lat.get("search", []) + lat.get("map", [])
    if fast and gen:
        print(f"  feature-database requests while the model was busy: p95 {percentile(fast, 0.95) * 1e3:.0f} ms "
              f"(vs chat p50 {percentile(lat.get('chat', [0]), 0.5) * 1e3:.0f} ms): they do not wait for the model")
    for err in result["errors"][:10]:
        print(f"  error: {err}")


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
    save_sae(sae, folder, info={"model": EMBEDDED_MODEL, "hook_point": hook, "context_size": 128, "corpus": {"spec": "starter", "seed": 0}})
    analyze_sae(folder, tokens=4096, loaded=lm, progress=False, config=AnalysisConfig(map="pca", embeddings=False))
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sae", help="SAE folder to serve in this process (default: runs/quickstart/sae, else a random one)")
    ap.add_argument("--url", help="an already running server on this machine, e.g. http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    ap.add_argument("--requests", type=int, default=12, help="requests per client (default: 12)")
    ap.add_argument("--max-seconds", type=float, default=180.0, help="stop sending after this long (default: 180)")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each completion (default: 16)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not 1 <= args.clients <= 256 or not 1 <= args.requests <= 10_000:
        ap.error("--clients must be 1-256 and --requests 1-10000")
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            parsed = urllib.parse.urlsplit(args.url)
            host = parsed.hostname or ""
            if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
                ap.error("--url must be a server on this machine (loopback), e.g. http://127.0.0.1:8000")
            result = run_load(host, parsed.port or 80, args.clients, args.requests, args.max_seconds, args.max_tokens, args.seed)
        else:
            from monoscope.server import ServerThread, Service, create_app

            folder = Path(args.sae) if args.sae else default_sae(Path(tmp))
            service = Service.load([str(folder)], max_queue=max(64, 2 * args.clients))
            print(f"serving {folder} ({service.served_name}) on a background thread")
            with ServerThread(create_app(service)) as server:
                result = run_load("127.0.0.1", server.port, args.clients, args.requests, args.max_seconds, args.max_tokens, args.seed)
            service.close()
    report(result, args.clients)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
