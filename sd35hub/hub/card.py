"""The model card (README.md) of a trained adapter, from summary.json and sd35hub/hub/templates/model_card.md.

The card is a huggingface_hub ``ModelCard``: YAML metadata the Hub understands (base model with
``base_model_relation: adapter``, the Stability AI Community License, sd3.5 tags, trigger words,
a widget gallery) and a body rendered from a Jinja2 template. Image links point where the files
will be: ``images/...`` in a published repo, ``samples/...`` next to a local README.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from sd35hub.adapters.files import ADAPTER_FILENAME
from sd35hub.errors import ConfigError
from sd35hub.run_summary import ADAPTER_FILE, RunSummary, ValidationImage

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
HUB_URL = "https://huggingface.co"  # cards link to the public Hub even when published to a mirror
ADAPTER_FILE_IN_REPO = ADAPTER_FILENAME  # at the repo root: load_lora_weights(repo) finds it by default
LICENSE_NAME = "stabilityai-ai-community"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_VARIANT_LABELS = {
    "sd3.5-medium": "Stable Diffusion 3.5 Medium",
    "sd3.5-large": "Stable Diffusion 3.5 Large",
    "sd3.5-large-turbo": "Stable Diffusion 3.5 Large Turbo",
    "tiny": "the embedded tiny SD3.5-architecture test model of sd35hub",
}
TINY_TEXT = "the embedded tiny SD3.5-architecture test model of sd35hub (random weights, built offline)"


def is_hub_id(value: str | None) -> bool:
    """True for ``owner/name`` that is not an existing local path (``./data`` or ``/content/x`` are local)."""
    if not value or not _HUB_ID.match(value) or value.startswith((".", "~")):
        return False
    return not Path(value).exists()


_SNAPSHOT = re.compile(r"models--(?P<owner>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\][^/\\]+[/\\]?$")
LOCAL_BASE = "a local model"  # what summary.json says of a local base whose Hub id is unknown (never its path)


def base_model_hub_id(name: str, explicit: str | None = None) -> str | None:
    """The Hub id a base model is published as: ``explicit`` (model.base_model_id / --base-model-id),
    a Hub id itself, or for a local diffusers folder the repo it came from: a Hub cache snapshot
    (``.../models--owner--name/snapshots/<rev>``) or a Hub id in its model_index.json / transformer
    config ``_name_or_path``. None for "tiny" and for a folder whose origin is unknown."""
    if explicit:
        return explicit
    if name == "tiny":
        return None
    if is_hub_id(name):
        return name
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    resolved = str(path.resolve())
    match = _SNAPSHOT.search(resolved)
    if match and is_hub_id(f"{match['owner']}/{match['name']}"):
        return f"{match['owner']}/{match['name']}"
    for config in (path / "model_index.json", path / "transformer" / "config.json"):
        try:
            origin = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(origin, str) and is_hub_id(origin):
            return origin
    return None


def public_base_name(name: str, explicit: str | None = None) -> str:
    """What may be written where others read it (card, adapter header, summary): the Hub id,
    "tiny", or LOCAL_BASE — never a local path."""
    return base_model_hub_id(name, explicit) or ("tiny" if name == "tiny" else LOCAL_BASE)


def variant_from_base(base_model: str) -> str | None:
    """sd3.5-medium / sd3.5-large / sd3.5-large-turbo from a base repo name (None if unknown)."""
    name = base_model.lower()
    if "3.5-large-turbo" in name or "3_5_large_turbo" in name:
        return "sd3.5-large-turbo"
    if "3.5-large" in name or "3_5_large" in name:
        return "sd3.5-large"
    if "3.5-medium" in name or "3_5_medium" in name:
        return "sd3.5-medium"
    return None


def repo_image_path(local_path: str) -> str:
    """Where a sample image from the output folder lives in the published repo: ``images/<name>``."""
    parts = PurePosixPath(local_path.replace("\\", "/")).parts
    if parts and parts[0] == "samples":
        parts = parts[1:]
    return str(PurePosixPath("images", *parts)) if parts else "images"


@dataclass(frozen=True)
class CardInfo:
    """Everything the card says: the card's view of a RunSummary (sd35hub.run_summary, the summary.json
    schema), built by ``from_output_dir`` / ``from_summary`` or by hand. Sections are plain JSON here."""

    base_model: str
    variant: str | None = None  # "sd3.5-medium" | "sd3.5-large" | "sd3.5-large-turbo" | "tiny"
    adapter_file: str = ADAPTER_FILE  # relative to the output folder
    trigger_word: str | None = None
    dataset: str | None = None
    steps: int | None = None
    epochs: float | None = None
    samples_seen: int | None = None
    final_loss: float | None = None
    validation_loss: float | None = None
    initial_validation_loss: float | None = None
    resolution_buckets: list[tuple[int, int]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    validation_images: list[ValidationImage] = field(default_factory=list)
    loss_plot: str | None = None
    precision: str | None = None
    quantization: str | None = None
    seed: int | None = None
    lora: dict[str, Any] = field(default_factory=dict)  # rank, alpha, targets, dropout, blocks
    learning_rate: float | None = None
    optimizer: str | None = None
    batch_size: int | None = None
    gradient_accumulation: int | None = None
    duration_s: float | None = None
    peak_memory_gib: float | None = None
    peak_memory_of: str = "gpu"  # "gpu" (CUDA allocations) | "host" (the process's peak RSS: a CPU run)
    sd35hub_version: str | None = None
    validation_loss_on: str | None = None  # "held-out" samples | "training" samples at fixed noise
    held_out: int | None = None
    prior_preservation: dict[str, Any] | None = None  # class_prompt, class_images, generated, prior_loss_weight
    mask_t5_padding: bool = False  # trained on zeroed T5 padding embeddings
    fidelity: dict[str, Any] | None = None  # train.evaluate: CLIP-T / CLIP-I / DINO (sd35hub.models.fidelity)
    embeddings: dict[str, Any] | None = None  # pivotal tuning: file, tokens, encoders, keys (sd35hub.train.pivotal_live)

    @property
    def resolved_variant(self) -> str | None:
        return self.variant or variant_from_base(self.base_model)

    @classmethod
    def from_summary(cls, summary: RunSummary | dict[str, Any]) -> CardInfo:
        """The card's view of a run's summary (a parsed summary.json is checked by RunSummary.from_dict first)."""
        if not isinstance(summary, RunSummary):
            summary = RunSummary.from_dict(summary)
        sections = {name: (None if getattr(summary, name) is None else getattr(summary, name).to_dict())
                    for name in ("prior_preservation", "fidelity", "embeddings")}
        known = set(cls.__dataclass_fields__)
        values = {f.name: getattr(summary, f.name) for f in dataclasses.fields(summary)
                  if f.name in known and getattr(summary, f.name) is not None}
        values.update({k: v for k, v in sections.items() if v is not None})
        values["skipped"] = {reason: count for reason, count in summary.skipped.items() if count > 0}
        values["lora"] = summary.lora.to_dict()
        return cls(**values)

    @classmethod
    def from_output_dir(cls, output_dir: str | Path, *, base_model_id: str | None = None,
                        summary: RunSummary | None = None) -> CardInfo:
        """Read OUTPUT/summary.json (RunSummary.read: every problem a ConfigError), or take ``summary`` read
        from it already; images and plots that are not on disk are left out of the card. ``base_model_id``
        names the Hub base of a run trained on a local folder (--base-model-id)."""
        output_dir = Path(output_dir)
        info = cls.from_summary(summary if summary is not None else RunSummary.read(output_dir))
        kept = [image for image in info.validation_images if (output_dir / image.path).is_file()]
        for image in info.validation_images:
            if image not in kept:
                logger.warning("validation image %s listed in summary.json is missing; left out of the card", image.path)
        loss_plot = info.loss_plot if info.loss_plot and (output_dir / info.loss_plot).is_file() else None
        if base_model_id:
            if not is_hub_id(base_model_id):
                raise ConfigError(f"--base-model-id {base_model_id!r} is not a Hub id OWNER/NAME "
                                  "(e.g. stabilityai/stable-diffusion-3.5-medium)")
            info = dataclasses.replace(info, base_model=base_model_id,
                                       variant=info.variant if info.variant != "tiny" else None)
        return dataclasses.replace(info, validation_images=kept, loss_plot=loss_plot)


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) if value else "—"
    return str(value)


def _settings(info: CardInfo) -> list[tuple[str, str]]:
    lora = info.lora
    rows: list[tuple[str, Any]] = [
        ("LoRA rank", lora.get("rank")),
        ("LoRA alpha", lora.get("alpha")),
        ("target modules", lora.get("targets")),
        ("LoRA dropout", lora.get("dropout")),
        ("adapter variant", _variant_text(lora)),
        ("text-encoder LoRA", _text_encoder_text(lora)),
        ("transformer blocks", lora.get("blocks")),
        ("steps", info.steps),
        ("epochs", info.epochs),
        ("images seen", info.samples_seen),
        ("resolution buckets", [f"{w}×{h}" for w, h in info.resolution_buckets] or None),
        ("learning rate", info.learning_rate),
        ("optimizer", info.optimizer),
        ("batch size", info.batch_size),
        ("gradient accumulation", info.gradient_accumulation),
        ("precision", info.precision),
        ("quantization", info.quantization or ("none" if info.precision else None)),
        ("seed", info.seed),
        ("prior preservation", _prior_text(info.prior_preservation)),
        ("T5 padding", "zeroed in training: generate with `sd35hub generate --mask-t5-padding`"
         if info.mask_t5_padding else None),
        ("training time", f"{info.duration_s / 60:.1f} min" if info.duration_s is not None else None),
        ("peak GPU memory" if info.peak_memory_of == "gpu" else "peak host memory (no GPU)",
         f"{info.peak_memory_gib:.1f} GiB" if info.peak_memory_gib is not None else None),
        ("sd35hub version", info.sd35hub_version),
    ]
    return [(name, _fmt(value)) for name, value in rows if value is not None and value != ""]


_VARIANT_LOADERS = {
    "dora": "DoRA, diffusers/peft layout (`load_lora_weights` reads it)",
    "lokr": "LoKr, LyCORIS layout: load it in ComfyUI (LoraLoader) or `sd35hub generate`; diffusers' "
            "`load_lora_weights` cannot",
    "loha": "LoHa, LyCORIS layout: load it in ComfyUI (LoraLoader) or `sd35hub generate`; diffusers' "
            "`load_lora_weights` cannot",
}


def _variant_text(lora: dict[str, Any]) -> str | None:
    variant, init, rslora = lora.get("variant"), lora.get("init"), lora.get("rslora")
    if variant in _VARIANT_LOADERS:
        return _VARIANT_LOADERS[str(variant)]
    extras = [x for x in (f"{init} init" if init in ("pissa", "olora") else "", "rsLoRA" if rslora else "") if x]
    return f"{', '.join(extras)} (saved as a plain LoRA of the original base)" if extras else None


_TE_KEYS = {"clip_l": ("CLIP-L", "text_encoder"), "clip_g": ("CLIP-G", "text_encoder_2"), "t5": ("T5-XXL", "text_encoder_3")}


def _text_encoders(lora: dict[str, Any]) -> list[str]:
    value = lora.get("text_encoders")
    return [str(n) for n in value if n in _TE_KEYS] if isinstance(value, list) else []


def _text_encoder_text(lora: dict[str, Any]) -> str | None:
    names = _text_encoders(lora)
    if not names:
        return None
    parts = ", ".join(f"{_TE_KEYS[n][0]} (`{_TE_KEYS[n][1]}.*` keys)" for n in names)
    text = (f"{parts}, rank {_fmt(lora.get('text_encoder_rank'))}, alpha {_fmt(lora.get('text_encoder_alpha'))}, "
            f"learning rate {_fmt(lora.get('text_encoder_lr'))}")
    if "t5" in names:
        text += "; the T5 part is applied by `sd35hub generate` and ComfyUI, not by diffusers' `load_lora_weights`"
    return text


def _prior_text(prior: dict[str, Any] | None) -> str | None:
    if not prior:
        return None
    prompt = str(prior.get("class_prompt") or "").replace("|", "/").replace("`", "'").replace("\n", " ")[:200]
    return (f"{prior.get('class_images')} class images of `{prompt}` ({prior.get('generated', 0)} generated by the base "
            f"model), prior loss weight {prior.get('prior_loss_weight')}, {prior.get('class_samples_seen')} class samples seen")


def _results(info: CardInfo) -> list[tuple[str, str]]:
    on = {"held-out": f" ({info.held_out or ''} held-out samples)".replace("( ", "("),
          "training": " (training samples, fixed noise)"}.get(info.validation_loss_on or "", "")
    rows = [
        ("final training loss", info.final_loss),
        (f"validation loss{on} before training", info.initial_validation_loss),
        (f"validation loss{on} after training", info.validation_loss),
        ("subject fidelity", _fidelity_text(info.fidelity)),
    ]
    return [(name, _fmt(value)) for name, value in rows if value is not None]


def _fidelity_text(fidelity: dict[str, Any] | None) -> str | None:
    """'CLIP-T 0.301, CLIP-I 0.812, DINO 0.655 (final validation images, 3 prompts; openai/clip-…, facebook/dino-vits16)'."""
    mean = fidelity.get("mean") if isinstance(fidelity, dict) else None
    if not isinstance(mean, dict):
        return None
    parts = [f"{label} {mean[k]:.3f}" for k, label in (("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("dino", "DINO"))
             if isinstance(mean.get(k), (int, float))]
    if not parts:
        return None
    names = [str(fidelity.get(k) or "")[:80].replace("|", "/").replace("`", "'") for k in ("clip_model", "dino_model")]
    return (f"{', '.join(parts)} (higher is better; final validation images, {len(fidelity.get('prompts') or [])} prompts "
            f"vs {fidelity.get('instance_images')} instance images; encoders {names[0]}, {names[1]})")


def _load_lines(info: CardInfo, source: str, adapter_name: str) -> list[str]:
    if info.lora.get("variant") in ("lokr", "loha"):  # LyCORIS keys: diffusers cannot load them; sd35hub adds the delta
        where = (f'hf_hub_download("{source}", "{ADAPTER_FILE_IN_REPO}")' if is_hub_id(source)
                 else f'"{source}/{ADAPTER_FILE_IN_REPO}"')
        return [*(["from huggingface_hub import hf_hub_download"] if is_hub_id(source) else []),
                "from sd35hub.train.variants import merge_into  # LoKr/LoHa: the exact weight change, merged",
                f"merge_into(pipe.transformer, [({where}, 1.0)])"]
    return [f'pipe.load_lora_weights("{source}", weight_name="{ADAPTER_FILE_IN_REPO}", adapter_name="{adapter_name}")',
            f'pipe.set_adapters(["{adapter_name}"], [1.0])']


def _snippet(info: CardInfo, source: str, adapter_name: str, prompt: str) -> str:
    from sd35hub.models.info import SAMPLING_DEFAULTS  # stdlib-only module: cheap

    # the same per-variant defaults the blending engine samples with, so the card and the Space agree
    steps, guidance = SAMPLING_DEFAULTS.get(info.resolved_variant or "", SAMPLING_DEFAULTS["sd3.5-large"])
    if info.base_model == "tiny":  # runs anywhere: the tiny model is built locally by sd35hub
        load = ["from sd35hub.models.tiny import tiny_model_path", "",
                'pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_path())']
    elif is_hub_id(info.base_model):
        load = ["", f'pipe = StableDiffusion3Pipeline.from_pretrained("{info.base_model}", dtype=torch.bfloat16).to("cuda")']
    else:
        load = ["", 'base = "PATH/TO/BASE"  # the local diffusers folder of the SD3.5 model this adapter was trained on',
                'pipe = StableDiffusion3Pipeline.from_pretrained(base, dtype=torch.bfloat16).to("cuda")']
    embeddings = _embedding_lines(info, source)
    if embeddings:  # SD3 pipelines lack diffusers' TextualInversionLoaderMixin: a subclass adds it
        load = [line.replace("StableDiffusion3Pipeline.from_pretrained", "SD3WithEmbeddings.from_pretrained") for line in load]
        load = ["from diffusers.loaders import TextualInversionLoaderMixin", *embeddings[0], "",
                "class SD3WithEmbeddings(TextualInversionLoaderMixin, StableDiffusion3Pipeline):  # SD3 lacks the mixin",
                "    pass", *load]
    return "\n".join(
        [
            "import torch",
            "from diffusers import StableDiffusion3Pipeline",
            *load,
            *_text_encoder_comment(info.lora),
            *_load_lines(info, source, adapter_name),
            *(embeddings[1] if embeddings else []),
            f"image = pipe({json.dumps(prompt, ensure_ascii=False)}, num_inference_steps={steps}, guidance_scale={guidance}).images[0]",
            'image.save("sample.png")',
        ]
    )


_TI_ENCODERS = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
                "t5xxl": ("text_encoder_3", "tokenizer_3")}


def _embedding_lines(info: CardInfo, source: str) -> tuple[list[str], list[str]] | None:
    """(imports, loading lines) of the pivotal-tuning embeddings, or None: diffusers' stock
    load_textual_inversion, once per encoder key of embeddings.safetensors."""
    from sd35hub.adapters.embeddings import EMBEDDINGS_FILE, check_tokens

    emb = info.embeddings
    if not isinstance(emb, dict):
        return None
    try:  # our own summary, but a card is Hub text: plain tokens only
        tokens = check_tokens(emb.get("tokens"), source="summary.json embeddings")
    except Exception:
        return None
    keys = [k for k in emb.get("keys") or [] if k in _TI_ENCODERS] or ["clip_l", "clip_g"]
    if is_hub_id(source):
        imports = ["from huggingface_hub import hf_hub_download", "from safetensors.torch import load_file"]
        read = f'embeddings = load_file(hf_hub_download("{source}", "{EMBEDDINGS_FILE}"))'
    else:
        imports = ["from safetensors.torch import load_file"]
        read = f'embeddings = load_file("{source}/{EMBEDDINGS_FILE}")'
    lines = [read, f"tokens = {json.dumps(tokens)}  # the new tokens: write {''.join(tokens)} in the prompt"]
    for key in keys:
        encoder, tokenizer = _TI_ENCODERS[key]
        lines.append(f'pipe.load_textual_inversion(embeddings["{key}"], token=tokens, text_encoder=pipe.{encoder}, '
                     f"tokenizer=pipe.{tokenizer})")
    return imports, lines


def _text_encoder_comment(lora: dict[str, Any]) -> list[str]:
    """A snippet comment for an adapter with text-encoder keys (load_lora_weights loads the CLIP ones too)."""
    clips = [_TE_KEYS[n][1] for n in _text_encoders(lora) if n != "t5"]
    if not clips:
        return []
    return [f"# the file also holds {' and '.join(f'{c}.*' for c in clips)} (text-encoder LoRA) keys: "
            "load_lora_weights applies them to the pipeline's CLIP encoders too"]


def _embeddings_note(info: CardInfo) -> str | None:
    """The trigger section's line about embeddings.safetensors (pivotal tuning), or None."""
    if _embedding_lines(info, "x") is None:
        return None
    tokens = "".join(info.embeddings["tokens"])  # type: ignore[index]  # checked by _embedding_lines
    return (f"`{tokens}` are new tokens whose embeddings were trained with the LoRA (pivotal tuning): load "
            "`embeddings.safetensors` too (the snippet below). Its `clip_l` / `clip_g` (`t5xxl`) keys are the layout "
            "diffusers' `load_textual_inversion` takes per encoder and ComfyUI reads from `models/embeddings/` "
            f"(write `embedding:NAME` where the prompt has `{tokens}`).")


