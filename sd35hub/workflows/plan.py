"""The memory plan of a training run: every phase, its predicted peak GPU and host memory, and how
the run fits the card — computed from the component configs, the hardware profile and the data
settings before any weights are downloaded.

    plan = plan_for_config(config, profile)       # resolved config + HardwareProfile
    print(plan.table())                           # what `sd35hub train --dry-run` prints
    plan.check()                                  # MemoryPlanError (phase + settings that fit) if not

Phases, in the order the trainer runs them (sd35hub.train.recipe):

    encode images      the VAE alone on the device (slicing: one image at a time), latents to the cache
    encode captions    CLIP-L, then CLIP-G, then T5-XXL: each loaded straight onto the device, run over
                       every caption, the empty caption and the validation prompts, then freed before the
                       next is loaded; T5 in 8-bit / NF4 (bitsandbytes) or on the CPU when it would not fit
    load transformer   only once every encoder is gone; quantized while loading, straight to the device
    generate class     prior preservation only: the base alone renders the missing class images from the
    images             cached class-prompt embeddings, is freed, the class images are cached (VAE, then the
                       encoders one at a time, as above) and the base is loaded again
    train              frozen base + LoRA weights, gradients, optimizer state and activations
    validate           the quantized base with the LoRA, cached prompt embeddings, VAE decode (tiled
                       when the decode would not fit); the final samples are the last validation's images
    save / publish     the adapter (a few MB) and the run folder

The GPU figures predict PyTorch's reserved memory (what an allocator cap limits). The host figures
are the resident set of the process: a base for Python + torch + CUDA libraries (smaller while caching
than once training has imported and allocated its own), plus what a load adds, which depends on the loader
(``PlanInputs.loader``, sd35hub.models.stream):

    stream  (default) one reusable buffer of the component's largest tensor + one converted copy of it;
            the reads go through the kernel's page cache, which is not in the process's RSS
    mmap    (SD35HUB_LOADER=mmap: the libraries' from_pretrained) the mapped pages of the weights files,
            shown separately as "file" (reclaimable): every shard of a transformers text encoder (they
            stay mapped together: T5-XXL's 9.5 GB), the largest shard of a diffusers model

plus what a phase holds in anonymous memory. The constants below are fitted to run 16's measurements
(benchmarks/results/run16_memory_journey/, mmap loader); the weight sizes are exact counts from the configs.

Loading the transformer also builds the model from its config: diffusers' SD3 ``PatchEmbed`` computes its
``pos_embed`` buffer (pos_embed_max_size² x width: 90 M elements for Large, 226 M for Medium) in float64 on
the CPU, ~``CONSTRUCT_BYTES_PER_ELEMENT`` (16, measured on the CPU) bytes per element at its peak, 1.4 GiB
for Large and 3.4 GiB for Medium. The libraries' from_pretrained (mmap) pays it; the streaming loader builds
buffers on the meta device and reads pos_embed from the file (``PlanInputs.constructor_buffers`` None: as the
loader does; True: as the streaming loader did in run 17, before that fix). The transformer's load starts
from ``HOST_BASE_LOAD_GIB``: what the process holds once the encoders are freed (run 17: 1.6 GiB anonymous
at the end of the phase + ~0.6 GiB of mapped CUDA/bitsandbytes libraries), an empirical constant calibrated
on run 17 (benchmarks/results/run17_memory_journey/).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sd35hub.errors import MemoryPlanError
from sd35hub.workflows.sizes import ComponentSize

if TYPE_CHECKING:  # pragma: no cover
    from sd35hub.config import Config
    from sd35hub.hardware import HardwareProfile

GIB = 2**30
GPU_CAP_ENV = "SD35HUB_GPU_MEMORY_CAP_GIB"  # cap PyTorch's allocator (emulates a smaller card)
HOST_RAM_ENV = "SD35HUB_HOST_MEMORY_GIB"  # plan for this much system RAM (e.g. 12.7 for a free Colab)
CONTEXT_GIB = 0.6  # CUDA context + libraries outside the allocator (no cap set)
RESERVE_FACTOR, RESERVE_GIB = 1.08, 0.25  # reserved ~ allocated x 1.08 + workspaces
HOST_BASE_GIB = {"cuda": 2.5, "cpu": 1.0}  # python + torch + diffusers/transformers (+ CUDA libraries), training
HOST_BASE_ENCODE_GIB = {"cuda": 1.5, "cpu": 1.0}  # the same while caching (run 16: 1.6-1.9 with small files)
HOST_BASE_LOAD_GIB = {"cuda": 2.1, "cpu": 1.0}  # when the transformer loads, the encoders freed (run 17)
CONSTRUCT_BYTES_PER_ELEMENT = 16  # host peak of building SD3's pos_embed on the CPU (float64 intermediates)
OS_HOST_GIB = 0.6  # left to the OS and the notebook kernel
ACT_PER_BLOCK = 27  # activations of one MMDiT block, in units of tokens x width (measured: FACTS.md step table)
ACT_DUAL = 12  # extra for a block with a second attention (Medium)
VAE_ENCODE_ACT, VAE_DECODE_ACT, VAE_TILE = 5, 6, 512  # x first-block channels x pixels; tile side in px
OPTIMIZER_STATE = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}  # bytes per fp32 LoRA parameter
CLIP_TOKENS = 77
NOMINAL_CARD_GIB = {"t4": 15.0, "l4": 22.5, "a100-40": 39.5, "a100-80": 79.3, "h100": 79.3, "h200": 139.8}  # total_memory


@dataclass(frozen=True)
class PlanInputs:
    """Everything the plan depends on besides the component sizes."""

    device: str  # cuda | cpu
    gpu_budget_gib: float  # what the allocator may use (cap, or card memory less the context); 0 on CPU
    host_budget_gib: float  # system RAM less what the OS keeps
    dtype: str  # frozen weights: fp16 | bf16 | fp32
    quantize: str  # transformer: none | nf4 | int8
    text_encoder_quantize: str  # T5: auto | none | nf4 | int8
    drop_t5: bool
    resolution: int
    batch_size: int
    max_sequence_length: int
    rank: int
    lora_targets: str
    optimizer: str
    gradient_checkpointing: bool
    validation_prompts: int
    guidance: float
    holdout: int
    buffer_size: int
    has_bitsandbytes: bool
    gpu_name: str = ""
    # text-encoder LoRA (lora.text_encoders): the components kept on the device for the whole run, and their rank
    text_encoder_lora: tuple[str, ...] = ()
    text_encoder_rank: int = 0
    loader: str = "stream"  # stream | mmap (sd35hub.models.stream.use_streaming)
    class_images: int = 0  # prior preservation: class images the base renders before training (at most)
    constructor_buffers: bool | None = None  # the model's buffers built on the host (None: mmap yes, stream no)


@dataclass(frozen=True)
class Phase:
    name: str
    gpu_gib: float  # predicted peak reserved on the device (0 on CPU)
    host_gib: float  # predicted peak resident set of the process
    file_gib: float  # of host_gib: mapped weights-file pages (reclaimable)
    weights_bytes: int  # bytes of the model weights this phase holds (for tests against loaded modules)
    strategy: str
    fits: bool = True
    problem: str = ""  # why it does not fit


@dataclass
class MemoryPlan:
    inputs: PlanInputs
    phases: list[Phase]
    t5: str  # gpu | gpu-int8 | gpu-nf4 | cpu | dropped | none (no T5 in the model)
    vae_tiling: bool
    fixes: list[str] = field(default_factory=list)  # single settings that fit, when this plan does not

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.phases)

    @property
    def first_failure(self) -> Phase | None:
        return next((p for p in self.phases if not p.fits), None)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def table(self) -> str:
        i = self.inputs
        card = f"GPU budget {i.gpu_budget_gib:.1f} GiB{f' ({i.gpu_name})' if i.gpu_name else ''}" if i.device == "cuda" else "no GPU (CPU)"
        rows = [f"memory plan: {card}, host RAM budget {i.host_budget_gib:.1f} GiB, {i.resolution} px, batch {i.batch_size}",
                f"{'phase':<32} {'GPU GiB':>8} {'host GiB':>9} {'(file)':>7}  fits  strategy"]  # fmt: skip
        for p in self.phases:
            gpu = f"{p.gpu_gib:8.2f}" if i.device == "cuda" else f"{'-':>8}"
            rows.append(f"{p.name:<32} {gpu} {p.host_gib:9.2f} {p.file_gib:7.2f}  {'yes ' if p.fits else 'NO  '}  {p.strategy}")
        failure = self.first_failure
        if failure is not None:
            rows.append(f"does not fit: {failure.name}: {failure.problem}")
            if self.fixes:
                rows.append("settings that would fit: " + "; ".join(self.fixes))
        return "\n".join(rows)

    def check(self) -> MemoryPlan:
        """Raise MemoryPlanError naming the first phase that does not fit and the settings that would."""
        failure = self.first_failure
        if failure is None:
            return self
        fixes = self.fixes or ["a larger GPU"]
        raise MemoryPlanError(
            f"This run would run out of memory in the phase '{failure.name}': {failure.problem}. Settings that "
            f"would fit: {'; '.join(fixes)}. (Checked before downloading any weights; `sd35hub train --dry-run` "
            "prints the whole plan.)",
            phase=failure.name, fixes=fixes,
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {"fits": self.fits, "t5": self.t5, "vae_tiling": self.vae_tiling, "fixes": self.fixes,
                "inputs": dataclasses.asdict(self.inputs),
                "phases": [dataclasses.asdict(p) for p in self.phases]}  # fmt: skip


# ------------------------------------------------------------------------------------- estimates
def _gib(n: float) -> float:
    return n / GIB


def _reserved(allocated_bytes: float) -> float:
    return _gib(allocated_bytes) * RESERVE_FACTOR + RESERVE_GIB


def _text_activations(size: ComponentSize, batch: int, tokens: int, act_bytes: int) -> float:
    return batch * tokens * (4 * size.width + 2 * size.ffn) * act_bytes + size.width * size.ffn * 2


def _lora_params(t: ComponentSize, rank: int, targets: str) -> int:
    d = t.width
    per_block = 8 * 2 * d * rank  # joint attention: to_q/k/v/out + add_q/k/v/to_add_out
    if targets in ("attention+ff", "all-linear"):
        per_block += 2 * 2 * (d + 4 * d) * rank  # ff and ff_context, two linears each
    if targets == "all-linear":
        per_block += 2 * (d + 6 * d) * rank  # the two adaLN modulations
    return per_block * t.layers + 4 * 2 * d * rank * t.dual_layers


def _train_tokens(i: PlanInputs) -> int:
    image = (i.resolution // 16) ** 2  # 8x VAE, patch 2
    text = CLIP_TOKENS + (i.max_sequence_length if not i.drop_t5 else CLIP_TOKENS)
    return image + text


def _t5_options(i: PlanInputs) -> list[str]:
    if i.text_encoder_quantize in ("nf4", "int8"):
        return [f"gpu-{i.text_encoder_quantize}"] if i.device == "cuda" else ["cpu"]
    if i.device != "cuda":
        return ["cpu"]
    if i.text_encoder_quantize == "none":
        return ["gpu"]
    quantized = ["gpu-int8", "gpu-nf4"] if i.has_bitsandbytes else []
    return ["gpu", *quantized, "cpu"]


def plan_memory(sizes: dict[str, ComponentSize], i: PlanInputs) -> MemoryPlan:
    """The plan for these component sizes and inputs (pure arithmetic; see the module docstring)."""
    plan = _plan(sizes, i)
    if not plan.fits:
        plan.fixes = suggest_fixes(sizes, i)
    return plan


def _load_host(size: ComponentSize, i: PlanInputs, library: str) -> tuple[float, float]:
    """(anonymous, file-backed) host bytes a load of ``size`` adds while it runs, for the plan's loader."""
    built = i.loader == "mmap" if i.constructor_buffers is None else i.constructor_buffers
    construct = float(size.buffers * CONSTRUCT_BYTES_PER_ELEMENT) if built and library == "diffusers" else 0.0
    if i.loader == "mmap":  # the constructor runs before the files are mapped: the larger of the two
        mapped = float(size.file_bytes or size.largest_file) if library == "transformers" else float(size.largest_file)
        return (construct, 0.0) if construct > mapped else (0.0, mapped)
    out_bytes = 4 if i.dtype == "fp32" else 2
    # the buffer + one converted copy (onto a GPU: two read-ahead buffers, the copy on the GPU; the same bytes)
    return max(construct, size.largest_tensor * (1 + out_bytes / 2)), 0.0


