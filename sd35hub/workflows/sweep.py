"""`sd35hub sweep`: a hyperparameter search with Optuna; each trial a short training run scored by held-out loss.

    sd35hub sweep my.yaml --param train.learning_rate=1e-5:3e-4:log --param lora.rank=8,16,32 --trials 12
    sd35hub sweep my.yaml ... --on hf-jobs --parallel 4 --repo-id me/my-lora-sweep

Search space (``--param``, repeatable): ``key=LOW:HIGH`` (uniform; integers when both are integers),
``key=LOW:HIGH:log`` (log-uniform), ``key=A,B,C`` (a choice; values read as YAML). Keys are the config's
dotted keys. Each trial trains ``--steps`` steps with the config plus its values, computes the held-out loss
(``data.holdout`` samples with fixed noise and timesteps, sd35hub.train.validation) every
``train.validation_every`` steps — reported to Optuna, whose MedianPruner stops trials worse than the median
of earlier ones at the same step — and is scored by the held-out loss at its last step (lower is better).
Optuna's TPE sampler, seeded with ``--seed``, proposes the values.

Output folder: ``trial-NNN/`` (each trial's run folder, locally), ``trials.csv`` (the results table),
``trials.png`` (held-out loss of every trial, and against each parameter), ``best.yaml`` (the config with
the best trial's values: train it for real with ``sd35hub train --config best.yaml``).
On hf-jobs each trial is a job (labels sd35hub=sweep, sd35hub_sweep=<name>) that publishes its adapter to
``--repo-id`` at branch ``trial-NNN``; ``--parallel`` jobs run at once; a pruned trial's job is cancelled.
"""

from __future__ import annotations

import csv
import json
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35hub.errors import ConfigError, MissingDependencyError

_RANGE = re.compile(r"^\s*([-+0-9.eE]+)\s*:\s*([-+0-9.eE]+)\s*(?::\s*(log|linear))?\s*$")


@dataclass(frozen=True)
class Param:
    key: str  # dotted config key, e.g. train.learning_rate
    kind: str  # float | int | choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)  # type: ignore[arg-type]
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)  # type: ignore[arg-type]


def parse_param(text: str) -> Param:
    """``train.learning_rate=1e-5:3e-4:log`` / ``lora.rank=8,16,32`` / ``train.warmup_steps=0:100``."""
    import yaml

    key, sep, spec = text.partition("=")
    key = key.strip()
    if not sep or key.count(".") != 1 or not spec.strip():
        raise ConfigError(f"--param {text!r} must look like section.key=LOW:HIGH[:log] or section.key=A,B,C")
    match = _RANGE.match(spec)
    if match:
        low_text, high_text, scale = match.groups()
        try:
            low, high = float(low_text), float(high_text)
        except ValueError:
            raise ConfigError(f"--param {text!r}: {low_text!r}:{high_text!r} are not numbers") from None
        if not low < high or (scale == "log" and low <= 0):
            raise ConfigError(f"--param {text!r}: need LOW < HIGH (and LOW > 0 for :log)")
        integer = all(re.fullmatch(r"[-+]?\d+", t) for t in (low_text, high_text))
        return Param(key, "int" if integer else "float", low, high, scale == "log")
    choices = tuple(yaml.safe_load(item) for item in spec.split(",") if item.strip())
    if len(choices) < 2:
        raise ConfigError(f"--param {text!r}: a choice needs at least two values (A,B), a range LOW:HIGH")
    return Param(key, "choice", choices=choices)


def overrides_for(values: dict[str, Any]) -> list[str]:
    from sd35hub.config import as_overrides

    return as_overrides(values)


@dataclass
class TrialResult:
    number: int
    params: dict[str, Any]
    state: str  # COMPLETE | PRUNED | FAIL
    value: float | None  # held-out loss at the last step (COMPLETE), or the last one reported
    step: int | None = None
    detail: str = ""  # job id, error


@dataclass
class SweepResult:
    output_dir: Path
    trials: list[TrialResult] = field(default_factory=list)
    best: TrialResult | None = None
    table: Path | None = None
    plot: Path | None = None
    best_config: Path | None = None

    def describe(self) -> list[str]:
        keys = sorted({k for t in self.trials for k in t.params})
        lines = ["trial  state     held-out loss  step  " + "  ".join(keys)]
        for t in self.trials:
            value = f"{t.value:.6f}" if t.value is not None else "-"
            lines.append(f"{t.number:>5}  {t.state:<8}  {value:>13}  {t.step if t.step is not None else '-':>4}  "
                         + "  ".join(_fmt(t.params.get(k)) for k in keys))
        if self.best is not None:
            lines.append(f"best: trial {self.best.number} (held-out loss {self.best.value:.6f}): "
                         + ", ".join(f"{k}={_fmt(v)}" for k, v in self.best.params.items()))
            lines.append(f"best config: {self.best_config}  (train it: sd35hub train --config {self.best_config})")
        lines.append(f"table: {self.table}  plot: {self.plot}")
        return lines


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise MissingDependencyError("optuna", "sd35hub sweep", extra="sweep") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _study(seed: int, prune: bool) -> Any:
    optuna = _optuna()
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if prune else optuna.pruners.NopPruner()
    return optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner)


