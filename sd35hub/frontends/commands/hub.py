"""`sd35hub check-access`, `sd35hub publish`, `sd35hub list-adapters`: the Hub side of the workflow."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("check-access")
    def check_access(
        model: str = typer.Argument(..., help="Base model repo to read, e.g. stabilityai/stable-diffusion-3.5-large."),
        write: str | None = typer.Option(None, "--write", metavar="REPO", help="Also check the token can publish to OWNER/NAME."),
        revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit of MODEL."),
    ) -> None:
        """Check, without downloading anything, that you can read MODEL (license accepted) and write REPO."""
        from sd35hub.access import check_read_access, check_write_access

        check_read_access(model, revision=revision)
        typer.echo(f"OK  read {model}{f'@{revision}' if revision else ''} (license accepted or not gated)")
        if write:
            user = check_write_access(write)
            typer.echo(f"OK  write {write} (as {user})")

    @app.command("publish")
    def publish(
        output_dir: Path = typer.Argument(..., help="Output folder of `sd35hub train` (has summary.json).",
                                          exists=True, file_okay=False),
        repo: str = typer.Option(..., "--repo", metavar="OWNER/NAME", help="Target model repository."),
        private: bool = typer.Option(False, "--private", help="Create the repo as private."),
        revision: str | None = typer.Option(None, "--revision", help="Branch to push to (default main)."),
        create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of pushing."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the files and the card; upload nothing."),
        message: str | None = typer.Option(None, "--message", "-m", help="Commit message."),
        base_model_id: str | None = typer.Option(None, "--base-model-id", metavar="OWNER/NAME",
                                                 help="Hub repo of the base, for a run trained on a local folder."),
    ) -> None:
        """Publish the adapter, model card, sample images and config to the Hub in one commit."""
        from sd35hub.hub.publish import publish as _publish

        result = _publish(output_dir, repo, private=private, revision=revision, create_pr=create_pr,
                          dry_run=dry_run, commit_message=message, base_model_id=base_model_id)
        for line in result.describe():
            typer.echo(line)
        if dry_run:
            typer.echo("\n----- README.md -----")
            typer.echo(result.card)

    @app.command("list-adapters")
    def list_adapters(
        base: str | None = typer.Option(None, "--base", help="Base model repo (default: every SD3.5 base)."),
        author: str | None = typer.Option(None, "--author", help="Only adapters of this user or org."),
        search: str | None = typer.Option(None, "--search", help="Words in the repo name."),
        limit: int = typer.Option(20, "--limit", min=1, max=1000),
    ) -> None:
        """List published SD3.5 LoRA adapters with trigger words and the file to load."""
        from sd35hub.hub.discovery import list_adapters as _list

        adapters = _list(base, author=author, search=search, limit=limit)
        if not adapters:
            typer.echo("No adapters found.")
        for info in adapters:
            words = ", ".join(info.trigger_words) or "-"
            typer.echo(f"{info.repo_id}  base={info.base_model}  file={info.adapter_file}  trigger={words}  "
                       f"downloads={info.downloads} likes={info.likes}")
