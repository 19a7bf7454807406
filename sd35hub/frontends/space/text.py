"""What the Space shows strangers, made safe: untrusted text (model cards, trigger words, URL parameters,
file names, error messages) rendered as text, images only from the Hub, no server paths, and error
messages worded for a visitor rather than for the person running the server.

* `md_text(text)` escapes every Markdown character, so a Streamlit element that renders Markdown
  (`st.error`, `st.caption`, `st.markdown`, widget labels) shows `[x](http://evil)` as those characters
  instead of a link, `![x](http://evil/p.png)` instead of a remote image, `**x**` instead of bold text, and
  `<lora:owner/repo:0.8>` instead of an autolink;
* `hub_image_url(url)` keeps a card's preview image only when it is served by the Hub the Space uses;
* `clean_trigger_words(words)` bounds a card's trigger words (length, count, control characters);
* `visitor_message(exc)` is friendly_error's wording: no tracebacks, tokens or server paths, no
  operator instructions (those go to the server log); a full disk or an unreachable Hub is shown as its
  typed error (sd35hub.failures.typed_error). The library's adapter-source refusals
  (sd35hub.hub.sources: AdapterSourceError, AdapterBaseMismatchError, AdapterTooLargeError) are worded
  here for a visitor, from the errors' fields: what to paste, which base this Space runs, its size limit.
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections.abc import Mapping
from urllib.parse import urlsplit

log = logging.getLogger("sd35hub.space")

MAX_TRIGGER_CHARS = 200  # one trigger word / phrase; longer card values are ignored (and counted)
MAX_TRIGGER_WORDS = 6  # per adapter
_JOINER = "\u2060"  # WORD JOINER: invisible, not a word character, so no autolink pattern matches across it
_AUTOLINK = re.compile(r"(?i)([a-z0-9])(\\:\\/\\/|\\@)|(?<![a-z0-9])(www)(\\\.)")  # x://, x@y, www.
_MD_SPECIAL = re.compile("([" + re.escape(string.punctuation) + "])")
# An absolute POSIX path or a home path, as it appears inside a message (not the path part of a URL).
_PATH = re.compile(r"(?<![\w:/.\\-])(?:~/|/)[^\s'\"`/]+(?:/[^\s'\"`/]*)*")


def md_text(text: object) -> str:
    """`text` as Markdown that renders exactly these characters (CommonMark: any ASCII punctuation
    may be backslash-escaped). Escapes do not stop GFM's autolinks of bare URLs and e-mail addresses
    (found in the text after parsing), so an invisible WORD JOINER splits `http://`, `www.` and `@`.
    Newlines become Markdown line breaks."""
    escaped = _MD_SPECIAL.sub(r"\\\1", str(text))
    escaped = _AUTOLINK.sub(lambda m: _JOINER.join(g for g in m.groups() if g is not None), escaped)
    return escaped.replace("\n", "  \n")


def plain(text: object, limit: int = 300) -> str:
    """One line of untrusted text for a label or caption: control characters removed, whitespace
    collapsed, at most `limit` characters (an ellipsis says it was cut)."""
    cleaned = "".join(" " if unicodedata.category(c).startswith("C") else c for c in str(text))
    cleaned = re.sub(r"\s+", " ", cleaned).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def hub_image_url(url: str | None) -> str | None:
    """`url` if the visitor's browser may load it: an http(s) URL on the Hub the Space talks to
    (HF_ENDPOINT); None for any other host, scheme or a URL with credentials."""
    from sd35hub.access import hub_endpoint

    if not url:
        return None
    try:
        parts, hub = urlsplit(url), urlsplit(hub_endpoint())
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or parts.username or parts.password:
        return None
    if (parts.scheme, parts.netloc.lower()) != (hub.scheme, hub.netloc.lower()):
        return None
    if any(segment == ".." for segment in parts.path.split("/")):
        return None
    return url


def clean_trigger_words(words: list[str]) -> tuple[list[str], int]:
    """(kept, ignored): each word as one plain line; words longer than MAX_TRIGGER_CHARS, empty ones
    and those past MAX_TRIGGER_WORDS are ignored. They stay text: nothing ever parses them as tags."""
    kept: list[str] = []
    ignored = 0
    for word in words:
        word = plain(word, limit=10 * MAX_TRIGGER_CHARS)
        if not word or len(word) > MAX_TRIGGER_CHARS or len(kept) >= MAX_TRIGGER_WORDS:
            if word:
                ignored += 1
            continue
        if word not in kept:
            kept.append(word)
    return kept, ignored


def scrub_paths(text: str) -> str:
    """Server paths in a message -> their last component ('/srv/.cache/hub/.../x.safetensors' -> 'x.safetensors')."""

    def last(match: re.Match[str]) -> str:
        name = match.group(0).rstrip("/").rsplit("/", 1)[-1]
        return name or "…"

    return _PATH.sub(last, text)


PASTE_HINT = "Paste a Hub id like 'owner/my-sd35-lora' or its https://huggingface.co/owner/my-sd35-lora URL."
OUT_OF_MEMORY = (
    "Out of GPU memory for this image. Try a smaller size, fewer adapters or fewer steps, then generate again."
)


def adapter_source_message(exc: BaseException, base_labels: Mapping[str, str] | None = None) -> str | None:
    """A library adapter-source refusal (sd35hub.hub.sources) as a visitor reads it, or None for any other
    error. ``base_labels``: the Space's base ids -> their names ("SD3.5 Large")."""
    from sd35hub.errors import AdapterBaseMismatchError, AdapterSourceError, AdapterTooLargeError

    if isinstance(exc, AdapterSourceError):
        if exc.reason == "not_hub_url":
            return f"{exc.source!r} is not a Hub model URL. {PASTE_HINT}"
        if exc.reason == "not_repo_id":
            return f"{exc.source!r} is not a Hub repo id (local paths are not accepted here). {PASTE_HINT}"
        if exc.reason == "invalid_repo_id":
            return f"{exc.source!r} is not a valid Hub repo id. {PASTE_HINT}"
        if exc.reason == "not_safetensors":
            return f"{exc.filename} is not a .safetensors file; only safetensors adapters are loaded here."
        if exc.reason == "no_such_file":
            return f"{exc.repo_id} has no file {exc.filename!r}. Check the name, or paste the repo id alone."
        return None
    if isinstance(exc, AdapterBaseMismatchError):
        label = (base_labels or {}).get(exc.expected_base, exc.expected_base)
        return (
            f"{exc.repo_id} is an adapter for {exc.declared_base}, but this Space is running {label} "
            f"({exc.expected_base}). Pick an adapter made for {label} (the search lists only those), "
            "or switch the base model in the sidebar."
        )
    if isinstance(exc, AdapterTooLargeError):
        return (
            f"{exc.name} is {exc.size_bytes / 1024**2:,.1f} MB, over this Space's limit of "
            f"{exc.max_bytes / 1024**2:,.1f} MB for one adapter: it is probably a full model, not a LoRA. "
            "Pick another adapter."
        )
    return None


