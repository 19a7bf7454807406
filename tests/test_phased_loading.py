"""Phased loading on the tiny model: the order the memory plan promises, seen through the loader's own
log (sd35hub.models.load.loader_log: appended on every load and on every release / garbage collection)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from sd35hub.config import load_config
from sd35hub.hardware import detect_profile
from sd35hub.models import load as loader
from sd35hub.models.real_configs import write_config_folder
from sd35hub.train.recipe import train
from sd35hub.workflows.plan import plan_for_config

ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def _tensor_bytes(module: torch.nn.Module) -> int:
    """What a loaded module holds: its parameters and floating-point buffers (not e.g. integer position ids)."""
    tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
    return sum(t.numel() * t.element_size() for t in tensors)


def _config(tmp_path: Path, *extra: str):  # noqa: ANN202
    return load_config(None, ["model.name=tiny", "data.source=sample", "data.resolution=128", "data.min_size=64",
                              "data.max_samples=6", "train.max_steps=2", "train.profile=cpu", "train.validation_steps=1",
                              f"train.output_dir={tmp_path / 'out'}", "train.checkpoint_every=0", "hub.check_access=false",
                              *extra])  # fmt: skip


@pytest.mark.slow
def test_encoders_load_one_at_a_time_and_are_gone_before_the_transformer(tmp_path: Path) -> None:
    seen: dict[str, list[str]] = {}

    def on_step(trainer) -> None:  # noqa: ANN001
        seen.setdefault("live", loader.live_components())

    gc.collect()  # modules of earlier tests are collected now, not during this run
    start = len(loader.loader_log)
    result = train(_config(tmp_path), on_step=on_step, progress=False)
    log = [(event, name) for event, name, _ in loader.loader_log[start:]]
    assert log[:8] == [("load", "vae"), ("load", "text_encoder"), ("free", "text_encoder"), ("load", "text_encoder_2"),
                       ("free", "text_encoder_2"), ("load", "text_encoder_3"), ("free", "text_encoder_3"),
                       ("load", "transformer")]  # fmt: skip
    live, most = set(), 0  # never two text encoders at once
    for event, name in log:
        if name in ENCODERS:
            (live.add if event == "load" else live.discard)(name)
            most = max(most, len(live))
    assert most == 1
    assert seen["live"] == ["transformer", "vae"]  # while training: no text encoder is alive at all
    memory = json.loads((result.output_dir / "memory.json").read_text())
    phases = memory["phases"]
    assert list(phases)[:5] == ["encode images (VAE)", "encode captions (CLIP-L)", "encode captions (CLIP-G)",
                                "encode captions (T5-XXL)", "load transformer"]  # fmt: skip
    assert phases["encode images (VAE)"]["items"] == 6 and phases["encode captions (T5-XXL)"]["items"] >= 3
    assert phases["train"]["seconds"] > 0 and "predicted_host_gib" in phases["train"]
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert set(summary["memory"]["phases"]) >= {"train", "validate"}


@pytest.mark.slow
def test_a_second_run_on_the_same_cache_loads_no_encoder(tmp_path: Path) -> None:
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    train(_config(tmp_path, cache), progress=False)
    start = len(loader.loader_log)
    train(_config(tmp_path, cache, f"train.output_dir={tmp_path / 'again'}"), progress=False)
    loaded = [name for event, name, _ in loader.loader_log[start:] if event == "load"]
    assert not set(loaded) & set(ENCODERS)  # captions and validation prompts all came from the cache
    assert loaded.count("transformer") == 1


@pytest.mark.slow
def test_the_plans_weight_sizes_are_the_tiny_modules_loaded_bytes() -> None:
    cfg = load_config(None, ["model.name=tiny", "train.profile=cpu", "data.source=sample"])
    plan = plan_for_config(cfg.replace(model=cfg.model.__class__(name="tiny", dtype="fp32")), detect_profile("cpu"))
    for phase, name in (("encode images (VAE)", "vae"), ("encode captions (CLIP-L)", "text_encoder"),
                        ("encode captions (CLIP-G)", "text_encoder_2"), ("encode captions (T5-XXL)", "text_encoder_3")):
        module = loader.load_component("tiny", name, dtype="fp32")
        assert plan.phase(phase).weights_bytes == _tensor_bytes(module), phase
        loader.release(module)
        del module
    transformer = loader.load_transformer("tiny", dtype="fp32")
    assert plan.phase("load transformer").weights_bytes == _tensor_bytes(transformer)


def test_phased_text_embeddings_equal_the_pipelines_encode_prompt(tmp_path: Path) -> None:
    from sd35hub.data.encode import PhasedEncoders

    texts = ["a red fox", "", "nrt style, a much longer caption about a small boat on a lake at night"]
    pipe = loader.load_pipeline("tiny", dtype="fp32")
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device="cpu",
                                                 do_classifier_free_guidance=False, max_sequence_length=32)  # fmt: skip
    encoders = PhasedEncoders("tiny", device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=32,
                              joint_attention_dim=64)  # fmt: skip
    got = encoders.encode_texts(texts, tmp_path / "stage").many([0, 1, 2])
    assert torch.allclose(got["prompt_embeds"], want, atol=1e-6)
    assert torch.allclose(got["pooled_prompt_embeds"], want_pooled, atol=1e-6)


@pytest.mark.slow
def test_train_refuses_before_loading_when_no_plan_fits(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_config_folder("large", tmp_path / "large")  # no weights: any load would fail with exit 8
    monkeypatch.setenv("SD35HUB_GPU_MEMORY_CAP_GIB", "7")
    start = len(loader.loader_log)
    code, out, err = run_cli(["train", "--model", str(folder), "--dataset", "sample", "--profile", "t4",
                              "-o", str(tmp_path / "out"), "model.text_encoder_quantize=none", "model.quantize=none",
                              "hub.check_access=false"], capsys)  # fmt: skip
    assert code == 11, err
    assert "encode captions (T5-XXL)" in err  # the first phase that does not fit; the transformer would not either
    assert "model.quantize=nf4" in err and "together with model.drop_t5=true" in err
    assert loader.loader_log[start:] == []


@pytest.mark.slow
def test_prior_preservation_renders_class_images_as_a_phase_of_the_plan(tmp_path: Path) -> None:
    """Class images come from the base alone (no encoder alive), between the caption encoders and the
    class images' own cache; the plan lists the phase and memory.json measures it."""
    extra = ("data.class_prompt=a shape on a background", "data.num_class_images=2")
    cfg = _config(tmp_path, *extra)
    plan = plan_for_config(cfg, detect_profile("cpu"))
    names = [p.name for p in plan.phases]
    assert names.index("load transformer") < names.index("generate class images") < names.index("train")
    assert "2 class image(s)" in plan.phase("generate class images").strategy
    gc.collect()
    start = len(loader.loader_log)
    result = train(cfg, progress=False)
    log = [(event, name) for event, name, _ in loader.loader_log[start:]]
    assert [name for event, name in log if event == "load"] == [
        "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer",  # instance cache, then rendering
        "text_encoder", "text_encoder_2", "text_encoder_3", "transformer"]  # class cache, then training  # fmt: skip
    live: set[str] = set()
    for event, name in log:  # an encoder never shares the device with the transformer or another encoder
        if event == "load" and name in (*ENCODERS, "transformer"):
            assert not live & {*ENCODERS, "transformer"}, (name, live)
        (live.add if event == "load" else live.discard)(name)
    phases = json.loads((result.output_dir / "memory.json").read_text())["phases"]
    assert phases["generate class images"]["items"] == 2 and "predicted_host_gib" in phases["generate class images"]
    assert result.summary["prior_preservation"]["generated"] == 2
