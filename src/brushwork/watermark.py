"""An invisible watermark that marks images as made by brushwork, and its detector.

The mark lives in the luma of each 8x8 block: four mid-frequency DCT coefficients are each moved to the
nearest point of one of two interleaved lattices (quantisation index modulation, step STEP), which one
given by a fixed pseudo-random bit per coefficient. Reading it back means counting how many coefficients
sit on their expected lattice: about half do by chance, nearly all do in a marked image.

Why not the `invisible-watermark` package: it refuses images under 256x256 (brushwork makes 32-64 px
images), and it depends on the desktop `opencv-python` build.
"""

from dataclasses import dataclass

import numpy as np
import PIL.Image
from scipy.fft import dctn, idctn
from scipy.stats import binom

BLOCK = 8
COEFFICIENTS = ((1, 2), (2, 1), (2, 2), (3, 1))  # (row, column) frequencies inside a block
STEP = 6.0  # lattice step: changes luma by at most STEP / 2 per pixel, survives 8-bit rounding
KEY = 0xB5_0C_4A_17
MAX_FALSE_POSITIVE = 1e-6  # chance that an unmarked image reads as marked
EMBED_PASSES = 6  # re-embedding after rounding and clipping (white backgrounds clip)

_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class WatermarkReading:
    found: bool
    matching: int  # coefficients on their expected lattice
    total: int  # coefficients that carry the mark
    false_positive: float  # chance of at least `matching` matches in an unmarked image

    @property
    def agreement(self) -> float:
        return self.matching / self.total if self.total else 0.0


def _blocks(luma: np.ndarray) -> np.ndarray:
    """[rows, cols, 8, 8] blocks of the top-left area that whole blocks cover."""
    rows, cols = luma.shape[0] // BLOCK, luma.shape[1] // BLOCK
    area = luma[: rows * BLOCK, : cols * BLOCK]
    return area.reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3)


def _coefficients(luma: np.ndarray) -> np.ndarray:
    spectrum = dctn(_blocks(luma), axes=(2, 3), norm="ortho")
    return np.stack([spectrum[:, :, r, c] for r, c in COEFFICIENTS], axis=-1).reshape(-1)


def _expected_bits(count: int) -> np.ndarray:
    return np.random.default_rng(KEY).integers(0, 2, size=count)


def _luma(pixels: np.ndarray) -> np.ndarray:
    return pixels[..., :3].astype(np.float64) @ _LUMA


def _lattice_offset(coefficients: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Change that moves each coefficient onto the nearest point of lattice STEP * (k + bit / 2)."""
    shift = bits * STEP / 2
    return np.round((coefficients - shift) / STEP) * STEP + shift - coefficients


def embed(image: PIL.Image.Image) -> PIL.Image.Image:
    """The image with the watermark in it (RGB or RGBA; other modes are converted to RGB)."""
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    pixels = np.asarray(image).copy()
    rows, cols = pixels.shape[0] // BLOCK, pixels.shape[1] // BLOCK
    if rows == 0 or cols == 0:
        return image.copy()
    bits = _expected_bits(rows * cols * len(COEFFICIENTS))
    for _ in range(EMBED_PASSES):
        offset = _lattice_offset(_coefficients(_luma(pixels)), bits)
        if np.abs(offset).max() < STEP / 8:
            break
        spectrum = np.zeros((rows, cols, BLOCK, BLOCK))
        for i, (r, c) in enumerate(COEFFICIENTS):
            spectrum[:, :, r, c] = offset.reshape(rows, cols, len(COEFFICIENTS))[:, :, i]
        delta = idctn(spectrum, axes=(2, 3), norm="ortho").transpose(0, 2, 1, 3).reshape(rows * BLOCK, cols * BLOCK)
        # Moving R, G and B together changes luma by the same amount and leaves the colour as it is.
        area = pixels[: rows * BLOCK, : cols * BLOCK, :3].astype(np.float64) + delta[..., None]
        pixels[: rows * BLOCK, : cols * BLOCK, :3] = np.clip(np.round(area), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels, mode=image.mode)


def detect(image: PIL.Image.Image) -> WatermarkReading:
    """Whether the image carries brushwork's watermark, and how clearly."""
    luma = _luma(np.asarray(image.convert("RGB")))
    coefficients = _coefficients(luma)
    total = coefficients.size
    if total == 0:
        return WatermarkReading(False, 0, 0, 1.0)
    bits = _expected_bits(total)
    matching = int((np.abs(_lattice_offset(coefficients, bits)) < STEP / 4).sum())
    false_positive = float(binom.sf(matching - 1, total, 0.5))
    return WatermarkReading(false_positive < MAX_FALSE_POSITIVE, matching, total, false_positive)
