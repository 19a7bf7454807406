"""Adapter files: save a peft LoRA with metadata, load any supported layout safely, check it fits a base.

An sd35hub adapter is one safetensors file (default `<dir>/pytorch_lora_weights.safetensors`) in the
layout stock diffusers writes — keys `transformer.<module>.lora_A.weight` / `lora_B.weight` and the
peft LoraConfig in the header under `lora_adapter_metadata`, so `pipe.load_lora_weights(dir)` gets
rank AND alpha right — plus our own `AdapterMetadata` as JSON under the header key `sd35hub`.

Loading refuses pickled files (.bin/.pt/.ckpt/.pth: unpickling runs code) without opening them,
reads kohya and ComfyUI layouts too (sd35hub.formats), and `check_compatible` turns "wrong base
model" into an AdapterIncompatibleError that names both architectures instead of a shape traceback.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35hub import __version__
from sd35hub.errors import AdapterError, AdapterIncompatibleError, UnsafeFileError
from sd35hub.formats import (
    DIFFUSERS_PREFIX,
    Modules,
    detect_format,
    lora_config_for,
    modules_from_state_dict,
    prefixed_config,
    to_state_dict,
    unprefixed_config,
)
from sd35hub.paths import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    import torch

ADAPTER_FILENAME = "pytorch_lora_weights.safetensors"
HEADER_KEY = "sd35hub"  # our AdapterMetadata (JSON) in the safetensors header
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Transformer width (heads x head_dim) -> what people call it; for error messages.
KNOWN_WIDTHS = {1536: "SD3 / SD3.5 Medium", 2432: "SD3.5 Large / Large Turbo"}


@dataclass
class AdapterMetadata:
    """What an adapter file says about itself (JSON in the safetensors header under 'sd35hub')."""

    rank: int  # most common LoRA rank r
    alpha: float  # most common lora_alpha; scale = alpha / r
    targets: list[str] = field(default_factory=list)  # target module names (peft target_modules)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # modules whose rank differs from `rank`
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # modules whose alpha differs
    base_model: str = ""  # Hub id or path of the base it was trained on
    variant: str = ""  # sd3.5-large | sd3.5-medium | ... (sd35hub.models.info.VARIANTS)
    sd35hub_version: str = __version__
    config_digest: str = ""  # sha256 of the training config, to match adapters to runs
    trigger_words: list[str] = field(default_factory=list)  # prepended to prompts when asked
    format: str = "diffusers"  # layout of the file: diffusers | kohya | comfyui

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterMetadata:
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class Adapter:
    """A loaded adapter: diffusers-named LoRA modules plus what the file said about them."""

    modules: Modules
    metadata: AdapterMetadata | None
    format: str  # layout it was stored in
    path: Path | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Diffusers layout: transformer.<module>.lora_A.weight / lora_B.weight."""
        return to_state_dict(self.modules, "diffusers")[0]

    def lora_config(self) -> dict[str, Any]:
        """peft LoraConfig kwargs (r, lora_alpha, rank_pattern, alpha_pattern, target_modules)."""
        return lora_config_for(self.modules)


def adapter_file(path: str | Path) -> Path:
    """The safetensors file for `path` (a file, or a folder holding one); pickles are refused unopened."""
    path = Path(path)
    if path.is_dir():
        from sd35hub.hub import pick_adapter_file

        names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        return path / pick_adapter_file(names)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFileError(
            f"{path.name} is a pickled file, which can run arbitrary code when loaded; sd35hub only loads "
            ".safetensors adapters. Ask the author for a safetensors file, or convert it in a sandbox you trust."
        )
    if not path.is_file():
        raise AdapterError(f"Adapter file {path} does not exist. Check the path (or pass a Hub repo id).")
    if path.suffix.lower() != ".safetensors":
        raise AdapterError(
            f"{path.name} is not a .safetensors file; sd35hub reads LoRA adapters in safetensors only."
        )
    return path


