"""Merge a weighted blend of LoRAs into ONE adapter that reproduces the blend exactly.

For every module, a blend of adapters i with weights w_i and scales s_i = alpha_i / r_i adds

    delta_W = sum_i w_i * s_i * B_i @ A_i = B_cat @ A_cat,
    A_cat = concat_rows(A_i)                 [sum r_i, in]
    B_cat = concat_cols(w_i * s_i * B_i)     [out, sum r_i]

so the merged adapter has rank sum r_i and alpha = rank (scale 1): no SVD, no approximation, only
float rounding. A module present in some adapters only gets the ranks of those adapters.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35hub.adapters.formats import (
    LoraModule,
    Modules,
    detect_format,
    modules_from_state_dict,
    to_state_dict,
)
from sd35hub.errors import AdapterError

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _modules_of(item: Any) -> Modules:
    from sd35hub.adapters.files import Adapter, read_adapter

    if isinstance(item, Adapter):
        return item.modules
    if isinstance(item, dict):  # a state dict; diffusers layout without metadata means alpha = rank
        return modules_from_state_dict(item, detect_format(item), None)
    return read_adapter(Path(item)).modules


def merge_modules(items: list[tuple[Any, float]]) -> Modules:
    """[(path | state dict | Adapter, weight), ...] -> merged Modules (rank = sum of ranks, scale 1)."""

    if not items:
        raise AdapterError("Nothing to merge: pass at least one adapter with a weight, e.g. A:0.7 B:0.3")
    return merge_named([(_modules_of(item), float(weight)) for item, weight in items])


def merge_named(loaded: list[tuple[Modules, float]]) -> Modules:
    """[(Modules, weight), ...] of one component (transformer or a text encoder) -> merged Modules.

    Bias deltas (ComfyUI .diff_b) add up as sum w_i * b_i; conv LoRAs concatenate like linear ones.
    """
    import torch

    names = sorted({name for modules, _ in loaded for name in modules})
    merged: Modules = {}
    for name in names:
        parts = [(modules[name], weight) for modules, weight in loaded if name in modules]
        shapes = {(tuple(m.down.shape[1:]), m.up.shape[0]) for m, _ in parts}
        if len(shapes) > 1:
            raise AdapterError(
                f"Cannot merge {name}: the adapters disagree on its shape {sorted(shapes)} (different bases?)"
            )
        dtype = parts[0][0].up.dtype
        down = torch.cat([m.down.to(dtype) for m, _ in parts], dim=0)  # [sum r_i, in]
        up = torch.cat([(m.up.double() * (w * m.scale)).to(dtype) for m, w in parts], dim=1)  # [out, sum r_i]
        biases = [m.bias.double() * w for m, w in parts if m.bias is not None]
        bias = torch.stack(biases).sum(0).float() if biases else None
        merged[name] = LoraModule(down=down, up=up, alpha=float(down.shape[0]), bias=bias)
    return merged


def merge_adapters(items: list[tuple[Any, float]]) -> dict[str, torch.Tensor]:
    """Merged adapter as a diffusers-layout state dict (alpha = rank per module, so no metadata needed)."""
    return to_state_dict(merge_modules(items), "diffusers")[0]


def write_merged(items: list[tuple[str, float]], out_dir: str | Path, *, base_model: str = "") -> Path:
    """Merge local/Hub sources into `out_dir` (adapter + README listing sources and weights)."""
    from sd35hub.adapters.files import AdapterMetadata, metadata_for, read_adapter, write_adapter
    from sd35hub.blend.engine import fetch_adapter_source
    from sd35hub.hub.card import is_hub_id, write_merged_card
    from sd35hub.train.variants import refuse_in_lora_merge

    files = [(source, fetch_adapter_source(source)[0], weight) for source, weight in items]
    for source, file, _ in files:
        refuse_in_lora_merge(source, file)
    adapters = [(read_adapter(file), weight) for _, file, weight in files]
    metas: list[AdapterMetadata] = [a.metadata for a, _ in adapters if a.metadata is not None]
    bases = sorted({m.base_model for m in metas if is_hub_id(m.base_model) or m.base_model == "tiny"})  # never a path
    if base_model and not is_hub_id(base_model):
        raise AdapterError(f"--base-model {base_model!r} is not a Hub id OWNER/NAME (e.g. stabilityai/stable-diffusion-3.5-large)")
    if not base_model and len(bases) > 1:
        raise AdapterError(
            f"The adapters were trained on different bases ({', '.join(bases)}); the merged adapter is for one of "
            "them: pass --base-model OWNER/NAME to name it (the card's base_model, license and snippet)"
        )
    base = base_model or (bases[0] if bases else "")
    words = merged_trigger_words([(a.metadata, w) for a, w in adapters])
    modules = merge_modules(adapters)
    components = sorted({c for a, _ in adapters for c in a.text_encoders})
    text_encoders = {c: merge_named([(a.text_encoders.get(c, {}), float(w)) for a, w in adapters]) for c in components}
    variants = {m.variant for m in metas if m.variant}
    meta = metadata_for(
        modules, base_model=base, variant=variants.pop() if len(variants) == 1 else "", trigger_words=words
    )
    out = Path(out_dir)
    file = write_adapter(modules, out, metadata=meta, text_encoders=text_encoders)
    write_merged_card(out, items, base, words, file.name)
    return file


def merged_trigger_words(items: list[tuple[Any, float]]) -> list[str]:
    """Trigger words of a blend: from adapters with a positive weight only (a negatively weighted
    adapter removes its concept; its word would ask for it), each once (case-insensitive), in order."""
    words: list[str] = []
    for meta, weight in items:
        if meta is None or weight <= 0:
            continue
        for word in meta.trigger_words:
            word = " ".join(str(word).split())
            if word and word.lower() not in {w.lower() for w in words}:
                words.append(word)
    return words
