"""The streaming loader (sd35hub.models.stream): exact round trips against the libraries' own mmap
loading, one reusable host buffer and no mapped weights files, clear errors on broken files."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from sd35hub.errors import ModelLoadError
from sd35hub.models.stream import TensorStream, load_streamed, read_header, weight_files
from sd35hub.models.tiny import tiny_model_path

COMPONENTS = [
    ("diffusers", SD3Transformer2DModel, "transformer"),
    ("diffusers", AutoencoderKL, "vae"),
    ("transformers", CLIPTextModelWithProjection, "text_encoder"),
    ("transformers", CLIPTextModelWithProjection, "text_encoder_2"),
    ("transformers", T5EncoderModel, "text_encoder_3"),
]


def _assert_same_state(reference: torch.nn.Module, streamed: torch.nn.Module) -> None:
    a, b = reference.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].device == b[key].device, key
        assert torch.equal(a[key], b[key]), key
    assert {k: v.dtype for k, v in reference.named_buffers()} == {k: v.dtype for k, v in streamed.named_buffers()}


@pytest.mark.parametrize("library,cls,name", COMPONENTS, ids=[c[2] for c in COMPONENTS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_round_trip_equals_the_mmap_load(library, cls, name, dtype) -> None:
    folder = tiny_model_path()
    reference = cls.from_pretrained(folder, subfolder=name, dtype=dtype)
    streamed = load_streamed(library, cls.__name__, folder / name, dtype=dtype, device=None)
    assert type(streamed) is cls and not streamed.training
    _assert_same_state(reference, streamed)
    if library == "transformers":
        assert streamed.config.dtype == reference.config.dtype
        assert streamed.config._attn_implementation == reference.config._attn_implementation
    if name == "text_encoder_3":  # tied input embedding, and T5's wo in fp32 for an fp16 load as transformers does
        assert streamed.encoder.embed_tokens.weight is streamed.shared.weight
        wo = streamed.encoder.block[0].layer[1].DenseReluDense.wo.weight
        assert wo.dtype == (torch.float32 if dtype == torch.float16 else dtype)


def test_the_loaders_go_through_the_stream(monkeypatch) -> None:
    """load_component / load_transformer stream by default; SD35HUB_LOADER=mmap is the libraries' path."""
    from sd35hub.models import stream
    from sd35hub.models.components import load_component
    from sd35hub.models.load import load_transformer

    calls: list[str] = []
    real = stream.load_streamed
    monkeypatch.setattr(stream, "load_streamed", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    t5 = load_component("tiny", "text_encoder_3", dtype="bf16")
    transformer = load_transformer("tiny", dtype="bf16")
    assert calls == ["T5EncoderModel", "SD3Transformer2DModel"]
    monkeypatch.setenv("SD35HUB_LOADER", "mmap")
    _assert_same_state(load_component("tiny", "text_encoder_3", dtype="bf16"), t5)
    _assert_same_state(load_transformer("tiny", dtype="bf16"), transformer)
    assert len(calls) == 2


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_one_reusable_buffer_and_no_mapped_file(tmp_path) -> None:
    """Every tensor is read into the same buffer (allocated once, the largest tensor's size) and the
    weights files are never mapped into the process (so their pages are not in its RSS)."""
    t5 = T5EncoderModel.from_pretrained(tiny_model_path(), subfolder="text_encoder_3")
    t5.save_pretrained(tmp_path / "t5", max_shard_size="20KB")  # several shards + an index
    files = weight_files(tmp_path / "t5")
    assert len(files) > 1
    stream = TensorStream(files)
    sizes = [e.nbytes for _, entries in stream.entries for e in entries]
    assert stream.buffer_bytes == max(sizes)
    seen, pointers = [], set()
    for name, view in stream:
        pointers.add(view.untyped_storage().data_ptr())
        assert not any(_mapped(f) for f in files), name
        seen.append(name)
    assert stream.allocations == 1 and len(pointers) == 1
    assert sorted(seen) == sorted(t5.state_dict().keys() - {"encoder.embed_tokens.weight"})
    # the check can fail: safetensors' own loading maps the file
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as handle:
        handle.get_tensor(next(iter(handle.keys())))
        assert _mapped(files[0])
    loaded = load_streamed("transformers", "T5EncoderModel", tmp_path / "t5", dtype=torch.float32, device=None)
    _assert_same_state(t5, loaded)


def test_header_matches_safetensors() -> None:
    from safetensors import safe_open

    path = tiny_model_path() / "transformer" / "diffusion_pytorch_model.safetensors"
    entries = {e.name: e for e in read_header(path)}
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(entries)
        for key in handle.keys():
            assert tuple(handle.get_slice(key).get_shape()) == entries[key].shape


def _copy(tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(tiny_model_path() / name, target)
    return target


def test_truncated_file_is_a_clear_error(tmp_path) -> None:
    folder = _copy(tmp_path, "text_encoder")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_streamed("transformers", "CLIPTextModelWithProjection", folder, dtype=torch.float32, device=None)


def test_bad_header_and_pickles_are_refused(tmp_path) -> None:
    folder = _copy(tmp_path, "text_encoder")
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        read_header(path)
    path.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="pickled"):
        weight_files(folder)


def test_weights_that_do_not_match_the_config(tmp_path) -> None:
    folder = _copy(tmp_path, "text_encoder")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = config["intermediate_size"] * 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="do not match config.json"):
        load_streamed("transformers", "CLIPTextModelWithProjection", folder, dtype=torch.float32, device=None)


