"""sd35hub.workflows.run: the RunPlan and prepare_run, library code any front end calls (#17: it was in colab.py)."""

from __future__ import annotations

from pathlib import Path

from sd35hub.config import from_dict
from sd35hub.workflows.run import prepare_run, resolve_plan


def _plan(tmp_path: Path, checkpoint_dir: str | None) -> object:
    config = from_dict({"model": {"name": "tiny"}, "data": {"source": "sample"},
                        "train": {"output_dir": str(tmp_path / "out"), "checkpoint_dir": checkpoint_dir}})
    return resolve_plan(config)


def test_checkpoints_stay_on_drive_when_it_mounts_and_the_run_resumes_from_the_last_complete_one(tmp_path: Path) -> None:
    drive = tmp_path / "drive"
    wanted = str(drive / "MyDrive" / "ckpt")
    mounted: list[bool] = []
    plan, lines = prepare_run(_plan(tmp_path, wanted), mount_drive=lambda: mounted.append(True) or drive,
                              drive_root=str(drive))
    assert mounted == [True] and plan.config.train.checkpoint_dir == wanted and plan.config.train.resume is None
    assert lines[0].startswith("checkpoints on Google Drive") and "step 0" in lines[-1]
    (Path(wanted) / "checkpoint-000007").mkdir(parents=True)
    (Path(wanted) / "checkpoint-000007" / "state.json").write_text('{"step": 7}')
    plan, lines = prepare_run(plan, mount_drive=lambda: drive, drive_root=str(drive))
    assert plan.config.train.resume == "latest" and plan.resolved.train.resume == "latest"
    assert "resuming from checkpoint-000007" in lines[-1]


def test_without_drive_checkpoints_go_next_to_the_output(tmp_path: Path) -> None:
    plan, lines = prepare_run(_plan(tmp_path, "/content/drive/MyDrive/x"))  # default: no Drive here
    assert plan.config.train.checkpoint_dir is None and plan.checkpoint_dir == tmp_path / "out" / "checkpoints"
    assert "only available in Colab" in lines[0]
