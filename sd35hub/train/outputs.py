"""What a finished run leaves in OUTPUT/: adapter, summary.json, training_config.yaml, loss.png, README.md.

summary.json is a sd35hub.run_summary.RunSummary; the publisher (sd35hub.hub.publish) and the model card
(sd35hub.hub.card) read exactly this layout.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd35hub import __version__
from sd35hub.config import Config, dump_yaml
from sd35hub.paths import atomic_write_text
from sd35hub.run_summary import (
    ADAPTER_FILE,
    SUMMARY_FILE,
    FidelitySummary,
    LoraSummary,
    RunSummary,
    ValidationImage,
)

# Settings that do not change the math of a step: a resume may change them freely.
_NOT_MATH = {
    "train": {"output_dir", "resume", "checkpoint_dir", "max_steps", "epochs", "checkpoint_every",
              "keep_checkpoints", "validation_every", "validation_prompts", "validation_steps",
              "validation_guidance", "validation_seed", "log_every", "report_to", "evaluate", "eval_clip_model",
              "eval_dino_model"},
    "data": {"cache_dir"},
    "model": {"base_model_id"},
}  # fmt: skip


@dataclass
class TrainResult:
    output_dir: Path
    adapter_path: Path
    steps: int
    samples_seen: int
    final_loss: float | None
    validation_loss: float | None
    initial_validation_loss: float | None
    duration_s: float
    peak_memory_gib: float | None
    run_summary: RunSummary | None = None  # what summary.json holds (None on the processes that did not write it)
    published: Any = None  # sd35hub.hub.publish.PublishResult when hub.push_to_hub
    start_step: int = 0  # where this session started: 0, or the checkpoint step it resumed from
    validation_grid: Path | None = None  # the last validation grid written (the final one)

    @property
    def summary(self) -> dict[str, Any]:
        """summary.json as a JSON object ({} where run_summary is None)."""
        return {} if self.run_summary is None else self.run_summary.to_dict()


def config_digest(config: Config) -> str:
    """sha256 of the settings that change what a step computes (not output paths, step counts, logging)."""
    raw = config.to_dict()
    raw.pop("hub", None)
    for section, names in _NOT_MATH.items():
        for name in names:
            raw[section].pop(name, None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def write_config(output_dir: Path, config: Config) -> Path:
    return atomic_write_text(output_dir / "training_config.yaml", dump_yaml(config))


def build_summary(*, config: Config, base_model: str, variant: str, steps: int, epochs: float, samples_seen: int,
                  final_loss: float | None, validation_loss: float | None, initial_validation_loss: float | None,
                  buckets: list[list[int]], skipped: dict[str, int], validation_images: list[ValidationImage],
                  loss_plot: str | None, duration_s: float, peak_memory_gib: float | None,
                  target_names: list[str], **sections: Any) -> RunSummary:
    """summary.json (sd35hub.run_summary.RunSummary) of a run with ``config``; ``sections``: the other
    RunSummary fields (validation_loss_on, held_out, peak_memory_of, embeddings, prior_preservation, ...)."""
    train, lora = config.train, config.lora
    extras: dict[str, Any] = {}
    if lora.variant != "lora" or lora.rslora or lora.init in ("pissa", "olora"):
        extras.update(variant=lora.variant, rslora=lora.rslora, init=lora.init)
    if lora.text_encoders:  # text-encoder LoRA (text_encoder.* / _2 / _3 keys in the adapter)
        te_rank = lora.text_encoder_rank or lora.rank
        extras.update(text_encoders=list(lora.text_encoders), text_encoder_rank=te_rank,
                      text_encoder_alpha=lora.text_encoder_alpha or te_rank,
                      text_encoder_lr=train.text_encoder_lr or train.learning_rate)
    return RunSummary(
        base_model=base_model, variant=variant, adapter_file=ADAPTER_FILE, trigger_word=config.data.trigger_word or None,
        dataset=config.data.source, steps=steps, epochs=round(epochs, 3), samples_seen=samples_seen,
        final_loss=final_loss, validation_loss=validation_loss, initial_validation_loss=initial_validation_loss,
        resolution_buckets=[(int(w), int(h)) for w, h in buckets], skipped=dict(skipped),
        validation_images=list(validation_images), loss_plot=loss_plot,
        precision=train.mixed_precision if train.mixed_precision != "no" else config.model.dtype,
        quantization=None if config.model.quantize == "none" else config.model.quantize, seed=train.seed,
        lora=LoraSummary(rank=lora.rank, alpha=lora.alpha if lora.alpha is not None else lora.rank, targets=target_names,
                         dropout=lora.dropout, blocks=lora.blocks, preset=lora.targets, **extras),
        learning_rate=train.learning_rate, optimizer=train.optimizer, batch_size=train.batch_size,
        gradient_accumulation=train.gradient_accumulation, lr_scheduler=train.lr_scheduler,
        timestep_sampling=train.timestep_sampling, loss_weighting=train.loss_weighting, ema_decay=train.ema_decay,
        duration_s=round(duration_s, 2), peak_memory_gib=None if peak_memory_gib is None else round(peak_memory_gib, 3),
        sd35hub_version=__version__, mask_t5_padding=bool(config.data.mask_t5_padding), **sections,
    )  # fmt: skip


def resolve_base(model: Any, log: Any) -> str | None:
    """The Hub id of the base (card.base_model_hub_id); says so when a local folder's is unknown."""
    from sd35hub.hub.card import base_model_hub_id

    found = base_model_hub_id(model.name, model.base_model_id)
    if found is None and model.name != "tiny":
        log(f"the base model {model.name} is a local folder from an unknown Hub repo: the card and adapter will not "
            "name it, and publishing asks for it; pass --base-model-id OWNER/NAME (model.base_model_id)")
    elif found is not None and found != model.name:
        log(f"the base model folder {model.name} is {found} on the Hub: cards and adapters name {found}")
    return found


