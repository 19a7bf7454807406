"""Refusals that must come before any download: checked right after the config validates.

``preflight(config)`` (called by ``Trainer.setup`` before the Hub access check, the dataset scan and
the model load) raises at once when

* an option needs a package that is not installed (8-bit AdamW -> bitsandbytes, Prodigy ->
  prodigyopt, W&B -> wandb, TensorBoard -> tensorboard, xformers, FP8 -> torchao, NF4/int8 ->
  bitsandbytes): a ``MissingDependencyError`` naming the pip extra, never a silent substitute;
* ``--output``, ``train.checkpoint_dir`` or ``data.cache_dir`` is an existing file (or lies under one);
* ``--resume`` points at a checkpoint whose LoRA rank is not ``lora.rank`` (read from the
  safetensors header only; nothing is loaded).

Each is what used to surface only after the pipeline was loaded and every latent cached.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sd35hub.config import Config
from sd35hub.errors import ConfigError, MissingDependencyError

# (config key, value that needs it) -> (package to import, pip package, extra, what the user asked for)
_PACKAGES = {
    ("train.optimizer", "adamw8bit"): ("bitsandbytes", "bitsandbytes", "quant", "train.optimizer=adamw8bit"),
    ("train.optimizer", "prodigy"): ("prodigyopt", "prodigyopt", "prodigy", "train.optimizer=prodigy"),
    ("train.report_to", "wandb"): ("wandb", "wandb", None, "train.report_to=[wandb] (Weights & Biases)"),
    ("train.report_to", "tensorboard"): ("tensorboard", "tensorboard", "tracking", "train.report_to=[tensorboard]"),
    ("model.attention", "xformers"): ("xformers", "xformers", "xformers", "model.attention=xformers"),
    ("model.float8", True): ("torchao", "torchao", "fp8", "model.float8=true (FP8 matmuls)"),
    ("model.quantize", "nf4"): ("bitsandbytes", "bitsandbytes", "quant", "model.quantize=nf4"),
    ("model.quantize", "int8"): ("bitsandbytes", "bitsandbytes", "quant", "model.quantize=int8"),
    ("model.text_encoder_quantize", "nf4"): ("bitsandbytes", "bitsandbytes", "quant", "model.text_encoder_quantize=nf4"),
    ("model.text_encoder_quantize", "int8"): ("bitsandbytes", "bitsandbytes", "quant", "model.text_encoder_quantize=int8"),
}
_ALTERNATIVES = {"tensorboard": ("tensorboard", "tensorboardX")}  # accelerate accepts either


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-installed package
        return False


def _wanted(config: Config, key: str) -> list[object]:
    section, name = key.split(".")
    value = getattr(getattr(config, section), name)
    return list(value) if isinstance(value, tuple) else [value]


def check_packages(config: Config) -> None:
    for (key, value), (module, package, extra, feature) in _PACKAGES.items():
        if value in _wanted(config, key) and not any(installed(m) for m in _ALTERNATIVES.get(module, (module,))):
            raise MissingDependencyError(package, feature, extra=extra)


def _file_in_the_way(path: Path) -> Path | None:
    """``path`` or its nearest existing ancestor when that is not a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def check_paths(config: Config) -> None:
    problems = []
    if not config.train.output_dir.strip():
        problems.append("train.output_dir is empty; pass --output with a folder for the adapter, card and checkpoints")
    for key, value, flag in (("train.output_dir", config.train.output_dir, "--output"),
                             ("train.checkpoint_dir", config.train.checkpoint_dir, "train.checkpoint_dir=FOLDER"),
                             ("data.cache_dir", config.data.cache_dir, "data.cache_dir=FOLDER")):
        if not value:
            continue
        blocker = _file_in_the_way(Path(value).expanduser())
        if blocker is not None:
            where = "is an existing file" if blocker == Path(value).expanduser() else f"is inside {str(blocker)!r}, a file"
            problems.append(f"{key}={value!r} {where}; it must be a folder: pass {flag} with a folder path")
    if problems:
        raise ConfigError(problems)


def checkpoint_lora_shape(checkpoint: Path) -> tuple[str, tuple[int, ...]] | None:
    """(name, shape) of the first LoRA down-projection in a checkpoint (its rows are the rank), from the header only."""
    from safetensors import safe_open

    file = checkpoint / "lora.safetensors"
    try:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if ".lora_A." in key or key.endswith("lora_A.weight") or ".lora_down." in key:
                    return key, tuple(int(n) for n in handle.get_slice(key).get_shape())
    except Exception:  # noqa: BLE001 - a damaged checkpoint is the resume code's to report (and fall back from)
        return None
    return None


def check_resume(config: Config) -> None:
    if not config.train.resume or config.lora.rank is None:  # rank None: the trainer checks after the profile chose it
        return
    from sd35hub.train.checkpoint import resolve_resume

    train = config.train
    checkpoint_dir = Path(train.checkpoint_dir or Path(train.output_dir) / "checkpoints")
    path = resolve_resume(train.resume, checkpoint_dir)  # ConfigError now for a path that is no checkpoint
    if path is None:
        return
    found = checkpoint_lora_shape(path)
    if found is None or len(found[1]) != 2 or found[1][0] == config.lora.rank:
        return
    (key, shape), rank = found, found[1][0]
    raise ConfigError(
        f"lora.rank={config.lora.rank} but the checkpoint {str(path)!r} was trained with rank {rank}: {key} has "
        f"shape {shape} in the checkpoint but ({config.lora.rank}, {shape[1]}) here. A LoRA cannot change rank "
        f"mid-run: resume with lora.rank={rank} (--rank {rank}), or start a new run in a new output dir "
        "(another --output) without --resume."
    )


def preflight(config: Config) -> None:
    """Every refusal that needs no download (see the module docstring); raise the first one found."""
    check_paths(config)
    check_packages(config)
    check_resume(config)
