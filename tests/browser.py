"""Open a local HTML page in headless Chromium (Debian's ``chromium``, driven by Playwright) and
report what a reader would see: sections, images that failed to load, console errors, and any
request that left the file (the report must work offline)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: Flags for a closed network: without the background-networking ones Chromium keeps trying
#: Google's hosts; --no-sandbox because CI runs as root.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class PageView:
    sections: dict[str, str] = field(default_factory=dict)
    images: int = 0
    broken_images: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    outside_requests: list[str] = field(default_factory=list)
    screenshot: bytes = b""


def chromium_path() -> str:
    """The Chromium to drive; in CI (``CI`` set) a missing browser fails the test, elsewhere it
    skips it (``.ci/run`` installs Debian's chromium where missing)."""
    path = (
        os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path:
        return path
    message = "headless Chromium and playwright are needed (apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def view_page(page_file: Path, section_ids: list[str]) -> PageView:
    """Load ``page_file`` from disk, wait for it, and read the named sections' text."""
    from playwright.sync_api import sync_playwright

    view = PageView()
    url = page_file.resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on(
                "console",
                lambda m: view.console_errors.append(m.text) if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: view.console_errors.append(str(e)))

            def record(request) -> None:
                if request.url != url and not request.url.startswith("data:"):
                    view.outside_requests.append(request.url)

            page.on("request", record)
            page.goto(url, wait_until="load")
            for section in section_ids:
                locator = page.locator(f"section#{section}")
                view.sections[section] = locator.inner_text() if locator.count() else ""
            images = page.evaluate(
                "Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])"
            )
            view.images = len(images)
            view.broken_images = [alt for alt, ok in images if not ok]
            view.screenshot = page.screenshot(full_page=False)
        finally:
            browser.close()
    return view
