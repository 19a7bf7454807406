"""`sd35hub demo` and other cross-cutting commands."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        output: Path = typer.Option(Path("demo-output"), "--output", "-o", help="Where to write the results."),
    ) -> None:
        """Run the main job end to end on the embedded tiny model and sample dataset (CPU, offline)."""
        from sd35hub.workflows.demo import run_demo

        for line in run_demo(output):
            typer.echo(line)
