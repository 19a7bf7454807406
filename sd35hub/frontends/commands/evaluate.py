"""`sd35hub eval RUN`: CLIP-T, CLIP-I and DINO of a finished run (sd35hub.workflows.evaluate)."""

from __future__ import annotations

from pathlib import Path

import typer

from sd35hub.frontends.commands.options import finite


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_run(
        run: Path = typer.Argument(..., help="The output folder of a finished `sd35hub train` run."),
        prompt: list[str] = typer.Option(
            [], "--prompt", "-p", help="Prompt to render (repeatable). Default: the run's validation prompts."
        ),
        images_per_prompt: int = typer.Option(4, "--images-per-prompt", "-n", min=1, max=64),
        seed: int = typer.Option(0, "--seed", min=0, max=2**31 - 1, help="Prompt i, image j use seed + 1000 i + j."),
        steps: int | None = typer.Option(None, "--steps", min=1, max=1000, help="Default: the run's validation steps."),
        cfg: float | None = typer.Option(None, "--cfg", min=0.0, max=100.0, callback=finite,
                                         help="Guidance. Default: the run's validation guidance."),
        model: str | None = typer.Option(None, "--model", "-m", help="Base model. Default: the run's model.name."),
        clip_model: str | None = typer.Option(
            None, "--clip-model", help="transformers CLIPModel (Hub id or folder). Default: train.eval_clip_model."
        ),
        dino_model: str | None = typer.Option(
            None, "--dino-model", help="transformers ViTModel (DINO). Default: train.eval_dino_model."
        ),
        trigger_as: str | None = typer.Option(
            None, "--trigger-as", help="For CLIP-T, replace the trigger word in the prompt by this text (e.g. 'dog')."
        ),
        no_instance: bool = typer.Option(False, "--no-instance", help="CLIP-T only (no instance images to compare)."),
        output: Path | None = typer.Option(None, "--output", "-o", help="Folder for eval.json and grid.png (RUN/eval)."),
        dtype: str = typer.Option("auto", "--dtype", help="auto|bf16|fp16|fp32"),
    ) -> None:
        """Subject fidelity as DreamBooth measures it: CLIP-T (prompt), CLIP-I and DINO (instance images)."""
        from sd35hub.workflows.evaluate import evaluate_run

        result = evaluate_run(
            run, prompts=prompt, images_per_prompt=images_per_prompt, seed=seed, steps=steps, guidance=cfg,
            model=model, clip_model=clip_model, dino_model=dino_model, trigger_replacement=trigger_as,
            use_instance=not no_instance, out_dir=output, dtype=dtype, log=typer.echo,
        )  # fmt: skip
        for entry in result.report.prompts:
            values = [f"CLIP-T {entry.clip_t:.4f}"] + [
                f"{label} {v:.4f}" for label, v in (("CLIP-I", entry.clip_i), ("DINO", entry.dino)) if v is not None
            ]
            typer.echo(f"  {', '.join(values)}  {entry.prompt}")
        typer.echo(f"mean: {result.report.line()}")