def _plan(sizes: dict[str, ComponentSize], i: PlanInputs) -> MemoryPlan:
    cuda = i.device == "cuda"
    act_bytes = 4 if i.dtype == "fp32" else 2
    phases: list[Phase] = []

    def add(name: str, gpu_alloc: float, host_anon: float, file_bytes: float, weights: int, strategy: str,
            host_weights: float = 0.0, load: tuple[float, float] = (0.0, 0.0)) -> Phase:
        gpu = _reserved(gpu_alloc) if cuda and gpu_alloc else 0.0
        file_gib = _gib(file_bytes + load[1])
        caching = name.startswith("encode ")
        bases = HOST_BASE_ENCODE_GIB if caching else HOST_BASE_LOAD_GIB if name == "load transformer" else HOST_BASE_GIB
        base = bases["cuda" if cuda else "cpu"]
        host = base + _gib(host_anon + host_weights + load[0]) + file_gib
        problems = []
        if cuda and gpu > i.gpu_budget_gib:
            problems.append(f"needs ~{gpu:.1f} GiB of GPU memory, the budget is {i.gpu_budget_gib:.1f} GiB")
        if host - file_gib > i.host_budget_gib:
            problems.append(f"needs ~{host - file_gib:.1f} GiB of system RAM, there are {i.host_budget_gib:.1f} GiB")
        phase = Phase(name, round(gpu, 2), round(host, 2), round(file_gib, 2), weights, strategy,
                      fits=not problems, problem="; ".join(problems))
        phases.append(phase)
        return phase

    # encode images: the VAE alone, one image at a time (slicing)
    vae = sizes["vae"]
    vae_w = vae.weight_bytes(i.dtype)
    encode_act = VAE_ENCODE_ACT * vae.width * i.resolution**2 * act_bytes
    buffer = i.buffer_size * i.resolution**2 * 3 + i.batch_size * 3 * i.resolution**2 * 4
    where = "on the GPU" if cuda else "on the CPU"
    add("encode images (VAE)", vae_w + encode_act, buffer + (0 if cuda else vae_w + encode_act), 0,
        vae_w, f"VAE alone {where}, slicing (one image at a time); latents to the cache",
        load=_load_host(vae, i, "diffusers"))

    # encode captions: one encoder at a time, each freed before the next
    texts = f"captions + '' + {i.validation_prompts} validation prompt(s)"
    for name in ("text_encoder", "text_encoder_2"):
        if name not in sizes:
            continue
        enc = sizes[name]
        w = enc.weight_bytes(i.dtype)
        act = _text_activations(enc, i.batch_size, CLIP_TOKENS, act_bytes)
        add(f"encode captions ({enc.label})", w + act, 0 if cuda else w + act, 0, w,
            f"{enc.label} alone, loaded straight {'onto the GPU' if cuda else 'on the CPU'}, freed after ({texts})",
            load=_load_host(enc, i, "transformers"))
    t5_mode = "none"
    if "text_encoder_3" in sizes and i.drop_t5:
        t5_mode = "dropped"
        add("encode captions (T5-XXL)", 0, 0, 0, 0, "dropped (model.drop_t5=true): zero T5 embeddings")
    elif "text_encoder_3" in sizes:
        t5 = sizes["text_encoder_3"]
        options = _t5_options(i)
        for t5_mode in options:
            quant = t5_mode.split("-")[1] if "-" in t5_mode else "none"
            on_cpu = t5_mode == "cpu"
            w = t5.weight_bytes("bf16" if on_cpu and cuda else i.dtype, quant)  # CPU fallback: bf16
            act = _text_activations(t5, i.batch_size, i.max_sequence_length, act_bytes)
            how = {"gpu": "on the GPU", "gpu-int8": "8-bit (bitsandbytes) on the GPU",
                   "gpu-nf4": "NF4 (bitsandbytes) on the GPU", "cpu": "on the CPU (slow: minutes per 100 captions)"}[t5_mode]  # fmt: skip
            phase = add("encode captions (T5-XXL)", 0 if on_cpu else w + act, w + act if on_cpu else 0, 0,
                        w, f"T5-XXL alone, {how}, freed after ({texts})", load=_load_host(t5, i, "transformers"))
            if phase.fits or t5_mode == options[-1]:
                break
            phases.pop()

    # the transformer, after every encoder is gone
    t = sizes["transformer"]
    t_w = t.weight_bytes(i.dtype, i.quantize)
    qname = {"none": "", "nf4": " NF4 (quantized while loading)", "int8": " 8-bit (quantized while loading)"}[i.quantize]
    add("load transformer", t_w, 0 if cuda else t_w, 0, t_w,
        f"MMDiT{qname} straight {'onto the GPU' if cuda else 'to the CPU'}, only after the encoders are freed",
        load=_load_host(t, i, "diffusers"))

    cfg_batch = 2 if i.guidance > 1.0 else 1
    decode_full = VAE_DECODE_ACT * vae.width * i.resolution**2 * act_bytes
    if i.class_images:  # prior preservation: the base alone (no LoRA yet) + the VAE, cached class-prompt embeddings
        held = t_w + vae_w
        gen_tiling = cuda and _reserved(held + decode_full) > i.gpu_budget_gib
        gen_decode = VAE_DECODE_ACT * vae.width * min(i.resolution, VAE_TILE) ** 2 * act_bytes if gen_tiling else decode_full
        add("generate class images", held + max(cfg_batch * _train_tokens(i) * t.width * act_bytes * 12, gen_decode),
            0 if cuda else held, 0, held,
            f"{i.class_images} class image(s): the base{qname} with the class prompt's cached embeddings (no encoder), "
            "then freed; the class images are cached with the encoders one at a time (as above) and the base is "
            "loaded again")  # fmt: skip

    lora = _lora_params(t, i.rank, i.lora_targets)
    lora_bytes = lora * (4 + 4 + OPTIMIZER_STATE.get(i.optimizer, 8))
    tokens = _train_tokens(i)
    unit = i.batch_size * tokens * t.width * act_bytes
    if i.gradient_checkpointing:
        act = unit * (2 * t.layers + ACT_PER_BLOCK + ACT_DUAL)
    else:
        act = unit * (ACT_PER_BLOCK * t.layers + ACT_DUAL * t.dual_layers)
    # text-encoder LoRA: those encoders stay on the device (unquantized), with their LoRA, its optimizer state and
    # every layer's activations for the backward pass (sd35hub.train.live_text)
    kept = [sizes[c] for c in i.text_encoder_lora if c in sizes]
    kept_w = sum(enc.weight_bytes(i.dtype) for enc in kept)
    te_lora = sum(4 * 2 * enc.width * i.text_encoder_rank * enc.layers for enc in kept)  # q/k/v/out (T5: q/k/v/o)
    te_act = sum(enc.layers * _text_activations(enc, i.batch_size, i.max_sequence_length if enc.name == "text_encoder_3"
                                                else CLIP_TOKENS, act_bytes) for enc in kept)
    te_train = kept_w + te_lora * (4 + 4 + OPTIMIZER_STATE.get(i.optimizer, 8)) + te_act
    te_note = f"; {', '.join(enc.label for enc in kept)} + LoRA r{i.text_encoder_rank} kept, run every step" if kept else ""
    train_alloc = t_w + lora_bytes + act + te_train
    add("train", train_alloc, 0 if cuda else train_alloc, 0, t_w + kept_w,
        f"LoRA r{i.rank} ({lora / 1e6:.1f} M params, {i.optimizer}), checkpointing "
        f"{'on' if i.gradient_checkpointing else 'off'}; latents and embeddings from the cache{te_note}")

    # validation: base + LoRA, cached embeddings, then the VAE decode
    heldout_chunk = min(8, max(i.holdout, 1) * 5)
    infer_act = max(cfg_batch, heldout_chunk) * tokens * t.width * act_bytes * 12
    held = t_w + lora * 4 + vae_w + kept_w + te_lora * 4
    tiling = cuda and _reserved(held + decode_full) > i.gpu_budget_gib
    decode = VAE_DECODE_ACT * vae.width * min(i.resolution, VAE_TILE) ** 2 * act_bytes if tiling else decode_full
    val_alloc = held + max(infer_act, decode)
    for name in ("validate", "final samples"):
        strategy = ("quantized base + LoRA, prompt embeddings cached up front (no encoder reloads), VAE decode "
                    + ("tiled" if tiling else "whole")) if name == "validate" else "the last validation's images"  # fmt: skip
        add(name, val_alloc, 0 if cuda else val_alloc, 0, t_w + vae_w + kept_w, strategy)
    add("save / publish", t_w + lora * 4, lora * 4, 0, t_w, "adapter (safetensors) + run folder; upload when hub.push_to_hub")
    return MemoryPlan(i, phases, t5_mode, tiling)