def test_missing_weights_are_named(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(tmp_path, "vae")
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(path))
    with pytest.raises(ModelLoadError, match="missing") as info:
        load_streamed("diffusers", "AutoencoderKL", folder, dtype=torch.float32, device=None)
    assert dropped in str(info.value)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_load_streamed_maps_no_file_and_reads_through_one_buffer(monkeypatch, tmp_path) -> None:
    """The whole loading path (meta module, accelerate / diffusers setters, tying) reads every tensor through
    the one buffer and never maps a weights file; each tensor is copied out before the next is read.
    It loads a private copy of the folder: earlier tests in the same process may keep the shared tiny
    model's file mapped through from_pretrained, which says nothing about this loader."""
    from sd35hub.models import stream

    streams: list[stream.TensorStream] = []

    class Watched(stream.TensorStream):
        def __iter__(self):  # noqa: ANN204
            streams.append(self)
            previous = None
            for name, view in super().__iter__():
                assert not any(_mapped(f) for f in self.files), name
                if previous is not None:  # the buffer was overwritten: nothing may still alias the last tensor
                    assert previous.untyped_storage().data_ptr() == view.untyped_storage().data_ptr()
                previous = view
                self.pointer = view.untyped_storage().data_ptr()
                yield name, view

    monkeypatch.setattr(stream, "TensorStream", Watched)
    folder = _copy(tmp_path, "transformer")
    assert not _mapped(weight_files(folder)[0])
    module = load_streamed("diffusers", "SD3Transformer2DModel", folder, dtype=torch.float32, device=None)
    assert len(streams) == 1 and streams[0].allocations == 1
    assert streams[0]._buffer is None  # released after the load
    pointers = {p.untyped_storage().data_ptr() for p in module.parameters()}
    assert len(pointers) == len(list(module.parameters()))  # every weight is its own copy...
    assert streams[0].pointer not in pointers  # ...and none aliases the buffer


def test_diffusers_buffers_are_not_built_on_the_host() -> None:
    """Regression (run 17's host gap): SD3's PatchEmbed builds pos_embed (1 x max_size^2 x hidden) in float64 on
    the CPU in its constructor, 1.3 GiB transient for Large, 3.4 GiB for Medium; the meta module has it on meta
    (read from the file like a weight), and the load still equals from_pretrained's."""
    from sd35hub.models.stream import _meta_module

    folder = tiny_model_path() / "transformer"
    module = _meta_module("diffusers", "SD3Transformer2DModel", folder)
    buffers = dict(module.named_buffers())
    assert "pos_embed.pos_embed" in buffers
    assert {b.device.type for b in buffers.values()} == {"meta"}
    assert "pos_embed.pos_embed" in module.state_dict()  # persistent: the file has it


