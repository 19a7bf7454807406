"""Stream a model's safetensors weights to its device one tensor at a time, with bounded host memory.

    module = load_streamed("transformer", folder / "transformer", dtype=torch.bfloat16, device="cuda",
                           quantize="nf4")

diffusers' / transformers' ``from_pretrained`` map each safetensors shard into the process (mmap): every
page of the shard that has been read stays in the process's resident set until the shard is closed, so
loading SD3.5 Large's 10 GB transformer shard or T5-XXL's two shards shows 9-10 GiB of file-backed RSS
(run 16, docs/performance.md) even though the weights end up on the GPU. Here each tensor is read with
plain file reads (``readinto``, no mmap) into ONE reusable host buffer sized to the largest tensor, copied
to its device (and quantized there when asked), and the buffer is reused for the next tensor: the host
holds at most that buffer plus one converted copy of one tensor. Onto a GPU without quantizing, the next
tensor is read while this one is copied (two page-locked buffers, asynchronous copies: the same host bytes,
since the converted copy is then on the GPU). The page cache the reads go through is
the kernel's, not the process's: it is not in RSS and is reclaimed under pressure.

The model classes stay the libraries' own: the module is built on the meta device from its config
(accelerate's ``init_empty_weights``), bitsandbytes layers are put in by diffusers' own quantizer
(``DiffusersAutoQuantizer``: the same ``replace_with_bnb_linear`` / ``create_quantized_param`` calls its
``from_pretrained`` makes, also for the transformers text encoders), and tensors are set with diffusers'
``load_model_dict_into_meta`` (diffusers models) or accelerate's ``set_module_tensor_to_device``.
The file format is safetensors' documented one: an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then the data; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd35hub.errors import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    import torch

# "mmap": the libraries' from_pretrained; "sequential": the stream without read-ahead (both for comparisons)
LOADER_ENV = "SD35HUB_LOADER"
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
           "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}  # fmt: skip
_INDEXES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
_SINGLE = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def loader_mode() -> str:
    """SD35HUB_LOADER: "stream" (default), "sequential" (the stream without read-ahead) or "mmap"."""
    return os.environ.get(LOADER_ENV, "stream").strip().lower() or "stream"


def use_streaming() -> bool:
    """True unless SD35HUB_LOADER=mmap asks for the libraries' own (mmap) loading."""
    return loader_mode() != "mmap"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype code (BF16, F32, ...)
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> list[TensorEntry]:
    """The tensors of one safetensors file, in file order, with absolute offsets (checked against the size)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ModelLoadError(f"{path} is not a safetensors file (shorter than its 8-byte header length).")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER or 8 + length > size:
            raise ModelLoadError(f"{path} is not a valid safetensors file (header length {length}); re-download it.")
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ModelLoadError(f"{path}: unreadable safetensors header ({exc}); re-download it.") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: the safetensors header is not a JSON object; re-download it.")
    import torch

    entries = []
    base = 8 + length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            itemsize = getattr(torch, _DTYPES[code]).itemsize
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelLoadError(f"{path}: tensor {name!r} has an unsupported or malformed header entry ({exc}).") from exc
        numel = 1
        for d in shape:
            numel *= d
        if not (0 <= begin <= end and base + end <= size and end - begin == numel * itemsize):
            raise ModelLoadError(f"{path}: tensor {name!r} lies outside the file or has the wrong size: the file is "
                                 "truncated or corrupt; re-download it.")  # fmt: skip
        entries.append(TensorEntry(name, code, shape, base + int(begin), int(end - begin)))
    entries.sort(key=lambda e: e.start)
    return entries


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one component folder (the shards of its index, or its single file)."""
    for index in _INDEXES:
        path = folder / index
        if path.is_file():
            try:
                weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{path} is not a readable shard index ({exc}); re-download the model.") from exc
            names = list(dict.fromkeys(weight_map.values()))
            files = [folder / n for n in names]
            missing = [n for n, f in zip(names, files, strict=True) if Path(n).name != n or not f.is_file()]
            if missing:
                raise ModelLoadError(f"{folder}: the shard(s) {', '.join(missing)} listed in {index} are missing (or not plain file names); "
                                     "re-download the model.")  # fmt: skip
            return files
    for single in _SINGLE:
        if (folder / single).is_file():
            return [folder / single]
    raise ModelLoadError(f"{folder} has no safetensors weights (pickled .bin/.pt weights are never loaded): "
                         "re-download or re-save the model with save_pretrained.")  # fmt: skip


