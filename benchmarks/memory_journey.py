"""The 16 GB Colab journey, measured: `sd35hub train` end to end with REAL-SIZE random text encoders
under a GPU allocator cap, recording peak GPU memory per phase and the peak host RSS of the process.

    python benchmarks/memory_journey.py build  --root /tmp/mj                 # random models + data, once
    python benchmarks/memory_journey.py run    --root /tmp/mj --model large --cap 14.7 --resolution 1024 \\
                                               --profile t4 --out benchmarks/results/memory_journey
    python benchmarks/memory_journey.py matrix --root /tmp/mj --out benchmarks/results/memory_journey
    python benchmarks/memory_journey.py matrix --root /tmp/mj --out OUT --loader mmap   # the libraries' mmap loading
    python benchmarks/memory_journey.py check  --out OUT      # GPU: streamed NF4/int8/bf16 == from_pretrained, tiny

The trainer loads every component with sd35hub.models.stream (tensor by tensor, one reusable host
buffer, no mmap) unless --loader mmap (SD35HUB_LOADER=mmap) asks for from_pretrained; each row records
which, and its plan's inputs carry the loader the plan predicted for.

build: CLIP-L 12x768, CLIP-G 32x1280 (with projections), T5-XXL encoder (24 x 4096, d_ff 10240, 64 heads,
gated-gelu) and the real VAE config, random-initialised in bf16 on the GPU and saved once as safetensors
(T5 in 5 GB shards like the Hub repo), shared by symlinks between a full-size random SD3.5 Medium and
Large transformer folder (10 GB shards); the tiny model's tokenizers. A 28-image dataset (1024 px, long
captions). Needs diffusers, transformers, safetensors; bitsandbytes for the t4/l4 profiles' NF4 base.
run: one `python -m sd35hub train` subprocess with SD35HUB_GPU_MEMORY_CAP_GIB=cap (the trainer caps
torch's allocator with set_per_process_memory_fraction) and SD35HUB_HOST_MEMORY_GIB (the plan's RAM
budget = the target); this process samples the child's /proc/PID/status (VmRSS, RssAnon, RssFile) every
50 ms. 20 optimizer steps (gradient accumulation 1, compile off to keep the matrix under 10 minutes:
both only lower the step count / warm-up, not the peak of a step), validation grid at start and end
(4 sampler steps), final samples, adapter. Every run writes OUT/<name>.json, also when it fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GIB = 2**30
# (name, profile, model, resolution, cap GiB, target peak GPU GiB, target peak host GiB): issue #14
MATRIX = [
    ("t4-large-1024", "t4", "large", 1024, 14.7, 14.5, 11.0),
    ("t4-large-768", "t4", "large", 768, 14.7, 14.5, 11.0),
    ("t4-medium-1024", "t4", "medium", 1024, 14.7, 14.5, 11.0),
    ("t4-medium-768", "t4", "medium", 768, 14.7, 14.5, 11.0),
    ("l4-large-1024", "l4", "large", 1024, 22.5, 22.0, 11.0),
    ("a100-large-1024", "a100-40", "large", 1024, 38.0, 37.0, 16.0),
]
TARGET_HOST = {"t4": 11.0, "l4": 11.0, "a100-40": 16.0}
WORDS = ("a watercolor painting of a small red fox sitting in tall grass under a stormy violet sky, soft "
         "light, detailed fur, distant mountains, reflections in a quiet lake, cinematic composition").split()


def _tiny_config(name: str) -> dict:
    from sd35hub.models.tiny import tiny_model_path

    return json.loads((tiny_model_path() / name / "config.json").read_text())


def build_encoders(root: Path) -> Path:
    """CLIP-L, CLIP-G, T5-XXL at real size (random, bf16) + the tiny tokenizers, once."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sd35hub.models.real_configs import CLIP_G, CLIP_L, T5_XXL
    from sd35hub.models.tiny import tiny_model_path

    out = root / "encoders"
    if (out / "done").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tiny = tiny_model_path()
    for tok in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.copytree(tiny / tok, out / tok)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        for name, real in (("text_encoder", CLIP_L), ("text_encoder_2", CLIP_G)):
            ids = {k: _tiny_config(name)[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            config = CLIPTextConfig(**({k: v for k, v in real.items() if k not in ("architectures", "model_type")} | ids))
            t0 = time.perf_counter()
            with torch.device(device):
                model = CLIPTextModelWithProjection(config).to(torch.bfloat16)
            model.save_pretrained(out / name)
            print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params, {time.perf_counter() - t0:.1f} s", flush=True)
            del model
        ids = {k: _tiny_config("text_encoder_3")[k] for k in ("pad_token_id", "eos_token_id", "decoder_start_token_id")
               if k in _tiny_config("text_encoder_3")}  # fmt: skip
        config = T5Config(**{k: v for k, v in T5_XXL.items() if k not in ("architectures", "model_type")} | ids)
        t0 = time.perf_counter()
        with torch.device(device):
            model = T5EncoderModel(config).to(torch.bfloat16)
        model.save_pretrained(out / "text_encoder_3", max_shard_size="5GB")  # the Hub repo's 2 shards
        print(f"text_encoder_3: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params, {time.perf_counter() - t0:.1f} s", flush=True)
        del model
    finally:
        torch.set_default_dtype(previous)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    (out / "done").write_text("1")
    return out


def build_model(root: Path, variant: str) -> Path:
    """root/sd35-<variant>: a random full-size transformer + real-config VAE; encoders symlinked."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from sd35hub.models.real_configs import MODEL_INDEX, SCHEDULER, VAE, config_dicts

    folder = root / f"sd35-{variant}"
    if (folder / "model_index.json").is_file():
        return folder
    encoders = build_encoders(root)
    tmp = root / f"sd35-{variant}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        (tmp / name).symlink_to(encoders / name, target_is_directory=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        t0 = time.perf_counter()
        config = {k: v for k, v in config_dicts(variant)["transformer"].items() if k != "_class_name"}
        with torch.device(device):
            transformer = SD3Transformer2DModel(**config)
        transformer.save_pretrained(tmp / "transformer", max_shard_size="10GB")
        print(f"{variant} transformer: {sum(p.numel() for p in transformer.parameters()) / 1e9:.2f} B params, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
        del transformer
        vae = AutoencoderKL(**{k: v for k, v in VAE.items() if k != "_class_name"})
        vae.save_pretrained(tmp / "vae")
    finally:
        torch.set_default_dtype(previous)
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=1))
    (tmp / "random_full_size.json").write_text(json.dumps({"variant": variant, "text_encoders": "real-size random"}))
    tmp.rename(folder)
    return folder


def build_data(root: Path, n: int = 28) -> Path:
    import random

    from PIL import Image, ImageDraw

    folder = root / "data"
    if len(list(folder.glob("*.png"))) >= n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n):
        image = Image.new("RGB", (1024, 1024), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = rng.randrange(900), rng.randrange(900)
            draw.ellipse((x, y, x + rng.randrange(40, 300), y + rng.randrange(40, 300)),
                         fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))  # fmt: skip
        image.save(folder / f"{i:03d}.png")
        words = [rng.choice(WORDS) for _ in range(rng.randrange(20, 60))]
        (folder / f"{i:03d}.txt").write_text(f"nrt style, image {i}, " + " ".join(words))
    return folder


def _sample(pid: int, peaks: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as handle:
                for line in handle:
                    key, _, value = line.partition(":")
                    if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                        peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)
        except (OSError, ValueError):
            pass
        stop.wait(0.05)


def run_one(root: Path, out: Path, *, name: str, profile: str, model: str, resolution: int, cap: float,
            steps: int = 20, target_gpu: float | None = None, target_host: float | None = None,
            timeout: int = 420, extra: list[str] | None = None, model_dir: Path | None = None,
            loader: str = "stream") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"name": name, "profile": profile, "model": model, "resolution": resolution, "cap_gib": cap,
                    "steps": steps, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "ok": False,
                    "loader": loader}  # fmt: skip
    run_dir = out / "runs" / name
    try:
        folder = model_dir or build_model(root, model)
        data = build_data(root)
        shutil.rmtree(run_dir, ignore_errors=True)
        target_host = target_host if target_host is not None else TARGET_HOST.get(profile, 16.0)
        env = dict(os.environ, SD35HUB_GPU_MEMORY_CAP_GIB=str(cap), SD35HUB_HOST_MEMORY_GIB=str(target_host + 0.6),
                   SD35HUB_LOADER=loader,  # stream: sd35hub.models.stream (default); mmap: the libraries' from_pretrained
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false")
        command = [sys.executable, "-m", "sd35hub", "train", "--model", str(folder), "--dataset", str(data),
                   "--profile", profile, "--steps", str(steps), "--resolution", str(resolution), "-o", str(run_dir),
                   "hub.check_access=false", "train.validation_steps=4", "train.checkpoint_every=0",
                   "train.compile=false", "train.gradient_accumulation=1", "data.min_size=64", "data.holdout=2",
                   "train.log_every=5", *(extra or [])]  # fmt: skip
        report["command"] = " ".join(command)
        peaks: dict = {}
        stop = threading.Event()
        t0 = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
            sampler = threading.Thread(target=_sample, args=(child.pid, peaks, stop), daemon=True)
            sampler.start()
            try:
                report["rc"] = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                report["rc"] = "timeout"
                child.wait()
            finally:
                stop.set()
                sampler.join()
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        report["host_sampled"] = {k.lower() + "_peak_gib": round(v / GIB, 3) for k, v in peaks.items()}
        memory = run_dir / "memory.json"
        summary = run_dir / "summary.json"
        if memory.is_file():
            mem = json.loads(memory.read_text())
            report["phases"] = mem.get("phases")
            report["host_peak_gib"] = mem.get("host_peak_gib")  # VmHWM, every phase's segment: the process peak
            report["gpu_peak_reserved_gib"] = mem.get("gpu_peak_reserved_gib")
            report["plan"] = mem.get("plan")
        if summary.is_file():
            from sd35hub.run_summary import RunSummary

            s = RunSummary.read(run_dir)
            report.update(final_loss=s.final_loss, steps_done=s.steps, validation_images=len(s.validation_images))
        report["adapter_written"] = (run_dir / "adapter" / "pytorch_lora_weights.safetensors").is_file()
        report["grids"] = sorted(p.name for p in (run_dir / "samples").glob("step_*.png")) if (run_dir / "samples").is_dir() else []
        tail = (out / f"{name}.log").read_text(errors="replace").splitlines()[-25:]
        report["log_tail"] = tail
        host = report.get("host_peak_gib") or report["host_sampled"].get("vmrss_peak_gib")
        gpu = report.get("gpu_peak_reserved_gib")
        report["targets"] = {"gpu_gib": target_gpu, "host_gib": target_host,
                             "gpu_met": None if gpu is None or target_gpu is None else gpu <= target_gpu,
                             "host_met": None if host is None else host <= target_host}  # fmt: skip
        report["ok"] = report.get("rc") == 0 and report["adapter_written"]
    except Exception as exc:  # noqa: BLE001 - a benchmark row records its failure and the matrix goes on
        import traceback

        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()[-4000:]
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report.get(k) for k in ("name", "ok", "rc", "wall_s", "gpu_peak_reserved_gib", "host_peak_gib",
                                                 "targets", "error")}), flush=True)  # fmt: skip
    if not report["ok"]:
        print("\n".join(report.get("log_tail") or [report.get("traceback", "")]), flush=True)
    return report


def check_quantized(out: Path, device: str = "cuda", quantizations: tuple[str, ...] = ("none", "nf4", "int8")) -> dict:
    """On the GPU: the streaming loader's NF4 / int8 / bf16 loads of the tiny model's transformer and T5 against
    the libraries' from_pretrained (SD35HUB_LOADER=mmap), tensor by tensor (exact), into OUT/loader_check.json."""
    import torch

    from sd35hub.models.components import load_component
    from sd35hub.models.load import load_transformer

    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    for what in ("transformer", "text_encoder_3"):
        for quantize in quantizations:
            row: dict = {"component": what, "quantize": quantize}
            try:
                loaded = {}
                for loader in ("mmap", "stream"):
                    os.environ["SD35HUB_LOADER"] = loader
                    if what == "transformer":
                        module = load_transformer("tiny", dtype="bf16", quantize=quantize, device=device)
                    else:
                        module = load_component("tiny", what, dtype="bf16", quantize=quantize, device=device)
                    loaded[loader] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
                    row[f"{loader}_linear_types"] = sorted({type(m).__name__ for m in module.modules()
                                                            if "Linear" in type(m).__name__})  # fmt: skip
                    del module
                a, b = loaded["mmap"], loaded["stream"]
                row["same_keys"] = a.keys() == b.keys()
                row["unequal"] = [k for k in a if k in b and (a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]))][:10]
                row["ok"] = row["same_keys"] and not row["unequal"]
            except Exception as exc:  # noqa: BLE001 - recorded, the matrix still runs
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            finally:
                os.environ.pop("SD35HUB_LOADER", None)
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader_check.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("build", "run", "matrix", "check"))
    ap.add_argument("--root", type=Path, default=Path("/tmp/memory_journey"), help="random models + data (reused)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory_journey")
    ap.add_argument("--model", choices=("medium", "large"), default="large")
    ap.add_argument("--cap", type=float, default=14.7, help="GPU allocator cap in GiB (14.7 T4, 22.5 L4, 38 A100-40)")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--profile", default="t4")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--timeout", type=int, default=420, help="seconds per run")
    ap.add_argument("--only", default="", help="matrix: comma-separated row names")
    ap.add_argument("--model-dir", type=Path, default=None, help="run: use this model folder instead of building one")
    ap.add_argument("--loader", choices=("stream", "mmap"), default="stream",
                    help="weights loader of the trainer (SD35HUB_LOADER): stream (default) or mmap (from_pretrained)")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for sd35hub train")
    args = ap.parse_args()
    if args.action == "check":
        check_quantized(args.out)
        return
    if args.action == "build":
        for variant in ("large", "medium"):
            print(build_model(args.root, variant), flush=True)
        print(build_data(args.root))
        return
    if args.action == "run":
        name = f"{args.profile}-{args.model}-{args.resolution}-cap{args.cap:g}"
        run_one(args.root, args.out, name=name, profile=args.profile, model=args.model, resolution=args.resolution,
                cap=args.cap, steps=args.steps, timeout=args.timeout, extra=args.overrides, model_dir=args.model_dir,
                loader=args.loader)  # fmt: skip
        return
    wanted = args.only.split(",") if args.only else [r[0] for r in MATRIX]
    rows = sorted((r for r in MATRIX if r[0] in wanted), key=lambda r: wanted.index(r[0]))  # in --only's order
    matrix = args.out / "matrix.json"  # one line per row, merged over invocations (rows may run in several commands)
    for name, profile, model, resolution, cap, gpu, host in rows:
        r = run_one(args.root, args.out, name=name, profile=profile, model=model, resolution=resolution, cap=cap,
                    steps=args.steps, target_gpu=gpu, target_host=host, timeout=args.timeout, extra=args.overrides,
                    loader=args.loader)  # fmt: skip
        table = json.loads(matrix.read_text()) if matrix.is_file() else {}
        predicted = max((p["host_gib"] for p in (r.get("plan") or {}).get("phases", [])), default=None)
        table[r["name"]] = {**{k: r.get(k) for k in ("ok", "wall_s", "gpu_peak_reserved_gib", "host_peak_gib", "targets",
                                                     "date", "error", "loader")},
                            "host_sampled": r.get("host_sampled"), "predicted_host_gib": predicted}  # fmt: skip
        matrix.write_text(json.dumps(table, indent=2))  # after every row: a cut-off call keeps the rows it ran


if __name__ == "__main__":
    main()
