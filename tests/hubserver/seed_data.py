"""Small dataset repos for the local Hub, in the two layouts sd35hub reads from the Hub:

- `naruto_parquet_files`: like lambdalabs/naruto-blip-captions — `data/train-*.parquet` with an
  `image` (Image feature: {bytes, path}) and a `text` column, plus a README with `dataset_info`.
- `imagefolder_files`: PNG files plus `metadata.jsonl` ({"file_name", "text"}) — datasets' imagefolder.

Images are generated (deterministic colours, mixed sizes) so tests can check decoded pixels/sizes.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import HubServer

# (width, height) of the generated images: square, landscape and portrait buckets.
SIZES: tuple[tuple[int, int], ...] = ((64, 64), (96, 64), (64, 96), (128, 72))


def sample_rows(count: int = 6) -> list[tuple[bytes, str, tuple[int, int]]]:
    """(png_bytes, caption, (width, height)) for `count` generated images."""
    from PIL import Image

    rows = []
    for index in range(count):
        size = SIZES[index % len(SIZES)]
        colour = ((40 * index) % 256, (90 + 30 * index) % 256, (200 - 25 * index) % 256)
        image = Image.new("RGB", size, colour)
        # a diagonal stripe so the image is not flat (a decoder bug would show in pixel checks)
        for x in range(min(size)):
            image.putpixel((x, x), (255, 255, 255))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append((buffer.getvalue(), f"a drawing of a ninja number {index}, colour {colour}", size))
    return rows


NARUTO_README = """---
license: other
dataset_info:
  features:
  - name: image
    dtype: image
  - name: text
    dtype: string
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---
# Naruto-style captions (test copy)
"""


def naruto_parquet_files(count: int = 6) -> dict[str, bytes]:
    """Files of a parquet dataset repo with `image` + `text` columns (HF Image feature in the schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Features, Image, Value

    rows = sample_rows(count)
    features = Features({"image": Image(), "text": Value("string")})
    table = pa.table({
        "image": [{"bytes": png, "path": f"{i:04d}.png"} for i, (png, _, _) in enumerate(rows)],
        "text": [caption for _, caption, _ in rows],
    })
    # datasets reads the feature types back from this schema metadata (so `image` decodes to PIL)
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features.to_dict()}})})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return {
        "README.md": NARUTO_README,
        "data/train-00000-of-00001.parquet": buffer.getvalue(),
    }


def imagefolder_files(count: int = 6, folder: str = "train") -> dict[str, bytes]:
    """Files of an imagefolder dataset repo: `<folder>/NNNN.png` + `<folder>/metadata.jsonl` captions."""
    files: dict[str, bytes] = {}
    lines = []
    for index, (png, caption, _) in enumerate(sample_rows(count)):
        files[f"{folder}/{index:04d}.png"] = png
        lines.append(json.dumps({"file_name": f"{index:04d}.png", "text": caption}))
    files[f"{folder}/metadata.jsonl"] = ("\n".join(lines) + "\n").encode()
    files["README.md"] = b"---\nlicense: cc-by-4.0\ntask_categories:\n- text-to-image\n---\n# imagefolder test set\n"
    return files


def seed_naruto_dataset(hub: HubServer, repo_id: str, count: int = 6, **kwargs: object) -> str:
    """Seed a parquet image+text dataset repo; returns the commit sha."""
    return hub.seed_repo(repo_id, naruto_parquet_files(count), repo_type="dataset", **kwargs)  # type: ignore[arg-type]


def seed_imagefolder_dataset(hub: HubServer, repo_id: str, count: int = 6, **kwargs: object) -> str:
    """Seed an imagefolder + metadata.jsonl dataset repo; returns the commit sha."""
    return hub.seed_repo(repo_id, imagefolder_files(count), repo_type="dataset", **kwargs)  # type: ignore[arg-type]
