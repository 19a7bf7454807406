"""Fetch, list and publish SD3.5 LoRA adapters on the Hub (huggingface_hub only).

- ``download_adapter``: size-checked download of that one file (metadata first, then the bytes).
- ``list_adapters``: discovery by ``base_model:adapter:<base>``, with trigger words and preview.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35hub.access import hub_endpoint, hub_errors
from sd35hub.adapters.files import PICKLE_SUFFIXES, is_checkpoint_path, pick_adapter_file
from sd35hub.errors import AdapterError, AdapterTooLargeError, UnsafeFileError

logger = logging.getLogger(__name__)

# The file diffusers' save_lora_weights writes and load_lora_weights looks for first.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
SD35_BASE_MODELS = (
    "stabilityai/stable-diffusion-3.5-large",
    "stabilityai/stable-diffusion-3.5-medium",
    "stabilityai/stable-diffusion-3.5-large-turbo",
)


def download_adapter(
    repo_id: str,
    *,
    filename: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    max_bytes: int | None = None,
) -> Path:
    """Download one adapter file from ``repo_id`` into the HF cache and return its local path.

    The file is chosen with ``pick_adapter_file`` unless ``filename`` is given. Its size is read from
    the repo metadata first: files larger than ``max_bytes`` are refused before any byte is fetched,
    and so are pickled files. Errors: RepoNotFoundError, LicenseNotAcceptedError, NotLoggedInError,
    UnsafeFileError, AdapterError (missing file / too large), HubRequestError.
    """
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(token=token)
    with hub_errors(repo_id, token=token, what=f"downloading {repo_id}", revision=revision):
        if filename is not None and filename.lower().endswith(PICKLE_SUFFIXES):
            raise UnsafeFileError(
                f"{filename} in {repo_id} is a pickled file; sd35hub only loads .safetensors adapters."
            )
        # One request for the file list and sizes (not paginated: a Hub that never answers times out once).
        siblings = api.model_info(repo_id, revision=revision, files_metadata=True, token=token).siblings or []
        if filename is None:
            filename = pick_adapter_file([s.rfilename for s in siblings])
        sizes = [s.size for s in siblings if s.rfilename == filename]
        if not sizes:
            raise AdapterError(
                f"{repo_id} has no file {filename!r}"
                f"{f' at revision {revision!r}' if revision else ''}. Check the name with `hf download --dry-run` "
                "or leave the file name out to let sd35hub pick the adapter."
            )
        size = sizes[0]
        if max_bytes is not None and size is not None and size > max_bytes:
            raise AdapterTooLargeError(f"{repo_id}/{filename}", size, max_bytes)
        path = hf_hub_download(repo_id, filename, revision=revision, token=token)
    return Path(path)


@dataclass(frozen=True)
class AdapterInfo:
    """One published adapter, as discovery shows it."""

    repo_id: str
    base_model: str | None
    adapter_file: str
    trigger_words: list[str] = field(default_factory=list)
    preview_url: str | None = None  # absolute URL of an image, or None
    likes: int = 0
    downloads: int = 0
    license: str | None = None
    license_name: str | None = None
    files: tuple[str, ...] = ()  # every file of the repo (for explicit owner/repo/file.safetensors sources)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    return [str(item) for item in value if str(item).strip()]


def _file_url(repo_id: str, path: str, revision: str = "main") -> str:
    if path.startswith(("http://", "https://")):
        return path
    return f"{hub_endpoint()}/{repo_id}/resolve/{revision}/{path.lstrip('/')}"


def _preview(repo_id: str, card_data: dict[str, Any], filenames: list[str]) -> str | None:
    """The card widget's first image output, else the first image file (images/ first)."""
    for entry in card_data.get("widget") or []:
        output = entry.get("output") if isinstance(entry, dict) else None
        url = output.get("url") if isinstance(output, dict) else None
        if url:
            return _file_url(repo_id, str(url))
    images = [name for name in filenames if name.lower().endswith(IMAGE_SUFFIXES) and not is_checkpoint_path(name)]
    if not images:
        return None
    images.sort(key=lambda name: (not name.startswith("images/"), "loss" in name.lower(), name))
    return _file_url(repo_id, images[0])


def _card_data(api: Any, repo_id: str, listed: Any, token: str | bool | None) -> dict[str, Any]:
    """Card metadata from the listing, or by reading README.md when the listing has none."""
    if listed is not None:
        return listed.to_dict() if hasattr(listed, "to_dict") else dict(listed)
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return ModelCard.load(repo_id, token=token).data.to_dict()
    except EntryNotFoundError:
        return {}


def list_adapters(
    base_model: str | None = None,
    *,
    author: str | None = None,
    search: str | None = None,
    limit: int = 50,
    token: str | bool | None = None,
) -> list[AdapterInfo]:
    """Published LoRA adapters of ``base_model`` (all SD3.5 bases when None), most downloaded first.

    Repos with no usable .safetensors file (e.g. only pickled weights) are skipped and logged.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    bases = [base_model] if base_model else list(SD35_BASE_MODELS)
    found: dict[str, AdapterInfo] = {}
    for base in bases:
        with hub_errors(base, token=token, what="listing adapters"):
            models = list(
                api.list_models(
                    filter=f"base_model:adapter:{base}", author=author, search=search, limit=limit,
                    full=True, cardData=True, token=token,
                )
            )
        for model in models:
            if model.id in found:
                continue
            with hub_errors(model.id, token=token, what="listing adapters"):
                filenames = [s.rfilename for s in model.siblings or []] or api.list_repo_files(model.id, token=token)
                card = _card_data(api, model.id, model.card_data, token)
            try:
                found[model.id] = _adapter_info(model, card, filenames, fallback_base=base)
            except AdapterError as exc:
                logger.info("skipping %s: %s", model.id, exc)
    adapters = sorted(found.values(), key=lambda info: (-info.downloads, -info.likes, info.repo_id))
    return adapters[:limit]


def _adapter_info(model: Any, card: dict[str, Any], filenames: list[str], *, fallback_base: str | None) -> AdapterInfo:
    """AdapterInfo from a model listing/info entry and its card; AdapterError when no usable file."""
    adapter_file = pick_adapter_file(filenames)
    declared = _as_list(card.get("base_model"))
    return AdapterInfo(
        repo_id=model.id,
        base_model=declared[0] if declared else fallback_base,
        adapter_file=adapter_file,
        trigger_words=_as_list(card.get("instance_prompt")) or _as_list(card.get("trigger_words")),
        preview_url=_preview(model.id, card, filenames),
        likes=getattr(model, "likes", 0) or 0,
        downloads=getattr(model, "downloads", 0) or 0,
        license=card.get("license"),
        license_name=card.get("license_name"),
        files=tuple(filenames),
    )


def adapter_info(repo_id: str, *, revision: str | None = None, token: str | bool | None = None) -> AdapterInfo:
    """One adapter repo's metadata (card, trigger words, preview, the file to load); no weights read.

    Raises RepoNotFoundError / LicenseNotAcceptedError (via the Hub), AdapterError when the repo has
    no usable .safetensors file (UnsafeFileError for pickle-only repos)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with hub_errors(repo_id, token=token, what=f"reading the adapter {repo_id}"):
        model = api.model_info(repo_id, revision=revision, token=token)
    filenames = [sibling.rfilename for sibling in model.siblings or []]
    card = model.card_data.to_dict() if model.card_data is not None else {}
    return _adapter_info(model, card, filenames, fallback_base=None)
