"""The embedded tiny SD3.5 model: real architecture, standard layout, byte-identical builds, cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sd35hub.models import tiny


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_builds_are_byte_identical_across_processes(tmp_path: Path) -> None:
    first = tiny.build_tiny_model(tmp_path / "a")
    # A second interpreter with another hash seed: the tokenizer trainer's hash-map order changes
    # from process to process, so this is where an unsorted vocabulary would show.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    code = "import sys; from sd35hub.models.tiny import build_tiny_model; build_tiny_model(sys.argv[1])"
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "b")], check=True, env=env, capture_output=True
    )
    a, b = _files(first), _files(tmp_path / "b")
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert different == []
    assert sum(len(data) for data in a.values()) < 5 * 1024 * 1024


def test_standard_diffusers_layout_and_sd35_architecture() -> None:
    folder = tiny.tiny_model_path()
    assert folder.name == f"tiny-sd35-v{tiny.TINY_MODEL_VERSION}"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    for weights in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                    "text_encoder_3/model.safetensors"):  # fmt: skip
        assert (folder / weights).is_file(), weights
    assert not list(folder.rglob("*.bin")), "no pickled weights"

    transformer = json.loads((folder / "transformer/config.json").read_text())
    assert transformer["qk_norm"] == "rms_norm"
    assert 0 in transformer["dual_attention_layers"]
    assert transformer["num_layers"] >= 2
    assert transformer["num_layers"] > len(transformer["dual_attention_layers"])  # plain blocks too
    # 256 px images: latent side 32 -> 16 patches, inside the positional embedding
    assert transformer["pos_embed_max_size"] * transformer["patch_size"] * 8 >= 256

    vae = json.loads((folder / "vae/config.json").read_text())
    assert len(vae["down_block_types"]) == 4 and vae["latent_channels"] == 16
    assert (vae["shift_factor"], vae["scaling_factor"]) == (0.0609, 1.5305)
    scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0

    clip_l = json.loads((folder / "text_encoder/config.json").read_text())
    clip_g = json.loads((folder / "text_encoder_2/config.json").read_text())
    t5 = json.loads((folder / "text_encoder_3/config.json").read_text())
    assert (
        clip_l["hidden_size"] + clip_g["hidden_size"] <= t5["d_model"] == transformer["joint_attention_dim"]
    )
    assert clip_l["projection_dim"] + clip_g["projection_dim"] == transformer["pooled_projection_dim"]


def test_reloads_with_from_pretrained_and_generates_right_size() -> None:
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny.tiny_model_path())
    pipe.set_progress_bar_config(disable=True)
    # CLIP pools at the first eos: the model's eos id must be the tokenizer's
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    ids = pipe.tokenizer("a photo of a red cat").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True).strip() == "a photo of a red cat"
    assert pipe.tokenizer_3("a photo of a red cat").input_ids[-1] == pipe.tokenizer_3.eos_token_id

    def generate() -> object:
        generator = torch.Generator().manual_seed(7)
        return pipe("a red cat", height=64, width=128, num_inference_steps=2, generator=generator).images[0]

    image = generate()
    assert image.size == (128, 64)
    assert image.tobytes() == generate().tobytes()  # fixed seed -> same pixels


def test_tiny_model_path_reuses_the_cache_and_rebuilds_a_stale_one(tmp_path: Path) -> None:
    folder = tiny.tiny_model_path(tmp_path)
    assert tiny.is_tiny_model_dir(folder)
    weights = folder / "transformer/diffusion_pytorch_model.safetensors"
    built_at = weights.stat().st_mtime_ns
    assert tiny.tiny_model_path(tmp_path) == folder
    assert weights.stat().st_mtime_ns == built_at  # not rebuilt

    (folder / tiny.MARKER_FILE).write_text(json.dumps({"sd35hub_tiny_model": "0"}))  # stale
    assert tiny.tiny_model_path(tmp_path) == folder
    assert tiny.is_tiny_model_dir(folder)
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no staging folders left


def test_concurrent_builds_end_with_one_complete_folder(tmp_path: Path) -> None:
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(tiny.tiny_model_path(tmp_path))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert tiny.is_tiny_model_dir(results[0])
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]


def test_losing_the_rename_race_to_another_process_keeps_the_winner(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / tiny.TINY_MODEL_DIRNAME
    real_build = tiny.build_tiny_model

    def build_while_another_process_wins(out_dir: Path) -> Path:
        real_build(out_dir)
        real_build(target)  # the other process renamed its complete build into place first
        return out_dir

    monkeypatch.setattr(tiny, "build_tiny_model", build_while_another_process_wins)
    assert tiny.tiny_model_path(tmp_path) == target
    assert tiny.is_tiny_model_dir(target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # our staging copy is gone


def test_import_sd35hub_does_not_import_torch() -> None:
    code = (
        "import sys, sd35hub, sd35hub.models, sd35hub.models.load, sd35hub.models.info, sd35hub.errors\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
