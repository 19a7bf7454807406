"""A folder of N square images with .txt captions (one bucket shape: no per-shape recompiles in timing runs)."""

import sys
from pathlib import Path

from PIL import Image, ImageDraw

out, n = Path(sys.argv[1]), int(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
for i in range(n):
    img = Image.new("RGB", (512, 512), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
    ImageDraw.Draw(img).ellipse((64 + i % 7 * 10, 64, 400, 400 - i % 5 * 20), fill=((200 + i) % 256, 40, 90))
    img.save(out / f"{i:03d}.png")
    (out / f"{i:03d}.txt").write_text(f"a red ellipse number {i} on a colored background, nrt style")
print(out)
