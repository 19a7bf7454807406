"""Resumable checkpoints: written atomically, the newest K kept, loaded so a resumed run is exact.

    CHECKPOINT_DIR/checkpoint-000100/
        lora.safetensors       trainable LoRA tensors by parameter name (fp32)
        ema.safetensors        EMA of those tensors (when train.ema_decay is set)
        adapter/pytorch_lora_weights.safetensors   the adapter as published (diffusers + metadata)
        training_state.pt      optimizer, LR scheduler, grad scaler and RNG states (torch.save of
                               plain state dicts; loaded with weights_only=True, never arbitrary pickle)
        state.json             step, epoch, position in the epoch, samples seen, config digest

Everything is written into ``.tmp-checkpoint-*`` next to the final folder and renamed into place, so a
``checkpoint-*`` folder is always complete (a crash leaves only a temp folder, removed next time).
The checkpoint folder can be any path (on Colab: a Google Drive folder survives a disconnect).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sd35hub.errors import ConfigError
from sd35hub.paths import normal_dir_mode

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.json"


@dataclass
class TrainState:
    """Where the run is. ``batch_in_epoch`` counts batches of ``epoch`` already consumed (all ranks)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0  # training samples consumed (all processes)
    config_digest: str = ""  # sha256 of the parts of the config that change the math
    seen_keys_digest: str = ""  # running sha256 of the sample keys consumed, in order
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    path: Path
    state: TrainState
    lora: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, checkpoint_dir: str | Path) -> Path | None:
    """``"latest"`` -> newest checkpoint in checkpoint_dir (None when there is none yet: a fresh
    start); a path -> that checkpoint (ConfigError when it is not one)."""
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        nested = list_checkpoints(path)  # a checkpoint *folder* was passed: take its newest
        if nested:
            return nested[-1]
        raise ConfigError(
            f"train.resume={resume!r} is not a checkpoint folder (no {STATE_FILE}); pass 'latest' or a path "
            "like OUTPUT/checkpoints/checkpoint-000100"
        )
    return path


