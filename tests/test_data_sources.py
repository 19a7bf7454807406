"""Sources: every format, column detection, caption handling, and bad input (fixed or counted)."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from sd35hub.config import DataSpec
from sd35hub.data.sample import sample_dataset_path, write_sample_dataset
from sd35hub.data.sources import caption_dropped, check_dataset, open_samples, tweak_caption
from sd35hub.errors import DatasetError, RepoNotFoundError


def png_bytes(size: tuple[int, int] = (300, 300), color: tuple[int, int, int] = (200, 30, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(size: tuple[int, int] = (300, 300), color: tuple[int, int, int] = (30, 30, 200), **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (only the header is ever read)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def spec(source: Path | str, **kwargs: object) -> DataSpec:
    return DataSpec(source=str(source), **{"min_size": 64, **kwargs})


def test_sample_dataset_is_deterministic_mixed_and_resolves(tmp_path: Path) -> None:
    path = sample_dataset_path()
    rebuilt = write_sample_dataset(tmp_path / "again")

    def digest(folder: Path) -> dict[str, str]:
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir()}

    assert digest(path) == digest(rebuilt)
    samples = list(open_samples(DataSpec(source="sample")))
    assert 16 <= len(samples) <= 32
    shapes = {("square" if w == h else "landscape" if w > h else "portrait") for w, h in (s.image.size for s in samples)}
    assert shapes == {"square", "landscape", "portrait"}
    assert samples[0].caption == "a red circle on a blue background, nrt style"
    assert len({s.caption for s in samples}) == len(samples)


def test_folder_with_txt_captions_and_every_bad_input(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    d.mkdir()
    files: dict[str, bytes] = {
        "good.png": png_bytes(),
        "good.txt": b"a good picture",
        "cmyk.jpg": jpeg_bytes(),  # replaced below by a CMYK JPEG
        "palette.png": png_bytes(mode="P"),
        "gray.png": png_bytes(mode="L"),
        "gray_alpha.png": png_bytes(mode="LA"),
        "corrupt.png": b"\x89PNG\r\n\x1a\nthis is not a png",
        "truncated.jpg": jpeg_bytes((400, 400))[:600],
        "zero.png": b"",
        "tiny.png": png_bytes((20, 20)),
        "stripe.png": png_bytes((1000, 100)),
        "bomb.png": bomb_png(30000, 30000),  # PIL's own DecompressionBombError
        "bomb2.png": bomb_png(9000, 9000),  # under PIL's limit, over ours (64 MP)
        "badtext.png": png_bytes(), "badtext.txt": b"\xff\xfeA",  # UTF-16 BOM, then an odd byte count
        "latin1.png": png_bytes(), "latin1.txt": b"caf\xe9 au lait",  # not UTF-8, no BOM -> skipped
        "utf16.png": png_bytes(), "utf16.txt": "un caf\u00e9".encode("utf-16"),
        "bom8.png": png_bytes(), "bom8.txt": "\ufeffwith a bom".encode(),
        "empty_caption.png": png_bytes(), "empty_caption.txt": b"  \n",
    }
    buffer = io.BytesIO()
    Image.new("CMYK", (300, 300), (0, 255, 255, 0)).save(buffer, format="JPEG")
    files["cmyk.jpg"] = buffer.getvalue()
    rgba = Image.new("RGBA", (300, 300), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 150, 300))  # left half opaque blue
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    files["rgba.png"] = buffer.getvalue()
    sixteen = Image.new("I;16", (300, 300))
    sixteen.paste(65535, (0, 0, 300, 150))  # top half white in 16-bit
    buffer = io.BytesIO()
    sixteen.save(buffer, format="PNG")
    files["sixteen.png"] = buffer.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buffer = io.BytesIO()
    Image.new("RGB", (400, 300), (10, 200, 10)).save(buffer, format="JPEG", exif=exif)
    files["rotated.jpg"] = buffer.getvalue()
    for name, data in files.items():
        (d / name).write_bytes(data)

    pixel_limit_before = Image.MAX_IMAGE_PIXELS
    stream = open_samples(spec(d, max_aspect=4.0))
    samples = {s.key: s for s in stream}  # must not raise
    stats = stream.stats
    assert samples["good.png"].caption == "a good picture"
    assert samples["utf16.png"].caption == "un caf\u00e9"
    assert samples["bom8.png"].caption == "with a bom"
    assert samples["empty_caption.png"].caption == ""
    assert samples["gray.png"].caption == ""  # no .txt: kept, empty caption, counted
    for s in samples.values():
        assert s.image.mode == "RGB"
    assert samples["rotated.jpg"].image.size == (300, 400)
    assert samples["rgba.png"].image.getpixel((250, 150)) == (255, 255, 255)  # transparent -> white
    assert samples["rgba.png"].image.getpixel((10, 150)) == (0, 0, 255)
    assert samples["sixteen.png"].image.getpixel((5, 5)) == (255, 255, 255)  # scaled, not clipped
    assert samples["sixteen.png"].image.getpixel((5, 250)) == (0, 0, 0)
    assert samples["cmyk.jpg"].image.getpixel((150, 150))[0] > 200  # C=0, M=Y=255 -> red
    assert stats.skipped == {
        "corrupt": 2, "empty_file": 1, "too_small": 1, "extreme_aspect": 1, "decompression_bomb": 2,
        "bad_caption_encoding": 2,
    }
    assert "badtext.png" not in samples and "latin1.png" not in samples
    assert stats.fixed["mode_CMYK"] == 1 and stats.fixed["mode_P"] == 1 and stats.fixed["mode_RGBA"] == 1
    assert stats.fixed["mode_LA"] == 1 and stats.fixed["mode_L"] == 1 and stats.fixed["mode_I;16"] == 1
    assert stats.fixed["exif_rotated"] == 1 and stats.fixed["empty_caption"] == 1
    assert stats.usable == len(samples) and stats.seen == len(files) - 6  # 6 .txt files are not records
    assert "decompression_bomb 2" in stats.summary()
    assert Image.MAX_IMAGE_PIXELS == pixel_limit_before  # PIL's global is left as it was


def test_trigger_word_shuffle_and_dropout_are_deterministic() -> None:
    s = DataSpec(trigger_word="nrt style", shuffle_tags=True, keep_tags=1)
    caption = "1girl, red hair, smile, outdoors, tree, sky"
    a = tweak_caption(caption, s, key="k1", seed=0)
    assert a == tweak_caption(caption, s, key="k1", seed=0)
    assert a.startswith("nrt style, 1girl, ")
    assert sorted(a.split(", ")[2:]) == sorted(caption.split(", ")[1:])
    variants = {tweak_caption(caption, s, key=f"k{i}", seed=0) for i in range(20)}
    assert len(variants) > 5
    assert tweak_caption("a cat, NRT style", s, key="k", seed=0).count("nrt style".lower()) == 0  # not duplicated
    assert tweak_caption("", s, key="k", seed=0) == "nrt style"
    dropped = [caption_dropped(f"k{i}", seed=3, epoch=0, rate=0.25) for i in range(2000)]
    assert 400 < sum(dropped) < 600
    assert dropped == [caption_dropped(f"k{i}", seed=3, epoch=0, rate=0.25) for i in range(2000)]
    assert dropped != [caption_dropped(f"k{i}", seed=3, epoch=1, rate=0.25) for i in range(2000)]


def test_metadata_jsonl_and_csv(tmp_path: Path) -> None:
    for kind in ("jsonl", "csv"):
        d = tmp_path / kind
        (d / "imgs").mkdir(parents=True)
        rows = [{"file_name": f"imgs/{i}.png", "prompt": f"picture {i}"} for i in range(3)]
        rows.append({"file_name": "imgs/missing.png", "prompt": "gone"})
        for i in range(3):
            (d / "imgs" / f"{i}.png").write_bytes(png_bytes(color=(i * 50, 0, 0)))
            (d / "imgs" / f"{i}.txt").write_text("ignored: metadata wins")
        if kind == "jsonl":
            (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            (d / "metadata.csv").write_text("file_name,prompt\n" + "".join(f"{r['file_name']},{r['prompt']}\n" for r in rows))
        stream = open_samples(spec(d))
        samples = list(stream)
        assert [(s.key, s.caption) for s in samples] == [(f"imgs/{i}.png", f"picture {i}") for i in range(3)]
        assert stream.stats.skipped == {"missing_image": 1}


def _write_parquet(path: Path, columns: dict[str, list[object]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_parquet_columns_detection_override_and_error(tmp_path: Path) -> None:
    images = [{"bytes": png_bytes(color=(i * 40, 0, 0)), "path": None} for i in range(4)]
    images[2] = {"bytes": b"garbage", "path": None}
    _write_parquet(tmp_path / "a.parquet", {"img": images, "caption_text": [f"c{i}" for i in range(4)], "id": [0, 1, 2, 3]})
    stream = open_samples(spec(tmp_path / "a.parquet"))
    assert [(s.key, s.caption) for s in stream] == [("a.parquet#0", "c0"), ("a.parquet#1", "c1"), ("a.parquet#3", "c3")]
    assert stream.stats.skipped == {"unsupported_format": 1}  # not an image PIL can identify

    (tmp_path / "odd").mkdir()
    _write_parquet(tmp_path / "odd" / "x.parquet", {"pixels": [png_bytes()], "words": ["hello"]})
    with pytest.raises(DatasetError) as info:
        list(open_samples(spec(tmp_path / "odd")))
    assert "pixels, words" in str(info.value) and "--image-column" in str(info.value)
    samples = list(open_samples(spec(tmp_path / "odd", image_column="pixels", caption_column="words")))
    assert [s.caption for s in samples] == ["hello"]
    with pytest.raises(DatasetError, match="no column 'nope'"):
        list(open_samples(spec(tmp_path / "odd", image_column="nope")))


def test_webdataset_tar(tmp_path: Path) -> None:
    members = {
        "shard/000.jpg": jpeg_bytes(), "shard/000.txt": b"first",
        "shard/001.png": png_bytes(), "shard/001.txt": b"second",
        "shard/002.png": b"not an image", "shard/002.txt": b"third",
        "shard/003.txt": b"caption without image",
    }
    with tarfile.open(tmp_path / "data-000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = open_samples(spec(tmp_path / "data-*.tar"))
    assert [(s.key, s.caption) for s in stream] == [("data-000.tar/shard/000", "first"), ("data-000.tar/shard/001", "second")]
    assert stream.stats.skipped == {"unsupported_format": 1, "missing_image": 1}


def test_empty_and_unusable_datasets_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        check_dataset(spec(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"")
    (tmp_path / "bad" / "b.png").write_bytes(png_bytes((10, 10)))
    with pytest.raises(DatasetError, match="empty_file 1, too_small 1"):
        check_dataset(spec(tmp_path / "bad"))
    with pytest.raises(DatasetError, match="does not exist"):
        check_dataset(spec(tmp_path / "nowhere"))
    assert check_dataset(DataSpec(source="sample"), limit=5).seen == 5
    assert len(list(open_samples(DataSpec(source="sample", max_samples=3)))) == 3


@pytest.mark.parametrize("layout", ["parquet", "imagefolder"])
def test_streamed_hub_dataset(hub_datasets: dict[str, str], layout: str) -> None:
    repo = hub_datasets[layout]
    stream = open_samples(DataSpec(source=repo, min_size=0, trigger_word="nrt style"))
    samples = list(stream)
    assert len(samples) == 6 and stream.stats.usable == 6
    assert [s.key for s in samples] == [f"{repo}/train/{i}" for i in range(6)]
    assert all(s.image.mode == "RGB" and s.caption.startswith("nrt style") and len(s.caption) > len("nrt style")
               for s in samples)
    assert len({s.content_hash for s in samples}) == 6


def test_missing_hub_dataset(hub: object) -> None:
    with pytest.raises(RepoNotFoundError):
        list(open_samples(DataSpec(source="nobody/no-such-dataset")))
