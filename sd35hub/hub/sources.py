"""Safe adapter sources: which adapter a stranger may name, checked before any weight is downloaded.

A front end that serves other people (the Space today, any other UI tomorrow) accepts an adapter only as a
validated Hub id `owner/repo`, `owner/repo/file.safetensors` or a huggingface.co URL, never a local path
(`./x`, `/x`, `~`, `..`) and never another file type; `check_hub_adapter` then reads metadata only (no
weights) to refuse a repo without a safetensors adapter, a missing file, an adapter for another base and a
file over the size limit. Hub calls made for a visitor use the visitor's token or none (`visitor_token`).
Every refusal is a typed error whose message says what to type instead; the front end words it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sd35hub.errors import AdapterError, AdapterIncompatibleError

if TYPE_CHECKING:  # pragma: no cover
    from sd35hub.hub.discovery import AdapterInfo

_URL = re.compile(
    r"^https?://[^/]+/(?:models/)?(?P<repo>[^/?#]+/[^/?#]+)(?:/(?:blob|resolve)/[^/]+/(?P<file>[^?#]+))?"
)
HINT = "Paste a Hub id like 'owner/my-sd35-lora' or its https://huggingface.co/owner/my-sd35-lora URL."


def visitor_token(token: str | None) -> str | bool:
    """The token for Hub calls made on a visitor's behalf: theirs, or False (anonymous), never None
    (None would make huggingface_hub use the server owner's HF_TOKEN)."""
    return (token or "").strip() or False


def parse_hub_source(text: str) -> str:
    """A pasted repo id or URL -> 'owner/repo' or 'owner/repo/file.safetensors'. Local paths, other file
    types and malformed ids raise AdapterError with what to type instead."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = (text or "").strip()
    file = None
    if text.startswith(("http://", "https://")):
        match = _URL.match(text)
        if match is None:
            raise AdapterError(f"{text[:80]!r} is not a Hub model URL. {HINT}")
        text, file = match.group("repo"), match.group("file")
    if not text or text.startswith((".", "/", "~", "\\")) or ".." in text or text.count("/") != 1:
        raise AdapterError(f"{text[:80]!r} is not a Hub repo id (local paths are not accepted here). {HINT}")
    try:
        validate_repo_id(text)
    except HFValidationError as exc:
        raise AdapterError(f"{text[:80]!r} is not a valid Hub repo id. {HINT}") from exc
    if file is not None:
        if not file.lower().endswith(".safetensors"):
            raise AdapterError(f"{file} is not a .safetensors file; only safetensors adapters are loaded here.")
        return f"{text}/{file}"
    return text


def adapter_file_size(repo_id: str, filename: str, *, token: str | None = None) -> int | None:
    """Size in bytes of one file of a Hub repo, from its metadata (no download)."""
    from huggingface_hub import HfApi

    from sd35hub.access import hub_errors

    with hub_errors(repo_id, token=visitor_token(token), what=f"reading the adapter {repo_id}"):
        infos = HfApi().get_paths_info(repo_id, [filename], token=visitor_token(token))
    return next((getattr(i, "size", None) for i in infos if i.path == filename), None)


def check_hub_adapter(
    source: str, hub_base: str, base_label: str, *, max_bytes: int, token: str | None = None
) -> AdapterInfo:
    """Check a parsed Hub source (parse_hub_source) before it joins a blend: it exists, has a .safetensors
    adapter file (the named one, if named), its card does not name another base than ``hub_base``, and the
    file is at most ``max_bytes``. Reads metadata only (no weights); the visitor's token or none."""
    from sd35hub.hub.discovery import adapter_info

    repo_id = "/".join(source.split("/")[:2])
    explicit = source[len(repo_id) + 1 :] or None
    info = adapter_info(repo_id, token=visitor_token(token))  # refuses pickle-only or weightless repos
    if explicit is not None and explicit not in info.files:
        raise AdapterError(f"{repo_id} has no file {explicit!r}. Check the name, or paste the repo id alone.")
    declared = info.base_model
    if declared and declared != hub_base:
        raise AdapterIncompatibleError(
            f"{repo_id} is an adapter for {declared}, but this Space is running {base_label} "
            f"({hub_base}). Pick an adapter made for {base_label} (the search lists only those), "
            "or switch the base model in the sidebar."
        )
    size = adapter_file_size(repo_id, explicit or info.adapter_file, token=token)
    if size is not None and size > max_bytes:
        raise AdapterError(
            f"{repo_id} is {size / 1024**2:,.1f} MB, over this Space's limit of {max_bytes / 1024**2:,.1f} "
            "MB for one adapter: it is probably a full model, not a LoRA. Pick another adapter."
        )
    return info