def public_base_model(trainer: Any) -> str:
    """The base model as it may be published: a Hub id, "tiny", or "a local model" (never a path)."""
    from sd35hub.hub.card import public_base_name

    return public_base_name(trainer.config.model.name, getattr(trainer, "base_model_id", None))


def has_outputs(output_dir: Path) -> bool:
    """A finished run's outputs are there: summary.json and the adapter."""
    return (Path(output_dir) / SUMMARY_FILE).is_file() and (Path(output_dir) / ADAPTER_FILE).is_file()


def read_result(output_dir: Path) -> TrainResult:
    """The TrainResult of a finished run, from what it wrote (summary.json, checked), nothing rewritten."""
    out = Path(output_dir)
    summary = RunSummary.read(out)
    return TrainResult(
        output_dir=out, adapter_path=out / summary.adapter_file, steps=summary.steps or 0,
        samples_seen=summary.samples_seen or 0, final_loss=summary.final_loss,
        validation_loss=summary.validation_loss, initial_validation_loss=summary.initial_validation_loss,
        duration_s=summary.duration_s or 0.0, peak_memory_gib=summary.peak_memory_gib, run_summary=summary,
    )  # fmt: skip


def peak_memory_gib(device: Any) -> float | None:
    """Peak CUDA memory allocated by this process (GiB); on CPU the process's peak resident set."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    except (ImportError, OSError):  # pragma: no cover - Windows
        return None


def _fidelity(trainer: Any, out: Path) -> FidelitySummary:
    """Score the final validation images against the instance images; eval/eval.json + eval/grid.png."""
    from sd35hub.data.sources import open_samples
    from sd35hub.models.fidelity import EVAL_DIR, evaluate_images, take_images, write_results

    t, data = trainer.config.train, trainer.config.data
    generated = [(p, [image]) for p, image in zip(trainer.prompts.prompts, trainer.lora_images, strict=True)]
    instance = take_images(open_samples(data), source=data.source)
    report = evaluate_images(generated, instance, clip_model=t.eval_clip_model, dino_model=t.eval_dino_model,
                             device=trainer.device)
    written = write_results(report, out / EVAL_DIR, generated, instance,
                            {"images_per_prompt": 1, "steps": t.validation_steps, "guidance_scale": t.validation_guidance,
                             "seed": t.validation_seed, "source": "final validation images"})
    trainer.log(f"subject fidelity: {report.line()} ({written.json_path})")
    return FidelitySummary(clip_model=report.clip_model, dino_model=report.dino_model,
                           instance_images=report.instance_images, mean=report.mean,
                           prompts=[p.to_dict() for p in report.prompts], json=f"{EVAL_DIR}/eval.json",
                           grid=f"{EVAL_DIR}/grid.png")


def finish(trainer: Any) -> TrainResult:
    """Everything a finished run writes into OUTPUT/ (main process), then the Hub publication."""
    from sd35hub.hub.card import write_model_card
    from sd35hub.train import validation
    from sd35hub.train.metrics import plot_loss

    cfg, out, state = trainer.config, trainer.output_dir, trainer.state
    summary: RunSummary | None = None
    published = None
    peak = peak_memory_gib(trainer.device)
    if trainer.main:
        trainer.write_adapter_to(out / "adapter")  # EMA weights when on (swapped in and out by the trainer)
        images = []
        for i, (prompt, image) in enumerate(zip(trainer.prompts.prompts, trainer.lora_images, strict=True)):
            validation.save_png(image, out / "samples" / f"final_{i}.png",
                                trainer.image_params([prompt], step=state.step, seed=cfg.train.validation_seed + i))
            images.append(ValidationImage(path=f"samples/final_{i}.png", prompt=prompt))
        plot = plot_loss(trainer.read_metrics(), out / "loss.png")
        train_samples = max(len(trainer.batches.train_entries), 1)
        sections: dict[str, Any] = {}
        if getattr(trainer, "pivotal", None) is not None:  # pivotal tuning: embeddings.safetensors by the adapter
            sections["embeddings"] = trainer.pivotal.summary()
        if getattr(trainer, "prior", None) is not None:  # DreamBooth class images: counts and weight
            sections["prior_preservation"] = trainer.prior.summary(state.epoch * trainer.batches_per_epoch + state.batch_in_epoch)
        if cfg.train.evaluate:  # CLIP-T / CLIP-I / DINO of the final validation images (sd35hub eval for more)
            from sd35hub.errors import Sd35HubError

            try:
                sections["fidelity"] = _fidelity(trainer, out)
            except Sd35HubError as exc:  # the trained adapter, summary and card are still written
                trainer.log(f"subject fidelity not measured: {exc} (run `sd35hub eval {out}` once it is fixed)")
                sections["fidelity"] = FidelitySummary(error=str(exc))
        if getattr(trainer, "phases", None) is not None:  # measured peak GPU / host memory per phase (+ the plan)
            sections["memory"] = trainer.phases.report()
        if getattr(trainer, "startup_phases", None):  # wall seconds of each phase up to the first step (train.startup)
            sections["phases"] = dict(trainer.startup_phases)
        heldout = getattr(trainer, "heldout", None)
        summary = build_summary(
            config=cfg, base_model=public_base_model(trainer), variant=trainer.info.variant, steps=state.step, epochs=state.samples_seen / train_samples,
            samples_seen=state.samples_seen, final_loss=trainer.final_loss, validation_loss=trainer.final_validation_loss,
            initial_validation_loss=trainer.initial_validation_loss,
            buckets=[list(b) for b in sorted({e.bucket for e in trainer.index.entries})],
            skipped=dict(trainer.index.stats.get("skipped", {})), validation_images=images,
            loss_plot="loss.png" if plot else None, duration_s=trainer.duration_s, peak_memory_gib=peak,
            target_names=sorted({n.split(".", 2)[-1] for n in trainer.target_names}),
            validation_loss_on=None if heldout is None else heldout.source,  # "held-out" | "training"
            held_out=len(trainer.batches.holdout_entries),
            # what peak_memory_gib measured: CUDA allocations on a GPU, the process's peak resident set elsewhere
            peak_memory_of="gpu" if getattr(trainer.device, "type", "") == "cuda" else "host", **sections,
        )  # fmt: skip
        summary.write(out)
        write_model_card(out, repo_id=cfg.hub.repo_id)
        skipped = sum(summary.skipped.values())
        trainer.log(
            f"done: {state.step} steps in {trainer.duration_s:.1f} s, {state.samples_seen} samples seen, "
            f"{skipped} inputs skipped, peak memory {peak if peak is None else f'{peak:.2f} GiB'}; "
            f"validation loss {trainer.initial_validation_loss} -> {trainer.final_validation_loss}; adapter in {out / 'adapter'}"
        )
        if cfg.hub.push_to_hub and cfg.hub.repo_id:
            from sd35hub.hub.publish import publish

            published = publish(out, cfg.hub.repo_id, private=cfg.hub.private, revision=cfg.hub.revision)
    trainer.acc.wait_for_everyone()
    return TrainResult(
        output_dir=out, adapter_path=out / ADAPTER_FILE, steps=state.step, samples_seen=state.samples_seen,
        final_loss=trainer.final_loss, validation_loss=trainer.final_validation_loss,
        initial_validation_loss=trainer.initial_validation_loss, duration_s=trainer.duration_s, peak_memory_gib=peak,
        start_step=trainer.start_step, validation_grid=getattr(trainer, "validation_grid", None),
        run_summary=summary, published=published,
    )  # fmt: skip

