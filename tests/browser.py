"""Load a page in a real headless Chromium (Debian's package, driven by Playwright) and report what happened:
console messages, uncaught errors, every network request, the page's text, and a screenshot."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Rendered:
    title: str
    text: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    screenshot: Path | None = None
    counts: dict[str, int] = field(default_factory=dict)


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium is needed for the browser checks: scripts/bootstrap.sh dev installs it"
    return path


def render(url: str, screenshot: Path, selectors: tuple[str, ...] = (), offline: bool = True) -> Rendered:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            out = Rendered(title="", text="")
            page.on(
                "console",
                lambda m: out.console_errors.append(m.text) if m.type in ("error", "warning") else None,
            )
            page.on("pageerror", lambda e: out.page_errors.append(str(e)))
            page.on("request", lambda r: out.requests.append(r.url))
            if offline:
                page.context.set_offline(True)  # a report must not need the network
            page.goto(url, wait_until="load")
            out.title = page.title()
            out.text = page.inner_text("body")
            out.counts = {s: page.locator(s).count() for s in selectors}
            page.screenshot(path=str(screenshot), full_page=True)
            out.screenshot = screenshot
            return out
        finally:
            browser.close()


def not_blank(png: Path) -> float:
    """Share of the screenshot's pixels that differ from its most common colour (0 = a blank page)."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(png).convert("L"))
    _values, counts = np.unique(img, return_counts=True)
    return float(1.0 - counts.max() / img.size)
