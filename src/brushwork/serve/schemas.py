"""Request bodies of the three APIs (native, OpenAI, AUTOMATIC1111), with the server's limits.

Every field is checked here, so a bad request is answered with 422 naming the field before it reaches the
queue. The native API is strict (exact JSON types, unknown fields rejected); the OpenAI and AUTOMATIC1111
bodies ignore fields brushwork has no use for, as their clients send many.
"""

import base64
import binascii
import re
import unicodedata
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from brushwork.errors import BrushworkError
from brushwork.generation.samplers import resolve_sampler

MAX_STEPS = 150
MAX_IMAGES = 16  # per request
MAX_SIDE = 1024
MAX_PROMPT_CHARS = 4000
MAX_GUIDANCE = 50.0
MAX_SEED = 2**32 - 1
MAX_BEST_OF = 8  # candidates per image: a request samples n x best_of images
SIDE_MULTIPLE = 8
# AUTOMATIC1111's schedule types (its `scheduler` field, "Schedule type" in PNGs) that brushwork samples with.
SCHEDULE_TYPES = {"automatic": "Automatic"}
_ALLOWED_CONTROL = "\n\r\t"


def _check_text(text: str) -> str:
    for char in text:
        if unicodedata.category(char) == "Cc" and char not in _ALLOWED_CONTROL:
            raise ValueError(f"contains the control character U+{ord(char):04X}; only text, tabs and newlines are allowed")
    return text


def _check_sampler(name: str | None) -> str | None:
    if name is None:
        return None
    try:
        return resolve_sampler(name)
    except BrushworkError as error:
        raise ValueError(str(error)) from None


def _check_schedule_type(name: str | None) -> str | None:
    if name is not None and name.lower() not in SCHEDULE_TYPES:
        raise ValueError(f"brushwork samples on the model's own noise schedule ('Automatic'); it has no {name!r} "
                         "schedule")
    return name


Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_check_text)]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Guidance = Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
RandomOrSeed = Annotated[int, Field(ge=-1, le=MAX_SEED)]  # -1 (as in AUTOMATIC1111) or none: a random seed
ImageCount = Annotated[int, Field(ge=1, le=MAX_IMAGES)]
Side = Annotated[int, Field(ge=SIDE_MULTIPLE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE)]
Sampler = Annotated[str | None, AfterValidator(_check_sampler)]


class GenerateRequest(BaseModel):
    """POST /v1/generate. Image k of the job uses seed + k; a missing seed or -1 is picked at random."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt
    negative_prompt: Prompt = ""
    steps: Steps | None = None
    guidance: Guidance | None = None
    seed: RandomOrSeed | None = None
    n: ImageCount = 1
    sampler: Sampler = None
    width: Side | None = None
    height: Side | None = None
    layout: bool = False  # layout guidance for "A left of / right of / above / below B" and counts (diffusion models)
    best_of: Annotated[int, Field(ge=1, le=MAX_BEST_OF)] = 1  # each image the best of this many by the model's CLIP


_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class OpenAIImageRequest(BaseModel):
    """POST /v1/images/generations. negative_prompt, steps, guidance, seed and sampler are brushwork
    extensions (the openai client sends them with extra_body)."""

    model_config = ConfigDict(extra="ignore")

    prompt: Prompt
    n: ImageCount = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png"] | None = None
    model: str | None = None
    negative_prompt: Prompt = ""
    steps: Steps | None = None
    guidance: Guidance | None = None
    seed: RandomOrSeed | None = None
    sampler: Sampler = None

    @field_validator("size")
    @classmethod
    def _check_size(cls, size: str | None) -> str | None:
        if size in (None, "auto"):
            return size
        match = _SIZE.match(size)
        if not match:
            raise ValueError(f"size must look like 512x512 (WIDTHxHEIGHT) or auto, got {size!r}")
        for side in map(int, match.groups()):
            if side < SIDE_MULTIPLE or side > MAX_SIDE or side % SIDE_MULTIPLE:
                raise ValueError(f"size sides must be multiples of {SIDE_MULTIPLE} from {SIDE_MULTIPLE} to "
                                 f"{MAX_SIDE}, got {size}")
        return size

    def width_height(self) -> tuple[int | None, int | None]:
        if self.size in (None, "auto"):
            return None, None
        width, height = self.size.split("x")
        return int(width), int(height)


class A1111Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img (AUTOMATIC1111). seed -1 means random; batch_size x n_iter images in all."""

    model_config = ConfigDict(extra="ignore")

    prompt: Prompt = ""
    negative_prompt: Prompt = ""
    steps: Steps = 20
    cfg_scale: Guidance = 7.0
    seed: RandomOrSeed = -1
    batch_size: ImageCount = 1
    n_iter: ImageCount = 1
    width: Side | None = None
    height: Side | None = None
    sampler_name: Sampler = None
    sampler_index: Sampler = None
    scheduler: Annotated[str | None, AfterValidator(_check_schedule_type)] = None

    @field_validator("n_iter")
    @classmethod
    def _check_total(cls, n_iter: int, info: ValidationInfo) -> int:
        batch_size = info.data.get("batch_size", 1)
        if batch_size * n_iter > MAX_IMAGES:
            raise ValueError(f"batch_size x n_iter must be at most {MAX_IMAGES} images, got {batch_size} x {n_iter}")
        return n_iter

    def sampler(self) -> str | None:
        return self.sampler_name or self.sampler_index


class A1111PngInfoRequest(BaseModel):
    """POST /sdapi/v1/png-info: an image as base64, or as a data: URL."""

    model_config = ConfigDict(extra="ignore")

    image: str

    @field_validator("image")
    @classmethod
    def _check_base64(cls, image: str) -> str:
        try:
            base64.b64decode(image.partition("base64,")[2] or image, validate=True)
        except binascii.Error:
            raise ValueError("must be a base64-encoded image (or a data: URL)") from None
        return image

    def png_bytes(self) -> bytes:
        return base64.b64decode(self.image.partition("base64,")[2] or self.image)


class LiveRequest(BaseModel):
    """One message on the /v1/live WebSocket: render this prompt with this seed (the server's one model; `model`,
    when given, must name it). Steps default to the server's live steps; a GAN takes one whatever is asked."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt
    seed: Seed
    model: str | None = None
    steps: Steps | None = None
