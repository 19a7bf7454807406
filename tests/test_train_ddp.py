"""Data-parallel training: `accelerate launch --multi_gpu --num_processes 2 -m sd35hub train` on the CPU (gloo).

Two processes with accumulation 1 must train exactly what one process with accumulation 2 trains (same
samples in the same global batches, same noise, gradients averaged either way); only rank 0 writes; a
SIGTERM that reaches one process stops both after the same step; the 2-process run resumes exactly.
Four 2-process launches and one in-process run: ~70 s on 2 shared cores (a launch is ~15 s of imports).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sd35hub.config import load_config
from sd35hub.train import recipe

pytestmark = pytest.mark.slow  # ~70 s in all (see above)

CONFIG = {
    "model": {"name": "tiny"},
    "data": {"source": "sample", "resolution": 64, "max_samples": 10, "holdout": 2, "trigger_word": "nrt style"},
    "lora": {"rank": 4, "alpha": 8.0},
    "train": {"max_steps": 6, "batch_size": 2, "learning_rate": 2e-3, "validation_steps": 1, "checkpoint_every": 3,
              "keep_checkpoints": 5, "log_every": 1, "seed": 7},
    "hub": {"check_access": False},
}  # fmt: skip

# rank 1 alone receives SIGTERM after step 2 (as when a launcher's signal reaches the processes at
# different times); the trainer must stop both processes after the same step.
SIGNAL_WORKER = """
import os, signal, sys
from sd35hub.config import load_config
from sd35hub.train import recipe

def term_rank1_at_step_2(trainer):
    if trainer.acc.process_index == 1 and trainer.state.step == 2:
        os.kill(os.getpid(), signal.SIGTERM)

