"""summary.json: the one schema of what a finished training run says about itself.

``RunSummary`` (with its sections ``LoraSummary``, ``ValidationImage``, ``EmbeddingsSummary``,
``PriorSummary``, ``FidelitySummary``) is written by the trainer (sd35hub.train.outputs) and read by the
model card and the publisher (sd35hub.hub), ``sd35hub eval`` (sd35hub.workflows.evaluate), a finished run's
TrainResult and the tests. Nothing else builds or parses the JSON.

    summary = RunSummary.read(output_dir)   # ConfigError listing every problem at once
    summary.write(output_dir)               # atomic (sd35hub.paths.atomic_write_text)

summary.json is a file on disk anyone may edit (or a damaged one), so reading checks every field against
the types declared here, and every path it names (the adapter, validation images, the loss plot, the
pivotal embeddings, the fidelity files) must be a plain relative path that, with symbolic links resolved,
stays inside the run folder. Keys this version does not know are ignored.

Schema versions: 1 is the unversioned file written before ``schema_version`` existed (same keys, no
``phases``); it is read as is. 2 adds ``schema_version`` and ``phases``. A file from a newer sd35hub is
refused with the fix (upgrade).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from sd35hub.errors import ConfigError

SCHEMA_VERSION = 2
SUMMARY_FILE = "summary.json"
ADAPTER_FILE = "adapter/pytorch_lora_weights.safetensors"  # relative to the run folder
_BAD = object()  # a field that did not validate (its problem is already listed)


# ------------------------------------------------------------------ the sections
class _Section:
    def to_dict(self) -> dict[str, Any]:
        """This section as summary.json writes it."""
        return _to_json(self)


@dataclass(frozen=True)
class ValidationImage(_Section):
    path: str  # relative to the run folder, e.g. samples/final_0.png
    prompt: str | None = ""  # null (a hand-edited file) reads as ""

    _PATHS = ("path",)

    def __post_init__(self) -> None:
        if self.prompt is None:
            object.__setattr__(self, "prompt", "")


@dataclass(frozen=True)
class LoraSummary(_Section):
    """The adapter's settings; the keys after ``preset`` are written only when set."""

    rank: int | None = None
    alpha: float | None = None
    targets: list[str] = field(default_factory=list)  # module names, e.g. to_q, to_k
    dropout: float | None = None
    blocks: str | None = None  # transformer blocks adapted ("all", "0-11", ...)
    preset: str | None = None  # lora.targets as configured (attention, all-linear, ...)
    variant: str | None = None  # dora | lokr | loha (plain lora: not written)
    rslora: bool | None = None
    init: str | None = None
    text_encoders: list[str] | None = None  # text-encoder LoRA: clip_l, clip_g, t5
    text_encoder_rank: int | None = None
    text_encoder_alpha: float | None = None
    text_encoder_lr: float | None = None

    _ALWAYS = ("rank", "alpha", "targets", "dropout", "blocks", "preset")


@dataclass(frozen=True)
class EmbeddingsSummary(_Section):
    """Pivotal tuning: the new tokens' embeddings.safetensors next to the adapter (sd35hub.train.pivotal_live)."""

    file: str  # relative to the run folder
    tokens: list[str] = field(default_factory=list)
    encoders: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # clip_l / clip_g / t5xxl: the file's keys
    embedding_lr: float | None = None
    embedding_steps: int | None = None
    init: str | None = None

    _ALWAYS = ("file", "tokens", "encoders", "keys", "embedding_lr", "embedding_steps", "init")
    _PATHS = ("file",)


@dataclass(frozen=True)
class PriorSummary(_Section):
    """DreamBooth prior preservation: the class images and their weight (sd35hub.train.prior)."""

    class_prompt: str | None = None
    class_images: int | None = None
    generated: int | None = None  # of class_images, rendered by the base model for this run
    prior_loss_weight: float | None = None
    class_samples_seen: int | None = None

    _ALWAYS = ("class_prompt", "class_images", "generated", "prior_loss_weight", "class_samples_seen")


