"""Remove secrets and local paths from what gets published (the training config, messages)."""

from __future__ import annotations

import re
from typing import Any

LOCAL_PATH_PLACEHOLDER = "<local path>"
# Keys whose values are secrets whatever they hold.
_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|auth|credential)", re.IGNORECASE)
# Values that look like Hub / API tokens.
_TOKEN_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{8,}|api_org_[A-Za-z0-9]{8,}|sk-[A-Za-z0-9_-]{16,})\b")
# Absolute / home / relative-dot POSIX paths, Windows drive paths, UNC paths, file:// URLs.
_LOCAL_PATH = re.compile(r"^(/|~|\./|\.\./|[A-Za-z]:[\\/]|\\\\|file://)")


def _known_tokens() -> list[str]:
    from huggingface_hub import get_token

    token = get_token()
    return [token] if token else []


def redact_text(text: str, extra_secrets: list[str] | None = None) -> str:
    for secret in [*(extra_secrets or []), *_known_tokens()]:
        if secret:
            text = text.replace(secret, "hf_***")
    return _TOKEN_VALUE.sub("hf_***", text)


def sanitize_config(value: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a config tree without secret keys, token-like values or local paths."""
    secrets = [s for s in (secrets if secrets is not None else _known_tokens()) if s]
    if isinstance(value, dict):
        return {
            key: sanitize_config(item, secrets)
            for key, item in value.items()
            if not _SECRET_KEY.search(str(key))
        }
    if isinstance(value, list):
        return [sanitize_config(item, secrets) for item in value]
    if isinstance(value, str):
        if any(secret in value for secret in secrets) or _TOKEN_VALUE.search(value):
            return None
        if _LOCAL_PATH.match(value.strip()):
            return LOCAL_PATH_PLACEHOLDER
    return value


def sanitized_config_yaml(text: str) -> str:
    """The training config YAML as it may be published. Unparseable YAML is not published verbatim."""
    import yaml

    header = (
        "# Training config written by sd35hub; local paths and secrets were removed before publishing.\n"
        f"# Values shown as {LOCAL_PATH_PLACEHOLDER!r} pointed at the trainer's machine.\n"
    )
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return header + "# (the original config could not be parsed, so it is not included)\n"
    return header + yaml.safe_dump(sanitize_config(tree), sort_keys=False, allow_unicode=True)