def license_link_for(base_model: str | None) -> str:
    """The base repo's own LICENSE.md; a local/tiny base has no Hub page, so the license itself."""
    if is_hub_id(base_model):
        return f"{HUB_URL}/{base_model}/blob/main/LICENSE.md"
    return "https://stability.ai/community-license-agreement"


def build_model_card(info: CardInfo, *, repo_id: str | None) -> ModelCard:
    """The card for ``repo_id`` (image links under images/), or a local card (links under samples/)."""
    from huggingface_hub import ModelCard, ModelCardData

    for_repo = repo_id is not None
    variant = info.resolved_variant
    base_is_hub = is_hub_id(info.base_model)
    if for_repo and not base_is_hub and info.base_model != "tiny":
        raise ConfigError(
            "The adapter was trained on a local base model whose Hub repo is unknown, so the card cannot name "
            "or link its base; pass --base-model-id OWNER/NAME (the Hub repo the folder was downloaded from, "
            "e.g. stabilityai/stable-diffusion-3.5-medium)."
        )
    license_link = license_link_for(info.base_model)
    tags = ["lora", "diffusers", "text-to-image", "sd3.5"]
    if variant in ("sd3.5-medium", "sd3.5-large"):
        tags.append(variant)
    elif variant == "sd3.5-large-turbo":
        tags += ["sd3.5-large", "sd3.5-large-turbo"]
    tags += ["template:sd-lora", "sd35hub"]

    def link(path: str) -> str:
        return repo_image_path(path) if for_repo else path

    gallery = [{"path": link(img.path), "prompt": img.prompt} for img in info.validation_images]
    widget = [{"text": img["prompt"], "output": {"url": img["path"]}} for img in gallery]
    dataset_is_hub = is_hub_id(info.dataset)
    card_data = ModelCardData(
        base_model=info.base_model if base_is_hub else None,
        library_name="diffusers",
        license="other",
        license_name=LICENSE_NAME,
        license_link=license_link,
        pipeline_tag="text-to-image",
        tags=tags,
        datasets=[info.dataset] if dataset_is_hub else None,
        base_model_relation="adapter" if base_is_hub else None,
        instance_prompt=info.trigger_word or None,
        widget=widget or None,
    )
    name = repo_id.split("/")[-1] if repo_id else None
    adapter_name = re.sub(r"\W+", "_", name or "my_lora").strip("_").lower() or "my_lora"
    if for_repo:
        source = repo_id
    else:  # a local README sits next to adapter/: load from that folder
        source = str(PurePosixPath(info.adapter_file).parent)
    prompt = info.validation_images[0].prompt if info.validation_images else (info.trigger_word or "a photo")
    if info.trigger_word and info.trigger_word not in prompt:
        prompt = f"{info.trigger_word}, {prompt}"
    if not dataset_is_hub and info.dataset:
        dataset_text = "a local dataset"
    else:
        dataset_text = f"[{info.dataset}]({HUB_URL}/datasets/{info.dataset})" if info.dataset else ""
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=name or ("sd35hub tiny-model demo LoRA" if info.base_model == "tiny"
                       else f"{_VARIANT_LABELS.get(variant or '', 'SD3.5')} LoRA"),
        base_model_url=f"{HUB_URL}/{info.base_model}" if base_is_hub else None,
        base_model_text=_base_text(info.base_model),
        is_tiny=info.base_model == "tiny",
        variant_label=_VARIANT_LABELS.get(variant or "", "Stable Diffusion 3.5"),
        dataset_text=dataset_text,
        trigger_word=info.trigger_word,
        embeddings_file=_embeddings_note(info),
        gallery=[{**img, "prompt_md": img["prompt"].replace("|", "\\|") or "—"} for img in gallery],
        snippet=_snippet(info, source, adapter_name, prompt),
        adapter_name=adapter_name,
        settings=_settings(info),
        results=_results(info),
        loss_plot=(link(info.loss_plot) if for_repo and info.loss_plot else info.loss_plot),
        skipped=sorted(info.skipped.items()),
    )
    return card


