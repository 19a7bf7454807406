"""Issue #19 goal 5 on the tiny model: what a second run (fresh output folder) reuses before its first step.

The data cache's default folder is content-keyed under the user cache (sd35hub.data.cache_key): a second
run reads no image and loads no encoder (the loader's own log says which modules loaded before step 1),
a changed caption or resolution is encoded again, a damaged shard is found, said and rebuilt. The base
model's column of the step-0 grid comes from the base-grid cache (sd35hub.train.base_grid) and equals a
freshly sampled one pixel for pixel; any input of its key changes the folder.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sd35hub.config import load_config
from sd35hub.data.sample import sample_dataset_path
from sd35hub.models import load as loader
from sd35hub.train.recipe import train

ENCODERS = {"vae", "text_encoder", "text_encoder_2", "text_encoder_3"}


def _config(out: Path, *extra: str):  # noqa: ANN202
    return load_config(None, ["model.name=tiny", "data.source=sample", "data.resolution=128", "data.min_size=64",
                              "data.max_samples=4", "train.max_steps=1", "train.profile=cpu", "train.validation_steps=1",
                              f"train.output_dir={out}", "train.checkpoint_every=0", "hub.check_access=false",
                              *extra])  # fmt: skip


def _run(out: Path, *extra: str) -> dict:
    """One run; what loaded before the first step, the log, the trainer's phases and base images."""
    lines: list[str] = []
    seen: dict = {}
    start = len(loader.loader_log)

    def on_step(trainer) -> None:  # noqa: ANN001
        if trainer.state.step == 1:
            seen["loaded"] = [name for event, name, _ in loader.loader_log[start:] if event == "load"]
            seen["phases"] = dict(trainer.startup_phases)
            seen["base"] = [np.asarray(im) for im in trainer.base_images]
            seen["cache_dir"] = trainer.index.path

    result = train(_config(out, *extra), log=lines.append, on_step=on_step, progress=False)
    return {**seen, "log": lines, "summary": json.loads((result.output_dir / "summary.json").read_text())}


def test_a_second_run_in_a_fresh_folder_reads_no_image_and_loads_no_encoder(tmp_path: Path) -> None:
    first = _run(tmp_path / "a")
    assert ENCODERS <= set(first["loaded"])  # the first run encoded everything
    assert {"encode images (VAE)", "encode captions (CLIP-L)", "step-0 validation", "first step"} <= set(first["phases"])
    second = _run(tmp_path / "b")
    assert second["loaded"] == ["transformer"]  # no VAE, no text encoder before the first step
    assert second["cache_dir"] == first["cache_dir"] and tmp_path not in Path(second["cache_dir"]).parents
    assert any("data cache: reused the complete build" in line for line in second["log"])
    assert any("base model's column read from the cache" in line for line in second["log"])
    assert any("dataset check: unchanged" in line for line in second["log"])  # the images were not read to check them
    phases = second["phases"]
    assert not any(name.startswith("encode") for name in phases)
    assert phases["to first step"] >= phases["first step"] > 0
    assert abs(sum(v for k, v in phases.items() if k != "to first step") - phases["to first step"]) < 0.05
    assert second["summary"]["phases"]["to first step"] >= phases["to first step"]  # summary.json: the same dict
    assert "load VAE" in second["summary"]["phases"] or "load VAE" not in phases  # loaded later (final grid), if at all
    assert all(np.array_equal(a, b) for a, b in zip(first["base"], second["base"], strict=True))
    assert any(line.startswith("startup ") and "to first step" in line for line in second["log"])


