"""Notebook helpers after training: comparison grids, evaluation, export (see sd35hub.frontends.colab).

    engine = make_engine(plan.config)                       # the base pipeline, loaded once
    scheduler_grid(engine, adapter, prompt, out=...)         # one image per sampler, same seed
    cfg_sweep(engine, adapter, prompt, out=...)              # one image per guidance scale
    blend_grid(engine, [(adapter, 0.8), ("owner/other", 0.6)], prompt, out=...)
    evaluate(output_dir, clip_model)                         # CLIP score (or why it was skipped), loss curve
    card_preview(output_dir, repo_id); publish_adapter(...); space_link(repo_id)

Every grid is a labelled PNG whose text chunks carry the parameters of each cell (sd35hub.pngmeta).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sd35hub.blend.grids import GUIDANCE_SWEEP
from sd35hub.blend.request import AdapterRef, GenerationRequest
from sd35hub.config import Config
from sd35hub.errors import Sd35HubError
from sd35hub.failures import typed_error

# The Space that blends published adapters. It reads `?adapter=owner/repo[:weight]` (repeatable) and
# preselects those adapters: https://huggingface.co/spaces/sd35hub/lora-blend?adapter=me/my-lora:0.8
DEFAULT_SPACE = "sd35hub/lora-blend"
DEFAULT_SCHEDULERS = ("euler", "heun", "dpmpp-2m", "unipc")
DEFAULT_GUIDANCE = GUIDANCE_SWEEP  # the CLI's `generate --compare cfg` sweep: one sweep for both


def make_engine(config: Config, *, vram_gib: float | None = None) -> Any:
    """A BlendEngine for the trained base as the run used it (sd35hub.workflows.inference.engine_for_run: its
    quantization, drop_t5 and T5 padding mask; CPU offload on GPUs under 40 GiB). ``vram_gib`` None: this GPU's."""
    from sd35hub.workflows.inference import engine_for_run

    return engine_for_run(config, vram_gib=vram_gib)


def _grid(engine: Any, requests: list[GenerationRequest], labels: list[str], out: Path, title: str,
          columns: int | None = None) -> Path:
    from sd35hub.blend.grids import render_grid

    return render_grid(engine, requests, labels, out=Path(out), title=title, columns=columns)


def _request(prompt: str, adapters: Sequence[AdapterRef], **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, adapters=list(adapters), **kwargs)


def sample_grid(
    engine: Any,
    adapter: str,
    prompts: Sequence[str],
    *,
    out: Path,
    steps: int | None = None,
    size: int | None = None,
    seed: int = 0,
    weight: float = 1.0,
) -> Path:
    """Base model (top row) vs the adapter (bottom row) for each prompt, same seeds."""
    base = [_request(p, [], steps=steps, width=size, height=size, seed=seed) for p in prompts]
    tuned = [_request(p, [AdapterRef(adapter, weight)], steps=steps, width=size, height=size, seed=seed)
             for p in prompts]  # fmt: skip
    labels = [f"base: {p[:30]}" for p in prompts] + [f"LoRA {weight}: {p[:28]}" for p in prompts]
    return _grid(engine, base + tuned, labels, out, "base vs adapter", columns=len(prompts))


def scheduler_grid(
    engine: Any,
    adapter: str,
    prompt: str,
    *,
    out: Path,
    schedulers: Sequence[str] = DEFAULT_SCHEDULERS,
    steps: int | None = None,
    size: int | None = None,
    seed: int = 0,
) -> Path:
    """The same prompt, seed and adapter under each sampler (sd35hub.blend.schedulers names)."""
    from sd35hub.blend.grids import sweep

    one = _request(prompt, [AdapterRef(adapter)], steps=steps, width=size, height=size, seed=seed)
    requests, labels = sweep(one, "schedulers", schedulers)
    return _grid(engine, requests, labels, out, f"samplers, seed {seed}")


def cfg_sweep(
    engine: Any,
    adapter: str,
    prompt: str,
    *,
    out: Path,
    scales: Sequence[float] = DEFAULT_GUIDANCE,
    steps: int | None = None,
    size: int | None = None,
    seed: int = 0,
) -> Path:
    """The same prompt and seed at each classifier-free guidance scale."""
    from sd35hub.blend.grids import sweep

    one = _request(prompt, [AdapterRef(adapter)], steps=steps, width=size, height=size, seed=seed)
    requests, labels = sweep(one, "cfg", scales)
    return _grid(engine, requests, labels, out, f"guidance sweep, seed {seed}")


