"""The encoders of the cache build, one phase at a time (the memory plan of sd35hub.workflows.plan).

    encoders = PhasedEncoders("stabilityai/stable-diffusion-3.5-large", device="cuda", dtype=torch.bfloat16,
                              t5="gpu-nf4", joint_attention_dim=4096)
    with encoders.image_encoder() as encode:          # the VAE alone on the device
        mean, std = encode(pixel_values)
    store = encoders.encode_texts(texts, stage_dir)   # CLIP-L, then CLIP-G, then T5: each loaded, run, freed

Each text encoder is loaded straight onto the device (sd35hub.models.load.load_component), runs over
every text, writes its outputs in chunks to ``stage_dir`` and is released before the next one loads,
so at most one encoder is ever in memory. The chunks are then combined exactly as diffusers'
``StableDiffusion3Pipeline.encode_prompt`` does (CLIP-L ‖ CLIP-G padded to T5's width, then T5 after
them; pooled = CLIP-L ‖ CLIP-G), using the pipeline's own per-encoder helpers.
:class:`PipelineEncoders` gives the same interface over an already loaded pipeline (everything in
memory at once: prior preservation, small models, tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

TEXT_CHUNK = 64  # texts per staged file (bounded host memory: one chunk of each encoder at a time)
PhaseHook = Callable[[str, int], contextlib.AbstractContextManager[Any]]


def _no_phase(name: str, items: int) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


class TextStore:
    """Combined (prompt_embeds [S, D], pooled [P]) of text i, read from the staged chunk files."""

    def __init__(self, folder: Path, count: int) -> None:
        self.folder, self.count = folder, count
        self._chunk: tuple[int, dict[str, torch.Tensor]] | None = None

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file

        chunk = i // TEXT_CHUNK
        if self._chunk is None or self._chunk[0] != chunk:
            self._chunk = (chunk, load_file(str(self.folder / f"text-{chunk:05d}.safetensors")))
        tensors = self._chunk[1]
        row = i % TEXT_CHUNK
        return tensors["prompt_embeds"][row], tensors["pooled_prompt_embeds"][row]

    def many(self, indices: list[int]) -> dict[str, torch.Tensor]:
        pairs = [self.get(i) for i in indices]
        return {"prompt_embeds": torch.stack([p for p, _ in pairs]), "pooled_prompt_embeds": torch.stack([q for _, q in pairs])}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _chunks(texts: list[str]) -> Iterator[tuple[int, list[str]]]:
    for start in range(0, len(texts), TEXT_CHUNK):
        yield start // TEXT_CHUNK, texts[start : start + TEXT_CHUNK]


def _batched(texts: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(texts), size):
        yield texts[start : start + size]


def _counting(entry: Any, encode: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    """``encode`` that adds the images it encodes to a phase's item count (throughput)."""

    def run(pixels: torch.Tensor) -> Any:
        if isinstance(entry, dict):
            entry["items"] = entry.get("items", 0) + int(pixels.shape[0])
        return encode(pixels)

    return run


