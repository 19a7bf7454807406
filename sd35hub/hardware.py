"""GPU detection -> a hardware profile -> the training settings the config left open.

    profile = detect_profile("auto")                 # reads torch.cuda (or faked device_props)
    config, notes = apply_profile(config, profile)   # fills only what the user did not choose
    print(profile.describe()); print(*notes, sep="\\n")

The profile is the lowest layer of the config: profile < YAML < flags and dotted overrides. Every field
a profile may fill defaults to ``None`` or ``"auto"`` in the config dataclasses, so a value anyone set
(in YAML, a flag, or ``DataSpec(resolution=1024)`` in Python) is never replaced, and no record of "which
keys did the user set" is needed. Profiles are resolved from device properties and model
configs only, before any weights load. The t4 and h100 rows are measured on an H100 (speed and
peak memory, docs/performance.md), the h200 batches on an H200; l4 and a100 rows are derived from them,
not measured on those cards.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from sd35hub.config import Config

GIB = 1024**3


@dataclass(frozen=True)
class HardwareProfile:
    name: str  # cpu | t4 | l4 | a100-40 | a100-80 | h100 | h200
    batch_size: int  # per device
    gradient_accumulation: int
    resolution: int  # pixels (bucket side)
    rank: int
    mixed_precision: str  # no | fp16 (GradScaler, fp32 LoRA) | bf16
    weight_dtype: str  # frozen base dtype: fp32 | fp16 | bf16
    gradient_checkpointing: bool
    quantize: str  # frozen transformer: none | nf4 | int8
    optimizer: str  # adamw | adamw8bit
    compile: bool  # torch.compile each transformer block
    device_name: str = "cpu"
    vram_gib: float = 0.0
    reasons: list[str] = field(default_factory=list)

    def describe(self) -> str:
        head = (
            f"hardware profile {self.name} ({self.device_name}, {self.vram_gib:.0f} GiB): batch {self.batch_size} x "
            f"accumulation {self.gradient_accumulation}, {self.resolution} px, rank {self.rank}, "
            f"{self.mixed_precision} mixed precision, {self.weight_dtype} base, quantize {self.quantize}, "
            f"checkpointing {'on' if self.gradient_checkpointing else 'off'}, optimizer {self.optimizer}, "
            f"compile {'on' if self.compile else 'off'}"
        )
        return "\n".join([head] + [f"  - {r}" for r in self.reasons])


def _has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _base(name: str, variant: str | None) -> dict[str, Any]:
    """The tier table (see docs/training.md). variant: sd3.5-large/-turbo need ~2x Medium's memory."""
    large = variant is None or "large" in variant
    table: dict[str, dict[str, Any]] = {
        "cpu": dict(batch_size=1, gradient_accumulation=1, resolution=512, rank=16, mixed_precision="no",
                    weight_dtype="fp32", gradient_checkpointing=False, quantize="none", optimizer="adamw", compile=False),
        "t4": dict(batch_size=1, gradient_accumulation=4, resolution=768, rank=16, mixed_precision="fp16",
                   weight_dtype="fp16", gradient_checkpointing=True, quantize="nf4", optimizer="adamw8bit", compile=True),
        "l4": dict(batch_size=1, gradient_accumulation=4, resolution=1024, rank=16, mixed_precision="bf16",
                   weight_dtype="bf16", gradient_checkpointing=True, quantize="nf4" if large else "none",
                   optimizer="adamw8bit", compile=True),
        "a100-40": dict(batch_size=1, gradient_accumulation=2, resolution=1024, rank=16, mixed_precision="bf16",
                        weight_dtype="bf16", gradient_checkpointing=large, quantize="none", optimizer="adamw",
                        compile=True),
        "a100-80": dict(batch_size=2 if large else 4, gradient_accumulation=1, resolution=1024, rank=16,
                        mixed_precision="bf16", weight_dtype="bf16", gradient_checkpointing=False, quantize="none",
                        optimizer="adamw", compile=True),
        "h100": dict(batch_size=2 if large else 4, gradient_accumulation=1, resolution=1024, rank=16,
                     mixed_precision="bf16", weight_dtype="bf16", gradient_checkpointing=False, quantize="none",
                     optimizer="adamw", compile=True),
        # batches measured on an H200 with `sd35hub bench` (run 15): Medium b8 14.6 samples/s vs b1 12.0,
        # Large b4 6.3 vs b1 5.8; the bench peak stays under 17 GiB, so memory does not bound them
        "h200": dict(batch_size=4 if large else 8, gradient_accumulation=1, resolution=1024, rank=16,
                     mixed_precision="bf16", weight_dtype="bf16", gradient_checkpointing=False, quantize="none",
                     optimizer="adamw", compile=True),
    }  # fmt: skip
    return dict(table[name])


def profile_settings(name: str, variant: str | None = None) -> dict[str, Any]:
    """The tier table's settings for profile ``name`` and model ``variant`` (sd3.5-large / sd3.5-medium /
    tiny): what the trainer fills in and what ``sd35hub bench`` times as "ours"."""
    return _base(name, variant)


_WHY = {
    "cpu": "no CUDA GPU: fp32 on the CPU (fine for the tiny model; real SD3.5 needs a GPU)",
    "t4": "16 GB and no bf16 (sm75): fp16 autocast with a grad scaler and fp32 LoRA weights, NF4 base + "
          "gradient checkpointing to fit, 768 px",
    "l4": "24 GB with bf16: gradient checkpointing; NF4 base for Large (bf16 Large alone is 16 GB)",
    "a100-40": "40 GB with bf16: Large needs gradient checkpointing at 1024 px, Medium does not",
    "a100-80": "80 GB: no checkpointing, larger batches, regional torch.compile",
    "h100": "80 GB Hopper: no checkpointing, larger batches, regional torch.compile (fastest measured step)",
    "h200": "141 GB Hopper: as h100 with the larger batches that gave the most samples/s on an H200 (bench run 15)",
}  # fmt: skip


