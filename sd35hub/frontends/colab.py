"""Glue for colab/SD35_Training.ipynb: every notebook cell is one short call into this module.

    from sd35hub.frontends import colab as nb
    nb.setup(hub_endpoint=None)                     # quiet logs, short error display (typed), Hub endpoint
    profile = nb.environment(MODEL)                 # GPU -> hardware profile, and why
    plan = nb.build_plan(model=MODEL, dataset=DATASET, ..., profile=profile)   # validated, nothing loaded
    nb.memory_plan(plan, profile)                   # per-phase GPU/RAM plan; MemoryPlanError if none fits
    user = nb.login()                               # Colab secret HF_TOKEN / login cache / notebook_login
    plan = nb.check_access(plan, user)              # license of the base (exact link) + write to the repo
    plan = nb.prepare_run(plan)                     # Drive for checkpoints; resume="latest" if one exists
    run = nb.run_training(plan)                     # live progress + validation grids; a line in notebook_runs.jsonl

Inference, evaluation and export helpers live in :mod:`sd35hub.frontends.colab_tools`. Nothing here holds
training logic: it composes sd35hub.config, sd35hub.hardware, sd35hub.access and sd35hub.train.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd35hub.config import from_dict, merge, parse_overrides
from sd35hub.errors import ConfigError, NotLoggedInError, Sd35HubError
from sd35hub.failures import typed_error
from sd35hub.workflows import run as run_plan
from sd35hub.workflows.run import RunPlan, RunStart, resolve_plan

DRIVE_ROOT = "/content/drive"  # where Colab mounts Google Drive
RUNS_LOG = "notebook_runs.jsonl"  # in the checkpoint folder (on Drive it outlives the runtime)


def in_colab() -> bool:
    """True inside a Google Colab runtime (the google.colab module is only importable there)."""
    if "google.colab" in sys.modules:
        return True
    import importlib.util

    try:
        return importlib.util.find_spec("google.colab") is not None
    except ModuleNotFoundError:  # "google" exists (protobuf) but has no colab
        return False


def _ipython() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - plain Python
        return None
    return get_ipython()


def show(item: Any) -> None:
    """Display an image path, a PIL image or markdown text in the notebook (print elsewhere)."""
    if _ipython() is None:
        print(item)
        return
    from IPython.display import Image, Markdown, display

    if isinstance(item, Path) or (isinstance(item, str) and item.endswith(".png") and Path(item).is_file()):
        display(Image(filename=str(item)))
    elif isinstance(item, str):
        display(Markdown(item))
    else:
        display(item)


# ------------------------------------------------------------------------------------- setup
def use_hub_endpoint(endpoint: str | None) -> str:
    """Point huggingface_hub (and datasets) at ``endpoint`` (None: HF_ENDPOINT or huggingface.co).
    Both read HF_ENDPOINT when imported, so this must run before them: after, only a restart helps."""
    if endpoint:
        endpoint = endpoint.rstrip("/")
        if "huggingface_hub" in sys.modules:
            from huggingface_hub import constants

            if constants.ENDPOINT.rstrip("/") != endpoint:
                raise ConfigError(
                    f"HUB_ENDPOINT={endpoint!r} was set after huggingface_hub was imported (it uses "
                    f"{constants.ENDPOINT}); restart the runtime and run the notebook from the top"
                )
        os.environ["HF_ENDPOINT"] = endpoint
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _show_sd35hub_error(
    shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: int | None = None
) -> Any:
    """sd35hub errors are for people: show the message (it says the fix), not a traceback. A full disk, an
    unwritable path or an unreachable Hub is shown as the typed error it stands for
    (sd35hub.failures.typed_error, as the CLI does); anything else keeps IPython's traceback."""
    shown = typed_error(value)
    if not isinstance(shown, Sd35HubError):
        return shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
    line = f"{type(shown).__name__}: {shown}"
    print(line, file=sys.stderr)
    return [line]


def setup(hub_endpoint: str | None = None) -> str:
    """Hub endpoint, quiet per-file loading bars, and a one-line display for sd35hub errors."""
    endpoint = use_hub_endpoint(hub_endpoint)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # per-component loading bars; training and downloads keep theirs
    shell = _ipython()
    if shell is not None and hasattr(shell, "set_custom_exc"):
        shell.set_custom_exc((Exception,), _show_sd35hub_error)  # untyped ones: IPython's own traceback
    from sd35hub import __version__

    return f"sd35hub {__version__}, Hub {endpoint}, {'Colab' if in_colab() else 'not Colab'}"