cfg = load_config(sys.argv[1], sys.argv[2:])
recipe.train(cfg, on_step=term_rank1_at_step_2, progress=False)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(target: list[str], *, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    """2 processes through torchrun on the CPU; the test environment (HF_ENDPOINT, SD35HUB_CACHE...) passes through.
    No ACCELERATE_USE_CPU: the trainer itself must join the processes over gloo when no GPU is visible."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), *target]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors"))


def _state(out: Path) -> dict:
    last = sorted((out / "checkpoints").glob("checkpoint-*"))[-1]
    return json.loads((last / "state.json").read_text())


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    config_file = root / "tiny.yaml"
    config_file.write_text(yaml.safe_dump({**CONFIG, "data": {**CONFIG["data"], "cache_dir": str(root / "cache")}}))
    out = {name: root / name for name in ("one", "two", "term")}

    # one process, accumulation 2 (in this process; also builds the tiny model and the latent cache)
    overrides = ["train.gradient_accumulation=2", f"train.output_dir={out['one']}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes (OMP_NUM_THREADS=1); 2 threads on 2 busy cores crawl
    try:
        recipe.train(load_config(config_file, overrides), log=lambda s: None, progress=False)
    finally:
        torch.set_num_threads(threads)

    # two processes, accumulation 1: the same global batch of 2 x 2 samples per step
    two = _launch(["-m", "sd35hub", "train", "--config", str(config_file), "--output", str(out["two"])])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    (root / "two.log").write_text(two.stdout + two.stderr)

    # two processes, SIGTERM on rank 1 only after step 2
    worker = root / "worker.py"
    worker.write_text(SIGNAL_WORKER)
    term = _launch([str(worker), str(config_file), f"train.output_dir={out['term']}", "train.max_steps=6"])
    assert term.returncode != 0
    (root / "term.log").write_text(term.stdout + term.stderr)

    # ... resumed on two processes through the CLI
    resumed = _launch(["-m", "sd35hub", "train", "--config", str(config_file), "--output", str(out["term"]),
                       "--resume", "latest"])  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    (root / "resumed.log").write_text(resumed.stdout + resumed.stderr)
    return {**out, "root": root}


def test_two_processes_train_what_one_process_with_accumulation_trains(runs):
    one, two = runs["one"], runs["two"]
    cfg_one, cfg_two = (yaml.safe_load((o / "training_config.yaml").read_text()) for o in (one, two))
    assert cfg_one["train"]["gradient_accumulation"] == 2 and cfg_two["train"]["gradient_accumulation"] == 1
    for cfg in (cfg_one, cfg_two):
        del cfg["train"]["gradient_accumulation"], cfg["train"]["output_dir"]
    assert cfg_one == cfg_two  # nothing else differs (the cpu profile chose the same for both)

    state_one, state_two = _state(one), _state(two)
    assert state_one["samples_seen"] == state_two["samples_seen"] == 6 * 2 * 2
    assert state_one["seen_keys_digest"] == state_two["seen_keys_digest"] != ""
    summary_one, summary_two = (json.loads((o / "summary.json").read_text()) for o in (one, two))
    assert summary_one["samples_seen"] == summary_two["samples_seen"] == 24 and summary_two["steps"] == 6

    # the same mean loss at every step: the same samples, noise and sigmas in the same global batches
    loss_one = [r["loss"] for r in _metrics(one) if "loss" in r]
    loss_two = [r["loss"] for r in _metrics(two) if "loss" in r]
    assert loss_two == pytest.approx(loss_one, abs=1e-5)
    # DDP's all-reduce mean of the two micro-batch gradients == accumulation's mean: same update
    assert _max_diff(_adapter(one), _adapter(two)) <= 1e-5


def test_only_rank_0_writes_outputs(runs):
    two = runs["two"]
    records = _metrics(two)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # no line twice
    assert [r["step"] for r in records if "validation_loss" in r] == [0, 6]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["checkpoint-000003", "checkpoint-000006"]
    assert sorted(p.name for p in (two / "adapter").iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert not [p for p in two.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]
    log = (runs["root"] / "two.log").read_text()
    assert log.count("done: 6 steps") == 1 and log.count("hardware profile") == 1  # rank 0 reports
    assert "24 samples seen" in log
    assert (two / "README.md").is_file() and (two / "loss.png").is_file() and (two / "summary.json").is_file()


def test_sigterm_on_one_process_stops_both_after_the_same_step_and_resume_is_exact(runs):
    log = (runs["root"] / "term.log").read_text()
    assert "Training interrupted at step 2" in log, log[-3000:]
    assert "Training interrupted at step 3" not in log
    assert log.count("checkpoint written to None") == 0  # rank 1 names rank 0's checkpoint too
    term = runs["term"]
    first = json.loads((term / "checkpoints" / "checkpoint-000002" / "state.json").read_text())
    assert first["samples_seen"] == 2 * 2 * 2
    # resumed from step 2 on two processes: the same run as the uninterrupted 2-process one
    assert "resumed from" in (runs["root"] / "resumed.log").read_text()
    state_term, state_two = _state(term), _state(runs["two"])
    assert state_term["step"] == 6 and state_term["samples_seen"] == state_two["samples_seen"]
    assert state_term["seen_keys_digest"] == state_two["seen_keys_digest"]
    assert _max_diff(_adapter(term), _adapter(runs["two"])) <= 1e-6


# each process gets its own checkpoint folder, as on two machines without shared storage: rank 0 finds the
# step-2 checkpoint, rank 1 none; both must stop with a ConfigError (exit 2), not train apart or hang
SPLIT_CHECKPOINTS_WORKER = """
import os, shutil, sys
from pathlib import Path
from sd35hub.frontends.cli import main

ckpts = Path(sys.argv[1]) / f"checkpoints-rank{os.environ['RANK']}"
if os.environ["RANK"] == "0":
    shutil.copytree(Path(sys.argv[2]) / "checkpoints" / "checkpoint-000002", ckpts / "checkpoint-000002")
main(["train", "--config", sys.argv[3], "--output", sys.argv[1], "--resume", "latest", f"train.checkpoint_dir={ckpts}"])
"""


def test_processes_that_see_different_checkpoints_refuse_to_resume(runs, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(SPLIT_CHECKPOINTS_WORKER)
    split = _launch([str(worker), str(tmp_path / "out"), str(runs["term"]), str(runs["root"] / "tiny.yaml")])
    log = split.stdout + split.stderr
    assert split.returncode != 0 and "found checkpoints at different steps [2, 0]" in log, log[-3000:]
    assert not (tmp_path / "out" / "adapter").exists()
