"""A folder of N images with .txt captions for GPU timing runs.

Square by default (one bucket shape: no per-shape recompiles in timing runs); ``--aspects 1,1.5,0.67``
cycles through those width/height ratios instead (one aspect bucket each), to measure what several
buckets cost (a compile per bucket shape, CUDA-graph memory per shape).

usage: python benchmarks/square_dataset.py OUT N [--aspects R1,R2,...]
"""

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

ap = argparse.ArgumentParser()
ap.add_argument("out", type=Path)
ap.add_argument("n", type=int)
ap.add_argument("--aspects", default="1")
args = ap.parse_args()
aspects = [float(a) for a in args.aspects.split(",")]
args.out.mkdir(parents=True, exist_ok=True)
for i in range(args.n):
    aspect = aspects[i % len(aspects)]
    w, h = (512, round(512 / aspect)) if aspect >= 1 else (round(512 * aspect), 512)
    img = Image.new("RGB", (w, h), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
    ImageDraw.Draw(img).ellipse((w // 8 + i % 7 * 10, h // 8, w * 25 // 32, h * 25 // 32 - i % 5 * 20), fill=((200 + i) % 256, 40, 90))
    img.save(args.out / f"{i:03d}.png")
    (args.out / f"{i:03d}.txt").write_text(f"a red ellipse number {i} on a colored background, nrt style")
print(args.out)
