"""Adapter files: save a peft LoRA with metadata, load any supported layout safely, check it fits a base.

An sd35hub adapter is one safetensors file (default `<dir>/pytorch_lora_weights.safetensors`) in the
layout stock diffusers writes — keys `transformer.<module>.lora_A.weight` / `lora_B.weight` and the
peft LoraConfig in the header under `lora_adapter_metadata`, so `pipe.load_lora_weights(dir)` gets
rank AND alpha right — plus our own `AdapterMetadata` as JSON under the header key `sd35hub`.

Loading refuses pickled files (.bin/.pt/.ckpt/.pth: unpickling runs code) without opening them,
reads kohya and ComfyUI layouts too (sd35hub.adapters.formats), and `check_compatible` turns "wrong base
model" into an AdapterIncompatibleError that names both architectures instead of a shape traceback.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from sd35hub import __version__
from sd35hub.adapters.check import KNOWN_WIDTHS, check_parts, check_transformer
from sd35hub.adapters.formats import (
    Modules,
    Parts,
    lora_config_for,
    parts_from_state_dict,
    prefixed_config,
    to_state_dict,
    unprefixed_configs,
)
from sd35hub.adapters.formats_keys import TRANSFORMER
from sd35hub.errors import AdapterError, UnsafeFileError
from sd35hub.paths import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    import torch

ADAPTER_FILENAME = "pytorch_lora_weights.safetensors"
HEADER_KEY = "sd35hub"  # our AdapterMetadata (JSON) in the safetensors header
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_checkpoint_path(path: str) -> bool:
    """Files inside training checkpoint folders (checkpoint-500/, checkpoints/) are never the adapter."""
    parts = PurePosixPath(path).parts[:-1]
    return any(part.startswith("checkpoint-") or part == "checkpoints" for part in parts)


def pick_adapter_file(filenames: list[str]) -> str:
    """The adapter file among a repo's files; the same answer for the same set of names in any order.

    Order of preference among ``.safetensors`` files outside checkpoint folders:
    ``pytorch_lora_weights.safetensors`` (shallowest first), then names containing "lora", then the
    rest; ties go to the shortest path, then alphabetical. A repo with only pickled weights raises
    UnsafeFileError; one with no weights at all raises AdapterError.
    """
    candidates = [name for name in filenames if not is_checkpoint_path(name)]
    safetensors = [name for name in candidates if name.lower().endswith(".safetensors")]
    if not safetensors:
        pickled = sorted(name for name in candidates if name.lower().endswith(PICKLE_SUFFIXES))
        if pickled:
            raise UnsafeFileError(
                f"This repository only has pickled weights ({', '.join(pickled[:3])}), which can run code when "
                "loaded; sd35hub only loads .safetensors. Ask the author for a safetensors file, or convert it "
                "yourself in a sandbox you trust."
            )
        raise AdapterError(
            "No .safetensors adapter file found in the repository "
            f"(files: {', '.join(sorted(filenames)[:8]) or 'none'}). Pass the file name explicitly."
        )

    def rank(name: str) -> tuple[int, int, str]:
        base = PurePosixPath(name).name.lower()
        tier = 0 if base == ADAPTER_FILENAME else 1 if "lora" in base else 2
        return (tier, len(name), name)

    return min(safetensors, key=rank)


__all__ = ["KNOWN_WIDTHS", "check_transformer"]  # re-exported for callers of the old names


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

    modules: Modules  # the transformer's LoRA, diffusers module names
    metadata: AdapterMetadata | None
    format: str  # layout it was stored in
    path: Path | None = None
    text_encoders: dict[str, Modules] = field(default_factory=dict)  # text_encoder, _2, _3 -> Modules
    network_args: dict[str, Any] = field(default_factory=dict)  # kohya ss_network_args (split_qkv, ...)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Diffusers layout: transformer.<module>.lora_A.weight / lora_B.weight (scale folded, alpha = rank)."""
        return to_state_dict(self.modules, "diffusers")[0]

    @property
    def parts(self) -> Parts:
        return Parts(transformer=self.modules, text_encoders=self.text_encoders, layout=self.format)

    def lora_config(self) -> dict[str, Any]:
        """peft LoraConfig kwargs matching state_dict() (alpha = rank per module: scales folded)."""
        return lora_config_for(_folded_view(self.modules))


def adapter_file(path: str | Path) -> Path:
    """The safetensors file for `path` (a file, or a folder holding one); pickles are refused unopened."""
    path = Path(path)
    if path.is_dir():
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


