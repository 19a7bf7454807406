"""benchmarks/kernel_floor.py's inventory of the step's work (CPU, tiny model): every product the real step runs,
forward and backward, is in it (checked against PyTorch's FLOP counter, exactly), and attention is recorded
at the joint (image + text) and image-only shapes."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]


def _kernel_floor():
    spec = importlib.util.spec_from_file_location("kernel_floor", ROOT / "benchmarks" / "kernel_floor.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_floor"] = module
    spec.loader.exec_module(module)
    return module


def test_inventory_accounts_for_every_product_of_the_step():
    K = _kernel_floor()
    calls, meta = K.inventory("tiny", 2, 128, "cpu")
    result = K.check(calls, meta["counted"])
    assert result["inventory_products"] == result["counted_products"] > 0
    assert result["counted_other"] == meta["counted"]["aten.convolution"]  # only the patch embedding is left out
    # LoRA products carry weight gradients; frozen base products only input gradients
    lora = [op for op in calls if isinstance(op, K.Linear) and op.lora]
    assert lora and all(op.flops()[1] >= op.flops()[0] for op in lora)
    assert any(isinstance(op, K.Linear) and not op.lora and not op.dx for op in calls)  # e.g. the time embedding
    attention = {(op.q_len, op.kv_len) for op in calls if isinstance(op, K.Attention)}
    assert attention == {(64 + 154, 64 + 154), (64, 64)}  # joint attention and the tiny model's attn2