@pytest.mark.slow
def test_a_changed_caption_or_resolution_is_encoded_again(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(sample_dataset_path(), data)
    source = f"data.source={data}"
    first = _run(tmp_path / "a", source)
    caption = sorted(data.glob("*.txt"))[0]
    caption.write_text(caption.read_text() + " and a changed caption")
    second = _run(tmp_path / "b", source)
    assert second["cache_dir"] == first["cache_dir"]  # same folder: only the changed entry is new
    assert any("data cache: encoded 1 of 4 samples" in line for line in second["log"]), second["log"]
    assert {"text_encoder", "vae"} <= set(second["loaded"])
    third = _run(tmp_path / "c", source, "data.resolution=192")
    assert third["cache_dir"] != first["cache_dir"]  # another resolution: another folder, everything encoded
    assert any("data cache: encoded 4 of 4 samples" in line for line in third["log"])
    explicit = tmp_path / "mine"  # data.cache_dir still decides where the cache is
    fourth = _run(tmp_path / "d", source, f"data.cache_dir={explicit}")
    assert Path(fourth["cache_dir"]) == explicit and any("encoded 4 of 4" in line for line in fourth["log"])


@pytest.mark.slow
def test_a_damaged_shard_is_found_said_and_rebuilt(tmp_path: Path) -> None:
    first = _run(tmp_path / "a")
    folder = Path(first["cache_dir"])
    shard = sorted(folder.glob("shard-*.safetensors"))[0]
    entries = json.loads(json.loads(shard.read_bytes()[8 : 8 + int.from_bytes(shard.read_bytes()[:8], "little")])
                         ["__metadata__"]["entries"])  # fmt: skip
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    second = _run(tmp_path / "b")
    log = "\n".join(second["log"])
    assert "does not check out" in log and "is unreadable" in log and "encoded again" in log
    assert f"data cache: encoded {len(entries)} of 4 samples" in log
    assert "vae" in second["loaded"]
    third = _run(tmp_path / "c")  # rebuilt: reused again
    assert third["loaded"] == ["transformer"]


def test_the_build_lock_makes_a_second_builder_wait(tmp_path: Path) -> None:
    from sd35hub.data.cache import build_lock

    said: list[str] = []
    got = threading.Event()
    waiting = threading.Event()

    def other() -> None:
        with build_lock(tmp_path, lambda line: (said.append(line), waiting.set())):
            got.set()

    with build_lock(tmp_path):
        thread = threading.Thread(target=other)
        thread.start()
        assert waiting.wait(30)  # it said it waits for this builder ...
        assert not got.is_set()  # ... and did not get in while this one holds the lock
    thread.join(30)
    assert got.is_set() and "another run is building" in said[0]


def _grid_trainer(tmp_path: Path, *extra: str) -> SimpleNamespace:
    from sd35hub.train.validation import EncodedPrompts

    cfg = _config(tmp_path / "out", *extra)
    g = torch.Generator().manual_seed(0)
    prompts = EncodedPrompts(["a", "b"], {"prompt_embeds": torch.randn(2, 3, 4, generator=g),
                                          "pooled_prompt_embeds": torch.randn(2, 4, generator=g)})
    return SimpleNamespace(config=cfg, plan=None, weight_dtype=torch.float32, device=torch.device("cpu"), prompts=prompts)


def test_every_input_of_the_base_grid_key_changes_its_folder(tmp_path: Path) -> None:
    from sd35hub.models.tiny import tiny_model_path
    from sd35hub.train.base_grid import BaseGridCache

    kwargs = dict(size=128, steps=1, guidance=4.5, seed=0, device="cpu", dtype=torch.float32, pipe_kwargs={})
    base = BaseGridCache.for_trainer(_grid_trainer(tmp_path), kwargs).folder
    assert BaseGridCache.for_trainer(_grid_trainer(tmp_path), kwargs).folder == base  # deterministic
    changed = [BaseGridCache.for_trainer(_grid_trainer(tmp_path), {**kwargs, k: v}).folder
               for k, v in (("size", 192), ("steps", 2), ("guidance", 1.0), ("seed", 1),
                            ("pipe_kwargs", {"skip_guidance_layers": [7]}))]  # fmt: skip
    other = _grid_trainer(tmp_path)
    other.prompts.prompts[1] = "c"
    changed.append(BaseGridCache.for_trainer(other, kwargs).folder)
    other = _grid_trainer(tmp_path)
    other.prompts.embeds["prompt_embeds"][0, 0, 0] += 1e-3  # other text encoders' embeddings of the same prompt
    changed.append(BaseGridCache.for_trainer(other, kwargs).folder)
    changed.append(BaseGridCache.for_trainer(_grid_trainer(tmp_path, "model.quantize=int8"), kwargs).folder)
    other = _grid_trainer(tmp_path)
    other.weight_dtype = torch.bfloat16
    changed.append(BaseGridCache.for_trainer(other, kwargs).folder)
    weights = sorted((tiny_model_path() / "transformer").glob("*.safetensors"))[0]  # the base's files changed
    stat = weights.stat()
    import os

    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    try:
        changed.append(BaseGridCache.for_trainer(_grid_trainer(tmp_path), kwargs).folder)
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert base not in changed and len(set(changed)) == len(changed)


def test_the_cached_base_column_equals_a_fresh_one_and_a_damaged_one_is_sampled_again(tmp_path: Path,
                                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from PIL import Image

    own = os.environ["SD35HUB_DATA_CACHE"]
    first = _run(tmp_path / "a")  # samples the base column and caches it
    grids = sorted(Path(first["cache_dir"]).parent.glob("base-grids/*"))
    assert len(grids) == 1
    cached = _run(tmp_path / "b")
    assert any("column read from the cache" in line for line in cached["log"])
    monkeypatch.setenv("SD35HUB_DATA_CACHE", str(tmp_path / "empty"))  # nothing cached: sampled afresh
    fresh = _run(tmp_path / "c")
    assert not any("column read from the cache" in line for line in fresh["log"])
    assert all(np.array_equal(a, b) for a, b in zip(cached["base"], fresh["base"], strict=True))
    assert any("step-0 held-out loss read from the cache" in line for line in cached["log"])
    assert cached["summary"]["initial_validation_loss"] == fresh["summary"]["initial_validation_loss"]  # exact
    a = np.asarray(Image.open(tmp_path / "b" / "samples" / "step_000000.png"))
    b = np.asarray(Image.open(tmp_path / "c" / "samples" / "step_000000.png"))
    assert np.array_equal(a, b)  # the whole step-0 grid
    monkeypatch.setenv("SD35HUB_DATA_CACHE", own)
    (grids[0] / "0.png").write_bytes(b"not a png")
    again = _run(tmp_path / "d")
    assert not any("column read from the cache" in line for line in again["log"])
    assert all(np.array_equal(x, y) for x, y in zip(again["base"], fresh["base"], strict=True))
    assert _run(tmp_path / "e")["loaded"] == ["transformer"]  # rewritten: read from the cache again


@pytest.mark.slow
def test_a_hub_dataset_is_reused_by_its_commit(tmp_path: Path, hub_datasets: dict[str, str]) -> None:
    source = f"data.source={hub_datasets['parquet']}"
    first = _run(tmp_path / "a", source)
    assert "text_encoder" in first["loaded"]
    from sd35hub.data import cache_key

    cache_key._HUB_MEMO.clear()  # a later process: the dataset's commit is asked again
    second = _run(tmp_path / "b", source)
    assert second["loaded"] == ["transformer"]
    assert any("data cache: reused the complete build" in line for line in second["log"])
    assert any("dataset check: unchanged" in line for line in second["log"])  # not streamed again to check it
