"""Samplers by name: brushwork's short names and AUTOMATIC1111's, each a diffusers scheduler class."""

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
)

from brushwork.errors import BrushworkError

SAMPLERS = {
    "dpm++": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "lcm": LCMScheduler,  # few-step (consistency-distilled) models only
}
DEFAULT_SAMPLER = "dpm++"
# AUTOMATIC1111's sampler names, written into PNG info and accepted back.
A1111_SAMPLER_NAMES = {"dpm++": "DPM++ 2M", "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun",
                       "lcm": "LCM"}
# The sampler a one-step GAN's PNGs name: readers of AUTOMATIC1111's text (sd-parsers) skip a PNG without one.
GAN_SAMPLER = "GAN"
_SAMPLER_ALIASES = {
    **{a1111.lower(): name for name, a1111 in A1111_SAMPLER_NAMES.items()},
    "dpm++2m": "dpm++", "dpmpp_2m": "dpm++", "dpmsolver++": "dpm++", "dpm": "dpm++",
    "euler-a": "euler_a", "euler ancestral": "euler_a", "k_euler_a": "euler_a", "k_euler": "euler",
    "k_heun": "heun",
}


def resolve_sampler(name: str | None, default: str = DEFAULT_SAMPLER) -> str:
    """Canonical sampler name ("dpm++", "ddim", ...) for a brushwork or AUTOMATIC1111 name; `default` for None (a
    pipeline's own: "lcm" for a few-step model)."""
    if name is None:
        return default
    key = name.strip().lower()
    key = _SAMPLER_ALIASES.get(key, key)
    if key not in SAMPLERS:
        known = ", ".join(f"{n} ({A1111_SAMPLER_NAMES[n]})" for n in SAMPLERS)
        raise BrushworkError(f"unknown sampler '{name}'; known samplers: {known}")
    return key


def make_scheduler(sampler: str, scheduler_config: dict):
    """A fresh scheduler for one call: schedulers keep per-call state."""
    return SAMPLERS[sampler].from_config(scheduler_config)
