"""`sd35hub train --on hf-jobs`: validate here, train on the Hub's GPUs (huggingface_hub's Jobs API).

    plan = plan_job("my.yaml", ["train.max_steps=2000"], flavor="h200", timeout="3h")   # all checks, no job yet
    print("\\n".join(plan.describe()))
    job = submit(plan)                      # HfApi.run_job: POST /api/jobs/{namespace}
    outcome = follow(job.id, namespace=plan.namespace)   # logs + a progress bar; Ctrl-C detaches

What runs where:
- here: the config is loaded and validated (every problem at once), the base model's license and the
  dataset are checked for reading and the adapter repo for writing, the hardware profile and settings the
  flavor's GPU will get are shown, and the price of the timeout is read from the Hub's flavor list.
- in the job: ``bash -c`` writes the config (passed in the SD35HUB_CONFIG variable) to a file, installs
  this exact sd35hub version (``pip install sd35hub==<version>``, or ``--install SPEC``), and runs the same
  ``sd35hub train --config`` (``accelerate launch --multi_gpu`` on multi-GPU flavors). The job publishes
  the adapter to ``hub.repo_id`` and pushes every checkpoint, in full, to the ``hub.resume_branch`` branch
  as it is written, so ``--resume latest`` in a new job continues exactly where a dead one stopped.
- the token reaches the job only as the secret HF_TOKEN: never in the command, the environment, the
  config or the logs.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35hub import __version__
from sd35hub.config import Config, from_dict, merge, parse_overrides
from sd35hub.errors import ConfigError, JobError, NotLoggedInError

# Defaults. The Hub's own default timeout (30 minutes) ends most real runs early.
DEFAULT_FLAVOR = "a100-large"
DEFAULT_TIMEOUT = "3h"
DEFAULT_IMAGE = "ghcr.io/astral-sh/uv:python3.12-bookworm"  # Python 3.12 + pip; torch comes from PyPI
RESUME_BRANCH = "resume"
JOB_CONFIG_FILE = "sd35hub_job.yaml"
IN_JOB_ENV = "SD35HUB_JOB"  # set in the job: the trainer prints METRIC_PREFIX lines for the follower
METRIC_PREFIX = "sd35hub-metrics "
LABEL = "sd35hub"  # every job sd35hub submits has labels {sd35hub: <kind>, ...}; `sd35hub jobs list` reads them


@dataclass(frozen=True)
class Flavor:
    name: str
    gpu: str  # device name as torch would report it ("" for CPU flavors)
    gpus: int
    vram_gib: float  # per GPU
    ram_gib: float = 0.0  # system RAM (the Hub's list, read at plan time, wins over this table)

    @property
    def multi_gpu(self) -> bool:
        return self.gpus > 1


# Jobs flavors with a GPU sd35hub can train on (huggingface_hub.JobHardware names).
FLAVORS = {f.name: f for f in (
    Flavor("cpu-basic", "", 0, 0, 16), Flavor("cpu-upgrade", "", 0, 0, 32),
    Flavor("t4-small", "Tesla T4", 1, 15, 15), Flavor("t4-medium", "Tesla T4", 1, 15, 30),
    Flavor("l4x1", "NVIDIA L4", 1, 22, 30), Flavor("l4x4", "NVIDIA L4", 4, 22, 186),
    Flavor("a10g-small", "NVIDIA A10G", 1, 22, 15), Flavor("a10g-large", "NVIDIA A10G", 1, 22, 46),
    Flavor("a10g-largex2", "NVIDIA A10G", 2, 22, 92), Flavor("a10g-largex4", "NVIDIA A10G", 4, 22, 184),
    Flavor("l40sx1", "NVIDIA L40S", 1, 44, 62), Flavor("l40sx4", "NVIDIA L40S", 4, 44, 382),
    Flavor("l40sx8", "NVIDIA L40S", 8, 44, 1534),
    Flavor("a100-large", "NVIDIA A100-SXM4-80GB", 1, 79, 142), Flavor("a100x4", "NVIDIA A100-SXM4-80GB", 4, 79, 568),
    Flavor("a100x8", "NVIDIA A100-SXM4-80GB", 8, 79, 1136),
    Flavor("h200", "NVIDIA H200", 1, 139, 256), Flavor("h200x2", "NVIDIA H200", 2, 139, 512),
    Flavor("h200x4", "NVIDIA H200", 4, 139, 1024), Flavor("h200x8", "NVIDIA H200", 8, 139, 2048),
)}  # fmt: skip
ALIASES = {"h100": "h200", "a100": "a100-large", "t4": "t4-small", "l4": "l4x1"}  # H100s are not offered: next best


def parse_timeout(text: str | int) -> int:
    """'3h' / '90m' / '45s' / '1d' / 3600 -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"--timeout {text!r} is not a duration; use e.g. 3h, 90m or 3600 (seconds)")
    return int(float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)])


