"""Image to model tensor: RGB conversion, resize, centre or random crop, optional flip, scale to [-1, 1].

torchvision is not used (it conflicts with this torch build); PIL and numpy do the work.
"""

import numpy as np
import torch
from PIL import Image, ImageOps

WHITE = (255, 255, 255)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL mode to RGB. Transparency is composited on `background`; 16/32-bit and float images are
    scaled to 8 bits; EXIF orientation is applied so the image is upright."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        high = float(pixels.max()) if pixels.size else 0.0
        if image.mode.startswith("I;16") or (image.mode == "I" and 255 < high <= 65535):
            pixels = pixels / 257.0  # 16-bit data (Pillow opens 16-bit PNGs as I;16 or I)
        elif high > 255 or (image.mode == "F" and high <= 1.0):
            low = float(pixels.min())  # other float / 32-bit data: stretch its own range into 8 bits
            pixels = (pixels - low) / max(high - low, 1e-12) * 255.0
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "L")
        return image.convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def crop_box(width: int, height: int, resolution: int, center: bool = True,
             generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) square crop of side `resolution` in an image whose shorter side is
    already `resolution`: centred, or at a random offset drawn from `generator`."""
    spare_x, spare_y = width - resolution, height - resolution
    if center:
        left, top = spare_x // 2, spare_y // 2
    else:
        left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
        top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
    return left, top, left + resolution, top + resolution


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size == image.size:
        return image
    # reducing_gap makes very large downscales fast (a box reduce first) at no visible cost.
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> FloatTensor[3, H, W] in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_image(pixels: torch.Tensor) -> Image.Image:
    """Inverse of to_tensor: FloatTensor[3, H, W] in [-1, 1] -> RGB PIL image."""
    array = pixels.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte()
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), "RGB")


class ImageTransform:
    """RGB -> resize shorter side to `resolution` -> centre (default) or random square crop ->
    horizontal flip with probability 0.5 only if `random_flip` (flips break "left of" captions) -> tensor.

    Random choices use torch's global generator unless one is passed; DataLoader seeds it per worker.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False):
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        image = resize_shorter_side(to_rgb(image), self.resolution)
        box = crop_box(*image.size, self.resolution, center=self.center_crop, generator=generator)
        if box != (0, 0, *image.size):
            image = image.crop(box)
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(image)
