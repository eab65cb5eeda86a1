"""Layout guidance as wrappers around the sampling call and the UNet call (k-diffusion's `make_cond_model_fn`
pattern), so the denoising loop stays plain. brushwork.layout reads the plans from the prompts.

A planned prompt starts START of the way into the schedule from a grey-disc sketch of its plan, and until
REGIONAL_UNTIL each image is led by pieces of text, each over part of the canvas: a relation's phrases over
their regions (the rest by the negative prompt alone), or else the whole prompt over all.
"""

from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from brushwork.generation.diffusion_model import DiffusionModel
from brushwork.layout import REGIONAL_UNTIL, START, Region, plan_layout, region_masks, sketch

# (scaled latents, step index, timestep) -> the noise prediction the scheduler takes
NoiseFn = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


def with_layout(sample_latents: Callable, empty_latents: Callable[[int], torch.Tensor]) -> Callable:
    """sample_latents(prompts, negatives, generators, callback, plans) for whole batches, planned or not:
    planned and plain prompts start at different steps, so a mixed batch is sampled in two runs into one
    batch of latents (`empty_latents(batch)` makes it)."""

    def sample(prompts: list[str], negatives: list[str], generators, callback: Callable | None) -> torch.Tensor:
        plans = [plan_layout(p) for p in prompts]
        groups = [g for g in ([i for i, plan in enumerate(plans) if (plan is not None) == planned]
                              for planned in (False, True)) if g]
        if len(groups) == 1:
            return sample_latents(prompts, negatives, generators, callback, plans if plans[0] else None)
        latents = empty_latents(len(prompts))
        for indices in groups:
            rows = torch.tensor(indices, device=latents.device)
            group = sample_latents([prompts[i] for i in indices], [negatives[i] for i in indices],
                                   [generators[i] for i in indices] if isinstance(generators, list) else generators,
                                   callback and _rows_callback(callback, rows, latents),
                                   [plans[i] for i in indices] if plans[indices[0]] else None)
            latents[rows] = group
        return latents

    return sample


def _rows_callback(callback: Callable, rows: torch.Tensor, batch_latents: torch.Tensor) -> Callable:
    """callback_on_step_end for a run over some rows of the batch: the callback sees the whole batch's latents
    (the finished rows of the other run, zeros for rows not sampled yet) and may replace them."""
    def on_step(pipe, step, timestep, tensors: dict) -> dict:
        whole = batch_latents.clone()
        whole[rows] = tensors["latents"]
        update = callback(pipe, step, timestep, {**tensors, "latents": whole}) or {}
        return {**update, "latents": update["latents"][rows]} if "latents" in update else update
    return on_step


def first_step(num_inference_steps: int, order: int) -> int:
    """Index into the scheduler's timesteps of the step a planned prompt starts at."""
    return round(num_inference_steps * START) * order


def sketch_latents(model: DiffusionModel, scheduler, plans: list[list[Region]], begin: int, generators,
                   height: int, width: int) -> torch.Tensor:
    """The plans' sketches, encoded and noised to the schedule's step `begin`."""
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    shape = model.latent_shape(len(plans), height, width)
    noise = randn_tensor(shape, generator=generators, device=model.device, dtype=torch.float32)
    sketches = model.encode_images(torch.stack([sketch(plan, height, width) for plan in plans]))
    return scheduler.add_noise(sketches, noise, scheduler.timesteps[begin:begin + 1].repeat(len(plans)))


def regional_guidance(model: DiffusionModel, predict: NoiseFn, prompts: list[str], negatives: list[str],
                      plans: list[list[Region]], guidance_scale: float, height: int, width: int,
                      timesteps: torch.Tensor, begin: int, num_inference_steps: int, order: int) -> NoiseFn:
    """`predict` with the steps before REGIONAL_UNTIL led region by region: the negative prompt's prediction
    plus, over each region, the guided difference its own piece of text makes."""
    regional_until = round(num_inference_steps * REGIONAL_UNTIL) * order - begin  # in steps of `timesteps`
    pieces = [[(r.phrase, r) for r in plan if r.phrase] or [(prompt, None)] for prompt, plan in zip(prompts, plans)]
    owners = torch.tensor([b for b, own in enumerate(pieces) for _ in own], device=model.device)
    _, _, latent_height, latent_width = model.latent_shape(1, height, width)
    masks = torch.cat([region_masks([r], latent_height, latent_width) if r else
                       torch.ones(1, 1, latent_height, latent_width)
                       for own in pieces for _, r in own]).to(model.device)
    region_text = torch.cat([model.encode(negatives),
                             model.encode([text for own in pieces for text, _ in own])]).to(model.unet_dtype)
    unet = model.unet_step(timesteps, region_text)
    scale = guidance_scale if guidance_scale > 1.0 else 1.0

    def guided(latents: torch.Tensor, index: int, t: torch.Tensor) -> torch.Tensor:
        if index >= regional_until:
            return predict(latents, index, t)
        noise = unet(torch.cat([latents, latents[owners]]), index, t).float()
        uncond, regions = noise[:len(prompts)], noise[len(prompts):]
        steer = torch.zeros_like(latents).index_add_(0, owners, masks * (regions - uncond[owners]))
        return uncond + scale * steer

    return guided