def blend_grid(
    engine: Any,
    adapters: Sequence[tuple[str, float]],
    prompt: str,
    *,
    out: Path,
    steps: int | None = None,
    size: int | None = None,
    seed: int = 0,
) -> Path:
    """Base, each adapter alone at its weight, then all of them blended (``set_adapters`` with weights)."""
    refs = [AdapterRef(source, weight) for source, weight in adapters]
    kwargs: dict[str, Any] = dict(steps=steps, width=size, height=size, seed=seed)
    requests = [_request(prompt, [], **kwargs)] + [_request(prompt, [r], **kwargs) for r in refs]
    requests.append(_request(prompt, refs, **kwargs))
    labels = ["base"] + [f"{r.source.split('/')[-1][:24]} {r.weight:g}" for r in refs] + ["blend"]
    return _grid(engine, requests, labels, out, "blend: " + " + ".join(f"{r.weight:g}" for r in refs))


# ------------------------------------------------------------------------------------ evaluation
def clip_score(
    images: Sequence[Any], prompts: Sequence[str], model_id: str, *, device: str | None = None
) -> float:
    """Mean CLIP score (0-100) of each image with its prompt: sd35hub.models.fidelity.clip_score, the CLIP
    embeddings `sd35hub eval` and the trainer use; ``model_id`` is a CLIPModel on the Hub or a local folder."""
    from sd35hub.models.fidelity import clip_score as score

    return score(list(images), list(prompts), model_id, device=device)


@dataclass
class Evaluation:
    clip_score: float | None
    clip_message: str  # the score and its model, or why it was skipped
    images: int  # validation images scored (or that would have been)
    loss_plot: Path | None
    final_loss: float | None
    validation_loss: float | None
    initial_validation_loss: float | None

    def describe(self) -> str:
        return "\n".join([
            self.clip_message,
            f"held-out loss (fixed noise): {self.initial_validation_loss} -> {self.validation_loss}; "
            f"last training loss {self.final_loss}",
            f"loss curve: {self.loss_plot or 'not written'}",
        ])  # fmt: skip


def evaluate(output_dir: str | Path, clip_model: str | None) -> Evaluation:
    """CLIP score of the final validation images vs their prompts (skipped, with the reason, when no
    CLIP model is configured or it cannot be loaded), plus the losses and loss curve of the run."""
    from PIL import Image

    from sd35hub.hub.card import CardInfo

    out = Path(output_dir)
    info = CardInfo.from_output_dir(out)  # typed errors; keeps only images/plots that exist on disk
    pairs = [(out / image.path, image.prompt) for image in info.validation_images]
    score, message = None, ""
    if not clip_model:
        message = "CLIP score skipped: no CLIP model configured (set CLIP_MODEL, e.g. openai/clip-vit-large-patch14)"
    elif not pairs:
        message = "CLIP score skipped: the run wrote no validation images"
    else:
        try:
            images = []
            for path, _ in pairs:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            score = clip_score(images, [prompt for _, prompt in pairs], clip_model)
            message = f"CLIP score {score:.2f} over {len(pairs)} validation image(s) with {clip_model}"
        except (OSError, Sd35HubError) as exc:  # not on the Hub, offline, not a CLIP checkpoint (typed by fidelity)
            reason = str(typed_error(exc)).splitlines() or [type(exc).__name__]  # a full disk, the Hub unreachable
            message = f"CLIP score skipped: {clip_model} could not be loaded ({reason[0][:160]})"
    return Evaluation(clip_score=score, clip_message=message, images=len(pairs),
                      loss_plot=out / info.loss_plot if info.loss_plot else None, final_loss=info.final_loss,
                      validation_loss=info.validation_loss, initial_validation_loss=info.initial_validation_loss)


# ---------------------------------------------------------------------------------------- export
def card_preview(output_dir: str | Path, repo_id: str) -> str:
    """The README.md exactly as the publication would upload it (nothing is sent)."""
    from sd35hub.hub.publish import plan_publication

    files, card = plan_publication(output_dir, repo_id)
    listing = "\n".join(f"- `{f.path_in_repo}` ({f.size:,} bytes)" for f in files)
    return f"**Files to upload to `{repo_id}`:**\n\n{listing}\n\n---\n\n{card}"


def publish_adapter(
    output_dir: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False
) -> Any:
    """One commit with adapter, card, images and sanitized config (sd35hub.hub.publish); prints the plan."""
    from sd35hub.hub.publish import publish

    result = publish(output_dir, repo_id, private=private, dry_run=dry_run)
    print("\n".join(result.describe()))
    return result


def space_link(
    repo_id: str, *, space_id: str = DEFAULT_SPACE, weight: float | None = None, endpoint: str | None = None
) -> str:
    """A link that opens the blending Space with this adapter preselected (``?adapter=owner/repo[:weight]``)."""
    from sd35hub.access import hub_endpoint

    value = repo_id if weight is None else f"{repo_id}:{weight:g}"
    return f"{(endpoint or hub_endpoint()).rstrip('/')}/spaces/{space_id}?adapter={quote(value, safe='/:')}"
