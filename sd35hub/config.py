"""Typed, frozen configuration for a training run.

A config is five sections — ``model``, ``data``, ``lora``, ``train``, ``hub`` — each a frozen
dataclass whose fields carry their meaning in a comment. Configs come from YAML files and dotted
overrides (``train.learning_rate=5e-5``); every problem is collected and reported at once in a
:class:`~sd35hub.errors.ConfigError` that names the flag and the fix. Unknown keys are errors.

Example (``sd35hub train --config my.yaml train.max_steps=500``)::

    model: {name: stabilityai/stable-diffusion-3.5-medium}
    data: {source: lambdalabs/naruto-blip-captions, resolution: 1024, trigger_word: "nrt style"}
    lora: {rank: 16, targets: attention}
    train: {epochs: 10, learning_rate: 1.0e-4}
    hub: {push_to_hub: true, repo_id: me/naruto-sd35-lora}
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sd35hub.config_checks import field_problems, merge_problems, parse_yaml, read_config_text, show
from sd35hub.errors import ConfigError

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-large"
DEFAULT_DATASET = "lambdalabs/naruto-blip-captions"

DTYPES = ("auto", "bf16", "fp16", "fp32")
QUANTIZATION = ("none", "nf4", "int8")
ATTENTION = ("sdpa", "xformers")
CROPS = ("center", "random")
LORA_TARGET_PRESETS = ("attention", "attention+ff", "all-linear")
LORA_INITS = ("gaussian", "default", "pissa", "olora")
LORA_VARIANTS = ("lora", "dora", "lokr", "loha")
# Named lora.blocks for SD3.5 Large (38 blocks), after Stability's SD3.5 Large fine-tuning tutorial as quoted
# in diffusers' examples/dreambooth/README_sd3.md: blocks 12-24 shape composition / primary form, 30-37
# tertiary details ("speculative", their word); freezing the last layers helped photoreal data (docs/training.md)
LARGE_BLOCK_PRESETS = {
    "large-stability": "12-24,30-37",  # diffusers' --lora_blocks example of that guidance
    "large-composition": "12-24",
    "large-details": "30-37",
    "large-photoreal": "0-29",  # the detail layers 30-37 frozen
}
LARGE_BLOCKS = 38
TEXT_ENCODER_LORA = ("clip_l", "clip_g", "t5")  # lora.text_encoders: CLIP-L, CLIP-G, T5-XXL (docs/training.md)
TIMESTEP_SAMPLING = ("logit_normal", "mode", "cosmap", "uniform")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
PARTIAL_BATCHES = ("keep", "fill", "drop")
COMPILE_SHAPES = ("auto", "static", "dynamic")
PROFILES = ("auto", "cpu", "t4", "l4", "a100-40", "a100-80", "h100", "h200")

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def _choice(section: str, name: str, value: Any, allowed: tuple[str, ...]) -> list[str]:
    if value not in allowed:
        return [f"{section}.{name}={show(value)} is not one of {', '.join(allowed)}; pass {section}.{name}=<one of them>"]
    return []


def _positive(section: str, name: str, value: Any, allow_none: bool = False, zero_ok: bool = False) -> list[str]:
    if value is None and allow_none:
        return []
    if value is None or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        return [f"{section}.{name}={value!r} must be {bound}; pass e.g. {section}.{name}=1"]
    return []


def _fraction(section: str, name: str, value: float) -> list[str]:
    if not 0.0 <= value < 1.0:
        return [f"{section}.{name}={value!r} must be in [0, 1); e.g. {section}.{name}=0.1"]
    return []


@dataclass(frozen=True)
class ModelSpec:
    """Which base model to train on and how to hold it in memory."""

    name: str = DEFAULT_MODEL  # Hub id, local diffusers folder, or "tiny" (embedded offline model)
    revision: str | None = None  # Hub revision (branch, tag or commit)
    dtype: str = "auto"  # weights dtype of the frozen base: auto (from the hardware profile)|bf16|fp16|fp32
    quantize: str = "auto"  # frozen transformer: auto (the hardware profile) | none | nf4 | int8 (bitsandbytes, QLoRA)
    # T5-XXL while caching embeddings: auto (the memory plan picks none, int8, nf4 or the CPU to fit) | none | nf4 | int8
    text_encoder_quantize: str = "auto"
    attention: str = "sdpa"  # sdpa (PyTorch, default) | xformers (needs sd35hub[xformers])
    drop_t5: bool = False  # skip T5-XXL entirely (zero embeddings, saves ~9 GB; lower prompt fidelity)
    float8: bool = False  # FP8 matmuls for the frozen base layers (torchao; L4/H100 class GPUs)
    # the Hub repo a local model folder came from (card, adapter header); found from the folder when unset
    base_model_id: str | None = None

    def problems(self) -> list[str]:
        out: list[str] = []
        if self.base_model_id is not None and not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", self.base_model_id):
            out.append(f"model.base_model_id={self.base_model_id!r} must be a Hub id OWNER/NAME, e.g. "
                       "stabilityai/stable-diffusion-3.5-medium")
        if not self.name:
            out.append("model.name is empty; pass --model stabilityai/stable-diffusion-3.5-large (or tiny)")
        out += _choice("model", "dtype", self.dtype, DTYPES)
        out += _choice("model", "quantize", self.quantize, ("auto", *QUANTIZATION))
        out += _choice("model", "text_encoder_quantize", self.text_encoder_quantize, ("auto", *QUANTIZATION))
        out += _choice("model", "attention", self.attention, ATTENTION)
        if self.float8 and self.quantize not in ("none", "auto"):
            out.append(f"model.float8 and model.quantize={self.quantize} both replace the base layers; choose one "
                       "(float8 for speed on L4/H100, nf4/int8 for memory)")
        return out


@dataclass(frozen=True)
class DataSpec:
    """Where the images and captions come from and how they become training batches."""

    source: str = DEFAULT_DATASET  # Hub dataset id, local folder, *.parquet, *.tar (webdataset) or "sample"
    split: str = "train"  # dataset split to stream
    image_column: str | None = None  # override column auto-detection (image/img/png/jpg)
    caption_column: str | None = None  # override column auto-detection (text/caption/prompt/txt)
    # target side of the bucket set (512, 768, 1024 ...): buckets keep ~resolution² pixels; None: the hardware
    # profile (1024; 768 on a T4)
    resolution: int | None = None
    crop: str = "center"  # center|random crop after resizing to cover the bucket
    trigger_word: str = ""  # prepended to every caption, e.g. "nrt style"
    caption_dropout: float = 0.0  # probability of training on an empty caption (helps CFG)
    shuffle_tags: bool = False  # shuffle comma-separated tags, keeping the first keep_tags fixed
    keep_tags: int = 0  # leading tags kept in place when shuffling
    min_size: int = 256  # images with a shorter side below this (pixels) are skipped
    max_aspect: float = 4.0  # images with long/short side above this are skipped
    max_samples: int | None = None  # stop after this many usable samples (None = all)
    buffer_size: int = 64  # bounded bucket buffer, in samples
    holdout: int | None = None  # samples kept out of training for the validation loss; None: 0 below 50 samples, then 2%
    cache_dir: str | None = None  # latent + embedding cache (default: $SD35HUB_DATA_CACHE/<source>-<key>; docs/data.md)
    max_sequence_length: int = 77  # T5 tokens (SD3 default 77; up to 256 for long captions)
    # a bucket's last batch of an epoch when it has fewer than batch_size samples: fill it with other samples
    # of the same bucket (seen twice that epoch; every batch the same size), keep it smaller, or drop it
    partial_batches: str = "fill"
    # prior preservation (DreamBooth; docs/training.md): on when class_prompt is set
    class_prompt: str = ""  # the class without the trigger word, e.g. "a photo of a dog"
    class_data: str | None = None  # folder of class images; missing ones are generated (default: in the cache dir)
    num_class_images: int = 100  # class images used (generated up to this count with the base model)
    # masked loss (docs/training.md): per-image mask from <stem>.mask.png or the alpha channel weights the loss
    masked_loss: bool = False
    unmasked_weight: float = 0.0  # loss weight where the mask is black/transparent (0 = no gradient there)
    repeats: int = 1  # each training sample appears this many times per epoch (small subject datasets)
    random_flip: bool = False  # mirror each sample with probability 1/2 per epoch (both latents cached: exact)
    mask_t5_padding: bool = False  # zero the T5 embedding at padded positions (generate with --mask-t5-padding)

    def problems(self) -> list[str]:
        out: list[str] = []
        if not self.source:
            out.append("data.source is empty; pass --dataset with a Hub dataset id, a folder, or 'sample'")
        if self.resolution is not None and (self.resolution < 64 or self.resolution % 64):
            out.append(f"data.resolution={self.resolution} must be a multiple of 64 (e.g. 512, 768, 1024)")
        out += _choice("data", "crop", self.crop, CROPS)
        out += _fraction("data", "caption_dropout", self.caption_dropout)
        out += _positive("data", "keep_tags", self.keep_tags, zero_ok=True)
        out += _positive("data", "min_size", self.min_size, zero_ok=True)
        if self.max_aspect < 1.0:
            out.append(f"data.max_aspect={self.max_aspect} must be >= 1 (long side / short side)")
        out += _positive("data", "max_samples", self.max_samples, allow_none=True)
        out += _positive("data", "buffer_size", self.buffer_size)
        out += _positive("data", "holdout", self.holdout, zero_ok=True, allow_none=True)
        out += _choice("data", "partial_batches", self.partial_batches, PARTIAL_BATCHES)
        if not 1 <= self.max_sequence_length <= 512:
            out.append(f"data.max_sequence_length={self.max_sequence_length} must be in 1..512")
        out += self._prior_problems()
        out += _positive("data", "repeats", self.repeats)
        if not 0.0 <= self.unmasked_weight <= 1.0:
            out.append(f"data.unmasked_weight={self.unmasked_weight!r} must be in [0, 1] (0: masked-out pixels get "
                       "no gradient; 1: the mask has no effect)")
        return out

    def _prior_problems(self) -> list[str]:
        out = _positive("data", "num_class_images", self.num_class_images)
        if self.class_data and not self.class_prompt.strip():
            out.append("data.class_data is set but data.class_prompt is empty; prior preservation needs the class "
                       "prompt, e.g. data.class_prompt='a photo of a dog'")
        if self.class_data and Path(self.class_data).expanduser().is_file():
            out.append(f"data.class_data={self.class_data!r} is a file; pass a folder of class images (or leave it "
                       "unset to generate them)")
        trigger = self.trigger_word.strip().lower()
        if self.class_prompt.strip() and trigger and trigger in self.class_prompt.lower():
            out.append(f"data.class_prompt={self.class_prompt!r} contains the trigger word {self.trigger_word!r}; the "
                       "class prompt names the class alone (e.g. 'a photo of a dog'), the trigger word is the new subject")
        return out


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA adapter attached to the SD3 transformer."""

    rank: int | None = None  # r: adapter rank; None: the hardware profile (16 on every profile today)
    alpha: float | None = None  # scaling numerator; None = rank (scale 1.0)
    dropout: float = 0.0  # dropout on the LoRA branch
    # peft init_lora_weights: gaussian | default (kaiming) | pissa | olora (these two move the top singular
    # directions out of the frozen base into the adapter; saved as a rank-2r LoRA of the original base)
    init: str = "gaussian"
    targets: str = "attention"  # attention | attention+ff | all-linear | comma-separated module names
    blocks: str = "all"  # transformer blocks to adapt: "all", "0-11", "0-5,20-23", or a LARGE_BLOCK_PRESETS name
    # lora | dora (weight-decomposed, peft use_dora) | lokr (Kronecker) | loha (Hadamard); docs/training.md
    variant: str = "lora"
    rslora: bool = False  # rank-stabilised scale alpha/sqrt(r) (saved as a plain LoRA with alpha*sqrt(r))
    decompose_factor: int = -1  # lokr: factor of the Kronecker split (-1: closest to sqrt(dim))
    # text encoders that get a LoRA too (q/k/v/out_proj, as diffusers' SD3 script): clip_l, clip_g, t5 (off by default)
    text_encoders: tuple[str, ...] = ()
    text_encoder_rank: int | None = None  # None = rank
    text_encoder_alpha: float | None = None  # None = text_encoder_rank (scale 1.0)

    def problems(self) -> list[str]:
        out = _positive("lora", "rank", self.rank, allow_none=True)
        out += _positive("lora", "text_encoder_rank", self.text_encoder_rank, allow_none=True)
        out += _positive("lora", "text_encoder_alpha", self.text_encoder_alpha, allow_none=True)
        unknown = [name for name in self.text_encoders if name not in TEXT_ENCODER_LORA]
        if unknown:
            out.append(f"lora.text_encoders has {show(unknown)}; each must be one of {', '.join(TEXT_ENCODER_LORA)}, "
                       "given as a list: lora.text_encoders=[clip_l,clip_g]")
        if len(set(self.text_encoders)) != len(self.text_encoders):
            out.append(f"lora.text_encoders={list(self.text_encoders)!r} names an encoder twice; e.g. [clip_l, clip_g]")
        if self.text_encoders and self.variant != "lora":
            out.append(f"lora.text_encoders with lora.variant={self.variant}: text-encoder LoRA is built for variant lora "
                       "only (its file is a plain diffusers LoRA); use lora.variant=lora or lora.text_encoders=[]")
        out += _positive("lora", "alpha", self.alpha, allow_none=True)
        out += _fraction("lora", "dropout", self.dropout)
        out += _choice("lora", "init", self.init, LORA_INITS)
        out += _choice("lora", "variant", self.variant, LORA_VARIANTS)
        if self.variant in ("lokr", "loha") and (self.init in ("pissa", "olora") or self.rslora):
            out.append(f"lora.variant={self.variant} trains its own factors: lora.init={self.init!r}"
                       f"{' and lora.rslora' if self.rslora else ''} apply to variant lora/dora only; drop them")
        if self.variant in ("lokr", "loha") and self.dropout:
            out.append(f"lora.dropout applies to variant lora/dora; for {self.variant} set lora.dropout=0")
        if self.variant == "dora" and self.init in ("pissa", "olora"):
            out.append(f"lora.init={self.init} with lora.variant=dora is not supported by peft; use init gaussian")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            out.append(f"lora.decompose_factor={self.decompose_factor} must be -1 (automatic) or a positive factor")
        if not self.targets.strip():
            out.append("lora.targets is empty; use attention, attention+ff, all-linear or module names")
        if self.blocks != "all" and self.blocks not in LARGE_BLOCK_PRESETS and not re.fullmatch(
                r"\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*", self.blocks):
            out.append(f"lora.blocks={self.blocks!r} is not 'all', a range list like '0-11' or '0-5,20-23', "
                       f"or one of the SD3.5 Large presets {', '.join(LARGE_BLOCK_PRESETS)}")
        return out

    def block_indices(self, num_blocks: int) -> list[int]:
        """The selected transformer block indices for a model with ``num_blocks`` blocks."""
        if self.blocks == "all":
            return list(range(num_blocks))
        ranges = LARGE_BLOCK_PRESETS.get(self.blocks, self.blocks)
        if self.blocks in LARGE_BLOCK_PRESETS and num_blocks != LARGE_BLOCKS:
            raise ConfigError(f"lora.blocks={self.blocks} is a preset for SD3.5 Large / Large Turbo ({LARGE_BLOCKS} "
                              f"blocks) but the model has {num_blocks}; use a range list like '0-11' instead")
        chosen: set[int] = set()
        for part in ranges.split(","):
            lo, _, hi = part.strip().partition("-")
            chosen.update(range(int(lo), int(hi or lo) + 1))
        bad = sorted(i for i in chosen if i >= num_blocks)
        if bad:
            raise ConfigError(f"lora.blocks selects block(s) {bad} but the model has {num_blocks} (0-{num_blocks - 1})")
        return sorted(chosen)


