"""What the Space's page shows, computed outside Streamlit (so it is unit-tested): adapter cards, blend
labels, the share link, history entries and the per-visitor rate limit. All text returned here is plain
(untrusted parts included): the page renders it through sd35hub.frontends.space.text.md_text."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from sd35hub.errors import ConfigError
from sd35hub.frontends.space.text import clean_trigger_words, hub_image_url, plain

if TYPE_CHECKING:  # pragma: no cover
    from sd35hub.blend.request import GenerationResult
    from sd35hub.hub.discovery import AdapterInfo

SEARCH_LIMIT = 48  # adapters fetched per search; the page shows them 6 at a time
MAX_IMAGES_PER_WINDOW = int(os.environ.get("SD35HUB_SPACE_IMAGES_PER_10MIN", "30"))  # per visitor session
MAX_IMAGES_PER_IP = int(os.environ.get("SD35HUB_SPACE_IMAGES_PER_10MIN_PER_IP", "60"))  # all sessions of an address
RATE_WINDOW_S = 600
PROXY_HOPS_ENV = "SD35HUB_SPACE_PROXY_HOPS"  # proxies in front of the app that append to X-Forwarded-For


@dataclass(frozen=True)
class AdapterCard:
    repo_id: str
    page_url: str | None  # the adapter's Hub page (None when the id is not a valid repo id)
    image_url: str | None  # preview served by the Hub, else None
    stats: str  # "by owner · ♥ 3 · ↓ 120 · license openrail"
    trigger_text: str


def adapter_card(info: AdapterInfo) -> AdapterCard:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from sd35hub.access import hub_endpoint

    try:
        validate_repo_id(info.repo_id)
        page_url: str | None = f"{hub_endpoint()}/{info.repo_id}"
    except HFValidationError:
        page_url = None
    license_text = info.license_name if info.license == "other" and info.license_name else info.license
    stats = [f"by {info.repo_id.split('/')[0]}", f"♥ {info.likes:,}", f"↓ {info.downloads:,}"]
    stats.append(f"license {plain(license_text, 60)}" if license_text else "no license given")
    words, ignored = clean_trigger_words(list(info.trigger_words))
    trigger = "Trigger words: " + (", ".join(words) or "none")
    if ignored:
        trigger += f" ({ignored} over-long or extra ignored)"
    return AdapterCard(info.repo_id, page_url, hub_image_url(info.preview_url), " · ".join(stats), trigger)


def blend_label(adapters: list[tuple[str, float]]) -> str:
    return " + ".join(f"{source} × {weight:g}" for source, weight in adapters) or "base model"


def share_link(page_url: str | None, values: list[str]) -> str:
    """The page's address with `?adapter=owner/repo:0.8&...` for this blend (the query the Space reads)."""
    parts = urlsplit(page_url or "")
    return urlunsplit(
        (parts.scheme, parts.netloc, parts.path, urlencode([("adapter", v) for v in values]), "")
    )


def history_entry(result: GenerationResult) -> dict[str, Any]:
    """One result kept in the visitor's history: PNGs (parameters inside), what ran, the snippet. The
    label comes from the parameters the engine really used, prompt tags included."""
    from sd35hub.frontends.space.support import png_bytes

    params = result.params
    return {
        "png": png_bytes(result.images[0], params),
        "base_png": png_bytes(result.base_images[0], {**params, "adapters": []})
        if result.base_images
        else None,
        "params": params,
        "label": blend_label([(a["source"], a["weight"]) for a in params["adapters"]]),
        "snippet": result.diffusers_snippet(),
    }


def check_rate(times: list[float], now: float) -> None:
    """Per-visitor limit: at most MAX_IMAGES_PER_WINDOW images in RATE_WINDOW_S (times: this session's)."""
    times[:] = [t for t in times if now - t < RATE_WINDOW_S]
    if len(times) >= MAX_IMAGES_PER_WINDOW:
        wait = RATE_WINDOW_S - (now - times[0])
        raise ConfigError(
            f"you made {len(times)} images in the last {RATE_WINDOW_S // 60} minutes, this Space's limit per "
            f"visitor: try again in {wait / 60:.0f} minute(s)"
        )


def proxy_hops(environ: Mapping[str, str] | None = None) -> int:
    """How many proxies in front of the app to trust: $SD35HUB_SPACE_PROXY_HOPS, else 1 on Hugging Face
    Spaces (SPACE_ID is set there: the Spaces proxy appends the visitor's address) and 0 elsewhere."""
    environ = os.environ if environ is None else environ
    value = environ.get(PROXY_HOPS_ENV, "").strip()
    if value.isdigit():
        return int(value)
    return 1 if environ.get("SPACE_ID") else 0


def visitor_address(headers: Mapping[str, str], peer: str | None, hops: int) -> str | None:
    """The visitor's IP address for the per-address limit. Each proxy appends the address it received the
    request from to X-Forwarded-For, and anything to the left of that was written by the client, who can
    forge it: so with `hops` trusted proxies the address is the hops-th entry from the right, never the
    first one. With 0 hops (no proxy) the header is ignored and the connection's peer is used. None when
    unknown (then only the per-session limit applies)."""
    if hops <= 0:
        return peer or None
    forwarded = [part.strip() for part in (headers.get("X-Forwarded-For") or "").split(",") if part.strip()]
    return forwarded[-hops] if len(forwarded) >= hops else (peer or None)


class AddressLimiter:
    """At most `limit` images per `window` seconds for each visitor address, across all its sessions (one
    per process: every session shares it). `take` counts an image when it is requested."""

    def __init__(self, limit: int = MAX_IMAGES_PER_IP, window: float = RATE_WINDOW_S) -> None:
        self.limit, self.window = limit, window
        self._times: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def take(self, address: str | None, now: float) -> None:
        if address is None:
            return
        with self._lock:
            for key in [k for k, times in self._times.items() if now - times[-1] >= self.window]:
                del self._times[key]  # forget addresses idle for a whole window (bounded memory)
            times = [t for t in self._times.get(address, []) if now - t < self.window]
            if len(times) >= self.limit:
                wait = self.window - (now - times[0])
                raise ConfigError(
                    f"{len(times)} images were made from your network address in the last "
                    f"{self.window // 60:.0f} minutes, this Space's limit per address: try again in "
                    f"{max(wait, 60) / 60:.0f} minute(s)"
                )
            times.append(now)
            self._times[address] = times


ADDRESS_LIMITER = AddressLimiter()  # process-wide, like the engines