def read_adapter(path: str | Path, *, base: Any = None) -> Adapter:
    """Read any supported layout from a safetensors file (or a folder holding one), checked on load.

    Every tensor is value-checked (dtype, rank, finite, magnitude) and every module checked against
    `base` (a pipeline, transformer or ModelInfo) or, without one, the SD3 model of the adapter's width.
    """
    from safetensors import SafetensorError, safe_open

    file = adapter_file(path)
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise AdapterError(
            f"{file} is not a readable safetensors file ({exc}). Re-download or re-export it."
        ) from exc
    try:  # JSON strings in the header: invalid JSON, or JSON that is not an object (list, number...)
        configs = unprefixed_configs(header.get("lora_adapter_metadata"))
        metadata = AdapterMetadata.from_json(header[HEADER_KEY]) if header.get(HEADER_KEY) else None
        network_args = network_args_of(header)
    except (ValueError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        raise AdapterError(f"{file} has a malformed metadata header ({exc}); re-export the adapter.") from exc
    split = str(network_args.get("split_qkv", "")).lower() == "true"
    parts = parts_from_state_dict(tensors, configs, split_qkv_members=split)
    check_parts(parts, base, label=f"The adapter {file.name}")
    if metadata is not None:
        metadata.format = parts.layout
    return Adapter(
        modules=parts.transformer, metadata=metadata, format=parts.layout, path=file,
        text_encoders=parts.text_encoders, network_args=network_args,
    )  # fmt: skip


def network_args_of(header: dict[str, str]) -> dict[str, Any]:
    """kohya's `ss_network_args` header (JSON object of strings), or {}."""
    raw = header.get("ss_network_args")
    if not raw:
        return {}
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("ss_network_args is not a JSON object")
    return value


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
    modules: Modules,
    path: str | Path,
    *,
    metadata: AdapterMetadata | None = None,
    fmt: str = "diffusers",
    text_encoders: dict[str, Modules] | None = None,
) -> Path:
    """Write modules (+ text-encoder modules) as `fmt` to `path` (a folder gets pytorch_lora_weights.safetensors),
    atomically. diffusers files get alpha = rank with the scale folded into lora_B (docs/formats.md)."""
    from safetensors.torch import save_file

    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / ADAPTER_FILENAME
    file.parent.mkdir(parents=True, exist_ok=True)
    state_dict, header = to_state_dict(modules, fmt, text_encoders)
    header = {"format": "pt", **header}
    if metadata is not None:
        header[HEADER_KEY] = dataclasses.replace(metadata, format=fmt).to_json()
    from sd35hub.diskspace import tensor_bytes

    return atomic_write(file, lambda temp: save_file(state_dict, str(temp), metadata=header),
                        needed=tensor_bytes(state_dict))


def peft_modules(model: Any, adapter_name: str = "default", component: str = TRANSFORMER) -> Modules:
    """Modules of a peft-LoRA-wrapped model (add_adapter or get_peft_model): the SD3 transformer, or a
    text encoder (`component` text_encoder / text_encoder_2 / text_encoder_3, its own module names)."""
    from peft.utils import get_peft_model_state_dict

    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
    state_dict = {
        f"{component}.{k.removeprefix('base_model.model.')}": v.detach().cpu() for k, v in state_dict.items()
    }
    config = model.peft_config[adapter_name].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    parts = parts_from_state_dict(state_dict, {component: config})
    return parts.transformer if component == TRANSFORMER else parts.text_encoders.get(component, {})


def save_adapter(
    transformer: Any,
    path: Path,
    *,
    metadata: AdapterMetadata,
    adapter_name: str = "default",
    text_encoders: dict[str, Any] | None = None,
) -> Path:
    """Save the LoRA of a peft-wrapped transformer (and text encoders) in stock-diffusers layout.

    Writes what `StableDiffusion3Pipeline.save_lora_weights(..., transformer_lora_adapter_metadata=...)`
    writes (same keys, same `lora_adapter_metadata` header; text encoders as `text_encoder.*`,
    `text_encoder_2.*`, `text_encoder_3.*`), plus the `sd35hub` header, to a temp name renamed into
    place. `text_encoders`: {"text_encoder": peft-wrapped CLIP-L, ...}. Every module is stored with
    alpha = rank (scale folded into lora_B), so diffusers and ComfyUI load it at the trained strength;
    `metadata.alpha` keeps the trained lora_alpha. rank/targets/patterns are filled from the model.
    """
    modules = peft_modules(transformer, adapter_name)
    te_modules = {c: peft_modules(m, adapter_name, c) for c, m in (text_encoders or {}).items()}
    measured = metadata_for(modules)
    full = dataclasses.replace(
        metadata,
        rank=measured.rank,
        alpha=measured.alpha,
        targets=measured.targets,
        rank_pattern=measured.rank_pattern,
        alpha_pattern=measured.alpha_pattern,
    )
    return write_adapter(modules, path, metadata=full, fmt="diffusers", text_encoders=te_modules)


# --- compatibility -------------------------------------------------------------------------------


