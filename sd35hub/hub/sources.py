"""Safe adapter sources: which adapter a stranger may name, checked before any weight is downloaded.

A front end that serves other people (the Space today, any other UI tomorrow) accepts an adapter only as a
validated Hub id `owner/repo`, `owner/repo/file.safetensors` or a huggingface.co URL, never a local path
(`./x`, `/x`, `~`, `..`) and never another file type; `check_hub_adapter` then reads metadata only (no
weights) to refuse a repo without a safetensors adapter, a missing file, an adapter for another base and a
file over the size limit. Hub calls made for a visitor use the visitor's token or none (`visitor_token`).

Every refusal is a typed error (sd35hub.errors) whose message states the problem and the fix in the library's
terms: AdapterSourceError (``reason`` says which rule), AdapterBaseMismatchError, AdapterTooLargeError. A
front end words them for its audience from their fields (the Space: sd35hub.frontends.space.text).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sd35hub.errors import AdapterBaseMismatchError, AdapterSourceError, AdapterTooLargeError

if TYPE_CHECKING:  # pragma: no cover
    from sd35hub.hub.discovery import AdapterInfo

_URL = re.compile(
    r"^https?://[^/]+/(?:models/)?(?P<repo>[^/?#]+/[^/?#]+)(?:/(?:blob|resolve)/[^/]+/(?P<file>[^?#]+))?"
)
FORMS = "OWNER/REPO, OWNER/REPO/FILE.safetensors or https://huggingface.co/OWNER/REPO"


def visitor_token(token: str | None) -> str | bool:
    """The token for Hub calls made on a visitor's behalf: theirs, or False (anonymous), never None
    (None would make huggingface_hub use the server owner's HF_TOKEN)."""
    return (token or "").strip() or False


def parse_hub_source(text: str) -> str:
    """A pasted repo id or URL -> 'owner/repo' or 'owner/repo/file.safetensors'. Local paths, other file
    types and malformed ids raise AdapterSourceError (``reason``: SOURCE_REASONS) with what to pass instead."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = (text or "").strip()
    file = None
    if text.startswith(("http://", "https://")):
        match = _URL.match(text)
        if match is None:
            raise AdapterSourceError(
                f"{text[:80]!r} is not a Hub model URL (https://huggingface.co/OWNER/REPO, or a file's "
                f".../blob/REVISION/FILE.safetensors). Pass {FORMS}.",
                source=text[:80], reason="not_hub_url",
            )  # fmt: skip
        text, file = match.group("repo"), match.group("file")
    if not text or text.startswith((".", "/", "~", "\\")) or ".." in text or text.count("/") != 1:
        raise AdapterSourceError(
            f"{text[:80]!r} is not a Hub repo id OWNER/REPO (a safe adapter source is never a local path). "
            f"Pass {FORMS}.",
            source=text[:80], reason="not_repo_id",
        )  # fmt: skip
    try:
        validate_repo_id(text)
    except HFValidationError as exc:
        raise AdapterSourceError(
            f"{text[:80]!r} is not a valid Hub repo id ({str(exc).splitlines()[0][:200]}). Pass {FORMS}.",
            source=text[:80], reason="invalid_repo_id",
        ) from exc  # fmt: skip
    if file is not None:
        if not file.lower().endswith(".safetensors"):
            raise AdapterSourceError(
                f"{file} is not a .safetensors file: a safe adapter source names a .safetensors file or none "
                f"(then the repo's adapter file is used). Pass {text} or {text}/FILE.safetensors.",
                source=f"{text}/{file}"[:80], reason="not_safetensors", repo_id=text, filename=file,
            )  # fmt: skip
        return f"{text}/{file}"
    return text


def adapter_file_size(repo_id: str, filename: str, *, token: str | None = None) -> int | None:
    """Size in bytes of one file of a Hub repo, from its metadata (no download)."""
    from huggingface_hub import HfApi

    from sd35hub.access import hub_errors

    with hub_errors(repo_id, token=visitor_token(token), what=f"reading the adapter {repo_id}"):
        infos = HfApi().get_paths_info(repo_id, [filename], token=visitor_token(token))
    return next((getattr(i, "size", None) for i in infos if i.path == filename), None)


def check_hub_adapter(source: str, hub_base: str, *, max_bytes: int, token: str | None = None) -> AdapterInfo:
    """Check a parsed Hub source (parse_hub_source) before it joins a blend: it exists, has a .safetensors
    adapter file (the named one, if named; else AdapterSourceError ``no_such_file``), its card does not name
    another base than ``hub_base`` (AdapterBaseMismatchError), and the file is at most ``max_bytes``
    (AdapterTooLargeError). Reads metadata only (no weights); the visitor's token or none."""
    from sd35hub.hub.discovery import adapter_info

    repo_id = "/".join(source.split("/")[:2])
    explicit = source[len(repo_id) + 1 :] or None
    info = adapter_info(repo_id, token=visitor_token(token))  # refuses pickle-only or weightless repos
    if explicit is not None and explicit not in info.files:
        raise AdapterSourceError(
            f"{repo_id} has no file {explicit!r}. Check the file name (the repo's file list), or pass {repo_id} "
            "alone to use its adapter file.",
            source=source[:80], reason="no_such_file", repo_id=repo_id, filename=explicit,
        )  # fmt: skip
    declared = info.base_model
    if declared and declared != hub_base:
        raise AdapterBaseMismatchError(repo_id, declared, hub_base)
    size = adapter_file_size(repo_id, explicit or info.adapter_file, token=token)
    if size is not None and size > max_bytes:
        raise AdapterTooLargeError(repo_id, size, max_bytes)
    return info
