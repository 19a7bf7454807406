"""`sd35hub demo`: the main job end to end on the embedded tiny model, offline on a CPU.

For now: build (or reuse) the tiny SD3.5 model, load it through the same `load_pipeline` used for
Hub models, and write one generated image. Training, the adapter and the blend join as they land.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

DEMO_PROMPT = "a watercolor painting of a lighthouse at sunset"
DEMO_SEED = 0
DEMO_SIZE = 128  # pixels; latents [1, 16, 16, 16]
DEMO_STEPS = 4


def run_demo(output: Path) -> Iterator[str]:
    """Run the demo, yielding one progress line per stage; writes `output/base.png`."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from sd35hub.models.load import load_pipeline, model_info
    from sd35hub.models.tiny import tiny_model_path

    # The demo prints one line per stage; per-file loading bars of a 2 MB model are only noise.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    folder = tiny_model_path()
    yield f"tiny SD3.5 model ready at {folder} ({time.perf_counter() - start:.1f} s)"

    info = model_info("tiny")
    start = time.perf_counter()
    pipe = load_pipeline("tiny", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    yield (
        f"loaded variant {info.variant}: {info.num_layers} transformer blocks "
        f"(dual attention in {list(info.dual_attention_layers)}), {time.perf_counter() - start:.1f} s"
    )

    start = time.perf_counter()
    image = pipe(
        DEMO_PROMPT,
        height=DEMO_SIZE,
        width=DEMO_SIZE,
        num_inference_steps=DEMO_STEPS,
        guidance_scale=info.default_guidance_scale,
        generator=torch.Generator("cpu").manual_seed(DEMO_SEED),
    ).images[0]
    path = output / "base.png"
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG")
    partial.replace(path)  # never a half-written image under the final name
    yield f"generated {image.width}x{image.height} '{DEMO_PROMPT}' (seed {DEMO_SEED}) -> {path} ({time.perf_counter() - start:.1f} s)"
