"""`sd35hub bench`: what this machine's GPU does per training step, next to the reference step."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        model: str = typer.Option("tiny", "--model", help="tiny | medium | large (full-size, random weights)."),
        profile: str = typer.Option("auto", "--profile", help="Our step per hardware profile: auto | h100 | a100-80 | t4 | cpu."),
        reference: str = typer.Option("eager", "--reference", help="Reference step: eager | checkpointing | nf4."),
        resolution: int = typer.Option(0, "--resolution", min=0, max=4096, help="512 | 768 | 1024 (default 1024; tiny: 128)."),
        batch: int = typer.Option(1, "--batch", min=1, max=256),
        rank: int = typer.Option(16, "--rank", min=1, max=1024),
        steps: int = typer.Option(10, "--steps", min=1, max=100_000, help="Timed steps (median reported)."),
        warmup: int = typer.Option(3, "--warmup", min=0, max=100_000, help="Untimed steps first (compile happens here)."),
        float8: bool = typer.Option(False, "--float8", help="Also time our step with FP8 base layers "
                                    "(model.float8; needs torchao and an L4/H100-class GPU)."),
        json_out: Path | None = typer.Option(None, "--json", help="Also write the results as JSON."),
    ) -> None:
        """Time the training step (s/step, samples/s, peak GPU memory, TFLOP/s) against the reference (medium/large: GPU only)."""
        from sd35hub import bench as bench_mod
        from sd35hub.errors import ConfigError

        problems = []
        if model not in ("tiny", "medium", "large"):
            problems.append(f"--model {model!r} is not one of tiny, medium, large")
        if reference not in bench_mod.REFERENCE_STEPS:
            problems.append(f"--reference {reference!r} is not one of {', '.join(bench_mod.REFERENCE_STEPS)}")
        if profile != "auto" and profile not in bench_mod.PROFILE_STEPS:
            problems.append(f"--profile {profile!r} is not one of auto, {', '.join(bench_mod.PROFILE_STEPS)}")
        if resolution and resolution % 64:
            problems.append(f"--resolution {resolution} must be a multiple of 64 (512, 768, 1024)")
        if problems:
            raise ConfigError(problems)
        results = bench_mod.bench(
            model, profile=profile, reference=reference, resolution=resolution or None, batch=batch, rank=rank,
            steps=steps, warmup=warmup, float8=float8,
        )
        typer.echo(bench_mod.format_table(results))
        if json_out:
            from sd35hub.paths import atomic_write_text

            atomic_write_text(json_out, bench_mod.results_json(results))
