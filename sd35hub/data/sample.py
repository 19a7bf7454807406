"""The embedded ``sample`` dataset: 24 generated pictures with captions, byte-identical every build.

Each picture is one coloured shape on a two-colour gradient, in one of six sizes (square,
landscape, portrait, up to ~2.2:1), so that bucketing, captions and the whole training path can
be exercised offline. Captions read like ``"a red circle on a blue background, nrt style"``
(``nrt style`` is the trigger phrase the demo trains on). Written as ``NNN_shape.png`` + same-name
``.txt`` into ``$SD35HUB_CACHE/sample-dataset-v<version>`` (default ``~/.cache/sd35hub``):
generated into a temporary folder and renamed into place, so a reader never sees half of it.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from sd35hub.paths import build_into_place, default_cache_dir

SAMPLE_VERSION = "1"
SAMPLE_DIRNAME = f"sample-dataset-v{SAMPLE_VERSION}"
MARKER_FILE = "sd35hub_sample.txt"  # written last, holds the version
NUM_IMAGES = 24
TRIGGER = "nrt style"

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 70, 210),
    "green": (40, 170, 70),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# (width, height): square, landscape, portrait, and wider; every short side >= 256 (min_size default)
SIZES = ((512, 512), (640, 384), (384, 640), (576, 448), (448, 576), (704, 320))


def sample_dataset_path(cache_dir: Path | None = None) -> Path:
    """The folder of the sample dataset, generated on first use (< 1 s); safe against races."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_into_place(cache / SAMPLE_DIRNAME, write_sample_dataset, _complete)


def _complete(path: Path) -> bool:
    marker = path / MARKER_FILE
    return marker.is_file() and marker.read_text().strip() == SAMPLE_VERSION


def sample_records() -> list[tuple[str, Image.Image, str]]:
    """(file stem, picture, caption) for every sample, in order; pure function of the index."""
    names = list(COLORS)
    records = []
    for i in range(NUM_IMAGES):
        # fg cycles every 8, shape shifts by one each cycle: all 24 (colour, shape) pairs differ
        fg = names[i % len(names)]
        shape = SHAPES[(i + i // len(names)) % len(SHAPES)]
        bg = names[(i * 3 + 1 + i // len(names)) % len(names)]
        if bg == fg:
            bg = names[(names.index(bg) + 1) % len(names)]
        bg2 = names[(names.index(bg) + 2) % len(names)]
        size = SIZES[i % len(SIZES)]
        image = _picture(size, shape, COLORS[fg], COLORS[bg], COLORS[bg2], vertical=bool(i % 2))
        caption = f"{_article(fg)} {fg} {shape} on {_article(bg)} {bg} background, {TRIGGER}"
        records.append((f"{i:03d}_{fg}_{shape}", image, caption))
    return records


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def write_sample_dataset(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem, image, caption in sample_records():
        # optimize=False and no metadata: the PNG bytes depend only on the pixels and zlib
        image.save(out_dir / f"{stem}.png", format="PNG", compress_level=6)
        (out_dir / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    (out_dir / MARKER_FILE).write_text(SAMPLE_VERSION + "\n")
    return out_dir


def _picture(
    size: tuple[int, int],
    shape: str,
    fg: tuple[int, int, int],
    bg: tuple[int, int, int],
    bg2: tuple[int, int, int],
    vertical: bool,
) -> Image.Image:
    width, height = size
    ramp = Image.linear_gradient("L")  # 256x256, 0 at the top -> 255 at the bottom
    if not vertical:
        ramp = ramp.rotate(90)
    mask = ramp.resize(size, Image.Resampling.BILINEAR)
    image = Image.composite(Image.new("RGB", size, bg2), Image.new("RGB", size, bg), mask)
    draw = ImageDraw.Draw(image)
    side = int(min(width, height) * 0.6)
    cx, cy = width // 2, height // 2
    box = (cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2)
    if shape == "circle":
        draw.ellipse(box, fill=fg)
    elif shape == "square":
        draw.rectangle(box, fill=fg)
    elif shape == "triangle":
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fg)
    else:  # diamond
        draw.polygon([(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)], fill=fg)
    return image
