"""The LoRA trainer for SD3.5: setup -> train -> save -> cleanup, top to bottom (torchtune-style recipe).

    sd35hub train --config my.yaml train.max_steps=500          # or: sd35hub.train(config)
    accelerate launch -m sd35hub train --config my.yaml         # data-parallel, same config

setup: validate config -> Hub access (read base; write repo when pushing) -> check_dataset -> hardware
       profile (from configs only) -> memory plan (sd35hub.workflows.plan: refuses when nothing fits) ->
       VAE, then each text encoder alone (latents, captions, validation prompts cached; sd35hub.train.phased)
       -> transformer -> LoRA -> optimizer/scheduler -> resume
train: rectified-flow steps (sd35hub.train.flow) with accumulation, clipping, EMA, periodic
       validation and checkpoints; SIGTERM / Ctrl-C write a checkpoint and raise TrainingInterrupted
save:  adapter (diffusers LoRA + metadata), summary.json, loss.png, training_config.yaml, README.md,
       and the Hub publication when hub.push_to_hub

Data order and noise are functions of (seed, global micro-batch index): micro-batch g is batch
g % n of epoch g // n, process r of P handles g = round * P + r, and its latents sample, noise and
sigmas come from a generator seeded with (seed, g). So a resumed run sees exactly the batches and
noise an uninterrupted one would, on any number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sd35hub.config import Config
from sd35hub.errors import TrainingInterrupted
from sd35hub.train import checkpoint as ckpt
from sd35hub.train import outputs, validation
from sd35hub.train.distributed import any_process, check_same_resume_step, launched_without_cuda
from sd35hub.train.flow import draw_noise_and_sigmas, flow_loss
from sd35hub.train.metrics import PendingLog
from sd35hub.train.outputs import TrainResult
from sd35hub.train.preflight import check_resume, preflight
from sd35hub.train.speed import eager, to_device
from sd35hub.train.step import optimize_micro_batch

StepCallback = Callable[["Trainer"], None]


class Trainer:
    def __init__(self, config: Config, *, log: Callable[[str], None] | None = None,
                 on_step: StepCallback | None = None, progress: bool = True) -> None:
        self.config = config
        self.log = log or print
        self.on_step = on_step  # called after every optimizer step (tests interrupt through it)
        self.progress = progress
        self.state = ckpt.TrainState()
        self.start_step = 0  # the step this session started at (a resumed run's checkpoint step)
        self.records: list[dict[str, Any]] = []
        self.prior_duration_s = 0.0  # training time of earlier sessions of a resumed run
        self.finished = False  # resumed at or past the last step of a run that wrote its outputs
        self.pivotal: Any = None  # pivotal tuning (train.new_tokens): sd35hub.train.pivotal_live.Pivotal
        self.pivotal_params: list[torch.nn.Parameter] = []  # its new-token rows (outside DDP, like the TE LoRA)

    # ------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Everything before the first step, in order; each step is one method below. The wall time of
        each (from the process launch) is logged and kept in ``startup_phases`` (sd35hub.train.startup)."""
        from sd35hub.train.startup import StartupClock

        self.clock = StartupClock(self._startup_log)
        self.startup_phases = self.clock.phases  # {phase: seconds}; "to first step" once the first step is done
        self.clock.mark("imports")  # the launch up to here: interpreter, torch, diffusers, the caller
        notes, prompts = self._setup_config()  # config, access, data check, profile, memory plan: nothing loaded
        self.clock.mark("config / plan")
        self._setup_run_folder(notes)  # run lock, fresh-folder check, Accelerator, device
        self.clock.mark("run folder / accelerator")
        pipe = self._setup_models(prompts)  # encoders one at a time into the cache, then the transformer
        self.clock.mark("validation pipeline")
        transformer = self._setup_adapters(pipe)  # LoRA, text-encoder LoRA, pivotal rows, checkpointing, FP8
        self.clock.mark("LoRA adapters")
        self._setup_batches(transformer)  # cached batches, compiled blocks
        self.clock.mark("batches / compile setup")
        self._setup_optimizer(transformer)  # optimizer, schedule, EMA, held-out batches
        self._setup_resume_and_logs()  # resume, metrics, trackers, the run's config
        self.clock.mark("optimizer / logs")

    def _startup_log(self, line: str) -> None:
        if getattr(self, "main", os.environ.get("RANK", "0") == "0"):
            self.log(line)

    def _setup_config(self) -> tuple[list[str], list[str]]:
        from sd35hub.data.sources import check_dataset, open_samples
        from sd35hub.hardware import apply_profile, detect_profile
        from sd35hub.models.load import model_info

        cfg = self.config.validate()  # 1. every config problem at once, before anything loads
        if cfg.train.new_tokens:  # pivotal tuning: data.trigger_word carries the new tokens (sd35hub.train.pivotal)
            from sd35hub.train.pivotal_live import resolve_trigger

            cfg = resolve_trigger(cfg)
        preflight(cfg)  # missing packages, output paths that are files, --resume with another rank
        self._check_access(cfg)  # 2. license + token (nothing downloaded)
        from sd35hub.data.cache_key import checked_dataset

        self.config = cfg  # _default_prompts falls back on its trigger word
        # 3. DatasetError now, not after loading 16 GB (not read again when unchanged since an earlier check)
        default_prompts = checked_dataset(cfg.data, seed=cfg.train.seed, check=lambda: check_dataset(cfg.data, limit=256),
                                          default_prompts=lambda: self._default_prompts(open_samples(cfg.data, seed=cfg.train.seed)),
                                          log=self.log if os.environ.get("RANK", "0") == "0" else None)  # fmt: skip
        self.info = model_info(cfg.model.name, cfg.model.revision)  # configs only
        self.base_model_id = outputs.resolve_base(cfg.model, self.log)  # the Hub id to publish; never a path
        self.profile = detect_profile(cfg.train.profile, variant=self.info.variant)  # 4. before weights load
        cfg, notes = apply_profile(cfg, self.profile)  # fills only what the config left None / "auto"
        cfg, bucket_notes = _bound_resolution(cfg, self.info.max_resolution)  # the base's positional grid
        notes += bucket_notes
        from sd35hub.models.presets import apply_variant_preset

        cfg, preset_notes = apply_variant_preset(cfg, self.info.variant)  # Turbo, Medium
        notes = [*notes, *preset_notes]
        check_resume(cfg)  # again: the profile may have chosen lora.rank
        self.config = cfg
        train = cfg.train
        # 5. the memory plan (configs only): refuse before any weights download when no plan fits
        from sd35hub.models.options import check_options
        from sd35hub.workflows.plan import plan_for_config

        prompts = list(train.validation_prompts) or default_prompts
        self.plan = plan_for_config(cfg, self.profile, validation_prompts=len(prompts)).check()
        check_options(cfg.model.quantize, cfg.model.attention)  # bitsandbytes / xformers present, also before
        return notes, prompts

    def _setup_run_folder(self, notes: list[str]) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        from sd35hub.models.load import torch_dtype

        cfg = self.config
        train = cfg.train
        self.output_dir = Path(train.output_dir)
        self.checkpoint_dir = Path(train.checkpoint_dir or self.output_dir / "checkpoints")
        from sd35hub.train.runfolder import RunLock, check_fresh_folder

        if os.environ.get("RANK", "0") == "0":  # one lock per run (rank 0 of a launch); released in cleanup()
            self.run_lock = RunLock(self.output_dir).acquire()
        check_fresh_folder(self.output_dir, self.checkpoint_dir, train.resume)

        trackers = [r for r in train.report_to if r in ("tensorboard", "wandb")]
        handlers = []
        if train.fused_qkv:  # its stacked frozen weights are buffers: DDP must not broadcast them every forward
            from accelerate.utils import DistributedDataParallelKwargs

            handlers.append(DistributedDataParallelKwargs(broadcast_buffers=False))
        self.acc = acc = Accelerator(
            cpu=launched_without_cuda(), mixed_precision=train.mixed_precision, gradient_accumulation_steps=train.gradient_accumulation,
            log_with=trackers or None, kwargs_handlers=handlers,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )  # fmt: skip
        self.main = acc.is_main_process
        if self.main:
            self.log(self.profile.describe())
            for note in notes:
                self.log(f"  {note}")
        self.device = acc.device
        if cfg.model.float8:  # before any download or encoding
            from sd35hub.train.speed import check_float8_device

            check_float8_device(self.device)
        self.attention_kernel = "cudnn" if self.device.type == "cuda" and cfg.model.attention == "sdpa" else "auto"
        self.weight_dtype = torch_dtype(cfg.model.dtype, str(self.device))
        if self.device.type == "cuda":
            from sd35hub.train.speed import enable_tf32

            enable_tf32()


    def _setup_models(self, prompts: list[str]) -> Any:
        # 6. encoders one at a time (latents, captions, validation prompts cached), then the transformer
        from sd35hub.train.phased import encode_and_load
        from sd35hub.train.phases import PhaseRecorder
        from sd35hub.workflows.plan import apply_gpu_cap

        apply_gpu_cap(self.device)  # SD35HUB_GPU_MEMORY_CAP_GIB: emulate a smaller card
        if self.main:
            self.log(self.plan.table())
        clock = getattr(self, "clock", None)
        self.phases = PhaseRecorder(self.device, plan=self.plan, clock=clock)
        from sd35hub.data.cache_key import data_cache_dir

        cache_dir = data_cache_dir(self)  # data.cache_dir, or a content-keyed folder of the user cache
        if clock is not None:
            clock.gap = "data cache (check / read images)"
        pipe = self.pipe = encode_and_load(self, cache_dir, prompts)
        if clock is not None:
            clock.gap = "other"

        return pipe

    def _setup_adapters(self, pipe: Any) -> Any:
        from sd35hub.train.lora import attach_lora, lora_state, target_modules

        cfg = self.config
        train = cfg.train
        # 7. LoRA (fp32 adapter weights), memory/speed knobs, optimizer, schedule
        transformer = pipe.transformer
        if cfg.model.quantize == "none":
            transformer.to(self.device)
        self.target_names = target_modules(transformer, cfg.lora)
        from accelerate.utils import set_seed

        from sd35hub.train.variants import rewrites_base

        if rewrites_base(cfg.lora) and self.main:  # pissa/olora change the base weights: render it first
            self._render_base()
        set_seed(train.seed)  # LoRA init and dropout draw from the global RNGs: same start every run
        self.params = attach_lora(transformer, cfg.lora, fp32_params=True)
        # pissa/olora: the adapter's start, to save the trained change to the ORIGINAL base (train.variants)
        self.initial_adapter = lora_state(transformer) if rewrites_base(cfg.lora) else None
        self.named_params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
        from sd35hub.train.live_text import for_trainer

        self.text = for_trainer(self)  # lora.text_encoders: kept on the device, run every step (None: all cached)
        self.text_params = self.text.trainable() if self.text is not None else []
        if self.text is not None:
            self.params += self.text_params
            self.named_params.update(self.text.named_lora_params())  # "<component>/<name>": EMA and checkpoints
            if self.main:
                self.log(self.text.describe())
        if train.new_tokens:  # pivotal tuning: the tokens go into the live encoders' tokenizers (for_trainer loaded them)
            from sd35hub.train.pivotal_live import Pivotal

            self.pivotal = Pivotal.setup(self)
        if train.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if cfg.model.float8:
            from sd35hub.train.speed import float8_base

            layers = float8_base(transformer, emulate=self.device.type != "cuda")  # CPU: tests only (refused above)
            if self.main:
                self.log(f"FP8 matmuls on {layers} frozen base layers (torchao float8)")
        if train.fused_qkv:  # after LoRA, on the device (the base weights become views of stacked ones)
            from sd35hub.train.fused_qkv import fuse_qkv

            groups = fuse_qkv(transformer)
            if self.main:
                self.log(f"fused q/k/v products: {groups} projection groups (train.fused_qkv)")
        return transformer

    def _setup_batches(self, transformer: Any) -> None:
        from sd35hub.data.cache import CachedBatches

        cfg = self.config
        train = cfg.train
        self.batches = CachedBatches(self.index, batch_size=train.batch_size, seed=train.seed,
                                     holdout=cfg.data.holdout, caption_dropout=cfg.data.caption_dropout,
                                     partial=cfg.data.partial_batches, repeats=cfg.data.repeats)
        self._epoch_cache: dict[int, list[Any]] = {}
        self.batches_per_epoch = len(self._epoch(0))
        if train.compile:
            from sd35hub.train.speed import compile_blocks, dynamic_shapes

            # what a block sees: (tokens = bucket area, batch size); w x h and h x w are the same shape
            shapes = {(ref.bucket[0] * ref.bucket[1], len(ref.entries)) for ref in self._epoch(0)}  # every epoch
            shapes |= self.prior.shapes() if self.prior is not None else set()
            dynamic = dynamic_shapes(train.compile_shapes, len(shapes))
            compile_blocks(transformer, gradient_accumulation=train.gradient_accumulation,
                           shapes="dynamic" if dynamic else "static")
            if self.main:
                self.log(f"compiling the transformer blocks for {len(shapes)} input shape(s) (bucket area x batch size)"
                         + ("; shapes that change become dynamic" if dynamic else ", one static graph each"))

    def _setup_optimizer(self, transformer: Any) -> None:
        from sd35hub.train.optim import LoraEMA, build_optimizer, build_scheduler

        cfg = self.config
        train = cfg.train
        acc = self.acc
        optimizer = build_optimizer(self.params, train, text_encoder_params=self.text_params,
                                    extra_groups=[self.pivotal.param_group()] if self.pivotal is not None else ())
        self.transformer, self.optimizer = acc.prepare(transformer, optimizer)
        self.micro_per_step = acc.num_processes * train.gradient_accumulation
        self.total_steps = train.max_steps or max(1, train.epochs * self.batches_per_epoch // self.micro_per_step)
        self.scheduler = build_scheduler(optimizer, train, self.total_steps)
        self.ema = LoraEMA(self.named_params, train.ema_decay) if train.ema_decay else None
        self.heldout = validation.make_heldout(self.batches, train.seed, unmasked_weight=cfg.data.unmasked_weight)
        self.digest = outputs.config_digest(cfg)
        self.state.config_digest = self.digest

    def _setup_resume_and_logs(self) -> None:
        from sd35hub.train.metrics import MetricsLog

        cfg = self.config
        train = cfg.train
        acc = self.acc
        trackers = [r for r in train.report_to if r in ("tensorboard", "wandb")]
        if train.resume:
            self._resume(train.resume)
            check_same_resume_step(acc, self.state.step, self.checkpoint_dir)
            self.finished = self.state.step >= self.total_steps and outputs.has_outputs(self.output_dir)
            self.start_step = self.state.step
        if self.pivotal is not None:  # the rows train for the first embedding_steps steps (then they freeze)
            self.pivotal.schedule(self.total_steps, self.state.step)
        self.metrics = MetricsLog(self.output_dir / "logs" / "metrics.jsonl",
                                  resume_step=self.state.step if train.resume else None) if self.main else None
        if trackers:
            acc.init_trackers("sd35hub", config={k: str(v) for k, v in cfg.train.__dict__.items()})
        if self.main and self.finished:  # its summary, card and config are the facts of that run: unchanged
            self.log(f"the run in {self.output_dir} is finished (step {self.state.step} of {self.total_steps}): nothing "
                     "to train, its outputs are left as they are; raise train.max_steps or train.epochs to continue it")
        elif self.main:
            outputs.write_config(self.output_dir, cfg)
            self.log(self.batches.describe_holdout())
            self.log(f"{len(self.index.entries)} cached samples ({len(self.batches.holdout_entries)} held out), "
                     f"{self.batches_per_epoch} batches/epoch, {self.total_steps} steps, {len(self.params)} LoRA tensors "
                     f"on {len(self.target_names)} layers")  # fmt: skip

    def _check_access(self, cfg: Config) -> None:
        if not cfg.hub.check_access:
            return
        from sd35hub.workflows.checks import check_run_access

        check_run_access(cfg)  # the one access check of a run (CLI, notebook, jobs use it too)

    def _default_prompts(self, stream: Any, count: int = 2) -> list[str]:
        prompts: list[str] = []
        for sample in stream:
            if sample.caption and sample.caption not in prompts:
                prompts.append(sample.caption)
            if len(prompts) == count:
                break
        return prompts or [self.config.data.trigger_word or "a photo"]

    def _epoch(self, epoch: int) -> list[Any]:
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: self.batches.epoch_batches(epoch)}
        return self._epoch_cache[epoch]

    def _ref(self, g: int) -> Any:
        return self._epoch(g // self.batches_per_epoch)[g % self.batches_per_epoch]

    def _resume(self, resume: str) -> None:
        from sd35hub.train.lora import load_lora_state

        if resume == "latest" and self.config.hub.resume_branch:  # no local checkpoint: the Hub branch's newest
            from sd35hub.train.resume import fetch_for_resume

            fetch_for_resume(self)
        saved = ckpt.load_resumable(resume, self.checkpoint_dir, self.log if self.main else lambda line: None)
        if saved is None:
            self.log(f"resume=latest: no checkpoint in {self.checkpoint_dir} yet, starting fresh")
            return
        path = saved.path
        if saved.state.config_digest != self.digest and self.main:
            self.log("warning: the config differs from the checkpoint's in settings that change the math; continuing")
        lora = saved.lora
        if self.text is not None:  # the text-encoder LoRA's tensors are "<component>/<name>"
            self.text.load_lora_state(lora)
            lora = {k: v for k, v in lora.items() if "/" not in k}
        load_lora_state(self.acc.unwrap_model(self.transformer), lora)
        if self.pivotal is not None:  # the new-token rows of the checkpoint (adapter/embeddings.safetensors)
            self.pivotal.load(path / "adapter")
        self.optimizer.load_state_dict(saved.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        if saved.scaler is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(saved.scaler)
        if self.ema is not None:
            if saved.ema is not None:
                self.ema.load_state_dict(saved.ema)
            else:  # ema_decay newly set: average from the resumed weights, not from the LoRA's init
                from sd35hub.train.optim import LoraEMA

                self.ema = LoraEMA(self.named_params, self.config.train.ema_decay)
                if self.main:
                    self.log("the checkpoint has no EMA state: the EMA starts from the resumed weights")
        ckpt.restore_rng(saved.rng)
        self.state = saved.state
        self.state.config_digest = self.digest
        self.prior_duration_s = float(saved.state.extra.get("duration_s") or 0.0)
        if self.main:
            self.log(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, batch {self.state.batch_in_epoch})")

    # ------------------------------------------------------------------------------------ train
    def _phase(self, name: str) -> Any:
        phases = getattr(self, "phases", None)
        return phases.phase(name) if phases is not None else contextlib.nullcontext()

    def train(self) -> None:
        with self._phase("train"):  # out of memory here names the phase and its remedy
            self._train_loop()

    def _train_loop(self) -> None:
        from tqdm.auto import tqdm

        cfg, state = self.config, self.state
        t = cfg.train
        if self.finished:
            self.duration_s = 0.0
            return
        if state.step == 0:
            self.initial_validation_loss = self.validate(0)
        else:
            first = next((r for r in self.read_metrics() if r.get("validation_loss") is not None), None)
            self.initial_validation_loss = first["validation_loss"] if first else None
        from sd35hub.train.startup import compile_seconds

        compiled_before = compile_seconds()
        sigterm = ckpt.SigtermFlag().install()
        bar = tqdm(total=self.total_steps, initial=state.step, disable=not (self.progress and self.main),
                   desc="training", unit="step", dynamic_ncols=True)
        self.start_time = time.perf_counter()
        self.final_loss: float | None = None
        # The loss stays on the device: a log point copies it to the host asynchronously and reads it
        # one step later, once the next step is queued, so the GPU never drains for logging and the
        # next batch loads while the GPU works. Validation and checkpoints read it at once.
        window_start, window_first = time.perf_counter(), state.step
        pending: PendingLog | None = None
        try:
            while state.step < self.total_steps:
                loss_t = self._step()
                state.step += 1
                clock = getattr(self, "clock", None)
                if clock is not None and not clock.done:  # the first step of this session is finished work
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    clock.finish("first step", compile_s=compile_seconds() - compiled_before)
                if pending is not None:  # the previous log point: its step has run (or runs) on the GPU
                    self._emit_log(pending, bar)
                    pending = None
                validating = bool(t.validation_every) and state.step % t.validation_every == 0 and state.step < self.total_steps
                # the last step's checkpoint is written once, after the final validation below
                checkpointing = bool(t.checkpoint_every) and state.step % t.checkpoint_every == 0 and state.step < self.total_steps
                if state.step % t.log_every == 0 or state.step == self.total_steps:
                    now = time.perf_counter()
                    seconds = (now - window_start) / max(state.step - window_first, 1)
                    window_start, window_first = now, state.step
                    record = {"step": state.step, "lr": self.scheduler.get_last_lr()[0], "s_per_step": round(seconds, 4),
                              "samples_seen": state.samples_seen, "epoch": state.epoch}
                    if self.device.type == "cuda":
                        record["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
                    pending = PendingLog(record, loss_t, extras=self._loss_parts_named())
                    if validating or checkpointing or state.step == self.total_steps:
                        self._emit_log(pending, bar)
                        pending = None
                bar.update(1)
                if validating:
                    self.validate(state.step)
                if checkpointing:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self)
                stop = sigterm.received
                if self.acc.num_processes > 1:  # all stop after the same step: agree at log points (a host sync anyway)
                    stop = state.step % t.log_every == 0 and any_process(self.acc, stop)
                if stop:
                    raise KeyboardInterrupt
            self.final_validation_loss = self.validate(state.step)
            self.save_checkpoint()  # the end state, so a later run can continue with more steps
        except KeyboardInterrupt:
            if pending is not None:
                self._emit_log(pending, bar)
            bar.close()
            path = self.save_checkpoint() or self.checkpoint_dir / ckpt.checkpoint_name(state.step)  # rank 0 wrote it
            raise TrainingInterrupted(
                f"Training interrupted at step {state.step}; checkpoint written to {path}. Continue with "
                f"--resume latest (same --output) or --resume {path}."
            ) from None
        finally:
            bar.close()
            sigterm.restore()
        self.duration_s = self._elapsed()

    def _elapsed(self) -> float:
        """Training time of the whole run: earlier sessions (from the checkpoint) plus this one."""
        start = getattr(self, "start_time", None)
        return self.prior_duration_s + (time.perf_counter() - start if start is not None else 0.0)

    def _step(self) -> torch.Tensor:
        """One optimizer step: gradient_accumulation micro-batches on each process. Returns the mean loss
        (a 0-d tensor on the device)."""
        cfg, acc, state = self.config, self.acc, self.state
        t = cfg.train
        base = state.epoch * self.batches_per_epoch + state.batch_in_epoch  # first global micro-batch
        losses, parts = [], []
        for a in range(t.gradient_accumulation):
            g = base + a * acc.num_processes + acc.process_index
            generator = torch.Generator().manual_seed(_seed(t.seed, "noise", g))
            batch = self.batches.load(self._ref(g), generator=generator, sample=True)
            noise, sigmas = draw_noise_and_sigmas(
                tuple(batch["latents"].shape), generator, scheme=t.timestep_sampling, shift=t.timestep_shift,
                logit_mean=t.logit_mean, logit_std=t.logit_std, mode_scale=t.mode_scale,
            )  # fmt: skip
            dev, dt = self.device, self.weight_dtype

            inputs = (to_device(batch["latents"], dev, dt), to_device(batch["prompt_embeds"], dev, dt),
                      to_device(batch["pooled_prompt_embeds"], dev, dt), to_device(noise, dev, dt), to_device(sigmas, dev))
            pixel_weights = _pixel_weights(batch, cfg.data.unmasked_weight)

            def compute_loss(inputs: tuple[torch.Tensor, ...] = inputs, g: int = g,
                             pixel_weights: torch.Tensor | None = pixel_weights,
                             captions: list[str] = batch["captions"]) -> torch.Tensor:
                if self.text is not None:  # text-encoder LoRA: the trained encoders' embeddings, computed now
                    inputs = (inputs[0], *self.text.encode(captions, inputs[1], inputs[2]), *inputs[3:])
                loss = flow_loss(self.transformer, *inputs, weighting=t.loss_weighting,
                                 precondition=t.precondition_outputs, pixel_weights=pixel_weights)
                if self.prior is not None:  # loss = instance + prior_loss_weight * class (sd35hub.train.prior)
                    from sd35hub.train.prior import combine

                    prior_loss = self.prior.loss(self.transformer, g, train=t, device=self.device, dtype=self.weight_dtype,
                                                 text=self.text)
                    parts.append(torch.stack([loss.detach(), prior_loss.detach()]))
                    loss = combine(loss, prior_loss, self.prior.weight)
                return loss

            losses.append(optimize_micro_batch(acc, self.transformer, self.params, self.optimizer, compute_loss,
                                               attention=self.attention_kernel, max_grad_norm=t.max_grad_norm,
                                               unsynced=self.text_params + [p for p in self.pivotal_params if p.requires_grad]))
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        if self.pivotal is not None:
            self.pivotal.after_step(state.step + 1)
        # bookkeeping for every process's micro-batches (refs are deterministic: no communication)
        digest = hashlib.sha256(state.seen_keys_digest.encode())
        for g in range(base, base + self.micro_per_step):
            entries = self._ref(g).entries
            state.samples_seen += len(entries)
            digest.update("\n".join(self.batches.index.entries[i].key for i in entries).encode())
        state.seen_keys_digest = digest.hexdigest()
        nxt = base + self.micro_per_step
        state.epoch, state.batch_in_epoch = divmod(nxt, self.batches_per_epoch)
        # instance and prior losses of this step (mean over micro-batches and processes), for the log
        self.loss_parts = acc.reduce(torch.stack(parts).mean(0), reduction="mean") if parts else None
        return acc.reduce(torch.stack(losses).mean(), reduction="mean")  # a device tensor: no sync here

    def _loss_parts_named(self) -> dict[str, torch.Tensor]:
        if getattr(self, "loss_parts", None) is None:
            return {}
        return {"instance_loss": self.loss_parts[0], "prior_loss": self.loss_parts[1]}

    def _emit_log(self, pending: PendingLog, bar: Any) -> None:
        """Write a log point's record with its loss (waits for that step's GPU work only)."""
        rest = dict(pending.record)
        record = {"step": rest.pop("step"), "loss": pending.loss(), **pending.extras(), **rest}
        self.final_loss = record["loss"]
        self._log_record(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", s_step=f"{record['s_per_step']:.2f}",
                        **({"mem": f"{record['gpu_mem_gib']}G"} if "gpu_mem_gib" in record else {}))

    def _log_record(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.metrics is not None:
            self.metrics.write(record)
        if self.acc.trackers:
            self.acc.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def read_metrics(self) -> list[dict[str, Any]]:
        return self.metrics.read() if getattr(self, "metrics", None) is not None else self.records

    # ------------------------------------------------------------------------ validation + ckpt
    def validate(self, step: int) -> float | None:
        """Held-out loss + a base-vs-LoRA grid (main process); every process waits for it."""
        with self._phase("validate"):
            return self._validate(step)

    def _validate(self, step: int) -> float | None:
        loss = None
        if self.main:
            model = self.acc.unwrap_model(self.transformer)
            model.eval()
            try:
                with self._published_weights(), eager():  # eager: no extra compiled graphs for these shapes
                    if self.heldout is not None:
                        heldout = self.heldout
                        if self.text is not None:  # the adapted text encoders' embeddings of the held-out captions
                            from sd35hub.train.live_text import live_heldout

                            heldout = live_heldout(heldout, self.text)
                        loss = self._heldout_loss(model, heldout, step)
                        self._log_record({"step": step, "validation_loss": loss})
                    self.validation_grid = self._render_grid(model, step)
            finally:
                model.train()
            which = "held-out" if self.heldout is None or self.heldout.source == "held-out" else "training-sample"
            self.log(f"step {step}: {which} validation loss {loss if loss is None else round(loss, 5)}, grid {self.validation_grid}")
        self.acc.wait_for_everyone()
        return loss

    def _heldout_loss(self, model: Any, heldout: Any, step: int) -> float:
        """The held-out loss; before the first step of a fresh run read from (or written to) the cache of
        earlier runs with the same base, LoRA settings and held-out inputs (sd35hub.train.base_grid)."""
        from sd35hub.train.variants import rewrites_base

        cache = None
        if step == 0 and self.text is None and self.pivotal is None and not rewrites_base(self.config.lora):
            from sd35hub.train.base_grid import StepZeroLoss

            cache = StepZeroLoss.for_trainer(self, heldout)
            loss = cache.load()
            if loss is not None:
                self.log(f"validation: the step-0 held-out loss read from the cache ({cache.path.name})")
                return loss
        loss = validation.heldout_loss(model, heldout, device=self.device, dtype=self.weight_dtype,
                                       autocast=self.acc.autocast())
        if cache is not None:
            cache.save(loss)
        return loss

    def _render_kwargs(self) -> dict[str, Any]:
        from sd35hub.models.presets import skip_layer_kwargs

        t = self.config.train
        return dict(size=self.config.data.resolution, steps=t.validation_steps, guidance=t.validation_guidance,
                    seed=t.validation_seed, device=self.device, dtype=self.weight_dtype,
                    pipe_kwargs=skip_layer_kwargs(t, t.validation_guidance))

    def _render_base(self) -> None:
        """The base column of the validation grids, rendered before any adapter is attached."""
        self.base_images = self._base_column(None, self._render_kwargs())

    @contextlib.contextmanager
    def _vae_on_device(self) -> Iterator[None]:
        """The VAE on the device for the decodes inside (loaded first when the cache build needed none)."""
        from sd35hub.train.phased import ensure_vae

        vae = ensure_vae(self)
        vae.to(self.device)
        try:
            yield
        finally:
            vae.to("cpu")

    def _base_column(self, model: Any, kwargs: dict[str, Any]) -> list[Any]:
        """The base model's images of the validation prompts: read from the base-grid cache of earlier runs
        with the same inputs (sd35hub.train.base_grid), else sampled (adapters disabled) and cached."""
        from sd35hub.train.base_grid import BaseGridCache

        cache = BaseGridCache.for_trainer(self, kwargs)
        images = cache.load()
        if images is not None:
            self.log(f"validation: the base model's column read from the cache ({cache.folder})")
            return images
        with self._vae_on_device(), self.acc.autocast():
            if model is not None:
                model.disable_adapters()
            try:
                images = validation.render(self.pipe, self.prompts, **kwargs)
            finally:
                if model is not None:
                    model.enable_adapters()
        cache.save(images)
        return images

    def _render_grid(self, model: Any, step: int) -> Path:
        pipe = self.pipe
        kwargs = self._render_kwargs()
        if not hasattr(self, "base_images"):
            self.base_images = self._base_column(model, kwargs)
        if step == 0 and self.pivotal is None:
            # no optimizer step yet: peft starts lora_B at zero for every lora.init (default and gaussian),
            # so the adapter (and its EMA) adds nothing and the LoRA column is the base column
            self.lora_images = self.base_images
        else:
            with self._vae_on_device(), self.acc.autocast():
                if self.text is not None:  # the prompts (and the negative "") through the adapted text encoders
                    from sd35hub.train.live_text import live_prompts

                    self.lora_images = validation.render(pipe, live_prompts(self.prompts, self.text), **kwargs)
                else:
                    self.lora_images = validation.render(pipe, self.prompts, **kwargs)
        columns = ["base model", f"LoRA, step {step}"]
        image = validation.grid(list(zip(columns, (self.base_images, self.lora_images), strict=True)), rows=self.prompts.prompts)
        return validation.save_png(image, self.output_dir / "samples" / f"step_{step:06d}.png",
                                   self.image_params(self.prompts.prompts, step=step, columns=columns))

    def image_params(self, prompts: list[str], *, step: int, columns: list[str] | None = None, seed: int | None = None) -> dict[str, Any]:
        """PNG text chunks of a validation grid or image (prompts, seeds, sampler settings, base, step)."""
        t = self.config.train
        return validation.image_params(base_model=outputs.public_base_model(self), prompts=prompts,
                                       size=self.config.data.resolution, steps=t.validation_steps,
                                       guidance=t.validation_guidance, seed=t.validation_seed if seed is None else seed,
                                       step=step, columns=columns)  # fmt: skip

    def save_checkpoint(self) -> Path | None:
        from sd35hub.train.lora import lora_state

        path = None
        self.acc.wait_for_everyone()
        if self.main:
            model = self.acc.unwrap_model(self.transformer)
            self.state.extra["duration_s"] = round(self._elapsed(), 3)
            lora = {**lora_state(model), **(self.text.lora_state() if self.text is not None else {})}
            path = ckpt.save_checkpoint(
                self.checkpoint_dir, self.state, lora=lora, optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(), scaler=self.acc.scaler.state_dict() if self.acc.scaler else None,
                ema=self.ema.state_dict() if self.ema is not None else None, write_adapter=self.write_adapter_to,
                keep=self.config.train.keep_checkpoints,
            )  # fmt: skip
            if self.config.hub.push_checkpoints and self.config.hub.repo_id:
                from sd35hub.hub.publish import push_checkpoint  # a failed push warns; training goes on

                push_checkpoint(path / outputs.ADAPTER_FILE, self.config.hub.repo_id, step=self.state.step,
                                private=self.config.hub.private)
            if self.config.hub.resume_branch:  # the full checkpoint, to resume on another machine
                from sd35hub.train.resume import push_after_save

                push_after_save(self, path)
        self.acc.wait_for_everyone()
        return path

    def write_adapter_to(self, folder: Path) -> Path:
        """The adapter as published, with the EMA weights when train.ema_decay is set (checkpoints and
        the final adapter alike); the trained weights are back in place afterwards, even on an error."""
        from sd35hub.adapters.files import AdapterMetadata
        from sd35hub.train.variants import save_trained

        cfg = self.config
        metadata = AdapterMetadata(
            rank=cfg.lora.rank, alpha=float(cfg.lora.alpha or cfg.lora.rank), base_model=outputs.public_base_model(self),
            variant=self.info.variant, config_digest=self.digest,
            trigger_words=[cfg.data.trigger_word] if cfg.data.trigger_word else [],
        )  # fmt: skip
        with self._published_weights():
            path = save_trained(self.acc.unwrap_model(self.transformer), folder, metadata=metadata, spec=cfg.lora,
                                initial=self.initial_adapter,
                                text_encoders=self.text.lora_encoders() if self.text is not None else None)
        if self.pivotal is not None:  # embeddings.safetensors next to the adapter (sd35hub.adapters.embeddings)
            self.pivotal.save(folder)
        return path

    @contextlib.contextmanager
    def _published_weights(self) -> Iterator[None]:
        """The EMA weights in the model when train.ema_decay is set (validation, saved adapters); the
        trained weights are back in place afterwards, even on an error."""
        if self.ema is None:
            yield
            return
        self.ema.swap_in()
        try:
            yield
        finally:
            self.ema.swap_out()

    # ------------------------------------------------------------------------------------- save
    def save(self) -> TrainResult:
        """Adapter (EMA weights when on), final images, loss plot, summary, card; then publish.
        A finished run that was resumed keeps what it wrote: its result is read back."""
        if self.finished:
            return outputs.read_result(self.output_dir)
        with self._phase("save / publish"):
            result = outputs.finish(self)
        if self.main and getattr(self, "phases", None) is not None:  # every phase's measured peaks + the plan
            import json

            from sd35hub.paths import atomic_write_text

            atomic_write_text(self.output_dir / "memory.json", json.dumps(self.phases.report(), indent=2))
        return result

    def cleanup(self) -> None:
        lock = getattr(self, "run_lock", None)
        if lock is not None:
            lock.release()
        acc = getattr(self, "acc", None)
        if acc is not None:
            if acc.trackers:
                acc.end_training()
            acc.free_memory()
        self.pipe = None
        self.text = None  # the live text encoders (lora.text_encoders)


def _pixel_weights(batch: dict[str, Any], unmasked_weight: float) -> torch.Tensor | None:
    """Masked loss (data.masked_loss): the batch's cached latent-grid masks as per-pixel loss weights."""
    if "mask" not in batch:
        return None
    from sd35hub.data.masks import pixel_weights

    return pixel_weights(batch["mask"], unmasked_weight)


def _bound_resolution(cfg: Config, max_side: int) -> tuple[Config, list[str]]:
    """data.resolution clamped to the base's largest side; notes for the clamp and the dropped buckets."""
    import dataclasses

    from sd35hub.data.buckets import bounded_buckets

    resolution, _, notes = bounded_buckets(cfg.data.resolution, max_side)
    if resolution != cfg.data.resolution:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=resolution))
    return cfg, notes


def _seed(*parts: object) -> int:
    from sd35hub.data.sources import stable_seed

    return stable_seed(*parts) % (2**63)


def train(config: Config, *, log: Callable[[str], None] | None = None,
          on_step: StepCallback | None = None, progress: bool = True) -> TrainResult:
    """Train a LoRA adapter as ``config`` says; returns what it wrote (see the module docstring)."""
    from sd35hub.access import checks_once

    trainer = Trainer(config, log=log, on_step=on_step, progress=progress)
    with checks_once():  # the base is asked once: by the access check, not again by each download
        try:
            trainer.setup()
            trainer.train()
            return trainer.save()
        finally:
            trainer.cleanup()