def _trial_overrides(base: list[str], steps: int, validation_every: int | None, output: Path | None) -> list[str]:
    extra = [f"train.max_steps={steps}", f"train.validation_every={validation_every or max(1, steps // 4)}"]
    if output is not None:
        extra += [f"train.output_dir={json.dumps(str(output))}", f"data.cache_dir={json.dumps(str(output.parent / 'cache'))}"]
    return [*base, *extra]


# ------------------------------------------------------------------------------------------- local
def run_local(config: str | Path | None, overrides: list[str], params: list[Param], *, trials: int, steps: int,
              output_dir: str | Path, seed: int = 0, prune: bool = True, validation_every: int | None = None,
              enqueue: list[dict[str, Any]] | None = None, log: Callable[[str], None] = print) -> SweepResult:
    """Trials one after another in this process (shared latent cache: only the first trial encodes).
    ``enqueue``: values the first trials take, in order (Optuna's enqueue_trial), before the sampler's."""
    from sd35hub.config import load_config
    from sd35hub.errors import Sd35HubError
    from sd35hub.train.recipe import train

    optuna = _optuna()
    out = Path(output_dir)
    study = _study(seed, prune)
    load_config(config, overrides)  # fail on the base config before the first trial
    for values in enqueue or []:
        study.enqueue_trial(values)
    results: list[TrialResult] = []
    for _ in range(trials):
        trial = study.ask()
        values = {p.key: p.suggest(trial) for p in params}
        run_dir = out / f"trial-{trial.number:03d}"
        all_overrides = _trial_overrides([*overrides, *overrides_for(values)], steps, validation_every, run_dir)
        reported: dict[int, float] = {}

        def report(trainer: Any, trial: Any = trial, reported: dict[int, float] = reported) -> None:
            for record in trainer.records:
                step, loss = record.get("step"), record.get("validation_loss")
                if loss is not None and step and step < trainer.total_steps and step not in reported:
                    reported[step] = loss
                    trial.report(loss, step)
                    if trial.should_prune():
                        raise optuna.TrialPruned()

        try:
            result = train(load_config(config, all_overrides), log=lambda s: None, on_step=report, progress=False)
        except optuna.TrialPruned:
            step = max(reported) if reported else None
            results.append(TrialResult(trial.number, values, "PRUNED", reported.get(step) if step else None, step))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except Sd35HubError as exc:  # a bad combination (e.g. an invalid value) fails the trial, not the sweep
            results.append(TrialResult(trial.number, values, "FAIL", None, None, exc.message))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            value = result.validation_loss
            if value is None or not math.isfinite(value):
                results.append(TrialResult(trial.number, values, "FAIL", None, result.steps, "no held-out loss"))
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                results.append(TrialResult(trial.number, values, "COMPLETE", value, result.steps))
                study.tell(trial, value)
        t = results[-1]
        log(f"trial {t.number}: {t.state} held-out loss {t.value} " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
    return finish(out, results, config, overrides)


# ------------------------------------------------------------------------------------------- jobs
def run_on_jobs(config: str | Path | None, overrides: list[str], params: list[Param], *, trials: int, steps: int,
                output_dir: str | Path, repo_id: str, parallel: int = 4, seed: int = 0, prune: bool = True,
                validation_every: int | None = None, flavor: str = "a100-large", timeout: str = "1h",
                install: str | None = None, name: str | None = None,
                log: Callable[[str], None] = print) -> SweepResult:
    """Each trial a job (at most ``parallel`` at once); a pruned trial's job is cancelled."""
    from sd35hub.workflows import job_status
    from sd35hub.workflows.jobs import DEFAULT_IMAGE, parse_metrics, plan_job, submit

    optuna = _optuna()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep = name or time.strftime("sweep-%Y%m%d-%H%M%S")
    study = _study(seed, prune)
    results: list[TrialResult] = []
    running: dict[str, dict[str, Any]] = {}  # job id -> {trial, values, events: list, done: bool}
    submitted = 0

    def watch(job_id: str, state: dict[str, Any]) -> None:
        try:
            for line in job_status.logs(job_id, follow_logs=True):
                metrics = parse_metrics(line)
                if metrics is not None:
                    state["events"].append(metrics)
        except Exception as exc:  # noqa: BLE001 - the main loop reads the job's final stage anyway
            state["error"] = str(exc)
        state["done"] = True

    while submitted < trials or running:
        while submitted < trials and len(running) < parallel:
            trial = study.ask()
            values = {p.key: p.suggest(trial) for p in params}
            branch = f"trial-{trial.number:03d}"
            trial_overrides = _trial_overrides([*overrides, *overrides_for(values)], steps, validation_every, None)
            trial_overrides += [f"hub.repo_id={repo_id}", f"hub.revision={branch}", f"hub.resume_branch={branch}-resume"]
            plan = plan_job(config, trial_overrides, flavor=flavor, timeout=timeout, image=DEFAULT_IMAGE, install=install,
                            kind="sweep", labels={"sd35hub_sweep": sweep[:100], "sd35hub_trial": str(trial.number)},
                            check_access=submitted == 0)  # fmt: skip
            job = submit(plan)
            log(f"trial {trial.number}: job {job.id} ({job.url}) " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
            state = {"trial": trial, "values": values, "events": [], "done": False, "reported": {}, "pruned": False}
            running[job.id] = state
            threading.Thread(target=watch, args=(job.id, state), daemon=True).start()
            submitted += 1
        time.sleep(0.5)
        for job_id, state in list(running.items()):
            trial = state["trial"]
            for event in list(state["events"]):
                step, loss = event.get("step"), event.get("validation_loss")
                if loss is not None and step and step < steps and step not in state["reported"] and not state["pruned"]:
                    state["reported"][step] = loss
                    trial.report(loss, step)
                    if trial.should_prune():
                        state["pruned"] = True
                        job_status.cancel(job_id)
            if not state["done"]:
                continue
            del running[job_id]
            final = next((e["final_validation_loss"] for e in reversed(state["events"]) if "final_validation_loss" in e), None)
            if state["pruned"]:
                inter = state["reported"]
                step = max(inter) if inter else None
                results.append(TrialResult(trial.number, state["values"], "PRUNED", inter.get(step) if step else None,
                                           step, job_id))
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            elif final is not None and math.isfinite(final):
                results.append(TrialResult(trial.number, state["values"], "COMPLETE", final, steps, job_id))
                study.tell(trial, final)
            else:
                results.append(TrialResult(trial.number, state["values"], "FAIL", None, None, job_id))
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            t = results[-1]
            log(f"trial {t.number}: {t.state} held-out loss {t.value} (job {job_id})")
    results.sort(key=lambda t: t.number)
    return finish(out, results, config, overrides)


# ----------------------------------------------------------------------------------------- results
def finish(out: Path, results: list[TrialResult], config: str | Path | None, overrides: list[str]) -> SweepResult:
    """trials.csv, trials.png and best.yaml in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    sweep = SweepResult(out, results)
    keys = sorted({k for t in results for k in t.params})
    sweep.table = out / "trials.csv"
    with sweep.table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "state", "heldout_loss", "step", *keys, "detail"])
        for t in results:
            writer.writerow([t.number, t.state, t.value, t.step, *(t.params.get(k) for k in keys), t.detail])
    sweep.plot = plot_trials(results, out / "trials.png")
    done = [t for t in results if t.state == "COMPLETE" and t.value is not None]
    if done:
        sweep.best = min(done, key=lambda t: t.value)  # type: ignore[arg-type, return-value]
        sweep.best_config = write_best_config(out / "best.yaml", config, overrides, sweep.best.params)
    return sweep


def write_best_config(path: Path, config: str | Path | None, overrides: list[str], values: dict[str, Any]) -> Path:
    """The user's config (only what they set) with the sweep's overrides and the best values."""
    import yaml

    from sd35hub.config import as_overrides, load_config
    from sd35hub.workflows.jobs import _raw_config

    raw = _raw_config(config, [*overrides, *overrides_for(values)])
    load_config(None, as_overrides({f"{s}.{k}": v for s, section in raw.items() for k, v in section.items()}))  # valid
    path.write_text("# the best trial of `sd35hub sweep` (held-out loss); train it: sd35hub train --config "
                    f"{path.name}\n" + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def plot_trials(results: list[TrialResult], path: Path) -> Path | None:
    """Held-out loss per trial (pruned ones hollow) and against each numeric parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [t for t in results if t.value is not None]
    keys = sorted({k for t in results for k, v in t.params.items()})
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3.2), squeeze=False)
    ax = axes[0][0]
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        points = [t for t in scored if t.state == state]
        ax.scatter([t.number for t in points], [t.value for t in points], marker=marker, label=state.lower())
    ax.set_xlabel("trial")
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize=7)
    for ax, key in zip(axes[0][1:], keys, strict=True):
        points = [t for t in scored if key in t.params]
        xs = [t.params[key] for t in points]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        ax.scatter(xs if numeric else [str(x) for x in xs], [t.value for t in points],
                   c=["C0" if t.state == "COMPLETE" else "C1" for t in points])
        if numeric and xs and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(key)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
