"""`sd35hub eval RUN`: subject fidelity of a finished run (sd35hub.workflows.fidelity for the metrics).

    report = evaluate_run("output/", prompts=["a photo of sks dog in the snow"], images_per_prompt=4)

Renders ``images_per_prompt`` images per prompt with the run's adapter on its base model (the blend
engine, so every adapter variant we train is used exactly as `generate` uses it), reads the instance images
from the run's ``data.source``, and writes ``RUN/eval/eval.json`` (per-prompt and mean CLIP-T, CLIP-I,
DINO, the encoders, the sampler settings), ``RUN/eval/grid.png`` (instance images on top, one row per
prompt) and the generated images. :func:`evaluate_images` scores images already rendered: the trainer
uses it at the end of a run (``train.evaluate``) on its final validation images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sd35hub.config import Config, DataSpec, load_config
from sd35hub.errors import ConfigError, DatasetError
from sd35hub.paths import atomic_write_text
from sd35hub.workflows.fidelity import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    FidelityReport,
    load_encoders,
    score,
)

EVAL_DIR = "eval"
MAX_INSTANCE_IMAGES = 64  # CLIP-I / DINO compare every generated image with each of these
GRID_CELL = 256  # pixels per grid cell (images are fitted into it)


@dataclass
class EvalResult:
    report: FidelityReport
    json_path: Path
    grid_path: Path
    images: list[Path]


def instance_images(data: DataSpec, *, limit: int = MAX_INSTANCE_IMAGES, token: str | bool | None = None) -> list[Image.Image]:
    """The first ``limit`` usable images of the run's instance data (bad ones skipped and counted as in training)."""
    from sd35hub.data.sources import open_samples

    images = []
    for sample in open_samples(data, token=token):
        images.append(sample.image)
        if len(images) >= limit:
            break
    if not images:
        raise DatasetError(f"data.source={data.source!r} gave no usable image to compare with: CLIP-I and DINO need "
                           "the instance images; check the source, or score CLIP-T only with --no-instance")
    return images


def evaluate_images(generated: list[tuple[str, list[Image.Image]]], instance: list[Image.Image], *,
                    clip_model: str = DEFAULT_CLIP_MODEL, dino_model: str = DEFAULT_DINO_MODEL, device: Any = "cpu",
                    trigger_word: str | None = None, trigger_replacement: str | None = None,
                    token: str | bool | None = None) -> FidelityReport:
    encoders = load_encoders(clip_model, dino_model, device=device, token=token)
    try:
        return score(encoders, generated, instance, trigger_word=trigger_word, trigger_replacement=trigger_replacement)
    finally:
        del encoders


def write_results(report: FidelityReport, out_dir: Path, generated: list[tuple[str, list[Image.Image]]],
                  instance: list[Image.Image], settings: dict[str, Any]) -> EvalResult:
    """eval.json, grid.png and one PNG per generated image, in ``out_dir``."""
    from sd35hub.paths import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    files: list[list[str]] = []
    for p, (_, images) in enumerate(generated):
        row = []
        for j, image in enumerate(images):
            path = out_dir / f"prompt{p:02d}_{j:02d}.png"
            atomic_write(path, lambda temp, image=image: image.save(temp, format="PNG"))
            paths.append(path)
            row.append(path.name)
        files.append(row)
    data = {**report.to_dict(), "settings": settings}
    for entry, row in zip(data["prompts"], files, strict=False):
        entry["files"] = row
    json_path = atomic_write_text(out_dir / "eval.json", json.dumps(data, indent=2, sort_keys=True) + "\n")
    grid = _grid(report, generated, instance)
    grid_path = out_dir / "grid.png"
    atomic_write(grid_path, lambda temp: grid.save(temp, format="PNG"))
    return EvalResult(report=report, json_path=json_path, grid_path=grid_path, images=paths)


