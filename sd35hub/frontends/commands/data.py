"""`sd35hub data preview` and `sd35hub data check`: look at a dataset before training on it."""

from __future__ import annotations

from pathlib import Path

import typer

from sd35hub.frontends.commands.options import finite


def _spec(source: str, split: str, image_column: str | None, caption_column: str | None, resolution: int,
          trigger_word: str, min_size: int, max_aspect: float):
    from sd35hub.config import DataSpec
    from sd35hub.errors import ConfigError

    spec = DataSpec(source=source, split=split, image_column=image_column, caption_column=caption_column,
                    resolution=resolution, trigger_word=trigger_word, min_size=min_size, max_aspect=max_aspect)
    problems = spec.problems()
    if problems:
        raise ConfigError(problems)
    return spec


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Inspect datasets: preview grids and usable-sample checks.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    split_opt = typer.Option("train", "--split", help="Dataset split (Hub datasets).")
    image_opt = typer.Option(None, "--image-column", help="Image column (default: auto-detect).")
    caption_opt = typer.Option(None, "--caption-column", help="Caption column (default: auto-detect).")
    resolution_opt = typer.Option(1024, "--resolution", min=64, max=4096, help="Bucket resolution (multiple of 64).")
    trigger_opt = typer.Option("", "--trigger-word", help="Prepended to every caption.")
    min_size_opt = typer.Option(256, "--min-size", min=0, max=16384, help="Skip images whose short side is below this.")
    max_aspect_opt = typer.Option(4.0, "--max-aspect", min=1.0, max=100.0, callback=finite,
                                  help="Skip images with long/short side above this.")

    @data_app.command("preview")
    def preview(
        source: str = typer.Argument(..., help="Hub dataset id, folder, *.parquet, *.tar, or 'sample'."),
        out: Path = typer.Option(Path("preview.png"), "--out", "-o", help="PNG grid to write."),
        n: int = typer.Option(16, "--n", min=1, max=256, help="Samples shown in the grid."),
        scan: int = typer.Option(200, "--scan", min=0, help="Records scanned for the summary (0 = all)."),
        split: str = split_opt, image_column: str | None = image_opt, caption_column: str | None = caption_opt,
        resolution: int = resolution_opt, trigger_word: str = trigger_opt, min_size: int = min_size_opt,
        max_aspect: float = max_aspect_opt,
    ) -> None:
        """Write a grid of samples cropped to their buckets, and print counts, buckets and skips."""
        from sd35hub.data.preview import preview_grid

        spec = _spec(source, split, image_column, caption_column, resolution, trigger_word, min_size, max_aspect)
        summary = preview_grid(spec, n=n, out=out, scan=scan or None)
        for line in summary.lines():
            typer.echo(line)

    @data_app.command("check")
    def check(
        source: str = typer.Argument(..., help="Hub dataset id, folder, *.parquet, *.tar, or 'sample'."),
        limit: int = typer.Option(0, "--limit", min=0, help="Records to scan (0 = all)."),
        split: str = split_opt, image_column: str | None = image_opt, caption_column: str | None = caption_opt,
        min_size: int = min_size_opt, max_aspect: float = max_aspect_opt,
    ) -> None:
        """Scan a dataset and report usable samples and skips by reason (exit 7 if none is usable)."""
        from sd35hub.data.sources import check_dataset

        spec = _spec(source, split, image_column, caption_column, 1024, "", min_size, max_aspect)
        typer.echo(check_dataset(spec, limit=limit or None).summary())
