"""Live text encoding: the text encoders that train (text-encoder LoRA, textual-inversion embeddings) run
every step, because their prompt embeddings change with the weights and cannot be cached.

    live = LiveTextEncoders.load("stabilityai/stable-diffusion-3.5-medium", ["text_encoder", "text_encoder_2"],
                                 device="cuda", dtype=torch.bfloat16, max_sequence_length=77)
    params = live.attach_lora(lora_spec)                    # peft LoRA on q/k/v/out_proj (diffusers' SD3 script)
    prompt_embeds, pooled = live.encode(batch["captions"], cached_prompt_embeds, cached_pooled)

What is not live comes from the cache: the cached ``prompt_embeds`` [b, 77 + T, D] hold CLIP-L ‖ CLIP-G
(hidden widths h_l + h_g, zero-padded to D) on the first 77 tokens and T5 after them; the cached
``pooled_prompt_embeds`` [b, p_l + p_g] hold CLIP-L's pooled output, then CLIP-G's. :meth:`encode` replaces
the slices of the live encoders and keeps the rest, combining them exactly as diffusers'
``StableDiffusion3Pipeline.encode_prompt`` does: each CLIP through the pipeline's own
``_get_clip_prompt_embeds`` (77 tokens, padding "max_length", the penultimate hidden state = clip_skip None,
the projected pooled output), concatenated on the feature axis, padded to T5's width, and T5 after them on
the token axis (T5, when live, through ``_get_t5_prompt_embeds``, with the data.mask_t5_padding wrapper).
Gradients flow through the live encoders (no ``no_grad`` here); they stay in eval mode (no dropout).

For textual inversion (pivotal tuning): add the new tokens to ``live.tokenizers[component]`` and resize /
train ``live.encoders[component].get_input_embeddings()``; :meth:`encode` tokenizes with those tokenizers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

CLIP_TOKENS = 77  # StableDiffusion3Pipeline.tokenizer_max_length
CLIPS = ("text_encoder", "text_encoder_2")  # CLIP-L, CLIP-G: the order of encode_prompt's concatenation
NAMES = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}  # lora.text_encoders
LABELS = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5-XXL"}
# peft targets: diffusers' train_dreambooth_lora_sd3.py (CLIP attention); T5's attention projections
LORA_TARGETS = {
    "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "text_encoder_2": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "text_encoder_3": ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o"),
}


def components(names: tuple[str, ...] | list[str]) -> list[str]:
    """lora.text_encoders names (clip_l, clip_g, t5) -> pipeline component names, in pipeline order."""
    chosen = {NAMES[n] for n in names}
    return [c for c in ("text_encoder", "text_encoder_2", "text_encoder_3") if c in chosen]


def clip_widths(model: str, revision: str | None = None) -> dict[str, tuple[int, int]]:
    """(hidden_size, projection_dim) of CLIP-L and CLIP-G from their config.json (no weights read)."""
    from transformers import CLIPTextConfig

    from sd35hub.models.load import model_dir, resolve_model

    folder = model_dir(resolve_model(model, revision), CLIPS, configs_only=True)
    out = {}
    for name in CLIPS:
        config = CLIPTextConfig.from_pretrained(folder, subfolder=name)
        out[name] = (int(config.hidden_size), int(config.projection_dim))
    return out


class LiveTextEncoders:
    """The text encoders named in ``encoders`` (component -> model, on ``device``) with their tokenizers."""

    def __init__(self, encoders: dict[str, Any], tokenizers: dict[str, Any], *, widths: dict[str, tuple[int, int]],
                 device: Any, max_sequence_length: int, mask_t5_padding: bool = False) -> None:
        unknown = sorted(set(encoders) - set(LABELS))
        if unknown:
            raise ValueError(f"LiveTextEncoders: unknown component(s) {unknown}; use {', '.join(LABELS)}")
        self.encoders, self.tokenizers, self.widths = dict(encoders), dict(tokenizers), dict(widths)
        self.device, self.max_sequence_length, self.mask_t5_padding = device, max_sequence_length, mask_t5_padding
        self._stages: dict[str, Any] = {}
        self.params: dict[str, list[torch.nn.Parameter]] = {}  # component -> its trainable LoRA tensors

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def load(cls, model: str, names: list[str], *, device: Any, dtype: torch.dtype, max_sequence_length: int,
             revision: str | None = None, mask_t5_padding: bool = False) -> LiveTextEncoders:
        """Load ``names`` (component names) straight onto ``device``, unquantized, frozen, in eval mode."""
        from sd35hub.models.load import load_component, load_tokenizer

        encoders = {n: load_component(model, n, dtype=dtype, revision=revision, device=device) for n in names}
        tokenizers = {n: load_tokenizer(model, n.replace("text_encoder", "tokenizer"), revision=revision) for n in names}
        return cls(encoders, tokenizers, widths=clip_widths(model, revision), device=device,
                   max_sequence_length=max_sequence_length, mask_t5_padding=mask_t5_padding)

    @classmethod
    def from_pipeline(cls, pipe: Any, names: list[str], *, device: Any, max_sequence_length: int,
                      mask_t5_padding: bool = False) -> LiveTextEncoders:
        """The encoders ``names`` of an already loaded StableDiffusion3Pipeline, moved to ``device``."""
        encoders = {n: getattr(pipe, n).to(device).eval() for n in names}
        tokenizers = {n: getattr(pipe, n.replace("text_encoder", "tokenizer")) for n in names}
        widths = {n: (int(getattr(pipe, n).config.hidden_size), int(getattr(pipe, n).config.projection_dim)) for n in CLIPS}
        return cls(encoders, tokenizers, widths=widths, device=device, max_sequence_length=max_sequence_length,
                   mask_t5_padding=mask_t5_padding)

    # ------------------------------------------------------------------------------------- LoRA
    def attach_lora(self, rank: int, alpha: float, *, adapter_name: str = "default",
                    only: list[str] | None = None) -> list[torch.nn.Parameter]:
        """peft LoRA (gaussian init: B = 0, so the encoders start unchanged) on each live encoder's
        LORA_TARGETS (``only``: on these components alone; the others are live for pivotal tuning's
        new-token rows); the adapter tensors in fp32. Returns every trainable tensor."""
        from peft import LoraConfig, inject_adapter_in_model

        from sd35hub.train.lora import is_adapter_param

        out: list[torch.nn.Parameter] = []
        for name, model in self.encoders.items():
            model.requires_grad_(False)
            if only is not None and name not in only:
                continue
            config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS[name]))
            inject_adapter_in_model(config, model, adapter_name=adapter_name)  # (transformers' add_adapter wants peft 0.22)
            params = [p for n, p in model.named_parameters() if p.requires_grad and is_adapter_param(n)]
            for p in params:
                p.data = p.data.float()
            self.params[name] = params
            out += params
        return out

    def lora_encoders(self) -> dict[str, Any]:
        """The live encoders that carry a LoRA (what the adapter file saves), by component."""
        return {c: m for c, m in self.encoders.items() if self.params.get(c)}

    def trainable(self) -> list[torch.nn.Parameter]:
        """Every trainable LoRA tensor of the live encoders (after :meth:`attach_lora`)."""
        return [p for params in self.params.values() for p in params]

    def named_lora_params(self) -> dict[str, torch.nn.Parameter]:
        """Trainable tensors as ``<component>/<parameter name>`` (checkpoint and EMA keys; a transformer
        parameter name never holds a '/')."""
        from sd35hub.train.lora import is_adapter_param

        return {f"{c}/{n}": p for c, m in self.encoders.items() for n, p in m.named_parameters()
                if p.requires_grad and is_adapter_param(n)}

    def lora_state(self) -> dict[str, torch.Tensor]:
        """Detached CPU fp32 copies of :meth:`named_lora_params`."""
        return {k: p.detach().float().cpu().clone() for k, p in self.named_lora_params().items()}

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy :meth:`lora_state` tensors back (exact); ConfigError via sd35hub.train.lora when they do not fit."""
        from sd35hub.train.lora import load_lora_state

        for component, model in self.encoders.items():
            prefix = f"{component}/"
            load_lora_state(model, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The base encoders inside the block (every peft layer of the live encoders off), then back on."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for model in self.encoders.values() for m in model.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    # ---------------------------------------------------------------------------------- encoding
    def _stage(self, name: str) -> Any:
        """A StableDiffusion3Pipeline holding one encoder, to call its per-encoder helper: a CLIP sits in
        the ``text_encoder`` slot (the helper casts to ``self.text_encoder.dtype``), T5 in its own."""
        if name not in self._stages:
            from diffusers import StableDiffusion3Pipeline

            parts: dict[str, Any] = dict.fromkeys(("transformer", "scheduler", "vae", "text_encoder", "tokenizer",
                                                   "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"))
            slot = "text_encoder_3" if name == "text_encoder_3" else "text_encoder"
            parts[slot] = self.encoders[name]
            parts[slot.replace("text_encoder", "tokenizer")] = self.tokenizers[name]
            pipe = StableDiffusion3Pipeline(**parts)
            if name == "text_encoder_3" and self.mask_t5_padding:
                from sd35hub.models.t5mask import install_t5_padding_mask

                install_t5_padding_mask(pipe)
            self._stages[name] = pipe
        return self._stages[name]

    def clip(self, name: str, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states [b, 77, h], pooled [b, p]) of one live CLIP."""
        return self._stage(name)._get_clip_prompt_embeds(prompt=list(captions), device=self.device, clip_model_index=0)

    def t5(self, captions: list[str]) -> torch.Tensor:
        """T5's prompt embeddings [b, max_sequence_length, D] (live T5 only)."""
        model = self.encoders["text_encoder_3"]
        return self._stage("text_encoder_3")._get_t5_prompt_embeds(
            prompt=list(captions), max_sequence_length=self.max_sequence_length, device=self.device, dtype=model.dtype)

    def encode(self, captions: list[str], prompt_embeds: torch.Tensor,
               pooled_prompt_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompt_embeds`` [b, 77 + T, D] and ``pooled_prompt_embeds`` [b, p_l + p_g] (the cached ones, on the
        device) with the live encoders' parts computed from ``captions`` now (module docstring)."""
        dtype = prompt_embeds.dtype
        cached_clip, t5 = prompt_embeds[:, :CLIP_TOKENS], prompt_embeds[:, CLIP_TOKENS:]
        sequences, pooled = [], []
        hidden_at = projected_at = 0
        for name in CLIPS:
            hidden, projected = self.widths[name]
            if name in self.encoders:
                seq, pool = self.clip(name, captions)
                seq, pool = seq.to(dtype), pool.to(dtype)
            else:
                seq = cached_clip[..., hidden_at : hidden_at + hidden]
                pool = pooled_prompt_embeds[..., projected_at : projected_at + projected]
            sequences.append(seq)
            pooled.append(pool)
            hidden_at, projected_at = hidden_at + hidden, projected_at + projected
        clip = torch.cat(sequences, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, prompt_embeds.shape[-1] - clip.shape[-1]))
        if "text_encoder_3" in self.encoders:
            t5 = self.t5(captions).to(dtype)
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def encode_no_grad(self, captions: list[str], prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                       *, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode` without gradients, ``chunk`` captions at a time; inputs and results where they are
        given (e.g. the CPU), computed on the device."""
        outs = []
        with torch.no_grad():
            for start in range(0, len(captions), chunk):
                part = slice(start, start + chunk)
                pe, pp = self.encode(captions[part], prompt_embeds[part].to(self.device),
                                     pooled_prompt_embeds[part].to(self.device))
                outs.append((pe.to(prompt_embeds.device), pp.to(pooled_prompt_embeds.device)))
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def describe(self) -> str:
        count = sum(p.numel() for ps in self.params.values() for p in ps)
        names = ", ".join(LABELS[n] for n in self.encoders)
        cached = "latents" if "text_encoder_3" in self.encoders else "T5 embeddings and latents"
        lora = ", ".join(LABELS[n] for n in self.lora_encoders())
        what = f"text-encoder LoRA on {lora} ({count / 1e6:.2f} M params)" if lora else "new-token embeddings"
        return f"{what}: {names} run every step; {cached} from the cache"


# --- the trainer's side (sd35hub.train.recipe) -----------------------------------------------------


def for_trainer(trainer: Any) -> LiveTextEncoders | None:
    """The live encoders of ``trainer.config.lora.text_encoders`` with their LoRA attached, and those of
    ``train.token_encoders`` when train.new_tokens (pivotal tuning, no LoRA unless also named), None when
    neither: taken from the validation pipeline when it holds them (prior preservation), else loaded now,
    after the transformer, onto the device, where they stay for the whole run (the memory plan counts them)."""
    cfg = trainer.config
    lora_names = components(cfg.lora.text_encoders)
    token_names = components(cfg.train.token_encoders) if cfg.train.new_tokens else []
    names = [c for c in ("text_encoder", "text_encoder_2", "text_encoder_3") if c in lora_names or c in token_names]
    if not names:
        return None
    pipe = trainer.pipe
    kwargs = dict(device=trainer.device, max_sequence_length=cfg.data.max_sequence_length,
                  mask_t5_padding=cfg.data.mask_t5_padding)
    if all(getattr(pipe, n, None) is not None for n in names):
        live = LiveTextEncoders.from_pipeline(pipe, names, **kwargs)
    else:
        live = LiveTextEncoders.load(cfg.model.name, names, dtype=trainer.weight_dtype, revision=cfg.model.revision,
                                     **kwargs)
    rank = cfg.lora.text_encoder_rank or cfg.lora.rank
    alpha = cfg.lora.text_encoder_alpha if cfg.lora.text_encoder_alpha is not None else float(rank)
    live.attach_lora(rank, alpha, only=lora_names)
    return live


def live_heldout(heldout: Any, live: LiveTextEncoders) -> Any:
    """The held-out inputs with their prompt embeddings from the live (adapted) encoders."""
    import dataclasses

    pe, pp = live.encode_no_grad(list(heldout.captions), heldout.prompt_embeds, heldout.pooled_prompt_embeds)
    return dataclasses.replace(heldout, prompt_embeds=pe, pooled_prompt_embeds=pp)


def live_prompts(encoded: Any, live: LiveTextEncoders) -> Any:
    """Validation prompts (sd35hub.train.validation.EncodedPrompts) encoded by the live (adapted) encoders; the
    negative prompt "" too, as a pipeline with the text-encoder LoRA loaded encodes it."""
    from sd35hub.train.validation import EncodedPrompts

    embeds = dict(encoded.embeds)
    n = len(encoded.prompts)
    embeds["prompt_embeds"], embeds["pooled_prompt_embeds"] = live.encode_no_grad(
        list(encoded.prompts), encoded.embeds["prompt_embeds"], encoded.embeds["pooled_prompt_embeds"])
    if "negative_prompt_embeds" in embeds:
        embeds["negative_prompt_embeds"], embeds["negative_pooled_prompt_embeds"] = live.encode_no_grad(
            [""] * n, encoded.embeds["negative_prompt_embeds"], encoded.embeds["negative_pooled_prompt_embeds"])
    return EncodedPrompts(list(encoded.prompts), embeds)
