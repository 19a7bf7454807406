"""Hugging Face Jobs on the local Hub test server: the routes huggingface_hub 2.4's Jobs client calls,
and an executor that runs each job's command as a local subprocess.

Routes (what `run_job`, `inspect_job`, `list_jobs`, `fetch_job_logs`, `fetch_job_metrics`, `cancel_job`
and `list_jobs_hardware` request):

    GET  /api/jobs/hardware                      flavors with prices (JobHardwareInfo)
    POST /api/jobs/{namespace}                   create: the JSON job spec (command, environment, secrets,
                                                 flavor, timeoutSeconds, labels ...) -> JobInfo
    GET  /api/jobs/{namespace}?stage=&label=k=v  list
    GET  /api/jobs/{namespace}/{id}              inspect
    GET  /api/jobs/{namespace}/{id}/logs         SSE: `data: {"timestamp", "data"}` per line; ends when the job does
    GET  /api/jobs/{namespace}/{id}/metrics      SSE: one sample per second while running; 406 once finished
    POST /api/jobs/{namespace}/{id}/cancel

The executor gives every job a fresh folder (its own HOME and HF_HOME), HF_ENDPOINT pointing at this
server, the job's `environment` and its `secrets` (nothing from the test process's environment: no
HF_TOKEN unless the job was given it as a secret), and runs `command` in it. A `bin/` folder first on
PATH stands in for the image: `python` is the test venv's Python, and `python -m pip install
sd35hub==VERSION` succeeds only when VERSION is the version of this checkout, which it then "installs"
by linking the checkout's package into the job's site folder (on PYTHONPATH). So the job's own install
step is what makes sd35hub importable in the job, offline. `accelerate` is the venv's.

Cancel and timeout do what a container stop does: SIGTERM to the job's process group, SIGKILL after
`grace_s`. A timed-out job ends in stage ERROR with message "Job timeout"; a cancelled one in CANCELED.
Tests call `expire(job_id)` to time a job out at a moment of their choosing (same path as the timer).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .state import HubError

if TYPE_CHECKING:
    from .handler import HubHandler
    from .server import HubServer

CHECKOUT = Path(__file__).resolve().parents[2]
TERMINAL = ("COMPLETED", "CANCELED", "ERROR", "DELETED")
# A few real flavors (names from huggingface_hub.JobHardware; prices are placeholders in USD/minute).
HARDWARE = [
    {"name": "cpu-basic", "prettyName": "CPU Basic", "cpu": "2 vCPU", "ram": "16 GB", "accelerator": None,
     "unitCostMicroUSD": 167, "unitCostUSD": 0.000167, "unitLabel": "minute"},
    {"name": "t4-small", "prettyName": "Nvidia T4 - small", "cpu": "4 vCPU", "ram": "15 GB",
     "accelerator": {"type": "gpu", "model": "T4", "quantity": "1", "vram": "16 GB", "manufacturer": "Nvidia"},
     "unitCostMicroUSD": 6667, "unitCostUSD": 0.006667, "unitLabel": "minute"},
    {"name": "a100-large", "prettyName": "Nvidia A100 - large", "cpu": "12 vCPU", "ram": "142 GB",
     "accelerator": {"type": "gpu", "model": "A100", "quantity": "1", "vram": "80 GB", "manufacturer": "Nvidia"},
     "unitCostMicroUSD": 41667, "unitCostUSD": 0.041667, "unitLabel": "minute"},
    {"name": "h200", "prettyName": "Nvidia H200", "cpu": "23 vCPU", "ram": "256 GB",
     "accelerator": {"type": "gpu", "model": "H200", "quantity": "1", "vram": "141 GB", "manufacturer": "Nvidia"},
     "unitCostMicroUSD": 83333, "unitCostUSD": 0.083333, "unitLabel": "minute"},
    {"name": "h200x8", "prettyName": "8x Nvidia H200", "cpu": "184 vCPU", "ram": "2048 GB",
     "accelerator": {"type": "gpu", "model": "H200", "quantity": "8", "vram": "1128 GB", "manufacturer": "Nvidia"},
     "unitCostMicroUSD": 666667, "unitCostUSD": 0.666667, "unitLabel": "minute"},
]  # fmt: skip

_PIP_SHIM = r'''
import os, re, sys
from pathlib import Path
args = sys.argv[1:]
if not args or args[0] != "install":
    sys.exit("test executor: only `pip install` is supported")
reqs = [a for a in args[1:] if not a.startswith("-")]
version, checkout, site = os.environ["_JOB_SD35HUB_VERSION"], os.environ["_JOB_CHECKOUT"], os.environ["_JOB_SITE"]
for req in reqs:
    match = re.fullmatch(r"sd35hub(\[[A-Za-z0-9_,-]+\])?==([A-Za-z0-9.+-]+)", req)
    if match is None or match.group(2) != version:
        print(f"ERROR: Could not find a version that satisfies the requirement {req} "
              f"(the test executor has only sd35hub=={version}, the local checkout)", flush=True)
        print(f"ERROR: No matching distribution found for {req}", flush=True)
        sys.exit(1)
link = Path(site) / "sd35hub"
if not link.exists():
    link.symlink_to(Path(checkout) / "sd35hub", target_is_directory=True)
print(f"Successfully installed sd35hub-{version} (test executor: the checkout at {checkout})", flush=True)
'''


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def checkout_version() -> str:
    text = (CHECKOUT / "sd35hub" / "__init__.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)  # type: ignore[union-attr]


@dataclass
class Job:
    id: str
    namespace: str
    owner: str
    spec: dict[str, Any]
    folder: Path
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    stage: str = "SCHEDULING"
    message: str | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    returncode: int | None = None
    stopping: str | None = None  # "canceled" | "timeout" once a stop was asked
    proc: subprocess.Popen | None = None
    changed: threading.Condition = field(default_factory=threading.Condition)

    def info(self) -> dict[str, Any]:
        spec = self.spec
        now = self.finished_at or time.time()
        return {
            "id": self.id, "createdAt": iso(self.created_at), "startedAt": iso(self.started_at),
            "finishedAt": iso(self.finished_at), "dockerImage": spec.get("dockerImage"), "spaceId": spec.get("spaceId"),
            "command": spec.get("command"), "arguments": spec.get("arguments", []),
            "environment": spec.get("environment", {}),
            "secrets": {name: None for name in spec.get("secrets") or {}},  # the Hub never returns secret values
            "flavor": spec.get("flavor", "cpu-basic"), "labels": spec.get("labels"),
            "status": {"stage": self.stage, "message": self.message},
            "durations": {"schedulingSecs": int((self.started_at or now) - self.created_at),
                          "runningSecs": int(now - self.started_at) if self.started_at else None,
                          "totalSecs": int(now - self.created_at)},
            "owner": {"id": f"user-{self.owner}", "name": self.namespace, "type": "user"},
            "initiator": {"type": "user", "id": f"user-{self.owner}", "name": self.owner},
        }  # fmt: skip


class JobsExecutor:
    def __init__(self, hub: HubServer) -> None:
        self.hub = hub
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.root = Path(tempfile.mkdtemp(prefix="sd35hub-test-jobs-"))
        self.grace_s = 20.0  # SIGTERM -> SIGKILL
        self.bodies: list[bytes] = []  # every request body sent to /api/jobs (token-leak checks)

    # -- test helpers ------------------------------------------------------------------------------
    def job(self, job_id: str) -> Job:
        with self.lock:
            if job_id not in self.jobs:
                raise HubError(404, f"Job {job_id} not found")
            return self.jobs[job_id]

    def wait(self, job_id: str, timeout: float = 300.0) -> Job:
        job = self.job(job_id)
        with job.changed:
            job.changed.wait_for(lambda: job.stage in TERMINAL, timeout=timeout)
        return job

    def wait_for_line(self, job_id: str, pattern: str, timeout: float = 300.0) -> str | None:
        job, regex = self.job(job_id), re.compile(pattern)
        deadline = time.monotonic() + timeout
        with job.changed:
            while time.monotonic() < deadline:
                for _, line in job.lines:
                    if regex.search(line):
                        return line
                if job.stage in TERMINAL:
                    return None
                job.changed.wait(timeout=0.5)
        return None

    def log_text(self, job_id: str) -> str:
        return "\n".join(line for _, line in self.job(job_id).lines)

    def expire(self, job_id: str) -> None:
        """What the Hub does when a job reaches its timeout."""
        self._stop(self.job(job_id), "timeout")

    # -- lifecycle ---------------------------------------------------------------------------------
    def submit(self, namespace: str, owner: str, spec: dict[str, Any]) -> Job:
        if not isinstance(spec.get("command"), list) or not spec["command"]:
            raise HubError(400, "command must be a non-empty list of strings")
        if spec.get("flavor", "cpu-basic") not in {h["name"] for h in HARDWARE}:
            raise HubError(400, f"Unknown flavor {spec.get('flavor')!r}")
        job_id = uuid.uuid4().hex[:24]
        job = Job(id=job_id, namespace=namespace, owner=owner, spec=spec, folder=self.root / job_id)
        with self.lock:
            self.jobs[job_id] = job
        threading.Thread(target=self._run, args=(job,), name=f"job-{job_id}", daemon=True).start()
        timeout = spec.get("timeoutSeconds")
        if timeout:
            timer = threading.Timer(float(timeout), self._stop, args=(job, "timeout"))
            timer.daemon = True
            timer.start()
        return job

    def _environment(self, job: Job) -> dict[str, str]:
        folder, bin_dir = job.folder, job.folder / "bin"
        venv_bin = Path(sys.executable).parent
        for name in ("home", "hf_home", "site", "work", "bin"):
            (folder / name).mkdir(parents=True, exist_ok=True)
        (bin_dir / "pip_shim.py").write_text(_PIP_SHIM)
        python = (f'#!/bin/bash\nif [ "$1" = "-m" ] && [ "$2" = "pip" ]; then shift 2; '
                  f'exec "{sys.executable}" "{bin_dir / "pip_shim.py"}" "$@"; fi\nexec "{sys.executable}" "$@"\n')
        for name, text in (("python", python), ("python3", python),
                           ("accelerate", f'#!/bin/bash\nexec "{venv_bin / "accelerate"}" "$@"\n')):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        env = {
            "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(folder / "home"),
            "HF_HOME": str(folder / "hf_home"), "HF_ENDPOINT": self.hub.endpoint, "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(folder / "site"), "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg",
            "OMP_NUM_THREADS": "1", "JOB_ID": job.id,
            "_JOB_SD35HUB_VERSION": checkout_version(), "_JOB_CHECKOUT": str(CHECKOUT), "_JOB_SITE": str(folder / "site"),
        }  # fmt: skip
        if os.environ.get("SD35HUB_CACHE"):  # the embedded tiny model, built once per test session (an image layer)
            env["SD35HUB_CACHE"] = os.environ["SD35HUB_CACHE"]
        env.update({k: str(v) for k, v in (job.spec.get("environment") or {}).items()})
        env.update({k: str(v) for k, v in (job.spec.get("secrets") or {}).items()})
        return env

    def _append(self, job: Job, line: str) -> None:
        with job.changed:
            job.lines.append((time.time(), line))
            job.changed.notify_all()

    def _run(self, job: Job) -> None:
        try:
            env = self._environment(job)
            with job.changed:
                if job.stopping:  # cancelled while scheduling
                    self._finish(job, None)
                    return
                job.stage, job.started_at = "RUNNING", time.time()
                job.proc = subprocess.Popen(
                    job.spec["command"] + list(job.spec.get("arguments") or []), cwd=job.folder / "work", env=env,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
                job.changed.notify_all()
            self._append(job, "===== Job started =====")
            assert job.proc.stdout is not None
            for raw in job.proc.stdout:  # tqdm-style "\r" updates become separate lines, like a log collector
                for part in raw.decode(errors="replace").replace("\r", "\n").split("\n"):
                    if part.strip():
                        self._append(job, part.rstrip())
            returncode = job.proc.wait()
        except Exception as exc:  # noqa: BLE001 - the job errors, the server carries on
            self._append(job, f"test executor: {type(exc).__name__}: {exc}")
            returncode = -1
        self._finish(job, returncode)

    def _finish(self, job: Job, returncode: int | None) -> None:
        with job.changed:
            job.returncode, job.finished_at = returncode, time.time()
            if job.stopping == "canceled":
                job.stage, job.message = "CANCELED", None
            elif job.stopping == "timeout":
                job.stage, job.message = "ERROR", "Job timeout"
            elif returncode == 0:
                job.stage, job.message = "COMPLETED", None
            else:
                job.stage, job.message = "ERROR", f"Job failed with exit code: {returncode}"
            job.changed.notify_all()

    def _stop(self, job: Job, why: str) -> None:
        with job.changed:
            if job.stage in TERMINAL or job.stopping:
                return
            job.stopping = why
            proc = job.proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return

        def kill_later() -> None:
            try:
                proc.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        threading.Thread(target=kill_later, daemon=True).start()

    def shutdown(self) -> None:
        for job in list(self.jobs.values()):
            self._stop(job, "canceled")
        shutil.rmtree(self.root, ignore_errors=True)


# ------------------------------------------------------------------------------------------ routes
def route(handler: HubHandler, method: str) -> int:
    """/api/jobs/...: called by HubHandler._dispatch outside the state lock (log streams are long)."""
    executor: JobsExecutor = handler.hub.jobs
    seg = handler.segments[2:]
    if seg == ["hardware"] and method == "GET":
        return handler._json(HARDWARE)
    if handler.body:
        executor.bodies.append(handler.body)
    token = handler._token()
    if token is None:
        raise HubError(401, "Invalid credentials in Authorization header")
    if not seg:
        raise HubError(404, "Not found")
    namespace = seg[0]
    with handler.hub.state.lock:
        allowed = handler.hub.state.can_write(token, namespace)
    if not allowed:
        raise HubError(403, f"You don't have the rights to run jobs in the namespace {namespace!r}")
    if len(seg) == 1 and method == "POST":
        spec = json.loads(handler.body or b"{}")
        return handler._json(executor.submit(namespace, token.user, spec).info())
    if len(seg) == 1 and method == "GET":
        stages = set(handler.query.get("stage", []))
        labels = [item.partition("=") for item in handler.query.get("label", [])]
        with executor.lock:
            jobs = [j for j in executor.jobs.values() if j.namespace == namespace]
        jobs = [j for j in jobs if (not stages or j.stage in stages)
                and all((j.spec.get("labels") or {}).get(k) == v for k, _, v in labels)]
        return handler._json([j.info() for j in sorted(jobs, key=lambda j: j.created_at, reverse=True)])
    job = executor.job(seg[1])
    if job.namespace != namespace:
        raise HubError(404, f"Job {seg[1]} not found")
    action = seg[2] if len(seg) > 2 else ""
    if action == "" and method == "GET":
        return handler._json(job.info())
    if action == "cancel" and method == "POST":
        executor._stop(job, "canceled")
        return handler._json({})
    if action == "logs" and method == "GET":
        return _stream_logs(handler, job)
    if action == "metrics" and method == "GET":
        return _stream_metrics(handler, job)
    raise HubError(404, f"Not found: {method} {handler.path}")


def _start_stream(handler: HubHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Cache-Control", "no-cache")
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.close_connection = True


def _stream_logs(handler: HubHandler, job: Job) -> int:
    tail = handler._param("tail")
    _start_stream(handler)
    with job.changed:
        sent = max(0, len(job.lines) - int(tail)) if tail else 0
    try:
        while True:
            with job.changed:
                if len(job.lines) == sent and job.stage not in TERMINAL:
                    job.changed.wait(timeout=5.0)
                batch, done = job.lines[sent:], job.stage in TERMINAL
            sent += len(batch)
            if batch:
                handler.wfile.write("".join(
                    f"data: {json.dumps({'timestamp': iso(t), 'data': text})}\n\n" for t, text in batch).encode())
            elif not done:
                handler.wfile.write(b": keep-alive\n\n")
            if done and not batch:
                return 200
    except (BrokenPipeError, ConnectionResetError):  # the client detached
        return 200


def _stream_metrics(handler: HubHandler, job: Job) -> int:
    if job.stage in TERMINAL:
        raise HubError(406, "Job is not running")
    _start_stream(handler)
    try:
        while job.stage not in TERMINAL:
            sample = {"cpu_usage_pct": 0, "cpu_millicores": 2000, "memory_used_bytes": _rss(job),
                      "memory_total_bytes": 16 * 2**30, "rx_bps": 0, "tx_bps": 0, "gpus": {}, "replica": job.id[:5]}
            handler.wfile.write(f"event: metric\ndata: {json.dumps(sample)}\n\n".encode())
            time.sleep(1.0)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return 200


def _rss(job: Job) -> int:
    try:
        status = Path(f"/proc/{job.proc.pid}/status").read_text()  # type: ignore[union-attr]
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024  # type: ignore[union-attr]
    except (AttributeError, OSError):
        return 0