def vae_posterior(vae: Any, pixel_values: torch.Tensor, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        posterior = vae.encode(pixel_values.to(device=device, dtype=vae.dtype)).latent_dist
    return posterior.mean, posterior.std


class PipelineEncoders:
    """Every encoder of an already loaded StableDiffusion3Pipeline (nothing loaded or freed here)."""

    def __init__(self, pipe: Any, *, device: Any, dtype: torch.dtype, max_sequence_length: int,
                 batch_size: int = 8, phase: PhaseHook = _no_phase) -> None:
        self.pipe, self.device, self.dtype, self.max_sequence_length = pipe, device, dtype, max_sequence_length
        self.batch_size, self.phase = batch_size, phase
        self.drop_t5 = getattr(pipe, "text_encoder_3", None) is None
        self.vae_config = pipe.vae.config

    @contextlib.contextmanager
    def image_encoder(self, items: int = 0) -> Iterator[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
        with self.phase("encode images (VAE)", items) as entry:
            yield _counting(entry, lambda pixels: vae_posterior(self.pipe.vae, pixels, self.device))

    def encode_texts(self, texts: list[str], folder: Path) -> TextStore:
        folder.mkdir(parents=True, exist_ok=True)
        with self.phase("encode captions (all encoders)", len(texts)), torch.no_grad():
            for chunk, part in _chunks(texts):
                embeds, pooled = [], []
                for batch in _batched(part, self.batch_size):
                    pe, _, pp, _ = self.pipe.encode_prompt(
                        prompt=batch, prompt_2=None, prompt_3=None, device=self.device,
                        do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
                    )  # fmt: skip
                    embeds.append(pe.to(self.dtype).cpu())
                    pooled.append(pp.to(self.dtype).cpu())
                _save({"prompt_embeds": torch.cat(embeds), "pooled_prompt_embeds": torch.cat(pooled)},
                      folder / f"text-{chunk:05d}.safetensors")
        return TextStore(folder, len(texts))


class PhasedEncoders:
    """VAE, CLIP-L, CLIP-G and T5-XXL loaded one at a time straight onto the device, each freed after.

    ``t5``: gpu | gpu-int8 | gpu-nf4 | cpu | dropped (the memory plan's choice). ``vae_config`` is read
    when the VAE loads; ``keep_vae`` keeps it (on the CPU) for validation decodes afterwards."""

    def __init__(self, model: str, *, device: Any, dtype: torch.dtype, max_sequence_length: int,
                 joint_attention_dim: int, t5: str = "gpu", revision: str | None = None, batch_size: int = 8,
                 phase: PhaseHook = _no_phase) -> None:
        self.model, self.revision, self.device, self.dtype = model, revision, device, dtype
        self.max_sequence_length, self.joint_attention_dim = max_sequence_length, joint_attention_dim
        self.t5, self.batch_size, self.phase = t5, batch_size, phase
        self.drop_t5 = t5 == "dropped"
        self.vae: Any = None
        self._vae_config: Any = None

    @property
    def vae_config(self) -> Any:
        """The VAE's config (shift/scaling factors) from vae/config.json: no weights are read."""
        if self._vae_config is None:
            from diffusers import AutoencoderKL

            from sd35hub.models.load import model_dir, resolve_model

            folder = model_dir(resolve_model(self.model, self.revision), ("vae",), configs_only=True)
            self._vae_config = AutoencoderKL.load_config(folder, subfolder="vae")
        return self._vae_config

    def load_vae(self) -> Any:
        from sd35hub.models.load import load_component

        if self.vae is None:
            self.vae = load_component(self.model, "vae", dtype=self.dtype, revision=self.revision)
        return self.vae

    @contextlib.contextmanager
    def image_encoder(self, items: int = 0) -> Iterator[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
        with self.phase("encode images (VAE)", items) as entry:
            vae = self.load_vae().to(self.device)
            vae.enable_slicing()
            try:
                yield _counting(entry, lambda pixels: vae_posterior(vae, pixels, self.device))
            finally:
                vae.to("cpu")  # 0.2 GB: kept for validation decodes
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _stage_pipe(self, **components: Any) -> Any:
        from diffusers import StableDiffusion3Pipeline

        parts = dict.fromkeys(("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                               "tokenizer_2", "text_encoder_3", "tokenizer_3"))  # fmt: skip
        parts.update(components)
        return StableDiffusion3Pipeline(**parts)

    def _run_stage(self, name: str, label: str, texts: list[str], folder: Path,
                   encode: Callable[[Any, list[str]], dict[str, torch.Tensor]], quantize: str = "none",
                   device: Any = None) -> None:
        from sd35hub.models.load import empty_cache, load_component, load_tokenizer, release

        device = self.device if device is None else device
        tokenizer = load_tokenizer(self.model, name.replace("text_encoder", "tokenizer"), revision=self.revision)
        with self.phase(f"encode captions ({label})", len(texts)):
            dtype = self.dtype if str(device) != "cpu" or self.dtype != torch.float16 else torch.bfloat16
            module = load_component(self.model, name, dtype=dtype, revision=self.revision, quantize=quantize,
                                    device=device)  # fmt: skip
            try:
                key = "text_encoder_3" if name == "text_encoder_3" else "text_encoder"
                pipe = self._stage_pipe(**{key: module, key.replace("text_encoder", "tokenizer"): tokenizer})
                with torch.no_grad():
                    for chunk, part in _chunks(texts):
                        outs = [encode(pipe, batch) for batch in _batched(part, self.batch_size)]
                        merged = {k: torch.cat([o[k] for o in outs]).to(self.dtype).cpu() for k in outs[0]}
                        _save(merged, folder / f"{name}-{chunk:05d}.safetensors")
            finally:
                pipe = None
                release(module)
                del module  # the last reference: its memory is free before the next encoder loads
                empty_cache()

    def encode_texts(self, texts: list[str], folder: Path) -> TextStore:
        from safetensors.torch import load_file

        folder.mkdir(parents=True, exist_ok=True)
        device = self.device

        def clip(pipe: Any, batch: list[str]) -> dict[str, torch.Tensor]:
            embeds, pooled = pipe._get_clip_prompt_embeds(prompt=batch, device=device, clip_model_index=0)
            return {"embeds": embeds, "pooled": pooled}

        self._run_stage("text_encoder", "CLIP-L", texts, folder, clip)
        self._run_stage("text_encoder_2", "CLIP-G", texts, folder, clip)
        if not self.drop_t5:
            t5_device = "cpu" if self.t5 == "cpu" else device
            quantize = self.t5.split("-")[1] if self.t5.startswith("gpu-") else "none"

            def t5(pipe: Any, batch: list[str]) -> dict[str, torch.Tensor]:
                if getattr(self, "mask_t5_padding", False):  # data.mask_t5_padding (sd35hub.models.t5mask)
                    from sd35hub.models.t5mask import install_t5_padding_mask

                    install_t5_padding_mask(pipe)
                return {"embeds": pipe._get_t5_prompt_embeds(prompt=batch, max_sequence_length=self.max_sequence_length,
                                                             device=t5_device, dtype=self.dtype)}  # fmt: skip

            self._run_stage("text_encoder_3", "T5-XXL", texts, folder, t5, quantize=quantize, device=t5_device)
        for chunk, part in _chunks(texts):  # combine as StableDiffusion3Pipeline.encode_prompt does
            clip_l = load_file(str(folder / f"text_encoder-{chunk:05d}.safetensors"))
            clip_g = load_file(str(folder / f"text_encoder_2-{chunk:05d}.safetensors"))
            if self.drop_t5:  # the pipeline's zero T5 block: tokenizer_max_length (77) tokens
                t5_embeds = torch.zeros((len(part), 77, self.joint_attention_dim), dtype=self.dtype)
            else:
                t5_embeds = load_file(str(folder / f"text_encoder_3-{chunk:05d}.safetensors"))["embeds"]
            clip_embeds = torch.cat([clip_l["embeds"], clip_g["embeds"]], dim=-1)
            clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
            _save({"prompt_embeds": torch.cat([clip_embeds, t5_embeds], dim=-2),
                   "pooled_prompt_embeds": torch.cat([clip_l["pooled"], clip_g["pooled"]], dim=-1)},
                  folder / f"text-{chunk:05d}.safetensors")  # fmt: skip
        return TextStore(folder, len(texts))
