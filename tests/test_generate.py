"""`sd35hub generate` writes PNGs whose text chunks parse back, and labelled comparison grids;
`sd35hub convert` round-trips; bad flags are clear errors with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from lora_helpers import add_random_lora, tiny_pipe
from PIL import Image

from sd35hub.adapters.files import AdapterMetadata, read_adapter, save_adapter
from sd35hub.frontends.cli import main
from sd35hub.pngmeta import read_png_params

TINY = ["--model", "tiny", "--steps", "2", "--width", "64", "--height", "64", "--cfg", "4.5"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pipe = tiny_pipe()
    add_random_lora(pipe.transformer, "s", seed=31)
    meta = AdapterMetadata(0, 0.0, base_model="tiny", trigger_words=["zxq style"])
    return save_adapter(
        pipe.transformer, tmp_path_factory.mktemp("gen") / "s", metadata=meta, adapter_name="s"
    ).parent


@pytest.mark.slow
def test_generate_writes_pngs_with_parameters(adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    main(["generate", "--prompt", "a fox", "--lora", f"{adapter}:0.8", "--seed", "7", "--n", "2",
          "--negative-prompt", "blurry", "--scheduler", "heun", "--output", str(out), *TINY])  # fmt: skip
    pngs = sorted(out.glob("image-*.png"))
    assert [p.name for p in pngs] == ["image-000-seed7.png", "image-001-seed8.png"]
    params = read_png_params(pngs[1])
    assert params["prompt"] == "zxq style, a fox" and params["negative_prompt"] == "blurry"
    assert params["seed"] == "8" and params["steps"] == "2" and params["cfg"] == "4.5"
    assert params["scheduler"] == "heun" and params["model"] == "tiny" and params["sd35hub_version"]
    assert params["adapters"] == [{"source": str(adapter), "weight": 0.8}]
    assert params["sd35hub"]["seeds"] == [7, 8]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "cells"), [("base", 2), ("cfg", 6)])
def test_compare_grid(adapter: Path, tmp_path: Path, mode: str, cells: int) -> None:
    main(
        [
            "generate",
            "--prompt",
            "a fox",
            "--lora",
            str(adapter),
            "--output",
            str(tmp_path),
            "--compare",
            mode,
            *TINY,
        ]
    )
    grid = Image.open(tmp_path / f"compare-{mode}.png")
    assert grid.width == 64 * cells and grid.height > 64  # labelled strip under the images
    assert read_png_params(tmp_path / f"compare-{mode}.png")["sd35hub"]["compare"] == mode


def test_bad_scheduler_and_lora_syntax_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--scheduler", "ddim"], ["--lora", "me/x:abc"]):
        with pytest.raises(SystemExit) as info:
            main(["generate", "--prompt", "a fox", "--output", str(tmp_path), *TINY, *argv])
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "rectified-flow" in err and "not a number" in err and "Traceback" not in err


def test_convert_cli_round_trip(adapter: Path, tmp_path: Path) -> None:
    main(["convert", str(adapter), str(tmp_path / "k.safetensors"), "--to", "kohya"])
    main(["convert", str(tmp_path / "k.safetensors"), str(tmp_path / "back"), "--to", "diffusers"])
    original, back = read_adapter(adapter), read_adapter(tmp_path / "back")
    assert read_adapter(tmp_path / "k.safetensors").format == "kohya" and back.format == "diffusers"
    assert back.metadata is not None and back.metadata.trigger_words == ["zxq style"]
    assert original.modules and back.modules.keys() == original.modules.keys()
    for name, module in original.modules.items():
        assert module.up.equal(back.modules[name].up) and module.down.equal(back.modules[name].down)
        assert module.alpha == back.modules[name].alpha


def test_pickled_adapter_exit_9(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "evil.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(SystemExit) as info:
        main(["adapter-info", str(tmp_path / "evil.ckpt")])
    assert info.value.code == 9 and "safetensors" in capsys.readouterr().err


def test_a_size_beyond_the_bases_position_grid_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny base covers 512 px a side: 1024 was an "Internal error" from diffusers' pos_embed check."""
    with pytest.raises(SystemExit) as info:
        main(["generate", "--prompt", "a fox", "--output", str(tmp_path), "--model", "tiny", "--steps", "1",
              "--width", "1024", "--height", "1024"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "at most 512" in err and "Internal error" not in err and not list(tmp_path.glob("*.png"))
