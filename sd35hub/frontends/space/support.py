"""Logic behind the Streamlit Space (space/app.py is UI only): which bases it offers, which adapter
sources it accepts (the policy itself is sd35hub.hub.sources, for any front end), how a user's selections become a GenerationRequest, and how errors read.

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
* trigger words from cards are text: they join the prompt after the `<lora:...>` tags were taken out
  of what the visitor typed, and the engine is told not to parse the prompt again (parse_prompt_tags);
  every prompt tag goes through lookup_adapter like the blend panel (Hub id, access with the visitor's
  token, base, size) and the same weight range, count and duplicate checks;
* the shared engine reads no local path at all (BlendEngine(local_roots=())): samples are named
  sources, visitors' private adapters are fetched with their token per request (AdapterRef.token), so
  parameters, PNGs and snippets carry Hub ids pinned to a commit, never a server path;
* untrusted text is rendered as text (sd35hub.frontends.space.text.md_text) and preview images only from the Hub.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35hub.errors import AdapterError, AdapterIncompatibleError, ConfigError, OutOfMemoryError, Sd35HubError
from sd35hub.frontends.space.samples import SAMPLE_PREFIX, SAMPLES, ensure_sample_adapters, sample_name
from sd35hub.frontends.space.text import OUT_OF_MEMORY, clean_trigger_words, hub_image_url, visitor_message
from sd35hub.hub.sources import check_hub_adapter, parse_hub_source, visitor_token

if TYPE_CHECKING:  # pragma: no cover
    from sd35hub.blend.engine import BlendEngine
    from sd35hub.blend.request import GenerationRequest, GenerationResult
    from sd35hub.hub.discovery import AdapterInfo

log = logging.getLogger(__name__)

SPACE_MODEL_ENV = "SD35HUB_SPACE_MODEL"  # comma-separated keys of BASES or model ids; unset: auto
TINY_HUB_BASE = "sd35hub/tiny-sd35"  # the base_model adapters of the tiny model declare in their cards
MAX_ADAPTERS = 4  # per request
MAX_CACHED_ADAPTERS = 8  # loaded in the shared transformer at once (LRU)
MAX_ADAPTER_BYTES = int(os.environ.get("SD35HUB_SPACE_MAX_ADAPTER_MB", "1024")) * 1024**2
MAX_PROMPT_CHARS = 1000
MAX_QUERY_CHARS = 200  # search box and each ?adapter= value
MAX_STEPS = 80
WEIGHT_RANGE = (-1.0, 2.0)
HISTORY_SIZE = 12  # results kept per session

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


def sample_file(source: str) -> Path | None:
    """The file of a `sample:<name>` source (BlendEngine(named_sources=...)); None for anything else."""
    name = sample_name(source)
    return ensure_sample_adapters()[name] if name is not None else None


def load_engine(model: str) -> BlendEngine:
    """The shared engine of one base (space/app.py holds it through sd35hub.frontends.space.start.engine). The gated base is
    read with the Space's own token (the HF_TOKEN secret, resolved by huggingface_hub in the loader);
    adapters are downloaded anonymously (token=False), since they are fetched for visitors."""
    from sd35hub.blend.engine import BlendEngine

    offload = os.environ.get("SD35HUB_SPACE_CPU_OFFLOAD", "").lower() in ("1", "true", "yes")
    return BlendEngine(
        model,
        max_cached_adapters=MAX_CACHED_ADAPTERS,
        max_adapters_per_request=MAX_ADAPTERS,
        max_adapter_bytes=MAX_ADAPTER_BYTES,
        cpu_offload=offload,
        token=False,
        local_roots=(),  # no local path is ever an adapter here
        named_sources=sample_file,
        public_model_id=TINY_HUB_BASE if model == "tiny" else None,  # never the server's folder
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
    preview_url: str | None = None  # only a Hub URL (text.hub_image_url)
    base_model: str | None = None
    weight: float = 1.0
    use_trigger_words: bool = True
    ignored_trigger_words: int = 0  # card words dropped as too long / too many


def parse_adapter_source(text: str) -> str:
    """`sample:<name>`, or a pasted Hub id / URL -> 'owner/repo' or 'owner/repo/file.safetensors'
    (sd35hub.hub.sources.parse_hub_source: local paths, other file types and malformed ids are refused)."""
    text = (text or "").strip()
    return text if sample_name(text) else parse_hub_source(text)


def search_adapters(
    base: BaseChoice, query: str | None = None, *, token: str | None = None, limit: int = 12
) -> list[AdapterInfo]:
    """Published adapters of the running base (sd35hub.hub.discovery.list_adapters). An unreachable Hub is
    detected with one short connection attempt first, instead of the client's ~30 s of retries."""
    import socket
    from urllib.parse import urlsplit

    from sd35hub.access import hub_endpoint
    from sd35hub.errors import HubRequestError
    from sd35hub.hub.discovery import list_adapters

    endpoint = urlsplit(hub_endpoint())
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "", port), timeout=3).close()
    except OSError as exc:
        raise HubRequestError(
            f"Could not reach the Hub at {hub_endpoint()} ({exc.__class__.__name__}). Check the network "
            "(and HF_ENDPOINT); with the tiny model, the local sample adapters work offline."
        ) from exc
    query = (query or "").strip()
    if len(query) > MAX_QUERY_CHARS:
        raise ConfigError(f"the search is {len(query)} characters long; at most {MAX_QUERY_CHARS}")
    return list_adapters(base.hub_base, search=query or None, limit=limit, token=visitor_token(token))


