"""The one builder of the inference engine for a finished run's base, for every front end.

    engine = engine_for_run(plan.resolved)                       # the notebook: as trained, offload on small GPUs
    engine = engine_for_run(cfg, exact=True, dtype="auto")       # `sd35hub eval`: comparable metrics

Both read the same settings from the run's config (``run_engine_settings``): the base and its revision,
the T5 padding mask the adapter was trained with (``data.mask_t5_padding``), and, unless ``exact``, the
memory settings of the run: its transformer quantization (``auto``, a config no profile resolved, is
``none``), ``model.drop_t5``, and model CPU offload on a GPU of less than ``OFFLOAD_BELOW_GIB``.
``exact=True`` loads the base as released (full precision, all three text encoders, no offload), so that
`sd35hub eval` numbers compare across runs whatever card trained them. Engines for any base with the user's
own flags (`sd35hub generate`, the Space) build their BlendEngine themselves.
"""

from __future__ import annotations

from typing import Any

from sd35hub.config import Config

OFFLOAD_BELOW_GIB = 40.0  # a GPU with less memory generates with model CPU offload (never the tiny model)


def gpu_memory_gib() -> float | None:
    """Total memory of the first CUDA GPU in GiB; None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 1024**3


def run_engine_settings(
    config: Config,
    *,
    exact: bool = False,
    model: str | None = None,
    vram_gib: float | None = None,
    dtype: str = "auto",
    device: str | None = None,
) -> dict[str, Any]:
    """The BlendEngine arguments for ``config``'s base (module docstring). ``model`` replaces the run's base
    (its revision is then the new base's main); ``vram_gib`` is the GPU's memory (None: the offload rule
    does not apply); ``dtype`` and ``device`` as BlendEngine takes them."""
    name = model or config.model.name
    settings: dict[str, Any] = {
        "model": name,
        "revision": None if model else config.model.revision,
        "dtype": dtype,
        "device": device,
        "mask_t5_padding": bool(config.data.mask_t5_padding),
        "quantize": "none",
        "drop_t5": False,
        "cpu_offload": False,
    }
    if not exact:
        quantize = config.model.quantize
        settings["quantize"] = "none" if quantize == "auto" else quantize
        settings["drop_t5"] = bool(config.model.drop_t5)
        settings["cpu_offload"] = vram_gib is not None and vram_gib < OFFLOAD_BELOW_GIB and name != "tiny"
    return settings


def engine_for_run(
    config: Config,
    *,
    exact: bool = False,
    model: str | None = None,
    vram_gib: float | None = None,
    dtype: str = "auto",
    device: str | None = None,
) -> Any:
    """A BlendEngine for the base of the run ``config`` describes (run_engine_settings); ``vram_gib`` None
    reads the GPU's memory (not needed with ``exact``)."""
    from sd35hub.blend.engine import BlendEngine

    if vram_gib is None and not exact:
        vram_gib = gpu_memory_gib()
    settings = run_engine_settings(config, exact=exact, model=model, vram_gib=vram_gib, dtype=dtype, device=device)
    return BlendEngine(settings.pop("model"), **settings)
