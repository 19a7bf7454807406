"""What a generation request and its result are: adapters with weights, the `<lora:...>` prompt syntax,
the parameters that reproduce an image, and a diffusers snippet that reproduces it exactly.

Prompt syntax (A1111-style, with Hub ids or local paths)::

    "a castle at dusk <lora:me/watercolor-sd35:0.8> <lora:./out/adapter:-0.3>"
    -> ("a castle at dusk", [AdapterRef("me/watercolor-sd35", 0.8), AdapterRef("./out/adapter", -0.3)])

The weight is optional (default 1.0) and may be negative or above 1. A Hub source may carry a revision
(`owner/repo@v2`) or a file (`owner/repo/style.safetensors`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from sd35hub.errors import PromptSyntaxError

_TAG = re.compile(r"<lora:([^<>]*)>")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class AdapterRef:
    """One adapter in a blend: a local path or Hub source, and its weight (any float, 0 disables)."""

    source: str
    weight: float = 1.0
    # A Hub token for this adapter only (a Space visitor's own): not part of equality, never printed.
    token: str | bool | None = field(default=None, repr=False, compare=False)


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    adapters: list[AdapterRef] = field(default_factory=list)
    steps: int | None = None  # None: the model variant's default (Large 28, Medium 40, Turbo 4)
    guidance_scale: float | None = None  # None: the variant's default (Large 3.5, Medium 4.5, Turbo 0)
    width: int | None = None  # pixels, multiple of 16; None: native resolution (1024)
    height: int | None = None
    seed: int = 0  # image i uses seed + i
    scheduler: str = "euler"  # sd35hub.blend.schedulers.SCHEDULERS
    num_images: int = 1
    insert_trigger_words: bool = True  # prepend adapters' trigger words (metadata/card) to the prompt
    compare_base: bool = False  # also render the base model (no adapters) with the same seeds
    # False: the prompt is text only (a server that took the tags out itself, e.g. the Space, where card
    # trigger words joined the prompt and must never be read as `<lora:...>` tags).
    parse_prompt_tags: bool = True
    skip_layers: tuple[int, ...] = ()  # skip-layer guidance (SD3.5 Medium: 7, 8, 9); needs guidance > 1
    skip_layer_scale: float = 2.8


@dataclass
class GenerationResult:
    images: list[Any]  # PIL images, one per seed
    params: dict[str, Any]  # everything needed to reproduce them (also written to PNG text chunks)
    base_images: list[Any] | None = None  # compare_base: the same seeds without adapters

    def diffusers_snippet(self) -> str:
        """Python using only diffusers + torch that reproduces exactly these images."""
        return diffusers_snippet(self.params)


def parse_weight(text: str, where: str) -> float:
    if not _NUMBER.match(text.strip()):
        raise PromptSyntaxError(
            f"{where}: weight {text!r} is not a number; write e.g. <lora:owner/repo:0.8> (or leave the weight out for 1.0)"
        )
    return float(text)


def split_source_weight(spec: str, where: str) -> AdapterRef:
    """'owner/repo:0.8' -> AdapterRef('owner/repo', 0.8); 'C:\\x\\a.safetensors' keeps its drive colon."""
    spec = spec.strip()
    if not spec:
        raise PromptSyntaxError(
            f"{where}: no adapter given; write <lora:owner/repo:0.8> or <lora:path/to/adapter:0.8>"
        )
    source, sep, tail = spec.rpartition(":")
    if sep and not any(c in tail for c in "/\\") and not (len(source) == 1 and source.isalpha()):
        if not source.strip():
            raise PromptSyntaxError(f"{where}: no adapter before the weight; write <lora:owner/repo:{tail}>")
        if not tail.strip():
            raise PromptSyntaxError(
                f"{where}: empty weight after ':'; write <lora:{source}:0.8> or <lora:{source}>"
            )
        return AdapterRef(source.strip(), parse_weight(tail, where))
    return AdapterRef(spec, 1.0)


def parse_prompt(prompt: str) -> tuple[str, list[AdapterRef]]:
    """Take the `<lora:source[:weight]>` tags out of a prompt: (clean prompt, adapters in order)."""
    refs = [split_source_weight(m.group(1), f"prompt tag {m.group(0)!r}") for m in _TAG.finditer(prompt)]
    rest = _TAG.sub(" ", prompt)
    broken = re.search(
        r"<\s*lora\s*:[^>]*(?:<|$)|<\s*lora\s*>|<\s*lora(?=[^:>\w])", rest, flags=re.IGNORECASE
    )
    if broken is None:
        broken = re.search(r"<\s*lora\b[^>]*>?", rest, flags=re.IGNORECASE)
    if broken is not None:
        raise PromptSyntaxError(
            f"malformed adapter tag near {broken.group(0)[:40]!r} in the prompt; write <lora:owner/repo:0.8> "
            "(lower-case 'lora', a colon, the source, optionally ':weight', and a closing '>')"
        )
    clean = re.sub(r"\s+", " ", rest).strip()
    clean = re.sub(r"\s+([,.;])", r"\1", clean)
    return clean, refs


def parse_lora_option(value: str) -> AdapterRef:
    """The CLI's `--lora REPO_OR_PATH[:W]`."""
    return split_source_weight(value, f"--lora {value!r}")


