"""Sign in with Hugging Face on the Space (Streamlit's st.login, OpenID Connect), so a visitor's own private
and gated adapters load with *their* token, never with the Space's.

On Hugging Face Spaces, `hf_oauth: true` in the Space README's metadata creates an OAuth app and sets
OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, OAUTH_SCOPES, OPENID_PROVIDER_URL and SPACE_HOST. Streamlit's st.login
reads its provider from an `[auth]` section of its secrets; `auth_section(environ)` builds that section from
those variables and `write_secrets` writes it (mode 0600) for `streamlit run --secrets.files`
(sd35hub.frontends.space.start does both before Streamlit starts):

    redirect_uri        https://$SPACE_HOST/oauth2callback   (any URL on the Space is allowed)
    cookie_secret       derived from the client secret (stable across restarts, never the secret itself)
    server_metadata_url $OPENID_PROVIDER_URL/.well-known/openid-configuration
    expose_tokens       ["access"]: st.user.tokens["access"] is the visitor's Hub access token
    client_kwargs       scope = $OAUTH_SCOPES ("openid profile" + hf_oauth_scopes, e.g. read-repos gated-repos)

The access token lives in the visitor's identity cookie and st.user of their own session only: `session_token`
is read per script run and passed explicitly to each Hub call made for that visitor (token=..., or False
when nobody is signed in: never None, which would mean the process's HF_TOKEN).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REQUIRED = ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OPENID_PROVIDER_URL")
REDIRECT_ENV = "SD35HUB_SPACE_OAUTH_REDIRECT"  # overrides https://$SPACE_HOST/oauth2callback (local runs)
DEFAULT_SCOPES = "openid profile read-repos gated-repos"


def auth_section(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Streamlit's `[auth]` secrets for the Space's OAuth app, or None when the Space has none (no
    `hf_oauth: true`, or not on Spaces): then the page offers only the token box."""
    environ = os.environ if environ is None else environ
    if not all(environ.get(name) for name in REQUIRED):
        return None
    redirect = environ.get(REDIRECT_ENV) or (
        f"https://{environ['SPACE_HOST']}/oauth2callback" if environ.get("SPACE_HOST") else None
    )
    if redirect is None:
        return None
    secret = environ["OAUTH_CLIENT_SECRET"]
    provider = environ["OPENID_PROVIDER_URL"].rstrip("/")
    return {
        "redirect_uri": redirect,
        "cookie_secret": hashlib.sha256(f"sd35hub-space-cookie:{secret}".encode()).hexdigest(),
        "client_id": environ["OAUTH_CLIENT_ID"],
        "client_secret": secret,
        "server_metadata_url": f"{provider}/.well-known/openid-configuration",
        "expose_tokens": ["access"],
        "client_kwargs": {"scope": environ.get("OAUTH_SCOPES") or DEFAULT_SCOPES, "prompt": "consent"},
    }


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are valid TOML escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"unsupported secrets value {value!r}")


def write_secrets(section: Mapping[str, Any], path: Path) -> Path:
    """Write `[auth]` (and `[auth.client_kwargs]`) as a TOML secrets file readable only by this user."""
    lines = ["[auth]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in section.items() if not isinstance(value, dict)]
    for key, value in section.items():
        if isinstance(value, dict):
            lines += ["", f"[auth.{key}]", *(f"{k} = {_toml_value(v)}" for k, v in value.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write("\n".join(lines) + "\n")
    return path


def session_token(user: Any) -> str | None:
    """The signed-in visitor's Hub access token from their own st.user (None: not signed in)."""
    try:
        if not user.get("is_logged_in"):
            return None
        token = user.tokens.get("access") if hasattr(user, "tokens") else (user.get("tokens") or {}).get("access")
    except Exception:  # noqa: BLE001 - no auth configured: st.user has no login state
        return None
    return (token or "").strip() or None


def display_name(user: Any) -> str:
    return str(user.get("preferred_username") or user.get("name") or "your Hugging Face account")
