"""A full disk (#22 class 5): every write path says "No space left on <path>, needed ~N MB" and exits 13,
leaving nothing half-written. Driven on a real, full filesystem: a small tmpfs mounted for the test (needs
root; skipped elsewhere), so safetensors (Rust), torch (C++), PIL and Python each hit a real ENOSPC. Where
no tmpfs can be mounted, the Python-level writers still get ENOSPC injected at open()/write()."""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from safetensors.torch import save_file

from sd35hub.errors import DiskFullError


def _fill(root: Path) -> None:
    """Write until the filesystem refuses: what is left is less than one block."""
    with open(root / "filler", "wb") as handle:
        block = b"\0" * 65536
        try:
            while True:
                handle.write(block)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    for size in (4096, 512, 1):
        try:
            with open(root / f"filler-{size}", "wb") as handle:
                while True:
                    handle.write(b"\0" * size)
                    handle.flush()
        except OSError:
            pass


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs, filled up."""
    mount = tmp_path / f"full-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        (mount / "out").mkdir()
        _fill(mount)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _no_leftovers(folder: Path) -> None:
    """No file but the filler: nothing half-written (empty folders may stay)."""
    left = [p.name for p in folder.rglob("*") if p.is_file() and not p.name.startswith("filler")]
    assert left == [], left


def _adapter(path: Path, rank: int = 16) -> Path:
    prefix = "transformer.transformer_blocks.0.attn."
    tensors = {}
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        tensors[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, 1024)
        tensors[f"{prefix}{name}.lora_B.weight"] = torch.randn(1024, rank)
    save_file(tensors, str(path))
    return path


def test_convert_onto_a_full_disk_exits_13_naming_the_file_and_the_size(full_disk, tmp_path, capsys) -> None:
    source = _adapter(tmp_path / "in.safetensors")
    target = full_disk / "out" / "converted.safetensors"
    code, _, err = run_cli(["convert", str(source), str(target), "--to", "kohya"], capsys)
    assert code == 13, err
    assert err.startswith(f"Error: No space left on {target}, needed ~") and " MB" in err, err
    assert len(err.strip().splitlines()) == 1 and "Internal error" not in err
    _no_leftovers(full_disk)


def test_merge_onto_a_full_disk_exits_13(full_disk, tmp_path, capsys) -> None:
    source = _adapter(tmp_path / "in.safetensors", rank=4)
    code, _, err = run_cli(["merge", f"{source}:0.5", f"{source}:0.5", "--out", str(full_disk / "out" / "m")], capsys)
    assert code == 13 and "No space left on" in err, err
    _no_leftovers(full_disk)


def test_preview_onto_a_full_disk_exits_13(full_disk, capsys) -> None:
    target = full_disk / "out" / "preview.png"
    code, _, err = run_cli(["data", "preview", "sample", "--out", str(target), "--n", "2", "--scan", "4"], capsys)
    assert code == 13, err
    assert err.startswith(f"Error: No space left on {target}"), err
    _no_leftovers(full_disk)


def test_every_writer_raises_disk_full(full_disk) -> None:
    from PIL import Image

    from sd35hub.data.cache import _atomic_save
    from sd35hub.paths import atomic_write_text
    from sd35hub.pngmeta import save_png
    from sd35hub.train.checkpoint import TrainState, list_checkpoints, save_checkpoint

    out = full_disk / "out"
    (out / "cache").mkdir()  # build_cache makes it before the first shard
    lora = {"blocks.0.to_q.lora_A.default.weight": torch.randn(16, 512)}
    writers = {
        "checkpoint (safetensors + torch.save)": lambda: save_checkpoint(
            out / "checkpoints", TrainState(step=3), lora=lora, optimizer={"state": {}}, scheduler={}),
        "cache shard": lambda: _atomic_save({"latents": torch.randn(4, 64, 64)}, out / "cache" / "x.safetensors", {}),
        "summary / card text": lambda: atomic_write_text(out / "summary.json", "{}" * 100_000),
        "generated PNG": lambda: save_png(Image.effect_noise((256, 256), 64).convert("RGB"), out / "img.png",
                                          {"prompt": "p"}),
        "torch.save": lambda: _torch_save(out / "state.pt"),
    }
    for name, write in writers.items():
        with pytest.raises(DiskFullError) as info:
            write()
        assert info.value.exit_code == 13, name
        assert str(out) in info.value.message and "needed ~" in info.value.message, (name, info.value.message)
    assert list_checkpoints(out / "checkpoints") == []
    _no_leftovers(full_disk)


def _torch_save(path: Path) -> None:
    from sd35hub.paths import atomic_write

    atomic_write(path, lambda temp: torch.save({"w": torch.randn(256, 1024)}, temp), needed=2**20)


# --------------------------------------------------------- without a tmpfs: ENOSPC injected at open()/write()
class _FullFile(io.FileIO):
    def write(self, data) -> int:  # noqa: ANN001
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def injected_full(tmp_path, monkeypatch):
    """Files opened for writing under ``tmp_path/full`` fail every write with ENOSPC (Python-level writers)."""
    root = tmp_path / "full"
    root.mkdir()
    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if isinstance(file, (str, os.PathLike)) and str(Path(file).absolute()).startswith(str(root)) and any(
                c in mode for c in "wax+"):
            raw = _FullFile(file, mode.replace("b", "").replace("t", "") or "w")
            return raw if "b" in mode and not args and not kwargs.get("buffering") else io.TextIOWrapper(
                io.BufferedWriter(raw), encoding=kwargs.get("encoding") or "utf-8") if "b" not in mode else raw
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_open)
    monkeypatch.setattr(io, "open", full_open)
    return root


def test_python_writers_raise_disk_full_when_writes_fail_with_enospc(injected_full) -> None:
    from PIL import Image

    from sd35hub.paths import atomic_write_text
    from sd35hub.pngmeta import save_png

    for write in (lambda: atomic_write_text(injected_full / "card" / "README.md", "x" * 3_000_000),
                  lambda: save_png(Image.new("RGB", (64, 64)), injected_full / "img.png", {"prompt": "p"})):
        with pytest.raises(DiskFullError, match=rf"No space left on {injected_full}"):
            write()
    assert [p.name for p in injected_full.rglob("*") if p.is_file()] == []
