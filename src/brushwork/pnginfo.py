"""Generation parameters stored in PNGs, in AUTOMATIC1111's `parameters` text chunk format:

    a red circle
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, CFG scale: 5, Seed: 7, Size: 64x64, Model hash: 0123456789, Model: shapes

The prompt may span lines; the negative prompt line is optional; the last line holds `Key: value`
pairs, with values that contain commas, colons or newlines written as JSON strings.
"""

import io
import json
import re
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.PngImagePlugin

from brushwork.errors import BrushworkError

CHUNK = "parameters"
NEGATIVE = "Negative prompt:"

# (dict key, A1111 label) in the order A1111 writes them; Size is width and height together.
_LABELS = [("steps", "Steps"), ("sampler", "Sampler"), ("cfg_scale", "CFG scale"), ("seed", "Seed"),
           ("size", "Size"), ("model_hash", "Model hash"), ("model", "Model"), ("version", "Version")]
_KEY_OF_LABEL = {label.lower(): key for key, label in _LABELS}
_PAIR = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def _label(key: str) -> str:
    return key.replace("_", " ").capitalize()


def format_parameters(prompt: str, negative_prompt: str = "", steps: int | None = None,
                      sampler: str | None = None, cfg_scale: float | None = None, seed: int | None = None,
                      width: int | None = None, height: int | None = None, model_hash: str | None = None,
                      model: str | None = None, version: str | None = None, **extra: Any) -> str:
    """The `parameters` text. Extra keyword arguments become extra `Label: value` pairs; None values are left out."""
    values = {"steps": steps, "sampler": sampler, "cfg_scale": cfg_scale, "seed": seed,
              "size": f"{width}x{height}" if width and height else None, "model_hash": model_hash,
              "model": model, "version": version}
    pairs = [f"{label}: {_quote(values[key])}" for key, label in _LABELS if values[key] is not None]
    pairs += [f"{_label(key)}: {_quote(value)}" for key, value in extra.items() if value is not None]
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE} {negative_prompt}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def _parse_pairs(line: str) -> dict[str, str]:
    return {label.strip(): _unquote(value) for label, value in _PAIR.findall(line)}


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse a `parameters` text (brushwork's or AUTOMATIC1111's) into a dict.

    Known keys come back typed: prompt, negative_prompt, steps (int), sampler, cfg_scale (float),
    seed (int), width and height (int), model_hash, model, version. Other labels are kept as strings under
    their lower-case, underscore-joined names (e.g. "Denoising strength" -> denoising_strength).
    """
    lines = text.strip("\n").split("\n")
    pairs: dict[str, str] = {}
    if lines and len(_parse_pairs(lines[-1])) >= 3:
        pairs = _parse_pairs(lines.pop())
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE):
            in_negative = True
            line = line[len(NEGATIVE):].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result: dict[str, Any] = {"prompt": "\n".join(prompt_lines).strip(),
                              "negative_prompt": "\n".join(negative_lines).strip()}
    for label, value in pairs.items():
        key = _KEY_OF_LABEL.get(label.lower(), label.lower().replace(" ", "_").replace("-", "_"))
        try:
            if key == "size":
                width, height = value.lower().split("x")
                result["width"], result["height"] = int(width), int(height)
            elif key in ("steps", "seed"):
                result[key] = int(float(value))
            elif key == "cfg_scale":
                result[key] = float(value)
            else:
                result[key] = value
        except ValueError:
            raise BrushworkError(f"PNG parameters: bad value for {label}: {value!r}") from None
    return result


def labelled_parameters(text: str) -> dict[str, Any]:
    """The parameters as AUTOMATIC1111's API parses them (png-info): keyed by its labels ("Prompt", "Steps",
    "CFG scale", ...), the size as "Size-1" (width) and "Size-2" (height)."""
    labels = {"prompt": "Prompt", "negative_prompt": "Negative prompt", "width": "Size-1", "height": "Size-2",
              **dict(_LABELS)}
    return {labels.get(key, _label(key)): value for key, value in parse_parameters(text).items()}


def save_png(image: PIL.Image.Image, path: str | Path, params: dict[str, Any] | str) -> Path:
    """Write image as PNG with its parameters (a dict for format_parameters, or ready text)."""
    text = params if isinstance(params, str) else format_parameters(**params)
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text(CHUNK, text)  # Pillow writes iTXt (UTF-8) when the text is not Latin-1
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def parameters_in_image(data: bytes, name: str = "the image") -> str:
    """The raw `parameters` text of an image file's bytes; "" when it has none."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.load()
            return str(image.info.get(CHUNK) or getattr(image, "text", {}).get(CHUNK) or "")
    except (OSError, SyntaxError, ValueError) as error:
        raise BrushworkError(f"{name} is not a readable image: {error}") from None


def read_parameters_text(path: str | Path) -> str:
    """The raw `parameters` text of an image."""
    path = Path(path)
    if not path.is_file():
        raise BrushworkError(f"image not found: {path}")
    text = parameters_in_image(path.read_bytes(), str(path))
    if not text:
        raise BrushworkError(f"{path} has no generation parameters (no '{CHUNK}' text chunk)")
    return text


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The parsed generation parameters of a PNG (see parse_parameters)."""
    return parse_parameters(read_parameters_text(path))
