"""SD3.5 specifics: the Large-Turbo and Medium presets, and skip-layer guidance in validation and generate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lora_helpers import tiny_pipe
from PIL import Image

from sd35hub.config import Config, TrainSpec, load_config
from sd35hub.errors import ConfigError
from sd35hub.models.presets import apply_variant_preset, skip_layer_kwargs


def test_turbo_preset_fills_few_step_unguided_validation_unless_set():
    cfg, notes = apply_variant_preset(Config(), "sd3.5-large-turbo")
    assert (cfg.train.validation_steps, cfg.train.validation_guidance) == (4, 0.0) and len(notes) == 2
    mine = Config(train=TrainSpec(validation_steps=8))
    cfg, _ = apply_variant_preset(mine, "sd3.5-large-turbo")
    assert (cfg.train.validation_steps, cfg.train.validation_guidance) == (8, 0.0)
    # a value set to what the plain default is still the user's (it used to need an "explicit" key)
    cfg, notes = apply_variant_preset(Config(train=TrainSpec(validation_guidance=4.5)), "sd3.5-large-turbo")
    assert (cfg.train.validation_steps, cfg.train.validation_guidance) == (4, 4.5) and len(notes) == 1
    cfg, notes = apply_variant_preset(Config(), "sd3.5-large")  # no preset: the plain defaults, no notes
    assert (cfg.train.validation_steps, cfg.train.validation_guidance, cfg.train.validation_skip_layers) == (28, 4.5, ())
    assert notes == []


def test_medium_preset_turns_on_skip_layer_guidance():
    cfg, _ = apply_variant_preset(Config(), "sd3.5-medium")
    assert cfg.train.validation_skip_layers == (7, 8, 9)
    assert skip_layer_kwargs(cfg.train, 4.5) == {"skip_guidance_layers": [7, 8, 9], "skip_layer_guidance_scale": 2.8}
    assert skip_layer_kwargs(cfg.train, 1.0) == {}  # no CFG: nothing to guide
    with pytest.raises(ConfigError, match="validation_skip_layers"):
        load_config(None, ["train.validation_skip_layers=[-1]"])


@pytest.mark.slow
def test_validation_render_applies_skip_layer_guidance():
    from sd35hub.train import validation

    pipe = tiny_pipe()
    encoded = validation.encode_prompts(pipe, ["a red circle"], guidance=4.5, max_sequence_length=77, device="cpu")
    # diffusers skips the layers between 1% and 20% of the steps: at 10 steps, step 1
    kwargs = dict(size=64, steps=10, guidance=4.5, seed=0, device="cpu", dtype=torch.float32)
    plain = np.asarray(validation.render(pipe, encoded, **kwargs)[0]).astype(int)
    again = np.asarray(validation.render(pipe, encoded, **kwargs, pipe_kwargs={})[0]).astype(int)
    slg = np.asarray(validation.render(pipe, encoded, **kwargs, pipe_kwargs={"skip_guidance_layers": [0],
                                                                           "skip_layer_guidance_scale": 2.8})[0]).astype(int)
    assert np.array_equal(plain, again) and np.abs(plain - slg).max() > 0


@pytest.mark.slow
def test_generate_skip_layers_flag_reaches_the_pipeline_and_the_snippet(tmp_path: Path):
    from sd35hub.frontends.cli import main
    from sd35hub.pngmeta import read_png_params

    tiny = ["--model", "tiny", "--steps", "10", "--width", "64", "--height", "64", "--cfg", "4.5", "--prompt", "a fox"]
    main(["generate", *tiny, "--output", str(tmp_path / "a")])
    main(["generate", *tiny, "--skip-layers", "0", "--output", str(tmp_path / "b")])
    a, b = (next((tmp_path / d).glob("*.png")) for d in "ab")
    assert np.abs(np.asarray(Image.open(a)).astype(int) - np.asarray(Image.open(b)).astype(int)).max() > 0
    params = read_png_params(b)["sd35hub"]
    assert params["skip_guidance_layers"] == [0] and params["skip_layer_guidance_scale"] == 2.8
    from sd35hub.blend.request import diffusers_snippet

    assert "skip_guidance_layers=[0]" in diffusers_snippet(params)
    with pytest.raises(SystemExit) as exc:
        main(["generate", *tiny, "--skip-layers", "x", "--output", str(tmp_path / "c")])
    assert exc.value.code == 2
