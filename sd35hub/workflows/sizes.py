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
import math
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


@dataclass(frozen=True)
class Layout:
    """What a class's tensor names mean (see the module docstring); tests check it against the class."""

    embeddings: tuple[str, ...] = ()  # modules whose 2-D ``weight`` is an nn.Embedding, not an nn.Linear
    keep_fp32: tuple[str, ...] = ()  # the class's _keep_in_fp32_modules
    tied: tuple[tuple[str, str], ...] = ()  # (kept, duplicate): one parameter saved under two names
    buffers: tuple[str, ...] = ()  # floating-point buffers saved with the weights (all must be in the file)


_CLIP = Layout(embeddings=("token_embedding", "position_embedding"))
LAYOUTS: dict[str, Layout] = {
    "CLIPTextModelWithProjection": _CLIP,
    "T5EncoderModel": Layout(embeddings=("shared", "embed_tokens", "relative_attention_bias"), keep_fp32=("wo",),
                             tied=(("shared.weight", "encoder.embed_tokens.weight"),)),
    "AutoencoderKL": Layout(),
    "SD3Transformer2DModel": Layout(buffers=("pos_embed.pos_embed",)),  # persistent when pos_embed_max_size is set
}  # fmt: skip
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # anything else (U8/I8 bnb weights, F8 + scales): the meta model
WEIGHT_STEMS = ("model", "diffusion_pytorch_model")  # transformers' and diffusers' file names
MAX_HEADER = 100 * 2**20
Tensors = dict[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)


def read_header(path: Path) -> Tensors | None:
    """name -> (dtype, shape) of one safetensors file, from its header; None when it is not a complete one."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 2 <= length <= MAX_HEADER:
                return None
            header = json.loads(f.read(length))
        size = path.stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    header.pop("__metadata__", None)
    try:
        tensors = {k: (str(v["dtype"]), tuple(int(d) for d in v["shape"])) for k, v in header.items()}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return tensors if 8 + length + end == size else None  # a truncated file is not read as complete


def _shards(folder: Path) -> tuple[str, ...] | None:
    """File names of the (non-variant) safetensors weights an index lists, or the single file's name."""
    for stem in WEIGHT_STEMS:
        index = _read(folder / f"{stem}.safetensors.index.json")
        if index is not None:
            names = sorted(set((index.get("weight_map") or {}).values()))
            return tuple(names) if names else None
        if (folder / f"{stem}.safetensors").is_file():
            return (f"{stem}.safetensors",)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return (files[0].name,) if len(files) == 1 else None  # one variant only (e.g. *.fp16.safetensors)


def local_tensors(folder: Path) -> Tensors | None:
    """Every tensor of a component folder's safetensors weights, from the headers; None when incomplete."""
    names = _shards(folder) if folder.is_dir() else None
    out: Tensors = {}
    for name in names or ():
        tensors = read_header(folder / name)
        if tensors is None:
            return None
        out.update(tensors)
    return out or None


