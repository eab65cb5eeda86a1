"""Text-to-image with a latent diffusion model, as diffusers' Stable Diffusion pipeline reads:
check_inputs -> encode_prompt -> prepare_latents -> denoising loop -> decode. Layout guidance and best_of wrap
the sampling call and the UNet call; the loop itself knows neither."""

import inspect
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from brushwork.generation import layout_guidance
from brushwork.errors import BrushworkError
from brushwork.generation.base import DEFAULT_STEPS, FEW_STEPS, Text2ImagePipeline, num_threads
from brushwork.generation.best_of import sample_best_of
from brushwork.generation.diffusion_model import DiffusionModel, UNetStep
from brushwork.generation.layout_guidance import NoiseFn
from brushwork.generation.loading import load_diffusion_model
from brushwork.generation.output import GenerationCancelled, GenerationOutput, from_model_range, to_pil
from brushwork.generation.samplers import DEFAULT_SAMPLER, SAMPLERS, make_scheduler


def classifier_free_guidance(unet: UNetStep, guidance_scale: float) -> NoiseFn:
    """The UNet's noise prediction, guided by the text at `guidance_scale` (off at 1 or below: text only)."""
    if guidance_scale <= 1.0:
        return lambda latents, index, t: unet(latents, index, t).float()

    def guided(latents: torch.Tensor, index: int, t: torch.Tensor) -> torch.Tensor:
        uncond, cond = unet(torch.cat([latents, latents]), index, t).float().chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return guided


