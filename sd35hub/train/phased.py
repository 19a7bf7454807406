"""Setup steps 5-6 of the trainer, in the order of the memory plan (sd35hub.workflows.plan):

    encode images (VAE alone) -> encode captions (CLIP-L, CLIP-G, T5-XXL: one at a time, each freed) ->
    load transformer (quantized while loading, straight onto the device) -> a pipeline for validation
    made of that transformer, the VAE (kept on the CPU between validations) and no text encoders:
    the validation prompts were encoded with the captions and are read back from the cache.

Prior preservation (data.class_prompt) follows the same order: the class prompt is encoded with the
captions; when class images are missing, the plan's phase "generate class images" loads the base alone
(quantized as for training), renders them with the cached class-prompt embeddings and frees it; the class
images are then cached with the encoders one at a time, and the base is loaded again for training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _validation_prompts(trainer: Any, index: Any, prompts: list[str]) -> Any:
    from safetensors.torch import load_file

    from sd35hub.data.cache import cached_prompts
    from sd35hub.train.validation import EncodedPrompts

    embeds = cached_prompts(index, prompts)
    out = {"prompt_embeds": embeds["prompt_embeds"], "pooled_prompt_embeds": embeds["pooled_prompt_embeds"]}
    if trainer.config.train.validation_guidance > 1.0:  # the pipeline's default negative prompt is ""
        empty = load_file(str(Path(index.path) / index.empty_prompt))
        n = len(prompts)
        out["negative_prompt_embeds"] = empty["prompt_embeds"].expand(n, -1, -1).clone()
        out["negative_pooled_prompt_embeds"] = empty["pooled_prompt_embeds"].expand(n, -1).clone()
    return EncodedPrompts(list(prompts), out)


def _rows(encoded: Any, rows: list[int]) -> Any:
    """The EncodedPrompts of some of ``encoded``'s prompts (rows in order)."""
    from sd35hub.train.validation import EncodedPrompts

    return EncodedPrompts([encoded.prompts[r] for r in rows], {k: v[rows] for k, v in encoded.embeds.items()})


def load_base(trainer: Any) -> Any:
    """The plan's phase 'load transformer': the base (quantized while loading) straight onto the device."""
    from sd35hub.models.load import load_transformer

    cfg = trainer.config
    with trainer.phases.phase("load transformer"):
        transformer = load_transformer(cfg.model.name, dtype=trainer.weight_dtype, revision=cfg.model.revision,
                                       quantize=cfg.model.quantize, device=str(trainer.device))  # fmt: skip
        if cfg.model.attention == "xformers":
            transformer.enable_xformers_memory_efficient_attention()
    return transformer


def encode_and_load(trainer: Any, cache_dir: Path, prompts: list[str]) -> Any:
    """Fill trainer.index / prior / prompts; return the pipeline the trainer validates with."""
    from sd35hub.data.cache import CacheIndex, build_cache
    from sd35hub.data.cache_key import t5_mode, warm_key
    from sd35hub.data.encode import PhasedEncoders

    cfg, acc, plan, phases = trainer.config, trainer.acc, trainer.plan, trainer.phases
    train = cfg.train
    t5 = t5_mode(trainer)
    encoders = PhasedEncoders(cfg.model.name, device=trainer.device, dtype=trainer.weight_dtype,
                              max_sequence_length=cfg.data.max_sequence_length,
                              joint_attention_dim=trainer.info.joint_attention_dim, t5=t5,
                              revision=cfg.model.revision, batch_size=train.batch_size,
                              phase=phases.phase)  # fmt: skip
    class_prompt = cfg.data.class_prompt.strip()
    # the class prompt is encoded with the captions: class images are rendered without any text encoder
    encoded = list(prompts) + ([cfg.data.class_prompt] if class_prompt and cfg.data.class_prompt not in prompts else [])
    say = trainer.log if trainer.main else None
    with acc.main_process_first():  # rank 0 encodes; then the first process of each other node checks/fills its cache
        if acc.is_local_main_process:
            key = warm_key(trainer, encoded)  # a complete earlier build of this stream: nothing read, nothing loaded
            trainer.index = build_cache(cfg.data, encoders, cache_dir, model_id=cfg.model.name,
                                        batch_size=train.batch_size, device=trainer.device, dtype=trainer.weight_dtype,
                                        seed=train.seed, progress=trainer.progress and trainer.main,
                                        prompts=encoded, max_side=trainer.info.max_resolution, warm_key=key,
                                        log=say)  # fmt: skip
            if say is not None:
                say(_cache_line(trainer.index, cache_dir))
    acc.wait_for_everyone()
    if not acc.is_local_main_process:  # one writer per cache dir: the others read the index it just wrote
        trainer.index = CacheIndex.load(cache_dir)
    every = (_validation_prompts(trainer, trainer.index, encoded)
             if trainer.main or (class_prompt and acc.is_local_main_process) else None)  # fmt: skip
    trainer.prior = None
    if class_prompt:  # DreamBooth prior preservation: class images next to the instance ones
        from sd35hub.train.prior import prepare_prior

        row = encoded.index(cfg.data.class_prompt)
        class_embeds = _rows(every, [row]) if every is not None else None
        trainer.prior = prepare_prior(trainer, encoders, cache_dir, class_embeds=class_embeds,
                                      load_transformer=lambda: load_base(trainer))  # fmt: skip
    trainer.prompts = _rows(every, list(range(len(prompts)))) if trainer.main and every is not None else None
    # every encoder is gone now: the transformer may have the device
    transformer = load_base(trainer)
    trainer.encoders = encoders  # its VAE (on the CPU) if it encoded images; else loaded at the first decode
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    from sd35hub.train.validation import validation_pipeline

    return validation_pipeline(cfg.model.name, transformer, encoders.vae, revision=cfg.model.revision,
                               tiling=bool(plan is not None and plan.vae_tiling))


def ensure_vae(trainer: Any) -> Any:
    """The validation pipeline's VAE, loaded now (phase "load VAE") when the cache build needed none."""
    pipe = trainer.pipe
    if pipe.vae is None:
        from sd35hub.train.validation import attach_vae

        with trainer.phases.phase("load VAE"):
            plan = trainer.plan
            attach_vae(pipe, trainer.encoders.load_vae(), tiling=bool(plan is not None and plan.vae_tiling))
    return pipe.vae


def _cache_line(index: Any, cache_dir: Path) -> str:
    n = len(index.entries)
    if index.reused:
        return f"data cache: reused the complete build in {cache_dir} ({n} samples; no image read, no encoder loaded)"
    if index.encoded == 0:
        return f"data cache: all {n} samples were cached in {cache_dir} (their images read to check them)"
    return f"data cache: encoded {index.encoded} of {n} samples into {cache_dir} ({n - index.encoded} were cached)"