class TensorStream:
    """Read every tensor of ``files`` into one reusable host buffer, in file order.

    ``for name, view in stream:`` — ``view`` aliases the buffer and is only valid until the next step:
    copy it (to the device) before advancing. ``buffer_bytes`` is the largest tensor's size; the buffer
    is allocated once (``allocations`` counts it) and never while a tensor is being handed out."""

    def __init__(self, files: list[Path]) -> None:
        self.files = [Path(f) for f in files]
        self.entries = [(f, read_header(f)) for f in self.files]
        self.buffer_bytes = max((e.nbytes for _, es in self.entries for e in es), default=0)
        self.allocations = 0
        self._buffer: torch.Tensor | None = None

    @property
    def names(self) -> list[str]:
        return [e.name for _, es in self.entries for e in es]

    def _take(self) -> torch.Tensor:
        import torch

        if self._buffer is None:
            self._buffer = torch.empty(max(self.buffer_bytes, 1), dtype=torch.uint8)
            self.allocations += 1
        return self._buffer

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        buffer = self._take()
        memory = memoryview(buffer.numpy())
        for path, entry, handle in self._entries_open():
            self._read(path, entry, handle, memory)
            yield entry.name, _typed(buffer, entry)

    def _entries_open(self) -> Iterator[tuple[Path, TensorEntry, Any]]:
        for path, entries in self.entries:
            with open(path, "rb", buffering=0) as handle:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                for entry in entries:
                    yield path, entry, handle

    @staticmethod
    def _read(path: Path, entry: TensorEntry, handle: Any, memory: memoryview) -> None:
        target = memory[: entry.nbytes]
        handle.seek(entry.start)
        done = 0
        while done < entry.nbytes:
            got = handle.readinto(target[done:])
            if not got:
                raise ModelLoadError(f"{path} ended inside tensor {entry.name!r}: the file is truncated; "
                                     "re-download the model.")  # fmt: skip
            done += got

    def pipelined(self, *, pin: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """As ``for name, view in stream``, with the next tensor read while the caller copies this one out.

        A reader thread fills two buffers in turn (file reads release the GIL), so reading the file and
        copying to the device overlap instead of alternating. ``pin``: page-locked buffers, so the caller's
        ``view.to("cuda", non_blocking=True)`` is an asynchronous DMA; a buffer is read into again only once
        the copies the caller queued from it (on the current CUDA stream) are done. The same contract as
        iterating: copy ``view`` out before advancing. Host memory: two buffers (``allocations`` == 2)."""
        import queue
        import threading

        import torch

        buffers = [torch.empty(max(self.buffer_bytes, 1), dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.allocations += 2
        memories = [memoryview(b.numpy()) for b in buffers]
        free: queue.Queue[tuple[int, Any]] = queue.Queue()
        ready: queue.Queue[tuple[TensorEntry, int] | BaseException | None] = queue.Queue()
        for index in range(2):
            free.put((index, None))
        stop = threading.Event()

        def reader() -> None:
            try:
                for path, entry, handle in self._entries_open():
                    index, copied = free.get()
                    if stop.is_set():
                        return
                    if copied is not None:
                        copied.synchronize()  # the caller's copies out of this buffer have finished
                    self._read(path, entry, handle, memories[index])
                    ready.put((entry, index))
                ready.put(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
                ready.put(exc)

        thread = threading.Thread(target=reader, name="sd35hub-tensor-reader", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                entry, index = item
                yield entry.name, _typed(buffers[index], entry)
                copied = None
                if pin and torch.cuda.is_available():
                    copied = torch.cuda.Event()
                    copied.record()  # after the copies the caller queued from this buffer
                free.put((index, copied))
        finally:
            stop.set()
            free.put((0, None))  # wakes a reader waiting for a buffer; it sees stop and returns
            thread.join()
            if pin and torch.cuda.is_available():
                torch.cuda.current_stream().synchronize()  # nothing in flight reads the buffers once they go

    def release(self) -> None:
        self._buffer = None


def _typed(buffer: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    import torch

    return buffer[: entry.nbytes].view(getattr(torch, _DTYPES[entry.dtype])).view(entry.shape)


# ------------------------------------------------------------------------------------------ modules
def _meta_module(library: str, class_name: str, folder: Path, *, buffers_on_meta: bool | None = None) -> Any:
    """The module built on the meta device from its config. A diffusers model's buffers go to meta too
    (``buffers_on_meta``, default for diffusers): SD3's ``PatchEmbed`` computes its persistent ``pos_embed``
    (1 × pos_embed_max_size² × hidden) in float64 on the CPU in the constructor, a transient of ~16 bytes per
    element: 1.3 GiB for Large, 3.4 GiB for Medium (run 17's host gap, docs/performance.md); the file has the
    buffer, so it is streamed like a weight. transformers' buffers (CLIP's position ids) stay real and small."""
    import importlib

    from accelerate import init_empty_weights

    if buffers_on_meta is None:
        buffers_on_meta = library == "diffusers"
    cls = getattr(importlib.import_module(library), class_name)
    with init_empty_weights(include_buffers=buffers_on_meta):
        if library == "transformers":
            config = cls.config_class.from_pretrained(folder)
            return cls(config)
        return cls.from_config(cls.load_config(folder))


def _quantizer(quantize: str, dtype: torch.dtype) -> Any:
    if quantize == "none":
        return None
    from diffusers.quantizers import DiffusersAutoQuantizer

    from sd35hub.models.options import quantization_config

    quantizer = DiffusersAutoQuantizer.from_config(quantization_config(quantize, dtype), pre_quantized=False)
    quantizer.validate_environment(torch_dtype=dtype, device_map=None)
    return quantizer


def _keep_fp32(model: Any, library: str, dtype: torch.dtype) -> list[str]:
    import torch

    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if library == "transformers" and dtype != torch.float16:
        return []  # transformers keeps them in fp32 for fp16 loads only (sd35hub.workflows.sizes counts the same)
    return keep


def _build_absent_buffers(model: Any, library: str, class_name: str, folder: Path, target: torch.device) -> None:
    """Buffers left on meta (not in the files: a non-persistent one, or a checkpoint without ``pos_embed``) are
    built as the constructor builds them (only then is the host transient paid), as the libraries keep them."""
    absent = [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if not absent:
        return
    from accelerate.utils import set_module_tensor_to_device

    built = dict(_meta_module(library, class_name, folder, buffers_on_meta=False).named_buffers())
    for name in absent:
        set_module_tensor_to_device(model, name, target, value=built[name], clear_cache=False)


def load_streamed(library: str, class_name: str, folder: Path, *, dtype: torch.dtype, device: str | None,
                  quantize: str = "none", pipelined: bool | None = None) -> Any:
    """``class_name`` of ``library`` with the weights of ``folder`` streamed onto ``device`` (None: CPU).

    ``pipelined`` (default: onto a GPU without quantizing) reads the next tensor while this one is copied to
    the device, from page-locked buffers (:meth:`TensorStream.pipelined`); otherwise read, copy, read, ...
    through one buffer. Quantized loads stay sequential: bitsandbytes converts each tensor on the host, and
    the plan's host memory for them is one buffer plus one converted copy."""
    import torch

    target = torch.device(device or "cpu")
    model = _meta_module(library, class_name, folder)
    quantizer = _quantizer(quantize, dtype)
    keep = _keep_fp32(model, library, dtype)
    if quantizer is not None:  # _keep_in_fp32_modules (T5's wo) are never quantized, whatever the dtype
        skip = list(getattr(model, "_keep_in_fp32_modules", None) or [])
        quantizer.preprocess_model(model=model, device_map={"": str(target)}, keep_in_fp32_modules=skip)
    expected = dict(model.state_dict(keep_vars=True))
    stream = TensorStream(weight_files(folder))
    if pipelined is None:
        pipelined = target.type == "cuda" and quantizer is None and loader_mode() != "sequential"
    pin = pipelined and target.type == "cuda"
    loaded: set[str] = set()
    try:
        for name, view in stream.pipelined(pin=pin) if pipelined else stream:
            if name not in expected:
                continue  # e.g. a checkpoint's extra buffers; the libraries skip them too
            fp32 = any(k in name.split(".") for k in keep)
            want = torch.float32 if fp32 and view.is_floating_point() else (dtype if view.is_floating_point() else view.dtype)
            quantized = quantizer is not None and quantizer.check_if_quantized_param(
                model, view, name, {}, param_device=target)
            # one copy out of the buffer: bitsandbytes quantizes from the CPU copy as it moves it to the device
            stage = torch.device("cpu") if quantized else target
            value = view.to(device=stage, dtype=want, copy=True, non_blocking=pin)
            if tuple(value.shape) != tuple(expected[name].shape):
                raise ModelLoadError(f"{folder}: tensor {name!r} has shape {tuple(value.shape)}, the config says "
                                     f"{tuple(expected[name].shape)}: the weights do not match config.json.")  # fmt: skip
            if quantized:
                quantizer.create_quantized_param(model, value, name, target, {}, [], dtype=dtype)
            else:
                from accelerate.utils import set_module_tensor_to_device

                set_module_tensor_to_device(model, name, target, value=value, dtype=want, clear_cache=False)
            del value
            loaded.add(name)
    finally:
        stream.release()
    if library == "transformers":
        model.tie_weights()  # T5's encoder.embed_tokens is shared.weight
        model.config.dtype = dtype  # as from_pretrained records it
    _build_absent_buffers(model, library, class_name, folder, target)
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if missing:
        raise ModelLoadError(f"{folder}: {len(missing)} weight(s) are missing from the safetensors files (e.g. "
                             f"{missing[0]!r}): the model is incomplete; re-download it.")  # fmt: skip
    for buffer_name, buf in list(model.named_buffers()):  # non-persistent buffers built on the CPU
        if buf.device != target:
            from accelerate.utils import set_module_tensor_to_device

            set_module_tensor_to_device(model, buffer_name, target, value=buf, clear_cache=False)
    if quantizer is not None:
        quantizer.postprocess_model(model)
        if library == "diffusers":
            model.hf_quantizer = quantizer
    if library == "diffusers":
        extra = {"_pre_quantization_dtype": dtype} if quantizer is not None else {}
        model.register_to_config(_name_or_path=str(folder), **extra)
    model.eval()
    return model


def quantized_device(device: str | Any | None, quantize: str) -> str | None:
    """Where a load goes: ``device``; a bitsandbytes-quantized one needs CUDA (the current GPU when None)."""
    if quantize == "none" or device is not None:
        return None if device is None else str(device)
    import torch

    return f"cuda:{torch.cuda.current_device()}"