def suggest_fixes(sizes: dict[str, ComponentSize], i: PlanInputs) -> list[str]:
    """Setting changes (most prompt fidelity / speed kept first) under which the plan fits: single ones,
    else pairs (when two phases do not fit). Changes that need bitsandbytes say so when it is missing."""
    import itertools

    candidates: list[tuple[str, dict[str, Any]]] = []
    if i.device == "cuda":
        bnb = {"has_bitsandbytes": True}
        if i.text_encoder_quantize != "auto":
            candidates.append(("model.text_encoder_quantize=auto", {"text_encoder_quantize": "auto"}))
        candidates += [("model.text_encoder_quantize=int8", {"text_encoder_quantize": "int8", **bnb}),
                       ("model.text_encoder_quantize=nf4", {"text_encoder_quantize": "nf4", **bnb})]  # fmt: skip
        if i.quantize == "none":
            candidates.append(("model.quantize=nf4", {"quantize": "nf4", **bnb}))
    if not i.gradient_checkpointing:
        candidates.append(("train.gradient_checkpointing=true", {"gradient_checkpointing": True}))
    if i.batch_size > 1:
        candidates.append(("train.batch_size=1", {"batch_size": 1}))
    candidates += [(f"data.resolution={r}", {"resolution": r}) for r in (768, 512) if r < i.resolution]
    if "text_encoder_3" in sizes and not i.drop_t5:
        candidates.append(("model.drop_t5=true", {"drop_t5": True}))

    def label(text: str, change: dict[str, Any]) -> str:
        needs = change.get("has_bitsandbytes") and not i.has_bitsandbytes
        return text + (" (needs bitsandbytes: pip install 'sd35hub[quant]')" if needs else "")

    fits = [label(text, change) for text, change in candidates if _plan(sizes, dataclasses.replace(i, **change)).fits]
    if not fits:  # two phases may fail at once: pairs of changes
        for (a, ca), (b, cb) in itertools.combinations(candidates, 2):
            if (set(ca) & set(cb)) - {"has_bitsandbytes"}:
                continue  # two values of one setting
            change = {**ca, **cb}
            if _plan(sizes, dataclasses.replace(i, **change)).fits:
                fits.append(label(f"{a} together with {b}", change))
            if len(fits) == 4:
                break
    if not fits and sizes["transformer"].layers > 24:
        fits.append("model.name=stabilityai/stable-diffusion-3.5-medium (with the settings above)")
    return fits