# --------------------------------------------------------------------------------- environment
def model_variant(model: str) -> str | None:
    """The variant from the model name alone (no download, works before logging in)."""
    from sd35hub.hub.card import variant_from_base

    return "tiny" if model == "tiny" else variant_from_base(model)


def environment(model: str, profile: str = "auto") -> Any:
    """Detect the GPU, choose the hardware profile for ``model``, print both and why; return the profile."""
    import torch

    from sd35hub.hardware import detect_profile

    chosen = detect_profile(profile, variant=model_variant(model))
    cuda = torch.version.cuda if torch.cuda.is_available() else None
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {cuda or 'not available'}")
    print(chosen.describe())
    return chosen


# ---------------------------------------------------------------------------------------- plan
def build_plan(
    *,
    model: str,
    dataset: str,
    trigger_word: str = "",
    rank: int | None = None,
    epochs: int = 10,
    max_steps: int | None = None,
    resolution: int | None = None,
    repo_id: str | None = None,
    private: bool = False,
    output_dir: str = "output",
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 100,
    validation_every: int = 0,
    validation_prompts: list[str] | None = None,
    profile: Any = None,
    extra: list[str] | None = None,
    class_prompt: str = "",
    num_class_images: int | None = None,
    text_encoders: list[str] | None = None,
    text_encoder_lr: float | None = None,
    new_tokens: int = 0,
) -> RunPlan:
    """The notebook's config cell -> a validated, profile-resolved plan. Every problem in one ConfigError.
    ``None`` values are left to the hardware profile; ``extra`` takes ``section.key=value`` strings.
    The subject path: instance images as ``dataset``, the new subject's ``trigger_word`` and a ``class_prompt``
    (e.g. "a photo of a dog") turn on prior preservation with class images the base model renders;
    ``text_encoders`` (e.g. ["clip_l", "clip_g"]) also trains a LoRA on those text encoders at ``text_encoder_lr``;
    ``new_tokens`` (e.g. 2) trains new tokens <s0><s1> for the subject (pivotal tuning; the trigger word must hold
    them, e.g. "<s0><s1> dog")."""
    chosen = {
        "model": {"name": model},
        "data": {"source": dataset, "trigger_word": trigger_word, "resolution": resolution,
                 "class_prompt": class_prompt or None, "num_class_images": num_class_images},
        "lora": {"rank": rank, "text_encoders": list(text_encoders) if text_encoders else None},
        "train": {"epochs": epochs, "max_steps": max_steps, "output_dir": output_dir, "checkpoint_dir": checkpoint_dir,
                  "checkpoint_every": checkpoint_every, "validation_every": validation_every,
                  "validation_prompts": list(validation_prompts or []), "text_encoder_lr": text_encoder_lr,
                  "new_tokens": new_tokens or None},
        "hub": {"repo_id": repo_id or None, "private": private},
    }  # fmt: skip
    raw = {s: {k: v for k, v in values.items() if v is not None} for s, values in chosen.items()}
    overrides = parse_overrides(list(extra or []))
    if profile is not None and "profile" not in overrides.get("train", {}):
        raw["train"]["profile"] = profile.name  # the trainer uses the profile shown here, not a new guess
    config = from_dict(merge(raw, overrides))  # validates every field at once
    return resolve_plan(config, profile)  # the trainer repeats the profile's resolution, same result


def memory_plan(plan: RunPlan, profile: Any) -> Any:
    """Print the run's memory plan (each phase's predicted GPU and RAM need, from the model's configs:
    nothing large is downloaded) and return it; MemoryPlanError names the phase and what would fit."""
    from sd35hub.workflows.plan import plan_for_config

    prompts = len(plan.resolved.train.validation_prompts) or None
    memory = plan_for_config(plan.resolved, profile, validation_prompts=prompts)
    print(memory.table())
    return memory.check()


# ----------------------------------------------------------------------------------- the Hub
def login(*, interactive: bool = True) -> str:
    """Log in through huggingface_hub's own token resolution (HF_TOKEN, the login cache, and on Colab
    the HF_TOKEN secret); return the username. Without a token: show ``notebook_login`` and raise."""
    from huggingface_hub import HfApi, get_token

    from sd35hub.access import hub_errors

    if get_token() is None:
        if interactive and _ipython() is not None:
            from huggingface_hub import notebook_login

            notebook_login()
        raise NotLoggedInError("this notebook (then re-run this cell)")
    with hub_errors("whoami", what="logging in"):
        whoami = HfApi().whoami()
    return str(whoami["name"])


def target_repo(repo_id: str | None, user: str, dataset: str) -> str:
    """``repo_id`` or ``<user>/sd35-<dataset name>-lora``."""
    if repo_id:
        return repo_id
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset.rstrip("/").split("/")[-1]).strip("-.") or "adapter"
    return f"{user}/sd35-{name[:60]}-lora"