def check_compatible(
    state_dict: dict[str, torch.Tensor], target: Any, *, adapter_label: str = "This adapter"
) -> None:
    """Raise AdapterIncompatibleError unless every LoRA module of `state_dict` (any layout) fits `target`.

    `target` is an SD3Transformer2DModel or pipeline (module names and shapes are checked exactly) or a
    ModelInfo (the shapes diffusers builds from its config). The message names both architectures.
    """
    check_parts(parts_from_state_dict(state_dict), target, label=adapter_label)


def load_into_transformer(transformer: Any, adapter: Adapter, adapter_name: str) -> None:
    """Load `adapter`'s transformer LoRA into an SD3Transformer2DModel under `adapter_name` (peft), exact.

    An adapter with only text-encoder parts loads nothing here (load_into_pipeline loads those)."""
    if not adapter.modules:
        return
    check_transformer(adapter.modules, transformer, label=f"Adapter {adapter_name!r}")
    state_dict, header = to_state_dict(adapter.modules, "diffusers")
    transformer.load_lora_adapter(
        state_dict,
        prefix="transformer",
        adapter_name=adapter_name,
        metadata=prefixed_config(lora_config_for(_folded_view(adapter.modules))),
    )


def _folded_view(modules: Modules) -> Modules:
    """The modules as written to a diffusers state dict (alpha = rank), for the matching LoraConfig."""
    from sd35hub.adapters.formats import _fold

    return {name: _fold(m) for name, m in modules.items()}


# --- whole pipelines: the transformer and the text encoders ---------------------------------------


def _text_encoder_layers(model: Any) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def load_into_pipeline(pipe: Any, adapter: Adapter, adapter_name: str) -> None:
    """Load `adapter` into an SD3 pipeline under `adapter_name`: the transformer's LoRA (load_into_transformer)
    and each text encoder's (peft, injected into pipe.text_encoder / _2 / _3, ranks and alphas exact).

    A text-encoder part whose encoder is not loaded (--drop-t5) is skipped with a warning.
    """
    import logging

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    from sd35hub.adapters.check_te import check_text_encoder

    label = f"Adapter {adapter_name!r}"
    present = {c: getattr(pipe, c, None) for c in adapter.text_encoders}
    for component, modules in adapter.text_encoders.items():
        if present[component] is not None:
            check_text_encoder(component, modules, present[component], label=label)
    load_into_transformer(pipe.transformer, adapter, adapter_name)
    for component, modules in adapter.text_encoders.items():
        model = present[component]
        if model is None:
            logging.getLogger(__name__).warning(
                "%s: its %s LoRA (%d modules) is not applied: that text encoder is not loaded",
                label, component, len(modules),
            )  # fmt: skip
            continue
        folded = _folded_view(modules)
        config = lora_config_for(folded)
        config.pop("use_rslora", None)
        inject_adapter_in_model(LoraConfig(**config), model, adapter_name=adapter_name)
        state_dict = {}
        for name, module in folded.items():
            state_dict[f"{name}.lora_A.weight"] = module.down
            state_dict[f"{name}.lora_B.weight"] = module.up
            if module.bias is not None:
                state_dict[f"{name}.lora_B.bias"] = module.bias
        set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
        model.to(device=pipe.transformer.device)


def set_pipeline_adapters(pipe: Any, names: list[str], weights: list[float]) -> None:
    """Activate `names` with `weights` in the transformer and in every text encoder that holds any of them."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    present = set(getattr(pipe.transformer, "peft_config", None) or {})
    pairs = [(n, w) for n, w in zip(names, weights, strict=True) if n in present]
    if pairs:
        pipe.transformer.enable_lora()
        pipe.transformer.set_adapters([n for n, _ in pairs], [w for _, w in pairs])
    elif getattr(pipe.transformer, "_hf_peft_config_loaded", False):
        pipe.transformer.disable_lora()  # only text-encoder adapters in this request
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        model = getattr(pipe, component, None)
        layers = _text_encoder_layers(model) if model is not None else []
        if not layers:
            continue
        for layer in layers:
            layer.enable_adapters(True)
        set_weights_and_activate_adapters(model, names, weights)  # names a layer lacks are skipped


def disable_pipeline_adapters(pipe: Any) -> None:
    """The base model: every LoRA off in the transformer and the text encoders (nothing is unloaded)."""
    if getattr(pipe.transformer, "_hf_peft_config_loaded", False):
        pipe.transformer.disable_lora()
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        model = getattr(pipe, component, None)
        for layer in _text_encoder_layers(model) if model is not None else []:
            layer.enable_adapters(False)


def delete_from_pipeline(pipe: Any, adapter_name: str) -> None:
    """Remove one adapter from the transformer and the text encoders (its peft modules are freed)."""
    if adapter_name in (getattr(pipe.transformer, "peft_config", None) or {}):
        pipe.transformer.delete_adapters([adapter_name])
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        model = getattr(pipe, component, None)
        for layer in _text_encoder_layers(model) if model is not None else []:
            if adapter_name in getattr(layer, "lora_A", {}):
                layer.delete_adapter(adapter_name)
