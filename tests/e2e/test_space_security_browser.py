"""The Space in a real browser against an attacker (issue #16, security items 1-5): a hostile model card
(tags, Markdown, a phishing link and an off-site image in its trigger words, license and widget), a hostile
share link and hostile prompts. Each is refused or rendered inert: no element links to or loads from the
attacker's site, the browser never even requests it, and the image is made with the visitor's blend only."""

from __future__ import annotations

from urllib.parse import quote, urlsplit

import pytest
from space_helpers import EVIL, HostileRepos, SpaceRepos, seed_hostile_repos, seed_space_repos

pytestmark = [pytest.mark.browser, pytest.mark.slow]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def repos(hub) -> SpaceRepos:  # noqa: ANN001
    return seed_space_repos(hub)


@pytest.fixture(scope="module")
def hostile(hub, repos: SpaceRepos) -> HostileRepos:  # noqa: ANN001
    return seed_hostile_repos(hub, repos)


def _visible(locator) -> str:  # noqa: ANN001
    """The text a person reads (md_text's invisible word joiners removed)."""
    return locator.inner_text().replace("\u2060", "")


def _no_evil(page) -> None:  # noqa: ANN001
    assert page.locator(f'a[href*="{EVIL}"]').count() == 0
    assert page.locator(f'img[src*="{EVIL}"]').count() == 0


def test_hostile_card_link_and_prompt_are_inert(
    chromium_browser,
    space_url: str,
    repos: SpaceRepos,
    hostile: HostileRepos,  # noqa: ANN001
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    page = chromium_browser.new_page(viewport={"width": 1400, "height": 2200})
    page.set_default_timeout(TIMEOUT_MS)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))

    # 3. A share link whose value is a Markdown link: shown as text inside the error box.
    page.goto(f"{space_url}/?adapter={quote(hostile.link)}&adapter={quote(hostile.card)}")
    alerts = page.get_by_test_id("stAlert")
    phishing = alerts.filter(has_text="[Session expired - log in again](http")
    expect(phishing).to_have_count(1)
    assert f"[Session expired - log in again](http://{EVIL}/login)" in _visible(phishing)
    assert alerts.locator("a").count() == 0, alerts.locator("a").evaluate_all(
        "els => els.map(e => e.outerHTML)"
    )

    # The hostile card in the gallery: its Markdown, tags and off-site image are text or absent.
    search = page.get_by_label("Search adapters")
    search.fill(repos.tag)
    search.press("Enter")
    card = (
        page.get_by_test_id("stVerticalBlock")
        .filter(has_text=f"{hostile.card}")
        .filter(has=page.get_by_role("button", name="In your blend", exact=False))
    )
    expect(card.last).to_be_visible()
    expect(card.last).to_contain_text("**bold** [Session expired - log in again](http")
    assert f"[Session expired - log in again](http://{EVIL}/login)" in _visible(card.last)
    assert f"license [free](http://{EVIL}/license)" in _visible(card.last)
    expect(card.last).to_contain_text("1 over-long or extra ignored")  # the 15,000-character trigger word
    assert card.last.locator("img").count() == 0  # its widget image is off-site: not shown
    _no_evil(page)

    # The link's adapter is in the blend at weight 1, in the browser too (the weight widgets once came back
    # as -1 when the first run's messages were lost: test_space_browser.py::test_widgets_the_browser_never...).
    weight = page.get_by_test_id("stSlider").filter(has_text="Weight")
    expect(weight).to_contain_text("1.00")

    # 1 + 2. Trigger words never act as tags; typed tags get the blend panel's checks.
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill(f"a lighthouse <lora:{repos.ink}:1000> <lora:{hostile.private_cache_path}:1>")
    page.get_by_label("Steps").fill("1")
    page.get_by_role("button", name="Generate").click()
    refused = alerts.filter(has_text="between -1 and 2")
    expect(refused).to_have_count(1)
    expect(refused).to_contain_text("local paths are not accepted")
    assert page.get_by_test_id("stImage").filter(has_text="seed").count() == 0

    # 5. Over the limit: said, not silently cut.
    prompt.fill("a lighthouse " * 100)
    prompt.press("Tab")  # a text area sends its value when it loses focus
    expect(page.get_by_text("1,300 characters; the limit is 1,000")).to_be_visible()

    prompt.fill("a lighthouse")
    page.get_by_role("button", name="Generate").click()
    caption = page.get_by_test_id("stImage").filter(has_text=f"{hostile.card} × 1 · seed")
    expect(caption).to_have_count(1)
    assert repos.ink not in caption.inner_text()  # the card's <lora:ink:50> did nothing
    page.get_by_text("Use it in diffusers").click()
    snippet = page.get_by_test_id("stCode").filter(has_text="StableDiffusion3Pipeline").inner_text()
    # 4. No server path on the page: the snippet names Hub ids pinned to commits.
    snippet = snippet.replace(hostile.private_cache_path, "")  # the card's own text, quoted in the prompt
    assert "/tmp" not in snippet and "snapshots" not in snippet and "sd35hub/tiny-sd35" in snippet
    assert f"load_lora_weights('{hostile.card}'" in snippet and "revision='" in snippet
    assert "/tmp/" not in _visible(page.locator("body")).replace(hostile.private_cache_path, "")
    _no_evil(page)
    assert not [url for url in requested if urlsplit(url).hostname == EVIL]  # never contacted the attacker
    page.close()