def check_access(plan: RunPlan, user: str, *, publish: bool = True) -> RunPlan:
    """License of the base (LicenseNotAcceptedError carries the exact link) and, when publishing,
    write access to the target repo; returns the plan with the target repo filled in."""
    from sd35hub.workflows.checks import check_run_access

    config = plan.config
    repo_id = target_repo(config.hub.repo_id, user, config.data.source)
    checked = config.replace(hub=dataclasses.replace(config.hub, repo_id=repo_id))
    for line in check_run_access(checked, publish=publish):  # the same check the trainer makes
        print(line)
    return plan.replace(hub={"repo_id": repo_id})


# --------------------------------------------------------------------------- storage + resume
def mount_drive(mountpoint: str = DRIVE_ROOT) -> Path | None:
    """Mount Google Drive in Colab (asks for permission once); None elsewhere."""
    if not in_colab():
        return None
    root = Path(mountpoint)
    if not (root / "MyDrive").is_dir():
        from google.colab import drive  # type: ignore[import-not-found]

        drive.mount(str(root))
    return root


def prepare_run(plan: RunPlan) -> RunPlan:
    """sd35hub.workflows.run.prepare_run (which decides) with Colab's Drive as the mountable storage, and its
    decision printed for the notebook's reader. Only Colab I/O here: the mount and the wording."""
    start = run_plan.prepare_run(plan, mount=mount_drive, mount_root=DRIVE_ROOT)
    for line in start_lines(start):
        print(line)
    return start.plan


def start_lines(start: RunStart) -> list[str]:
    """prepare_run's decision in the notebook's words (Drive, resume)."""
    lines = []
    if start.requested_dir and not start.mounted:
        lines.append(f"Google Drive is only available in Colab: checkpoints go to {start.plan.checkpoint_dir}")
    elif start.requested_dir:
        lines.append(f"checkpoints on Google Drive: {start.requested_dir} (they survive a disconnect)")
    if start.resume_from:
        lines.append(f"found {start.found} checkpoint(s) in {start.plan.checkpoint_dir}: resuming from {start.resume_from}")
    else:
        lines.append(f"no checkpoint in {start.plan.checkpoint_dir}: starting from step 0")
    return lines


@dataclass
class NotebookRun:
    start_step: int  # 0 for a fresh start, the checkpoint's step when resumed
    resumed_from: str | None  # checkpoint folder, or None
    result: Any  # sd35hub.train.outputs.TrainResult

    @property
    def output_dir(self) -> Path:
        return Path(self.result.output_dir)


def run_training(plan: RunPlan, *, show_validation: bool = True) -> NotebookRun:
    """Train with a live progress bar, showing each validation grid as it is written. Appends
    {start_step, resumed_from, end_step, ...} to CHECKPOINT_DIR/notebook_runs.jsonl."""
    from sd35hub.train.checkpoint import resolve_resume
    from sd35hub.train.recipe import Trainer, train

    cfg = plan.config
    resumed_from = resolve_resume(cfg.train.resume, plan.checkpoint_dir) if cfg.train.resume else None
    shown: set[str] = set()

    def show_grid(grid: Any) -> None:
        if show_validation and grid is not None and str(grid) not in shown:
            shown.add(str(grid))
            show(Path(grid))

    def on_step(trainer: Trainer) -> None:
        show_grid(getattr(trainer, "validation_grid", None))

    started = time.time()
    try:  # the library's own run: one access check, setup -> train -> save -> cleanup (sd35hub.train.recipe)
        result = train(cfg, on_step=on_step)
    finally:
        _free_accelerator_memory()
    show_grid(result.validation_grid)  # the final grid
    start_step = result.start_step
    record = {"start_step": start_step, "resumed_from": str(resumed_from) if resumed_from else None,
              "end_step": result.steps, "duration_s": round(time.time() - started, 2),
              "adapter": str(result.adapter_path)}  # fmt: skip
    log = plan.checkpoint_dir / RUNS_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    how = f"resumed at step {start_step} from {resumed_from}" if resumed_from else "started at step 0"
    print(f"{how}; now at step {result.steps}; adapter {result.adapter_path}")
    return NotebookRun(start_step=start_step, resumed_from=record["resumed_from"], result=result)


def read_runs(checkpoint_dir: str | Path) -> list[dict[str, Any]]:
    """Every execution of the training cell recorded in CHECKPOINT_DIR/notebook_runs.jsonl, oldest first."""
    path = Path(checkpoint_dir) / RUNS_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _free_accelerator_memory() -> None:
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
