"""Take the screenshots of docs/server.md from a running `monoscope serve` (headless Debian `chromium` +
Playwright, no browser download).

    monoscope serve --sae runs/quickstart/sae --port 8000 &
    python docs/img/make_screenshots.py --url http://127.0.0.1:8000 --feature 761 --steer 761=clamp:4 --steer 2735=add:2 \
        --search love --out docs/img
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--feature", type=int, default=0, help="feature page to show")
    ap.add_argument("--search", default="love", help="words to search for")
    ap.add_argument(
        "--steer", action="append", default=[], help="ID=MODE:VALUE for the equalizer (value in x max for clamp/add)"
    )
    ap.add_argument("--prompt", default="Tell me about your weekend.")
    ap.add_argument(
        "--scan", default="I love my dog. We walk by the sea every weekend, and then I cook pasta for dinner."
    )
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for spec in args.steer:
        fid, rest = spec.split("=")
        mode, value = rest.split(":")
        items.append({"feature": int(fid), "mode": mode, "value": float(value), "enabled": True})
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1360, "height": 860}, device_scale_factor=1)
        page.set_default_timeout(120_000)
        page.goto(f"{args.url}/#/search?mode=hybrid&q={args.search}")
        page.wait_for_selector("tr.result")
        page.screenshot(path=str(out / "search.png"))
        page.goto(f"{args.url}/#/feature/{args.feature}")
        page.wait_for_selector("#top-examples")
        page.locator("#top-examples .tok.peak").first.hover()
        time.sleep(0.3)
        page.screenshot(path=str(out / "feature.png"), full_page=True)
        page.goto(f"{args.url}/#/scan")
        page.fill("#scan-input", args.scan)
        page.click("#scan-button")
        page.wait_for_function(f"() => document.querySelector('#scan-tokens')?.innerText === {json.dumps(args.scan)}")
        time.sleep(0.3)
        page.screenshot(path=str(out / "scanner.png"))
        page.evaluate(
            f"localStorage.setItem('monoscope.equalizer', {json.dumps(json.dumps({'strength': 1, 'items': items}))})"
        )
        page.evaluate(
            "localStorage.setItem('monoscope.chatSettings', JSON.stringify({max_tokens: 48, temperature: 0, seed: 0, compare: true, auto: false}))"
        )
        page.goto(f"{args.url}/#/chat")
        page.reload()
        page.wait_for_selector(".eq-item")
        page.fill("#chat-input", args.prompt)
        page.click("#send-button")
        page.wait_for_function(
            "() => [...document.querySelectorAll('.reply')].length > 0 && [...document.querySelectorAll('.reply')].every(r => r.dataset.state === 'done')"
        )
        page.screenshot(path=str(out / "chat.png"))
        page.goto(f"{args.url}/#/map")
        page.wait_for_selector("#map-canvas[data-ready]")
        page.fill("#map-filter", args.search)
        box = page.locator("#map-canvas").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.45)
        page.mouse.wheel(0, -500)
        time.sleep(0.3)
        page.mouse.move(box["x"] + box["width"] * 0.52, box["y"] + box["height"] * 0.47)
        time.sleep(0.3)
        page.screenshot(path=str(out / "map.png"))
        browser.close()
    print(f"screenshots in {out}")


if __name__ == "__main__":
    main()