def _base_text(base_model: str) -> str:
    if is_hub_id(base_model):
        return f"[{base_model}]({HUB_URL}/{base_model})"
    if base_model == "tiny":
        return TINY_TEXT
    return "a local copy of a Stable Diffusion 3.5 model"


def adapter_bytes(path: Path, base_model_id: str | None = None) -> bytes:
    """The adapter file's bytes; with ``base_model_id``, its sd35hub header names that base (the
    tensors are unchanged)."""
    data = Path(path).read_bytes()
    if not base_model_id:
        return data
    from safetensors import safe_open
    from safetensors.torch import load, save

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    raw = json.loads(metadata.get("sd35hub") or "{}")
    if raw.get("base_model") == base_model_id:
        return data
    raw["base_model"] = base_model_id
    metadata["sd35hub"] = json.dumps(raw, sort_keys=True)
    return save(load(data), metadata=metadata)


def write_model_card(output_dir: str | Path, repo_id: str | None = None) -> Path:
    """Write OUTPUT/README.md from OUTPUT/summary.json (atomically) and return its path."""
    output_dir = Path(output_dir)
    card = build_model_card(CardInfo.from_output_dir(output_dir), repo_id=repo_id)
    from sd35hub.paths import atomic_write_text

    return atomic_write_text(output_dir / "README.md", str(card))


