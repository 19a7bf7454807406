"""LoRA variants (``lora.variant``, ``lora.rslora``, ``lora.init``): how each is saved, and its exact weight delta.

Every file is written in a layout a real tool loads (docs/training.md, "LoRA variants"):

    lora, rslora       diffusers LoRA (``transformer.<module>.lora_A/B.weight`` + ``lora_adapter_metadata``);
                       rsLoRA's scale alpha/sqrt(r) is stored as alpha' = alpha*sqrt(r) (scale alpha'/r), so
                       every LoRA loader (diffusers, ComfyUI, kohya after ``convert``) gets it right
    pissa, olora       peft moves s*B0*A0 out of the frozen base (W_res = W - s*B0*A0); the trained change
                       to the ORIGINAL base, s*(B*A - B0*A0), is saved as a plain diffusers LoRA of rank 2r
                       (down = [A; A0], up = [B, -B0]): peft's own PiSSA/OLoRA conversion, exact
    dora               diffusers/peft layout plus ``transformer.<module>.lora_magnitude_vector`` [out] and
                       ``use_dora: true`` in ``lora_adapter_metadata``: what diffusers' ``load_lora_weights``
                       reads (tested: stock diffusers reproduces the trained model)
    lokr, loha         LyCORIS keys as SimpleTuner writes them and ComfyUI's SD3 loader maps
                       (``lycoris_<diffusers module, '.'->'_'>.lokr_w1`` / ``lokr_w2`` / ``lokr_w2_a`` ...,
                       ``.hada_w1_a`` ...; ``.alpha``). Loader convention: scale = alpha / rank of the
                       low-rank factor; with no low-rank factor alpha is ignored, so the scale is folded
                       into ``lokr_w1`` and no alpha is written

:func:`delta_weights` reads any of these back into exact per-module weight deltas (DoRA's depends on the
base weight, so it is given), and :func:`merge_into` adds ``weight * delta`` to a base transformer: the
exact merge / blend of these variants (a weighted sum of deltas). ``sd35hub convert`` carries lora,
rslora and pissa/olora files (plain LoRAs) to kohya / ComfyUI exactly; DoRA, LoKr and LoHa are not a
low-rank pair, so it refuses them, naming the layouts that carry them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sd35hub.config import LoraSpec

LYCORIS_PREFIX = "lycoris_"
VARIANT_HEADER = "sd35hub_variant"  # JSON: variant, rslora, init (how the adapter was trained)
_LOKR = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def is_plain(spec: LoraSpec) -> bool:
    """Trained and saved exactly as before: a standard LoRA with scale alpha/r on the unchanged base."""
    return spec.variant == "lora" and not spec.rslora and spec.init not in ("pissa", "olora")


def rewrites_base(spec: LoraSpec) -> bool:
    return spec.init in ("pissa", "olora")


def _peft_state(transformer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name="default")
    state = {k.removeprefix("base_model.model."): v.detach().float().cpu() for k, v in state.items()}
    return state, transformer.peft_config["default"].to_dict()


def _scale(config: dict[str, Any], rank: int) -> float:
    alpha = float(config.get("lora_alpha", config.get("alpha", rank)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def save_trained(transformer: Any, folder: Path, *, metadata: Any, spec: LoraSpec,
                 initial: dict[str, torch.Tensor] | None = None, text_encoders: dict[str, Any] | None = None) -> Path:
    """Write the trained adapter of ``spec``'s variant in its layout (module docstring). ``initial``: the
    adapter tensors right after attach (lora_state), needed for pissa/olora. ``text_encoders``: {component:
    peft-wrapped encoder} of a text-encoder LoRA (variant lora only: the config refuses the others), saved as
    ``text_encoder.*`` / ``text_encoder_2.*`` / ``text_encoder_3.*`` keys."""
    from sd35hub.adapters.files import metadata_for, peft_modules, save_adapter, write_adapter

    if is_plain(spec):
        return save_adapter(transformer, folder, metadata=metadata, text_encoders=text_encoders)
    te_modules = {c: peft_modules(m, "default", c) for c, m in (text_encoders or {}).items()}
    state, config = _peft_state(transformer)
    header = {VARIANT_HEADER: json.dumps({"variant": spec.variant, "rslora": spec.rslora, "init": spec.init})}
    if spec.variant == "lora":  # rsLoRA and/or PiSSA/OLoRA: a plain LoRA of the original base
        modules = _plain_modules(state, config, initial if rewrites_base(spec) else None)
        import dataclasses

        measured = metadata_for(modules)
        full = dataclasses.replace(metadata, rank=measured.rank, alpha=measured.alpha, targets=measured.targets,
                                   rank_pattern=measured.rank_pattern, alpha_pattern=measured.alpha_pattern)
        return write_adapter(modules, folder, metadata=full, text_encoders=te_modules)
    if spec.variant == "dora":
        tensors, header2 = _dora_tensors(state, config)
        header.update(header2)
        fmt = "diffusers"
    else:
        tensors = _lycoris_tensors(state, config, spec.variant)
        fmt = "lycoris"
    import dataclasses

    header["sd35hub"] = dataclasses.replace(metadata, format=fmt).to_json()
    return _write(tensors, folder, header)


def _write(tensors: dict[str, torch.Tensor], folder: Path, header: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    from sd35hub.adapters.files import ADAPTER_FILENAME
    from sd35hub.paths import atomic_write

    file = folder if folder.suffix == ".safetensors" else folder / ADAPTER_FILENAME
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(file, lambda temp: save_file(tensors, str(temp), metadata={"format": "pt", **header}))


def _pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    names = sorted(k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight"))
    return {n: (state[f"{n}.lora_A.weight"], state[f"{n}.lora_B.weight"]) for n in names}


def _plain_modules(state: dict[str, torch.Tensor], config: dict[str, Any],
                   initial: dict[str, torch.Tensor] | None) -> Any:
    from sd35hub.adapters.formats import LoraModule

    modules = {}
    for name, (down, up) in _pairs(state).items():
        rank = down.shape[0]
        scale = _scale(config, rank)
        if initial is not None:  # PiSSA/OLoRA: s*(B A - B0 A0) as a rank-2r LoRA with the same scale
            a0 = initial[f"{name}.lora_A.default.weight"].float()
            b0 = initial[f"{name}.lora_B.default.weight"].float()
            down, up = torch.cat([down, a0], 0), torch.cat([up, -b0], 1)
        modules[name] = LoraModule(down=down, up=up, alpha=scale * down.shape[0])
    return modules


def _dora_tensors(state: dict[str, torch.Tensor], config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from sd35hub.adapters.formats import DIFFUSERS_PREFIX, prefixed_config

    tensors = {f"{DIFFUSERS_PREFIX}{k}": v for k, v in state.items()}
    pairs = _pairs(state)
    rank = next(iter(pairs.values()))[0].shape[0] if pairs else int(config.get("r", 1))
    lora_config = {
        "r": int(config["r"]), "lora_alpha": float(config["lora_alpha"]), "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {}, "target_modules": sorted(pairs), "lora_dropout": 0.0,
        "init_lora_weights": True, "use_dora": True, "use_rslora": bool(config.get("use_rslora")), "lora_bias": False,
    }  # fmt: skip
    del rank
    return tensors, {"lora_adapter_metadata": json.dumps(prefixed_config(lora_config), indent=2, sort_keys=True)}


def lycoris_name(module: str) -> str:
    return LYCORIS_PREFIX + module.replace(".", "_")


def _lycoris_tensors(state: dict[str, torch.Tensor], config: dict[str, Any], variant: str) -> dict[str, torch.Tensor]:
    leaves = _LOKR if variant == "lokr" else _LOHA
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        if leaf in leaves:
            modules.setdefault(module, {})[leaf] = tensor
    alpha = float(config.get("alpha", config.get("r", 1)))
    rank = int(config.get("r", 1))
    out: dict[str, torch.Tensor] = {}
    for module, parts in sorted(modules.items()):
        scale = alpha / rank  # peft: alpha / r for LoKr and LoHa
        base = lycoris_name(module)
        if variant == "lokr" and "lokr_w1" in parts and "lokr_w2" in parts:  # no low-rank factor: fold the scale
            parts = {**parts, "lokr_w1": parts["lokr_w1"] * scale}
        else:
            low = parts.get("lokr_w2_b", parts.get("lokr_w1_b", parts.get("hada_w1_b")))
            out[f"{base}.alpha"] = torch.tensor(scale * low.shape[0], dtype=torch.float32)
        for leaf, tensor in parts.items():
            out[f"{base}.{leaf}"] = tensor
    return out


# --- reading back: exact deltas and merges ------------------------------------------------------------


def _lycoris_module(stem: str, names: set[str]) -> str:
    """lycoris_transformer_blocks_0_attn_to_q -> transformer_blocks.0.attn.to_q (names: the base's Linears)."""
    body = stem.removeprefix(LYCORIS_PREFIX)
    for name in names:
        if name.replace(".", "_") == body:
            return name
    raise KeyError(stem)


@dataclass
class VariantAdapter:
    """A DoRA / LoKr / LoHa file we write, read back as per-module factors (diffusers module names)."""

    kind: str  # dora | lokr | loha
    factors: dict[str, dict[str, torch.Tensor]]  # module -> {leaf: fp32 tensor}
    scales: dict[str, float]  # module -> the trained scale (LoKr/LoHa: alpha / rank, 1 when folded; DoRA: s)
    metadata: Any = None  # sd35hub.adapters.files.AdapterMetadata from the header, when present
    path: Path | None = None

    def delta(self, module: str, base: torch.Tensor) -> torch.Tensor:
        """delta W [out, in] of ``module`` at full strength (fp32); DoRA's depends on the base weight."""
        return module_delta(self.kind, self.factors[module], self.scales[module], base)


VARIANT_KINDS = {"dora": "DoRA", "lokr": "LoKr", "loha": "LoHa"}


def variant_kind(keys: Any) -> str | None:
    """dora | lokr | loha for the keys of a variant file we write (LyCORIS stems or DoRA magnitudes), else None."""
    keys = list(keys)
    if any(k.startswith(LYCORIS_PREFIX) and k.rpartition(".")[2] in _LOKR for k in keys):
        return "lokr"
    if any(k.startswith(LYCORIS_PREFIX) and k.rpartition(".")[2] in _LOHA for k in keys):
        return "loha"
    if any(k.endswith(".lora_magnitude_vector") for k in keys) and all(k.startswith("transformer.") for k in keys):
        return "dora"
    return None


def file_variant_kind(path: str | Path) -> str | None:
    """variant_kind of a safetensors file (reads the key names only)."""
    from safetensors import SafetensorError, safe_open

    from sd35hub.adapters.files import adapter_file

    try:
        with safe_open(str(adapter_file(path)), framework="pt") as handle:
            return variant_kind(handle.keys())
    except (SafetensorError, OSError, ValueError, TypeError):  # unreadable: read_adapter reports it
        return None


def read_variant(path: str | Path, module_names: Any) -> VariantAdapter:
    """Read a DoRA / LoKr / LoHa file (see the module docstring for the layouts), value- and shape-checked.
    ``module_names``: {name: weight shape (out, in)} of the base's Linears (LyCORIS stems are matched against them)."""

    from sd35hub.adapters.files import HEADER_KEY, AdapterMetadata
    from sd35hub.adapters.formats import unprefixed_config
    from sd35hub.adapters.formats_values import check_alpha, check_tensor
    from sd35hub.errors import AdapterError, AdapterIncompatibleError

    file, header, tensors, kind = _open_variant(path)
    try:
        metadata = AdapterMetadata.from_json(header[HEADER_KEY]) if header.get(HEADER_KEY) else None
        config = (unprefixed_config(header.get("lora_adapter_metadata")) or {}) if kind == "dora" else {}
    except (ValueError, TypeError, AttributeError) as exc:
        raise AdapterError(f"{file} has a malformed metadata header ({exc}); re-export the adapter.") from exc
    names = {n: tuple(shape) for n, shape in module_names.items()}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if kind == "dora":
            stem, _, leaf = key.removeprefix("transformer.").rpartition(".")
            if leaf == "weight":  # lora_A.weight / lora_B.weight
                stem, _, leaf = stem.rpartition(".")
        else:
            stem, _, leaf = key.rpartition(".")
        if leaf == "alpha":
            grouped.setdefault(stem, {})[leaf] = torch.tensor(check_alpha(key, tensor))
            continue
        check_tensor(key, tensor, "diff")
        grouped.setdefault(stem, {})[leaf] = tensor.float()
    factors, scales = {}, {}
    for stem, parts in grouped.items():
        if kind == "dora":
            name = stem
        else:
            name = next((n for n in names if n.replace(".", "_") == stem.removeprefix(LYCORIS_PREFIX)), stem)
        if name not in names:
            raise AdapterIncompatibleError(f"The {VARIANT_KINDS[kind]} adapter {file.name} targets {name!r}, which "
                                           "this base model does not have: it was trained on another model")
        shape = delta_shape(kind, parts)
        if shape is None:
            raise AdapterError(f"The {VARIANT_KINDS[kind]} module {stem} of {file.name} lacks a factor or its factors' "
                               f"shapes do not fit together ({sorted(parts)}): the file is damaged")
        if shape != tuple(names[name]):
            raise AdapterIncompatibleError(f"The {VARIANT_KINDS[kind]} adapter {file.name} makes a {shape} change for "
                                           f"{name}, whose weight is {tuple(names[name])}: it was trained on another model")
        factors[name] = parts
        scales[name] = _variant_scale(kind, parts, config)
    return VariantAdapter(kind=kind, factors=factors, scales=scales, metadata=metadata, path=file)


def _variant_scale(kind: str, p: dict[str, torch.Tensor], config: dict[str, Any]) -> float:
    if kind == "dora":
        return _scale(config, p["lora_A"].shape[0])
    rank = None  # the loader's rule (ComfyUI weight_adapter lokr/loha): alpha / rank of the low-rank factor
    if kind == "loha":
        rank = p["hada_w1_b"].shape[0]
    else:
        if "lokr_w1" not in p:
            rank = p["lokr_w1_b"].shape[0]
        if "lokr_w2" not in p:
            rank = p["lokr_w2_b"].shape[0]
    return float(p["alpha"]) / rank if "alpha" in p and rank is not None else 1.0


def module_delta(kind: str, p: dict[str, torch.Tensor], scale: float, base: torch.Tensor) -> torch.Tensor:
    """delta W of one module (fp32, the base's shape, on the base's device)."""
    w = base.float()
    p = {k: v.to(w.device) for k, v in p.items()}
    if kind == "loha":
        delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * scale
    elif kind == "lokr":
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        delta = torch.kron(w1, w2) * scale
    else:  # peft DoRA: m * (W + sBA) / ||W + sBA|| per output row, minus W
        adapted = w + scale * (p["lora_B"] @ p["lora_A"])
        return (p["lora_magnitude_vector"] / adapted.norm(p=2, dim=1)).unsqueeze(1) * adapted - w
    return delta.reshape(w.shape)


def delta_shape(kind: str, p: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """(out, in) of the delta the factors make, or None when they do not fit together."""
    def dims(*names: str) -> tuple[int, ...] | None:
        return tuple(x for n in names for x in p[n].shape) if all(n in p and p[n].ndim == 2 for n in names) else None

    try:
        if kind == "loha":
            a1, b1, a2, b2 = (p[n].shape for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
            ok = a1[1] == b1[0] and a2[1] == b2[0] and a1[0] == a2[0] and b1[1] == b2[1]
            return (a1[0], b1[1]) if ok else None
        if kind == "lokr":
            w1 = dims("lokr_w1") or (lambda a, b: (a[0], b[1]) if a[1] == b[0] else None)(
                p["lokr_w1_a"].shape, p["lokr_w1_b"].shape)
            w2 = dims("lokr_w2") or (lambda a, b: (a[0], b[1]) if a[1] == b[0] else None)(
                p["lokr_w2_a"].shape, p["lokr_w2_b"].shape)
            return (w1[0] * w2[0], w1[1] * w2[1]) if w1 and w2 else None
        up, down, magnitude = p["lora_B"].shape, p["lora_A"].shape, p["lora_magnitude_vector"].shape
        return (up[0], down[1]) if up[1] == down[0] and tuple(magnitude) == (up[0],) else None
    except (KeyError, IndexError):
        return None


def delta_weights(path: str | Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{module: delta W [out, in]} of an adapter file we write (any variant). ``base``: {module: W} of
    the base's Linear weights (DoRA's delta depends on W; the module names of LyCORIS keys come from it)."""
    from safetensors import safe_open

    from sd35hub.adapters.files import adapter_file

    with safe_open(str(adapter_file(path)), framework="pt") as handle:
        kind = variant_kind(handle.keys())
    if kind is not None:
        variant = read_variant(path, {n: tuple(w.shape) for n, w in base.items()})
        return {name: variant.delta(name, base[name]) for name in variant.factors}
    from sd35hub.adapters.files import read_adapter

    return {name: m.up.float() @ m.down.float() * (m.alpha / m.rank) for name, m in read_adapter(path).modules.items()}


def linear_weights(transformer: Any) -> dict[str, torch.Tensor]:
    """{module path: weight} of every nn.Linear of a transformer (under a peft LoRA layer: its base layer's)."""
    return {n.removesuffix(".base_layer"): m.weight for n, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and ".lora_" not in n}


def merge_into(transformer: Any, items: list[tuple[str | Path, float]]) -> int:
    """Add sum_i weight_i * delta_i to a plain (un-adapted) transformer's Linear weights, in place: the exact
    merge / blend of adapters of any variant. Returns the number of weights changed."""
    weights = linear_weights(transformer)
    base = {n: w.detach().float().clone() for n, w in weights.items()}  # every delta sees the original base
    total: dict[str, torch.Tensor] = {}
    for path, weight in items:
        for name, delta in delta_weights(path, base).items():
            total[name] = total.get(name, 0) + weight * delta
    with torch.no_grad():
        for name, delta in total.items():
            weights[name].add_(delta.to(weights[name].dtype))
    return len(total)


# --- convert: the layouts that carry each variant ----------------------------------------------------

CARRIERS = {
    "lokr": ("comfyui", "the LyCORIS layout (lycoris_<module> keys) that ComfyUI's LoraLoader maps for SD3"),
    "loha": ("comfyui", "the LyCORIS layout (lycoris_<module> keys) that ComfyUI's LoraLoader maps for SD3"),
    "dora": ("diffusers", "the diffusers/peft layout (lora_A/lora_B + lora_magnitude_vector, use_dora in "
                          "lora_adapter_metadata) that stock diffusers' load_lora_weights reads"),
}
_WHY_NOT = {
    "lokr": "a Kronecker product is not a low-rank pair, so the diffusers and kohya LoRA layouts cannot hold it "
            "(exactly, only at a rank near full)",
    "loha": "a Hadamard product is not a low-rank pair, so the diffusers and kohya LoRA layouts cannot hold it "
            "(exactly, only at rank r^2)",
    "dora": "peft's DoRA normalises each output row of W + sBA; ComfyUI's dora_scale normalises input columns "
            "(or, in some versions, divides by the unadapted weight's norms) and kohya's lora_sd3 has no DoRA, "
            "so neither file would reproduce it",
}


def convert_variant(path: str | Path, out: str | Path, to: str) -> tuple[str, Path, int]:
    """Write a DoRA / LoKr / LoHa file in the one layout that carries it, exactly (the same tensors and
    header), or raise AdapterError naming that layout. Returns (kind, written file, modules)."""

    from sd35hub.adapters.formats_values import check_alpha, check_tensor
    from sd35hub.errors import AdapterError

    file, header, tensors, kind = _open_variant(path)
    layout, description = CARRIERS[kind]
    if to != layout:
        raise AdapterError(
            f"{file.name} is a {VARIANT_KINDS[kind]} adapter: {_WHY_NOT[kind]}. The layout that carries it is "
            f"{description}: convert with --to {layout}. sd35hub generate, the Space and merge_into read the file as is."
        )
    for key, tensor in tensors.items():
        if key.endswith(".alpha"):
            check_alpha(key, tensor)
        else:
            check_tensor(key, tensor, "diff")
    header = {k: v for k, v in header.items() if k != "format"}
    modules = len({k.rpartition(".")[0].removesuffix(".lora_A").removesuffix(".lora_B") for k in tensors
                   if not k.endswith(".alpha")})
    return kind, _write(tensors, Path(out), header), modules


def variant_summary(path: str | Path) -> dict[str, Any]:
    """What `adapter-info` shows for a DoRA / LoKr / LoHa file: kind, layout, module count, metadata."""
    from safetensors import safe_open

    from sd35hub.adapters.files import HEADER_KEY, AdapterMetadata, adapter_file

    file = adapter_file(path)
    with safe_open(str(file), framework="pt") as handle:
        header = handle.metadata() or {}
        keys = list(handle.keys())
    kind = variant_kind(keys)
    stems = {k.removeprefix("transformer.").rpartition(".")[0].removesuffix(".lora_A").removesuffix(".lora_B")
             for k in keys}
    try:
        metadata = AdapterMetadata.from_json(header[HEADER_KEY]) if header.get(HEADER_KEY) else None
    except (ValueError, TypeError):
        metadata = None
    layout = "diffusers/peft (DoRA)" if kind == "dora" else "LyCORIS (lycoris_* keys)"
    return {"file": file, "kind": VARIANT_KINDS.get(kind or "", "?"), "layout": layout, "modules": len(stems),
            "metadata": metadata, "loads_in": CARRIERS[kind][1] if kind else ""}


def refuse_in_lora_merge(source: str, path: str | Path) -> None:
    """`sd35hub merge` joins low-rank LoRAs: name what to do with a DoRA / LoKr / LoHa file instead."""
    from sd35hub.errors import AdapterError

    kind = file_variant_kind(path)
    if kind is not None:
        raise AdapterError(
            f"{source} is a {VARIANT_KINDS[kind]} adapter: `sd35hub merge` joins low-rank LoRAs into one LoRA (ranks "
            f"concatenated) and a {VARIANT_KINDS[kind]} is not one. Blend it by weight with `sd35hub generate --lora "
            f"{source}:W` (or the Space), or merge it into a base's weights with sd35hub.train.variants.merge_into."
        )


def _open_variant(path: Any) -> tuple[Any, dict[str, str], dict[str, Any], str]:
    """The adapter file of ``path``, its header, its tensors and its variant kind (AdapterError when it is
    not a DoRA / LoKr / LoHa file)."""
    from safetensors import safe_open

    from sd35hub.adapters.files import adapter_file
    from sd35hub.errors import AdapterError

    file = adapter_file(path)
    with safe_open(str(file), framework="pt") as handle:
        header = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    kind = variant_kind(tensors)
    if kind is None:
        raise AdapterError(f"{file.name} is not a DoRA, LoKr or LoHa file written by sd35hub")
    return file, header, tensors, kind
