"""Two small sample adapters for the tiny model, so the Space works with no GPU and no Hub (`make space`).

    ensure_sample_adapters()  ->  {"sample-watercolor": <cache>/space-samples-v1/sample-watercolor/
                                   pytorch_lora_weights.safetensors, "sample-ink": ...}

They are random LoRAs (B non-zero, so they visibly change the tiny model's output), built
deterministically from fixed seeds into `$SD35HUB_CACHE` (default ~/.cache/sd35hub) and written with
`sd35hub.adapters.files.save_adapter` (temp name + rename), so they are ordinary sd35hub adapter files with
metadata and trigger words. Built once; later calls only check the files exist.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from sd35hub.adapters.files import ADAPTER_FILENAME

SAMPLES_DIRNAME = "space-samples-v1"
SAMPLE_PREFIX = "sample:"  # how the Space names them: "sample:sample-watercolor"


@dataclass(frozen=True)
class SampleSpec:
    name: str
    trigger_word: str
    rank: int
    seed: int
    targets: tuple[str, ...]


SAMPLES: tuple[SampleSpec, ...] = (
    SampleSpec("sample-watercolor", "wtrclr style", 4, 101, ("to_q", "to_k", "to_v", "to_out.0")),
    SampleSpec("sample-ink", "inkd style", 2, 202, ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")),
)
_BUILD_LOCK = threading.Lock()  # two sessions clicking "use samples" at once build once


def samples_dir(cache_dir: Path | None = None) -> Path:
    from sd35hub.paths import default_cache_dir

    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / SAMPLES_DIRNAME


def ensure_sample_adapters(cache_dir: Path | None = None) -> dict[str, Path]:
    """Sample adapter name -> its safetensors file, building the missing ones (~1 s on 2 cores)."""
    root = samples_dir(cache_dir)
    files = {spec.name: root / spec.name / ADAPTER_FILENAME for spec in SAMPLES}
    if all(file.is_file() for file in files.values()):
        return files
    with _BUILD_LOCK:
        missing = [spec for spec in SAMPLES if not files[spec.name].is_file()]
        if missing:
            _build(missing, root)
    return files


def _build(specs: list[SampleSpec], root: Path) -> None:
    import torch
    from peft import LoraConfig

    from sd35hub.adapters.files import AdapterMetadata, save_adapter
    from sd35hub.models.load import load_transformer

    transformer = load_transformer("tiny", dtype="fp32")
    for spec in specs:
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=float(spec.rank),
            target_modules=list(spec.targets),
            init_lora_weights="gaussian",
        )
        transformer.add_adapter(config, adapter_name=spec.name)
        generator = torch.Generator().manual_seed(spec.seed)
        with torch.no_grad():  # peft starts B at zero (no effect): give both matrices random values
            for param_name, param in transformer.named_parameters():
                if f".lora_A.{spec.name}." in param_name or f".lora_B.{spec.name}." in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        metadata = AdapterMetadata(
            rank=0, alpha=0.0, base_model="tiny", variant="tiny", trigger_words=[spec.trigger_word]
        )
        save_adapter(transformer, root / spec.name, metadata=metadata, adapter_name=spec.name)


def sample_name(source: str) -> str | None:
    """'sample:sample-ink' -> 'sample-ink'; None for any other source."""
    if not source.startswith(SAMPLE_PREFIX):
        return None
    name = source[len(SAMPLE_PREFIX) :]
    return name if name in {spec.name for spec in SAMPLES} else None
