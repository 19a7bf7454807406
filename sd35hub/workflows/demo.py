"""`sd35hub demo`: the main job end to end on the embedded tiny model, offline on a CPU.

Build (or reuse) the tiny SD3.5 model, load it through the same `load_pipeline` used for Hub models
and write one generated image; then train a LoRA on the embedded sample dataset with the real
trainer (`sd35hub.train`: cache, LoRA, validation grids, checkpoints, adapter, card, loss plot) and
print what `sd35hub publish --dry-run` would upload.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from sd35hub.paths import atomic_write

DEMO_PROMPT = "a watercolor painting of a lighthouse at sunset"
DEMO_SEED = 0
DEMO_SIZE = 128  # pixels; latents [1, 16, 16, 16]
DEMO_STEPS = 4
DEMO_TRAIN_STEPS = 120  # optimizer steps (batch 2): 12 epochs of the 20 training images, ~10 s on 2 idle cores
DEMO_REPO = "demo-user/tiny-sd35-nrt-lora"  # only used for the dry-run publication plan


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
    atomic_write(path, lambda temp: image.save(temp, format="PNG"))  # never a half-written image
    yield f"generated {image.width}x{image.height} '{DEMO_PROMPT}' (seed {DEMO_SEED}) -> {path} ({time.perf_counter() - start:.1f} s)"

    yield from train_demo(output / "train")


def train_demo(output: Path) -> Iterator[str]:
    """Train the demo LoRA into ``output`` and describe the publication it would make."""
    from sd35hub.config import Config, DataSpec, LoraSpec, ModelSpec, TrainSpec
    from sd35hub.train.recipe import train

    config = Config(
        model=ModelSpec(name="tiny"),
        data=DataSpec(source="sample", resolution=DEMO_SIZE, trigger_word="nrt style", holdout=4),
        lora=LoraSpec(rank=8, alpha=16.0),
        train=TrainSpec(output_dir=str(output), max_steps=DEMO_TRAIN_STEPS, batch_size=2, learning_rate=1e-3,
                        validation_every=DEMO_TRAIN_STEPS // 2, validation_steps=DEMO_STEPS, checkpoint_every=50,
                        log_every=5, seed=DEMO_SEED),
    )
    import shutil

    # the demo retrains from scratch each time: its previous run leaves (a folder of another run is refused)
    shutil.rmtree(output / "checkpoints", ignore_errors=True)
    (output / "summary.json").unlink(missing_ok=True)
    lines: list[str] = []
    start = time.perf_counter()
    result = train(config, log=lines.append)
    yield from lines
    yield (
        f"trained {result.steps} steps ({result.samples_seen} samples) in {time.perf_counter() - start:.1f} s: "
        f"held-out loss {result.initial_validation_loss:.4f} -> {result.validation_loss:.4f}"
    )
    yield f"adapter {result.adapter_path}, card {output / 'README.md'}, loss plot {output / 'loss.png'}"
    yield f"validation grids: {', '.join(sorted(p.name for p in (output / 'samples').glob('step_*.png')))}"
    try:
        from sd35hub.hub.publish import plan_publication
    except ImportError:  # pragma: no cover - publisher not installed
        return
    files, _card = plan_publication(output, DEMO_REPO)
    total = sum(f.size for f in files)
    yield f"publish --dry-run to {DEMO_REPO}: {len(files)} files, {total / 1024:.0f} KiB in one commit"
    for f in files:
        yield f"  {f.path_in_repo} ({f.size} bytes)"
