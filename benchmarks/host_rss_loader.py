"""Host memory of loading one real-size component: the libraries' mmap loading vs sd35hub's streaming loader.

    python benchmarks/host_rss_loader.py build   --root /tmp/rss --component t5     # 9.5 GB random T5-XXL, 2 shards
    python benchmarks/host_rss_loader.py measure --root /tmp/rss --component t5 --loader stream --mode sink
    python benchmarks/host_rss_loader.py matrix  --root /tmp/rss --component t5 --out benchmarks/results/host_rss
    python benchmarks/host_rss_loader.py clean   --root /tmp/rss

build writes a random component at its real size (t5: the SD3.5 T5-XXL encoder, 4.76 B params bf16 in two
shards with an index like the Hub repo; clip-g: CLIP-G 32 x 1280) tensor by tensor, in safetensors'
documented format, so building never holds more than one tensor. Each measurement is a fresh subprocess
that samples its own /proc/self/status (VmRSS, RssAnon, RssFile) every 10 ms and reads VmHWM at the end:

  --mode module   the component loaded into CPU tensors (sd35hub.models.components.load_component, bf16),
                  with SD35HUB_LOADER=mmap (transformers' from_pretrained) or the streaming loader, then
                  every weight read once (as a forward would: from_pretrained's CPU tensors are lazily
                  mapped file pages). The weights are then host memory by definition (file-backed for
                  mmap, anonymous for stream): compare the overhead, peak minus (RSS before + the module).
  --mode sink     what a GPU load does to host memory, without a GPU: every tensor read once and folded
                  into a checksum, nothing kept. mmap: safetensors.safe_open of every shard, get_tensor of
                  every tensor, the shards kept open until the end, as from_pretrained does; stream: the
                  TensorStream (one reusable buffer, plain reads); whole: each shard read into memory at
                  once and parsed (what diffusers' from_pretrained(disable_mmap=True) does).

These are CPU host-RSS numbers of the loading mechanism; the GPU journey (benchmarks/memory_journey.py)
measures the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GIB = 2**30
SHARD_BYTES = 5 * 10**9  # the Hub T5 repo's shard size


def _folder(root: Path, component: str) -> Path:
    return root / component / ("text_encoder_3" if component == "t5" else "text_encoder_2")


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> int:
    """Random bf16 tensors written one at a time: header first (offsets from the shapes), then the data."""
    import torch

    header, offset = {}, 0
    for name, shape in tensors:
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for _name, shape in tensors:
            value = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
            handle.write(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
            del value
    return offset


def build(root: Path, component: str) -> Path:
    import torch
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sd35hub.models.real_configs import CLIP_G, T5_XXL

    folder = _folder(root, component)
    if (folder / "done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    real, config_cls, model_cls = ((T5_XXL, T5Config, T5EncoderModel) if component == "t5"
                                   else (CLIP_G, CLIPTextConfig, CLIPTextModelWithProjection))  # fmt: skip
    config = config_cls(**{k: v for k, v in real.items() if k not in ("architectures", "model_type")})
    config.architectures = [model_cls.__name__]
    config.save_pretrained(folder)
    with init_empty_weights():
        model = model_cls(config)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    tensors = [(k, tuple(v.shape)) for k, v in model.state_dict().items() if k not in tied and v.is_floating_point()]
    shards, current, size = [], [], 0
    for name, shape in tensors:
        n = 2 * int(torch.Size(shape).numel())
        if current and size + n > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    shards.append(current)
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        total += _write_safetensors(folder / name, shard, seed=i)
        weight_map.update({k: name for k, _ in shard})
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    # a model folder (model_index.json) so sd35hub.models.components.load_component reads it like a model
    (folder.parent / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (folder / "done").write_text("1")
    print(f"{folder}: {total / GIB:.2f} GiB in {len(shards)} file(s), {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _fold(view: object) -> float:
    """Touch every element (in 16 M-element pieces, so the checksum itself holds little memory)."""
    return float(sum(float(piece.float().sum()) for piece in view.reshape(-1).split(2**24)))  # type: ignore[attr-defined]


def measure(root: Path, component: str, loader: str, mode: str) -> dict:
    """Runs in the measuring subprocess (SD35HUB_LOADER already set by the parent)."""
    import torch

    folder = _folder(root, component)
    peaks: dict[str, int] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for k, v in _status().items():
                peaks[k] = max(peaks.get(k, 0), v)
            stop.wait(0.01)

    before = _status()
    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    module_bytes, checksum = 0, 0.0
    try:
        if mode == "module":
            from sd35hub.models.components import load_component
            from sd35hub.models.load import resolve_model  # noqa: F401 - the same import cost for both loaders

            name = folder.name
            module = load_component(str(folder.parent), name, dtype="bf16")
            module_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
            checksum = sum(_fold(p.detach()) for p in module.parameters())  # use every weight once (lazy mmap pages too)
            after_load = _status()
        else:
            from sd35hub.models.stream import TensorStream, weight_files

            files = weight_files(folder)
            if loader == "stream":
                for _, view in TensorStream(files):
                    checksum += _fold(view)
            elif loader == "whole":  # diffusers' from_pretrained(disable_mmap=True): each shard read whole
                from safetensors.torch import load as load_bytes

                for f in files:
                    data = f.read_bytes()
                    tensors = load_bytes(data)
                    for view in tensors.values():
                        checksum += _fold(view)
                    del data, tensors
            else:
                from safetensors import safe_open

                handles = [safe_open(str(f), framework="pt") for f in files]  # kept open, as a load does
                for handle in handles:
                    for key in handle.keys():
                        view = handle.get_tensor(key)
                        checksum += _fold(view)
                        del view
                del handles
            after_load = _status()
    finally:
        stop.set()
        sampler.join()
    end = _status()
    result = {"component": component, "loader": loader, "mode": mode, "seconds": round(time.perf_counter() - t0, 1),
              "rss_before_gib": round(before["VmRSS"] / GIB, 3), "vmhwm_gib": round(end["VmHWM"] / GIB, 3),
              "rssanon_peak_gib": round(peaks.get("RssAnon", 0) / GIB, 3),
              "rssfile_peak_gib": round(peaks.get("RssFile", 0) / GIB, 3),
              "rss_after_load_gib": round(after_load["VmRSS"] / GIB, 3),
              "module_gib": round(module_bytes / GIB, 3),
              "loader_overhead_gib": round((end["VmHWM"] - before["VmRSS"] - module_bytes) / GIB, 3),
              "torch": torch.__version__}  # fmt: skip
    return result


def _meminfo_available_gib() -> float:
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    return 0.0


def run_child(root: Path, component: str, loader: str, mode: str) -> dict:
    env = dict(os.environ, SD35HUB_LOADER="mmap" if loader == "whole" else loader, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, __file__, "child", "--root", str(root), "--component", component, "--loader", loader,
               "--mode", mode]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"component": component, "loader": loader, "mode": mode, "error": done.stderr[-2000:]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("build", "measure", "matrix", "clean", "child"))
    ap.add_argument("--root", type=Path, default=Path("/tmp/host_rss"))
    ap.add_argument("--component", choices=("t5", "clip-g"), default="t5")
    ap.add_argument("--loader", choices=("mmap", "stream", "whole"), default="stream")
    ap.add_argument("--loaders", default="mmap,stream", help="matrix: loaders to run (whole: sink mode only)")
    ap.add_argument("--mode", choices=("sink", "module"), default="sink")
    ap.add_argument("--modes", default="sink,module", help="matrix: modes to run")
    ap.add_argument("--min-free", type=float, default=0.0, help="matrix: skip a module run unless this much RAM is available")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "host_rss")
    args = ap.parse_args()
    if args.action == "build":
        build(args.root, args.component)
    elif args.action == "clean":
        shutil.rmtree(args.root / args.component, ignore_errors=True)
    elif args.action == "child":
        print(json.dumps(measure(args.root, args.component, args.loader, args.mode)), flush=True)
    elif args.action == "measure":
        print(json.dumps(run_child(args.root, args.component, args.loader, args.mode), indent=1))
    else:
        build(args.root, args.component)
        rows = []
        for mode in args.modes.split(","):
            for loader in args.loaders.split(","):
                if loader == "whole" and mode != "sink":
                    continue
                if mode == "module" and _meminfo_available_gib() < args.min_free:
                    rows.append({"component": args.component, "loader": loader, "mode": mode,
                                 "skipped": f"less than {args.min_free} GiB of RAM available"})
                    continue
                rows.append(run_child(args.root, args.component, loader, mode))
                print(json.dumps(rows[-1]), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": "CPU only (no GPU)",
                 "cores": os.cpu_count(), "rows": rows}
        (args.out / f"{args.component}.json").write_text(json.dumps(stamp, indent=1))


if __name__ == "__main__":
    main()
