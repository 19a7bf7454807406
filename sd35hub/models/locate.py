"""Where a base model is: resolve a name ("tiny", a local diffusers folder, a Hub id) to a ModelRef, find or
download the folder holding the components a phase needs (model_dir: the access check first, only the
subfolders asked for, never pickled weights), and word the libraries' failures while reading it (_loading).

The lowest piece of models/: models.load (whole pipelines, the transformer) and models.components (one
text encoder, the VAE, a tokenizer) both build on it, so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd35hub.errors import HubRequestError, ModelLoadError, OutOfMemoryError, RepoNotFoundError, Sd35HubError

TINY = "tiny"
TEXT_COMPONENTS = (
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
)
ALL_COMPONENTS = ("transformer", "vae", "scheduler", *TEXT_COMPONENTS)
# Files a component folder may need. Pickled weights (.bin/.pt/.ckpt) are never fetched.
_COMPONENT_FILES = ("*.json", "*.safetensors", "*.txt", "*.model")
_VALID_ID_HELP = (
    "A model is 'tiny', a local diffusers folder (with model_index.json), or a Hub id like "
    "'stabilityai/stable-diffusion-3.5-medium' (owner/name: letters, digits, '-', '_', '.')."
)


@dataclass(frozen=True)
class ModelRef:
    """Where a base model lives. `local_path` is set for "tiny" and local folders, None for Hub ids."""

    name: str
    is_hub: bool
    local_path: Path | None
    revision: str | None = None

    @property
    def is_tiny(self) -> bool:
        return self.name == TINY


def resolve_model(name: str, revision: str | None = None) -> ModelRef:
    """Classify `name`; builds the tiny model on first use. Raises ModelLoadError on a bad name."""
    name = (name or "").strip()
    if not name:
        raise ModelLoadError(f"No model given. {_VALID_ID_HELP}")
    if name == TINY:
        from sd35hub.models.tiny import tiny_model_path

        return ModelRef(name=TINY, is_hub=False, local_path=tiny_model_path(), revision=None)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder but not a diffusers model: it has no model_index.json. Save the "
                "pipeline with `pipe.save_pretrained(folder)` or download the diffusers-format repo."
            )
        return ModelRef(name=name, is_hub=False, local_path=path.resolve(), revision=None)
    if path.is_file():
        raise ModelLoadError(
            f"{name} is a single file. sd35hub loads diffusers-format models: pass the Hub id it comes "
            "from (e.g. stabilityai/stable-diffusion-3.5-large) or a folder saved with save_pretrained."
        )
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(f"{name!r} is neither an existing folder nor a Hub id. {_VALID_ID_HELP}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        raise ModelLoadError(f"{name!r} is not a valid Hub id. {_VALID_ID_HELP}") from exc
    return ModelRef(name=name, is_hub=True, local_path=None, revision=revision)


def _allow_patterns(components: Iterable[str]) -> list[str]:
    patterns = ["model_index.json"]
    for component in components:
        patterns += [f"{component}/{pattern}" for pattern in _COMPONENT_FILES]
    return patterns


def model_dir(
    ref: ModelRef, components: Iterable[str] = ALL_COMPONENTS, *, configs_only: bool = False
) -> Path:
    """A local folder holding (at least) `components` of `ref`; downloads what a Hub model lacks.

    `configs_only` fetches just the JSON files (model_info uses it: a few KB, no weights).
    """
    if ref.local_path is not None:
        return ref.local_path
    from huggingface_hub import constants, snapshot_download

    from sd35hub.access import check_read_access, hub_errors

    # License / token / existence first: a clear message instead of a failed 20 GB download.
    # Offline (HF_HUB_OFFLINE=1) there is no Hub to ask: snapshot_download serves the local cache.
    try:
        if not constants.HF_HUB_OFFLINE:
            check_read_access(ref.name, revision=ref.revision)
    except HubRequestError:  # the Hub is down or unreachable (5xx, 429, refused, timeout): a complete
        cached = cached_model_dir(ref, components)  # cached copy still loads (the Space restarting)
        if cached is None:
            raise
        import logging

        logging.getLogger(__name__).warning(
            "The Hub did not answer while checking access to %s; loading the cached snapshot %s instead",
            ref.name, cached.name,
        )  # fmt: skip
        return cached
    except RepoNotFoundError as exc:
        if ref.revision is not None:  # keep the "revision does not exist" explanation
            raise
        raise RepoNotFoundError(
            ref.name, "model", f"(If you meant a local folder: ./{ref.name} does not exist.)"
        ) from exc
    patterns = _allow_patterns(components)
    if configs_only:
        patterns = [p for p in patterns if p.endswith(".json")]
    with hub_errors(ref.name, what=f"downloading {ref.name}"):
        folder = snapshot_download(ref.name, revision=ref.revision, allow_patterns=patterns)
    return Path(folder)


def cached_model_dir(ref: ModelRef, components: Iterable[str] = ALL_COMPONENTS) -> Path | None:
    """The cached snapshot of a Hub model's `components` (huggingface_hub's local-files-only resolution of
    the revision, which also checks the cached files are complete); None when absent or incomplete."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            ref.name, revision=ref.revision, allow_patterns=_allow_patterns(components), local_files_only=True
        )
    except (LocalEntryNotFoundError, OSError, ValueError):  # not cached / incomplete (IncompleteSnapshotError)
        return None
    return Path(folder) if (Path(folder) / "model_index.json").is_file() else None


class _loading:
    """Turn library failures while reading a model folder into ModelLoadError / OutOfMemoryError."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name, self.folder = name, folder

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, Sd35HubError):
            return False
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            raise OutOfMemoryError(
                f"Out of GPU memory while loading {self.name}. Try --dtype bf16, --quantize nf4, "
                "--drop-t5, or a smaller variant (stabilityai/stable-diffusion-3.5-medium)."
            ) from exc
        if isinstance(exc, (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError)):
            raise ModelLoadError(
                f"Could not load {self.name} from {self.folder}: {type(exc).__name__}: {exc}. "
                "Check that the folder is a complete SD3/SD3.5 diffusers model (re-download it if a "
                "file is truncated), and that diffusers>=0.42 and transformers>=5 are installed."
            ) from exc
        return False