# ------------------------------------------------------------------------------------------ RNG
def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (CPU) and CUDA RNG states as tensors/ints (loadable with weights_only)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    rng: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    import numpy as np

    py = rng["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = rng["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ------------------------------------------------------------------------------------- save/load
def save_checkpoint(
    checkpoint_dir: str | Path,
    state: TrainState,
    *,
    lora: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    scaler: dict[str, Any] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
    write_adapter: Callable[[Path], Any] | None = None,
    keep: int = 3,
) -> Path:
    """Write ``checkpoint-<step>`` atomically, then delete all but the newest ``keep``. Returns its path."""
    from sd35hub.diskspace import tensor_bytes, writing

    # LoRA + EMA + Adam's two moments + the adapter copy: about 5x the LoRA tensors
    with writing(Path(checkpoint_dir) / checkpoint_name(state.step), needed=5 * tensor_bytes(lora)):
        return _save_checkpoint(checkpoint_dir, state, lora=lora, optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, ema=ema, write_adapter=write_adapter, keep=keep)


def _save_checkpoint(
    checkpoint_dir: str | Path,
    state: TrainState,
    *,
    lora: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    scaler: dict[str, Any] | None,
    ema: dict[str, torch.Tensor] | None,
    write_adapter: Callable[[Path], Any] | None,
    keep: int,
) -> Path:
    from safetensors.torch import save_file

    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-checkpoint-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(state.step)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    normal_dir_mode(staging)  # mkdtemp makes 0700
    try:
        save_file({k: v.contiguous() for k, v in lora.items()}, str(staging / "lora.safetensors"))
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, str(staging / "ema.safetensors"))
        if write_adapter is not None:
            write_adapter(staging / "adapter")
        torch.save(
            {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "rng": capture_rng()},
            staging / "training_state.pt",
        )
        (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
        if final.exists():  # the same step again (e.g. interrupted right after a periodic save)
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    prune_checkpoints(root, final, keep)
    return final


def prune_checkpoints(root: Path, current: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints up to ``current`` (never ``current`` itself);
    checkpoints with a higher step (another timeline, e.g. after resuming from an earlier checkpoint)
    are neither counted nor deleted. Returns what was deleted."""
    step = _step_of(current)
    earlier = [p for p in list_checkpoints(root) if _step_of(p) < step]
    doomed = earlier[: max(len(earlier) - max(keep - 1, 0), 0)]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def _step_of(path: Path) -> int:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else -1


def load_resumable(resume: str, checkpoint_dir: str | Path, log: Callable[[str], None] = print) -> Checkpoint | None:
    """The checkpoint ``resume`` names, loaded. ``"latest"``: the newest one that loads completely;
    a damaged newer one (truncated or missing file, bad state file) is skipped and said so. A named
    checkpoint that is damaged is a ConfigError saying what is wrong. None: "latest" with none yet."""
    if resume != "latest":
        path = resolve_resume(resume, checkpoint_dir)
        assert path is not None
        try:
            return load_checkpoint(path)
        except DamagedCheckpointError as exc:
            raise ConfigError(f"train.resume={resume!r}: {exc}; pass another checkpoint or 'latest'") from None
    found = list_checkpoints(checkpoint_dir)
    for path in reversed(found):
        try:
            saved = load_checkpoint(path)
        except DamagedCheckpointError as exc:
            log(f"warning: {exc}; trying the next older checkpoint")
            continue
        if path != found[-1]:
            log(f"resuming from {path.name}, the newest complete checkpoint")
        return saved
    if found:
        raise ConfigError(f"every checkpoint in {checkpoint_dir} is damaged ({len(found)} tried); delete them to start "
                          "over, or pass --resume with a checkpoint from elsewhere")
    return None


class DamagedCheckpointError(Exception):
    """A checkpoint folder that cannot be loaded completely (the message names the file and why)."""


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors via safetensors; the training
    state with ``weights_only=True``, which refuses anything but tensors and plain containers)."""
    from safetensors.torch import load_file

    path = Path(path)
    current = STATE_FILE
    try:
        raw = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        known = set(TrainState.__dataclass_fields__)
        state = TrainState(**{k: v for k, v in raw.items() if k in known})
        if not isinstance(state.step, int) or state.step < 0 or not isinstance(state.extra, dict):
            raise ValueError(f"step {state.step!r} / extra {type(state.extra).__name__} are not a training state")
        current = "training_state.pt"
        training = torch.load(path / current, map_location="cpu", weights_only=True)
        current = "lora.safetensors"
        lora = load_file(str(path / current))
        current = "ema.safetensors"
        ema_file = path / current
        ema = load_file(str(ema_file)) if ema_file.is_file() else None
        current = "training_state.pt"
        return Checkpoint(path=path, state=state, lora=lora, ema=ema, optimizer=training["optimizer"],
                          scheduler=training["scheduler"], scaler=training.get("scaler"), rng=training["rng"])
    except Exception as exc:  # noqa: BLE001 - any failure to read a file of it means the checkpoint is damaged
        import pickle

        if isinstance(exc, FileNotFoundError):
            reason = "missing"
        elif isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
            reason = "refused: it holds objects other than tensors and plain containers (weights_only)"
        else:
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        raise DamagedCheckpointError(f"checkpoint {path.name} is damaged ({current}: {reason})") from exc


class SigtermFlag:
    """SIGTERM (Colab/Slurm/`kill`) and a first Ctrl-C (SIGINT, also the notebook's interrupt button)
    set ``received`` instead of killing the process, so the trainer finishes the step it is in, writes
    a consistent checkpoint and exits 130. A second Ctrl-C interrupts at once (KeyboardInterrupt).
    Outside the main thread it is a no-op."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received = False
        self._previous: dict[int, Any] = {}

    def install(self) -> SigtermFlag:
        def _handler(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self.received:
                raise KeyboardInterrupt  # asked twice: stop now
            self.received = True

        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, _handler)
        except ValueError:  # not the main thread (e.g. a notebook worker)
            self.restore()
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)
        self._previous = {}
