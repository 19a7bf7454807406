"""Logic behind the Streamlit Space (space/app.py is UI only): which bases it offers, which adapter
sources it accepts, how a user's selections become a GenerationRequest, and how errors read.

Safety rules enforced here (the Space serves strangers):
* adapters come from the Hub only (validated `owner/repo` ids or huggingface.co URLs) or from the
  built-in tiny samples (`sample:<name>`): never a local path typed by a user, in a field or in a
  `<lora:...>` prompt tag;
* only `.safetensors` files, at most `MAX_ADAPTER_BYTES`, and an adapter whose card names another
  base model than the running one is refused before anything is downloaded;
* at most `MAX_ADAPTERS` per request, `MAX_CACHED_ADAPTERS` loaded at once, prompts of at most
  `MAX_PROMPT_CHARS`, steps and size bounded;
* tokens are passed to huggingface_hub and never put in a message (sd35hub.redact);
* a visitor's Hub calls use the visitor's own token or none (`token=user_token or False`): huggingface_hub
  reads token=None as "use HF_TOKEN", which here is the Space owner's secret and would show visitors the
  owner's private adapters. Only the base model is read with the Space's token;
* the shared engine treats a local path as an adapter only inside the sample and download folders
  (BlendEngine(local_roots=...)), so a path that slips past the checks above still reads nothing else.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35hub.errors import AdapterError, AdapterIncompatibleError, ConfigError, OutOfMemoryError, Sd35HubError
from sd35hub.space_samples import SAMPLE_PREFIX, SAMPLES, ensure_sample_adapters, sample_name

if TYPE_CHECKING:  # pragma: no cover
    from sd35hub.blend import BlendEngine
    from sd35hub.blend_request import GenerationRequest, GenerationResult
    from sd35hub.hub import AdapterInfo

log = logging.getLogger(__name__)

SPACE_MODEL_ENV = "SD35HUB_SPACE_MODEL"  # comma-separated keys of BASES or model ids; unset: auto
TINY_HUB_BASE = "sd35hub/tiny-sd35"  # the base_model adapters of the tiny model declare in their cards
MAX_ADAPTERS = 4  # per request
MAX_CACHED_ADAPTERS = 8  # loaded in the shared transformer at once (LRU)
MAX_ADAPTER_BYTES = int(os.environ.get("SD35HUB_SPACE_MAX_ADAPTER_MB", "1024")) * 1024**2
MAX_PROMPT_CHARS = 1000
MAX_STEPS = 80
WEIGHT_RANGE = (-1.0, 2.0)
HISTORY_SIZE = 12  # results kept per session
_URL = re.compile(
    r"^https?://[^/]+/(?:models/)?(?P<repo>[^/?#]+/[^/?#]+)(?:/(?:blob|resolve)/[^/]+/(?P<file>[^?#]+))?"
)


@dataclass(frozen=True)
class BaseChoice:
    """One base model the Space offers."""

    key: str
    label: str
    model: str  # what BlendEngine loads: a Hub id, a local diffusers folder or "tiny"
    hub_base: str  # the base_model adapters declare (discovery filter base_model:adapter:<hub_base>)


BASES: dict[str, BaseChoice] = {
    "large": BaseChoice("large", "SD3.5 Large", "stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-large"),
    "medium": BaseChoice("medium", "SD3.5 Medium", "stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-medium"),
    "turbo": BaseChoice(
        "turbo", "SD3.5 Large Turbo", "stabilityai/stable-diffusion-3.5-large-turbo", "stabilityai/stable-diffusion-3.5-large-turbo"
    ),
    "tiny": BaseChoice("tiny", "tiny (CPU test model)", "tiny", TINY_HUB_BASE),
}  # fmt: skip


def available_bases(setting: str | None = None, *, has_gpu: bool | None = None) -> list[BaseChoice]:
    """Bases to offer: `setting` (default $SD35HUB_SPACE_MODEL) lists keys of BASES or model ids;
    unset, a GPU gets Large, Medium and Large Turbo and a CPU gets the tiny model."""
    setting = os.environ.get(SPACE_MODEL_ENV, "") if setting is None else setting
    names = [name.strip() for name in setting.split(",") if name.strip()]
    if not names:
        if has_gpu is None:
            import torch

            has_gpu = torch.cuda.is_available()
        names = ["large", "medium", "turbo"] if has_gpu else ["tiny"]
    return [BASES.get(name) or BaseChoice(name, name, name, name) for name in names]


def visitor_token(token: str | None) -> str | bool:
    """The token for Hub calls made on a visitor's behalf: theirs, or False (anonymous), never None
    (None would make huggingface_hub use the Space owner's HF_TOKEN)."""
    return (token or "").strip() or False


def engine_local_roots() -> tuple[Path, ...]:
    """Folders the shared engine may read local adapter files from: the built-in samples, and the HF
    cache where engine_source puts adapters fetched with a visitor's own token."""
    from huggingface_hub import constants

    from sd35hub.space_samples import samples_dir

    return (samples_dir(), Path(constants.HF_HUB_CACHE))


def load_engine(model: str) -> BlendEngine:
    """The shared engine of one base (space/app.py caches it with st.cache_resource). The gated base is
    read with the Space's own token (the HF_TOKEN secret, resolved by huggingface_hub in the loader);
    adapters are downloaded anonymously (token=False), since they are fetched for visitors."""
    from sd35hub.blend import BlendEngine

    offload = os.environ.get("SD35HUB_SPACE_CPU_OFFLOAD", "").lower() in ("1", "true", "yes")
    return BlendEngine(
        model,
        max_cached_adapters=MAX_CACHED_ADAPTERS,
        max_adapters_per_request=MAX_ADAPTERS,
        max_adapter_bytes=MAX_ADAPTER_BYTES,
        cpu_offload=offload,
        token=False,
        local_roots=engine_local_roots(),
    )


def size_presets(native_resolution: int) -> dict[str, tuple[int, int]]:
    """'W×H' -> (width, height) from the training buckets at 1/4, 1/2, 3/4 and 1× the native side."""
    from sd35hub.data.buckets import bucket_set

    presets: dict[str, tuple[int, int]] = {}
    for side in sorted({native_resolution * k // 4 // 64 * 64 for k in (1, 2, 3, 4)} - {0}):
        for width, height in bucket_set(side):
            presets.setdefault(f"{width}×{height}", (width, height))
    return presets


def default_size(native_resolution: int, model: str) -> str:
    side = 128 if model == "tiny" else native_resolution  # tiny: quick on a CPU
    return f"{side}×{side}"


def new_seed() -> int:
    return secrets.randbelow(2**31)


# --- adapters ------------------------------------------------------------------------------------


@dataclass
class AdapterChoice:
    """One adapter in a user's blend (kept in st.session_state, never shared)."""

    source: str  # "owner/repo", "owner/repo/file.safetensors" or "sample:<name>"
    trigger_words: list[str] = field(default_factory=list)
    preview_url: str | None = None
    base_model: str | None = None
    weight: float = 1.0
    use_trigger_words: bool = True


def parse_adapter_source(text: str) -> str:
    """A pasted repo id or URL -> 'owner/repo' or 'owner/repo/file.safetensors'. Local paths, other file
    types and malformed ids raise AdapterError with what to type instead."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = (text or "").strip()
    if sample_name(text):
        return text
    hint = "Paste a Hub id like 'owner/my-sd35-lora' or its https://huggingface.co/owner/my-sd35-lora URL."
    file = None
    if text.startswith(("http://", "https://")):
        match = _URL.match(text)
        if match is None:
            raise AdapterError(f"{text[:80]!r} is not a Hub model URL. {hint}")
        text, file = match.group("repo"), match.group("file")
    if not text or text.startswith((".", "/", "~", "\\")) or ".." in text or text.count("/") != 1:
        raise AdapterError(f"{text[:80]!r} is not a Hub repo id (local paths are not accepted here). {hint}")
    try:
        validate_repo_id(text)
    except HFValidationError as exc:
        raise AdapterError(f"{text[:80]!r} is not a valid Hub repo id. {hint}") from exc
    if file is not None:
        if not file.lower().endswith(".safetensors"):
            raise AdapterError(
                f"{file} is not a .safetensors file; the Space only loads safetensors adapters."
            )
        return f"{text}/{file}"
    return text


def search_adapters(
    base: BaseChoice, query: str | None = None, *, token: str | None = None, limit: int = 12
) -> list[AdapterInfo]:
    """Published adapters of the running base (sd35hub.hub.list_adapters). An unreachable Hub is
    detected with one short connection attempt first, instead of the client's ~30 s of retries."""
    import socket
    from urllib.parse import urlsplit

    from sd35hub.access import hub_endpoint
    from sd35hub.errors import HubRequestError
    from sd35hub.hub import list_adapters

    endpoint = urlsplit(hub_endpoint())
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "", port), timeout=3).close()
    except OSError as exc:
        raise HubRequestError(
            f"Could not reach the Hub at {hub_endpoint()} ({exc.__class__.__name__}). Check the network "
            "(and HF_ENDPOINT); with the tiny model, the local sample adapters work offline."
        ) from exc
    return list_adapters(
        base.hub_base, search=(query or "").strip() or None, limit=limit, token=visitor_token(token)
    )


def choice_from_info(info: AdapterInfo) -> AdapterChoice:
    """A search result as a blend slot."""
    return AdapterChoice(
        source=info.repo_id,
        trigger_words=list(info.trigger_words),
        preview_url=info.preview_url,
        base_model=info.base_model,
    )


def lookup_adapter(source: str, base: BaseChoice, *, token: str | None = None) -> AdapterChoice:
    """Check a pasted adapter before it joins a blend: it exists, has a .safetensors adapter file, and
    its card does not name another base. Reads metadata only (no weights)."""
    from sd35hub.hub import adapter_info

    source = parse_adapter_source(source)
    name = sample_name(source)
    if name is not None:
        return sample_choice(name, base)
    repo_id = "/".join(source.split("/")[:2])
    explicit = source[len(repo_id) + 1 :] or None
    info = adapter_info(repo_id, token=visitor_token(token))  # refuses pickle-only or weightless repos
    if explicit is not None and explicit not in info.files:
        raise AdapterError(f"{repo_id} has no file {explicit!r}. Check the name, or paste the repo id alone.")
    declared = info.base_model
    if declared and declared != base.hub_base:
        raise AdapterIncompatibleError(
            f"{repo_id} is an adapter for {declared}, but this Space is running {base.label} "
            f"({base.hub_base}). Pick an adapter made for {base.label} (the search lists only those), "
            "or switch the base model in the sidebar."
        )
    return AdapterChoice(
        source=source,
        trigger_words=info.trigger_words,
        preview_url=info.preview_url,
        base_model=declared,
    )


def adapters_from_query(
    values: list[str], base: BaseChoice, *, token: str | None = None
) -> tuple[list[AdapterChoice], list[str]]:
    """Preselected adapters from the Space URL, `?adapter=owner/repo:0.8&adapter=owner/other` (the
    convention the notebook's Space link uses; weight 1.0 when none is given): (choices, error messages)."""
    from sd35hub.blend_request import split_source_weight

    choices: list[AdapterChoice] = []
    problems: list[str] = []
    for value in values[:MAX_ADAPTERS]:
        try:
            ref = split_source_weight(value, f"?adapter={value[:80]}")
            choice = lookup_adapter(ref.source, base, token=token)
            choice.weight = min(max(ref.weight, WEIGHT_RANGE[0]), WEIGHT_RANGE[1])
            if all(existing.source != choice.source for existing in choices):
                choices.append(choice)
        except Sd35HubError as exc:
            problems.append(friendly_error(exc, token))
    if len(values) > MAX_ADAPTERS:
        problems.append(f"The link names {len(values)} adapters; the first {MAX_ADAPTERS} were kept.")
    return choices, problems


def sample_choice(name: str, base: BaseChoice) -> AdapterChoice:
    if base.model != "tiny":
        raise AdapterIncompatibleError(
            f"The sample adapter {name} is made for the tiny test model; this Space is running {base.label}."
        )
    spec = next(spec for spec in SAMPLES if spec.name == name)
    return AdapterChoice(
        source=f"{SAMPLE_PREFIX}{name}", trigger_words=[spec.trigger_word], base_model=TINY_HUB_BASE
    )


def sample_choices(base: BaseChoice) -> list[AdapterChoice]:
    """The built-in sample adapters (built into $SD35HUB_CACHE on first use)."""
    ensure_sample_adapters()
    return [sample_choice(spec.name, base) for spec in SAMPLES]


# --- requests ------------------------------------------------------------------------------------


@dataclass
class GenerationForm:
    """What the user set in the form (all plain values, from st.session_state)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 4
    guidance_scale: float = 4.5
    scheduler: str = "euler"
    width: int = 128
    height: int = 128
    seed: int = 0
    compare_base: bool = False


def build_request(
    form: GenerationForm, adapters: list[AdapterChoice], *, token: str | None = None
) -> GenerationRequest:
    """The engine request for a form and blend, after every Space limit is checked. Trigger words of the
    adapters whose toggle is on are written into the prompt (so the snippet reproduces it)."""
    from sd35hub.blend_request import AdapterRef, GenerationRequest, parse_prompt, with_trigger_words

    problems = []
    if not form.prompt.strip():
        problems.append("the prompt is empty: describe the image you want")
    if len(form.prompt) > MAX_PROMPT_CHARS or len(form.negative_prompt) > MAX_PROMPT_CHARS:
        problems.append(f"prompts are limited to {MAX_PROMPT_CHARS} characters")
    if len(adapters) > MAX_ADAPTERS:
        problems.append(f"{len(adapters)} adapters selected; at most {MAX_ADAPTERS} per image: remove some")
    if not 1 <= form.steps <= MAX_STEPS:
        problems.append(f"steps must be between 1 and {MAX_STEPS}")
    for choice in adapters:
        if not WEIGHT_RANGE[0] <= choice.weight <= WEIGHT_RANGE[1]:
            problems.append(
                f"the weight of {choice.source} must be between {WEIGHT_RANGE[0]} and {WEIGHT_RANGE[1]}"
            )
    _, tagged = parse_prompt(form.prompt)  # PromptSyntaxError for malformed tags
    for ref in tagged:
        parse_adapter_source(ref.source)  # a <lora:...> tag may name a Hub id, never a local path
    if problems:
        raise ConfigError(problems)
    words = [w for choice in adapters if choice.use_trigger_words for w in choice.trigger_words]
    return GenerationRequest(
        prompt=with_trigger_words(form.prompt.strip(), words),
        negative_prompt=form.negative_prompt.strip(),
        adapters=[AdapterRef(engine_source(choice.source, token), choice.weight) for choice in adapters],
        steps=form.steps,
        guidance_scale=form.guidance_scale,
        width=form.width,
        height=form.height,
        seed=form.seed,
        scheduler=form.scheduler,
        insert_trigger_words=False,  # done above, per adapter
        compare_base=form.compare_base,
    )


def engine_source(source: str, token: str | None) -> str:
    """What the shared engine loads for a choice: the Hub id (downloaded anonymously by the engine), or a
    file path when the Space made the file itself (samples) or the user's own token fetched it (so the
    engine's source cache never hands a file fetched with one visitor's token to another by repo id)."""
    name = sample_name(source)
    if name is not None:
        return str(ensure_sample_adapters()[name])
    if token:
        from sd35hub.blend import fetch_adapter_source

        return str(fetch_adapter_source(source, token=visitor_token(token), max_bytes=MAX_ADAPTER_BYTES)[0])
    return source


def generate(engine: BlendEngine, request: GenerationRequest) -> GenerationResult:
    """engine.generate with out-of-memory turned into a typed error (and the GPU cache released)."""
    import torch

    try:
        return engine.generate(request)
    except torch.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise out_of_memory_error() from exc


def out_of_memory_error() -> OutOfMemoryError:
    return OutOfMemoryError(
        "Out of GPU memory for this image. Try a smaller size preset, fewer adapters or fewer images, "
        "or run the Space on larger hardware (see space/README.md); then generate again."
    )


def friendly_error(exc: BaseException, token: str | None = None) -> str:
    """One message for a person: sd35hub errors say their fix; anything else is reported without a
    traceback (the log has it). Tokens are redacted."""
    from sd35hub.redact import redact_text

    if isinstance(exc, Sd35HubError):
        text = exc.message
    elif type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA / MPS)
        text = out_of_memory_error().message
    else:
        log.exception("unexpected error in the Space", exc_info=exc)
        text = f"Something went wrong ({type(exc).__name__}: {str(exc)[:300]}). Try again; if it persists, report it."
    return redact_text(text, [token] if token else None)


def png_bytes(image: Any, params: dict[str, Any]) -> bytes:
    """The PNG a user downloads: the image with every parameter in text chunks (sd35hub.pngmeta)."""
    from sd35hub.pngmeta import save_png

    with tempfile.TemporaryDirectory(prefix="sd35hub-space-") as folder:
        return save_png(image, Path(folder) / "image.png", params).read_bytes()