def resolve_flavor(name: str) -> Flavor:
    flavor = FLAVORS.get(ALIASES.get(name, name))
    if flavor is None:
        raise ConfigError(f"--flavor {name!r} is not a Jobs GPU flavor; use one of {', '.join(FLAVORS)}")
    return flavor


def job_command(install: str, gpus: int) -> list[str]:
    """The job's command: config file from SD35HUB_CONFIG, install sd35hub, run `sd35hub train`."""
    launch = ("python -m sd35hub" if gpus <= 1 else
              f"accelerate launch --multi_gpu --num_processes {gpus} --num_machines 1 -m sd35hub")
    script = "\n".join([
        "set -eu",
        f'printf "%s\\n" "$SD35HUB_CONFIG" > {JOB_CONFIG_FILE}',
        f"python -m pip install --quiet --no-cache-dir --root-user-action=ignore {shlex.quote(install)}",
        f"exec {launch} train --config {JOB_CONFIG_FILE}",
    ])  # fmt: skip
    return ["bash", "-c", script]


def _label_value(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", text)[:100]


def job_labels(kind: str, repo_id: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {LABEL: kind, "sd35hub_repo": _label_value(repo_id.replace("/", "--")),
            "sd35hub_version": _label_value(__version__), **(extra or {})}


@dataclass
class JobPlan:
    """Everything `submit` sends, decided and checked before any job exists."""

    config: Config  # the job's config, validated (profile not applied: the job's GPU decides)
    job_raw: dict[str, Any]  # the sparse config the job gets (only what the user set, plus job settings)
    flavor: Flavor
    timeout_s: int
    image: str
    install: str
    namespace: str | None
    command: list[str]
    env: dict[str, str]
    labels: dict[str, str]
    notes: list[str] = field(default_factory=list)
    cost_per_hour_usd: float | None = None

    @property
    def repo_id(self) -> str:
        return str(self.config.hub.repo_id)

    def describe(self) -> list[str]:
        f = self.flavor
        hours = self.timeout_s / 3600
        cost = ("price unknown" if self.cost_per_hour_usd is None else
                f"${self.cost_per_hour_usd:.2f}/hour, at most ${self.cost_per_hour_usd * hours:.2f} for the timeout")
        lines = [
            f"HF Jobs plan: flavor {f.name} ({f.gpus} x {f.gpu or 'CPU'}), timeout {hours:g} h ({cost})",
            f"  image {self.image}; installs {self.install}; runs "
            + ("accelerate launch (data-parallel)" if f.multi_gpu else "sd35hub train"),
            f"  model {self.config.model.name} <- data {self.config.data.source}; publishes to {self.repo_id}; "
            f"checkpoints to {self.repo_id}@{self.config.hub.resume_branch}",
        ]
        return lines + [f"  {note}" for note in self.notes]


def _raw_config(config_file: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    import yaml

    raw: dict[str, Any] = {}
    if config_file is not None and Path(config_file).is_file():
        raw = yaml.safe_load(Path(config_file).read_text()) or {}
    return merge(raw if isinstance(raw, dict) else {}, parse_overrides(overrides))


def job_config(raw: dict[str, Any], *, resume: str | None) -> tuple[dict[str, Any], list[str], list[str]]:
    """(the job's sparse config, problems, notes). Local paths cannot reach a job: they are problems
    (data, model, resume) or are dropped with a note (output, cache and checkpoint folders)."""
    from sd35hub.data.sources import resolve_source
    from sd35hub.errors import DatasetError

    job = {section: dict(values) for section, values in raw.items() if isinstance(values, dict)}
    problems: list[str] = []
    notes: list[str] = []
    data, model, train, hub = (job.setdefault(s, {}) for s in ("data", "model", "train", "hub"))
    source = str(data.get("source", "")) or None
    if source and source != "sample":
        try:
            kind = resolve_source(source).kind
        except DatasetError:
            kind = "missing"
        if kind != "hub":
            problems.append(f"data.source={source!r} is on this machine, which a job cannot read; upload it first "
                            "(`hf upload --repo-type dataset OWNER/NAME FOLDER`) and pass --dataset OWNER/NAME")
    name = str(model.get("name", ""))
    if name and name != "tiny" and (Path(name).expanduser().exists() or name.startswith((".", "/", "~"))):
        problems.append(f"model.name={name!r} is a local folder, which a job cannot read; pass a Hub model id")
    for section, key in (("train", "output_dir"), ("train", "checkpoint_dir"), ("data", "cache_dir")):
        if job[section].pop(key, None) is not None:
            notes.append(f"{section}.{key} is a local path: the job uses its own folder")
    train["output_dir"] = "output"
    if resume is not None:
        train["resume"] = resume
    if train.get("resume") not in (None, "latest"):
        problems.append(f"train.resume={train['resume']!r} is a local checkpoint; on hf-jobs use --resume latest, "
                        "which continues from the checkpoints the last job pushed to hub.resume_branch")
    if not hub.get("repo_id"):
        problems.append("a job's adapter must be published: pass --repo-id OWNER/NAME (the repo it is pushed to)")
    hub["push_to_hub"] = True
    hub.setdefault("resume_branch", RESUME_BRANCH)
    return job, problems, notes


def plan_job(
    config_file: str | Path | None,
    overrides: list[str],
    *,
    flavor: str = DEFAULT_FLAVOR,
    timeout: str | int = DEFAULT_TIMEOUT,
    image: str = DEFAULT_IMAGE,
    install: str | None = None,
    resume: str | None = None,
    namespace: str | None = None,
    labels: dict[str, str] | None = None,
    kind: str = "train",
    check_access: bool = True,
    token: str | None = None,
) -> JobPlan:
    """Validate everything a job needs, here; raise the first class of problem with every instance of it.
    ``token``: whose job it is (a Space passes its visitor's); None: huggingface_hub's own (HF_TOKEN, login)."""
    from huggingface_hub import get_token

    from sd35hub.config import load_config

    problems: list[str] = []
    try:
        load_config(config_file, overrides)  # the user's config, exactly as `sd35hub train` would read it
    except ConfigError as exc:
        problems += exc.problems
        if config_file is not None and not Path(config_file).is_file():
            raise
    f = resolve_flavor(flavor)
    timeout_s = parse_timeout(timeout)
    job_raw, job_problems, notes = job_config(_raw_config(config_file, overrides), resume=resume)
    problems += [p for p in job_problems if p not in problems]
    if f.gpus == 0:
        problems.append(f"--flavor {f.name} has no GPU; SD3.5 training needs one (e.g. --flavor a100-large)")
    if problems:
        raise ConfigError(problems)
    cfg = from_dict(job_raw)
    token = token or get_token()
    if token is None:
        raise NotLoggedInError("submitting a job on the Hub")
    if check_access:
        _check_access(cfg, token)
    price, ram_gib = _hardware(f.name, token)
    notes += memory_plan(cfg, f, ram_gib)
    env = {"SD35HUB_CONFIG": dump_sparse(job_raw), IN_JOB_ENV: "1", "PYTHONUNBUFFERED": "1"}
    install = install or f"sd35hub[quant]=={__version__}"  # bitsandbytes: the nf4 / 8-bit profiles of small cards
    return JobPlan(
        config=cfg, job_raw=job_raw, flavor=f, timeout_s=timeout_s, image=image, install=install, namespace=namespace,
        command=job_command(install, f.gpus), env=env, labels=job_labels(kind, str(cfg.hub.repo_id), labels),
        notes=notes, cost_per_hour_usd=price,
    )  # fmt: skip


def dump_sparse(raw: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(raw, sort_keys=False)


def _check_access(cfg: Config, token: str) -> None:
    from sd35hub.workflows.checks import check_run_access

    # the job reads the dataset on the Hub's machine with this token, and always publishes
    check_run_access(cfg, token=token, publish=True, dataset=True)


def memory_plan(cfg: Config, flavor: Flavor, ram_gib: float | None) -> list[str]:
    """The memory plan of the run on the flavor's GPU and RAM (sd35hub.workflows.plan, from model configs
    only): the profile the job's GPU gets, the settings it fills, each phase's predicted peak. Raises
    MemoryPlanError (exit 11) before anything is submitted when a phase would not fit."""
    import dataclasses
    from types import SimpleNamespace

    from sd35hub.workflows import plan as memplan
    from sd35hub.workflows.sizes import component_sizes

    props = SimpleNamespace(name=flavor.gpu, total_memory=int(flavor.vram_gib * 2**30), major=9 if "H" in flavor.gpu else 8)
    planned = memplan.plan_run(cfg, device_props=props)
    inputs = dataclasses.replace(memplan.inputs_from_config(planned.config, planned.profile), has_bitsandbytes=True,
                                 host_budget_gib=round(max((ram_gib or flavor.ram_gib) - memplan.OS_HOST_GIB, 0.5), 2))
    plan = memplan.plan_memory(component_sizes(cfg.model.name, cfg.model.revision), inputs)
    filled = [n.replace(f" (profile {planned.profile.name})", "") for n in planned.notes if "(profile" in n]
    lines = [f"on the {flavor.gpu}: hardware profile {planned.profile.name}"
             + (f", which sets {', '.join(filled)}" if filled else ""), *plan.table().splitlines()]
    plan.check()
    return lines


def _hardware(flavor: str, token: str | None = None) -> tuple[float | None, float | None]:
    """(USD per hour, RAM GiB) of a flavor from the Hub's list (None, None when it cannot be read)."""
    from huggingface_hub import HfApi

    try:
        for hardware in HfApi(token=token).list_jobs_hardware():
            if hardware.name == flavor:
                per_minute = hardware.unit_cost_usd if hardware.unit_label == "minute" else hardware.unit_cost_usd / 60
                ram = re.match(r"\s*(\d+(?:\.\d+)?)\s*GB", hardware.ram or "")
                return float(per_minute) * 60, (float(ram.group(1)) * 1e9 / 2**30 if ram else None)
    except Exception:  # noqa: BLE001 - price and RAM are information, not preconditions
        return None, None
    return None, None


def submit(plan: JobPlan, token: str | None = None) -> Any:
    """Create the job (HfApi.run_job). The token goes only into `secrets`. Returns huggingface_hub's JobInfo."""
    from huggingface_hub import HfApi, get_token

    from sd35hub.access import hub_errors

    token = token or get_token()
    if token is None:
        raise NotLoggedInError("submitting a job on the Hub")
    api = HfApi(token=token)
    with hub_errors(plan.repo_id, token=token, what="submitting the job"):
        return api.run_job(
            image=plan.image, command=plan.command, env=plan.env, secrets={"HF_TOKEN": token}, flavor=plan.flavor.name,
            timeout=plan.timeout_s, labels=plan.labels, namespace=plan.namespace,
            name=f"sd35hub-{plan.labels[LABEL]}-{_label_value(plan.repo_id.split('/')[-1])}"[:100],
        )  # fmt: skip


# ------------------------------------------------------------------------------- in the job
def metrics_printer(echo: Callable[[str], None] | None = None) -> Callable[[Any], None]:
    """An on_step callback for the trainer inside a job: each new metrics record as one log line
    (``sd35hub-metrics {"step": .., "loss": .., "samples_per_s": .., "total_steps": ..}``)."""
    sent = 0

    def on_step(trainer: Any) -> None:
        nonlocal sent
        if not trainer.main:
            return
        records, sent_before = trainer.records, sent
        sent = len(records)
        for record in records[sent_before:]:
            line = {**record, "total_steps": trainer.total_steps}
            if record.get("s_per_step"):
                batch = (trainer.config.train.batch_size or 1) * trainer.micro_per_step
                line["samples_per_s"] = round(batch / record["s_per_step"], 3)
            (echo or _print_flush)(METRIC_PREFIX + json.dumps(line))

    return on_step


def _print_flush(text: str) -> None:
    print(text, flush=True)


def parse_metrics(line: str) -> dict[str, Any] | None:
    if not line.startswith(METRIC_PREFIX):
        return None
    try:
        value = json.loads(line[len(METRIC_PREFIX):])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


__all__ = ["FLAVORS", "Flavor", "JobError", "JobPlan", "job_command", "metrics_printer", "parse_metrics", "plan_job",
           "submit"]