def _fit(image: Image.Image) -> Image.Image:
    cell = Image.new("RGB", (GRID_CELL, GRID_CELL), "white")
    image = image.convert("RGB")
    image.thumbnail((GRID_CELL, GRID_CELL))
    cell.paste(image, ((GRID_CELL - image.width) // 2, (GRID_CELL - image.height) // 2))
    return cell


def _grid(report: FidelityReport, generated: list[tuple[str, list[Image.Image]]], instance: list[Image.Image]) -> Image.Image:
    """Row 0: instance images; then one row per prompt, its scores under the first image."""
    from sd35hub.pngmeta import make_grid

    columns = max([len(images) for _, images in generated] + [1])
    cells, labels = [], []
    shown = instance[:columns]
    for i in range(columns):
        cells.append(_fit(shown[i]) if i < len(shown) else Image.new("RGB", (GRID_CELL, GRID_CELL), "white"))
        labels.append(f"instance {i}" if i < len(shown) else "")
    scores = {s.prompt: s for s in report.prompts}
    for prompt, images in generated:
        s = scores.get(prompt)
        for j in range(columns):
            cells.append(_fit(images[j]) if j < len(images) else Image.new("RGB", (GRID_CELL, GRID_CELL), "white"))
            text = prompt[:40] if j else _score_label(s, prompt)
            labels.append(text if j < len(images) else "")
    return make_grid(cells, labels, columns, title=report.line())


def _score_label(s: Any, prompt: str) -> str:
    if s is None:
        return prompt[:40]
    parts = [f"T {s.clip_t:.3f}"] + ([f"I {s.clip_i:.3f}"] if s.clip_i is not None else []) + (
        [f"DINO {s.dino:.3f}"] if s.dino is not None else [])
    return " ".join(parts)


def _run_config(run_dir: Path) -> tuple[Config, dict[str, Any]]:
    config_file, summary_file = run_dir / "training_config.yaml", run_dir / "summary.json"
    if not config_file.is_file() or not (run_dir / "adapter").is_dir():
        raise ConfigError(f"{run_dir} is not a finished sd35hub run (no training_config.yaml and adapter/); pass the "
                          "train.output_dir of a run that finished")
    summary: dict[str, Any] = {}
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except (OSError, ValueError):
            summary = {}
    return load_config(config_file), summary if isinstance(summary, dict) else {}


def evaluate_run(run_dir: str | Path, *, prompts: list[str] | tuple[str, ...] = (), images_per_prompt: int = 4,
                 seed: int = 0, steps: int | None = None, guidance: float | None = None, model: str | None = None,
                 clip_model: str | None = None, dino_model: str | None = None,
                 trigger_replacement: str | None = None, use_instance: bool = True,
                 max_instance_images: int = MAX_INSTANCE_IMAGES, out_dir: str | Path | None = None,
                 dtype: str = "auto", device: str | None = None, log: Any = print) -> EvalResult:
    """Render, score and write (module docstring). Defaults come from the run: its validation prompts
    (those of summary.json, i.e. what the trainer rendered), sampler steps and guidance, base model, and
    ``train.eval_clip_model`` / ``train.eval_dino_model``."""
    from sd35hub.blend.engine import BlendEngine
    from sd35hub.blend.request import AdapterRef, GenerationRequest

    run = Path(run_dir)
    cfg, summary = _run_config(run)
    t = cfg.train
    if images_per_prompt < 1:
        raise ConfigError(f"--images-per-prompt {images_per_prompt} must be at least 1")
    prompts = list(prompts) or [v["prompt"] for v in summary.get("validation_images", []) if isinstance(v, dict)
                                and isinstance(v.get("prompt"), str)] or list(t.validation_prompts)
    if not prompts:
        raise ConfigError(f"{run} names no validation prompt to evaluate: pass --prompt (repeatable)")
    steps = steps if steps is not None else t.validation_steps
    guidance = guidance if guidance is not None else t.validation_guidance
    engine = BlendEngine(model or cfg.model.name, dtype=dtype, device=device, revision=cfg.model.revision,
                         mask_t5_padding=cfg.data.mask_t5_padding)
    generated: list[tuple[str, list[Image.Image]]] = []
    for i, prompt in enumerate(prompts):
        request = GenerationRequest(
            prompt=prompt, adapters=[AdapterRef(str(run / "adapter"), 1.0)], steps=steps, guidance_scale=guidance,
            width=cfg.data.resolution, height=cfg.data.resolution, seed=seed + 1000 * i, num_images=images_per_prompt,
            insert_trigger_words=False, parse_prompt_tags=False,
            skip_layers=tuple(t.validation_skip_layers) if guidance > 1 else (),
            skip_layer_scale=t.validation_skip_layer_scale,
        )  # fmt: skip
        generated.append((prompt, engine.generate(request).images))
        log(f"eval: rendered {images_per_prompt} image(s) for prompt {i + 1}/{len(prompts)}")
    encoder_device = engine.device
    del engine  # the base pipeline is not needed any more: free it before the encoders load
    instance = instance_images(cfg.data, limit=max_instance_images) if use_instance else []
    clip_model, dino_model = clip_model or t.eval_clip_model, dino_model or t.eval_dino_model
    report = evaluate_images(generated, instance, clip_model=clip_model, dino_model=dino_model, device=encoder_device,
                             trigger_word=cfg.data.trigger_word or None, trigger_replacement=trigger_replacement)
    settings = {"base_model": model or cfg.model.name, "adapter": "adapter", "images_per_prompt": images_per_prompt,
                "seed": seed, "seeds": [seed + 1000 * i for i in range(len(prompts))], "steps": steps,
                "guidance_scale": guidance, "resolution": cfg.data.resolution,
                "trigger_replacement": trigger_replacement}
    result = write_results(report, Path(out_dir) if out_dir is not None else run / EVAL_DIR, generated, instance, settings)
    log(f"eval: {report.line()}; {result.json_path}, {result.grid_path}")
    return result