def visitor_message(
    exc: BaseException,
    token: str | None = None,
    *,
    loading_base: bool = False,
    base_labels: Mapping[str, str] | None = None,
) -> str:
    """One message for a visitor, as plain text (render it with md_text). sd35hub errors say their fix; an
    OS or network failure is first turned into the typed error it stands for (sd35hub.failures.typed_error,
    as in the CLI and the notebook); the adapter-source refusals are worded for a visitor
    (adapter_source_message); configuration problems are listed without developer wording; a base the Space cannot load is the operator's problem (logged
    with the operator's instructions); anything else is reported without a traceback. Tokens and server
    paths are removed. Every message also goes to the server log."""
    from sd35hub.errors import (
        ConfigError,
        LicenseNotAcceptedError,
        NotLoggedInError,
        RepoNotFoundError,
        Sd35HubError,
    )
    from sd35hub.failures import typed_error
    from sd35hub.redact import redact_text

    exc = typed_error(exc)  # a full disk, an unwritable path, the Hub unreachable: their typed message and fix
    worded = adapter_source_message(exc, base_labels)
    if worded is not None:
        text = worded
    elif isinstance(exc, ConfigError):
        problems = [p[:1].upper() + p[1:] for p in exc.problems]
        text = problems[0] if len(problems) == 1 else "Please fix:\n" + "\n".join(f"- {p}" for p in problems)
    elif loading_base and isinstance(exc, LicenseNotAcceptedError | NotLoggedInError | RepoNotFoundError):
        log.error("the Space cannot load its base model: %s", exc.message)
        text = (
            "This Space cannot load its base model right now (its owner has to finish setting it up). "
            "Please try again later."
        )
    elif isinstance(exc, Sd35HubError):
        text = exc.message
    elif type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA / MPS)
        text = OUT_OF_MEMORY
    else:
        log.exception("unexpected error in the Space", exc_info=exc)
        text = (
            f"Something went wrong ({type(exc).__name__}). Try again; if it persists, tell the Space owner."
        )
    text = scrub_paths(redact_text(text, [token] if token else None))
    log.warning("shown to a visitor: %s", text)
    return text
