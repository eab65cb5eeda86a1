"""What a pipeline call returns, and image tensors turned into PIL images or arrays."""

from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from brushwork import __version__
from brushwork.generation.samplers import A1111_SAMPLER_NAMES, GAN_SAMPLER


class GenerationCancelled(Exception):
    """Raised when callback_on_step_end asks to stop (returns {"cancel": True}) or raises it itself."""


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """[B, 3, H, W] float in [0, 1] -> 8-bit RGB PIL images."""
    return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))


def from_model_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], as decoders and generators make them -> float32 in [0, 1] on the CPU."""
    return (images.float() / 2 + 0.5).clamp(0, 1).cpu()


def convert_images(images: torch.Tensor, output_type: str) -> list:
    """[B, 3, H, W] in [0, 1] -> a list of PIL images ("pil"), [H, W, 3] arrays ("np") or tensors ("pt")."""
    if output_type == "pt":
        return list(images)
    if output_type == "np":
        return list(VaeImageProcessor.pt_to_numpy(images))
    return to_pil(images)


@dataclass
class GenerationOutput:
    images: list  # PIL images, or arrays/tensors for output_type "np"/"pt"
    prompts: list[str]  # one per image
    negative_prompts: list[str]  # one per image
    seeds: list[int | None]  # one per image; None where a caller-made torch.Generator was used
    num_inference_steps: int
    guidance_scale: float | None  # None: the model takes no guidance (a one-step GAN)
    sampler: str | None  # None: the model has no sampler (a one-step GAN; its PNGs say GAN_SAMPLER)
    height: int
    width: int
    model_name: str
    model_hash: str
    extra: dict = field(default_factory=dict)

    def parameters(self, index: int) -> dict[str, Any]:
        """The generation parameters of image `index`, as pnginfo.format_parameters takes them."""
        return {
            "prompt": self.prompts[index],
            "negative_prompt": self.negative_prompts[index],
            "steps": self.num_inference_steps,
            "sampler": A1111_SAMPLER_NAMES[self.sampler] if self.sampler else GAN_SAMPLER,
            "cfg_scale": self.guidance_scale,
            "seed": self.seeds[index],
            "width": self.width,
            "height": self.height,
            "model_hash": self.model_hash,
            "model": self.model_name,
            "version": f"brushwork {__version__}",
            **self.extra,
        }
