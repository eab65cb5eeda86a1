"""What every brushwork pipeline shares: loading onto a device, checking a call's inputs, seeds, best_of's
ranker, and the output record. LatentDiffusionPipeline and GanPipeline each add their own __call__."""

import math
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from brushwork.errors import BrushworkError
from brushwork.generation.best_of import MAX_BEST_OF, clip_similarity
from brushwork.generation.output import GenerationOutput, convert_images
from brushwork.generation.registry import resolve_model, weights_hash
from brushwork.generation.samplers import DEFAULT_SAMPLER, resolve_sampler
from brushwork.hardware import cpu_has_native_bf16
from brushwork.models.clip_embedder import ClipEmbedder

MAX_IMAGES = 64
MAX_SIDE = 2048
DEFAULT_STEPS = 20
FEW_STEPS = 4  # the default steps of a few-step (distilled) model


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device, compiled: bool = False) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if compiled and cpu_has_native_bf16() else torch.float32


@contextmanager
def num_threads(threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class CallInputs:
    """A call's inputs after checking: one entry per image in each list."""
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int | None]  # None where a caller-made torch.Generator is used
    generator: torch.Generator | list[torch.Generator]
    num_inference_steps: int
    guidance_scale: float
    sampler: str
    height: int
    width: int


class Text2ImagePipeline:
    """Loads a model and turns prompts into images. Reuse one pipeline for many calls."""

    supports_layout = False  # whether __call__ takes layout=True
    default_sampler = DEFAULT_SAMPLER  # the sampler of a call that names none
    size_multiple = 1  # image sides must be multiples of this

    def __init__(self, model, path: Path, device: torch.device, dtype: torch.dtype, threads: int | None = None):
        self.model = model.to(device, dtype)
        self.path = path
        self.device = device
        self.dtype = dtype
        self.threads = threads or torch.get_num_threads()
        self.name = path.stem if path.is_file() else path.name

    @classmethod
    def load_model(cls, path: Path, allow_pickle: bool = False):
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, allow_pickle: bool = False,
                        threads: int | None = None, compile: bool = False) -> "Text2ImagePipeline":
        """path: a model folder, an SD single file or a shipped model's name ("shapes", "shapes-gan"); None
        means the default model shipped with brushwork. dtype: None picks the device's fast precision: fp32
        on CPU (bf16 measured no faster there), which gives the same images as diffusers; bf16/fp16 on GPUs.
        threads: CPU threads while sampling. compile: compile the model with AOTInductor (the first call of
        each batch size compiles for 2-3 minutes and keeps the result in the cache, from where later processes
        load it in a second; sampling is then 2.5-3x as fast on the CPU). With compile, dtype None means bf16
        on CPUs with native bf16 (AVX512-BF16 or AMX), whose images differ from fp32's by a few levels out of
        255."""
        path = resolve_model(path)
        try:
            device = torch.device(device) if device is not None else default_device()
        except RuntimeError:
            raise BrushworkError(f"unknown device '{device}'; use cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BrushworkError("device cuda was asked for, but no CUDA GPU is available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise BrushworkError("device mps was asked for, but MPS is not available")
        dtype = dtype or default_dtype(device, compiled=compile)
        pipe = cls(cls.load_model(path, allow_pickle=allow_pickle), path, device, dtype, threads)
        if compile:
            pipe.model.compile()
        return pipe

    @property
    def compiled(self) -> bool:
        return self.model.compiled

    @cached_property
    def model_hash(self) -> str:
        return weights_hash(self.path)

    @property
    def default_size(self) -> int:
        return self.model.default_size

    def resolve_steps(self, requested: int | None, default: int = DEFAULT_STEPS) -> int:
        """The sampling steps a call with `requested` steps (None: `default`) takes."""
        return default if requested is None else requested

    def check_model_inputs(self, sampler: str, negative_prompts: list[str], steps: int) -> None:
        """BrushworkError for a sampler, negative prompt or step count this model cannot take (none here)."""

    @property
    def few_step(self) -> bool:
        """Whether the model is made to sample in a few steps (a GAN, a distilled diffusion model); the images of
        other diffusion models degrade below their default steps."""
        return True

    def preview_images(self, latents: torch.Tensor) -> list:
        """PIL images of what the latents that callback_on_step_end was given would decode to now."""
        raise NotImplementedError(f"{type(self).__name__} gives its step callbacks no latents")

    # ---- best_of's ranker ---------------------------------------------------------------------------

    def text_model_folder(self) -> Path:
        """The model folder whose clip/ and tokenizer/ go with this model's text encoder."""
        return self.path

    @property
    def clip_folder(self) -> Path | None:
        """The model folder whose clip/ (and tokenizer/) ranks best_of's candidates; None when there is no
        clip/ (an SD checkpoint, a bare folder)."""
        if not self.path.is_dir():
            return None
        folder = self.text_model_folder()
        return folder if (folder / "clip" / "config.json").is_file() else None

    @cached_property
    def ranker(self) -> ClipEmbedder:
        """The model's CLIP, which scores best_of's candidates."""
        folder = self.clip_folder
        if folder is None:
            raise BrushworkError(f"best_of ranks images with the model's CLIP, and {self.path} has no clip/ folder "
                                 "(`brushwork train` writes one; Stable Diffusion checkpoints and the shipped emoji "
                                 "model have none)")
        return ClipEmbedder(folder / "clip", folder / "tokenizer", device=str(self.device))

    def similarity(self, prompts: list[str]):
        return clip_similarity(self.ranker, prompts)

    # ---- a call's inputs and output -----------------------------------------------------------------

    def check_best_of(self, best_of: int) -> None:
        if isinstance(best_of, bool) or not isinstance(best_of, int) or not 1 <= best_of <= MAX_BEST_OF:
            raise BrushworkError(f"best_of must be a whole number from 1 to {MAX_BEST_OF}, got {best_of!r}")
        if best_of > 1:
            self.ranker  # noqa: B018 -- a model without a CLIP fails here, before any sampling

    def check_inputs(self, prompt: str | list[str], negative_prompt: str | list[str] | None,
                     num_inference_steps: int | None, guidance_scale: float, num_images_per_prompt: int,
                     generator: torch.Generator | list[torch.Generator] | None, seed: int | list[int] | None,
                     height: int | None, width: int | None, sampler: str | None, output_type: str) -> CallInputs:
        """The call's inputs checked and spelled out per image, with a generator per image made from the seeds.

        Image k (counting over all prompts, each prompt's images together) uses seed + k, so it equals the
        single image made with that seed; a list of seeds gives each image its own."""
        steps = self.resolve_steps(num_inference_steps)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        sampler = resolve_sampler(sampler, self.default_sampler)
        height = height or self.default_size
        width = width or self.default_size
        if output_type not in ("pil", "np", "pt"):
            raise BrushworkError(f"output_type must be pil, np or pt, got {output_type!r}")
        guidance_scale = float(guidance_scale)
        self._check_values(prompts, negatives, num_inference_steps, guidance_scale, num_images_per_prompt,
                           height, width)
        n = num_images_per_prompt
        prompts = [p for p in prompts for _ in range(n)]
        negatives = [p for p in negatives for _ in range(n)]
        if generator is not None:
            seeds = [None] * len(prompts)
            if isinstance(generator, list) and len(generator) != len(prompts):
                raise BrushworkError(f"got {len(generator)} generators for {len(prompts)} images")
        elif isinstance(seed, (list, tuple)):
            if len(seed) != len(prompts):
                raise BrushworkError(f"got {len(seed)} seeds for {len(prompts)} images")
            seeds = [int(s) for s in seed]
            generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        else:
            seed = random.randrange(2**32) if seed is None else int(seed)
            seeds = [seed + k for k in range(len(prompts))]
            generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return CallInputs(prompts, negatives, seeds, generator, steps, guidance_scale, sampler, height, width)

    def _check_values(self, prompts: list[str], negative_prompts: list[str], steps: int | None, guidance: float,
                      n: int, height: int, width: int) -> None:
        steps = DEFAULT_STEPS if steps is None else steps
        if not isinstance(steps, int) or steps <= 0:
            raise BrushworkError(f"steps must be a positive whole number, got {steps}")
        if steps > 1000:
            raise BrushworkError(f"steps must be at most 1000, got {steps}")
        if not math.isfinite(guidance) or guidance < 0:
            raise BrushworkError(f"guidance scale must be a finite number >= 0, got {guidance}")
        if n <= 0 or n > MAX_IMAGES:
            raise BrushworkError(f"number of images per prompt must be between 1 and {MAX_IMAGES}, got {n}")
        if not prompts or len(prompts) * n > MAX_IMAGES:
            raise BrushworkError(f"one call makes 1 to {MAX_IMAGES} images; got {len(prompts)} prompts x {n}")
        if len(negative_prompts) != len(prompts):
            raise BrushworkError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        factor = self.size_multiple
        for name, side in (("height", height), ("width", width)):
            if side <= 0 or side % factor:
                raise BrushworkError(f"{name} must be a positive multiple of {factor} for this model, got {side}")
            if side > MAX_SIDE:
                raise BrushworkError(f"{name} must be at most {MAX_SIDE}, got {side}")
        for prompt in dict.fromkeys(prompts + negative_prompts):
            count = self.model.token_count(prompt)
            if count > self.model.max_tokens:
                kept = self.model.max_tokens - 2
                warnings.warn(f"prompt is {count - 2} tokens long but the model reads only {kept}; the rest is "
                              f"ignored: {prompt[:60]!r}...", stacklevel=4)

    def output(self, images: torch.Tensor, inputs: CallInputs, seeds: list[int | None], output_type: str,
               extra: dict) -> GenerationOutput:
        return GenerationOutput(convert_images(images, output_type), inputs.prompts, inputs.negative_prompts, seeds,
                                inputs.num_inference_steps, inputs.guidance_scale, inputs.sampler, inputs.height,
                                inputs.width, self.name, self.model_hash, extra=extra)
