"""`sd35hub train --on hf-jobs` and `sd35hub jobs` against the local Hub's Jobs endpoints (tests/hubserver/jobs.py):
the real huggingface_hub client submits, follows and cancels; the executor runs each job's command as a local
subprocess with its own HF_HOME and only the secret it was given. Tiny model, the seeded Hub dataset."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_cli
from hub_tokens import HUB_TOKEN

from sd35hub.errors import ConfigError
from sd35hub.frontends.cli import main
from sd35hub.workflows.jobs import job_command, plan_job

ROOT = Path(__file__).resolve().parents[1]


def write_config(path: Path, dataset: str, **train: object) -> Path:
    cfg = {
        "model": {"name": "tiny"},
        "data": {"source": dataset, "resolution": 64, "min_size": 16, "holdout": 2, "trigger_word": "nrt style"},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"max_steps": 8, "batch_size": 2, "learning_rate": 2e-3, "validation_steps": 1, "log_every": 1,
                  "checkpoint_every": 4, "seed": 7, **train},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def job_id_from(output: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith("job ") and " submitted: " in line)
    return line.split()[1]


def adapter_tensors(hub, repo_id: str) -> dict:  # noqa: ANN001
    from safetensors.torch import load

    return load(hub.files(repo_id)["pytorch_lora_weights.safetensors"])


@pytest.fixture(scope="module")
def straight_run(hub, hub_datasets, tmp_path_factory):  # noqa: ANN001
    """One job run from start to end, followed by the CLI: (exit code, stdout, job id, config path)."""
    config = write_config(tmp_path_factory.mktemp("cfg") / "run.yaml", hub_datasets["parquet"], max_steps=12)
    hub.jobs.bodies.clear()
    out, code = io.StringIO(), 0
    with contextlib.redirect_stdout(out):
        try:
            main(["train", "--config", str(config), "--on", "hf-jobs", "--flavor", "t4-small", "--repo-id",
                  "alice/jobs-straight"])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), job_id_from(out.getvalue()), config


# ------------------------------------------------------------------------------------------ fast
def test_plan_reports_every_job_problem_before_submitting(hub, tmp_path):  # noqa: ANN001
    folder = tmp_path / "photos"
    folder.mkdir()
    config = write_config(tmp_path / "c.yaml", str(folder))
    before = len(hub.jobs.jobs)
    with pytest.raises(ConfigError) as err:
        plan_job(config, ["train.resume=/some/local/checkpoint"], flavor="cpu-basic")
    text = str(err.value)
    assert "a job cannot read" in text and "hf upload --repo-type dataset" in text
    assert "--repo-id OWNER/NAME" in text
    assert "on hf-jobs use --resume latest" in text
    assert "has no GPU" in text
    with pytest.raises(ConfigError, match="not a Jobs GPU flavor"):
        plan_job(config, [], flavor="h100x16")
    assert len(hub.jobs.jobs) == before  # nothing was submitted


def test_multi_gpu_flavors_run_accelerate_launch_data_parallel():
    single = job_command("sd35hub==1.2.3", 1)[-1]
    multi = job_command("sd35hub==1.2.3", 8)[-1]
    assert "python -m pip install" in single and "sd35hub==1.2.3" in single
    assert "exec python -m sd35hub train --config sd35hub_job.yaml" in single
    assert "exec accelerate launch --multi_gpu --num_processes 8 --num_machines 1 -m sd35hub train" in multi


def test_access_is_checked_before_submitting(hub, hub_datasets, tmp_path, monkeypatch):  # noqa: ANN001
    from hub_tokens import HUB_READ_TOKEN

    from sd35hub.errors import WritePermissionError

    monkeypatch.setenv("HF_TOKEN", HUB_READ_TOKEN)  # a read-only token cannot publish the adapter
    config = write_config(tmp_path / "c.yaml", hub_datasets["parquet"])
    before = len(hub.jobs.jobs)
    with pytest.raises(WritePermissionError):
        plan_job(config, ["hub.repo_id=alice/never"], flavor="t4-small")
    assert len(hub.jobs.jobs) == before


# ------------------------------------------------------------------------------------------ jobs
@pytest.mark.slow
def test_job_trains_publishes_and_the_token_travels_only_as_its_secret(hub, straight_run):  # noqa: ANN001
    code, out, job_id, _ = straight_run
    assert code == 0, out
    assert f"adapter published: {hub.endpoint}/alice/jobs-straight" in out
    assert "HF Jobs plan: flavor t4-small" in out and "installs sd35hub[quant]==" in out and "memory plan:" in out
    files = hub.files("alice/jobs-straight")
    assert {"pytorch_lora_weights.safetensors", "README.md", "sd35hub_config.yaml"} <= set(files)
    resume = hub.files("alice/jobs-straight", revision="resume")
    assert "checkpoint-000012/state.json" in resume and "checkpoint-000012/training_state.pt" in resume
    job = hub.jobs.job(job_id)
    assert job.stage == "COMPLETED" and job.spec["flavor"] == "t4-small" and job.spec["labels"]["sd35hub"] == "train"
    # the token: in the create request's secrets and nowhere else
    token = HUB_TOKEN.encode()
    bodies = [json.loads(b) for b in hub.jobs.bodies]
    assert [b["secrets"] for b in bodies] == [{"HF_TOKEN": HUB_TOKEN}]
    assert all(token not in json.dumps({k: v for k, v in b.items() if k != "secrets"}).encode() for b in bodies)
    assert HUB_TOKEN not in hub.jobs.log_text(job_id) and HUB_TOKEN not in out
    written = [p for p in job.folder.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(written) > 20 and not [p for p in written if token in p.read_bytes()]
    for ref in hub.refs("alice/jobs-straight"):
        assert not [path for path, data in hub.files("alice/jobs-straight", ref).items() if token in data]


@pytest.mark.slow
def test_status_and_list_read_back_the_runs_metrics(hub, straight_run, capsys):  # noqa: ANN001
    _, _, job_id, _ = straight_run
    code, out, _ = run_cli(["jobs", "status", job_id], capsys)
    assert code == 0
    assert f"job {job_id}  COMPLETED" in out and "step 12/12" in out and "samples/s" in out
    code, out, _ = run_cli(["jobs", "list"], capsys)
    assert code == 0 and job_id in out and "alice/jobs-straight" in out
    code, out, _ = run_cli(["jobs", "logs", job_id], capsys)
    assert code == 0 and "published: " in out and "Successfully installed sd35hub-" in out


@pytest.mark.slow
def test_timeout_then_resume_latest_gives_the_uninterrupted_adapter(hub, straight_run, capsys):  # noqa: ANN001
    _, _, _, config = straight_run
    args = ["train", "--config", str(config), "--on", "hf-jobs", "--flavor", "t4-small", "--repo-id", "alice/jobs-resumed"]
    code, out, _ = run_cli([*args, "--detach"], capsys)
    assert code == 0 and "sd35hub jobs logs" in out
    job_id = job_id_from(out)
    assert hub.jobs.wait_for_line(job_id, r"checkpoint-000004 pushed to alice/jobs-resumed@resume")
    hub.jobs.expire(job_id)  # the Hub's timeout: SIGTERM, then SIGKILL after the grace period
    job = hub.jobs.wait(job_id)
    assert (job.stage, job.message) == ("ERROR", "Job timeout")
    stopped = max(int(p.split("/")[0][-6:]) for p in hub.files("alice/jobs-resumed", "resume") if p.endswith("state.json"))
    assert 4 <= stopped < 12  # the trainer checkpointed where SIGTERM found it and pushed that too

    code, out, err = run_cli(["jobs", "status", job_id], capsys)
    assert "ERROR (Job timeout)" in out

    code, out, err = run_cli([*args, "--resume", "latest"], capsys)
    assert code == 0, err
    assert f"resumed from output/checkpoints/checkpoint-{stopped:06d} at step {stopped}" in out
    straight, resumed = adapter_tensors(hub, "alice/jobs-straight"), adapter_tensors(hub, "alice/jobs-resumed")
    assert straight.keys() == resumed.keys()
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6


@pytest.mark.slow
def test_a_failing_job_exits_14_with_its_last_log_lines(hub, hub_datasets, tmp_path, capsys):  # noqa: ANN001
    config = write_config(tmp_path / "c.yaml", hub_datasets["parquet"])
    code, out, err = run_cli(["train", "--config", str(config), "--on", "hf-jobs", "--flavor", "t4-small",
                              "--repo-id", "alice/jobs-fails", "--install", "sd35hub==99.0"], capsys)
    assert code == 14
    assert "failed (Job failed with exit code: 1)" in err
    assert "| ERROR: No matching distribution found for sd35hub==99.0" in err
    assert "sd35hub jobs logs " in err


@pytest.mark.slow
def test_ctrl_c_detaches_and_the_job_keeps_running_until_cancelled(hub, hub_datasets, tmp_path, capsys):  # noqa: ANN001
    config = write_config(tmp_path / "c.yaml", hub_datasets["parquet"], max_steps=100000, checkpoint_every=0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "sd35hub", "train", "--config", str(config), "--on", "hf-jobs",
                             "--flavor", "t4-small", "--repo-id", "alice/jobs-detached"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    job_id = None
    for line in proc.stdout:  # type: ignore[union-attr]
        if " submitted: " in line:
            job_id = line.split()[1]
        if job_id and "Successfully installed" in line:  # the job runs and the CLI is following it
            break
    assert job_id is not None
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and f"Detached from job {job_id}; it keeps running" in rest
    assert hub.jobs.wait_for_line(job_id, r"^sd35hub-metrics .*\"loss\"")  # training, and printing its metrics
    assert hub.jobs.job(job_id).stage == "RUNNING"
    code, out, _ = run_cli(["jobs", "status", job_id], capsys)  # the run's metrics + the Hub's live hardware sample
    assert code == 0 and f"job {job_id}  RUNNING" in out and "running for" in out
    assert re.search(r"step \d+/100000  loss [0-9.]+  samples/s [0-9.]+", out) and "memory " in out
    code, out, _ = run_cli(["jobs", "list", "--stage", "running"], capsys)
    assert job_id in out
    code, out, _ = run_cli(["jobs", "cancel", job_id], capsys)
    assert code == 0 and "cancel requested" in out
    assert hub.jobs.wait(job_id, timeout=120).stage == "CANCELED"
    code, out, _ = run_cli(["jobs", "status", job_id], capsys)
    assert "CANCELED" in out


def test_dry_run_prints_the_plan_for_the_flavor_and_submits_nothing(hub, hub_datasets, tmp_path, capsys):  # noqa: ANN001
    config = write_config(tmp_path / "c.yaml", hub_datasets["parquet"])
    before = len(hub.jobs.jobs)
    code, out, err = run_cli(["train", "--config", str(config), "--on", "hf-jobs", "--flavor", "h200x8", "--repo-id",
                              "alice/jobs-dry", "--dry-run"], capsys)
    assert code == 0, err
    assert "HF Jobs plan: flavor h200x8 (8 x NVIDIA H200), timeout 3 h ($40.00/hour, at most $120.00" in out
    assert "runs accelerate launch (data-parallel)" in out and "installs sd35hub[quant]==" in out
    assert "on the NVIDIA H200: hardware profile h200" in out and "memory plan: GPU budget" in out
    assert "--dry-run: nothing submitted." in out and len(hub.jobs.jobs) == before
