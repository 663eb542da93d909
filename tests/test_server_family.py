"""Feature families in the server and UI: `serve --sae A --sae B` shows, on a feature's page, its closest
features in the other SAEs of the same hook point, and colours them on that SAE's map."""

from __future__ import annotations

import shutil

import pytest

from server_client import http as request

pytest_plugins = ["server_fixtures"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def family_server(tmp_path_factory, served_sae, tiny_llama_dir, text_corpus):
    """The session's SAE, a copy of it (its family of feature i is i, cosine 1) and an SAE at another hook."""
    from monoscope.model import load_model
    from monoscope.server import ServerThread, Service, create_app
    from server_fixtures import build_sae

    root = tmp_path_factory.mktemp("family-serve")
    twin = root / "twin"
    shutil.copytree(served_sae, twin)
    lm = load_model(str(tiny_llama_dir))
    elsewhere = build_sae(lm, root / "elsewhere", tiny_llama_dir, text_corpus, d_sae=32, seed=5)
    import json

    info = json.loads((elsewhere / "monoscope.json").read_text())  # the same SAE, said to read another hook point
    info["hook_point"] = "resid_post.1"
    (elsewhere / "monoscope.json").write_text(json.dumps(info))
    svc = Service.load([str(served_sae), str(twin), str(elsewhere)], max_tokens_limit=50, max_queue=8)
    with ServerThread(create_app(svc)) as running:
        yield running, svc
    svc.close()


def test_family_endpoint(family_server):
    running, svc = family_server
    ids = list(svc.saes)
    source, twin, elsewhere = ids
    out = request("GET", f"{running.url}/api/features/7/family?sae={source}&top=3").json()
    assert out["sae"] == source and out["feature"] == 7
    assert [a["sae"] for a in out["across"]] == [twin]  # the SAE at another hook point is no family
    matches = out["across"][0]["matches"]
    assert matches[0]["id"] == 7 and matches[0]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert [m["cosine"] for m in matches] == sorted((m["cosine"] for m in matches), reverse=True) and len(matches) == 3
    assert request("GET", f"{running.url}/api/features/7/family?sae={elsewhere}").json()["across"] == []
    bad = request("GET", f"{running.url}/api/features/9999/family?sae={source}")
    assert bad.status == 404 and "does not exist" in bad.message
    assert request("GET", f"{running.url}/api/features/7/family?sae={source}&top=0").status in (400, 422)


@pytest.mark.skipif(
    CHROMIUM is None, reason="the UI tests need Debian's `chromium` (apt-get install chromium); CI installs it"
)
def test_feature_page_shows_the_family_and_colours_it_on_the_map(family_server):
    from playwright.sync_api import sync_playwright

    running, svc = family_server
    source, twin, _ = list(svc.saes)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.set_default_timeout(20_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{running.url}/#/feature/7?sae={source}")
        page.wait_for_selector("#family ul.neighbours li")
        assert twin.lower() in page.inner_text("#family h4").lower()
        first = page.locator("#family ul.neighbours a.feature-link").first
        assert first.get_attribute("href").startswith(f"#/feature/7?sae={twin}")
        page.click("#family a.button")
        page.wait_for_selector("#map-canvas[data-ready='1']")
        assert page.inner_text("#map-marked").startswith("5 marked") and f"family of #7 in {source}" in page.inner_text(
            "#map-marked"
        )
        browser.close()
        assert not errors, errors