def test_a_buffer_absent_from_the_file_is_built_as_the_constructor_builds_it(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(tmp_path, "transformer")
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    del tensors["pos_embed.pos_embed"]
    save_file(tensors, str(path))
    streamed = load_streamed("diffusers", "SD3Transformer2DModel", folder, dtype=torch.float32, device=None)
    fresh = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(folder))
    assert streamed.pos_embed.pos_embed.device.type == "cpu"
    assert torch.equal(streamed.pos_embed.pos_embed, fresh.pos_embed.pos_embed)


def _reader_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "sd35hub-tensor-reader"]


def test_pipelined_stream_reads_ahead_without_touching_the_tensor_in_hand(tmp_path) -> None:
    """The read-ahead stream yields what the plain stream yields, through two buffers that alternate; the
    reader fills the other buffer meanwhile, never the one the caller holds (its bytes stay put while the
    caller is slow), and the thread is gone once the stream is done."""
    import time

    t5 = T5EncoderModel.from_pretrained(tiny_model_path(), subfolder="text_encoder_3")
    t5.save_pretrained(tmp_path / "t5", max_shard_size="20KB")  # several shards: the reader crosses files
    files = weight_files(tmp_path / "t5")
    plain = {name: view.clone() for name, view in TensorStream(files)}
    stream = TensorStream(files)
    seen, pointers = {}, []
    for name, view in stream.pipelined():
        held = view.clone()
        time.sleep(0.002)  # the reader runs ahead into the other buffer meanwhile
        assert torch.equal(view, held), name  # ...and not into this one
        seen[name] = held
        pointers.append(view.untyped_storage().data_ptr())
    assert list(seen) == list(plain)
    assert all(torch.equal(seen[k], plain[k]) for k in plain)
    assert stream.allocations == 2 and len(set(pointers)) == 2
    assert all(a != b for a, b in zip(pointers, pointers[1:], strict=False))  # they alternate
    assert not _reader_threads()


def test_pipelined_stream_stops_its_reader_and_reports_a_file_cut_short(tmp_path) -> None:
    folder = _copy(tmp_path, "text_encoder")
    files = weight_files(folder)
    stream = TensorStream(files)
    for _ in stream.pipelined():
        break  # the caller stops early (an error while loading, say): the reader is stopped, not left behind
    assert not _reader_threads()
    stream = TensorStream(files)  # the headers are read; then the file is cut (a download still being written)
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match="file is truncated; re-download"):
        for _ in stream.pipelined():
            pass
    assert not _reader_threads()


@pytest.mark.parametrize("library,cls,name", COMPONENTS[:1] + COMPONENTS[4:], ids=["transformer", "text_encoder_3"])
def test_pipelined_load_equals_the_sequential_load(library, cls, name) -> None:
    """Onto a GPU without quantizing, load_streamed reads ahead (page-locked buffers there); on the CPU the same
    path, asked for, gives exactly the weights of the one-buffer path."""
    folder = tiny_model_path() / name
    sequential = load_streamed(library, cls.__name__, folder, dtype=torch.bfloat16, device=None, pipelined=False)
    ahead = load_streamed(library, cls.__name__, folder, dtype=torch.bfloat16, device=None, pipelined=True)
    _assert_same_state(sequential, ahead)
    assert not _reader_threads()


def test_sequential_is_the_stream_without_read_ahead_not_mmap(monkeypatch) -> None:
    from sd35hub.models.stream import loader_mode, use_streaming

    for value, mode, streaming in [("", "stream", True), ("sequential", "sequential", True), (" MMAP ", "mmap", False)]:
        monkeypatch.setenv("SD35HUB_LOADER", value)
        assert (loader_mode(), use_streaming()) == (mode, streaming), value