def read_adapter(path: str | Path) -> Adapter:
    """Read any supported layout from a safetensors file (or a folder holding one)."""
    from safetensors import SafetensorError, safe_open

    file = adapter_file(path)
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(
            f"{file} is not a readable safetensors file ({exc}). Re-download or re-export it."
        ) from exc
    fmt = detect_format(tensors)
    try:  # JSON strings in the header: invalid JSON, or JSON that is not an object (list, number...)
        config = unprefixed_config(header.get("lora_adapter_metadata"))
        metadata = AdapterMetadata.from_json(header[HEADER_KEY]) if header.get(HEADER_KEY) else None
    except (ValueError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        raise AdapterError(f"{file} has a malformed metadata header ({exc}); re-export the adapter.") from exc
    modules = modules_from_state_dict(tensors, fmt, config)
    if metadata is not None:
        metadata.format = fmt
    return Adapter(modules=modules, metadata=metadata, format=fmt, path=file)


def load_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], AdapterMetadata | None, str]:
    """(diffusers-layout state dict, metadata or None, original format) of an adapter file."""
    adapter = read_adapter(path)
    return adapter.state_dict(), adapter.metadata, adapter.format


def metadata_for(modules: Modules, **fields: Any) -> AdapterMetadata:
    """AdapterMetadata with rank/alpha/targets/patterns taken from the modules themselves."""
    config = lora_config_for(modules)
    return AdapterMetadata(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        targets=list(config["target_modules"]),
        rank_pattern=dict(config["rank_pattern"]),
        alpha_pattern={k: float(v) for k, v in config["alpha_pattern"].items()},
        **fields,
    )