def classify(device_name: str, vram_gib: float) -> tuple[str, str]:
    """(profile name, why) from a CUDA device name and its memory."""
    upper = device_name.upper()
    # whole tokens, not substrings: "NVIDIA L40S" / "NVIDIA L40" are 48 GB cards, not L4s
    tokens = upper.replace("-", " ").split()
    if "T4" in tokens:
        return "t4", f"{device_name} is a T4"
    if "L4" in tokens:
        return "l4", f"{device_name} is an L4"
    if "A100" in upper:
        return ("a100-80", f"{device_name} has {vram_gib:.0f} GiB") if vram_gib > 60 else ("a100-40", f"{device_name} has {vram_gib:.0f} GiB")
    if "H200" in upper and "GH200" not in upper:
        return "h200", f"{device_name} is an H200"
    if any(tag in upper for tag in ("H100", "H200", "H800", "GH200", "B200", "B100")):
        return "h100", f"{device_name} is Hopper/Blackwell class"
    for limit, name in ((17, "t4"), (25, "l4"), (48, "a100-40")):
        if vram_gib <= limit:
            return name, f"unknown GPU {device_name}: chose by memory ({vram_gib:.0f} GiB)"
    return "a100-80", f"unknown GPU {device_name}: chose by memory ({vram_gib:.0f} GiB)"


def detect_profile(override: str = "auto", device_props: Any = None, *, variant: str | None = None) -> HardwareProfile:
    """The profile for this machine (or ``override``). ``device_props`` fakes
    ``torch.cuda.get_device_properties(0)`` (``.name``, ``.total_memory`` bytes, ``.major``) in tests;
    ``variant`` (sd3.5-large / sd3.5-medium / tiny, from the model configs) tunes memory choices."""
    reasons: list[str] = []
    if device_props is None:
        import torch

        if torch.cuda.is_available():
            device_props = torch.cuda.get_device_properties(0)
    if device_props is None:
        device_name, vram_gib, major = "cpu", 0.0, 0
        detected, why = "cpu", "no CUDA device visible"
    else:
        device_name, vram_gib = str(device_props.name), device_props.total_memory / GIB
        major = int(getattr(device_props, "major", 8))
        detected, why = classify(device_name, vram_gib)
    name = detected if override == "auto" else override
    reasons.append(f"chosen because {why}" if override == "auto" else f"chosen by --profile {override} (detected: {detected})")
    values = _base(name, variant)
    reasons.append(_WHY[name])
    if variant == "tiny" and name != "cpu":
        values.update(quantize="none", gradient_checkpointing=False, compile=False, resolution=128)
        reasons.append("tiny model: no quantization, checkpointing or compile needed; 128 px")
    if values["mixed_precision"] == "fp16" and device_props is not None and major >= 8:
        values.update(mixed_precision="bf16", weight_dtype="bf16")
        reasons.append(f"{device_name} supports bf16 (sm{major}x): bf16 instead of fp16, no grad scaler")
    needs_bnb = values["quantize"] != "none" or values["optimizer"] == "adamw8bit"
    if needs_bnb and not _has_bitsandbytes():
        if values["optimizer"] == "adamw8bit":
            values["optimizer"] = "adamw"
            reasons.append("bitsandbytes not installed: plain AdamW (pip install 'sd35hub[quant]' for 8-bit AdamW)")
        if values["quantize"] != "none":
            reasons.append(
                f"the {values['quantize']} base needs bitsandbytes: pip install 'sd35hub[quant]' "
                "(or pass model.quantize=none if the base fits in memory unquantized)"
            )
    return HardwareProfile(name=name, device_name=device_name, vram_gib=vram_gib, reasons=reasons, **values)


# Config fields a profile fills when they are None / "auto": (section, field, profile attribute).
_FILLS = (
    ("train", "batch_size", "batch_size"),
    ("train", "gradient_accumulation", "gradient_accumulation"),
    ("train", "gradient_checkpointing", "gradient_checkpointing"),
    ("train", "compile", "compile"),
    ("train", "mixed_precision", "mixed_precision"),
    ("model", "dtype", "weight_dtype"),
    ("data", "resolution", "resolution"),
    ("lora", "rank", "rank"),
    ("model", "quantize", "quantize"),
    ("train", "optimizer", "optimizer"),
)
_SECTIONS = ("model", "data", "lora", "train")


def apply_profile(config: Config, profile: HardwareProfile) -> tuple[Config, list[str]]:
    """Fill the settings the config left open (None / "auto") from ``profile``; returns (resolved config,
    one note per field saying where its value came from)."""
    sections = {name: getattr(config, name) for name in _SECTIONS}
    changes: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    notes: list[str] = []
    for section, name, attr in _FILLS:
        current = getattr(sections[section], name)
        key = f"{section}.{name}"
        if current is None or current == "auto":
            value = getattr(profile, attr)
            changes[section][name] = value
            notes.append(f"{key} = {value!r} (profile {profile.name})")
        else:
            notes.append(f"{key} = {current!r} (your setting)")
    resolved = {name: dataclasses.replace(sections[name], **changes[name]) for name in _SECTIONS}
    return config.replace(**resolved).validate(), notes
