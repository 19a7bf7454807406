"""The `sd35hub` command line. The only place that turns errors into messages and exit codes.

Commands live in ``sd35hub/frontends/commands/<area>.py`` (each exposes ``register(app)``) so every area owns
its own file; this module wires them up and formats errors in one function, :func:`format_error`:
an ``Sd35HubError`` becomes one line on stderr and its ``exit_code``; a usage error (unknown command
or option, missing argument, bad value) exits 2; Ctrl-C exits 130; a full disk 13; an unreachable Hub
10 (both typed by ``sd35hub.failures.typed_error``); anything else is an internal error (exit 1). The codes
are ``sd35hub.errors.EXIT_CODES`` (docs/cli.md). Set ``SD35HUB_DEBUG=1`` to see the full traceback (tokens redacted).
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
from typing import Any

import typer

from sd35hub import __version__
from sd35hub.errors import Sd35HubError
from sd35hub.failures import typed_error  # an OS or network failure as its typed error (every front end)

COMMAND_MODULES = ("core", "hub", "data", "train", "adapters", "bench", "jobs", "evaluate")
INTERRUPTED = 130

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
    importlib.import_module(f"sd35hub.frontends.commands.{_name}").register(app)


def debug_enabled() -> bool:
    return os.environ.get("SD35HUB_DEBUG", "").lower() not in ("", "0", "false", "no")


def _usage_message(exc: Any) -> str:
    """One line for a typer/click usage error, with where to find the right usage."""
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) or "sd35hub"
    if type(exc).__name__ == "NoArgsIsHelpError":
        group = getattr(ctx, "command", None)
        names = sorted(getattr(group, "commands", {}) or {})
        listed = f": {', '.join(names)}" if names else ""
        return f"Error: `{path}` needs a command{listed}. See `{path} --help`."
    text = " ".join(str(exc.format_message()).split()).rstrip()
    if not text.endswith((".", "!", "?", ")")):
        text += "."
    return f"Error: {text} See `{path} --help`."


def _is_usage_error(exc: BaseException) -> bool:
    from typer._click.exceptions import UsageError as TyperUsageError

    kinds: tuple[type, ...] = (TyperUsageError,)
    click = sys.modules.get("click")  # the standalone package, when something imported it
    if click is not None:
        kinds += (click.exceptions.UsageError,)
    return isinstance(exc, kinds)


_BEARER = re.compile(r"(?i)\b(bearer\s+|token[=:]\s*)(?!hf_\*\*\*)[^\s'\",;)]+")


def _redact(text: str) -> str:
    text = _BEARER.sub(lambda m: m.group(1) + "hf_***", text)
    try:
        from sd35hub.redact import redact_text

        return redact_text(text)
    except Exception:  # noqa: BLE001 - never lose the message to the redactor; fall back to the token env vars
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            secret = os.environ.get(name)
            if secret:
                text = text.replace(secret, "hf_***")
        return text


def format_error(exc: BaseException) -> tuple[str, int]:
    """(message, exit code) for any exception reaching the top level; the message has no token in it."""
    message, code = _format(typed_error(exc))
    return _redact(message), code


def _format(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, Sd35HubError):
        return f"Error: {exc.message}", exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "Interrupted.", INTERRUPTED
    if _is_usage_error(exc):
        return _usage_message(exc), 2
    torch = sys.modules.get("torch")  # torch may not be imported at all; only look for it if it is
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return (
            "Error: out of GPU memory. Lower train.batch_size, then data.resolution, lora.rank, or use "
            "--profile t4 (gradient checkpointing + quantized base); see docs/troubleshooting.md",
            11,
        )
    try:
        text = " ".join(str(exc).split())
    except Exception:  # noqa: BLE001 - an exception whose str() fails is still reported
        text = "(no message)"
    text = text if len(text) <= 500 else text[:500] + " ..."
    return (
        f"Internal error: {type(exc).__name__}: {text}. This is a bug in sd35hub; rerun with SD35HUB_DEBUG=1 "
        "and report the traceback at https://github.com/sd35hub/sd35hub/issues",
        1,
    )


def _print_traceback(exc: BaseException) -> None:
    import traceback

    sys.stderr.write(_redact("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))))


def _quiet_shutdown() -> None:
    """After a Ctrl-C is reported, a second one must not turn the exit into a traceback."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):  # not the main thread
        pass


def _finish(message: str | None, code: int, own_process: bool) -> None:
    """Print the one line and exit. An interrupted command of its own process exits at once: every
    ``finally`` has run by now, and nothing (a download's worker threads, atexit hooks) may make a
    Ctrl-C wait or print a traceback."""
    if code == INTERRUPTED:
        _quiet_shutdown()
    try:
        if message:
            typer.echo(message, err=True)
        if code == INTERRUPTED and own_process:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(INTERRUPTED)
    except KeyboardInterrupt:  # pragma: no cover - a second Ctrl-C while reporting the first
        if own_process:
            os._exit(INTERRUPTED)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """The console script (``argv`` None: this process is the command) or an in-process call with ``argv``."""
    from sd35hub.frontends.noise import install_debug_output, quiet_library_noise

    own_process = argv is None
    if debug_enabled():
        install_debug_output(_redact)
    else:
        quiet_library_noise()
    try:
        code = app(args=argv, prog_name="sd35hub", standalone_mode=False)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the one place errors are formatted
        exit_code = getattr(exc, "exit_code", None)
        if type(exc).__name__ == "Exit" and isinstance(exit_code, int):  # typer.Exit / click.exceptions.Exit
            sys.exit(exit_code)
        if type(exc).__name__ == "Abort":  # typer/click Abort: a prompt's Ctrl-C or EOF
            exc = KeyboardInterrupt()
        if isinstance(exc, KeyboardInterrupt):
            _quiet_shutdown()
        if debug_enabled():
            _print_traceback(exc)
        message, code = format_error(exc)
        _finish(message, code, own_process)
    # typer's own Ctrl-C handling turns KeyboardInterrupt into Exit(130) and, without standalone mode,
    # returns the code: report it instead of exiting 0 (commands themselves return None)
    if isinstance(code, int) and code:
        _finish("Interrupted." if code == INTERRUPTED else None, code, own_process)
