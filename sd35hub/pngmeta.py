"""PNGs that carry their generation parameters (tEXt chunks), and labelled comparison grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# tEXt chunk name -> params key
TEXT_CHUNKS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "seed": "seed",
    "steps": "steps",
    "cfg": "guidance_scale",
    "scheduler": "scheduler",
    "model": "model",
    "width": "width",
    "height": "height",
    "sd35hub_version": "sd35hub_version",
}


def save_png(image: Any, path: str | Path, params: dict[str, Any]) -> Path:
    """Write `image` with each parameter in its own tEXt chunk, plus `adapters` and the full `sd35hub` JSON."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for chunk, key in TEXT_CHUNKS.items():
        if key in params:
            info.add_text(chunk, str(params[key]))
    adapters = [{"source": a["source"], "weight": a["weight"]} for a in params.get("adapters", [])]
    info.add_text("adapters", json.dumps(adapters))
    info.add_text("sd35hub", json.dumps(params, default=str, sort_keys=True))
    from sd35hub.diskspace import writing

    path = Path(path)
    with writing(path, needed=image.width * image.height * 4):  # at most ~the raw pixels
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            image.save(path, pnginfo=info)
        except BaseException:
            path.unlink(missing_ok=True)  # never leave a truncated PNG behind
            raise
    return path


def read_png_params(path: str | Path) -> dict[str, Any]:
    """The tEXt chunks of a PNG written by save_png (adapters and sd35hub decoded from JSON)."""
    from PIL import Image

    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}))
    for key in ("adapters", "sd35hub"):
        if key in text:
            text[key] = json.loads(text[key])
    return text


def make_grid(images: list[Any], labels: list[str], columns: int, title: str = "") -> Any:
    """Images in a grid with a label strip under each (and an optional title on top)."""
    from PIL import Image, ImageDraw

    width, height = images[0].size
    label_h, title_h = 14, (16 if title else 0)
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, title_h + rows * (height + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill="black")
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (i % columns) * width, title_h + (i // columns) * (height + label_h)
        grid.paste(image.convert("RGB"), (x, y))
        draw.text((x + 2, y + height + 1), label, fill="black")
    return grid