@dataclass(frozen=True)
class FidelitySummary(_Section):
    """train.evaluate: CLIP-T / CLIP-I / DINO of the final validation images (sd35hub.models.fidelity),
    or only ``error`` when they could not be measured. Keys that are None are not written."""

    clip_model: str | None = None
    dino_model: str | None = None
    instance_images: int | None = None
    mean: dict[str, float | None] | None = None  # clip_t, clip_i, dino
    prompts: list[dict[str, Any]] | None = None  # one score row per prompt (models.fidelity.PromptScore)
    json: str | None = None  # eval/eval.json, relative to the run folder
    grid: str | None = None  # eval/grid.png
    error: str | None = None

    _PATHS = ("json", "grid")


# ------------------------------------------------------------------ the summary
@dataclass(frozen=True)
class RunSummary:
    """What summary.json holds. Only ``base_model`` is required: a hand-written or old file may leave any
    other key out. The four sections after ``mask_t5_padding`` are written only when present."""

    base_model: str  # a Hub id, "tiny", or "a local model" (never a local path)
    variant: str | None = None  # sd3.5-medium | sd3.5-large | sd3.5-large-turbo | tiny
    adapter_file: str = ADAPTER_FILE
    trigger_word: str | None = None
    dataset: str | None = None
    steps: int | None = None
    epochs: float | None = None
    samples_seen: int | None = None
    final_loss: float | None = None
    validation_loss: float | None = None
    initial_validation_loss: float | None = None
    resolution_buckets: list[tuple[int, int]] = field(default_factory=list)  # [width, height]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> inputs skipped
    validation_images: list[ValidationImage] = field(default_factory=list)
    loss_plot: str | None = "loss.png"  # None: no plot written; the card leaves out a plot that is not on disk
    precision: str | None = None
    quantization: str | None = None
    seed: int | None = None
    lora: LoraSummary = field(default_factory=LoraSummary)
    learning_rate: float | None = None
    optimizer: str | None = None
    batch_size: int | None = None
    gradient_accumulation: int | None = None
    lr_scheduler: str | None = None
    timestep_sampling: str | None = None
    loss_weighting: str | None = None
    ema_decay: float | None = None
    duration_s: float | None = None
    peak_memory_gib: float | None = None
    peak_memory_of: str = "gpu"  # "gpu" (CUDA allocations) | "host" (the process's peak RSS: a CPU run)
    sd35hub_version: str | None = None
    validation_loss_on: str | None = None  # "held-out" samples | "training" samples at fixed noise
    held_out: int | None = None  # held-out samples
    mask_t5_padding: bool = False  # trained on zeroed T5 padding embeddings
    embeddings: EmbeddingsSummary | None = None
    prior_preservation: PriorSummary | None = None
    fidelity: FidelitySummary | None = None
    memory: dict[str, Any] | None = None  # measured peak memory per phase + the plan (sd35hub.train.phases.report)
    phases: dict[str, float] = field(default_factory=dict)  # startup phase -> its seconds; "to first step": from launch
    schema_version: int = SCHEMA_VERSION

    _PATHS = ("adapter_file", "loss_plot")
    _OPTIONAL = ("embeddings", "prior_preservation", "fidelity", "memory")  # written only when not None
    _CHOICES = {"peak_memory_of": ("gpu", "host"), "validation_loss_on": ("held-out", "training")}
    _COUNTS = ("steps", "samples_seen", "batch_size", "gradient_accumulation", "held_out")

    # -------------------------------------------------------------- writing
    def to_dict(self) -> dict[str, Any]:
        """The JSON object of summary.json (``schema_version`` first)."""
        out = _to_json(self)
        return {"schema_version": out.pop("schema_version"), **out}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write(self, output_dir: str | Path) -> Path:
        """OUTPUT/summary.json, atomically; returns its path."""
        from sd35hub.paths import atomic_write_text

        return atomic_write_text(Path(output_dir) / SUMMARY_FILE, self.to_json())

    # -------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, data: Any, *, source: str = SUMMARY_FILE) -> RunSummary:
        """The summary of a parsed summary.json; ConfigError listing every problem (``source`` names the file)."""
        problems: list[str] = []
        if not isinstance(data, dict):
            problems.append(f"must hold a JSON object (got {type(data).__name__})")
        else:
            version = data.get("schema_version", 1)
            if not _is_int(version) or version < 1:
                problems.append(f"schema_version: expected a positive integer, got {_short(version)}")
            elif version > SCHEMA_VERSION:
                raise ConfigError(
                    f"{source} has schema_version {version}, written by a newer sd35hub (this one reads up to "
                    f"{SCHEMA_VERSION}): upgrade sd35hub (pip install -U sd35hub) to read it."
                )
            data = {k: v for k, v in data.items() if k != "schema_version"}
            if data.get("base_model") in (None, ""):
                data.pop("base_model", None)
                problems.append("base_model: missing or empty: was this file written by `sd35hub train`? "
                                "It names the base model the adapter was trained on (a Hub id or \"tiny\")")
            summary = _from_json(cls, data, "", problems)
        if problems:
            raise ConfigError([*(f"{source}: {p}" for p in problems),
                               f"{source} is malformed: fix the fields above (RunSummary in sd35hub/run_summary.py "
                               "says what each holds) or rerun training to write it again"])
        return summary  # type: ignore[return-value]

    @classmethod
    def read(cls, output_dir: str | Path) -> RunSummary:
        """OUTPUT/summary.json, checked: types, and every path it names inside OUTPUT with links resolved.
        ConfigError when the file is missing, not JSON, or has problems (all listed at once)."""
        output_dir = Path(output_dir)
        path = output_dir / SUMMARY_FILE
        if not path.is_file():
            raise ConfigError(f"{output_dir} has no {SUMMARY_FILE}: point at the output folder of `sd35hub train` "
                              f"(the one with adapter/, samples/ and {SUMMARY_FILE}).")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ConfigError(f"{path} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); "
                              "rerun training or fix the file.") from None
        summary = cls.from_dict(data, source=str(path))
        problems = []
        for what, relative in summary.paths():
            try:
                inside(output_dir, relative, what)
            except ConfigError as exc:
                problems.append(exc.problems[0])
        if problems:
            raise ConfigError(problems)
        return summary

    def paths(self) -> list[tuple[str, str]]:
        """(field, relative path) of every file this summary names in the run folder."""
        out = [(name, getattr(self, name)) for name in self._PATHS if getattr(self, name) is not None]
        out += [(f"validation_images[{i}].path", image.path) for i, image in enumerate(self.validation_images)]
        for section in ("embeddings", "fidelity"):
            value = getattr(self, section)
            if value is not None:
                out += [(f"{section}.{name}", getattr(value, name)) for name in value._PATHS
                        if getattr(value, name) is not None]
        return out


