"""sd35hub.workflows.run: the RunPlan and prepare_run, library code any front end calls (#17: it was in colab.py)."""

from __future__ import annotations

from pathlib import Path

from sd35hub.config import from_dict
from sd35hub.workflows.run import prepare_run, resolve_plan


def _plan(tmp_path: Path, checkpoint_dir: str | None) -> object:
    config = from_dict({"model": {"name": "tiny"}, "data": {"source": "sample"},
                        "train": {"output_dir": str(tmp_path / "out"), "checkpoint_dir": checkpoint_dir}})
    return resolve_plan(config)


def test_checkpoints_stay_on_the_mount_when_it_mounts_and_the_run_resumes_from_the_last_complete_one(
    tmp_path: Path,
) -> None:
    drive = tmp_path / "drive"
    wanted = str(drive / "MyDrive" / "ckpt")
    mounted: list[bool] = []
    start = prepare_run(_plan(tmp_path, wanted), mount=lambda: mounted.append(True) or drive, mount_root=str(drive))
    plan = start.plan
    assert mounted == [True] and plan.config.train.checkpoint_dir == wanted and plan.config.train.resume is None
    assert (start.requested_dir, start.mounted, start.found, start.resume_from) == (wanted, True, 0, None)
    (Path(wanted) / "checkpoint-000007").mkdir(parents=True)
    (Path(wanted) / "checkpoint-000007" / "state.json").write_text('{"step": 7}')
    start = prepare_run(plan, mount=lambda: drive, mount_root=str(drive))
    assert start.plan.config.train.resume == "latest" and start.plan.resolved.train.resume == "latest"
    assert (start.found, start.resume_from) == (1, "checkpoint-000007")


def test_an_unavailable_mount_puts_checkpoints_next_to_the_output_and_other_folders_stay(tmp_path: Path) -> None:
    start = prepare_run(_plan(tmp_path, "/content/drive/MyDrive/x"), mount=lambda: None, mount_root="/content/drive")
    assert start.plan.config.train.checkpoint_dir is None and start.plan.checkpoint_dir == tmp_path / "out" / "checkpoints"
    assert (start.requested_dir, start.mounted) == ("/content/drive/MyDrive/x", False)
    # The library names no front end's storage: without a mount_root a checkpoint_dir is used as given.
    start = prepare_run(_plan(tmp_path, str(tmp_path / "ckpt")))
    assert start.plan.checkpoint_dir == tmp_path / "ckpt" and (start.requested_dir, start.mounted) == (None, False)