# ------------------------------------------------------------------------------- from a config
def gpu_cap_gib() -> float | None:
    """The allocator cap asked for with SD35HUB_GPU_MEMORY_CAP_GIB (None: no cap)."""
    raw = os.environ.get(GPU_CAP_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        from sd35hub.errors import ConfigError

        raise ConfigError(f"{GPU_CAP_ENV}={raw!r} is not a number of GiB (e.g. 14.7)") from None
    return value if value > 0 else None


def apply_gpu_cap(device: Any = None) -> float | None:
    """Cap PyTorch's CUDA allocator at SD35HUB_GPU_MEMORY_CAP_GIB (emulates a smaller card); the cap or None."""
    cap = gpu_cap_gib()
    if cap is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.device(device or "cuda").index or 0
    total = torch.cuda.get_device_properties(index).total_memory / GIB
    torch.cuda.set_per_process_memory_fraction(min(cap / total, 1.0), index)
    return cap


def host_ram_gib() -> float:
    """System RAM (SD35HUB_HOST_MEMORY_GIB overrides: plan for a free Colab's 12.7 GB on a big machine)."""
    raw = os.environ.get(HOST_RAM_ENV, "").strip()
    if raw:
        try:
            return float(raw)
        except ValueError:
            pass
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    try:
        import psutil

        return psutil.virtual_memory().total / GIB
    except ImportError:  # pragma: no cover
        return 64.0


def _class_images(cfg: Config) -> int:
    """Class images prior preservation may render: data.num_class_images less those data.class_data holds."""
    from pathlib import Path

    from sd35hub.data.images import IMAGE_EXTENSIONS

    if not cfg.data.class_prompt.strip():
        return 0
    folder = Path(cfg.data.class_data).expanduser() if cfg.data.class_data else None
    have = sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if folder and folder.is_dir() else 0
    return max(cfg.data.num_class_images - have, 0)


def _loader() -> str:
    from sd35hub.models.stream import use_streaming

    return "stream" if use_streaming() else "mmap"


def inputs_from_config(cfg: Config, profile: HardwareProfile, *, validation_prompts: int | None = None) -> PlanInputs:
    """PlanInputs of a config on this profile; what the config left open (None / "auto") is the profile's
    (sd35hub.hardware.apply_profile: a no-op on a config the profile already resolved)."""
    from sd35hub.hardware import apply_profile

    cfg, _ = apply_profile(cfg, profile)
    cuda = profile.name != "cpu"
    card = profile.vram_gib or NOMINAL_CARD_GIB.get(profile.name, 0.0)  # planning for a card not present here
    cap = gpu_cap_gib()
    budget = (min(cap, card) if cap is not None else max(card - CONTEXT_GIB, 0.0)) if cuda else 0.0
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else profile.weight_dtype
    t = cfg.train
    return PlanInputs(
        device="cuda" if cuda else "cpu", gpu_budget_gib=round(budget, 2),
        host_budget_gib=round(max(host_ram_gib() - OS_HOST_GIB, 0.5), 2),
        dtype={"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype), quantize=cfg.model.quantize,
        text_encoder_quantize=cfg.model.text_encoder_quantize, drop_t5=cfg.model.drop_t5,
        resolution=cfg.data.resolution, batch_size=t.batch_size or profile.batch_size,
        max_sequence_length=cfg.data.max_sequence_length, rank=cfg.lora.rank, lora_targets=cfg.lora.targets,
        optimizer=t.optimizer, gradient_checkpointing=bool(t.gradient_checkpointing if t.gradient_checkpointing is not None
                                                           else profile.gradient_checkpointing),
        validation_prompts=validation_prompts if validation_prompts is not None else (len(t.validation_prompts) or 2),
        guidance=t.validation_guidance if t.validation_guidance is not None else 4.5, holdout=cfg.data.holdout if cfg.data.holdout is not None else 4, buffer_size=cfg.data.buffer_size,
        has_bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None, loader=_loader(),
        class_images=_class_images(cfg),
        gpu_name=profile.device_name if profile.vram_gib else f"a {profile.name} card: none here",
        # pivotal tuning (train.new_tokens) keeps its train.token_encoders live too: counted like a TE LoRA's
        text_encoder_lora=tuple(dict.fromkeys({"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}[n]
                                              for n in (*cfg.lora.text_encoders,
                                                        *(cfg.train.token_encoders if cfg.train.new_tokens else ())))),
        text_encoder_rank=cfg.lora.text_encoder_rank or cfg.lora.rank,
    )  # fmt: skip


def plan_for_config(cfg: Config, profile: HardwareProfile, *, validation_prompts: int | None = None) -> MemoryPlan:
    """The memory plan of a resolved config on this profile (fetches only the model's JSON files)."""
    from sd35hub.workflows.sizes import component_sizes

    sizes = component_sizes(cfg.model.name, cfg.model.revision)
    return plan_memory(sizes, inputs_from_config(cfg, profile, validation_prompts=validation_prompts))


@dataclass
class PlannedRun:
    """A run resolved before anything loads: config with the profile applied, and its memory plan."""

    config: Config  # profile applied
    profile: HardwareProfile
    notes: list[str]  # where each profile-filled setting came from
    variant: str
    plan: MemoryPlan

    def describe(self) -> str:
        return "\n".join([self.profile.describe(), *(f"  {n}" for n in self.notes), self.plan.table()])


def plan_run(cfg: Config, *, device_props: Any = None) -> PlannedRun:
    """Validate ``cfg``, pick the hardware profile from the model's configs, apply it (and the variant's
    preset), plan the memory. Fetches only JSON files; raises nothing about memory (call ``.plan.check()``)."""
    from sd35hub.hardware import apply_profile, detect_profile
    from sd35hub.models.load import model_info
    from sd35hub.models.presets import apply_variant_preset

    cfg = cfg.validate()
    info = model_info(cfg.model.name, cfg.model.revision)
    profile = detect_profile(cfg.train.profile, device_props, variant=info.variant)
    resolved, notes = apply_profile(cfg, profile)
    resolved, preset_notes = apply_variant_preset(resolved, info.variant)
    notes += preset_notes
    return PlannedRun(resolved, profile, notes, info.variant, plan_for_config(resolved, profile))
