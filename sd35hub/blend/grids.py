"""The one comparison-grid builder: `sd35hub generate --compare` and the notebook's gallery use it.

    png = render_grid(engine, requests, labels, out=Path("cfg.png"), title="guidance sweep")
    requests, labels = sweep(request, "cfg")        # one request at each GUIDANCE_SWEEP scale (or "schedulers")

Every cell is one request rendered by the engine; the PNG carries the first request's parameters plus
each cell's (``grid``), so any cell can be reproduced. One guidance sweep and one sampler list for all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sd35hub.blend.request import GenerationRequest

GUIDANCE_SWEEP = (1.0, 2.5, 3.5, 4.5, 6.0, 8.0)  # classifier-free guidance scales of a "cfg" grid
SWEEPS = ("schedulers", "cfg")


def sweep(request: GenerationRequest, kind: str, values: Sequence[Any] | None = None) -> tuple[list[GenerationRequest], list[str]]:
    """(requests, labels): ``request`` once per sampler (``kind="schedulers"``, default every one of
    sd35hub.blend.schedulers) or per guidance scale (``"cfg"``, default GUIDANCE_SWEEP); one image each."""
    from sd35hub.blend.schedulers import SCHEDULERS
    from sd35hub.errors import ConfigError

    if kind not in SWEEPS:
        raise ConfigError(f"a comparison grid is one of {', '.join(SWEEPS)} (or base), not {kind!r}")
    one = dataclasses.replace(request, num_images=1, compare_base=False)
    if kind == "schedulers":
        names = [str(v) for v in (values if values is not None else SCHEDULERS)]
        return [dataclasses.replace(one, scheduler=name) for name in names], names
    scales = [float(v) for v in (values if values is not None else GUIDANCE_SWEEP)]
    return [dataclasses.replace(one, guidance_scale=s) for s in scales], [f"cfg {s:g}" for s in scales]


def render_grid(engine: Any, requests: Sequence[GenerationRequest], labels: Sequence[str], *, out: Path, title: str,
                columns: int | None = None, params: dict[str, Any] | None = None) -> Path:
    """Render each request (first image), lay them out labelled (``columns`` default: one row) and write
    the PNG with the generation parameters; returns its path."""
    results = [engine.generate(r) for r in requests]
    return write_grid([r.images[0] for r in results], labels, out=out, title=title, columns=columns,
                      params={**results[0].params, **(params or {}),
                              "grid": [{"label": label, **r.params} for label, r in zip(labels, results, strict=True)]})


def write_grid(images: Sequence[Any], labels: Sequence[str], *, out: Path, title: str, columns: int | None = None,
               params: dict[str, Any]) -> Path:
    """Images already rendered (e.g. the base images of a compare-base request) as one labelled PNG."""
    from sd35hub.pngmeta import make_grid, save_png

    grid = make_grid(list(images), list(labels), columns or len(images), title=title)
    return save_png(grid, Path(out), params)
