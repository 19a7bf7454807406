"""What sd35hub writes for people to look at and share: validation grids (labelled, with PNG
metadata), generated PNGs without local paths, files with a normal file's permissions (#15.15-16)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from sd35hub.pngmeta import public_params, read_png_params, save_png
from sd35hub.train import validation


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_generated_png_metadata_holds_no_local_paths(tmp_path: Path) -> None:
    """#15.16: `generate` wrote the snapshot folder and the cached adapter file's absolute path."""
    cache = "/root/.cache/huggingface/hub/models--alice--style/snapshots/0123abc/pytorch_lora_weights.safetensors"
    params = {
        "prompt": "blb style, a fox", "seed": 3, "seeds": [3], "model": "stabilityai/stable-diffusion-3.5-medium",
        "model_path": "/root/.cache/huggingface/hub/models--stabilityai--stable-diffusion-3.5-medium/snapshots/9f",
        "adapters": [
            {"source": "alice/style", "weight": 0.8, "file": cache, "repo_id": "alice/style", "filename": "pytorch_lora_weights.safetensors"},
            {"source": "/home/bob/loras/mine.safetensors", "weight": 0.5, "file": "C:\\Users\\bob\\mine.safetensors"},
        ],
    }  # fmt: skip
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", params)
    raw = Image.open(path).text
    for chunk, text in raw.items():
        assert "/root" not in text and "Users" not in text, (chunk, text)
    meta = read_png_params(path)
    assert "model_path" not in meta["sd35hub"]
    first, second = meta["sd35hub"]["adapters"]
    assert first["file"] == "pytorch_lora_weights.safetensors" and first["repo_id"] == "alice/style"
    assert second["source"] == "/home/bob/loras/mine.safetensors"  # what the user typed, to reproduce it
    assert second["file"] == "mine.safetensors"
    assert meta["prompt"] == "blb style, a fox" and meta["model"] == "stabilityai/stable-diffusion-3.5-medium"
    assert public_params({"x": ["a/b", "/abs/path.png", 3]}) == {"x": ["a/b", "/abs/path.png", 3]}


def test_written_files_get_a_normal_files_mode(tmp_path: Path, umask_022) -> None:
    """#15.16: output files were 0600 (mkstemp's mode survived the atomic rename)."""
    from sd35hub.paths import atomic_write_text
    from sd35hub.train.checkpoint import TrainState, save_checkpoint

    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "g" / "a.png", {"prompt": "p"})
    text = atomic_write_text(tmp_path / "summary.json", "{}")
    grid = validation.save_png(Image.new("RGB", (8, 8)), tmp_path / "samples" / "step_000001.png")
    for path in (png, text, grid):
        assert path.stat().st_mode & 0o777 == 0o644, (path, oct(path.stat().st_mode))
    import torch

    ckpt = save_checkpoint(tmp_path / "ckpt", TrainState(step=1), lora={"a": torch.zeros(2)}, optimizer={}, scheduler={})
    assert ckpt.stat().st_mode & 0o777 == 0o755
    os.umask(0o077)  # a private umask is respected
    private = atomic_write_text(tmp_path / "private.txt", "x")
    assert private.stat().st_mode & 0o777 == 0o600


def _solid(color: tuple[int, int, int], n: int = 2, size: int = 64) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), color) for _ in range(n)]


def test_validation_grid_has_a_header_and_a_labelled_strip_per_row() -> None:
    """#15.15: rows were unlabelled and the header read "LoRAstep 120"."""
    prompts = ["nrt style, a red circle", "nrt style, a blue square " * 20]
    image = validation.grid([("base model", _solid((200, 0, 0))), ("LoRA, step 120", _solid((0, 0, 200)))], rows=prompts)
    width, height = image.size
    strip = 16
    assert width == 128 and height == strip + 2 * (strip + 64)
    # every row has a label strip (grey with dark text) above its images
    for r in range(2):
        top = strip + r * (strip + 64)
        band = image.crop((0, top, width, top + strip))
        colors = {c for _, c in band.getcolors(10_000)}
        assert (235, 235, 235) in colors and any(sum(c) < 300 for c in colors), r
        assert image.getpixel((10, top + strip + 10)) == (200, 0, 0)
        assert image.getpixel((74, top + strip + 10)) == (0, 0, 200)
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    font = validation._font(12)
    assert draw.textlength("LoRA, step 120", font=font) > draw.textlength("LoRA,step120", font=font) + 4  # real spaces
    cut = validation._fit(draw, prompts[1], font, 122)
    assert cut.endswith("…") and draw.textlength(cut, font=font) <= 122


def test_validation_images_carry_their_parameters(tmp_path: Path) -> None:
    params = validation.image_params(base_model="stabilityai/stable-diffusion-3.5-medium", prompts=["a", "b"], size=512,
                                     steps=20, guidance=4.5, seed=7, step=120, columns=["base model", "LoRA, step 120"])
    path = validation.save_png(Image.new("RGB", (8, 8)), tmp_path / "step.png", params)
    meta = read_png_params(path)
    assert meta["seed"] == "7" and meta["steps"] == "20" and meta["cfg"] == "4.5" and meta["width"] == "512"
    assert meta["model"] == "stabilityai/stable-diffusion-3.5-medium"
    full = meta["sd35hub"]
    assert full["prompts"] == ["a", "b"] and full["seeds"] == [7, 8] and full["training_step"] == 120
    assert full["columns"] == ["base model", "LoRA, step 120"]
    assert json.loads(Image.open(path).text["adapters"]) == []