# The merged adapter's card (`sd35hub merge`, blend/merge.write_merged): the same writer, its own small body.
def _public_source(source: str) -> str:
    """A source as the card may show it: a Hub id as given, a local path by its file name only."""
    head = source.split("@", 1)[0]
    if is_hub_id(head) or (head.count("/") == 2 and not Path(head).exists() and not head.startswith((".", "/", "~"))):
        return source
    return Path(source).name or source


def merged_card_text(
    items: list[tuple[str, float]], base_model: str, trigger_words: list[str], filename: str
) -> str:
    """The card of a merged adapter (`sd35hub merge`): Hub metadata (SD3.5 community license), the sources and their weights."""
    from huggingface_hub import ModelCardData

    license_link = license_link_for(base_model or None)
    base_model = base_model if is_hub_id(base_model) else ""  # "tiny" (or unknown): no Hub relation claimed  # the base repo's LICENSE.md, else the license itself
    data = ModelCardData(
        license="other",
        license_name=LICENSE_NAME,
        license_link=license_link,
        base_model=base_model or None,
        base_model_relation="adapter" if base_model else None,
        library_name="diffusers",
        tags=["lora", "sd3.5", "stable-diffusion-3.5", "text-to-image", "sd35hub", "merged-lora"],
        instance_prompt=", ".join(trigger_words) or None,
    )
    rows = "\n".join(f"| `{_public_source(source)}` | {weight:g} |" for source, weight in items)
    load = (f"pipe = StableDiffusion3Pipeline.from_pretrained({base_model!r}, dtype=torch.bfloat16)\n" if base_model else
            'base = "PATH/TO/BASE"  # the SD3.5 model the sources were trained on\n'
            "pipe = StableDiffusion3Pipeline.from_pretrained(base, dtype=torch.bfloat16)\n")
    return (
        f"---\n{data.to_yaml()}\n---\n\n# Merged LoRA\n\n"
        "This adapter is an exact merge (concatenated ranks, no SVD) of a weighted blend: loading it at weight 1.0 "
        "gives the same result as loading the sources and calling `set_adapters` with these weights.\n\n"
        f"| source | weight |\n|---|---|\n{rows}\n\n"
        "## Use\n\n```python\nimport torch\nfrom diffusers import StableDiffusion3Pipeline\n\n"
        f"{load}"
        f"pipe.load_lora_weights('.', weight_name={filename!r})\n```\n\n"
        "## License\n\nThe base model's weights are under the Stability AI Community License "
        f"({license_link}); the sources' own licenses also apply.\n"
    )


def write_merged_card(
    out_dir: str | Path, items: list[tuple[str, float]], base_model: str, trigger_words: list[str], filename: str
) -> Path:
    """Write OUT/README.md of a merged adapter (atomically) and return its path."""
    from sd35hub.paths import atomic_write_text

    return atomic_write_text(Path(out_dir) / "README.md", merged_card_text(items, base_model, trigger_words, filename))
