"""Layout guidance: where a prompt says two things stand relative to each other ("a red circle left of a blue
square") or how many there are ("three red circles"), the sampler is told where to draw each one.

A text-to-image model learns "left of" only from captions, and the small shipped models never did (see
docs/experiments.md). Layout guidance does not need the model to: `plan_layout` reads the relation
and gives each side of it a region of the canvas (a counting prompt: each copy). generation/layout_guidance.py
then starts sampling from a sketch with a neutral grey disc in each region, noised to `START` of the schedule
(as img2img does); a relation's regions are denoised with their own phrases until `REGIONAL_UNTIL`, the rest
of the canvas with the negative prompt, and the whole prompt takes the last steps. It is the training-free
recipe of layout-grounded methods (a plan, then region-wise prompting), written here because diffusers has no
region prompting for its schedulers.

The constants were chosen on shapes position and counting prompts (seeds other than eval's): see
docs/experiments.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# Phrases of each relation, longest first so "to the left of" wins over "left of".
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "on the left of", "left of"),
    "right of": ("to the right of", "on the right of", "right of"),
    "above": ("on top of", "above", "over"),
    "below": ("underneath", "beneath", "below", "under"),
}
GAP = 0.25             # share of the canvas between the two regions, along the relation's axis
BLOB_RADIUS = 0.15     # the sketch's disc radius, as a share of the canvas's shorter side
BLOB_GREY = 128
START = 0.4            # sampling starts this far into the schedule, from the noised sketch
REGIONAL_UNTIL = 0.7   # the regions keep their own phrases until this far into the schedule

_PATTERN = re.compile(r"\b(" + "|".join(
    re.escape(p) for p in sorted((p for ps in RELATION_PHRASES.values() for p in ps), key=len, reverse=True)
) + r")\b")
_RELATION_OF = {phrase: relation for relation, phrases in RELATION_PHRASES.items() for phrase in phrases}
COUNTS = {"two": 2, "three": 3, "four": 4, "2": 2, "3": 3, "4": 4}
# Where the copies of a counted object go: side by side, a triangle, the four quarters.
COUNT_BOXES: dict[int, list[tuple[float, float, float, float]]] = {
    2: [(0.0, 0.25, 0.45, 0.75), (0.55, 0.25, 1.0, 0.75)],
    3: [(0.25, 0.0, 0.75, 0.45), (0.0, 0.55, 0.45, 1.0), (0.55, 0.55, 1.0, 1.0)],
    4: [(x0, y0, x0 + 0.45, y0 + 0.45) for y0 in (0.0, 0.55) for x0 in (0.0, 0.55)],
}


@dataclass(frozen=True)
class Region:
    """Where one object goes: a box (x0, y0, x1, y1) in shares of the canvas, and what to draw there (a phrase
    of the prompt), or None when the whole prompt says it (the copies of a counting prompt)."""

    box: tuple[float, float, float, float]
    phrase: str | None = None


def plan_layout(prompt: str) -> list[Region] | None:
    """Regions for "A <relation> B" (one relation, something on each side) and for "<two|three|four> Xs";
    None for any other prompt, which is then sampled as usual."""
    text = " ".join(prompt.lower().split()).strip(" .,!;")
    matches = list(_PATTERN.finditer(text))
    if len(matches) == 1:
        return _relation_layout(text, matches[0])
    words = text.split(" ", 1)
    if not matches and len(words) == 2 and words[0] in COUNTS and " and " not in f" {words[1]} ":
        return [Region(box) for box in COUNT_BOXES[COUNTS[words[0]]]]
    return None


def _relation_layout(text: str, match: re.Match) -> list[Region] | None:
    first, second = text[:match.start()].strip(" ,"), text[match.end():].strip(" ,")
    if not first or not second:
        return None
    near, far = (0.0, 0.5 - GAP / 2), (0.5 + GAP / 2, 1.0)
    relation = _RELATION_OF[match.group(1)]
    first_span, second_span = (near, far) if relation in ("left of", "above") else (far, near)
    if relation in ("left of", "right of"):
        boxes = [(lo, 0.0, hi, 1.0) for lo, hi in (first_span, second_span)]
    else:
        boxes = [(0.0, lo, 1.0, hi) for lo, hi in (first_span, second_span)]
    return [Region(boxes[0], first), Region(boxes[1], second)]


def region_masks(regions: list[Region], height: int, width: int) -> torch.Tensor:
    """[R, 1, height, width] float masks: 1 on the cells whose centres lie inside each region's box."""
    ys = (torch.arange(height) + 0.5) / height
    xs = (torch.arange(width) + 0.5) / width
    masks = []
    for region in regions:
        x0, y0, x1, y1 = region.box
        inside_y = (ys >= y0) & (ys <= y1)
        inside_x = (xs >= x0) & (xs <= x1)
        masks.append((inside_y[:, None] & inside_x[None, :]).float())
    return torch.stack(masks)[:, None]


def sketch(regions: list[Region], height: int, width: int) -> torch.Tensor:
    """[3, height, width] in [-1, 1]: white, with a grey disc at the centre of each region."""
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    image = torch.full((3, height, width), 255.0)
    radius = BLOB_RADIUS * min(height, width)
    for region in regions:
        x0, y0, x1, y1 = region.box
        cx, cy = (x0 + x1) / 2 * width, (y0 + y1) / 2 * height
        image[:, (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2] = BLOB_GREY
    return image / 127.5 - 1
