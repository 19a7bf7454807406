"""The `sd35hub` command line. The only place that turns errors into messages and exit codes.

Commands live in ``sd35hub/commands/<area>.py`` (each exposes ``register(app)``) so every area owns
its own file; this module wires them up and formats errors: an ``Sd35HubError`` becomes one line
on stderr and its ``exit_code``; anything else is an internal error (exit 1). Set
``SD35HUB_DEBUG=1`` to see the full traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from sd35hub import __version__
from sd35hub.errors import Sd35HubError

COMMAND_MODULES = ("core", "hub", "data", "train", "adapters", "bench")

app = typer.Typer(
    name="sd35hub",
    help="Fine-tune Stable Diffusion 3.5 with LoRA, publish to the Hub, blend adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sd35hub {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Fine-tune Stable Diffusion 3.5 with LoRA, publish to the Hub, blend adapters."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"sd35hub.commands.{_name}").register(app)


def debug_enabled() -> bool:
    return os.environ.get("SD35HUB_DEBUG", "").lower() not in ("", "0", "false", "no")


def format_error(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for any exception reaching the top level."""
    if isinstance(exc, Sd35HubError):
        return f"Error: {exc.message}", exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "Interrupted.", 130
    try:  # torch may not be imported at all; only look for it if it is
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(exc, torch.OutOfMemoryError):
            return (
                "Error: out of GPU memory. Lower train.batch_size, then data.resolution, lora.rank, or use "
                "--profile t4 (gradient checkpointing + quantized base); see docs/troubleshooting.md",
                11,
            )
    except Exception:  # pragma: no cover
        pass
    return (
        f"Internal error: {type(exc).__name__}: {exc}. This is a bug in sd35hub; rerun with SD35HUB_DEBUG=1 "
        "and report the traceback at https://github.com/sd35hub/sd35hub/issues",
        1,
    )


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the one place errors are formatted
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            typer.echo("Interrupted.", err=True)
            sys.exit(130)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        if debug_enabled():
            import traceback

            traceback.print_exc()
        message, code = format_error(exc)
        typer.echo(message, err=True)
        sys.exit(code)
