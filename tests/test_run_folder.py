"""Run folders (#22 class 6): one `train` per output folder at a time, no new run into another run's
folder without --resume, a damaged latest checkpoint falls back to the newest complete one, and
"keep the last K" never deletes the checkpoint just written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd35hub.config import Config, DataSpec, ModelSpec, TrainSpec
from sd35hub.errors import ConfigError
from sd35hub.train import checkpoint as ckpt
from sd35hub.train.runfolder import LOCK_FILE, RunLock, check_fresh_folder


def _config(out: Path, **train: object) -> Config:
    return Config(model=ModelSpec(name="tiny"), data=DataSpec(source="sample", resolution=64, max_samples=4),
                  train=TrainSpec(output_dir=str(out), max_steps=1, **train))


def _write(root: Path, step: int, keep: int = 10) -> Path:
    return ckpt.save_checkpoint(root, ckpt.TrainState(step=step), lora={"w": torch.full((2, 2), float(step))},
                                optimizer={"state": {}, "param_groups": []}, scheduler={"last_epoch": step}, keep=keep)


def test_a_second_train_into_a_locked_folder_is_refused_and_a_killed_owner_frees_it(tmp_path: Path) -> None:
    from sd35hub.train import recipe

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sd35hub.train.runfolder import RunLock; "
         f"RunLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"another `sd35hub train` is writing into .*out \(pid {holder.pid}, since"):
            recipe.train(_config(out), log=lambda s: None, progress=False)
        assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(out):  # SIGKILL released it: no stale lock
        assert (out / LOCK_FILE).is_file()
    with RunLock(out), pytest.raises(ConfigError, match="another `sd35hub train`"):  # same process, second lock
        RunLock(out).acquire()


def test_a_new_run_into_another_runs_folder_is_refused_unless_resuming(tmp_path: Path) -> None:
    """Lost work: a new run into an old run's --output deleted each of its own new checkpoints."""
    from sd35hub.train import recipe

    out = tmp_path / "out"
    _write(out / "checkpoints", 300)
    with pytest.raises(ConfigError, match=r"holds another run \(1 checkpoint\(s\) up to checkpoint-000300\).*--resume latest"):
        recipe.train(_config(out), log=lambda s: None, progress=False)
    assert ckpt.list_checkpoints(out / "checkpoints") == [out / "checkpoints" / "checkpoint-000300"]
    check_fresh_folder(out, out / "checkpoints", "latest")  # resuming it is what the folder is for
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="a finished run's summary.json"):
        check_fresh_folder(finished, finished / "checkpoints", None)
    check_fresh_folder(tmp_path / "new", tmp_path / "new" / "checkpoints", None)  # empty or missing: fine


def test_keep_last_k_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    for step in (100, 200, 300):
        _write(root, step)
    written = _write(root, 50, keep=2)  # resumed from an earlier point: 100..300 are another timeline
    assert written.is_dir()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["checkpoint-000050", "checkpoint-000100",
                                                             "checkpoint-000200", "checkpoint-000300"]
    for step in (60, 70):
        _write(root, step, keep=2)
    names = [p.name for p in ckpt.list_checkpoints(root)]
    assert names[:2] == ["checkpoint-000060", "checkpoint-000070"] and "checkpoint-000050" not in names


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(len(path.read_bytes()) // 2, 1)])


DAMAGES = {
    "truncated lora": lambda p: _truncate(p / "lora.safetensors"),
    "missing lora": lambda p: (p / "lora.safetensors").unlink(),
    "truncated training state": lambda p: _truncate(p / "training_state.pt"),
    "missing training state": lambda p: (p / "training_state.pt").unlink(),
    "empty training state": lambda p: (p / "training_state.pt").write_bytes(b""),
    "state.json not json": lambda p: (p / "state.json").write_text("{not json"),
    "state.json a list": lambda p: (p / "state.json").write_text("[1, 2]"),
    "state.json bad step": lambda p: (p / "state.json").write_text(json.dumps({"step": "ten"})),
    "state.json unknown type": lambda p: (p / "state.json").write_text(json.dumps({"step": -4})),
    "state.json binary": lambda p: (p / "state.json").write_bytes(b"\xff\xfe\x00garbage"),
    "truncated ema": lambda p: (p / "ema.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_complete_one(tmp_path: Path, damage: str) -> None:
    root = tmp_path / "ckpt"
    _write(root, 2)
    latest = _write(root, 4)
    DAMAGES[damage](latest)
    lines: list[str] = []
    saved = ckpt.load_resumable("latest", root, lines.append)
    assert saved is not None and saved.state.step == 2 and torch.equal(saved.lora["w"], torch.full((2, 2), 2.0))
    assert any("checkpoint checkpoint-000004 is damaged" in line for line in lines), lines
    assert any("resuming from checkpoint-000002, the newest complete checkpoint" in line for line in lines)
    with pytest.raises(ConfigError, match=r"checkpoint-000004 is damaged"):
        ckpt.load_resumable(str(latest), root)


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    for step in (1, 2):
        _truncate(_write(root, step) / "lora.safetensors")
    with pytest.raises(ConfigError, match="every checkpoint in .* is damaged \\(2 tried\\)"):
        ckpt.load_resumable("latest", root, lambda line: None)
    assert ckpt.load_resumable("latest", tmp_path / "none", lambda line: None) is None
