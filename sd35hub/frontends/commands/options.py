"""Checks shared by command options: a float option must be a finite number (click's ranges let NaN through)."""

from __future__ import annotations

import math

import typer


def finite(value: float | None) -> float | None:
    """typer callback: refuse nan/inf (a usage error, exit 2)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value
