"""Host memory of building SD3.5's transformer from its config on the meta device (CPU, no weights).

    python benchmarks/host_rss_pos_embed.py large cpu    # buffers real: diffusers' PatchEmbed builds pos_embed
    python benchmarks/host_rss_pos_embed.py large meta   # buffers on meta: the streaming loader since run 17

One JSON line: VmHWM over the RSS before (/proc/self/clear_refs resets the high-water mark), and that
transient per pos_embed element. Run 17's host gap (docs/performance.md); results in
benchmarks/results/host_rss_cpu/pos_embed.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from sd35hub.models.real_configs import config_dicts
from sd35hub.models.stream import _meta_module

GIB = 2**30


def status() -> dict[str, float]:
    """VmHWM / VmRSS / RssAnon / RssFile of this process in GiB."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            key, value = line.split(":", 1)
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = round(int(value.split()[0]) * 1024 / GIB, 3)
    return out


def main(variant: str, where: str) -> dict:
    from diffusers import SD3Transformer2DModel  # noqa: F401 - imported before the measurement

    folder = Path(tempfile.mkdtemp())
    (folder / "config.json").write_text(json.dumps(config_dicts(variant)["transformer"]))
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")  # VmHWM := VmRSS
    before = status()
    module = _meta_module("diffusers", "SD3Transformer2DModel", folder, buffers_on_meta=where == "meta")
    after = status()
    pos = module.pos_embed.pos_embed
    transient = after["VmHWM"] - before["VmRSS"]
    return {"variant": variant, "buffers_on_meta": where == "meta", "pos_embed_shape": list(pos.shape),
            "pos_embed_device": pos.device.type, "before": before, "after": after,
            "transient_gib": round(transient, 3), "bytes_per_element": round(transient * GIB / pos.numel(), 2)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
