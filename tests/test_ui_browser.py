"""The web UI in headless Chromium (Debian's `chromium` driven by Python Playwright; no browser download),
against the real server of server_fixtures.py: search, a feature page, the scanner, the equalizer chat and
the map.

Set MONOSCOPE_UI_SHOTS=DIR to save a screenshot of each page there."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from server_client import http as request

pytest_plugins = ["server_fixtures"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="the UI tests need Debian's `chromium` (apt-get install chromium); CI installs it"
)
TIMEOUT = 20_000


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(TIMEOUT)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.base = server.url  # type: ignore[attr-defined]
    yield pg
    context.close()
    assert not errors, errors


def shot(page, name: str) -> None:
    folder = os.environ.get("MONOSCOPE_UI_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def target(server):
    """A feature that fires strongly, one word of its label, and its label."""
    fid = request("GET", server.url + "/api/features?order=max_activation&limit=1").json()["features"][0]["id"]
    label = request("GET", f"{server.url}/api/features/{fid}").json()["feature"]["label"]
    word = re.findall(r"[A-Za-z]{2,}", label)[0]
    return fid, word, label


def test_search_then_open_a_feature(page, target):
    fid, word, label = target
    page.goto(page.base + "/#/search")
    page.wait_for_selector("tr.result")  # with no query: browse all features
    page.click("button[data-mode=words]")
    page.fill("#search-input", word)
    page.click("#search-button")
    page.wait_for_selector(f"tr.result[data-feature='{fid}']")
    assert page.locator("tr.result svg.spark").count() >= 1
    shot(page, "search")
    page.click(f"tr.result[data-feature='{fid}'] a.feature-link")
    page.wait_for_selector("#feature-label")
    assert page.url.endswith(f"#/feature/{fid}?sae=sae")
    assert page.inner_text("#feature-label") == label
    firing = page.locator("#top-examples .tok.on").first
    assert float(firing.get_attribute("data-act")) > 0
    firing.hover()
    page.wait_for_selector(".tooltip.show")
    assert "activation" in page.inner_text(".tooltip")
    for section in ("Activation histogram", "Logit effects", "Neighbours", "Examples across the activation range"):
        assert page.locator("h3", has_text=section).count() == 1
    assert page.locator("svg.histogram rect.hist-bar").count() >= 1
    shot(page, "feature")
    # a neighbour link opens that feature
    neighbour = page.locator("ul.neighbours a.feature-link").first
    other = neighbour.get_attribute("href")
    neighbour.click()
    page.wait_for_url(re.compile(re.escape(other) + "$"))
    page.wait_for_selector("#feature-label")


def test_scanner(page):
    page.goto(page.base + "/#/scan")
    page.fill("#scan-input", "The quick brown fox jumps over the lazy dog.")
    page.click("#scan-button")
    page.wait_for_function(
        "() => document.querySelector('#scan-tokens')?.innerText === 'The quick brown fox jumps over the lazy dog.'"
    )
    tokens = page.locator("#scan-tokens .tok")
    texts = tokens.all_inner_texts()
    i = max(range(len(texts)), key=lambda j: len(texts[j].strip()))  # the longest token
    tokens.nth(i).click()
    page.wait_for_selector("#token-features li a.feature-link")
    assert texts[i].strip() in page.inner_text("#token-features h3")
    assert page.locator("#scan-tokens .tok.selected").inner_text() == texts[i]
    page.locator("#top-features li").nth(1).click()  # highlight another feature
    assert page.locator("#top-features li.active").count() == 1
    shot(page, "scanner")
    link = page.locator("#token-features li a.feature-link").first
    fid = link.get_attribute("href").split("/")[2].split("?")[0]
    link.click()
    page.wait_for_selector("#feature-label")
    assert f"#/feature/{fid}" in page.url


def _replies(page):
    page.wait_for_function(
        "() => [...document.querySelectorAll('.turn:last-child .reply')].every(r => r.dataset.state === 'done')"
    )
    last = page.locator(".turn").last
    return last.locator(".reply.unsteered .reply-text").inner_text(), last.locator(
        ".reply.steered .reply-text"
    ).inner_text()


def test_equalizer_chat_slider_changes_the_steered_reply(page, target, server):
    fid, word, _ = target
    page.goto(f"{page.base}/#/feature/{fid}")
    page.click("#steer-button")
    page.wait_for_selector(".toast")
    page.click("nav.tabs a[data-route=chat]")
    item = page.locator(f".eq-item[data-feature='{fid}']")
    item.wait_for()
    assert page.inner_text("#eq-count") == "1"
    page.fill("#max-tokens", "12")
    page.dispatch_event("#max-tokens", "change")
    page.fill("#chat-input", "The quick brown fox")
    page.click("#send-button")
    unsteered, steered = _replies(page)
    plain = request(
        "POST",
        server.url + "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "The quick brown fox"}],
            "max_tokens": 12,
            "temperature": 0,
            "seed": 0,
        },
    ).json()
    assert unsteered == plain["choices"][0]["message"]["content"]
    assert steered != unsteered  # clamped at 4x its max activation
    # move the slider to the top: the steered reply is generated again, and changes
    slider = item.locator("input[type=range]")
    slider.focus()
    page.keyboard.press("End")
    assert item.locator(".value").inner_text().startswith("20")
    page.wait_for_function(
        "(old) => { const r = document.querySelector('.turn:last-child .reply.steered'); "
        "return r.dataset.state === 'done' && r.querySelector('.reply-text').innerText !== old; }",
        arg=steered,
    )
    unsteered2, steered2 = _replies(page)
    assert unsteered2 == unsteered and steered2 not in (steered, unsteered)
    shot(page, "chat")
    # presets: save, export as JSON, import it back after a reset
    page.fill("#preset-name", "fox")
    page.click("#preset-save")
    page.click("#preset-export")
    exported = json.loads(page.input_value("#preset-json"))
    assert exported["items"][0]["feature"] == fid and exported["items"][0]["value"] == 20
    page.keyboard.press("Escape")
    page.click(".equalizer button:has-text('reset')")
    page.wait_for_selector(".eq-items .empty")
    page.click("#preset-import")
    page.fill("#preset-json", json.dumps(exported))
    page.click("#preset-load")
    page.wait_for_selector(f".eq-item[data-feature='{fid}']")
    assert json.loads(page.evaluate("localStorage.getItem('monoscope.presets')"))["fox"]["items"][0]["feature"] == fid


def test_equalizer_add_by_search(page, target):
    fid, word, _ = target
    page.goto(page.base + "/#/chat")
    page.fill("#eq-search", word)
    page.wait_for_selector(f"#eq-results li.pick[data-feature='{fid}']").click()
    page.wait_for_selector(f".eq-item[data-feature='{fid}']")
    page.locator(f".eq-item[data-feature='{fid}'] select").select_option("ablate")
    assert page.locator(f".eq-item[data-feature='{fid}'] .value").inner_text() == "off"
    steering = page.evaluate("JSON.parse(localStorage.getItem('monoscope.equalizer'))")
    assert steering["items"] == [
        {
            "sae": "sae",
            "feature": fid,
            "label": steering["items"][0]["label"],
            "mode": "ablate",
            "value": 0,
            "enabled": True,
        }
    ]


def test_map(page, server):
    data = request("GET", server.url + "/api/map").json()
    page.goto(page.base + "/#/map")
    canvas = page.wait_for_selector("#map-canvas[data-ready]")
    box = canvas.bounding_box()
    i = 0
    s = min(box["width"], box["height"]) * 0.92
    x = box["x"] + box["width"] / 2 + (data["x"][i] - 0.5) * s
    y = box["y"] + box["height"] / 2 - (data["y"][i] - 0.5) * s
    page.mouse.move(x, y)
    tip = page.wait_for_selector(".map-tip:not([hidden])")
    assert tip.inner_text().startswith(f"#{data['ids'][i]}")
    page.mouse.wheel(0, -400)  # zoom in around the pointer: the point stays under it
    page.mouse.move(x + 1, y)
    assert page.inner_text(".map-tip").startswith(f"#{data['ids'][i]}")
    shot(page, "map")
    page.mouse.click(x + 1, y)
    page.wait_for_selector("#feature-label")
    assert f"#/feature/{data['ids'][i]}" in page.url


def test_api_reference_page(page):
    page.goto(page.base + "/docs")
    page.wait_for_selector("details.endpoint")
    assert page.locator("details.endpoint code", has_text="/v1/chat/completions").count() == 1
    assert page.locator("#schema-SteeringItem").count() == 1
