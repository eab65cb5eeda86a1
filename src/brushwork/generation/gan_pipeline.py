"""Text-to-image with a one-step GAN (brushwork.models.gan): one forward pass of the generator per image.

Steps, sampler, guidance and negative prompts do not apply to it: the call takes them, so that callers can
pass the same arguments to any pipeline, checks them as LatentDiffusionPipeline does, and records none of them.
"""

import dataclasses
import warnings
from pathlib import Path
from typing import Callable

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from brushwork.errors import BrushworkError
from brushwork.generation.base import Text2ImagePipeline, num_threads
from brushwork.generation.best_of import sample_best_of
from brushwork.generation.output import GenerationOutput
from brushwork.hardware import CompiledModule
from brushwork.models.loading import load_pretrained
from brushwork.models.gan import GAN_KIND, Generator, generate_tensor, load_generator, text_encoder_folder


class GanModel:
    """A saved GAN folder: its generator with the text encoder and tokenizer that condition it."""

    kind = GAN_KIND

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, generator_model: Generator):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.generator_model = generator_model.eval().requires_grad_(False)
        self.default_size = generator_model.config.resolution
        self.max_tokens = tokenizer.model_max_length
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.compiled_generator: CompiledModule | None = None

    @classmethod
    def from_pretrained(cls, folder: Path) -> "GanModel":
        folder = Path(folder)
        text_folder = text_encoder_folder(folder)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(text_folder / "tokenizer")
            text_encoder = load_pretrained("text encoder", CLIPTextModel, text_folder / "text_encoder")
        except BrushworkError:
            raise
        except Exception as error:  # transformers raises many kinds for bad files
            raise BrushworkError(f"could not load the text encoder or tokenizer of {folder}: {error}") from None
        return cls(tokenizer, text_encoder, load_generator(folder))

    def to(self, device: torch.device, dtype: torch.dtype) -> "GanModel":
        """fp32 on the CPU (a small conv net gains nothing from bf16 there); `dtype` on GPUs."""
        self.device = device
        self.dtype = dtype if device.type != "cpu" else torch.float32
        self.text_encoder.to(device)
        self.generator_model.to(device, self.dtype)
        return self

    def token_count(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, truncation=False).input_ids)

    @property
    def compiled(self) -> bool:
        return self.compiled_generator is not None

    def compile(self) -> None:
        """Compile the generator with AOTInductor (fp32 on the CPU, like eager: its convolutions are small)."""
        self.compiled_generator = CompiledModule(self.generator_model, "gan-generator")

    def generate(self, prompts: list[str], generators: list[torch.Generator] | torch.Generator | None,
                 height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] on the CPU; `generators`: one torch.Generator per image, or one for all.
        The generator makes its native size only: any other height or width is refused."""
        size = self.default_size
        if (height or size, width or size) != (size, size):
            raise BrushworkError(f"this GAN makes {size}×{size} images only; got {width}×{height}. Leave out "
                                 "--width/--height.")
        if isinstance(generators, torch.Generator) or generators is None:
            shared = generators if generators is not None else torch.Generator().manual_seed(0)
            generators = [shared] * len(prompts)
        return generate_tensor(self.generator_model, self.text_encoder, self.tokenizer, prompts, generators,
                               self.device, self.compiled_generator)


class GanPipeline(Text2ImagePipeline):
    """A brushwork GAN folder behind the pipeline call: one step, no sampler, no guidance."""

    model: GanModel

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._told_steps_unused = False

    @classmethod
    def load_model(cls, path: Path, allow_pickle: bool = False) -> GanModel:
        return GanModel.from_pretrained(path)

    def resolve_steps(self, requested: int | None, default: int = 1) -> int:
        return 1

    def text_model_folder(self) -> Path:
        return text_encoder_folder(self.path)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float = 5.0,
                 num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 seed: int | list[int] | None = None,
                 height: int | None = None, width: int | None = None, sampler: str | None = None,
                 callback_on_step_end: Callable | None = None, output_type: str = "pil",
                 layout: bool = False, best_of: int = 1) -> GenerationOutput:
        """As LatentDiffusionPipeline.__call__, in one step: num_inference_steps has no effect (a warning says so
        once, unless it is 1), layout is refused, and callback_on_step_end is never called."""
        self.check_best_of(best_of)
        if num_inference_steps not in (None, 1) and not self._told_steps_unused:
            warnings.warn("num_inference_steps has no effect: this model is a one-step GAN", stacklevel=2)
            self._told_steps_unused = True
        if layout:
            raise BrushworkError("layout guidance needs a diffusion model: a one-step GAN has no sampling steps "
                                 "to guide")
        inputs = self.check_inputs(prompt, negative_prompt, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, generator, seed, height, width, sampler, output_type)

        def sample(generators, callback: Callable | None) -> torch.Tensor:
            return self.model.generate(inputs.prompts, generators, inputs.height, inputs.width)

        with torch.inference_mode(), num_threads(self.threads):
            images, seeds = sample_best_of(sample, best_of, lambda: self.similarity(inputs.prompts), inputs.seeds,
                                           inputs.generator, None, 1)
        recorded = dataclasses.replace(inputs, guidance_scale=None, sampler=None)
        return self.output(images, recorded, seeds, output_type, {"best_of": best_of} if best_of > 1 else {})
