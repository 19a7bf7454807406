"""Samplers for SD3.5: which diffusers schedulers integrate a rectified-flow model, and how to build them.

SD3.5 predicts a *velocity* v = noise - x0 along the straight path x_t = (1 - sigma) x0 + sigma * noise
(sigma from 1 to 0, shifted by `shift` = 3.0). A sampler has to integrate that ODE. The FlowMatch*
schedulers do so natively; DPM-Solver++, UniPC and DEIS do once told `prediction_type="flow_prediction"`
with `use_flow_sigmas=True` and the model's shift as `flow_shift` (diffusers 0.42 kwargs).

Classic samplers (DDIM, PNDM, LMS, Euler-ancestral, DDPM, ...) assume an epsilon- or v-prediction
*variance-preserving* diffusion (x_t = alpha_t x0 + sigma_t noise with alpha_t^2 + sigma_t^2 = 1) and
its beta schedule: fed a flow velocity they compute the wrong x0 and step along the wrong curve,
so they are refused with that explanation rather than producing noise. See docs/inference.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sd35hub.errors import ConfigError


def _flow(config: dict[str, Any]) -> dict[str, Any]:
    """DPM-Solver/UniPC/DEIS settings equivalent to the pipeline's FlowMatch scheduler config."""
    return {
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": True,
        "flow_shift": float(config.get("shift", 3.0)),
    }


# name -> (diffusers class, overrides given the pipeline's scheduler config). Every scheduler is built as
# `Class.from_config(pipe.scheduler.config, **overrides)`, the way a diffusers user would write it.
SCHEDULERS: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    # FlowMatchEulerDiscrete: what SD3.5 ships; 28-40 steps
    "euler": ("FlowMatchEulerDiscreteScheduler", lambda c: {}),
    # FlowMatchHeunDiscrete: 2nd order, 2 model calls per step
    "heun": ("FlowMatchHeunDiscreteScheduler", lambda c: {}),
    # DPM-Solver++ 2M on flow sigmas: good at 20-28 steps
    "dpmpp-2m": (
        "DPMSolverMultistepScheduler",
        lambda c: {"algorithm_type": "dpmsolver++", "solver_order": 2, **_flow(c)},
    ),
    # stochastic variant: injects noise each step, so it does not converge to the ODE solution
    "dpmpp-2m-sde": (
        "DPMSolverMultistepScheduler",
        lambda c: {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, **_flow(c)},
    ),
    # UniPC / DEIS on flow sigmas
    "unipc": ("UniPCMultistepScheduler", _flow),
    "deis": ("DEISMultistepScheduler", _flow),
    # FlowMatchLCM: for few-step distilled models; stochastic, blurry on a non-distilled model
    "lcm": ("FlowMatchLCMScheduler", lambda c: {}),
}


# Classic samplers people ask for, and why they do not apply.
NOT_FOR_RECTIFIED_FLOW = {
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "pndm": "PNDM",
    "plms": "PLMS (PNDM)",
    "lms": "LMS",
    "euler-a": "Euler ancestral",
    "euler-ancestral": "Euler ancestral",
    "euler_a": "Euler ancestral",
    "k-euler": "k-diffusion Euler (eps)",
    "dpm2": "KDPM2",
    "dpm2-a": "KDPM2 ancestral",
    "dpmpp-sde": "DPM++ SDE (Brownian-tree, eps)",
}


def scheduler_recipe(name: str, base_config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, overrides) for `name`; raises ConfigError for samplers that do not apply."""
    key = name.strip().lower()
    if key in SCHEDULERS:
        class_name, overrides = SCHEDULERS[key]
        return class_name, overrides(dict(base_config))
    if key in NOT_FOR_RECTIFIED_FLOW:
        raise ConfigError(
            f"scheduler {name!r} ({NOT_FOR_RECTIFIED_FLOW[key]}) does not apply to Stable Diffusion 3.5: it assumes an "
            "epsilon/v-prediction variance-preserving diffusion with a beta schedule, while SD3.5 predicts a flow "
            "velocity along a straight (rectified-flow) path. Use one of: " + ", ".join(SCHEDULERS)
        )
    raise ConfigError(f"unknown scheduler {name!r}; use one of: {', '.join(SCHEDULERS)}")


def make_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """A new scheduler named `name`, configured from the pipeline's own scheduler config (shift etc.)."""
    import diffusers

    class_name, overrides = scheduler_recipe(name, base_config)
    return getattr(diffusers, class_name).from_config(dict(base_config), **overrides)
