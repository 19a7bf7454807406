"""How big each component of a base model is, from its config.json files alone (no weights).

    sizes = component_sizes("stabilityai/stable-diffusion-3.5-large")   # downloads only *.json
    sizes["text_encoder_3"].weight_bytes("bf16", quantize="nf4")

Each component is instantiated on PyTorch's meta device from its config (a fraction of a second
even for T5-XXL: no memory is allocated), so the parameter counts are exact for any config: the
real CLIP-L / CLIP-G / T5-XXL / MMDiT / VAE and the tiny model alike. What bitsandbytes would
quantize (the weights of ``nn.Linear`` layers outside the model's ``_keep_in_fp32_modules``, e.g.
T5's ``wo``) is counted separately, so 8-bit and NF4 sizes follow from the same numbers.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd35hub.errors import ModelLoadError

COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer")
LABELS = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5-XXL", "vae": "VAE",
          "transformer": "MMDiT"}  # fmt: skip
NF4_BYTES = 0.5 + 4 / 64  # 4-bit weights + one fp32 absmax per block of 64 (bnb, no double quantization)
INT8_BYTES = 1.0  # LLM.int8 weights (+ one scale per row, negligible)


@dataclass(frozen=True)
class ComponentSize:
    """Parameter counts of one component and the shape numbers its activations scale with."""

    name: str  # text_encoder | text_encoder_2 | text_encoder_3 | vae | transformer
    params: int  # every parameter and floating-point buffer
    quantizable: int  # nn.Linear weights bitsandbytes would replace
    fp32_params: int  # kept in fp32 when the model loads in fp16 (transformers' _keep_in_fp32_modules)
    largest_file: int  # bytes of the largest weights file (mapped into host memory while it loads)
    file_bytes: int = 0  # bytes of all its weights files (transformers maps every shard at once)
    largest_tensor: int = 0  # elements of its largest tensor x 2 (bf16/fp16 files): the streaming loader's buffer
    width: int = 0  # hidden size / d_model / first VAE block channels
    ffn: int = 0  # MLP width
    layers: int = 0
    dual_layers: int = 0  # MMDiT blocks with a second attention (SD3.5 Medium)
    buffers: int = 0  # elements of floating-point buffers (SD3's pos_embed: pos_embed_max_size² x width)

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)

    def weight_bytes(self, dtype: str, quantize: str = "none") -> int:
        """Bytes the loaded weights take on their device (dtype fp16 | bf16 | fp32 of the load)."""
        size = 4 if dtype == "fp32" else 2
        keep32 = self.fp32_params if dtype == "fp16" else 0  # transformers upcasts them for fp16 loads only
        rest = self.params - keep32
        if quantize in ("nf4", "int8"):
            per = NF4_BYTES if quantize == "nf4" else INT8_BYTES
            quantized = self.quantizable  # _keep_in_fp32_modules are never quantized (not in `quantizable`)
            return int(quantized * per + (rest - quantized) * size + keep32 * 4)
        return int(rest * size + keep32 * 4)


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON ({exc}); re-download or re-save the model.") from exc


def _files(folder: Path, params: int) -> tuple[int, int]:
    """(largest, total) bytes of the *.safetensors files; from the shard index (Hub, configs only) when absent."""
    files = [f.stat().st_size for f in folder.glob("*.safetensors")] if folder.is_dir() else []
    if files:
        return max(files), sum(files)
    for index in folder.glob("*.safetensors.index.json") if folder.is_dir() else []:
        data = _read(index) or {}
        total = int((data.get("metadata") or {}).get("total_size") or 0)
        shards = len(set((data.get("weight_map") or {}).values())) or 1
        if total:
            return total // shards, total
    return params * 2, params * 2  # one bf16/fp16 file (what the SD3.5 repos ship)


def _meta_model(library: str, class_name: str, config: dict[str, Any]) -> Any:
    import torch

    module = importlib.import_module(library)
    cls = getattr(module, class_name)
    with torch.device("meta"):
        if library == "transformers":
            config_obj = cls.config_class.from_dict(config)
            return cls(config_obj)
        return cls.from_config(config)


def _count(model: Any) -> tuple[int, int, int]:
    import torch

    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    total = sum(p.numel() for p in model.parameters())
    total += sum(b.numel() for b in model.buffers() if b.is_floating_point())  # not e.g. CLIP's position ids
    quantizable = fp32 = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        kept = any(part in keep for part in name.split("."))
        if kept:
            fp32 += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        else:
            quantizable += module.weight.numel()
    return total, quantizable, fp32


def _shape(name: str, config: dict[str, Any]) -> dict[str, int]:
    if name == "transformer":
        heads, dim = int(config.get("num_attention_heads", 1)), int(config.get("attention_head_dim", 1))
        return {"width": heads * dim, "ffn": 4 * heads * dim, "layers": int(config.get("num_layers", 0)),
                "dual_layers": len(config.get("dual_attention_layers") or ())}  # fmt: skip
    if name == "vae":
        channels = config.get("block_out_channels") or [128]
        return {"width": int(channels[0]), "ffn": int(channels[min(1, len(channels) - 1)]), "layers": len(channels)}
    if name == "text_encoder_3":
        return {"width": int(config.get("d_model", 0)), "ffn": int(config.get("d_ff", 0)),
                "layers": int(config.get("num_layers", 0))}  # fmt: skip
    return {"width": int(config.get("hidden_size", 0)), "ffn": int(config.get("intermediate_size", 0)),
            "layers": int(config.get("num_hidden_layers", 0))}  # fmt: skip


def sizes_from_folder(folder: Path, name: str = "model") -> dict[str, ComponentSize]:
    """ComponentSize of every component model_index.json lists (text_encoder_3 absent when it is null)."""
    index = _read(folder / "model_index.json")
    if index is None:
        raise ModelLoadError(f"{name} has no model_index.json: it is not a diffusers pipeline folder.")
    out: dict[str, ComponentSize] = {}
    for component in COMPONENTS:
        entry = index.get(component) or [None, None]
        config = _read(folder / component / "config.json")
        if entry[0] is None or config is None:
            continue
        try:
            model = _meta_model(entry[0], entry[1], config)
        except Exception as exc:  # noqa: BLE001 - any library failure is "this config cannot be read"
            raise ModelLoadError(
                f"Could not read {name}/{component}/config.json as a {entry[1]} ({type(exc).__name__}: {exc}); "
                "check that the folder is a complete SD3/SD3.5 diffusers model."
            ) from exc
        total, quantizable, fp32 = _count(model)
        largest_tensor = 2 * max((t.numel() for t in model.state_dict().values()), default=0)
        buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
        del model
        largest, all_files = _files(folder / component, total)
        out[component] = ComponentSize(name=component, params=total, quantizable=quantizable, fp32_params=fp32,
                                       largest_file=largest, file_bytes=all_files, largest_tensor=largest_tensor,
                                       buffers=buffers, **_shape(component, config))  # fmt: skip
    if "transformer" not in out:
        raise ModelLoadError(f"{name} has no transformer/config.json: it is not a complete SD3/SD3.5 model.")
    return out


def component_sizes(model: str, revision: str | None = None) -> dict[str, ComponentSize]:
    """Sizes of ``model``'s components ("tiny", a local folder or a Hub id: only its JSON files are fetched)."""
    from sd35hub.models.load import ALL_COMPONENTS, model_dir, resolve_model

    ref = resolve_model(model, revision)
    folder = model_dir(ref, ALL_COMPONENTS, configs_only=True)
    return sizes_from_folder(Path(folder), model)
