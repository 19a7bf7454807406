"""PNGs that carry their generation parameters (tEXt chunks), and labelled comparison grids."""

from __future__ import annotations

import json
from pathlib import Path, PureWindowsPath
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


_LOCAL_ONLY_KEYS = {"model_path"}  # where this machine keeps the files: meaningless (and private) elsewhere
_RESOLVED_FILE_KEYS = {"file"}  # a resolved file (for a Hub adapter: inside the local Hub cache)


def public_params(params: Any) -> Any:
    """``params`` without the paths sd35hub resolved on this machine, for a PNG that may be shared:
    ``model_path`` (the local snapshot folder) is dropped and a resolved adapter ``file`` keeps its
    name only (its Hub id and filename stay). What the user typed (``source``, ``model``) is kept."""
    if isinstance(params, dict):
        out = {}
        for key, value in params.items():
            if key in _LOCAL_ONLY_KEYS:
                continue
            if key in _RESOLVED_FILE_KEYS and isinstance(value, (str, Path)):
                value = PureWindowsPath(str(value)).name or str(value)  # both / and \ separators
            out[key] = public_params(value)
        return out
    if isinstance(params, (list, tuple)):
        return [public_params(v) for v in params]
    return params


def save_png(image: Any, path: str | Path, params: dict[str, Any]) -> Path:
    """Write `image` with each parameter in its own tEXt chunk, plus `adapters` and the full `sd35hub`
    JSON; local file-system paths are left out (:func:`public_params`). The file gets the usual
    permissions (0644 under the common umask 022), written atomically."""
    from PIL.PngImagePlugin import PngInfo

    from sd35hub.paths import atomic_write

    params = public_params(params)
    info = PngInfo()
    for chunk, key in TEXT_CHUNKS.items():
        if key in params:
            info.add_text(chunk, str(params[key]))
    adapters = [{"source": a["source"], "weight": a["weight"]} for a in params.get("adapters", [])]
    info.add_text("adapters", json.dumps(adapters))
    info.add_text("sd35hub", json.dumps(params, default=str, sort_keys=True))
    # atomic: never a truncated PNG left behind; a full disk is a DiskFullError naming the path
    return atomic_write(Path(path), lambda temp: image.save(temp, format="PNG", pnginfo=info),
                        needed=image.width * image.height * 4)  # at most ~the raw pixels


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
