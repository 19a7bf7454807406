"""The base-model column of the validation grid, kept across runs.

Before any optimizer step the adapter adds nothing (peft starts lora_B at zero), so the grid's "base
model" column depends only on the base and the sampler inputs. A later run with the same inputs reads
the images back instead of sampling them (and needs no VAE for its step-0 grid):

    cache = BaseGridCache.for_trainer(trainer, render_kwargs)
    images = cache.load()            # None when absent, incomplete or unreadable
    cache.save(images)               # PNG (lossless: the pipeline's images are 8-bit RGB), published atomically

The key covers everything that changes those pixels: the transformer, VAE and scheduler files (a Hub
snapshot's commit, or every file's path, size and mtime of a local folder), model.quantize / float8 /
dtype / attention, the weight dtype, mixed precision, the device type, torch and diffusers versions,
the prompt embeddings themselves (so the prompts and the text encoders that made them), size, sampler
steps, guidance, seed, the skip-layer arguments and VAE tiling. Folder: <data_cache_root()>/base-grids/<key>.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEY_VERSION = "1"
BASE_COMPONENTS = ("transformer", "vae", "scheduler")


def embeddings_digest(prompts: list[str], embeds: dict[str, Any]) -> str:
    """sha256 of the prompts and every embedding tensor's dtype, shape and bytes."""
    import torch

    h = hashlib.sha256(json.dumps(list(prompts)).encode())
    for name in sorted(embeds):
        t = embeds[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def grid_key(*, model: str, revision: str | None, quantize: str, float8: bool, dtype: str, attention: str,
             weight_dtype: Any, mixed_precision: str, device_type: str, embeddings: str, render: dict[str, Any],
             tiling: bool) -> dict[str, Any]:
    import diffusers
    import torch

    from sd35hub.data.cache_key import model_fingerprint

    return {"key": KEY_VERSION, "model": model_fingerprint(model, revision, BASE_COMPONENTS), "quantize": quantize,
            "float8": float8, "dtype": dtype, "attention": attention, "weight_dtype": str(weight_dtype),
            "mixed_precision": mixed_precision, "device": device_type, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "embeddings": embeddings, "render": render, "tiling": tiling}  # fmt: skip


@dataclass
class BaseGridCache:
    folder: Path
    count: int
    key: dict[str, Any]

    @classmethod
    def for_trainer(cls, trainer: Any, render_kwargs: dict[str, Any]) -> BaseGridCache:
        from sd35hub.data.cache_key import data_cache_root

        cfg, plan = trainer.config, trainer.plan
        render = {k: v for k, v in render_kwargs.items() if k not in ("device", "dtype")}
        render["pipe_kwargs"] = json.loads(json.dumps(render.get("pipe_kwargs") or {}, default=str))
        key = grid_key(model=cfg.model.name, revision=cfg.model.revision, quantize=cfg.model.quantize,
                       float8=bool(cfg.model.float8), dtype=cfg.model.dtype, attention=cfg.model.attention,
                       weight_dtype=trainer.weight_dtype, mixed_precision=cfg.train.mixed_precision,
                       device_type=trainer.device.type, embeddings=embeddings_digest(trainer.prompts.prompts, trainer.prompts.embeds),
                       render=render, tiling=bool(plan is not None and plan.vae_tiling))  # fmt: skip
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
        return cls(data_cache_root() / "base-grids" / digest, len(trainer.prompts.prompts), key)

    def _complete(self, folder: Path) -> bool:
        return (folder / "key.json").is_file() and all((folder / f"{i}.png").is_file() for i in range(self.count))

    def load(self) -> list[Any] | None:
        """The cached images (RGB), or None (absent, incomplete, written for another key, unreadable)."""
        from PIL import Image

        if not self._complete(self.folder):
            return None
        try:
            if json.loads((self.folder / "key.json").read_text()) != json.loads(json.dumps(self.key, default=str)):
                return None
            images = []
            for i in range(self.count):
                with Image.open(self.folder / f"{i}.png") as image:
                    image.load()
                    images.append(image.convert("RGB"))
            return images
        except Exception:  # noqa: BLE001 - unreadable: sampled again and written anew
            return None

    def save(self, images: list[Any]) -> Path | None:
        """Publish ``images`` under the key (a folder renamed into place; a broken one is replaced)."""
        import shutil

        from sd35hub.paths import build_into_place

        def build(staging: Path) -> None:
            for i, image in enumerate(images):
                image.save(staging / f"{i}.png", format="PNG")
            (staging / "key.json").write_text(json.dumps(self.key, indent=1, default=str))

        try:
            if self._complete(self.folder) and self.load() is None:  # complete but unreadable or foreign
                shutil.rmtree(self.folder, ignore_errors=True)
            return build_into_place(self.folder, build, self._complete)
        except OSError:  # a read-only or full cache never stops training
            return None


def heldout_digest(heldout: Any) -> str:
    """sha256 of every fixed input of the held-out loss (sd35hub.train.validation.HeldOut)."""
    tensors = {name: getattr(heldout, name) for name in ("latents", "prompt_embeds", "pooled_prompt_embeds", "noise",
                                                         "sigmas", "weights") if getattr(heldout, name) is not None}  # fmt: skip
    return embeddings_digest(list(heldout.keys), tensors)


@dataclass
class StepZeroLoss:
    """The held-out loss before the first step, kept across runs: the adapter adds nothing yet, so it is
    a function of the base, the LoRA settings and seed (the layers it wraps), and the fixed held-out inputs.
    Used only where that holds exactly: no live text encoders, no pivotal rows, no base-rewriting init."""

    path: Path
    key: dict[str, Any]

    @classmethod
    def for_trainer(cls, trainer: Any, heldout: Any) -> StepZeroLoss:
        import dataclasses

        import peft

        from sd35hub.data.cache_key import data_cache_root

        cfg = trainer.config
        key = grid_key(model=cfg.model.name, revision=cfg.model.revision, quantize=cfg.model.quantize,
                       float8=bool(cfg.model.float8), dtype=cfg.model.dtype, attention=cfg.model.attention,
                       weight_dtype=trainer.weight_dtype, mixed_precision=cfg.train.mixed_precision,
                       device_type=trainer.device.type, embeddings=heldout_digest(heldout), render={}, tiling=False)  # fmt: skip
        key.update(what="step-0 held-out loss", peft=peft.__version__, lora=dataclasses.asdict(cfg.lora),
                   seed=cfg.train.seed, attention_kernel=getattr(trainer, "attention_kernel", "auto"),
                   ema=cfg.train.ema_decay)  # fmt: skip
        key = json.loads(json.dumps(key, sort_keys=True, default=str))
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return cls(data_cache_root() / "base-losses" / f"{digest}.json", key)

    def load(self) -> float | None:
        try:
            raw = json.loads(self.path.read_text())
            return float(raw["loss"]) if raw.get("key") == self.key else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, loss: float) -> None:
        from sd35hub.paths import atomic_write_text

        try:
            atomic_write_text(self.path, json.dumps({"key": self.key, "loss": loss}))
        except OSError:  # a read-only or full cache never stops training
            pass
