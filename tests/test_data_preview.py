"""`sd35hub data preview` / `data check`: a PNG grid and a summary, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sd35hub.config import DataSpec
from sd35hub.data.preview import preview_grid
from sd35hub.frontends.cli import main


def test_preview_grid_writes_png_and_summary(tmp_path: Path) -> None:
    summary = preview_grid(DataSpec(source="sample"), n=6, out=tmp_path / "grid.png", resolution=512)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.format == "PNG" and grid.width > 3 * 256 and grid.height > 2 * 256
    assert summary.shown == 6 and summary.stats.usable == 24
    assert sum(summary.buckets.values()) == 24 and "640x384" in summary.buckets
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_preview_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["data", "preview", "sample", "--out", str(tmp_path / "p.png"), "--n", "4", "--resolution", "256"])
    out = capsys.readouterr().out
    assert "24 usable of 24 seen" in out and "256x256" in out and (tmp_path / "p.png").is_file()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.raises(SystemExit) as done:
        main(["data", "check", str(tmp_path / "bad")])
    assert done.value.code == 7
    assert "unsupported_format 1" in capsys.readouterr().err
