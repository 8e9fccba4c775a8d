"""The dashboard in a real headless Chromium against a real server: it loads with no console errors and fetches
nothing but the server, its live numbers move under load, a rollout can be paused from it with the admin token (and
a wrong token is refused), and the screenshot isn't blank."""

from __future__ import annotations

import os
import shutil
from urllib.parse import urlparse

import httpx
import pytest

from tests.browser import chromium_path, not_blank
from tests.serve.conftest import Load, ServerProcess
from tests.serve.test_rollout import _bodies

ADMIN = "adm1n-t0ken"
H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture()
def server(tmp_path, digits_chain):
    from slimship.registry import Registry

    _, exp, opt = digits_chain
    reg = Registry(tmp_path / "reg")
    reg.register(exp.path, "digits", stage="production")
    reg.register(opt.path, "digits", parent=1)
    reg.close()
    s = ServerProcess(
        tmp_path,
        {"registry": str(tmp_path / "reg"), "models": [{"name": "digits", "registry": v} for v in "12"]},
        env={"SLIMSHIP_ADMIN_TOKEN": ADMIN},
    )
    yield s
    s.stop()


def test_dashboard_live_numbers_and_admin_action_in_chromium(server, digits, tmp_path):
    from playwright.sync_api import sync_playwright

    policy = {
        "stages": [
            {"name": "shadow", "traffic": 0, "min_requests": 1_000_000},
            {"traffic": 100, "min_requests": 1},
        ],
        "gates": {"min_fidelity": 0.99},
        "min_pairs": 5,
    }
    r = httpx.post(
        f"http://{server.url}/v2/admin/models/digits/rollout",
        json={"candidate": "2", "policy": policy},
        headers=H,
    )
    assert r.status_code == 200, r.text
    console, errors, requests = [], [], []
    load = None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on(
                "console",
                lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None,
            )
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda q: requests.append(q.url))
            page.goto(f"http://{server.url}/dashboard", wait_until="load")
            page.wait_for_selector("section.model[data-model=digits] table.versions tbody tr")
            assert page.locator("#conn").inner_text() == "live"
            rate = page.locator('tr[data-version="1"] td.rate')
            assert float(rate.inner_text()) == 0.0
            assert "running" in page.locator(".rollout .state").inner_text()
            # live numbers change under load (the page polls once a second)
            load = Load(server.url, _bodies(digits, 360), clients=2)
            page.wait_for_function(
                "() => parseFloat(document.querySelector('tr[data-version=\"1\"] td.rate').textContent) > 1",
                timeout=20_000,
            )
            page.wait_for_function(
                "() => /fidelity (0\\.9\\d+|1\\.0+) over [1-9]/.test(document.querySelector('.rollout').textContent)",
                timeout=20_000,
            )
            load.stop()
            assert not console, console  # nothing logged while it loaded and refreshed under load
            # an admin action with a wrong token is refused …
            page.fill("#token", "wrong")
            page.dispatch_event("#token", "change")
            page.click(".rollout-pause")
            page.wait_for_function(
                "() => document.querySelector('#msg').textContent.includes('401')", timeout=10_000
            )
            assert (
                httpx.get(f"http://{server.url}/v2/admin/models/digits/rollout", headers=H).json()["state"]
                == "running"
            )
            # … and with the right one it works
            page.fill("#token", ADMIN)
            page.dispatch_event("#token", "change")
            page.click(".rollout-pause")
            page.wait_for_function(
                "() => document.querySelector('.rollout .state').textContent.includes('paused')",
                timeout=10_000,
            )
            st = httpx.get(f"http://{server.url}/v2/admin/models/digits/rollout", headers=H).json()
            assert (
                st["state"] == "paused"
                and st["history"][-1]["detail"]["reason"] == "paused from the dashboard"
            )
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            if load:
                load.stop()
            browser.close()
    assert not errors, errors
    # the only console line: Chromium logging the deliberate 401 of the wrong token
    assert all("401" in c for c in console), console
    hosts = {urlparse(u).netloc for u in requests}
    assert hosts == {server.url}, hosts  # no CDN, no fonts: everything from the server itself
    assert not_blank(shot) > 0.05
    if os.environ.get("SLIMSHIP_SCREENSHOTS"):  # keep the picture for the README
        shutil.copy(shot, os.environ["SLIMSHIP_SCREENSHOTS"])