def hub_tensors(repo_id: str, revision: str | None, component: str, folder: Path, library: str) -> Tensors | None:
    """The same from the Hub (ranged reads of each file's header); None offline or on any failure."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None
    names = _shards(folder) if folder.is_dir() else None
    if names is None:
        names = (f"{'model' if library == 'transformers' else 'diffusion_pytorch_model'}.safetensors",)
    out: Tensors = {}
    try:
        api = HfApi()
        for name in names:
            meta = api.parse_safetensors_file_metadata(repo_id, f"{component}/{name}", revision=revision)
            out.update({k: (str(t.dtype), tuple(int(d) for d in t.shape)) for k, t in meta.tensors.items()})
    except Exception:  # noqa: BLE001 - not there, not safetensors, refused, unreachable: the meta model answers
        return None
    return out or None


def count_tensors(tensors: Tensors, layout: Layout) -> tuple[int, int, int, int, int] | None:
    """(params, quantizable, fp32_params, largest tensor's elements, buffers) as _count would give them for
    the model these tensors were saved from; None when the names do not read as ``layout`` says."""
    tensors = dict(tensors)
    for kept, duplicate in layout.tied:
        if kept in tensors and duplicate in tensors:
            if tensors[kept][1] != tensors[duplicate][1]:
                return None
            del tensors[duplicate]
    if any(b not in tensors for b in layout.buffers):
        return None
    total = quantizable = fp32 = largest = buffers = 0
    for name, (dtype, shape) in tensors.items():
        if dtype not in FLOAT_DTYPES:
            if name.endswith("position_ids"):  # CLIP's integer buffer (older files save it): never counted
                continue
            return None
        n = math.prod(shape)
        total += n
        largest = max(largest, n)
        if name in layout.buffers:
            buffers += n
            continue
        module, _, leaf = name.rpartition(".")
        parts = module.split(".")
        weight = tensors.get(f"{module}.weight")
        linear = weight is not None and len(weight[1]) == 2 and parts[-1] not in layout.embeddings
        kept = any(part in layout.keep_fp32 for part in parts)
        if linear and kept and leaf in ("weight", "bias"):
            fp32 += n
        elif linear and leaf == "weight":
            quantizable += n
    return total, quantizable, fp32, largest, buffers


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


def _meta_counts(name: str, component: str, entry: list[Any], config: dict[str, Any]) -> tuple[int, int, int, int, int]:
    try:
        model = _meta_model(entry[0], entry[1], config)
    except Exception as exc:  # noqa: BLE001 - any library failure is "this config cannot be read"
        raise ModelLoadError(
            f"Could not read {name}/{component}/config.json as a {entry[1]} ({type(exc).__name__}: {exc}); "
            "check that the folder is a complete SD3/SD3.5 diffusers model."
        ) from exc
    total, quantizable, fp32 = _count(model)
    largest = max((t.numel() for t in model.state_dict().values()), default=0)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return total, quantizable, fp32, largest, buffers


def sizes_from_folder(folder: Path, name: str = "model", *, hub: tuple[str, str | None] | None = None,
                      sources: dict[str, str] | None = None) -> dict[str, ComponentSize]:
    """ComponentSize of every component model_index.json lists (text_encoder_3 absent when it is null).

    ``hub`` (repo id, revision): a Hub model's snapshot folder, whose missing weights' headers may be read
    from the Hub. ``sources``, when given, gets each component's source: "header", "hub" or "meta"."""
    index = _read(folder / "model_index.json")
    if index is None:
        raise ModelLoadError(f"{name} has no model_index.json: it is not a diffusers pipeline folder.")
    out: dict[str, ComponentSize] = {}
    for component in COMPONENTS:
        entry = index.get(component) or [None, None]
        config = _read(folder / component / "config.json")
        if entry[0] is None or config is None:
            continue
        layout, counted, source = LAYOUTS.get(str(entry[1])), None, "meta"
        if layout is not None:
            tensors = local_tensors(folder / component)
            source = "header"
            if tensors is None and hub is not None:
                tensors, source = hub_tensors(hub[0], hub[1], component, folder / component, str(entry[0])), "hub"
            counted = count_tensors(tensors, layout) if tensors else None
        if counted is None:
            counted, source = _meta_counts(name, component, entry, config), "meta"
        if sources is not None:
            sources[component] = source
        total, quantizable, fp32, largest_elements, buffers = counted
        largest_tensor = 2 * largest_elements
        largest, all_files = _files(folder / component, total)
        out[component] = ComponentSize(name=component, params=total, quantizable=quantizable, fp32_params=fp32,
                                       largest_file=largest, file_bytes=all_files, largest_tensor=largest_tensor,
                                       buffers=buffers, **_shape(component, config))  # fmt: skip
    if "transformer" not in out:
        raise ModelLoadError(f"{name} has no transformer/config.json: it is not a complete SD3/SD3.5 model.")
    return out


def component_sizes(model: str, revision: str | None = None, *,
                    sources: dict[str, str] | None = None) -> dict[str, ComponentSize]:
    """Sizes of ``model``'s components ("tiny", a local folder or a Hub id: only its JSON files are fetched,
    and the headers of the weights not in the HF cache)."""
    from sd35hub.models.load import ALL_COMPONENTS, model_dir, resolve_model

    ref = resolve_model(model, revision)
    folder = Path(model_dir(ref, ALL_COMPONENTS, configs_only=True))
    if not ref.is_hub:
        return sizes_from_folder(folder, model, sources=sources)
    commit = folder.name if len(folder.name) == 40 and folder.parent.name == "snapshots" else ref.revision
    return sizes_from_folder(folder, model, hub=(ref.name, commit), sources=sources)
