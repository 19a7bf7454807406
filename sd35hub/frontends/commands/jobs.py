"""`sd35hub train --on hf-jobs` (the front end of sd35hub.workflows.jobs), `sd35hub jobs list | status |
logs | cancel` for sd35hub's own jobs, and `sd35hub sweep`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from sd35hub.errors import ConfigError

ON_CHOICES = ("local", "hf-jobs")


def _rerun_command(config: Path | None, overrides: list[str], flavor: str, timeout: str) -> str:
    """The command that continues a run, for messages (overrides that resume sets are left out)."""
    parts = ["sd35hub", "train"] + (["--config", str(config)] if config else [])
    parts += [o for o in overrides if not o.startswith("train.resume=")]
    parts += ["--on", "hf-jobs", "--flavor", flavor, "--timeout", timeout]
    return shlex.join(parts)


def train_on_jobs(on: str, config: Path | None, overrides: list[str], *, flavor: str, timeout: str, detach: bool,
                  install: str | None, image: str | None, resume: str | None, dry_run: bool = False) -> None:
    from sd35hub.workflows import job_status
    from sd35hub.workflows.jobs import DEFAULT_IMAGE, plan_job, submit

    if on not in ON_CHOICES:
        raise ConfigError(f"--on {on!r} is not one of {', '.join(ON_CHOICES)}")
    plan = plan_job(config, overrides, flavor=flavor, timeout=timeout, image=image or DEFAULT_IMAGE, install=install,
                    resume=resume)
    for line in plan.describe():
        typer.echo(line)
    if dry_run:
        typer.echo("--dry-run: nothing submitted.")
        return
    job = submit(plan)
    typer.echo(f"job {job.id} submitted: {job.url}")
    if detach:
        typer.echo(f"Follow it with: sd35hub jobs logs {job.id} --follow")
        return
    typer.echo("Following its logs (Ctrl-C detaches; the job keeps running).")
    try:
        outcome = job_status.follow(job.id, namespace=plan.namespace, echo=typer.echo, progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        typer.echo(f"\nDetached from job {job.id}; it keeps running on the Hub.\n"
                   f"  follow again: sd35hub jobs logs {job.id} --follow\n"
                   f"  stop it:      sd35hub jobs cancel {job.id}")
        return
    job_status.raise_for_outcome(outcome, repo_id=plan.repo_id, resume_branch=plan.config.hub.resume_branch,
                                 rerun=_rerun_command(config, overrides, flavor, timeout))
    from sd35hub.access import hub_endpoint

    typer.echo(f"job {job.id} completed; adapter published: {hub_endpoint()}/{plan.repo_id}"
               + (f" (commit {outcome.published})" if outcome.published else ""))


def register(app: typer.Typer) -> None:
    jobs_app = typer.Typer(help="sd35hub's jobs on Hugging Face Jobs: list, status, logs, cancel.", no_args_is_help=True)
    app.add_typer(jobs_app, name="jobs")
    namespace_opt = typer.Option(None, "--namespace", help="User or org the jobs run under (default: you).")

    @jobs_app.command("list")
    def list_(
        namespace: str | None = namespace_opt,
        kind: str | None = typer.Option(None, "--kind", help="train | sweep"),
        stage: str | None = typer.Option(None, "--stage", help="RUNNING | COMPLETED | ERROR | CANCELED ..."),
    ) -> None:
        """sd35hub's jobs, newest first."""
        from sd35hub.workflows.job_status import list_jobs

        found = list_jobs(namespace=namespace, kind=kind, stage=stage)
        if not found:
            typer.echo("No sd35hub jobs.")
        for job in found:
            labels = job.labels or {}
            created = job.created_at.strftime("%Y-%m-%d %H:%M") if job.created_at else "-"
            typer.echo(f"{job.id}  {job.status.stage:<10} {job.flavor or '-':<11} {created}  "
                       f"{labels.get('sd35hub', '-')}  {labels.get('sd35hub_repo', '-').replace('--', '/')}")

    @jobs_app.command("status")
    def status_(job_id: str = typer.Argument(..., metavar="ID"), namespace: str | None = namespace_opt) -> None:
        """Stage, timing, and the run's last metrics (step, loss, samples/s)."""
        from sd35hub.workflows.job_status import status

        for line in status(job_id, namespace=namespace).describe():
            typer.echo(line)

    @jobs_app.command("logs")
    def logs_(
        job_id: str = typer.Argument(..., metavar="ID"),
        follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends (Ctrl-C detaches)."),
        namespace: str | None = namespace_opt,
    ) -> None:
        """The job's log lines."""
        from sd35hub.workflows.job_status import logs

        try:
            for line in logs(job_id, namespace=namespace, follow_logs=follow):
                typer.echo(line)
        except KeyboardInterrupt:
            typer.echo(f"\nDetached; job {job_id} keeps running.")

    @jobs_app.command("cancel")
    def cancel_(job_id: str = typer.Argument(..., metavar="ID"), namespace: str | None = namespace_opt) -> None:
        """Stop an sd35hub job (it pushes a checkpoint if it has time; resume with --resume latest)."""
        from sd35hub.workflows.job_status import cancel

        cancel(job_id, namespace=namespace)
        typer.echo(f"job {job_id}: cancel requested")

    @app.command("sweep")
    def sweep(
        config: Path = typer.Argument(..., help="YAML config of the runs (sections model/data/lora/train/hub)."),
        overrides: list[str] = typer.Argument(None, help="Dotted overrides for every trial, e.g. data.resolution=512."),
        param: list[str] = typer.Option(..., "--param", help="Search space: key=LOW:HIGH[:log] or key=A,B,C (repeat)."),
        trials: int = typer.Option(12, "--trials", min=1, help="How many trials."),
        steps: int = typer.Option(200, "--steps", min=1, help="Optimizer steps per trial (short runs)."),
        validation_every: int | None = typer.Option(None, "--validation-every", min=1,
                                                    help="Held-out loss (reported for pruning) every N steps (default steps/4)."),
        output: Path = typer.Option(Path("sweep"), "--output", "-o", help="Folder for trials, table, plot, best.yaml."),
        seed: int = typer.Option(0, "--seed", help="Seed of Optuna's TPE sampler."),
        prune: bool = typer.Option(True, "--prune/--no-prune", help="Stop trials worse than the median at the same step."),
        on: str = typer.Option("local", "--on", help="local | hf-jobs (one job per trial)."),
        parallel: int = typer.Option(4, "--parallel", min=1, help="hf-jobs: trials running at once."),
        repo_id: str | None = typer.Option(None, "--repo-id", help="hf-jobs: repo the trials publish to (branch trial-NNN)."),
        flavor: str = typer.Option("a100-large", "--flavor", help="hf-jobs: GPU flavor of each trial."),
        timeout: str = typer.Option("1h", "--timeout", help="hf-jobs: time limit of each trial."),
        install: str | None = typer.Option(None, "--install", help="hf-jobs: pip requirement for sd35hub in the jobs."),
    ) -> None:
        """Search hyperparameters with Optuna: short runs scored by held-out loss, pruning, a table, a plot, best.yaml."""
        from sd35hub.workflows.sweep import parse_param, run_local, run_on_jobs

        params = [parse_param(p) for p in param]
        common = dict(trials=trials, steps=steps, output_dir=output, seed=seed, prune=prune,
                      validation_every=validation_every, log=typer.echo)
        if on == "local":
            result = run_local(config, overrides or [], params, **common)
        elif on == "hf-jobs":
            if not repo_id:
                raise ConfigError("sweep --on hf-jobs needs --repo-id OWNER/NAME (each trial publishes to a branch of it)")
            result = run_on_jobs(config, overrides or [], params, repo_id=repo_id, parallel=parallel, flavor=flavor,
                                 timeout=timeout, install=install, **common)
        else:
            raise ConfigError(f"--on {on!r} is not one of {', '.join(ON_CHOICES)}")
        for line in result.describe():
            typer.echo(line)