@dataclass(frozen=True)
class TrainSpec:
    """The optimisation: objective, schedule, precision, checkpoints, validation, output."""

    output_dir: str = "output"  # adapter, card, grids, logs and checkpoints go here
    epochs: int = 10  # passes over the data (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int | None = None  # per device; None = from the hardware profile
    gradient_accumulation: int | None = None  # None = from the hardware profile
    learning_rate: float = 1e-4
    # auto (the hardware profile: adamw, adamw8bit on small cards) | adamw | adamw8bit (bitsandbytes) | prodigy
    # (use learning_rate=1.0)
    optimizer: str = "auto"
    weight_decay: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_scheduler: str = "constant"  # constant | constant_with_warmup | linear | cosine
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    mixed_precision: str = "auto"  # auto (profile) | no | fp16 (grad scaler, fp32 LoRA) | bf16
    gradient_checkpointing: bool | None = None  # None = from the hardware profile
    compile: bool | None = None  # torch.compile each transformer block; None = from profile
    # static: one graph per block input shape (bucket area x batch size; one compile each); dynamic: a few
    # graphs for every shape; auto: static up to 6 shapes
    compile_shapes: str = "auto"
    # q/k/v (and add_q/k/v) of each attention as one base product + one LoRA down-projection, each layer's own
    # LoRA (sd35hub.train.fused_qkv; issue #19 lever: bench step -3.8% Medium, -2.0% Large, run 19)
    fused_qkv: bool = False
    profile: str = "auto"  # hardware profile: auto | cpu | t4 | l4 | a100-40 | a100-80 | h100 | h200
    ema_decay: float | None = None  # EMA of the LoRA weights (e.g. 0.999); None = off
    # rectified flow: noisy = (1 - sigma) * x0 + sigma * noise, target = noise - x0
    timestep_sampling: str = "logit_normal"  # logit_normal | mode | cosmap | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    timestep_shift: float = 3.0  # sigma -> shift*sigma / (1 + (shift-1)*sigma); SD3.5 ships 3.0
    loss_weighting: str = "none"  # none | sigma_sqrt | cosmap
    precondition_outputs: bool = False  # predict x0 = noisy - sigma * model_output and regress on x0
    seed: int = 42
    checkpoint_every: int = 100  # optimizer steps between checkpoints; 0 = only at the end/interrupt
    keep_checkpoints: int = 3  # newest checkpoints kept
    checkpoint_dir: str | None = None  # default OUTPUT/checkpoints (Colab: a Google Drive path)
    resume: str | None = None  # "latest" or a checkpoint path
    validation_every: int = 0  # optimizer steps between validation grids; 0 = start and end only
    validation_prompts: tuple[str, ...] = ()  # default: the first held-out captions
    validation_steps: int | None = None  # sampler steps for validation images; None: 28 (4 for Large Turbo)
    validation_guidance: float | None = None  # None: 4.5 (0, no guidance, for Large Turbo)
    validation_seed: int = 0
    log_every: int = 10  # steps between metric lines
    report_to: tuple[str, ...] = ("jsonl",)  # jsonl | tensorboard | wandb
    prior_loss_weight: float = 1.0  # DreamBooth: loss = instance + weight * class (with data.class_prompt)
    # skip-layer guidance in the validation grids (SD3.5 Medium preset: 7,8,9); needs validation_guidance > 1
    validation_skip_layers: tuple[int, ...] | None = None  # None: () ((7, 8, 9) for Medium)
    validation_skip_layer_scale: float = 2.8
    # CLIP-T / CLIP-I / DINO of the final validation images against the instance images (sd35hub eval)
    evaluate: bool = False
    eval_clip_model: str = "openai/clip-vit-base-patch32"  # transformers CLIPModel: Hub id or folder
    eval_dino_model: str = "facebook/dino-vits16"  # transformers ViTModel (DINO ViT-S/16): Hub id or folder
    text_encoder_lr: float | None = None  # learning rate of the text-encoder LoRA (lora.text_encoders); None = learning_rate
    # pivotal tuning / textual inversion (sd35hub.train.pivotal): N new tokens <s0>..<sN-1> in the tokenizers of
    # token_encoders, their embedding rows trained with embedding_lr for the first embedding_steps (None: the
    # embedding_fraction of all steps), then the LoRA alone; data.trigger_word holds them (empty: set to them)
    new_tokens: int = 0  # 0 = off; 2 -> "<s0><s1>"
    token_name: str = "s"  # the tokens are <{token_name}0>, <{token_name}1>, ...
    token_encoders: tuple[str, ...] = ("clip_l", "clip_g")  # + "t5" trains T5's rows too
    token_init: str = ""  # a word the rows start from (its mean embedding, e.g. "dog"); "" = random
    embedding_lr: float = 5e-4
    embedding_steps: int | None = None
    embedding_fraction: float = 1.0  # in (0, 1]; 0.5 = the embeddings train for the first half

    def problems(self) -> list[str]:
        s = "train"
        out: list[str] = []
        if self.max_steps is None:
            out += _positive(s, "epochs", self.epochs)
        out += _positive(s, "max_steps", self.max_steps, allow_none=True)
        out += _positive(s, "batch_size", self.batch_size, allow_none=True)
        out += _positive(s, "gradient_accumulation", self.gradient_accumulation, allow_none=True)
        out += _positive(s, "learning_rate", self.learning_rate)
        out += _positive(s, "text_encoder_lr", self.text_encoder_lr, allow_none=True)
        out += _choice(s, "optimizer", self.optimizer, ("auto", *OPTIMIZERS))
        out += _positive(s, "weight_decay", self.weight_decay, zero_ok=True)
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            out.append(f"train.adam_betas={self.adam_betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        out += _choice(s, "lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        out += _positive(s, "warmup_steps", self.warmup_steps, zero_ok=True)
        out += _positive(s, "max_grad_norm", self.max_grad_norm, zero_ok=True)
        out += _choice(s, "mixed_precision", self.mixed_precision, MIXED_PRECISION)
        out += _choice(s, "profile", self.profile, PROFILES)
        out += _choice(s, "compile_shapes", self.compile_shapes, COMPILE_SHAPES)
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            out.append(f"train.ema_decay={self.ema_decay} must be in (0, 1), e.g. 0.999 (or null to disable)")
        out += _choice(s, "timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        out += _positive(s, "logit_std", self.logit_std)
        out += _positive(s, "timestep_shift", self.timestep_shift)
        out += _choice(s, "loss_weighting", self.loss_weighting, LOSS_WEIGHTING)
        out += _positive(s, "checkpoint_every", self.checkpoint_every, zero_ok=True)
        out += _positive(s, "keep_checkpoints", self.keep_checkpoints)
        out += _positive(s, "validation_every", self.validation_every, zero_ok=True)
        out += _positive(s, "validation_steps", self.validation_steps, allow_none=True)
        out += _positive(s, "log_every", self.log_every)
        out += _positive(s, "prior_loss_weight", self.prior_loss_weight, zero_ok=True)
        for name in ("eval_clip_model", "eval_dino_model"):
            if not str(getattr(self, name)).strip():
                out.append(f"train.{name} is empty; give a Hub id or a folder of a transformers model")
        if any(not isinstance(i, int) or i < 0 for i in self.validation_skip_layers or ()):
            out.append(f"train.validation_skip_layers={list(self.validation_skip_layers)!r} must be transformer block "
                       "indices >= 0, e.g. [7, 8, 9] (SD3.5 Medium)")
        out += _positive(s, "validation_skip_layer_scale", self.validation_skip_layer_scale)
        for r in self.report_to:
            if r not in ("jsonl", "tensorboard", "wandb"):
                out.append(f"train.report_to contains {r!r}; use jsonl, tensorboard or wandb")
        out += self._token_problems()
        return out

    def _token_problems(self) -> list[str]:
        if not self.new_tokens:
            return _positive("train", "new_tokens", self.new_tokens, zero_ok=True)
        out = []
        if not 0 < self.new_tokens <= 16:
            out.append(f"train.new_tokens={self.new_tokens} must be in 1..16 (2 is the usual subject trigger <s0><s1>)")
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,15}", self.token_name):
            out.append(f"train.token_name={show(self.token_name)} must be lowercase letters, digits or _ (e.g. s)")
        bad = [e for e in self.token_encoders if e not in ("clip_l", "clip_g", "t5")]
        if bad or not self.token_encoders or len(set(self.token_encoders)) != len(self.token_encoders):
            out.append(f"train.token_encoders={list(self.token_encoders)!r} must name some of clip_l, clip_g, t5 once each")
        out += _positive("train", "embedding_lr", self.embedding_lr)
        out += _positive("train", "embedding_steps", self.embedding_steps, allow_none=True)
        if not 0.0 < self.embedding_fraction <= 1.0:
            out.append(f"train.embedding_fraction={self.embedding_fraction!r} must be in (0, 1], e.g. 0.5")
        return out


@dataclass(frozen=True)
class HubSpec:
    """Publishing the adapter to the Hugging Face Hub."""

    push_to_hub: bool = False  # publish adapter + card + samples at the end of training
    repo_id: str | None = None  # OWNER/NAME of the target model repo
    private: bool = False
    revision: str | None = None  # branch to push to (default main)
    push_checkpoints: bool = False  # also push each checkpoint's adapter to branch "checkpoints"
    check_access: bool = True  # check license acceptance and write permission before training
    # branch of repo_id that receives every checkpoint in full as it is written; train.resume=latest with no
    # local checkpoint resumes from its newest (sd35hub.train.resume; `--on hf-jobs` sets it to "resume")
    resume_branch: str | None = None

    def problems(self) -> list[str]:
        out: list[str] = []
        if self.push_to_hub and not self.repo_id:
            out.append("hub.push_to_hub is true but hub.repo_id is not set; pass hub.repo_id=OWNER/NAME")
        if self.repo_id is not None and not _REPO_ID.match(self.repo_id):
            out.append(f"hub.repo_id={self.repo_id!r} is not a valid OWNER/NAME repository id")
        if self.resume_branch is not None:
            if not self.repo_id:
                out.append("hub.resume_branch is set but hub.repo_id is not; pass hub.repo_id=OWNER/NAME")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", self.resume_branch) or self.resume_branch == "main":
                out.append(f"hub.resume_branch={self.resume_branch!r} must be a branch name other than main, e.g. resume")
        return out


@dataclass(frozen=True)
class Config:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    hub: HubSpec = field(default_factory=HubSpec)

    def problems(self) -> list[str]:
        """Every section's own checks, plus type/finiteness/bounds of every field (sd35hub.config_checks)."""
        out: list[str] = []
        for f in fields(self):
            section = getattr(self, f.name)
            generic, wrong_type = field_problems(f.name, section)
            # a value of the wrong type (a Config built in Python) would crash the section's own checks
            out += generic if wrong_type else merge_problems(section.problems(), generic)
        out += _pivotal_problems(self)
        if self.lora.init in ("pissa", "olora") and (self.model.quantize not in ("none", "auto") or self.model.float8):
            out.append(f"lora.init={self.lora.init} rewrites the frozen base weights, which model.quantize / "
                       "model.float8 keep in a packed form; use lora.init=gaussian or model.quantize=none")
        out += _text_encoder_problems(self)
        out += _fused_qkv_problems(self)
        return out

    def validate(self) -> Config:
        """Raise one ConfigError listing every problem; return self when there is none."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _section_to_dict(getattr(self, f.name)) for f in fields(self)}

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


def _fused_qkv_problems(cfg: Config) -> list[str]:
    """train.fused_qkv fuses vanilla LoRA layers on plain bf16/fp32 base layers only (sd35hub.train.fused_qkv)."""
    if not cfg.train.fused_qkv:
        return []
    out: list[str] = []
    if cfg.lora.dropout:
        out.append(f"train.fused_qkv computes the q/k/v LoRA branches together, without dropout; set lora.dropout=0 "
                   f"(now {cfg.lora.dropout}) or train.fused_qkv=false")
    if cfg.lora.variant != "lora":
        out.append(f"train.fused_qkv fuses plain LoRA layers; lora.variant={cfg.lora.variant} keeps its own layers: "
                   "set lora.variant=lora or train.fused_qkv=false")
    if cfg.model.float8 or cfg.model.quantize in ("nf4", "int8"):
        what = "model.float8" if cfg.model.float8 else f"model.quantize={cfg.model.quantize}"
        out.append(f"train.fused_qkv stacks the frozen q/k/v weights, which {what} replaces with its own layers; "
                   "drop one of the two")
    return out


def _text_encoder_problems(cfg: Config) -> list[str]:
    """Text-encoder LoRA (lora.text_encoders) against the model and train settings."""
    out: list[str] = []
    names = cfg.lora.text_encoders
    if cfg.train.text_encoder_lr is not None and not names:
        out.append("train.text_encoder_lr is set but lora.text_encoders is empty, so nothing uses it; set "
                   "lora.text_encoders=[clip_l,clip_g] or drop train.text_encoder_lr")
    if "t5" in names and cfg.model.drop_t5:
        out.append("lora.text_encoders includes t5 but model.drop_t5=true leaves T5 out; remove t5 from "
                   "lora.text_encoders or set model.drop_t5=false")
    if "t5" in names and cfg.model.text_encoder_quantize in ("nf4", "int8"):
        out.append(f"lora.text_encoders includes t5, which trains on the unquantized T5 kept on the device, but "
                   f"model.text_encoder_quantize={cfg.model.text_encoder_quantize}; set model.text_encoder_quantize=auto "
                   "(or none), or remove t5 from lora.text_encoders")
    return out


SECTIONS: dict[str, type] = {"model": ModelSpec, "data": DataSpec, "lora": LoraSpec, "train": TrainSpec, "hub": HubSpec}


def _pivotal_problems(cfg: Config) -> list[str]:
    """train.new_tokens against the data and model sections (the trigger must carry the tokens)."""
    t = cfg.train
    if not t.new_tokens or not isinstance(t.new_tokens, int) or not isinstance(t.token_name, str):
        return []
    out = []
    tokens = "".join(f"<{t.token_name}{i}>" for i in range(t.new_tokens))
    trigger = cfg.data.trigger_word.strip()
    if trigger and tokens not in trigger:
        out.append(f"data.trigger_word={show(trigger)} does not contain the new tokens {tokens}; pass "
                   f"data.trigger_word='{tokens}' (or e.g. '{tokens} dog'), or leave it empty to use {tokens}")
    if "t5" in t.token_encoders and cfg.model.drop_t5:
        out.append("train.token_encoders names t5 but model.drop_t5 leaves T5 out; drop one of them")
    return out


def _section_to_dict(section: Any) -> dict[str, Any]:
    out = {}
    for f in fields(section):
        value = getattr(section, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _coerce(path: str, annotation: Any, value: Any, problems: list[str]) -> Any:
    """Check/convert a YAML value against a field's type hint; record a problem when it can't fit."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(path, non_none[0], value, problems)
    if origin is tuple:
        if isinstance(value, str):
            value = [value] if args and args[-1] is Ellipsis else [value]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}={show(value)} must be a list")
            return value
        item_type = args[0] if args else Any
        return tuple(_coerce(path, item_type, v, problems) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{path}={show(value)} must be true or false")
        return value
    if annotation in (int, float) and isinstance(value, str):  # YAML 1.1 reads "5e-5" as a string
        try:
            value = float(value) if annotation is float or not value.strip().lstrip("+-").isdigit() else int(value)
        except ValueError:
            pass
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{path}={show(value)} must be an integer")
        return value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        problems.append(f"{path}={show(value)} must be a number")
        return value
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{path}={show(value)} must be a string")
        return value
    return value


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated Config from nested dicts; unknown keys and bad types are all reported."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError("the config file must be a mapping of sections (model, data, lora, train, hub)")
    sections: dict[str, Any] = {}
    for key in raw:
        if key not in SECTIONS:
            problems.append(f"unknown section {show(key)}; sections are {', '.join(SECTIONS)}")
    for name, cls in SECTIONS.items():
        values = raw.get(name)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            problems.append(f"section {name!r} must be a mapping of key: value, not {show(values)}")
            sections[name] = cls()
            continue
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if not isinstance(key, str):
                problems.append(f"{name}: key {show(key)} is not a name; valid keys: {', '.join(sorted(known))}")
                continue
            if key not in known:
                close = [k for k in known if len(key) >= 3 and k.startswith(key[:4])]
                hint = f" (did you mean {close[0]}?)" if close else ""
                shown = f"{name}.{key}" if key.isprintable() and len(key) <= 60 else f"{show(key)} in {name}"
                problems.append(f"unknown key {shown}{hint}; valid keys: {', '.join(sorted(known))}")
                continue
            before = len(problems)
            coerced = _coerce(f"{name}.{key}", hints[key], value, problems)
            if len(problems) == before:  # a value of the wrong type keeps the default, so the rest is still checked
                kwargs[key] = coerced
        sections[name] = cls(**kwargs)
    problems += Config(**sections).problems()
    problems = list(dict.fromkeys(problems))  # one line per problem, however many list items share it
    if problems:
        raise ConfigError(problems)
    return Config(**sections)


def as_overrides(values: dict[str, Any]) -> list[str]:
    """``{"lora.rank": 32, "data.trigger_word": "nrt style"}`` -> ``["lora.rank=32", 'data.trigger_word="nrt style"']``:
    dotted overrides whose values keep their type through parse_overrides (JSON is YAML). Every front end that
    turns its own fields into a config (CLI flags, the Space's training form, a sweep's trial) goes through here."""
    import json

    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.learning_rate=5e-5", "lora.rank=32"]`` -> nested dict (values parsed as YAML)."""
    import yaml

    nested: dict[str, dict[str, Any]] = {}
    bad: list[str] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().lstrip("-").partition(".")
        if not sep or not dot or not name:
            bad.append(f"override {show(item)} must look like section.key=value, e.g. train.learning_rate=5e-5")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        except (RecursionError, MemoryError, OverflowError, ValueError):
            bad.append(f"override {show(item)}: the value could not be read as YAML; quote it or simplify it")
            continue
        try:
            parse_yaml(text, f"override {show(key)}") if isinstance(value, (dict, list)) else None
        except ConfigError as exc:
            bad.append(exc.problems[0])
            continue
        nested.setdefault(section, {})[name] = value
    if bad:
        raise ConfigError(bad)
    return nested


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        elif out.get(section) is None:
            out[section] = values
        # else: the file's section is not a mapping; keep it so from_dict reports it
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated; every problem reported at once."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        raw = parse_yaml(read_config_text(p), f"config file {str(p)!r}")
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must be a mapping of sections (model, data, lora, train, hub)")
    return from_dict(merge(raw, parse_overrides(overrides or [])))


def dump_yaml(config: Config) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)
