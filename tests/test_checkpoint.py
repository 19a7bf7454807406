"""Checkpoints: atomic folders, newest K kept, resume path resolution, RNG round trip, safe loading."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from sd35hub.errors import ConfigError
from sd35hub.train import checkpoint as ckpt


def _save(root, step, keep=2):
    state = ckpt.TrainState(step=step, epoch=1, batch_in_epoch=3, samples_seen=step * 2)
    lora = {"a.lora_A.weight": torch.full((2, 3), float(step))}
    opt = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(2, 3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    return ckpt.save_checkpoint(root, state, lora=lora, optimizer=opt, scheduler={"last_epoch": step},
                                ema={"a.lora_A.weight": torch.zeros(2, 3)}, keep=keep)


def test_keeps_newest_and_resolves_latest(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    (tmp_path / ".tmp-checkpoint-000040-x").mkdir()  # a crash mid-write
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-000020", "checkpoint-000030"]
    assert ckpt.resolve_resume("latest", tmp_path).name == "checkpoint-000030"
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "elsewhere").name == "checkpoint-000030"
    assert ckpt.resolve_resume("latest", tmp_path / "none") is None
    with pytest.raises(ConfigError, match="not a checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)
    _save(tmp_path, 50)
    assert not list(tmp_path.glob(".tmp-*"))


def test_round_trip_and_rng(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = _save(tmp_path, 7)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = ckpt.load_checkpoint(path)
    assert loaded.state.step == 7 and loaded.state.samples_seen == 14
    torch.testing.assert_close(loaded.lora["a.lora_A.weight"], torch.full((2, 3), 7.0))
    assert loaded.optimizer["param_groups"][0]["lr"] == 1e-4 and loaded.scheduler == {"last_epoch": 7}
    torch.testing.assert_close(loaded.ema["a.lora_A.weight"], torch.zeros(2, 3))
    ckpt.restore_rng(loaded.rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_training_state_refuses_arbitrary_pickles(tmp_path):
    path = _save(tmp_path, 1)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"optimizer": Evil()}, path / "training_state.pt")
    with pytest.raises(ckpt.DamagedCheckpointError, match="refused: it holds objects other than tensors") as caught:
        ckpt.load_checkpoint(path)
    assert isinstance(caught.value.__cause__, pickle.UnpicklingError)
