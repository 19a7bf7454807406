"""`sd35hub eval RUN`: subject fidelity of a finished run (sd35hub.models.fidelity: the metrics and files).

    report = evaluate_run("output/", prompts=["a photo of sks dog in the snow"], images_per_prompt=4)

Renders ``images_per_prompt`` images per prompt with the run's adapter on its base model (the blend
engine, so every adapter variant we train is used exactly as `generate` uses it), reads the instance images
from the run's ``data.source``, and writes ``RUN/eval/eval.json`` (per-prompt and mean CLIP-T, CLIP-I,
DINO, the encoders, the sampler settings), ``RUN/eval/grid.png`` (instance images on top, one row per
prompt) and the generated images. ``models.fidelity.evaluate_images`` scores images already rendered: the
trainer uses it at the end of a run (``train.evaluate``) on its final validation images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from sd35hub.config import Config, DataSpec, load_config
from sd35hub.errors import ConfigError
from sd35hub.models.fidelity import (
    EVAL_DIR,
    MAX_INSTANCE_IMAGES,
    EvalResult,
    evaluate_images,
    take_images,
    write_results,
)
from sd35hub.run_summary import SUMMARY_FILE, RunSummary


def instance_images(data: DataSpec, *, limit: int = MAX_INSTANCE_IMAGES, token: str | bool | None = None) -> list[Image.Image]:
    """The first ``limit`` usable images of the run's instance data (bad ones skipped and counted as in training)."""
    from sd35hub.data.sources import open_samples

    return take_images(open_samples(data, token=token), limit=limit, source=data.source)


def _run_config(run_dir: Path) -> tuple[Config, RunSummary | None]:
    """The run's config and its summary (None when it wrote no summary.json; a malformed one is a ConfigError)."""
    config_file = run_dir / "training_config.yaml"
    if not config_file.is_file() or not (run_dir / "adapter").is_dir():
        raise ConfigError(f"{run_dir} is not a finished sd35hub run (no training_config.yaml and adapter/); pass the "
                          "train.output_dir of a run that finished")
    summary = RunSummary.read(run_dir) if (run_dir / SUMMARY_FILE).is_file() else None
    return load_config(config_file), summary


def evaluate_run(run_dir: str | Path, *, prompts: list[str] | tuple[str, ...] = (), images_per_prompt: int = 4,
                 seed: int = 0, steps: int | None = None, guidance: float | None = None, model: str | None = None,
                 clip_model: str | None = None, dino_model: str | None = None,
                 trigger_replacement: str | None = None, use_instance: bool = True,
                 max_instance_images: int = MAX_INSTANCE_IMAGES, out_dir: str | Path | None = None,
                 dtype: str = "auto", device: str | None = None, log: Any = print) -> EvalResult:
    """Render, score and write (module docstring). Defaults come from the run: its validation prompts
    (those of summary.json, i.e. what the trainer rendered), sampler steps and guidance, base model, and
    ``train.eval_clip_model`` / ``train.eval_dino_model``."""
    from sd35hub.blend.request import AdapterRef, GenerationRequest
    from sd35hub.workflows.inference import engine_for_run

    run = Path(run_dir)
    cfg, summary = _run_config(run)
    t = cfg.train
    if images_per_prompt < 1:
        raise ConfigError(f"--images-per-prompt {images_per_prompt} must be at least 1")
    rendered = [image.prompt for image in summary.validation_images if image.prompt] if summary is not None else []
    prompts = list(prompts) or rendered or list(t.validation_prompts)
    if not prompts:
        raise ConfigError(f"{run} names no validation prompt to evaluate: pass --prompt (repeatable)")
    steps = steps if steps is not None else t.validation_steps
    guidance = guidance if guidance is not None else t.validation_guidance
    # the base as released (full precision, T5, no offload): metrics compare across runs and cards
    engine = engine_for_run(cfg, exact=True, model=model, dtype=dtype, device=device)
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