def choice_from_info(info: AdapterInfo) -> AdapterChoice:
    """A search result as a blend slot (trigger words bounded, preview only from the Hub)."""
    words, ignored = clean_trigger_words(list(info.trigger_words))
    return AdapterChoice(
        source=info.repo_id,
        trigger_words=words,
        preview_url=hub_image_url(info.preview_url),
        base_model=info.base_model,
        ignored_trigger_words=ignored,
    )


def lookup_adapter(source: str, base: BaseChoice, *, token: str | None = None) -> AdapterChoice:
    """Check a pasted adapter before it joins a blend: it exists, has a .safetensors adapter file, its
    card does not name another base, and it is at most MAX_ADAPTER_BYTES (sd35hub.hub.sources.check_hub_adapter;
    its typed errors are worded for visitors by friendly_error). Reads metadata only (no weights)."""
    source = parse_adapter_source(source)
    name = sample_name(source)
    if name is not None:
        return sample_choice(name, base)
    info = check_hub_adapter(source, base.hub_base, max_bytes=MAX_ADAPTER_BYTES, token=token)
    choice = choice_from_info(info)
    choice.source = source
    return choice


def adapters_from_query(
    values: list[str], base: BaseChoice, *, token: str | None = None
) -> tuple[list[AdapterChoice], list[str]]:
    """Preselected adapters from the Space URL, `?adapter=owner/repo:0.8&adapter=owner/other` (the
    convention the notebook's Space link uses; weight 1.0 when none is given): (choices, error messages)."""
    from sd35hub.blend.request import split_source_weight

    choices: list[AdapterChoice] = []
    problems: list[str] = []
    for value in values[:MAX_ADAPTERS]:
        try:
            if len(value) > MAX_QUERY_CHARS:
                raise AdapterError(f"The link names an adapter {len(value)} characters long; it was ignored.")
            ref = split_source_weight(value, f"?adapter={value[:80]}")
            choice = lookup_adapter(ref.source, base, token=token)
            choice.weight = min(max(ref.weight, WEIGHT_RANGE[0]), WEIGHT_RANGE[1])
            if choice.weight != ref.weight:
                problems.append(
                    f"The link gives {choice.source} the weight {ref.weight:g}; weights go from "
                    f"{WEIGHT_RANGE[0]:g} to {WEIGHT_RANGE[1]:g}, so it is {choice.weight:g} here."
                )
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
    form: GenerationForm, adapters: list[AdapterChoice], *, base: BaseChoice, token: str | None = None
) -> GenerationRequest:
    """The engine request for a form and blend, after every Space limit is checked (all problems at
    once, ConfigError). `<lora:...>` tags typed in the prompt are taken out here and checked exactly
    like the blend panel's adapters (Hub id only, access with the visitor's token, base, size, weight
    range, count, no duplicates). Then the trigger words of the adapters whose toggle is on are written
    into the prompt as text: the engine is told not to parse the prompt again (parse_prompt_tags=False)."""
    from sd35hub.blend.request import AdapterRef, GenerationRequest, parse_prompt, with_trigger_words

    problems = []
    if not form.prompt.strip():
        problems.append("the prompt is empty: describe the image you want")
    for name, text in (("prompt", form.prompt), ("negative prompt", form.negative_prompt)):
        if len(text) > MAX_PROMPT_CHARS:
            problems.append(
                f"the {name} is {len(text):,} characters long; the limit is {MAX_PROMPT_CHARS:,}: shorten it"
            )
    if not 1 <= form.steps <= MAX_STEPS:
        problems.append(f"steps must be between 1 and {MAX_STEPS}")
    clean, tagged = parse_prompt(form.prompt)  # PromptSyntaxError for malformed tags
    blend = list(adapters)
    for ref in tagged:
        where = f"the prompt tag <lora:{ref.source[:80]}>"
        try:
            choice = lookup_adapter(ref.source, base, token=token)  # refuses local and cache paths
        except Sd35HubError as exc:
            problems.append(f"{where}: {friendly_error(exc, token)}")
            continue
        choice.weight, choice.use_trigger_words = ref.weight, False
        blend.append(choice)
    seen: set[str] = set()
    for choice in blend:
        if choice.source in seen:
            problems.append(
                f"{choice.source} is in the blend twice (panel or prompt tags): give it one weight"
            )
        seen.add(choice.source)
        if not WEIGHT_RANGE[0] <= choice.weight <= WEIGHT_RANGE[1]:
            problems.append(
                f"the weight of {choice.source} is {choice.weight:g}; it must be between {WEIGHT_RANGE[0]:g} "
                f"and {WEIGHT_RANGE[1]:g}"
            )
    if len(seen) > MAX_ADAPTERS:
        problems.append(f"{len(seen)} adapters in this image; at most {MAX_ADAPTERS}: remove some")
    words = [w for choice in adapters if choice.use_trigger_words for w in choice.trigger_words]
    prompt = with_trigger_words(clean, words)
    if len(prompt) > MAX_PROMPT_CHARS >= len(form.prompt):
        problems.append(
            f"with the trigger words the prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}: "
            "shorten the prompt or turn off some trigger words"
        )
    if problems:
        raise ConfigError(problems)
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=form.negative_prompt.strip(),
        adapters=[AdapterRef(choice.source, choice.weight, visitor_token(token)) for choice in blend],
        steps=form.steps,
        guidance_scale=form.guidance_scale,
        width=form.width,
        height=form.height,
        seed=form.seed,
        scheduler=form.scheduler,
        insert_trigger_words=False,  # done above, per adapter
        compare_base=form.compare_base,
        parse_prompt_tags=False,  # tags were taken out above; trigger words are text
    )


