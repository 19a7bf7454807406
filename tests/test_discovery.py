"""Adapter discovery and fetching: file choice, size-checked download, list_adapters against the local Hub."""

from __future__ import annotations

import itertools

import pytest

from sd35hub.errors import AdapterError, UnsafeFileError
from sd35hub.hub import pick_adapter_file


@pytest.mark.parametrize(
    ("filenames", "expected"),
    [
        (["README.md", "pytorch_lora_weights.safetensors"], "pytorch_lora_weights.safetensors"),
        (
            ["my_style.safetensors", "sub/pytorch_lora_weights.safetensors", "pytorch_lora_weights.safetensors"],
            "pytorch_lora_weights.safetensors",
        ),
        (["style.safetensors", "style_lora.safetensors", "a.safetensors"], "style_lora.safetensors"),
        (["zeta.safetensors", "beta.safetensors", "alphabet.safetensors"], "beta.safetensors"),
        (
            ["checkpoint-500/pytorch_lora_weights.safetensors", "checkpoints/lora.safetensors", "final.safetensors"],
            "final.safetensors",
        ),
        (["model.bin", "lora.safetensors"], "lora.safetensors"),
    ],
)
def test_pick_adapter_file_is_deterministic_in_any_order(filenames: list[str], expected: str) -> None:
    for order in itertools.permutations(filenames):
        assert pick_adapter_file(list(order)) == expected


def test_pick_adapter_file_refuses_pickled_only_repo() -> None:
    with pytest.raises(UnsafeFileError, match="safetensors"):
        pick_adapter_file(["README.md", "pytorch_lora_weights.bin", "checkpoint-1/x.safetensors"])
    with pytest.raises(AdapterError, match="No .safetensors"):
        pick_adapter_file(["README.md", "images/a.png"])
