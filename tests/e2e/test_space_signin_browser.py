"""Sign in with Hugging Face, the whole OpenID Connect round trip in a real browser, offline: the Space's
[auth] secrets are built the way the entry point builds them on Spaces (sd35hub.frontends.space.oauth), and
the provider is the local Hub's stand-in for huggingface.co's OAuth (tests/hub_oidc.py: discovery, authorize,
code exchange with the client secret, RS256 id token with the nonce, JWKS). What it does not cover: the real
Hub's login and consent pages, and its scope handling (the stand-in signs bob in at once)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from hub_oidc import HubOidc
from space_helpers import card, start_streamlit, stop_streamlit

from sd35hub.frontends.space import oauth
from sd35hub.frontends.space.support import TINY_HUB_BASE

pytestmark = [pytest.mark.browser, pytest.mark.slow]
TIMEOUT_MS = 120_000
SCOPES = "openid profile read-repos gated-repos"


@pytest.fixture(scope="module")
def signin_space(hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubOidc, str, str]]:  # noqa: ANN001
    """(provider, Space URL, bob's private adapter): the tiny-model Space with sign-in on, bob the user."""
    from space_helpers import adapter_bytes

    from sd35hub.models.load import load_transformer

    private = f"bob/signin-{uuid.uuid4().hex[:6]}"
    hub.seed_repo(private, {
        "README.md": card(TINY_HUB_BASE, "prvt style", None),
        "pytorch_lora_weights.safetensors": adapter_bytes(load_transformer("tiny"), "p", 7, ["prvt style"], ["to_q"]),
    }, private=True, owner_token=hub.other_token)  # fmt: skip
    provider = HubOidc(hub, client_id="sd35hub-space", client_secret="client-secret-1", user="bob",
                       access_token=hub.other_token)  # fmt: skip
    section = oauth.auth_section({
        "OAUTH_CLIENT_ID": provider.client_id, "OAUTH_CLIENT_SECRET": provider.client_secret,
        "OAUTH_SCOPES": SCOPES, "OPENID_PROVIDER_URL": hub.endpoint,
        oauth.REDIRECT_ENV: "http://127.0.0.1:{port}/oauth2callback",  # Streamlit fills in its port
    })  # fmt: skip
    folder = tmp_path_factory.mktemp("space-signin")
    secrets = oauth.write_secrets(section, folder / "secrets.toml")
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "SD35HUB_SPACE_MODEL": "tiny", "PYTHONUNBUFFERED": "1"}
    process, url = start_streamlit(env, folder / "streamlit.log", "--secrets.files", str(secrets))
    yield provider, url, private
    stop_streamlit(process)
    provider.close()


def _add(page, source: str) -> None:  # noqa: ANN001
    box = page.get_by_label("Or paste a repo id / URL", exact=True)
    box.fill(source)
    box.press("Enter")
    page.get_by_role("button", name="Add adapter").click()


def test_sign_in_with_hugging_face_round_trip(chromium_browser, signin_space) -> None:  # noqa: ANN001
    from playwright.sync_api import expect

    provider, url, private = signin_space
    expect.set_options(timeout=TIMEOUT_MS)
    visitor = chromium_browser.new_context(viewport={"width": 1400, "height": 2000})
    page = visitor.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.get_by_role("button", name="Sign in with Hugging Face").click()
    expect(page.get_by_text("Signed in as bob", exact=False)).to_be_visible()  # back on the Space, signed in
    asked = provider.authorize_requests[-1]
    assert asked["scope"] == SCOPES and asked["redirect_uri"] == f"{url}/oauth2callback" and asked.get("nonce")
    assert provider.token_requests and provider.token_requests[-1]["client_id"] == "sd35hub-space"

    _add(page, private)  # bob's private adapter: loads with bob's own token from the sign-in
    expect(page.get_by_test_id("stSlider").filter(has_text="Weight")).to_have_count(1)
    expect(page.get_by_text(f"Blend: {private} × 1", exact=False)).to_be_visible()

    stranger = chromium_browser.new_context(viewport={"width": 1400, "height": 2000})  # another browser
    other = stranger.new_page()
    other.set_default_timeout(TIMEOUT_MS)
    other.goto(url)
    expect(other.get_by_role("button", name="Sign in with Hugging Face")).to_be_visible()
    _add(other, private)
    expect(other.get_by_test_id("stAlert").filter(has_text="does not exist")).to_have_count(1)  # not bob's token
    assert other.get_by_test_id("stSlider").filter(has_text="Weight").count() == 0

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Sign in with Hugging Face")).to_be_visible()
    visitor.close()
    stranger.close()