class LatentDiffusionPipeline(Text2ImagePipeline):
    """CLIP text encoder, UNet and VAE (a brushwork or Stable Diffusion 1.x/2.x model), any diffusers sampler."""

    model: DiffusionModel

    @classmethod
    def load_model(cls, path: Path, allow_pickle: bool = False) -> DiffusionModel:
        return load_diffusion_model(path, allow_pickle)

    @property
    def size_multiple(self) -> int:
        return self.model.vae_scale_factor

    @property
    def few_step(self) -> bool:
        return self.model.few_step

    @property
    def supports_layout(self) -> bool:
        """Layout guidance steers classifier-free guidance region by region: a UNet that takes its guidance as
        an input (a few-step model) has none to steer."""
        return not self.model.guidance_embedded

    @property
    def default_sampler(self) -> str:
        return "lcm" if self.model.few_step else DEFAULT_SAMPLER

    def resolve_steps(self, requested: int | None, default: int = DEFAULT_STEPS) -> int:
        """A few-step model takes FEW_STEPS unless asked for others, whatever the caller's default."""
        if requested is None and self.model.few_step:
            return FEW_STEPS
        return super().resolve_steps(requested, default)

    def check_model_inputs(self, sampler: str, negative_prompts: list[str], steps: int) -> None:
        """BrushworkError for what a few-step model cannot do (and for its sampler on other models)."""
        model = self.model
        if (sampler == "lcm") != model.few_step:
            raise BrushworkError(f"{self.name} is a few-step model: it samples with lcm only" if model.few_step else
                                 f"the lcm sampler needs a few-step model (brushwork train distill); {self.name} is "
                                 "not one: use another sampler")
        if model.guidance_embedded and any(negative_prompts):
            raise BrushworkError(f"{self.name} takes its guidance through its UNet (a few-step model), against the "
                                 "empty prompt: it has no negative prompt")
        most = model.scheduler_config.get("original_inference_steps")
        if model.few_step and most and steps > most:
            raise BrushworkError(f"{self.name} takes at most {most} steps (its distillation's solver grid); got "
                                 f"{steps}")

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float = 5.0,
                 num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 seed: int | list[int] | None = None,
                 height: int | None = None, width: int | None = None, sampler: str | None = None,
                 callback_on_step_end: Callable | None = None, output_type: str = "pil",
                 layout: bool = False, best_of: int = 1) -> GenerationOutput:
        """Generate num_images_per_prompt images for each prompt.

        Image k (counting over all prompts, each prompt's images together) uses seed + k, so it equals
        the single image made with that seed; a list of seeds gives each image its own.
        callback_on_step_end(pipe, step, timestep, {"latents": ...}) may return {"latents": new} to replace them
        or {"cancel": True} to stop (GenerationCancelled).
        num_inference_steps defaults to 20, and the sampler to dpm++; for a few-step model (brushwork train
        distill) to 4 and lcm, with the guidance given to its UNet (one call a step) and no negative prompt.
        layout: sample prompts of the form "A left of / right of / above / below B" or "two / three / four Xs" with
        layout guidance, which draws A and B where the relation puts them, or each copy apart (brushwork.layout);
        other prompts are sampled as usual.
        best_of: make each image best_of times, from different seeds, and keep the one the model's CLIP finds
        closest to its prompt (reranking, as DALL-E did); best_of times the work. The seed recorded for an image
        is the kept candidate's, so that seed with best_of=1 makes the same image. The callback numbers the steps
        of later candidates on from the earlier ones', so a progress count covers them all.
        """
        self.check_best_of(best_of)
        inputs = self.check_inputs(prompt, negative_prompt, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, generator, seed, height, width, sampler, output_type)
        if layout and not self.supports_layout:
            raise BrushworkError(f"layout guidance steers classifier-free guidance, and {self.name} takes its "
                                 "guidance through its UNet (a few-step model): sample without layout")
        self.check_model_inputs(inputs.sampler, inputs.negative_prompts, inputs.num_inference_steps)
        sample_latents = partial(self.sample_latents, num_inference_steps=inputs.num_inference_steps,
                                 guidance_scale=inputs.guidance_scale, sampler=inputs.sampler, height=inputs.height,
                                 width=inputs.width)
        if layout:
            sample_latents = layout_guidance.with_layout(sample_latents, partial(
                self.empty_latents, height=inputs.height, width=inputs.width))

        def sample(generators, callback: Callable | None) -> torch.Tensor:
            return self.decode_latents(sample_latents(inputs.prompts, inputs.negative_prompts, generators, callback))

        steps_per_candidate = inputs.num_inference_steps * SAMPLERS[inputs.sampler].order
        with torch.inference_mode(), num_threads(self.threads):
            images, seeds = sample_best_of(sample, best_of, lambda: self.similarity(inputs.prompts), inputs.seeds,
                                           inputs.generator, callback_on_step_end, steps_per_candidate)
        extra = {**({"layout": "on"} if layout else {}), **({"best_of": best_of} if best_of > 1 else {})}
        return self.output(images, inputs, seeds, output_type, extra)

    def encode_prompt(self, prompts: list[str], negative_prompts: list[str], guided: bool) -> torch.Tensor:
        """Text embeddings in the UNet's dtype: the negative prompts' before the prompts' when guided."""
        text = self.model.encode(prompts)
        if guided:
            text = torch.cat([self.model.encode(negative_prompts), text])
        return text.to(self.model.unet_dtype)

    def prepare_latents(self, batch: int, height: int, width: int, generators, scheduler) -> torch.Tensor:
        shape = self.model.latent_shape(batch, height, width)
        latents = randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)
        return latents * scheduler.init_noise_sigma

    def empty_latents(self, batch: int, height: int, width: int) -> torch.Tensor:
        return torch.zeros(self.model.latent_shape(batch, height, width), device=self.device)

    def sample_latents(self, prompts: list[str], negative_prompts: list[str], generators,
                       callback_on_step_end: Callable | None, plans: list | None = None, *,
                       num_inference_steps: int, guidance_scale: float, sampler: str, height: int,
                       width: int) -> torch.Tensor:
        """Final latents of prompts; plans: one layout plan per prompt (layout guidance), or None."""
        scheduler = make_scheduler(sampler, self.model.scheduler_config)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        # A few-step model takes the guidance through its UNet: one call a step, no CFG batch.
        embedded = self.model.guidance_embedded
        text = self.encode_prompt(prompts, negative_prompts, guided=guidance_scale > 1.0 and not embedded)
        if plans is None:
            begin = 0
            latents = self.prepare_latents(len(prompts), height, width, generators, scheduler)
        else:
            begin = layout_guidance.first_step(num_inference_steps, scheduler.order)
            latents = layout_guidance.sketch_latents(self.model, scheduler, plans, begin, generators, height, width)
        timesteps = scheduler.timesteps[begin:]
        with self.model.autocast():
            unet = self.model.unet_step(timesteps, text, self.model.guidance_condition(guidance_scale, len(prompts)))
            predict = classifier_free_guidance(unet, 1.0 if embedded else guidance_scale)
            if plans is not None:
                predict = layout_guidance.regional_guidance(
                    self.model, predict, prompts, negative_prompts, plans, guidance_scale, height, width, timesteps,
                    begin, num_inference_steps, scheduler.order)
            return self.denoise(latents, scheduler, timesteps, predict, begin, num_inference_steps,
                                generators, callback_on_step_end)

    def denoise(self, latents: torch.Tensor, scheduler, timesteps: torch.Tensor, predict: NoiseFn, begin: int,
                num_inference_steps: int, generators, callback_on_step_end: Callable | None) -> torch.Tensor:
        """The denoising loop; `begin`: the index of timesteps[0] in the whole schedule, which the callback's
        step numbers count from."""
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
        for i, t in enumerate(timesteps):
            noise = predict(scheduler.scale_model_input(latents, t), i, t)
            latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                step = begin + i
                update = callback_on_step_end(self, step, t, {"latents": latents}) or {}
                if update.get("cancel"):
                    raise GenerationCancelled(f"cancelled at step {step // scheduler.order + 1} of "
                                              f"{num_inference_steps}")
                latents = update.get("latents", latents)
        return latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] as float32 in [0, 1] on the CPU."""
        return from_model_range(self.model.decode(latents))

    def preview_images(self, latents: torch.Tensor) -> list:
        """What latents from a step callback would decode to now, through the eager decoder (a compiled one is
        compiled for the batch sizes of whole calls)."""
        return to_pil(from_model_range(self.model.decoder(latents)))