def generate(
    engine: BlendEngine, request: GenerationRequest, progress: Any = None, waiting: Any = None
) -> GenerationResult:
    """engine.generate (progress per step, `waiting(ahead)` while others are ahead) with out-of-memory
    turned into a typed error (and the GPU cache released), and the parameters made public: no server
    folder (the snippet names the Hub id)."""
    import torch

    try:
        result = engine.generate(request, progress=progress, waiting=waiting)
        result.params.pop("model_path", None)
        return result
    except torch.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise out_of_memory_error() from exc


def out_of_memory_error() -> OutOfMemoryError:
    return OutOfMemoryError(OUT_OF_MEMORY)


def friendly_error(exc: BaseException, token: str | None = None, *, loading_base: bool = False) -> str:
    """One plain-text message for a visitor (sd35hub.frontends.space.text.visitor_message, which words the
    library's adapter-source refusals with this Space's base names and limits); render with md_text."""
    labels = {choice.hub_base: choice.label for choice in BASES.values()}
    return visitor_message(exc, token, loading_base=loading_base, base_labels=labels)


def png_bytes(image: Any, params: dict[str, Any]) -> bytes:
    """The PNG a user downloads: the image with every parameter in text chunks (sd35hub.pngmeta)."""
    from sd35hub.pngmeta import save_png

    with tempfile.TemporaryDirectory(prefix="sd35hub-space-") as folder:
        return save_png(image, Path(folder) / "image.png", params).read_bytes()
