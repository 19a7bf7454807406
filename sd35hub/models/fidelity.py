"""Subject fidelity as the DreamBooth paper measures it (Ruiz et al. 2023, section 4.1):

    CLIP-T   prompt fidelity: cosine similarity of a generated image's CLIP image embedding and its
             prompt's CLIP text embedding, averaged over the prompt's images
    CLIP-I   subject fidelity: cosine similarity of CLIP image embeddings of generated and instance
             (real) images, averaged over every (generated, instance) pair
    DINO     subject fidelity: the same with the CLS embedding of a self-supervised DINO ViT
             (facebook/dino-vits16, ViT-S/16 as in the paper), which separates instances of one
             class better than CLIP does

The encoders are ordinary transformers models loaded by Hub id or folder (``CLIPModel`` + its processor,
``ViTModel`` + its image processor): numbers are comparable only between runs scored with the same two
encoders, which the report names. Higher is better for all three; the mean of each is over prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from sd35hub.config import TrainSpec
from sd35hub.errors import ModelLoadError, Sd35HubError

DEFAULT_CLIP_MODEL = TrainSpec.eval_clip_model  # openai/clip-vit-base-patch32
DEFAULT_DINO_MODEL = TrainSpec.eval_dino_model  # facebook/dino-vits16
METRICS = ("clip_t", "clip_i", "dino")
EVAL_DIR = "eval"
MAX_INSTANCE_IMAGES = 64  # CLIP-I / DINO compare every generated image with each of these
GRID_CELL = 256  # pixels per grid cell (images are fitted into it)




@dataclass
class Encoders:
    """The CLIP model and the DINO ViT with their processors, on one device, in eval mode."""

    clip_model: str
    dino_model: str
    clip: Any
    clip_processor: Any
    dino: Any
    dino_processor: Any
    device: Any

    def clip_images(self, images: list[Image.Image]) -> Any:
        """[n, d] unit CLIP image embeddings."""
        import torch

        pixels = self.clip_processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self.clip.get_image_features(pixel_values=pixels.to(self.device, self.clip.dtype))
        return _unit(getattr(out, "pooler_output", out))

    def clip_texts(self, texts: list[str]) -> Any:
        """[n, d] unit CLIP text embeddings (truncated to CLIP's 77 tokens)."""
        import torch

        tokens = self.clip_processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            out = self.clip.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                              attention_mask=tokens["attention_mask"].to(self.device))
        return _unit(getattr(out, "pooler_output", out))

    def dino_images(self, images: list[Image.Image]) -> Any:
        """[n, d] unit DINO CLS embeddings (last layer, token 0)."""
        import torch

        pixels = self.dino_processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            hidden = self.dino(pixel_values=pixels.to(self.device, self.dino.dtype)).last_hidden_state
        return _unit(hidden[:, 0])


def _unit(x: Any) -> Any:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _from_pretrained(loader: Any, source: str, what: str, token: str | bool | None, **kwargs: Any) -> Any:
    """``loader.from_pretrained(source)``, with the Hub's and transformers' failures as sd35hub errors."""
    from sd35hub.access import hub_errors, translate_hub_error

    local = Path(source).expanduser()
    if local.exists():
        try:
            return loader.from_pretrained(str(local), **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"Could not load the {what} from {local}: {str(exc).splitlines()[0]}. Pass a folder "
                                 "saved with save_pretrained, or a Hub id.") from exc
    with hub_errors(source, token=token, what=f"loading the {what}"):
        try:
            return loader.from_pretrained(source, token=token, **kwargs)
        except OSError as exc:  # transformers wraps the Hub's errors in OSError: report the cause
            cause = exc.__cause__ or exc.__context__
            translated = translate_hub_error(cause, source, token=token, what=f"loading the {what}") if cause else None
            if isinstance(translated, Sd35HubError):
                raise translated from exc
            raise ModelLoadError(f"Could not load the {what} {source!r}: {str(exc).splitlines()[0]}. Pass a Hub id "
                                 "of a transformers model or a local folder.") from exc


def _dtype(device: Any) -> Any:
    import torch

    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_clip(clip_model: str = DEFAULT_CLIP_MODEL, *, device: Any = "cpu", token: str | bool | None = None) -> Any:
    """(CLIPModel in eval mode on ``device``, its processor) by Hub id or local folder (fp32 on CPU; fp16 on CUDA)."""
    from transformers import CLIPModel, CLIPProcessor

    clip = _from_pretrained(CLIPModel, clip_model, "CLIP model (eval.clip_model)", token, dtype=_dtype(device))
    processor = _from_pretrained(CLIPProcessor, clip_model, "CLIP processor (eval.clip_model)", token)
    return clip.to(device).eval(), processor


