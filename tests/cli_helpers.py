"""Run the real `sd35hub` CLI in-process: (exit code, stdout, stderr)."""

from __future__ import annotations

from sd35hub.frontends.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:  # noqa: ANN001
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