def with_trigger_words(prompt: str, words: list[str]) -> str:
    """Prepend the trigger words that the prompt does not contain yet ("zxq style, a castle")."""
    missing: list[str] = []
    for word in words:  # each once: adapters sharing a trigger word must not repeat it
        if word and word.lower() not in prompt.lower() and word.lower() not in {m.lower() for m in missing}:
            missing.append(word)
    return ", ".join([*missing, prompt]) if missing else prompt


# --- reproduction snippet -----------------------------------------------------------------------


def diffusers_snippet(params: dict[str, Any]) -> str:
    lines = [
        "import torch",
        f"from diffusers import StableDiffusion3Pipeline, {params['scheduler_class']}",
        "",
    ]
    model = params.get("model_id") or params["model_path"]
    base_revision = f", revision={params['model_revision']!r}" if params.get("model_revision") else ""
    lines.append(
        f"pipe = StableDiffusion3Pipeline.from_pretrained({model!r}{base_revision}, dtype=torch.{params['dtype']})"
    )
    kwargs = ", ".join(f"{k}={v!r}" for k, v in sorted(params["scheduler_kwargs"].items()))
    lines.append(
        f"pipe.scheduler = {params['scheduler_class']}.from_config(pipe.scheduler.config, {kwargs})".replace(
            ", )", ")"
        )
    )
    if params.get("mask_t5_padding"):  # the one step plain diffusers has no switch for
        lines += ["from sd35hub.models.t5mask import install_t5_padding_mask",
                  "install_t5_padding_mask(pipe)  # zero T5 padding embeddings, as in training"]
    if params.get("device", "cpu") != "cpu":
        lines.append(f"pipe.to({params['device']!r})")
    adapters = params.get("adapters") or []
    for adapter in adapters:
        if adapter.get("repo_id") is None and adapter.get("file") is None:  # served by the app, not on the Hub
            lines.append(f"# {adapter['source']} is built into the app that made this image; it is not on the Hub")
            lines.append(f"pipe.load_lora_weights('<{adapter['source']}>', adapter_name={adapter['name']!r})")
        elif adapter.get("format") in ("lokr", "loha"):  # not a LoRA: diffusers cannot load it; sd35hub merges it
            where = repr(adapter["file"]) if adapter.get("file") else (
                f"hf_hub_download({adapter['repo_id']!r}, {adapter['filename']!r}, revision={adapter.get('revision')!r})")
            lines.append(f"# {adapter['source']} is a {adapter['format'].replace('lo', 'Lo', 1)} adapter (LyCORIS keys): "
                         "diffusers cannot load it; sd35hub adds its exact weight delta")
            if not adapter.get("file"):
                lines.append("from huggingface_hub import hf_hub_download")
            lines.append("from sd35hub.train.variants import merge_into")
            lines.append(f"merge_into(pipe.transformer, [({where}, {adapter['weight']!r})])")
        elif adapter.get("format", "diffusers") not in ("diffusers", "dora"):
            lines.append(f"# {adapter['source']} is a {adapter['format']} file: convert it first with")
            where = adapter.get("file") or f"{adapter['repo_id']}/{adapter['filename']}"
            lines.append(f"#   sd35hub convert {where} converted/ --to diffusers")
            lines.append(f"pipe.load_lora_weights('converted', adapter_name={adapter['name']!r})")
        elif adapter.get("repo_id"):
            revision = f", revision={adapter['revision']!r}" if adapter.get("revision") else ""
            lines.append(
                f"pipe.load_lora_weights({adapter['repo_id']!r}, weight_name={adapter['filename']!r}{revision}, "
                f"adapter_name={adapter['name']!r})"
            )
        else:
            lines.append(f"pipe.load_lora_weights({adapter['file']!r}, adapter_name={adapter['name']!r})")
    loras = [a for a in adapters if a.get("format") not in ("lokr", "loha")]
    if loras:
        names = [a["name"] for a in loras]
        weights = [a["weight"] for a in loras]
        lines.append(f"pipe.set_adapters({names!r}, adapter_weights={weights!r})")
        if any(a.get("format") == "dora" and a["weight"] != 1 for a in loras):
            lines.append("# DoRA at a weight other than 1: diffusers scales the low-rank part inside the norm; sd35hub "
                         "(and ComfyUI) scale the whole change, so images differ slightly")
    lines += _embedding_lines(adapters)
    lines += [
        f"seeds = {params['seeds']!r}",
        "images = pipe(",
        f"    prompt={params['prompt']!r},",
        f"    negative_prompt={params['negative_prompt']!r},",
        f"    num_inference_steps={params['steps']!r},",
        f"    guidance_scale={params['guidance_scale']!r},",
        f"    width={params['width']!r},",
        f"    height={params['height']!r},",
        *([f"    skip_guidance_layers={params['skip_guidance_layers']!r},",
           f"    skip_layer_guidance_scale={params['skip_layer_guidance_scale']!r},"]
          if params.get("skip_guidance_layers") else []),
        "    num_images_per_prompt=len(seeds),",
        '    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],',
        ").images",
    ]
    return "\n".join(lines) + "\n"