def load_encoders(clip_model: str = DEFAULT_CLIP_MODEL, dino_model: str = DEFAULT_DINO_MODEL, *,
                  device: Any = "cpu", token: str | bool | None = None) -> Encoders:
    """Load both encoders (fp32 on CPU; fp16 on CUDA) by Hub id or local folder."""
    from transformers import AutoImageProcessor, ViTModel

    clip, clip_processor = load_clip(clip_model, device=device, token=token)
    dino = _from_pretrained(ViTModel, dino_model, "DINO model (eval.dino_model)", token, dtype=_dtype(device),
                            add_pooling_layer=False)
    dino_processor = _from_pretrained(AutoImageProcessor, dino_model, "DINO image processor (eval.dino_model)", token)
    return Encoders(clip_model=clip_model, dino_model=dino_model, clip=clip, clip_processor=clip_processor,
                    dino=dino.to(device).eval(), dino_processor=dino_processor, device=device)


def clip_score(images: list[Image.Image], prompts: list[str], clip_model: str = DEFAULT_CLIP_MODEL, *,
               device: Any = None, token: str | bool | None = None) -> float:
    """Mean CLIP score, 100 * max(cos(image, text), 0) (the torchmetrics definition), of image i with prompt i:
    the CLIP-T embeddings above on a 0-100 scale (the notebook's evaluation cell). Loading failures are typed
    errors (ModelLoadError, the Hub's errors)."""
    import torch

    if len(images) != len(prompts) or not images:
        raise ValueError(
            f"clip_score needs one prompt per image, got {len(images)} images and {len(prompts)} prompts"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    clip, processor = load_clip(clip_model, device=device, token=token)
    encoders = Encoders(clip_model=clip_model, dino_model="", clip=clip, clip_processor=processor, dino=None,
                        dino_processor=None, device=device)
    cosine = (encoders.clip_images(list(images)) * encoders.clip_texts(list(prompts))).sum(-1)
    return float((100 * cosine.clamp(min=0)).mean())


@dataclass
class PromptScore:
    prompt: str  # what the images were generated from
    clip_text: str  # what CLIP-T compared them with (the prompt, or the trigger word replaced)
    images: int
    clip_t: float
    clip_i: float | None  # None without instance images
    dino: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FidelityReport:
    clip_model: str
    dino_model: str
    instance_images: int
    prompts: list[PromptScore] = field(default_factory=list)

    @property
    def mean(self) -> dict[str, float | None]:
        """Each metric's mean over the prompts (None where no prompt has it)."""
        out: dict[str, float | None] = {}
        for metric in METRICS:
            values = [getattr(p, metric) for p in self.prompts if getattr(p, metric) is not None]
            out[metric] = sum(values) / len(values) if values else None
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"clip_model": self.clip_model, "dino_model": self.dino_model, "instance_images": self.instance_images,
                "mean": self.mean, "prompts": [p.to_dict() for p in self.prompts]}

    def line(self) -> str:
        """One line for logs: 'CLIP-T 0.301, CLIP-I 0.812, DINO 0.655 (3 prompts, 10 instance images)'."""
        m = self.mean
        parts = [f"{label} {m[k]:.3f}" for k, label in zip(METRICS, ("CLIP-T", "CLIP-I", "DINO"), strict=True)
                 if m[k] is not None]
        return f"{', '.join(parts)} ({len(self.prompts)} prompts, {self.instance_images} instance images)"


def clip_text_for(prompt: str, trigger_word: str | None, replacement: str | None) -> str:
    """The text CLIP-T scores against: the prompt, with the trigger word replaced when asked (a rare token such
    as 'sks' means nothing to CLIP; DreamBooth-style reports often score 'a dog in the snow' instead)."""
    if not trigger_word or replacement is None:
        return prompt
    return " ".join(prompt.replace(trigger_word, replacement).split())


def score(encoders: Encoders, generated: list[tuple[str, list[Image.Image]]], instance: list[Image.Image], *,
          trigger_word: str | None = None, trigger_replacement: str | None = None) -> FidelityReport:
    """CLIP-T, CLIP-I and DINO of each prompt's generated images (module docstring)."""
    report = FidelityReport(clip_model=encoders.clip_model, dino_model=encoders.dino_model,
                            instance_images=len(instance))
    real_clip = encoders.clip_images(instance) if instance else None
    real_dino = encoders.dino_images(instance) if instance else None
    for prompt, images in generated:
        if not images:
            continue
        text = clip_text_for(prompt, trigger_word, trigger_replacement)
        gen_clip = encoders.clip_images(images)  # [n, d]
        clip_t = float((gen_clip @ encoders.clip_texts([text])[0]).mean())
        clip_i = float((gen_clip @ real_clip.T).mean()) if real_clip is not None else None  # mean of n x m pairs
        dino = float((encoders.dino_images(images) @ real_dino.T).mean()) if real_dino is not None else None
        report.prompts.append(PromptScore(prompt=prompt, clip_text=text, images=len(images), clip_t=clip_t,
                                          clip_i=clip_i, dino=dino))
    return report


