"""Config: YAML + dotted overrides, typed coercion, every problem reported at once, unknown keys refused."""

from __future__ import annotations

import dataclasses

import pytest

from sd35hub.config import Config, LoraSpec, dump_yaml, from_dict, load_config, parse_overrides
from sd35hub.errors import ConfigError


def test_defaults_follow_the_product_seed() -> None:
    cfg = load_config()
    assert cfg.model.name == "stabilityai/stable-diffusion-3.5-large"
    assert cfg.train.epochs == 10
    # rank and resolution are the hardware profile's (the lowest config layer): 16 and 1024 on a GPU that fits
    assert (cfg.lora.rank, cfg.data.resolution, cfg.model.quantize, cfg.train.optimizer) == (None, None, "auto", "auto")
    from sd35hub.hardware import apply_profile, detect_profile

    resolved, _ = apply_profile(cfg, detect_profile("h100", variant="sd3.5-large"))
    assert (resolved.lora.rank, resolved.data.resolution) == (16, 1024)
    assert cfg.data.source == "lambdalabs/naruto-blip-captions"


def test_yaml_then_overrides_win(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: tiny}\ntrain: {learning_rate: 1.0e-4, max_steps: 50}\nlora: {rank: 8}\n")
    cfg = load_config(path, ["train.learning_rate=5e-5", "lora.targets=attention+ff", "train.validation_prompts=[a cat, a dog]"])
    assert cfg.model.name == "tiny"
    assert cfg.train.learning_rate == 5e-5  # YAML 1.1 reads "5e-5" as a string: coerced to float
    assert cfg.train.max_steps == 50 and cfg.lora.rank == 8 and cfg.lora.targets == "attention+ff"
    assert cfg.train.validation_prompts == ("a cat", "a dog")


def test_every_problem_is_reported_together_with_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.learning_rate=-1", "lora.rank=0", "data.resolution=1000", "model.dtype=fp8",
                           "train.bogus=1", "train.epochs=abc", "hub.push_to_hub=true"])
    problems = info.value.problems
    assert len(problems) == 7, problems
    text = str(info.value)
    for needle in ("train.learning_rate", "lora.rank", "data.resolution=1000", "model.dtype='fp8'",
                   "unknown key train.bogus", "train.epochs='abc' must be an integer", "hub.repo_id"):
        assert needle in text, needle
    assert info.value.exit_code == 2


def test_unknown_sections_and_keys_are_errors_with_a_hint() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"trainer": {}, "train": {"learning_rte": 1e-4}})
    text = str(info.value)
    assert "unknown section 'trainer'" in text
    assert "unknown key train.learning_rte (did you mean learning_rate?)" in text


def test_bad_override_syntax_and_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["learning_rate=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_configs_are_frozen_and_round_trip_through_yaml(tmp_path) -> None:
    cfg = load_config(None, ["lora.rank=32", "train.adam_betas=[0.9, 0.99]"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora.rank = 4  # type: ignore[misc]
    path = tmp_path / "dump.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


def test_block_selection() -> None:
    assert LoraSpec(blocks="0-2,5").block_indices(8) == [0, 1, 2, 5]
    assert LoraSpec().block_indices(3) == [0, 1, 2]
    with pytest.raises(ConfigError, match="has 4"):
        LoraSpec(blocks="2-6").block_indices(4)
    assert "lora.blocks" in " ".join(Config(lora=LoraSpec(blocks="first half")).problems())
