"""Sign in with Hugging Face on the Space (sd35hub.frontends.space.oauth): the [auth] secrets Streamlit's
st.login needs, built from the variables Spaces set for `hf_oauth: true`; a signed-in visitor's access token
is used for their own Hub calls, in their session only; an anonymous visitor never gets the Space's token.

Here AppTest seeds st.user the way Streamlit fills it after a sign-in (tokens["access"] via expose_tokens); the
round trip itself, in a browser against a stand-in provider, is tests/e2e/test_space_signin_browser.py."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest
from space_helpers import SPACE_APP, card
from streamlit.testing.v1 import AppTest

from sd35hub.frontends.space import oauth
from sd35hub.frontends.space import support as space
from sd35hub.frontends.space.start import sign_in_options
from sd35hub.frontends.space.support import TINY_HUB_BASE

SPACES_ENV = {
    "OAUTH_CLIENT_ID": "client-123",
    "OAUTH_CLIENT_SECRET": 'se"cret\\',
    "OAUTH_SCOPES": "openid profile read-repos gated-repos",
    "OPENID_PROVIDER_URL": "https://huggingface.co/",
    "SPACE_HOST": "me-sd35-lora-blender.hf.space",
}


def test_the_auth_secrets_come_from_the_spaces_oauth_variables(tmp_path: Path) -> None:
    toml = pytest.importorskip("tomllib")  # Python >= 3.11 (the Space's image runs 3.11)
    section = oauth.auth_section(SPACES_ENV)
    assert section is not None
    assert section["redirect_uri"] == "https://me-sd35-lora-blender.hf.space/oauth2callback"
    assert section["server_metadata_url"] == "https://huggingface.co/.well-known/openid-configuration"
    assert (section["client_id"], section["client_secret"]) == ("client-123", 'se"cret\\')
    assert section["expose_tokens"] == ["access"]  # st.user.tokens["access"]: the visitor's Hub token
    assert section["client_kwargs"]["scope"] == "openid profile read-repos gated-repos"
    assert section["cookie_secret"] != section["client_secret"] and len(section["cookie_secret"]) == 64
    assert oauth.auth_section(SPACES_ENV) == section  # stable: identity cookies survive a restart
    written = oauth.write_secrets(section, tmp_path / "auth" / "secrets.toml")
    assert stat.S_IMODE(written.stat().st_mode) == 0o600  # the client secret: readable by this user only
    assert toml.loads(written.read_text())["auth"] == section  # quotes and backslashes survive
    for missing in ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OPENID_PROVIDER_URL", "SPACE_HOST"):
        assert oauth.auth_section({k: v for k, v in SPACES_ENV.items() if k != missing}) is None
    local = oauth.auth_section({**SPACES_ENV, oauth.REDIRECT_ENV: "http://127.0.0.1:8501/oauth2callback"})
    assert local is not None and local["redirect_uri"] == "http://127.0.0.1:8501/oauth2callback"


def test_the_entry_point_turns_sign_in_on_only_with_an_oauth_app() -> None:
    toml = pytest.importorskip("tomllib")
    assert sign_in_options({}) == []  # no hf_oauth: only the token box
    flag, path = sign_in_options(SPACES_ENV)
    assert flag == "--secrets.files" and toml.loads(Path(path).read_text())["auth"]["client_id"] == "client-123"


@pytest.mark.slow
def test_a_signed_in_visitors_token_is_used_in_their_session_only(monkeypatch: pytest.MonkeyPatch, hub) -> None:  # noqa: ANN001
    """bob signs in; his private adapter loads in his session with his token. An anonymous session of the same
    server cannot add it, and neither can use alice's (the Space's HF_TOKEN) private adapter."""
    from space_helpers import adapter_bytes

    from sd35hub.models.load import load_transformer

    tag = uuid.uuid4().hex[:6]
    bobs, alices = f"bob/oauth-{tag}", f"alice/oauth-{tag}"
    weights = adapter_bytes(load_transformer("tiny"), "p", 5, ["prvt style"], ["to_q"])
    for repo, owner in ((bobs, hub.other_token), (alices, None)):
        hub.seed_repo(repo, {"README.md": card(TINY_HUB_BASE, "prvt style", None),
                             "pytorch_lora_weights.safetensors": weights}, private=True, owner_token=owner)  # fmt: skip
    monkeypatch.setenv(space.SPACE_MODEL_ENV, "tiny")
    auth = oauth.auth_section({**SPACES_ENV, "OPENID_PROVIDER_URL": hub.endpoint})

    def session(user: dict) -> AppTest:
        at = AppTest.from_file(SPACE_APP, default_timeout=90)
        at.secrets["auth"] = auth
        at.user = user
        return at.run()

    def add(at: AppTest, source: str) -> list[str]:
        at.text_input(key="paste_source").input(source)
        at.button(key="add_pasted").click().run()
        assert not at.exception, at.exception
        return [e.value for e in at.error]

    signed_in = session({"is_logged_in": True, "preferred_username": "bob", "tokens": {"access": hub.other_token}})
    anonymous = session({"is_logged_in": False})
    assert any("Signed in as bob" in c.value for c in signed_in.sidebar.caption)
    assert [b.label for b in anonymous.sidebar.button] == ["Sign in with Hugging Face"]
    assert add(signed_in, bobs) == [] and [c.source for c in signed_in.session_state["adapters"]] == [bobs]
    assert add(anonymous, bobs) and anonymous.session_state["adapters"] == []  # bob's token stayed in his session
    assert add(anonymous, alices) and anonymous.session_state["adapters"] == []  # never the Space's HF_TOKEN
    assert add(signed_in, alices) and len(signed_in.session_state["adapters"]) == 1  # bob cannot read alice's
    assert os.environ.get("HF_TOKEN") == hub.token and hub.other_token not in os.environ.values()
