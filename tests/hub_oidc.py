"""A minimal OpenID Connect provider on the local Hub test server, standing in for huggingface.co's "Sign in
with Hugging Face" (what a Space with `hf_oauth: true` uses): discovery, an authorize endpoint that signs in a
chosen user at once (no login page, no consent screen), the code exchange (confidential client: the client
secret is checked, the code is single-use and bound to its redirect URI), RS256 id tokens with the nonce, a
JWKS and userinfo. The access token it hands out is that user's token on the test Hub, as the real Hub's
OAuth access tokens are tokens of the Hub API.

    provider = HubOidc(hub, client_id="space", client_secret="s3cret", user="bob", access_token=bob_token)
    # OPENID_PROVIDER_URL = hub.endpoint
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode


@dataclass
class HubOidc:
    hub: Any  # tests.hubserver.HubServer
    client_id: str
    client_secret: str
    user: str
    access_token: str
    authorize_requests: list[dict[str, str]] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    _codes: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from joserfc.jwk import RSAKey

        self._key = RSAKey.generate_key(2048, parameters={"kid": "test-hub-1", "use": "sig"}, private=True)
        self.hub.add_routes(self.route)

    def close(self) -> None:
        self.hub.extra_routes.remove(self.route)

    @property
    def issuer(self) -> str:
        return self.hub.endpoint

    def route(self, handler, method: str, segments: list[str], token) -> int | None:  # noqa: ANN001
        endpoint = self.issuer
        if method == "GET" and segments == [".well-known", "openid-configuration"]:
            return handler._json({
                "issuer": endpoint, "authorization_endpoint": f"{endpoint}/oauth/authorize",
                "token_endpoint": f"{endpoint}/oauth/token", "userinfo_endpoint": f"{endpoint}/oauth/userinfo",
                "jwks_uri": f"{endpoint}/oauth/jwks", "response_types_supported": ["code"],
                "subject_types_supported": ["public"], "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": ["openid", "profile", "read-repos", "gated-repos"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            })  # fmt: skip
        if method == "GET" and segments == ["oauth", "jwks"]:
            return handler._json({"keys": [self._key.as_dict(private=False)]})
        if method == "GET" and segments == ["oauth", "authorize"]:
            query = {k: v[0] for k, v in handler.query.items()}
            self.authorize_requests.append(query)
            if query.get("client_id") != self.client_id or query.get("response_type") != "code":
                return handler._json({"error": "invalid_request"}, 400)
            code = secrets.token_urlsafe(16)
            self._codes[code] = query
            target = query["redirect_uri"] + "?" + urlencode({"code": code, "state": query.get("state", "")})
            return handler._send(302, b"", "text/plain", {"Location": target})
        if method == "POST" and segments == ["oauth", "token"]:
            return self._token(handler)
        if method == "GET" and segments == ["oauth", "userinfo"]:
            return handler._json(self._profile())
        return None

    def _profile(self) -> dict[str, str]:
        return {"sub": f"user-{self.user}", "preferred_username": self.user, "name": self.user.title()}

    def _token(self, handler) -> int:  # noqa: ANN001
        form = {k: v[0] for k, v in parse_qs(handler.body.decode()).items()}
        auth = handler.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            client, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        else:
            client, secret = form.get("client_id", ""), form.get("client_secret", "")
        self.token_requests.append({**form, "client_id": client})
        if (client, secret) != (self.client_id, self.client_secret):
            return handler._json({"error": "invalid_client"}, 401)
        asked = self._codes.pop(form.get("code", ""), None)  # single use
        if asked is None or form.get("grant_type") != "authorization_code" or form.get("redirect_uri") != asked["redirect_uri"]:
            return handler._json({"error": "invalid_grant"}, 400)
        from joserfc import jwt

        now = int(time.time())
        claims = {"iss": self.issuer, "aud": self.client_id, "iat": now, "exp": now + 600, "auth_time": now,
                  **self._profile()}  # fmt: skip
        if asked.get("nonce"):
            claims["nonce"] = asked["nonce"]
        id_token = jwt.encode({"alg": "RS256", "kid": "test-hub-1"}, claims, self._key)
        return handler._json({"access_token": self.access_token, "token_type": "Bearer", "expires_in": 600,
                              "id_token": id_token, "scope": asked.get("scope", "")})  # fmt: skip