def inside(output_dir: Path, relative: str, what: str) -> Path:
    """``output_dir / relative`` if it is a plain relative path that stays inside ``output_dir`` with
    links resolved; ConfigError otherwise."""
    text = str(relative)
    if _lexical_problem(text):
        raise _outside(output_dir, what, text)
    path = output_dir / PurePosixPath(text.replace("\\", "/"))
    try:
        path.resolve().relative_to(output_dir.resolve())
    except ValueError:
        raise _outside(output_dir, what, text, f" (it links to {path.resolve()})") from None
    return path


def _lexical_problem(text: str) -> bool:
    posix, windows = PurePosixPath(text.replace("\\", "/")), PureWindowsPath(text)
    return not text or posix.is_absolute() or windows.is_absolute() or bool(windows.drive) or ".." in posix.parts


def _outside(output_dir: Path, what: str, text: str, detail: str = "") -> ConfigError:
    return ConfigError(
        f"{output_dir / SUMMARY_FILE} names the {what} {text!r}, which is not inside the run folder "
        f"{output_dir}{detail}. publish only uploads files inside the run folder: fix {SUMMARY_FILE} "
        "(paths relative to the folder) or move the file into the folder."
    )


# ------------------------------------------------------------------ JSON <-> dataclasses, by the type hints
def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        always = getattr(value, "_ALWAYS", None)
        optional = getattr(value, "_OPTIONAL", None)
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None and (optional is not None and f.name in optional
                                 or optional is None and (always is None or f.name not in always)):
                continue
            out[f.name] = _to_json(item)
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


