"""Component sizes from safetensors headers (sd35hub.workflows.sizes): equal to the meta-model counts on the
tiny model and on the real SD3.5 configs, read from the local Hub without downloading weights, the meta
model only where a header cannot answer, and no model code imported by a trainer's config phase."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sd35hub.models.real_configs import MODEL_INDEX, config_dicts, write_config_folder
from sd35hub.models.tiny import tiny_model_path
from sd35hub.workflows import sizes as S

ROOT = Path(__file__).resolve().parents[1]
FILE_FIELDS = ("largest_file", "file_bytes")


def _meta_sizes(folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    with monkeypatch.context() as m:
        m.setattr(S, "LAYOUTS", {})  # no class reads as a header: every component from the meta model
        sources: dict[str, str] = {}
        sizes = S.sizes_from_folder(folder, sources=sources)
    assert set(sources.values()) == {"meta"}
    return sizes


def _without_files(size: S.ComponentSize) -> S.ComponentSize:
    return dataclasses.replace(size, **dict.fromkeys(FILE_FIELDS, 0))


def test_tiny_model_header_sizes_equal_the_meta_model_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_model_path()
    sources: dict[str, str] = {}
    header = S.sizes_from_folder(folder, sources=sources)
    assert sources == dict.fromkeys(S.COMPONENTS, "header")
    assert header == _meta_sizes(folder, monkeypatch)  # every field, the file sizes too


def test_layouts_say_what_the_classes_say() -> None:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    classes = {c.__name__: c for c in (CLIPTextModelWithProjection, T5EncoderModel, AutoencoderKL, SD3Transformer2DModel)}
    assert set(classes) == set(S.LAYOUTS)
    for name, cls in classes.items():
        layout = S.LAYOUTS[name]
        assert tuple(getattr(cls, "_keep_in_fp32_modules", None) or ()) == layout.keep_fp32, name
        tied = getattr(cls, "_tied_weights_keys", None) or {}
        assert {(v, k) for k, v in (tied.items() if isinstance(tied, dict) else ())} == set(layout.tied), name


def _state_tensors(library: str, class_name: str, config: dict, *, saved: bool) -> S.Tensors:
    """name -> (dtype, shape) of a meta model's state dict (``saved``: without the tied duplicates, as
    save_pretrained writes it), bf16 like the SD3.5 repos."""
    model = S._meta_model(library, class_name, config)
    state = model.state_dict()
    if saved:
        for _, duplicate in S.LAYOUTS[class_name].tied:
            state.pop(duplicate, None)
    return {k: ("BF16" if v.is_floating_point() else "I64", tuple(v.shape)) for k, v in state.items()}


def _write_sparse(path: Path, tensors: S.Tensors) -> None:
    """A safetensors file with these tensors' header and a hole for their data (no disk space used)."""
    size = {"BF16": 2, "I64": 8}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        end = offset + size[dtype] * (1 if not shape else math.prod(shape))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)


