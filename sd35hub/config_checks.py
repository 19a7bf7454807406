"""Checks every config field gets, whoever wrote the section: type, finiteness, bounds, size; and the
config file read as untrusted text (encoding, size, nesting, YAML aliases).

``Config.problems()`` runs :func:`field_problems` on every section, so a field added later is checked
for type and finiteness even before it has an entry in :data:`BOUNDS`; ints without one must still fit
in 32 bits and floats within ±1e12, so an absurd size never reaches an allocator. Each problem is one
line naming the dotted key, the bound and an example.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from sd35hub.errors import ConfigError

MAX_INT = 2**31 - 1
MAX_FLOAT = 1e12
MAX_TEXT = 10_000  # characters in any string field
MAX_ITEMS = 256  # items in any list field (validation prompts, trackers)
MAX_FILE_BYTES = 1 << 20  # a config file is a few hundred bytes; 1 MiB is not a config
MAX_VALUES = 10_000  # YAML values after alias expansion (an alias bomb expands to billions)
SEED_MAX = 2**32 - 1  # numpy seeds must fit in 32 bits

# dotted key -> (low, high), inclusive; None: unbounded on that side (still finite / 32-bit)
BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "data.resolution": (64, 4096),
    "data.keep_tags": (0, 1000),
    "data.min_size": (0, 16384),
    "data.max_aspect": (1, 100),
    "data.max_samples": (1, 100_000_000),
    "data.buffer_size": (1, 100_000),
    "data.holdout": (0, 100_000),
    "data.max_sequence_length": (1, 512),
    "data.caption_dropout": (0, 1),
    "data.num_class_images": (1, 100_000),
    "lora.rank": (1, 1024),
    "lora.alpha": (0, 65536),
    "lora.dropout": (0, 1),
    "train.epochs": (1, 1_000_000),
    "train.max_steps": (1, 100_000_000),
    "train.batch_size": (1, 4096),
    "train.gradient_accumulation": (1, 4096),
    "train.learning_rate": (0, 10),
    "train.weight_decay": (0, 10),
    "train.warmup_steps": (0, 100_000_000),
    "train.max_grad_norm": (0, 1e6),
    "train.ema_decay": (0, 1),
    "train.logit_mean": (-10, 10),
    "train.logit_std": (0, 10),
    "train.mode_scale": (0, 10),
    "train.timestep_shift": (0, 100),
    "train.seed": (0, SEED_MAX),
    "train.checkpoint_every": (0, 100_000_000),
    "train.keep_checkpoints": (1, 10_000),
    "train.validation_every": (0, 100_000_000),
    "train.validation_steps": (1, 1000),
    "train.validation_guidance": (0, 100),
    "train.validation_seed": (0, SEED_MAX),
    "train.log_every": (1, 100_000_000),
    "train.prior_loss_weight": (0, 100),
    "data.unmasked_weight": (0, 1),
    "data.repeats": (1, 10_000),
    "lora.decompose_factor": (-1, 65536),
    "lora.text_encoder_rank": (1, 1024),
    "lora.text_encoder_alpha": (0, 65536),
    "train.text_encoder_lr": (0, 10),
    "train.validation_skip_layers": (0, 1000),
    "train.validation_skip_layer_scale": (0, 100),
}


def show(value: Any, limit: int = 60) -> str:
    """repr() of a value for a one-line message, cut to ``limit`` characters."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still reported
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _kind(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return next(a for a in args if a is not type(None)), type(None) in args
    return annotation, False


def _number(path: str, value: Any, is_int: bool) -> list[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (is_int and not isinstance(value, int)):
        return [f"{path}={show(value)} must be {'an integer' if is_int else 'a number'}"]
    if not math.isfinite(value):
        return [f"{path}={show(value)} must be a finite number"]
    low, high = BOUNDS.get(path, (-MAX_INT, MAX_INT) if is_int else (-MAX_FLOAT, MAX_FLOAT))
    if (low is not None and value < low) or (high is not None and value > high):
        return [f"{path}={show(value)} is out of range; it must be between {_fmt(low)} and {_fmt(high)}"]
    return []


def _fmt(bound: float | None) -> str:
    if bound is None:
        return "any"
    return f"{int(bound):,}".replace(",", "_") if float(bound).is_integer() else f"{bound:g}"


def _value_problems(path: str, annotation: Any, value: Any) -> list[str]:
    kind, optional = _kind(annotation)
    if value is None:
        return [] if optional else [f"{path} must be set (it cannot be null)"]
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (tuple, list)):
            return [f"{path}={show(value)} must be a list"]
        if len(value) > MAX_ITEMS:
            return [f"{path} has {len(value)} items; at most {MAX_ITEMS}"]
        args = typing.get_args(kind)
        item = args[0] if args else Any
        return [p for v in value for p in _value_problems(path, item, v)][:3]
    if kind is bool:
        return [] if isinstance(value, bool) else [f"{path}={show(value)} must be true or false"]
    if kind in (int, float):
        return _number(path, value, kind is int)
    if kind is str:
        if not isinstance(value, str):
            return [f"{path}={show(value)} must be a string"]
        if len(value) > MAX_TEXT:
            return [f"{path} is {len(value):,} characters long; at most {MAX_TEXT:,}"]
        if "\x00" in value:
            return [f"{path}={show(value)} contains a NUL character"]
    return []


def _type_ok(annotation: Any, value: Any) -> bool:
    """Whether ``value`` has the field's type (what a section's own checks may assume)."""
    kind, optional = _kind(annotation)
    if value is None:
        return optional
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        return isinstance(value, (tuple, list)) and all(_type_ok(args[0] if args else Any, v) for v in value)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    return True


def field_problems(name: str, section: Any) -> tuple[list[str], bool]:
    """(problems of every field of a section, whether any is of the wrong type)."""
    hints = typing.get_type_hints(type(section))
    out: list[str] = []
    wrong_type = False
    for f in fields(section):
        value = getattr(section, f.name)
        out += _value_problems(f"{name}.{f.name}", hints[f.name], value)
        wrong_type |= not _type_ok(hints[f.name], value)
    return out, wrong_type


def merge_problems(specific: list[str], generic: list[str]) -> list[str]:
    """The section's own problems, plus generic ones about keys they do not already name."""
    named = {p.split("=", 1)[0].split(" ", 1)[0] for p in specific}
    return specific + [p for p in generic if p.split("=", 1)[0].split(" ", 1)[0] not in named]


# ------------------------------------------------------------------------------- the config file
def _expanded_size(tree: Any) -> int:
    """Values in ``tree`` counting every alias as a copy (memoised: an alias bomb is counted, not built)."""
    memo: dict[int, int] = {}
    order: list[Any] = [tree]
    stack: list[Any] = [tree]
    while stack:  # post-order without recursion (deep nesting must not overflow the stack)
        node = stack.pop()
        if isinstance(node, (dict, list)) and id(node) not in memo:
            memo[id(node)] = -1
            children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
            for child in children:
                if isinstance(child, (dict, list)) and id(child) not in memo:
                    order.append(child)
                    stack.append(child)
    for node in reversed(order):
        if isinstance(node, (dict, list)) and memo.get(id(node), -1) == -1:
            children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
            memo[id(node)] = 1 + sum(memo.get(id(c), 0) if isinstance(c, (dict, list)) else 1 for c in children)
            if memo[id(node)] > MAX_VALUES:
                return memo[id(node)]
    return memo.get(id(tree), 1) if isinstance(tree, (dict, list)) else 1


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python values, or a one-line ConfigError (bad syntax, too deep, alias bomb)."""
    import yaml

    try:
        tree = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = "; ".join(" ".join(str(x).split()) for x in (exc.context, exc.problem) if x) or "syntax error"
        raise ConfigError(f"{where} is not valid YAML{at}: {what[:300]}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be a config (sections hold key: value pairs)") from None
    except (MemoryError, OverflowError, ValueError) as exc:
        raise ConfigError(f"{where} could not be read as YAML ({type(exc).__name__})") from None
    if _expanded_size(tree) > MAX_VALUES:
        raise ConfigError(f"{where} expands to more than {MAX_VALUES:,} values (YAML aliases); a config needs a few dozen")
    return tree


def read_config_text(path: Path) -> str:
    """The text of a config file, or a one-line ConfigError (missing, a folder, too big, not UTF-8 text)."""
    where = f"config file {str(path)!r}"
    if path.is_dir():
        raise ConfigError(f"{where} is a folder; pass --config with a YAML file")
    if not path.is_file():
        raise ConfigError(f"{where} does not exist; pass --config with a YAML file path")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{where} is {size / 2**20:.1f} MiB; a config is a small YAML file (at most 1 MiB)")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror or exc}") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(data) > 1 and data[1:2] == b"\x00"):
        raise ConfigError(f"{where} is UTF-16 text; save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start}); a config is a YAML text file") from None
    if "\x00" in text:
        raise ConfigError(f"{where} holds NUL bytes: it is a binary file, not YAML")
    return text