def _from_json(cls: type, data: dict[str, Any], where: str, problems: list[str]) -> Any:
    """``cls(**data)`` with every field converted and checked; _BAD (problems listed) otherwise."""
    hints = _hints(cls)
    values: dict[str, Any] = {}
    before, missing = len(problems), False
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                missing = True
                if f.name != "base_model":  # RunSummary.from_dict words that one
                    problems.append(f"{where}{f.name}: missing")
            continue
        value = values[f.name] = _convert(data[f.name], hints[f.name], f"{where}{f.name}", problems)
        if value is not _BAD and value is not None:  # the rules beyond the type
            problems += [f"{where}{f.name}: {p}" for p in _rule_problems(cls, f.name, value)]
    if missing or len(problems) > before:
        return _BAD
    return cls(**values)


def _rule_problems(cls: type, name: str, value: Any) -> list[str]:
    if name in getattr(cls, "_PATHS", ()) and _lexical_problem(value):
        return [f"{value!r} is not inside the run folder: write a path relative to the run folder "
                "(no leading / or drive, no ..)"]
    allowed = getattr(cls, "_CHOICES", {}).get(name)
    if allowed and value not in allowed:
        return [f"expected one of {', '.join(map(repr, allowed))}, got {_short(value)}"]
    if name in getattr(cls, "_COUNTS", ()) and value < 0:
        return [f"expected a count (0 or more), got {value}"]
    if name == "phases":
        bad = [phase for phase, seconds in value.items() if not math.isfinite(seconds) or seconds < 0]
        return [f"expected seconds (0 or more) per phase, not for {', '.join(bad)}"] if bad else []
    return []


def _convert(value: Any, hint: Any, where: str, problems: list[str]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where, problems)
    ok = True
    if hint is Any:
        return value
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = _is_int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond any float
                pass
        ok = False
    elif hint is str:
        ok = isinstance(value, str)
    elif origin is list and isinstance(value, list):
        items = [_convert(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return _BAD if any(v is _BAD for v in items) else items
    elif origin is tuple and isinstance(value, list) and len(value) == len(args):
        items = [_convert(v, a, f"{where}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args, strict=True))]
        return _BAD if any(v is _BAD for v in items) else tuple(items)
    elif origin is dict and isinstance(value, dict):
        items = {k: _convert(v, args[1], f"{where}.{k}", problems) for k, v in value.items()}
        return _BAD if any(v is _BAD for v in items.values()) else items
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return _from_json(hint, value, f"{where}.", problems)
        ok = False
    else:
        ok = False
    if not ok:
        problems.append(f"{where}: expected {_describe(hint)}, got {_short(value)}")
        return _BAD
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
    if hint in names:
        return names[hint]
    if origin is tuple:
        return f"a list of {len(args)} integers ([width, height])" if set(args) == {int} else f"a list of {len(args)}"
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"an object of {_plural(args[1])}"
    if dataclasses.is_dataclass(hint):
        keys = ", ".join(f'"{f.name}"' for f in dataclasses.fields(hint)[:3])
        return f"an object ({{{keys}, ...}})"
    return "a JSON value"


def _plural(hint: Any) -> str:
    text = _describe(typing.get_args(hint)[0] if typing.get_origin(hint) in (typing.Union, types.UnionType)
                     and len(typing.get_args(hint)) == 2 else hint)
    return {"an integer": "integers", "a number": "numbers", "a string": "strings", "true/false": "true/false values",
            "a JSON value": "JSON values"}.get(text, text)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
