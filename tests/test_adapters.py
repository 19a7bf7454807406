"""Adapter files on the tiny model: stock diffusers reads what we save (alpha != rank), kohya/ComfyUI files
load and match, incompatible and pickled files get clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_helpers import ALL_TARGETS, add_random_lora, generate_latents, tiny_pipe
from safetensors import safe_open
from safetensors.torch import save_file

from sd35hub.adapters.files import (
    AdapterMetadata,
    check_compatible,
    load_adapter_file,
    load_into_transformer,
    read_adapter,
    save_adapter,
    write_adapter,
)
from sd35hub.errors import AdapterError, AdapterIncompatibleError, UnsafeFileError


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A pipeline with a random LoRA (rank 4, alpha 3: scale 0.75) on every mappable layer, saved."""
    pipe = tiny_pipe()
    base = generate_latents(pipe)
    add_random_lora(pipe.transformer, "style", rank=4, alpha=3.0, targets=ALL_TARGETS, seed=1)
    with_lora = generate_latents(pipe)
    folder = tmp_path_factory.mktemp("adapter")
    meta = AdapterMetadata(rank=0, alpha=0.0, base_model="tiny", variant="tiny", trigger_words=["zxq style"])
    file = save_adapter(pipe.transformer, folder, metadata=meta, adapter_name="style")
    return {"base": base, "with_lora": with_lora, "folder": folder, "file": file}


@pytest.mark.slow
def test_saved_adapter_loads_in_stock_diffusers_identically(trained: dict) -> None:
    assert trained["file"].name == "pytorch_lora_weights.safetensors"
    assert (trained["with_lora"] - trained["base"]).abs().max() > 1e-2  # the LoRA does something
    pipe = tiny_pipe()
    pipe.load_lora_weights(str(trained["folder"]))  # stock diffusers, nothing of ours
    # scale 0.75 is folded into lora_B (alpha = rank in the file): one float rounding, not bitwise
    assert torch.allclose(generate_latents(pipe), trained["with_lora"], rtol=0, atol=1e-5)


def test_header_metadata(trained: dict) -> None:
    with safe_open(str(trained["file"]), framework="pt") as handle:
        header = handle.metadata()
    ours = json.loads(header["sd35hub"])
    assert ours["rank"] == 4 and ours["alpha"] == 3.0 and ours["base_model"] == "tiny"
    assert "transformer_blocks.0.attn.to_q" in ours["targets"]
    # the file stores alpha = rank (scale folded into lora_B) so every loader gets the strength right
    assert json.loads(header["lora_adapter_metadata"])["transformer.lora_alpha"] == 4
    _, meta, fmt = load_adapter_file(trained["folder"])
    assert fmt == "diffusers" and meta is not None and meta.trigger_words == ["zxq style"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_foreign_layout_file_matches_diffusers_output(trained: dict, tmp_path: Path, fmt: str) -> None:
    adapter = read_adapter(trained["file"])
    foreign = write_adapter(adapter.modules, tmp_path / f"{fmt}.safetensors", fmt=fmt)
    with safe_open(str(foreign), framework="pt") as handle:
        keys = list(handle.keys())
    assert all(k.startswith("lora_unet_" if fmt == "kohya" else "diffusion_model.") for k in keys)
    loaded = read_adapter(foreign)
    assert loaded.format == fmt
    pipe = tiny_pipe()
    load_into_transformer(pipe.transformer, loaded, "converted")
    # fused qkv (block-diagonal) and swapped norms give the same weights back (the file's folded scale)
    assert torch.allclose(generate_latents(pipe), trained["with_lora"], rtol=0, atol=1e-5)


def test_pickled_files_are_refused_unopened(tmp_path: Path) -> None:
    for suffix in (".bin", ".pt", ".ckpt", ".pth"):
        path = tmp_path / f"lora{suffix}"
        path.write_bytes(b"\x80\x04 not even a valid pickle")  # never read: refused by name
        with pytest.raises(UnsafeFileError, match="safetensors"):
            load_adapter_file(path)
    folder = tmp_path / "only_pickles"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(UnsafeFileError):
        load_adapter_file(folder)


def test_flux_and_sdxl_files_name_their_architecture(tmp_path: Path) -> None:
    flux = tmp_path / "flux.safetensors"
    save_file(
        {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072)}, str(flux)
    )
    with pytest.raises(AdapterIncompatibleError, match="FLUX.1"):
        load_adapter_file(flux)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file(
        {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 640)}, str(sdxl)
    )
    with pytest.raises(AdapterIncompatibleError, match="Stable Diffusion XL"):
        load_adapter_file(sdxl)


def test_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        load_adapter_file(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [("lora_adapter_metadata", "{not json"), ("sd35hub", "{not json"), ("sd35hub", "[1, 2]")],
)
def test_malformed_metadata_header_is_an_adapter_error(
    trained: dict, tmp_path: Path, key: str, value: str
) -> None:
    with safe_open(str(trained["file"]), framework="pt") as handle:
        header = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**header, key: value})
    with pytest.raises(AdapterError, match="malformed metadata header.*re-export the adapter"):
        read_adapter(bad)


def test_large_lora_on_smaller_base_names_both(trained: dict) -> None:
    """A Large-width adapter (2432 wide, 38 blocks) on the tiny base: no shape traceback, both named."""
    large = {
        "transformer.transformer_blocks.37.attn.to_q.lora_A.weight": torch.zeros(4, 2432),
        "transformer.transformer_blocks.37.attn.to_q.lora_B.weight": torch.zeros(2432, 4),
    }
    pipe = tiny_pipe()
    with pytest.raises(AdapterIncompatibleError) as info:
        check_compatible(large, pipe.transformer)
    assert "SD3.5 Large" in str(info.value) and "32 wide" in str(info.value) and "3 blocks" in str(info.value)
    from sd35hub.models.load import model_info

    with pytest.raises(AdapterIncompatibleError, match="SD3.5 Large"):
        check_compatible(large, model_info("tiny"))
    state_dict, _, _ = load_adapter_file(trained["file"])
    check_compatible(state_dict, model_info("tiny"))  # the right one passes
    check_compatible(state_dict, pipe.transformer)