# --- results on disk: eval.json, grid.png, the images ----------------------------------------------


@dataclass
class EvalResult:
    report: FidelityReport
    json_path: Path
    grid_path: Path
    images: list[Path]


def take_images(samples: Any, *, limit: int = MAX_INSTANCE_IMAGES, source: str = "") -> list[Image.Image]:
    """The first ``limit`` images of a sample stream (sd35hub.data.sources.open_samples)."""
    from sd35hub.errors import DatasetError

    images = []
    for sample in samples:
        images.append(sample.image)
        if len(images) >= limit:
            break
    if not images:
        raise DatasetError(f"data.source={source!r} gave no usable image to compare with: CLIP-I and DINO need "
                           "the instance images; check the source, or score CLIP-T only with --no-instance")
    return images


def evaluate_images(generated: list[tuple[str, list[Image.Image]]], instance: list[Image.Image], *,
                    clip_model: str = DEFAULT_CLIP_MODEL, dino_model: str = DEFAULT_DINO_MODEL, device: Any = "cpu",
                    trigger_word: str | None = None, trigger_replacement: str | None = None,
                    token: str | bool | None = None) -> FidelityReport:
    encoders = load_encoders(clip_model, dino_model, device=device, token=token)
    try:
        return score(encoders, generated, instance, trigger_word=trigger_word, trigger_replacement=trigger_replacement)
    finally:
        del encoders


def write_results(report: FidelityReport, out_dir: Path, generated: list[tuple[str, list[Image.Image]]],
                  instance: list[Image.Image], settings: dict[str, Any]) -> EvalResult:
    """eval.json, grid.png and one PNG per generated image, in ``out_dir``."""
    from sd35hub.paths import atomic_write, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    files: list[list[str]] = []
    for p, (_, images) in enumerate(generated):
        row = []
        for j, image in enumerate(images):
            path = out_dir / f"prompt{p:02d}_{j:02d}.png"
            atomic_write(path, lambda temp, image=image: image.save(temp, format="PNG"))
            paths.append(path)
            row.append(path.name)
        files.append(row)
    data = {**report.to_dict(), "settings": settings}
    for entry, row in zip(data["prompts"], files, strict=False):
        entry["files"] = row
    json_path = atomic_write_text(out_dir / "eval.json", json.dumps(data, indent=2, sort_keys=True) + "\n")
    grid = _grid(report, generated, instance)
    grid_path = out_dir / "grid.png"
    atomic_write(grid_path, lambda temp: grid.save(temp, format="PNG"))
    return EvalResult(report=report, json_path=json_path, grid_path=grid_path, images=paths)


def _fit(image: Image.Image) -> Image.Image:
    cell = Image.new("RGB", (GRID_CELL, GRID_CELL), "white")
    image = image.convert("RGB")
    image.thumbnail((GRID_CELL, GRID_CELL))
    cell.paste(image, ((GRID_CELL - image.width) // 2, (GRID_CELL - image.height) // 2))
    return cell


def _grid(report: FidelityReport, generated: list[tuple[str, list[Image.Image]]], instance: list[Image.Image]) -> Image.Image:
    """Row 0: instance images; then one row per prompt, its scores under the first image."""
    from sd35hub.pngmeta import make_grid

    columns = max([len(images) for _, images in generated] + [1])
    cells, labels = [], []
    shown = instance[:columns]
    for i in range(columns):
        cells.append(_fit(shown[i]) if i < len(shown) else Image.new("RGB", (GRID_CELL, GRID_CELL), "white"))
        labels.append(f"instance {i}" if i < len(shown) else "")
    scores = {s.prompt: s for s in report.prompts}
    for prompt, images in generated:
        s = scores.get(prompt)
        for j in range(columns):
            cells.append(_fit(images[j]) if j < len(images) else Image.new("RGB", (GRID_CELL, GRID_CELL), "white"))
            text = prompt[:40] if j else _score_label(s, prompt)
            labels.append(text if j < len(images) else "")
    return make_grid(cells, labels, columns, title=report.line())


def _score_label(s: Any, prompt: str) -> str:
    if s is None:
        return prompt[:40]
    parts = [f"T {s.clip_t:.3f}"] + ([f"I {s.clip_i:.3f}"] if s.clip_i is not None else []) + (
        [f"DINO {s.dino:.3f}"] if s.dino is not None else [])
    return " ".join(parts)


