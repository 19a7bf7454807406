"""Hardware profiles: faked T4/L4/A100/H100 devices pick the documented settings; the config wins."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sd35hub import hardware
from sd35hub.config import Config, DataSpec, LoraSpec, TrainSpec, load_config
from sd35hub.errors import ConfigError

GB = 1024**3


def device(name: str, gib: float, major: int) -> SimpleNamespace:
    return SimpleNamespace(name=name, total_memory=int(gib * GB), major=major, minor=0)


T4 = device("Tesla T4", 15.0, 7)
L4 = device("NVIDIA L4", 22.5, 8)
A100_40 = device("NVIDIA A100-SXM4-40GB", 39.4, 8)
A100_80 = device("NVIDIA A100-SXM4-80GB", 79.2, 8)
H100 = device("NVIDIA H100 80GB HBM3", 79.1, 9)


@pytest.fixture
def with_bnb(monkeypatch):
    monkeypatch.setattr(hardware, "_has_bitsandbytes", lambda: True)


def test_t4_is_fp16_nf4_checkpointed_768(with_bnb):
    p = hardware.detect_profile("auto", T4, variant="sd3.5-large")
    assert p.name == "t4"
    assert (p.mixed_precision, p.weight_dtype, p.quantize, p.gradient_checkpointing) == ("fp16", "fp16", "nf4", True)
    assert (p.resolution, p.batch_size, p.gradient_accumulation, p.optimizer, p.compile) == (768, 1, 4, "adamw8bit", True)
    assert "no bf16" in p.describe()


def test_t4_without_bitsandbytes_falls_back_to_adamw_and_says_how_to_install(monkeypatch):
    monkeypatch.setattr(hardware, "_has_bitsandbytes", lambda: False)
    p = hardware.detect_profile("auto", T4)
    assert p.optimizer == "adamw" and p.quantize == "nf4"
    assert any("sd35hub[quant]" in r for r in p.reasons)


def test_l4_a100_h100(with_bnb):
    l4 = hardware.detect_profile("auto", L4, variant="sd3.5-large")
    assert (l4.name, l4.mixed_precision, l4.quantize, l4.gradient_checkpointing) == ("l4", "bf16", "nf4", True)
    assert hardware.detect_profile("auto", L4, variant="sd3.5-medium").quantize == "none"
    a40 = hardware.detect_profile("auto", A100_40, variant="sd3.5-large")
    assert (a40.name, a40.gradient_checkpointing, a40.quantize, a40.batch_size) == ("a100-40", True, "none", 1)
    assert hardware.detect_profile("auto", A100_40, variant="sd3.5-medium").gradient_checkpointing is False
    a80 = hardware.detect_profile("auto", A100_80, variant="sd3.5-large")
    assert (a80.name, a80.batch_size, a80.compile, a80.gradient_checkpointing) == ("a100-80", 2, True, False)
    h = hardware.detect_profile("auto", H100, variant="sd3.5-medium")
    assert (h.name, h.batch_size, h.mixed_precision, h.compile, h.resolution) == ("h100", 4, "bf16", True, 1024)


def test_cpu_and_override_and_unknown_gpu(with_bnb):
    cpu = hardware.detect_profile("auto", None) if not _cuda() else hardware.detect_profile("cpu", None)
    assert (cpu.name, cpu.mixed_precision, cpu.weight_dtype, cpu.quantize) == ("cpu", "no", "fp32", "none")
    forced = hardware.detect_profile("t4", H100)
    assert forced.name == "t4" and forced.mixed_precision == "bf16"  # an H100 can do bf16 even as "t4"
    assert "detected: h100" in forced.describe()
    unknown = hardware.detect_profile("auto", device("NVIDIA GeForce RTX 4090", 23.6, 8))
    assert unknown.name == "l4" and "chose by memory" in unknown.describe()


def test_device_names_match_whole_tokens():
    assert hardware.classify("NVIDIA L4", 22.5)[0] == "l4"
    assert hardware.classify("Tesla T4", 15.0)[0] == "t4"
    assert hardware.classify("Tesla-T4", 15.0)[0] == "t4"
    # L40S / L40 contain "L4" as a substring but are 48 GB cards: chosen by memory, never the L4 profile
    l40s = hardware.classify("NVIDIA L40S", 44.5)
    assert l40s[0] == "a100-40" and "chose by memory" in l40s[1]
    assert hardware.classify("NVIDIA L40", 44.5)[0] == "a100-40"
    assert hardware.detect_profile("auto", device("NVIDIA L40S", 48.0, 8)).name != "l4"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_profile_fills_only_what_the_user_left_open(with_bnb):
    profile = hardware.detect_profile("auto", T4)
    config = Config(train=TrainSpec(batch_size=3), lora=LoraSpec(rank=8))
    resolved, notes = hardware.apply_profile(config, profile)
    assert resolved.train.batch_size == 3 and resolved.lora.rank == 8  # the user's choices
    assert resolved.train.gradient_accumulation == 4 and resolved.data.resolution == 768  # the profile's
    assert (resolved.train.mixed_precision, resolved.model.dtype, resolved.model.quantize) == ("fp16", "fp16", "nf4")
    assert resolved.train.optimizer == "adamw8bit" and resolved.train.gradient_checkpointing is True
    assert "train.batch_size = 3 (your setting)" in notes and "data.resolution = 768 (profile t4)" in notes
    # a value set in Python is the user's even when it equals what a bigger card's profile would pick (#17: it
    # used to count as unset and trained at 768 on a T4 unless marked "explicit")
    mine, notes = hardware.apply_profile(Config(data=DataSpec(resolution=1024), lora=LoraSpec(rank=16)), profile)
    assert mine.data.resolution == 1024 and mine.lora.rank == 16
    assert "data.resolution = 1024 (your setting)" in notes and "lora.rank = 16 (your setting)" in notes
    # the same for the fields whose default is "auto": the T4's choices, set by hand, survive the H100 profile
    kept, _ = hardware.apply_profile(load_config(None, ["model.quantize=nf4", "train.optimizer=adamw8bit"]),
                                     hardware.detect_profile("auto", H100))
    assert (kept.model.quantize, kept.train.optimizer) == ("nf4", "adamw8bit")


def test_profile_applies_to_a_loaded_config(with_bnb):
    config = load_config(None, ["train.mixed_precision=bf16", "model.quantize=none"])
    resolved, _ = hardware.apply_profile(config, hardware.detect_profile("auto", T4))
    assert resolved.train.mixed_precision == "bf16" and resolved.model.quantize == "none"


def test_float8_with_a_profile_that_quantizes_is_refused_before_loading(with_bnb):
    """The L4 profile puts Large on an NF4 base; FP8 layers replace the same layers, so the resolved
    config fails validation (before any weights load) and says which setting to change."""
    profile = hardware.detect_profile("auto", L4, variant="sd3.5-large")
    with pytest.raises(ConfigError, match=r"model.float8 and model.quantize=nf4.*choose one"):
        hardware.apply_profile(load_config(None, ["model.float8=true"]), profile)
    resolved, _ = hardware.apply_profile(load_config(None, ["model.float8=true", "model.quantize=none"]), profile)
    assert resolved.model.float8 and resolved.model.quantize == "none"


def test_h200_gets_its_own_measured_batches_and_the_h100_row_is_unchanged(with_bnb):
    h200 = device("NVIDIA H200", 139.8, 9)
    medium = hardware.detect_profile("auto", h200, variant="sd3.5-medium")
    large = hardware.detect_profile("auto", h200, variant="sd3.5-large")
    assert (medium.name, medium.batch_size, large.batch_size) == ("h200", 8, 4)
    assert hardware.detect_profile("auto", device("NVIDIA GH200 480GB", 94.0, 9)).name == "h100"
    h100 = hardware.detect_profile("auto", H100, variant="sd3.5-large")
    assert (h100.name, h100.batch_size) == ("h100", 2)