_TI_ENCODERS = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
                "t5xxl": ("text_encoder_3", "tokenizer_3")}


def _embedding_lines(adapters: list[dict[str, Any]]) -> list[str]:
    """Pivotal-tuning embeddings of the adapters, through diffusers' stock load_textual_inversion
    (StableDiffusion3Pipeline lacks TextualInversionLoaderMixin: the pipeline is rebuilt with it)."""
    with_embeddings = [a for a in adapters if a.get("embeddings")]
    if not with_embeddings:
        return []
    lines = ["from diffusers.loaders import TextualInversionLoaderMixin",
             "from safetensors.torch import load_file",
             "pipe = type('SD3WithEmbeddings', (TextualInversionLoaderMixin, type(pipe)), {})(**pipe.components)"]
    for adapter in with_embeddings:
        emb = adapter["embeddings"]
        if adapter.get("repo_id"):
            folder = str(PurePosixPath(adapter.get("filename") or "x").parent)
            name = "embeddings.safetensors" if folder in ("", ".") else f"{folder}/embeddings.safetensors"
            revision = f", revision={adapter['revision']!r}" if adapter.get("revision") else ""
            lines += ["from huggingface_hub import hf_hub_download",
                      f"embeddings = load_file(hf_hub_download({adapter['repo_id']!r}, {name!r}{revision}))"]
        elif emb.get("file"):
            lines.append(f"embeddings = load_file({emb['file']!r})")
        else:
            lines.append(f"embeddings = load_file('<{adapter['source']}/embeddings.safetensors>')  # served by the app")
        for key in emb.get("keys") or []:
            if key in _TI_ENCODERS:
                encoder, tokenizer = _TI_ENCODERS[key]
                lines.append(f"pipe.load_textual_inversion(embeddings[{key!r}], token={list(emb['tokens'])!r}, "
                             f"text_encoder=pipe.{encoder}, tokenizer=pipe.{tokenizer})")
    return lines
