"""`sd35hub train`: a YAML config, dotted overrides, and the common settings as flags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

# flag -> config key (the value is passed through YAML, so numbers and booleans keep their type)
FLAG_KEYS = {
    "model": "model.name", "dataset": "data.source", "rank": "lora.rank", "steps": "train.max_steps",
    "epochs": "train.epochs", "resolution": "data.resolution", "seed": "train.seed", "output": "train.output_dir",
    "resume": "train.resume", "profile": "train.profile", "trigger_word": "data.trigger_word",
    "repo_id": "hub.repo_id", "image_column": "data.image_column", "caption_column": "data.caption_column",
    "split": "data.split", "base_model_id": "model.base_model_id", "text_encoders": "lora.text_encoders",
    "text_encoder_lr": "train.text_encoder_lr", "new_tokens": "train.new_tokens", "embedding_lr": "train.embedding_lr",
}  # fmt: skip


def build_overrides(flags: dict[str, object], overrides: list[str]) -> list[str]:
    """Flags become dotted overrides placed before the positional ones (which therefore win)."""
    from sd35hub.config import as_overrides

    return as_overrides({FLAG_KEYS[name]: value for name, value in flags.items() if value is not None}) + list(overrides)


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_interspersed_args": True})
    def train(
        overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. train.learning_rate=5e-5 lora.rank=32."),
        config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (sections model/data/lora/train/hub)."),
        model: str | None = typer.Option(None, "--model", help="Base: Hub id, local diffusers folder, or 'tiny'."),
        dataset: str | None = typer.Option(None, "--dataset", help="Hub dataset id, folder, parquet, webdataset or 'sample'."),
        rank: int | None = typer.Option(None, "--rank", help="LoRA rank (default 16 / profile)."),
        steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (overrides --epochs)."),
        epochs: int | None = typer.Option(None, "--epochs", help="Passes over the data (default 10)."),
        resolution: int | None = typer.Option(None, "--resolution", help="Bucket side in pixels (multiple of 64)."),
        seed: int | None = typer.Option(None, "--seed"),
        output: str | None = typer.Option(None, "--output", "-o", help="Output folder (adapter, card, samples, checkpoints)."),
        resume: str | None = typer.Option(None, "--resume", help="'latest' or a checkpoint folder."),
        profile: str | None = typer.Option(None, "--profile", help="auto | cpu | t4 | l4 | a100-40 | a100-80 | h100."),
        trigger_word: str | None = typer.Option(None, "--trigger-word", help="Prepended to every caption."),
        push_to_hub: bool = typer.Option(False, "--push-to-hub", help="Publish adapter + card at the end."),
        repo_id: str | None = typer.Option(None, "--repo-id", help="OWNER/NAME of the model repo to publish to."),
        image_column: str | None = typer.Option(None, "--image-column", help="Image column (default: auto-detect)."),
        caption_column: str | None = typer.Option(None, "--caption-column", help="Caption column (default: auto-detect)."),
        split: str | None = typer.Option(None, "--split", help="Dataset split (Hub datasets; default train)."),
        base_model_id: str | None = typer.Option(None, "--base-model-id", metavar="OWNER/NAME",
                                                 help="Hub repo a local --model folder came from (card, adapter)."),
        text_encoders: str | None = typer.Option(None, "--text-encoders", metavar="clip_l,clip_g",
                                                 help="Also train a LoRA on these text encoders: clip_l, clip_g, t5 (comma list)."),
        text_encoder_lr: float | None = typer.Option(None, "--text-encoder-lr", help="Learning rate of the text-encoder LoRA "
                                                     "(default: the learning rate)."),
        new_tokens: int | None = typer.Option(None, "--new-tokens", metavar="N", help="Pivotal tuning: N new tokens "
                                              "<s0>..<sN-1> in the CLIP tokenizers, their embeddings trained too."),
        embedding_lr: float | None = typer.Option(None, "--embedding-lr", help="Learning rate of the new-token "
                                                  "embeddings (default 5e-4)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the memory plan (each phase's predicted peak "
                                     "GPU and host memory, and how it fits) and exit; only config files are fetched."),
        on: str = typer.Option("local", "--on", help="local | hf-jobs (the Hub's GPUs; docs/jobs.md)."),
        flavor: str = typer.Option("a100-large", "--flavor", help="hf-jobs: GPU flavor (t4-small, l4x1, a100-large, h200, h200x8 ...)."),
        timeout: str = typer.Option("3h", "--timeout", help="hf-jobs: the job's time limit (e.g. 90m, 3h)."),
        detach: bool = typer.Option(False, "--detach", help="hf-jobs: submit, print the job id and return."),
        install: str | None = typer.Option(None, "--install", help="hf-jobs: pip requirement for sd35hub in the job (default: this version)."),
        image: str | None = typer.Option(None, "--image", help="hf-jobs: Docker image with Python and pip."),
    ) -> None:
        """Train a LoRA adapter on SD3.5 (rectified flow). Multi-GPU: accelerate launch -m sd35hub train ..."""
        from sd35hub.config import load_config
        from sd35hub.train.recipe import train as run_training

        flags = dict(model=model, dataset=dataset, rank=rank, steps=steps, epochs=epochs, resolution=resolution,
                     seed=seed, output=output, resume=resume, profile=profile, trigger_word=trigger_word,
                     repo_id=repo_id, image_column=image_column, caption_column=caption_column,
                     split=split, base_model_id=base_model_id, text_encoder_lr=text_encoder_lr,
                     new_tokens=new_tokens, embedding_lr=embedding_lr,
                     text_encoders=None if text_encoders is None else [n.strip() for n in text_encoders.split(",") if n.strip()])  # fmt: skip
        all_overrides = build_overrides(flags, overrides or [])
        if push_to_hub:
            all_overrides.insert(0, "hub.push_to_hub=true")
        if on != "local":  # sd35hub.frontends.commands.jobs: validate here, train in a job on the Hub
            from sd35hub.frontends.commands.jobs import train_on_jobs

            train_on_jobs(on, config, all_overrides, flavor=flavor, timeout=timeout, detach=detach, install=install,
                          image=image, resume=resume, dry_run=dry_run)
            return
        cfg = load_config(config, all_overrides)  # ConfigError (exit 2) before anything loads
        if dry_run:
            from sd35hub.workflows.plan import plan_run

            planned = plan_run(cfg)
            typer.echo(planned.describe())
            planned.plan.check()  # MemoryPlanError (exit 11): the phase that does not fit and what would
            return
        in_job = bool(os.environ.get("SD35HUB_JOB"))  # inside an hf-jobs job: metrics lines instead of a bar
        on_step = None
        if in_job:
            from sd35hub.workflows.jobs import metrics_printer

            on_step = metrics_printer()
        result = run_training(cfg, log=typer.echo, on_step=on_step, progress=not in_job)
        if os.environ.get("RANK", "0") != "0":  # under `accelerate launch` only rank 0 reports
            return
        if in_job:  # the final held-out loss, for `sd35hub sweep --on hf-jobs`
            typer.echo("sd35hub-metrics " + json.dumps({"step": result.steps, "final_validation_loss": result.validation_loss}))
        typer.echo(f"adapter: {result.adapter_path}")
        if result.published is not None:
            typer.echo(f"published: {getattr(result.published, 'commit_url', None) or cfg.hub.repo_id}")