@pytest.mark.parametrize("variant", ["large", "medium"])
def test_real_config_headers_count_like_the_meta_model(variant: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    configs_only = write_config_folder(variant, tmp_path / "configs")
    meta = _meta_sizes(configs_only, monkeypatch)
    folder = write_config_folder(variant, tmp_path / "weights")
    for component, config in config_dicts(variant).items():
        library, class_name = MODEL_INDEX[component]
        for saved in (True, False):  # T5: shared.weight alone (save_pretrained) or with encoder.embed_tokens
            counted = S.count_tensors(_state_tensors(library, class_name, config, saved=saved), S.LAYOUTS[class_name])
            assert counted == S._meta_counts(variant, component, MODEL_INDEX[component], config), (component, saved)
        stem = "model" if library == "transformers" else "diffusion_pytorch_model"
        _write_sparse(folder / component / f"{stem}.safetensors", _state_tensors(library, class_name, config, saved=True))
    sources: dict[str, str] = {}
    header = S.sizes_from_folder(folder, sources=sources)
    assert sources == dict.fromkeys(S.COMPONENTS, "header")
    assert {k: _without_files(v) for k, v in header.items()} == {k: _without_files(v) for k, v in meta.items()}
    t5 = header["text_encoder_3"]
    assert t5.file_bytes == (folder / "text_encoder_3" / "model.safetensors").stat().st_size > 9e9  # a sparse 9 GB


def test_what_a_header_cannot_answer_comes_from_the_meta_model(tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_model_path(), folder)
    clip = folder / "text_encoder" / "model.safetensors"
    t5 = folder / "text_encoder_3" / "model.safetensors"
    reference = S.sizes_from_folder(tiny_model_path())
    with clip.open("r+b") as f:  # truncated: not a complete file
        f.truncate(clip.stat().st_size - 1)
    tensors = S.read_header(t5)
    assert tensors is not None and S.read_header(clip) is None
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()  # configs only
    sources: dict[str, str] = {}
    sizes = S.sizes_from_folder(folder, sources=sources)
    assert sources == {"text_encoder": "meta", "text_encoder_2": "header", "text_encoder_3": "header",
                       "vae": "meta", "transformer": "header"}  # fmt: skip
    assert _without_files(sizes["text_encoder"]) == _without_files(reference["text_encoder"])
    # integer weights (a bitsandbytes-quantized save) and a missing buffer do not read as the class's layout
    name = next(iter(tensors))
    assert S.count_tensors({**tensors, name: ("U8", tensors[name][1])}, S.LAYOUTS["T5EncoderModel"]) is None
    transformer = S.read_header(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    assert transformer is not None and "pos_embed.pos_embed" in transformer
    del transformer["pos_embed.pos_embed"]
    assert S.count_tensors(transformer, S.LAYOUTS["SD3Transformer2DModel"]) is None


def test_hub_model_sizes_come_from_its_headers_without_downloading_weights(hub) -> None:  # noqa: ANN001
    folder = tiny_model_path()
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    hub.seed_repo("alice/tiny-sizes", files)
    hub.clear_requests()
    sources: dict[str, str] = {}
    sizes = S.component_sizes("alice/tiny-sizes", sources=sources)
    assert sources == dict.fromkeys(S.COMPONENTS, "hub")
    local = S.sizes_from_folder(folder)
    assert {k: _without_files(v) for k, v in sizes.items()} == {k: _without_files(v) for k, v in local.items()}
    weights = [r for r in hub.downloads("alice/tiny-sizes") if r.path.endswith(".safetensors")]
    assert len(weights) == len(S.COMPONENTS) and {r.status for r in weights} == {206}  # ranged header reads


def test_offline_a_hub_snapshot_without_weights_uses_the_meta_model(hub, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from huggingface_hub import snapshot_download

    folder = tiny_model_path()
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    hub.seed_repo("alice/tiny-sizes-offline", files)
    snapshot = Path(snapshot_download("alice/tiny-sizes-offline", allow_patterns=["*.json"]))
    hub.clear_requests()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    sources: dict[str, str] = {}
    S.sizes_from_folder(snapshot, hub=("alice/tiny-sizes-offline", None), sources=sources)
    assert set(sources.values()) == {"meta"} and hub.downloads("alice/tiny-sizes-offline") == []


def test_config_phase_on_a_local_folder_imports_no_model_code(tmp_path: Path) -> None:
    code = f"""
import sys
from sd35hub.config import load_config
from sd35hub.train.recipe import Trainer
cfg = load_config(None, ["model.name={tiny_model_path()}", "data.source=sample", "data.resolution=128",
                         "data.min_size=64", "train.profile=cpu", "hub.check_access=false",
                         "train.output_dir={tmp_path / 'out'}"])
trainer = Trainer(cfg, log=lambda line: None)
trainer._setup_config()
assert trainer.plan.phases, "no memory plan"
heavy = [m for m in ("transformers.models.clip.modeling_clip", "transformers.models.t5.modeling_t5",
                     "diffusers.models.autoencoders.autoencoder_kl") if m in sys.modules]
assert not heavy, heavy
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)
