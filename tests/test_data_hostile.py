"""Hostile data inputs (#22 class 2), driven through the real readers, the sample stream and the
preview: every sample-level fault is a counted skip with its reason, every dataset-level fault a
DatasetError naming the file (and line); nothing is a traceback or a hang. Generated inputs use
hypothesis (a fixed seed per test, no example database: deterministic)."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

from sd35hub.config import DataSpec
from sd35hub.data.images import MAX_CAPTION_CHARS
from sd35hub.data.preview import preview_grid
from sd35hub.data.sources import check_dataset, open_samples
from sd35hub.errors import DatasetError

SETTINGS = dict(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def png(size=(96, 96), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def spec(source: Path, **kw) -> DataSpec:
    return DataSpec(source=str(source), min_size=32, **kw)


def run(source: Path, **kw):
    """Stream everything; returns (samples, stats) or raises DatasetError (never anything else)."""
    stream = open_samples(spec(source, **kw))
    samples = list(stream)
    assert stream.stats.seen == stream.stats.usable + stream.stats.num_skipped  # every record accounted for
    return samples, stream.stats


# ------------------------------------------------------------------ metadata.jsonl lines of any JSON
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
file_names = st.sampled_from(["ok.png", "../outside.png", "/etc/passwd", "sub/../ok.png", "missing.png", "",
                              "a\x00b.png", "x" * 5000, "C:\\\\Windows\\\\x.png", "sub", "ok.png/"]) | json_values
row = st.one_of(json_values, st.fixed_dictionaries({"file_name": file_names, "text": json_values}))


@seed(2201)
@settings(**SETTINGS)
@given(lines=st.lists(row, min_size=1, max_size=8), junk=st.lists(st.binary(max_size=20), max_size=2))
def test_metadata_jsonl_of_any_shape_is_skips_or_one_clear_error(tmp_path_factory, lines, junk) -> None:
    root = tmp_path_factory.mktemp("jsonl")
    (root / "ok.png").write_bytes(png())
    (root / "sub").mkdir()
    (root.parent / "outside.png").write_bytes(png())
    text = "\n".join(json.dumps(line) for line in lines).encode() + b"".join(b"\n" + j for j in junk)
    (root / "metadata.jsonl").write_bytes(text)
    try:
        samples, stats = run(root)
    except DatasetError as exc:
        assert "metadata.jsonl" in str(exc)
        return
    for sample in samples:  # only the file inside the folder is ever used
        assert sample.key == "ok.png"
    assert stats.seen == sum(1 for line in text.splitlines() if line.strip())


def test_metadata_paths_outside_the_folder_are_counted_skips(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "ok.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png(color=(1, 2, 3)))
    os.symlink(tmp_path / "secret.png", root / "link.png")
    rows = [{"file_name": n, "text": "t"} for n in ("ok.png", "../secret.png", str(tmp_path / "secret.png"), "link.png")]
    rows += [[1, 2], 7, "text", {"file_name": 5, "text": "t"}, {"file_name": "ok.png", "text": {"a": 1}},
             {"file_name": "ok.png", "text": 12}, {"file_name": "ok.png", "text": ["first caption", "second"]}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n")
    samples, stats = run(root)
    assert [(s.key, s.caption) for s in samples] == [("ok.png", "t"), ("ok.png", "first caption")]
    assert stats.skipped == {"path_outside_folder": 3, "bad_metadata_row": 5, "bad_caption_type": 2}


def test_non_utf8_metadata_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "ok.png", "text": "a"}\n{"file_name": "ok.png", "text": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl line 2 is not UTF-8 text"):
        run(tmp_path)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_bytes(b"file_name,text\nok.png,fine\nok.png,caf\xe9\n")
    with pytest.raises(DatasetError, match=r"metadata.csv line 3 is not UTF-8 text"):
        run(tmp_path)


# ------------------------------------------------------------------ metadata.csv
csv_cell = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12) | st.sampled_from(
    ['"', '""', "\r", "\n", ",", "ok.png", "../x.png", "\x00"])


@seed(2202)
@settings(**SETTINGS)
@given(header=st.lists(csv_cell, min_size=0, max_size=4),
       rows=st.lists(st.lists(csv_cell, min_size=0, max_size=5), max_size=6))
def test_ragged_and_quoted_csv_is_skips_or_one_clear_error(tmp_path_factory, header, rows) -> None:
    root = tmp_path_factory.mktemp("csv")
    (root / "ok.png").write_bytes(png())
    lines = [",".join(header)] + [",".join(r) for r in rows]
    (root / "metadata.csv").write_text("\n".join(lines), encoding="utf-8")
    try:
        samples, _ = run(root)
    except DatasetError as exc:
        assert "metadata.csv" in str(exc)
        return
    assert all(s.key == "ok.png" for s in samples)


def test_csv_field_over_the_csv_modules_limit_is_read(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "metadata.csv").write_text("file_name,text\nok.png," + "w" * 300_000 + "\n")
    samples, stats = run(tmp_path)
    assert len(samples) == 1 and len(samples[0].caption) == MAX_CAPTION_CHARS and stats.fixed["caption_truncated"] == 1


# ------------------------------------------------------------------ parquet
def _parquet(path: Path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_parquet_cells_of_the_wrong_type_are_counted_skips(tmp_path: Path) -> None:
    _parquet(tmp_path / "ints.parquet", {"image": [png(), png(), png()], "text": [1, 2, 3]})
    _, stats = run(tmp_path / "ints.parquet")
    assert stats.skipped == {"bad_caption_type": 3}
    _parquet(tmp_path / "lists.parquet", {"image": [png(), png()], "text": [["a cat", "a feline"], []]})
    samples, stats = run(tmp_path / "lists.parquet")
    assert [s.caption for s in samples] == ["a cat", ""] and stats.fixed["missing_caption"] == 1
    _parquet(tmp_path / "strings.parquet", {"image": [png().decode("latin-1"), "ok.png", "../x.png"], "text": ["a", "b", "c"]})
    (tmp_path / "ok.png").write_bytes(png())
    samples, stats = run(tmp_path / "strings.parquet")
    assert [s.caption for s in samples] == ["b"] and stats.skipped == {"bad_image_value": 2}


def test_a_corrupt_parquet_page_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.parquet"
    _parquet(path, {"image": [png(color=(i, i, i)) for i in range(80)], "text": [f"c{i}" for i in range(80)]})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 400] = os.urandom(400)
    path.write_bytes(bytes(data))
    try:
        _, stats = run(path)
    except DatasetError as exc:
        assert "big.parquet" in str(exc)
    else:  # the damage landed inside image bytes: those samples are counted, not used
        assert stats.num_skipped >= 1
    path.write_bytes(b"PAR1" + os.urandom(100))
    with pytest.raises(DatasetError, match="big.parquet is not a readable parquet file"):
        run(path)


# ------------------------------------------------------------------ image files
def test_unreadable_misnamed_and_avif_images(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "fine.png").write_bytes(png())
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + os.urandom(200)
    (root / "phone.jpg").write_bytes(heic)  # HEIC named .jpg
    (root / "photo.heic").write_bytes(heic)
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), (10, 200, 10)).save(buffer, format="AVIF")
    (root / "modern.avif").write_bytes(buffer.getvalue())
    (root / "locked.png").write_bytes(png())
    (root / "locked.png").chmod(0)
    (root / "folder.png").mkdir()  # a folder with an image's name
    try:
        samples, stats = run(root)
    finally:
        (root / "locked.png").chmod(0o644)
    keys = sorted(s.key for s in samples)
    assert "modern.avif" in keys and "fine.png" in keys
    assert stats.skipped["unsupported_format"] == 2
    if os.geteuid() != 0:  # root reads a 000 file anyway
        assert stats.skipped["unreadable_file"] == 1


@seed(2203)
@settings(**SETTINGS)
@given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a",
                                                             b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM", b"II*\x00"]))
def test_any_bytes_as_an_image_are_a_counted_skip(tmp_path_factory, data, prefix) -> None:
    root = tmp_path_factory.mktemp("bytes")
    (root / "x.png").write_bytes(prefix + data)
    (root / "x.txt").write_bytes(data[:50])
    try:
        samples, stats = run(root)
    except DatasetError:
        pytest.fail("a single bad file is a skip, not a dataset error")
    assert stats.seen == 1 and len(samples) + stats.num_skipped == 1


# ------------------------------------------------------------------ captions
@seed(2204)
@settings(**SETTINGS)
@given(caption=st.binary(max_size=200))
def test_any_caption_bytes_are_a_caption_or_a_counted_skip(tmp_path_factory, caption) -> None:
    root = tmp_path_factory.mktemp("cap")
    (root / "a.png").write_bytes(png())
    (root / "a.txt").write_bytes(caption)
    samples, stats = run(root)
    assert len(samples) + stats.skipped["bad_caption_encoding"] == 1
    for sample in samples:
        assert "\n" not in sample.caption and "\x00" not in sample.caption


def test_a_10_mb_caption_without_spaces_neither_hangs_preview_nor_check(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png((300, 300)))
    (tmp_path / "a.txt").write_text("x" * 10_000_000)
    start = time.perf_counter()
    summary = preview_grid(spec(tmp_path), n=4, out=tmp_path / "p.png", resolution=256)
    stats = check_dataset(spec(tmp_path))
    assert time.perf_counter() - start < 20
    assert summary.shown == 1 and stats.fixed["caption_truncated"] == 1
