"""docs/cli.md's exit-code table is what the CLI does: every usage error exits 2 in one line, every typed
error its documented code, a full disk 13, an unreachable Hub 10, Ctrl-C 130, nothing else an "Internal error"."""

from __future__ import annotations

import errno
import inspect
import re
from pathlib import Path

import pytest
from cli_helpers import run_cli

from sd35hub import errors
from sd35hub.frontends.cli import format_error

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def documented_codes() -> dict[int, str]:
    text = DOCS.read_text(encoding="utf-8").split("## Exit codes", 1)[1]
    rows = re.findall(r"^\| (\d+) \| ([^|]+?) \|", text, flags=re.MULTILINE)
    return {int(code): meaning.strip() for code, meaning in rows}


def test_the_documented_table_is_exactly_the_codes_in_errors() -> None:
    assert documented_codes() == errors.EXIT_CODES


def test_every_typed_error_exits_with_a_documented_code() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.Sd35HubError)]
    assert len(classes) >= 15
    for cls in classes:
        assert cls.exit_code in errors.EXIT_CODES, cls
    used = {c.exit_code for c in classes} | {0, 2}  # 0 success; 2 also usage errors
    assert used == set(errors.EXIT_CODES), set(errors.EXIT_CODES) - used  # no documented code is dead


USAGE_ERRORS = [
    [],  # no command
    ["frobnicate"],
    ["trian", "--model", "tiny"],
    ["data"],  # group without its command
    ["data", "nope"],
    ["publish"],  # missing argument
    ["publish", "out/missing-run"],  # folder that does not exist
    ["publish", "."],  # missing --repo
    ["train", "--steps", "abc"],
    ["train", "--rank", "1.5"],
    ["train", "--nope"],
    ["train", "--steps"],  # option without its value
    ["generate"],  # missing --prompt
    ["generate", "-p", "x", "--n", "many"],
    ["list-adapters", "--limit", "0"],  # out of the option's range
    ["convert", "only-one-argument"],
    ["check-access"],
    ["bench", "--steps", "1e3"],
    ["--versionx"],
    # absurd or non-finite option values never reach an allocator or a sampler (#22 class 1)
    ["generate", "-p", "x", "--cfg", "nan"],
    ["generate", "-p", "x", "--cfg", "inf"],
    ["generate", "-p", "x", "--width", "1000000"],
    ["generate", "-p", "x", "--n", "0"],
    ["generate", "-p", "x", "--steps", "-3"],
    ["generate", "-p", "x", "--seed", "-1"],
    ["data", "preview", "sample", "--n", "-1"],
    ["data", "preview", "sample", "--scan", "-5"],
    ["data", "preview", "sample", "--resolution", "1048576"],
    ["data", "preview", "sample", "--max-aspect", "nan"],
    ["data", "check", "sample", "--limit", "-3"],
    ["bench", "--steps", "-1"],
    ["bench", "--batch", "0"],
    ["bench", "--rank", "0"],
]


@pytest.mark.parametrize("argv", USAGE_ERRORS, ids=lambda a: " ".join(a) or "<none>")
def test_usage_errors_exit_2_with_one_line(argv, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Internal error" not in err and "Traceback" not in err
    assert "--help" in lines[0]  # says where the right usage is
    assert not any(tmp_path.iterdir())


def test_no_command_lists_the_commands(capsys) -> None:
    code, _, err = run_cli([], capsys)
    assert code == 2
    for command in ("train", "publish", "generate", "data"):
        assert command in err


def _oserror(code: int, filename: str | None = None) -> OSError:
    return OSError(code, errno.errorcode.get(code, "error"), filename)


def _chained(outer: Exception, inner: BaseException) -> Exception:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except Exception as final:
        return final


@pytest.mark.parametrize(
    ("exc", "code", "needle"),
    [
        (KeyboardInterrupt(), 130, "Interrupted."),
        (_oserror(errno.ENOSPC, "/data/out/adapter.safetensors"), 13, "No space left on /data/out/adapter.safetensors"),
        (_chained(RuntimeError("save failed"), _oserror(errno.EDQUOT)), 13, "No space left"),
        (RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space "
                      "left on device\" })"), 13, "No space left"),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x.png"), 13, "Cannot write /root/x.png"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/a"), 13, "Cannot write /ro/a"),
        (ConnectionError("Couldn't reach 'owner/ds' on the Hub (LocalEntryNotFoundError)"), 10, "Could not reach the Hub"),
        (_chained(ValueError("wrapped"), TimeoutError("read timed out")), 10, "Could not reach the Hub"),
        (ValueError("boom"), 1, "This is a bug in sd35hub"),
    ],
)
def test_untyped_failures_map_to_documented_codes(exc, code, needle) -> None:
    message, exit_code = format_error(exc)
    assert (exit_code, needle in message) == (code, True), message
    assert "\n" not in message
    assert exit_code in errors.EXIT_CODES


def test_hub_connection_errors_from_httpx_and_hub_map_to_10() -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        import httpx2 as httpx
    except ImportError:  # pragma: no cover
        import httpx
    for exc in (httpx.ConnectError("[Errno 111] Connection refused"), httpx.ReadTimeout("timed out"),
                LocalEntryNotFoundError("cannot find the requested files in the local cache")):
        assert format_error(exc)[1] == 10, exc


def test_an_unreachable_hub_while_opening_a_dataset_exits_10(capsys, monkeypatch) -> None:
    """#15 item 2: `data check owner/ds` with the Hub down was "Internal error: ConnectionError", exit 1."""
    from sd35hub.data import readers

    def unreachable(*args, **kwargs):  # what datasets raises when no endpoint answers
        raise ConnectionError("Couldn't reach 'owner/ds' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(readers, "read_hub", unreachable)
    code, _, err = run_cli(["data", "check", "owner/ds"], capsys)
    assert code == 10, err
    assert err.startswith("Error: Could not reach the Hub at ") and len(err.strip().splitlines()) == 1


def test_convert_counts_the_modules_it_wrote(capsys, tmp_path) -> None:
    """#15 item 5: a kohya file fuses q, k, v; the message counted the modules read ("19 ... written" for 9)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    prefix = "transformer.transformer_blocks.0.attn."
    tensors = {}
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        tensors[f"{prefix}{name}.lora_A.weight"] = torch.randn(4, 32)
        tensors[f"{prefix}{name}.lora_B.weight"] = torch.randn(32, 4)
    save_file(tensors, str(tmp_path / "in.safetensors"))
    code, out, err = run_cli(["convert", str(tmp_path / "in.safetensors"), str(tmp_path / "k.safetensors"),
                              "--to", "kohya"], capsys)
    assert code == 0, err
    with safe_open(str(tmp_path / "k.safetensors"), framework="pt") as handle:
        written = sum(k.endswith(".lora_down.weight") for k in handle.keys())
    assert written == 2  # qkv fused + to_out
    assert f": {written} LoRA modules written" in out and "(4 read; q, k, v fused)" in out


def test_an_output_path_of_the_wrong_kind_exits_13_naming_it(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file")
    (tmp_path / "folder.png").mkdir()
    for argv, name in ((["data", "preview", "sample", "--n", "1", "--scan", "2", "--out", "folder.png"], "folder.png"),
                       (["data", "preview", "sample", "--n", "1", "--scan", "2", "--out", "taken/p.png"], "taken")):
        code, _, err = run_cli(argv, capsys)
        assert code == 13, err
        assert err.startswith("Error: Cannot write ") and name in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "taken").read_text() == "a file"
