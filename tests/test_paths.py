"""paths: atomic writes and race-safe build-into-place."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd35hub.paths import atomic_write, build_into_place


def test_atomic_write_replaces_whole_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "card.md"
    atomic_write(target, lambda temp: temp.write_text("old"))
    assert target.read_text() == "old"

    def crash(temp: Path) -> None:
        temp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_text() == "old"  # the previous complete file is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["card.md"]  # no temp file left behind


def test_build_into_place_builds_once_and_replaces_incomplete(tmp_path: Path) -> None:
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "done").write_text("1")

    def complete(folder: Path) -> bool:
        return (folder / "done").is_file()

    target = tmp_path / "thing"
    target.mkdir()
    (target / "partial").write_text("from a crashed build")
    assert build_into_place(target, build, complete) == target
    assert sorted(p.name for p in target.iterdir()) == ["done"]
    build_into_place(target, build, complete)
    assert len(calls) == 1  # complete: not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]  # no staging folders left
