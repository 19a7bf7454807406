"""Browser end-to-end fixtures: `streamlit run space/app.py` as a subprocess against the local Hub, and
Debian's chromium driven by the `playwright` package (no `playwright install`: it cannot download
browsers here). Tests skip, with the reason, when /usr/bin/chromium or playwright is missing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from space_helpers import start_streamlit, stop_streamlit

CHROMIUM = "/usr/bin/chromium"
# Flags seen passing here (../shared/FACTS.md): no sandbox/GPU/shm in containers, no background traffic.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
]  # fmt: skip
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chromium_browser() -> Iterator[object]:
    """Module-scoped on purpose: playwright's sync API keeps an asyncio loop running in this thread
    while it is open, which breaks later tests that run their own loop (datasets' streaming)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(
            "the playwright package is missing: pip install playwright (no `playwright install` needed)"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
    import asyncio

    asyncio.set_event_loop(asyncio.new_event_loop())  # leave a fresh, idle loop behind


@pytest.fixture(scope="module")
def space_url(hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: ANN001
    """The Space on the tiny model, its Hub the local test server (same HF_HOME / SD35HUB_CACHE)."""
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "SD35HUB_SPACE_MODEL": "tiny", "PYTHONUNBUFFERED": "1"}
    log = tmp_path_factory.mktemp("space") / "streamlit.log"
    process, url = start_streamlit(env, log)
    yield url
    stop_streamlit(process)
