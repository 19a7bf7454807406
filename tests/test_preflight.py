"""#15 item 4 / #22 class 1: refusals that need no download come before any: a missing optional package,
an output/checkpoint/cache path that is a file, --resume with another LoRA rank. Driven through the real
`sd35hub train`; "hardware profile" is the first line setup prints after the dataset scan and before loading."""

from __future__ import annotations

import sys

import pytest
import torch
from cli_helpers import run_cli

from sd35hub.config import load_config
from sd35hub.frontends.commands.train import build_overrides
from sd35hub.train.checkpoint import TrainState, save_checkpoint

TRAIN = ["train", "--model", "tiny", "--dataset", "sample", "--steps", "2"]


def _refused_early(code: int, out: str, err: str, expected: int, needle: str) -> None:
    assert code == expected, (out, err)
    assert needle in err, err
    assert "hardware profile" not in out and "caching" not in out + err  # nothing loaded or cached


@pytest.mark.parametrize(
    ("override", "package", "hidden"),
    [
        ("train.optimizer=adamw8bit", "bitsandbytes", "bitsandbytes"),
        ("train.optimizer=prodigy", "prodigyopt", "prodigyopt"),
        ("train.report_to=[jsonl, wandb]", "wandb", "wandb"),
        ("train.report_to=[tensorboard]", "tensorboard", "tensorboard"),
    ],
)
def test_a_missing_optional_package_is_refused_before_loading(override, package, hidden, capsys, tmp_path,
                                                              monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, hidden, None)  # how Python sees a package that is not installed
    if hidden == "tensorboard":
        monkeypatch.setitem(sys.modules, "tensorboardX", None)
    code, out, err = run_cli([*TRAIN, "--output", "run", override], capsys)
    _refused_early(code, out, err, 12, f"needs the package {package!r}, which is not installed")
    assert "pip install" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["--output", "train.checkpoint_dir", "data.cache_dir"])
def test_a_path_that_is_an_existing_file_is_refused(key, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file, not a folder")
    args = [key, "taken"] if key.startswith("--") else [f"{key}=taken/inner"]
    code, out, err = run_cli([*TRAIN, *args], capsys)
    _refused_early(code, out, err, 2, "it must be a folder")
    assert (tmp_path / "taken").read_text() == "a file, not a folder"


def test_resume_with_another_rank_is_refused_before_loading(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    name = "transformer_blocks.0.attn.to_q"
    save_checkpoint(tmp_path / "run" / "checkpoints", TrainState(step=4),
                    lora={f"{name}.lora_A.default.weight": torch.zeros(8, 32),
                          f"{name}.lora_B.default.weight": torch.zeros(32, 8)}, optimizer={}, scheduler={})
    code, out, err = run_cli([*TRAIN, "--output", "run", "--resume", "latest", "--rank", "16"], capsys)
    _refused_early(code, out, err, 2, "lora.rank=16 but the checkpoint")
    assert "trained with rank 8" in err and "--rank 8" in err


def test_resume_from_a_folder_that_is_no_checkpoint_is_refused_before_loading(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    code, out, err = run_cli([*TRAIN, "--output", "run", "--resume", "elsewhere"], capsys)
    _refused_early(code, out, err, 2, "is not a checkpoint folder")


def test_train_has_the_dataset_column_and_split_flags(capsys) -> None:
    """#15 item 11: docs/data.md and the dataset errors offer --image-column/--caption-column/--split on train."""
    cfg = load_config(None, build_overrides({"image_column": "png", "caption_column": "txt", "split": "validation"}, []))
    assert (cfg.data.image_column, cfg.data.caption_column, cfg.data.split) == ("png", "txt", "validation")
    code, _, err = run_cli([*TRAIN, "--image-column", "png", "--caption-column", "txt", "--split", "x", "lora.rank=0"],
                           capsys)
    assert code == 2 and "lora.rank=0" in err and "No such option" not in err