def write_adapter(
    modules: Modules, path: str | Path, *, metadata: AdapterMetadata | None = None, fmt: str = "diffusers"
) -> Path:
    """Write modules as `fmt` to `path` (a folder gets pytorch_lora_weights.safetensors), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / ADAPTER_FILENAME
    file.parent.mkdir(parents=True, exist_ok=True)
    state_dict, header = to_state_dict(modules, fmt)
    header = {"format": "pt", **header}
    if metadata is not None:
        header[HEADER_KEY] = dataclasses.replace(metadata, format=fmt).to_json()
    return atomic_write(file, lambda temp: save_file(state_dict, str(temp), metadata=header))


def peft_modules(transformer: Any, adapter_name: str = "default") -> Modules:
    """Modules of a peft-LoRA-wrapped SD3Transformer2DModel (add_adapter or get_peft_model)."""
    from peft.utils import get_peft_model_state_dict

    state_dict = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    state_dict = {k.removeprefix("base_model.model."): v.detach().cpu() for k, v in state_dict.items()}
    config = transformer.peft_config[adapter_name].to_dict()
    return modules_from_state_dict(state_dict, "diffusers", config)


def save_adapter(
    transformer: Any, path: Path, *, metadata: AdapterMetadata, adapter_name: str = "default"
) -> Path:
    """Save the LoRA of a peft-wrapped transformer in stock-diffusers layout, with alpha and our metadata.

    Writes what `StableDiffusion3Pipeline.save_lora_weights(..., transformer_lora_adapter_metadata=...)`
    writes (same keys, same `lora_adapter_metadata` header), plus the `sd35hub` header, to a temp
    name renamed into place. rank/alpha/targets/patterns in `metadata` are filled from the model.
    """
    modules = peft_modules(transformer, adapter_name)
    measured = metadata_for(modules)
    full = dataclasses.replace(
        metadata,
        rank=measured.rank,
        alpha=measured.alpha,
        targets=measured.targets,
        rank_pattern=measured.rank_pattern,
        alpha_pattern=measured.alpha_pattern,
    )
    return write_adapter(modules, path, metadata=full, fmt="diffusers")


# --- compatibility -------------------------------------------------------------------------------

_BLOCK_INDEX = re.compile(r"transformer_blocks\.(\d+)\.")


def _describe_width(width: int | None) -> str:
    if width is None:
        return "an SD3-family transformer"
    return f"{KNOWN_WIDTHS.get(width, 'an SD3-family transformer')} ({width} wide)"


def adapter_architecture(state_dict: dict[str, torch.Tensor]) -> tuple[int, int | None]:
    """(blocks the adapter reaches, transformer width it was made for) from diffusers-layout keys."""
    blocks = [int(m.group(1)) for k in state_dict if (m := _BLOCK_INDEX.search(k))]
    width = None
    for key, tensor in state_dict.items():
        if key.endswith(
            (".attn.to_q.lora_A.weight", ".attn.to_out.0.lora_B.weight", "norm1.linear.lora_A.weight")
        ):
            width = int(tensor.shape[1] if "lora_A" in key else tensor.shape[0])
            break
    return (max(blocks) + 1 if blocks else 0), width


def check_compatible(
    state_dict: dict[str, torch.Tensor], target: Any, *, adapter_label: str = "This adapter"
) -> None:
    """Raise AdapterIncompatibleError unless every LoRA module fits `target`.

    `target` is an SD3Transformer2DModel (module names and shapes are checked exactly) or a ModelInfo
    (block count and width). The message names the adapter's architecture and the base model's.
    """
    blocks, width = adapter_architecture(state_dict)
    adapter_arch = f"{_describe_width(width)}, at least {blocks} blocks"
    if hasattr(target, "named_modules"):
        config = target.config
        base_width = int(config.num_attention_heads * config.attention_head_dim)
        base_name = getattr(config, "_name_or_path", "") or "the base model"
        base_arch = f"{_describe_width(base_width)}, {config.num_layers} blocks"
        problems = _shape_problems(state_dict, dict(target.named_modules()))
    else:
        base_width = int(target.hidden_size)
        base_name = target.model_id
        base_arch = f"{_describe_width(base_width)}, {target.num_layers} blocks"
        problems = []
        if blocks > target.num_layers or (width is not None and width != base_width):
            problems.append("block count or width differ")
        attn2 = {int(m.group(1)) for k in state_dict if ".attn2." in k and (m := _BLOCK_INDEX.search(k))}
        if attn2 - set(target.dual_attention_layers):
            problems.append(f"attn2 (dual attention) LoRA on blocks {sorted(attn2)[:4]} that have none")
    if problems:
        raise AdapterIncompatibleError(
            f"{adapter_label} was made for {adapter_arch}; the base model {base_name} is {base_arch} "
            f"({problems[0]}). Use an adapter trained on this base model (check base_model in its card), "
            "or load the base it was trained on."
        )


def _shape_problems(state_dict: dict[str, torch.Tensor], named: dict[str, Any]) -> list[str]:
    problems = []
    for key, tensor in state_dict.items():
        name = key.removeprefix(DIFFUSERS_PREFIX).rsplit(".lora_", 1)[0]
        module = named.get(name)
        if module is None:
            problems.append(f"the base has no layer {name}")
            continue
        in_features, out_features = (
            getattr(module, "in_features", None),
            getattr(module, "out_features", None),
        )
        if ".lora_A." in key and in_features is not None and tensor.shape[1] != in_features:
            problems.append(f"{name} takes {in_features} inputs, the adapter {tensor.shape[1]}")
        if ".lora_B." in key and out_features is not None and tensor.shape[0] != out_features:
            problems.append(f"{name} has {out_features} outputs, the adapter {tensor.shape[0]}")
    return problems


def load_into_transformer(transformer: Any, adapter: Adapter, adapter_name: str) -> None:
    """Load `adapter` into an SD3Transformer2DModel under `adapter_name` (peft), ranks and alphas exact."""
    check_compatible(adapter.state_dict(), transformer, adapter_label=f"Adapter {adapter_name!r}")
    transformer.load_lora_adapter(
        adapter.state_dict(),
        prefix="transformer",
        adapter_name=adapter_name,
        metadata=prefixed_config(adapter.lora_config()),
    )
