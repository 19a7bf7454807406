"""`sd35hub sweep` with Optuna on the tiny model: the search space syntax, trials scored by held-out loss,
pruning on intermediate held-out loss, the table, the plot and best.yaml; and one trial per job on hf-jobs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_cli

from sd35hub.config import load_config
from sd35hub.errors import ConfigError
from sd35hub.workflows.sweep import Param, parse_param, run_local


def test_param_syntax():
    assert parse_param("train.learning_rate=1e-5:3e-4:log") == Param("train.learning_rate", "float", 1e-5, 3e-4, True)
    assert parse_param("train.warmup_steps=0:100") == Param("train.warmup_steps", "int", 0, 100, False)
    assert parse_param("lora.rank=8,16,32") == Param("lora.rank", "choice", choices=(8, 16, 32))
    assert parse_param("lora.targets=attention,all-linear").choices == ("attention", "all-linear")
    for bad in ("learning_rate=1:2", "train.learning_rate=3:1", "train.learning_rate=0:1:log", "lora.rank=8",
                "train.learning_rate"):
        with pytest.raises(ConfigError):
            parse_param(bad)


def write_config(path: Path, source: str = "sample") -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"name": "tiny"},
        "data": {"source": source, "resolution": 64, "min_size": 16, "max_samples": 10, "holdout": 2},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"batch_size": 2, "validation_steps": 1, "log_every": 1, "checkpoint_every": 0, "seed": 7},
    }))  # fmt: skip
    return path


@pytest.mark.slow
def test_pruning_stops_a_diverging_trial_on_its_intermediate_heldout_loss(tmp_path):
    config = write_config(tmp_path / "base.yaml")
    params = [parse_param("train.learning_rate=1e-4:10.0:log")]
    enqueue = [{"train.learning_rate": 2e-3}, {"train.learning_rate": 1e-3}, {"train.learning_rate": 10.0}]
    result = run_local(config, [], params, trials=3, steps=6, validation_every=2, output_dir=tmp_path / "sweep",
                       enqueue=enqueue, log=lambda s: None)
    assert [t.state for t in result.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    pruned = result.trials[2]
    assert pruned.step == 2  # stopped at its first report, not trained to the end
    assert not (tmp_path / "sweep" / "trial-002" / "summary.json").exists()
    # the table, the plot, the best config
    rows = list(csv.DictReader((tmp_path / "sweep" / "trials.csv").open()))
    assert [(int(r["trial"]), r["state"]) for r in rows] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "PRUNED")]
    best = min(result.trials[:2], key=lambda t: t.value)
    assert result.best.number == best.number and float(rows[best.number]["heldout_loss"]) == pytest.approx(best.value)
    loaded = load_config(tmp_path / "sweep" / "best.yaml")
    assert loaded.train.learning_rate == pytest.approx(best.params["train.learning_rate"])
    assert loaded.data.source == "sample" and loaded.lora.rank == 4
    assert (tmp_path / "sweep" / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "sweep" / "trial-000" / "summary.json").is_file()


@pytest.mark.slow
def test_sweep_on_hf_jobs_runs_one_job_per_trial(hub, hub_datasets, tmp_path, capsys):  # noqa: ANN001
    config = write_config(tmp_path / "base.yaml", hub_datasets["parquet"])
    code, out, err = run_cli(["sweep", str(config), "--param", "train.learning_rate=1e-3,2e-3", "--trials", "2",
                              "--steps", "2", "--validation-every", "1", "--on", "hf-jobs", "--parallel", "2",
                              "--flavor", "t4-small", "--repo-id", "alice/sweep-lora", "--output",
                              str(tmp_path / "sweep"), "--no-prune"], capsys)  # fmt: skip
    assert code == 0, err
    jobs = [j for j in hub.jobs.jobs.values() if (j.spec.get("labels") or {}).get("sd35hub") == "sweep"]
    assert len(jobs) == 2 and all(j.stage == "COMPLETED" for j in jobs)
    assert {j.spec["labels"]["sd35hub_trial"] for j in jobs} == {"0", "1"}
    rows = list(csv.DictReader((tmp_path / "sweep" / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"] and all(float(r["heldout_loss"]) > 0 for r in rows)
    refs = hub.refs("alice/sweep-lora")
    assert {"trial-000", "trial-001"} <= set(refs)
    assert "pytorch_lora_weights.safetensors" in hub.files("alice/sweep-lora", "trial-000")
    assert "best: trial" in out and (tmp_path / "sweep" / "best.yaml").is_file()
