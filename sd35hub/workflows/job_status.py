"""Watching sd35hub's jobs on the Hub: follow the logs with a progress bar, the outcome, status with the
run's metrics, list, cancel. All through huggingface_hub's Jobs API (fetch_job_logs, inspect_job,
fetch_job_metrics, list_jobs, cancel_job).

The trainer inside a job prints one ``sd35hub-metrics {...}`` line per logged step
(sd35hub.workflows.jobs.metrics_printer); the follower turns them into a local progress bar and
`status` reads the last one back (step, loss, samples/s), next to the Hub's hardware sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sd35hub.errors import JobError
from sd35hub.workflows.jobs import LABEL, parse_metrics

TAIL_LINES = 15  # log lines shown with a failed job's error


@dataclass
class JobOutcome:
    job_id: str
    url: str
    stage: str  # COMPLETED | ERROR | CANCELED | DELETED
    message: str | None
    last_metrics: dict[str, Any] | None = None
    published: str | None = None  # commit URL the job printed ("published: ...")
    tail: list[str] = field(default_factory=list)


def _api(token: str | None = None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(token=token)  # None: huggingface_hub's own token; a Space passes its visitor's


def _job_errors(job_id: str, token: str | None = None) -> Any:
    from sd35hub.access import hub_errors

    return hub_errors(f"job {job_id}", token=token, what=f"reading the job {job_id}")


def follow(
    job_id: str,
    *,
    namespace: str | None = None,
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> JobOutcome:
    """Print the job's log lines as they come (metrics lines drive a progress bar instead) until it ends.
    Ctrl-C raises KeyboardInterrupt to the caller and leaves the job running."""
    from tqdm.auto import tqdm

    bar: Any = None
    last: dict[str, Any] | None = None
    published: str | None = None
    tail: list[str] = []
    try:
        with _job_errors(job_id):
            for line in _api().fetch_job_logs(job_id=job_id, namespace=namespace, follow=True):
                metrics = parse_metrics(line)
                if metrics is None:
                    tail = (tail + [line])[-TAIL_LINES:]
                    if line.startswith("published: "):
                        published = line.split(": ", 1)[1].strip()
                    (bar.write if bar is not None else echo)(line)
                    continue
                if "loss" not in metrics:  # a validation record: the trainer logs its own line for it
                    continue
                last = metrics
                if progress and bar is None:
                    bar = tqdm(total=metrics.get("total_steps"), desc=f"job {job_id[:8]}", unit="step", dynamic_ncols=True)
                if bar is not None:
                    bar.n = int(metrics.get("step", 0))
                    bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                    samples_s=metrics.get("samples_per_s"), refresh=False)
                    bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    with _job_errors(job_id):
        info = _api().inspect_job(job_id=job_id, namespace=namespace)
    return JobOutcome(job_id, info.url, str(info.status.stage), info.status.message, last, published, tail)


def raise_for_outcome(outcome: JobOutcome, *, repo_id: str, resume_branch: str | None, rerun: str) -> None:
    """COMPLETED returns; anything else is a JobError saying what happened and what to run next."""
    if outcome.stage == "COMPLETED":
        return
    step = f" at step {outcome.last_metrics['step']}" if outcome.last_metrics else ""
    resume = (f" The checkpoints it pushed are on {repo_id}@{resume_branch}; continue where it stopped with:\n"
              f"  {rerun} --resume latest") if resume_branch else ""
    if outcome.stage == "CANCELED":
        raise JobError(f"Job {outcome.job_id} was cancelled{step}.{resume}")
    if outcome.message and "timeout" in outcome.message.lower():
        raise JobError(f"Job {outcome.job_id} reached its timeout{step} ({outcome.message}).{resume} "
                       "Give the next one more time with --timeout (e.g. --timeout 6h).")
    shown = "\n".join(f"  | {line}" for line in outcome.tail) or "  (no log lines)"
    raise JobError(
        f"Job {outcome.job_id} failed ({outcome.message or outcome.stage}){step}. Its last log lines:\n{shown}\n"
        f"All logs: sd35hub jobs logs {outcome.job_id}; job page: {outcome.url}"
    )


@dataclass
class JobReport:
    job_id: str
    url: str
    stage: str
    message: str | None
    flavor: str | None
    labels: dict[str, str]
    created_at: Any
    running_s: int | None
    metrics: dict[str, Any] | None  # the last sd35hub-metrics record (step, loss, samples_per_s ...)
    hardware: dict[str, Any] | None  # the Hub's live sample (memory, GPU use) while running

    def describe(self) -> list[str]:
        lines = [f"job {self.job_id}  {self.stage}{f' ({self.message})' if self.message else ''}  flavor {self.flavor}",
                 f"  {self.url}", f"  labels: {', '.join(f'{k}={v}' for k, v in sorted(self.labels.items()))}"]
        if self.running_s is not None:
            lines.append(f"  running for {self.running_s} s")
        m = self.metrics
        if m:
            lines.append(f"  step {m.get('step')}/{m.get('total_steps')}  loss {m.get('loss')}  "
                         f"samples/s {m.get('samples_per_s')}  lr {m.get('lr')}")
        else:
            lines.append("  no training metrics yet")
        if self.hardware:
            gpus = self.hardware.get("gpus") or {}
            used = sum(g.get("memory_used_bytes", 0) for g in gpus.values()) / 2**30
            lines.append(f"  memory {self.hardware.get('memory_used_bytes', 0) / 2**30:.2f} GiB"
                         + (f", GPU memory {used:.2f} GiB over {len(gpus)} GPU(s)" if gpus else ""))
        return lines


def _last_metrics(lines: Iterable[str]) -> dict[str, Any] | None:
    last = None
    for line in lines:
        metrics = parse_metrics(line)
        if metrics is not None and "loss" in metrics:
            last = metrics
    return last


def status(job_id: str, *, namespace: str | None = None, token: str | None = None) -> JobReport:
    api = _api(token)
    with _job_errors(job_id, token):
        info = api.inspect_job(job_id=job_id, namespace=namespace)
        metrics = _last_metrics(api.fetch_job_logs(job_id=job_id, namespace=namespace))
        hardware = None
        if info.status.stage == "RUNNING":
            try:
                hardware = next(iter(api.fetch_job_metrics(job_id=job_id, namespace=namespace)), None)
            except Exception:  # noqa: BLE001 - live hardware numbers are optional (406 once finished)
                hardware = None
    durations = info.durations
    return JobReport(info.id, info.url, str(info.status.stage), info.status.message, info.flavor, info.labels or {},
                     info.created_at, durations.running_secs if durations else None, metrics, hardware)


def logs(job_id: str, *, namespace: str | None = None, follow_logs: bool = False,
         token: str | None = None) -> Iterable[str]:
    with _job_errors(job_id, token):
        yield from _api(token).fetch_job_logs(job_id=job_id, namespace=namespace, follow=follow_logs)


def list_jobs(*, namespace: str | None = None, kind: str | None = None, stage: str | None = None) -> list[Any]:
    """sd35hub's jobs (those with the sd35hub label), newest first; `kind`: train | sweep."""
    api = _api()
    with _job_errors("list"):
        jobs = list(api.list_jobs(namespace=namespace, status=stage.upper() if stage else None,
                                  labels={LABEL: kind} if kind else None))
    return [j for j in jobs if LABEL in (j.labels or {})]


def cancel(job_id: str, *, namespace: str | None = None, token: str | None = None) -> None:
    """Stop a job (the trainer gets SIGTERM, writes and pushes a checkpoint if it has time)."""
    api = _api(token)
    with _job_errors(job_id, token):
        info = api.inspect_job(job_id=job_id, namespace=namespace)
        if LABEL not in (info.labels or {}):
            raise JobError(f"Job {job_id} was not started by sd35hub (no '{LABEL}' label); cancel it with "
                           f"`hf jobs cancel {job_id}` if you mean to.")
        api.cancel_job(job_id=job_id, namespace=namespace)
