"""What `publish` accepts from a run folder: a well-formed summary.json, and files inside the folder only.

summary.json is a file on disk anyone may edit (or a damaged one): its fields are checked against
the types ``CardInfo`` declares before the card is built, and every path it names (the adapter,
validation images, the loss plot) must be a plain relative path that, with symbolic links resolved,
stays inside the run folder. Anything else is a ConfigError naming the field and the fix; nothing
outside the folder is ever read for upload.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from sd35hub.errors import ConfigError

_PATH_FIELDS = ("adapter_file", "loss_plot")


def inside(output_dir: Path, relative: str, what: str) -> Path:
    """``output_dir / relative`` if it is a plain relative path that stays inside ``output_dir`` with
    links resolved; ConfigError otherwise."""
    text = str(relative)
    posix, windows = PurePosixPath(text.replace("\\", "/")), PureWindowsPath(text)
    if not text or posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts:
        raise _outside(output_dir, what, text)
    path = output_dir / posix
    root = output_dir.resolve()
    try:
        path.resolve().relative_to(root)
    except ValueError:
        raise _outside(output_dir, what, text, f" (it links to {path.resolve()})") from None
    return path


def _outside(output_dir: Path, what: str, text: str, detail: str = "") -> ConfigError:
    return ConfigError(
        f"{output_dir / 'summary.json'} names the {what} {text!r}, which is not inside the run folder "
        f"{output_dir}{detail}. publish only uploads files inside the run folder: fix summary.json "
        "(paths relative to the folder) or move the file into the folder."
    )


def check_summary(output_dir: Path) -> dict[str, Any]:
    """The parsed summary.json of ``output_dir`` when it is well formed; ConfigError listing every
    problem otherwise (a missing file is left to CardInfo.from_output_dir, which says what it wants)."""
    from sd35hub.hub.card import CardInfo

    path = output_dir / "summary.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); "
                          "rerun training or fix the file.") from None
    if not isinstance(summary, dict):
        raise ConfigError(f"{path} must hold a JSON object (got {type(summary).__name__}); "
                          "rerun training or fix the file.")
    hints = typing.get_type_hints(CardInfo)
    problems = [
        f"{key}: expected {_describe(hints[key])}, got {_short(value)}"
        for key, value in summary.items()
        if key in hints and value is not None and not _type_ok(value, hints[key])
    ]
    problems += _element_problems(summary)
    for key in _PATH_FIELDS:
        if isinstance(summary.get(key), str):
            try:
                inside(output_dir, summary[key], key)
            except ConfigError as exc:
                problems.append(exc.problems[0])
    for index, item in enumerate(summary.get("validation_images") or []):
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            try:
                inside(output_dir, item["path"], f"validation_images[{index}].path")
            except ConfigError as exc:
                problems.append(exc.problems[0])
    if problems:
        raise ConfigError([f"{path}: {p}" if not p.startswith(str(path)) else p for p in problems])
    return summary


def _element_problems(summary: dict[str, Any]) -> list[str]:
    problems = []
    buckets = summary.get("resolution_buckets")
    if isinstance(buckets, list) and not all(
        isinstance(wh, list) and len(wh) == 2 and all(_is_int(x) for x in wh) for wh in buckets
    ):
        problems.append("resolution_buckets: expected a list of [width, height] integer pairs")
    skipped = summary.get("skipped")
    if isinstance(skipped, dict) and not all(_is_int(v) for v in skipped.values()):
        problems.append("skipped: expected integer counts")
    images = summary.get("validation_images")
    if isinstance(images, list) and not all(
        isinstance(item, dict) and isinstance(item.get("path"), str)
        and isinstance(item.get("prompt", ""), (str, type(None)))
        for item in images
    ):
        problems.append("validation_images: expected a list of {\"path\": ..., \"prompt\": ...} objects")
    return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint) if arg is not type(None))
    if hint is Any:
        return True
    if origin is not None:
        return isinstance(value, list if origin in (list, tuple) else origin)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (
        typing.Union, types.UnionType) else [hint]
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
    return " or ".join(names.get(a, "a list" if typing.get_origin(a) in (list, tuple) else
                                 "an object" if typing.get_origin(a) is dict else getattr(a, "__name__", str(a)))
                       for a in args)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
