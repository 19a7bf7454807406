"""One builder of the engine for a finished run (sd35hub.workflows.inference): the notebook's make_engine
(the run's memory settings, offload on small GPUs) and `sd35hub eval` (exact: the base as released) read
the same settings from the run's config."""

from __future__ import annotations

import pytest

from sd35hub.config import from_dict
from sd35hub.workflows.inference import OFFLOAD_BELOW_GIB, run_engine_settings


def _config(name: str = "stabilityai/stable-diffusion-3.5-medium", **model: object):
    return from_dict({"model": {"name": name, "revision": "abc123", **model},
                      "data": {"source": "sample", "mask_t5_padding": True}})  # fmt: skip


def test_as_trained_carries_the_runs_memory_settings_and_offloads_on_small_gpus() -> None:
    cfg = _config(quantize="nf4", drop_t5=True)
    small = run_engine_settings(cfg, vram_gib=15.0)
    assert small == {"model": cfg.model.name, "revision": "abc123", "dtype": "auto", "device": None,
                     "mask_t5_padding": True, "quantize": "nf4", "drop_t5": True, "cpu_offload": True}  # fmt: skip
    assert run_engine_settings(cfg, vram_gib=OFFLOAD_BELOW_GIB)["cpu_offload"] is False  # 40 GiB and up: on the GPU
    assert run_engine_settings(cfg, vram_gib=None)["cpu_offload"] is False  # no GPU: nothing to offload from
    assert run_engine_settings(_config("tiny"), vram_gib=8.0)["cpu_offload"] is False  # never the tiny model
    assert run_engine_settings(_config(quantize="auto"), vram_gib=80.0)["quantize"] == "none"  # unresolved: none


def test_exact_is_the_base_as_released_with_the_runs_t5_mask() -> None:
    """What `sd35hub eval` renders with, as before: full precision, T5, no offload; revision and mask from the run."""
    cfg = _config(quantize="int8", drop_t5=True)
    exact = run_engine_settings(cfg, exact=True, vram_gib=8.0, dtype="fp32", device="cpu")
    assert exact == {"model": cfg.model.name, "revision": "abc123", "dtype": "fp32", "device": "cpu",
                     "mask_t5_padding": True, "quantize": "none", "drop_t5": False, "cpu_offload": False}  # fmt: skip
    other = run_engine_settings(cfg, exact=True, model="stabilityai/stable-diffusion-3.5-large")
    assert (other["model"], other["revision"]) == ("stabilityai/stable-diffusion-3.5-large", None)  # its main


@pytest.mark.slow  # a tiny engine load
def test_the_notebooks_engine_is_built_from_the_run() -> None:
    from sd35hub.frontends.colab_tools import make_engine

    engine = make_engine(from_dict({"model": {"name": "tiny"}, "data": {"source": "sample", "mask_t5_padding": True}}),
                         vram_gib=8.0)  # fmt: skip
    assert engine.model == "tiny" and engine.mask_t5_padding is True and engine.cpu_offload is False
