"""GenEval-style faithfulness checker for the shapes grammar.

`detect_objects` finds the coloured objects in an image (tolerant to blur, noise, off-palette colours
and specks) and `check` judges whether they are exactly what a caption asks for, by the shapes contract
(see brushwork.data.shapes). Images that are not 64x64 are resized to 64x64 first, since the contract's
sizes and offsets are in 64x64 pixels.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from brushwork.data.captions import ObjectSpec, PromptSpec, parse_caption
from brushwork.data.shapes import COLORS, MIN_OFFSET, SIZE_RANGES, ShapeObject, relation_holds

CANVAS = 64
INK_THRESHOLD = 100  # a pixel is foreground when 255 - min(R, G, B) exceeds this (about half a fill's contrast)
MIN_AREA = 20  # smaller components are specks; the smallest contract object has 61 pixels
MIN_CHROMA = 50  # a component whose mean colour has max - min below this is grey: colour "unknown"
SIZE_TOLERANCE = 1  # px on r when a caption gives a size class
OFFSET_TOLERANCE = 0.5  # px on the 8 px offset of a relation, for centres measured on blurred edges

PALETTE_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in COLORS.items()}
# Silhouette features (fill ratio of the box, bottom-minus-top width asymmetry) of the ideal shapes.
SHAPE_PROTOTYPES = {"square": (1.0, 0.0), "circle": (0.79, 0.0), "triangle": (0.51, 0.7)}


@dataclass(frozen=True)
class DetectedObject:
    color: str  # a palette name, or "unknown" for a grey/black component
    shape: str
    cx: float  # centre of the object's box, in 64x64 pixels
    cy: float
    r: float  # half the box side: (side - 1) / 2
    area: int  # pixels


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str
    objects: tuple[DetectedObject | ShapeObject, ...]  # what was judged
    objects_ok: bool = False  # the right objects were found (ok, or for position: failed on the relation alone)


def _classify_color(pixels: np.ndarray, ink: np.ndarray) -> str:
    # The mean of the more saturated half of the pixels: edges blended with white keep their hue
    # but would pull the chroma down.
    core = pixels[ink >= np.median(ink)].mean(axis=0)
    if core.max() - core.min() < MIN_CHROMA:
        return "unknown"
    hue = colorsys.rgb_to_hsv(*(core / 255))[0] * 360
    return min(PALETTE_HUES, key=lambda name: _hue_distance(hue, PALETTE_HUES[name]))


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360
    return min(d, 360 - d)


def _classify_shape(mask: np.ndarray) -> str:
    h, w = mask.shape
    fill = mask.sum() / (h * w)
    third = max(1, h // 3)
    widths = mask.sum(axis=1)
    asymmetry = (widths[-third:].mean() - widths[:third].mean()) / w
    return min(SHAPE_PROTOTYPES, key=lambda s: (fill - SHAPE_PROTOTYPES[s][0]) ** 2
               + (asymmetry - SHAPE_PROTOTYPES[s][1]) ** 2)


def detect_objects(image: Image.Image) -> list[DetectedObject]:
    """The objects in an image: one per non-background connected component of at least MIN_AREA pixels,
    sorted left to right, top to bottom."""
    image = image.convert("RGB")
    if image.size != (CANVAS, CANVAS):
        image = image.resize((CANVAS, CANVAS), Image.Resampling.BOX)
    rgb = np.asarray(image, dtype=np.float32)
    ink = 255 - rgb.min(axis=2)
    labels, _ = ndimage.label(ink > INK_THRESHOLD, structure=np.ones((3, 3)))
    objects = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels[box] == k
        area = int(mask.sum())
        if area < MIN_AREA:
            continue
        color = _classify_color(rgb[box][mask], ink[box][mask])
        shape = _classify_shape(mask)
        (y0, y1), (x0, x1) = (box[0].start, box[0].stop - 1), (box[1].start, box[1].stop - 1)
        r = max(y1 - y0, x1 - x0) / 2
        # A triangle's one-pixel apex can fade under blur; its base row is the reliable edge.
        cy = y1 - r if shape == "triangle" else (y0 + y1) / 2
        objects.append(DetectedObject(color, shape, (x0 + x1) / 2, cy, r, area))
    return sorted(objects, key=lambda o: (o.cx, o.cy))


def _describe(obj: DetectedObject | ShapeObject) -> str:
    return f"{obj.color} {obj.shape} (r={obj.r:g}) at ({obj.cx:g}, {obj.cy:g})"


def _matches(obj: DetectedObject | ShapeObject, spec: ObjectSpec) -> bool:
    if obj.color != spec.color or obj.shape != spec.shape:
        return False
    lo, hi = SIZE_RANGES[spec.size]
    return spec.size is None or lo - SIZE_TOLERANCE <= obj.r <= hi + SIZE_TOLERANCE


def check_objects(objects: Sequence[DetectedObject | ShapeObject], spec: PromptSpec) -> CheckResult:
    """Judges a list of objects (detected, or a scene's ShapeObjects) against a prompt spec."""
    objects = tuple(objects)
    wanted = spec.count if spec.task == "counting" else len(spec.objects)
    found = ", ".join(_describe(o) for o in objects) or "nothing"
    if len(objects) != wanted:
        return CheckResult(False, f"expected {wanted} object(s), found {len(objects)}: {found}", objects)

    if spec.task in ("single", "counting"):
        bad = [o for o in objects if not _matches(o, spec.objects[0])]
        if bad:
            target = spec.objects[0]
            want = " ".join(w for w in (target.size, target.color, target.shape) if w)
            return CheckResult(False, f"expected {want}, found {', '.join(_describe(o) for o in bad)}", objects)
        return CheckResult(True, f"found {found}", objects, objects_ok=True)

    a_spec, b_spec = spec.objects
    if _matches(objects[0], a_spec) and _matches(objects[1], b_spec):
        a, b = objects
    elif _matches(objects[1], a_spec) and _matches(objects[0], b_spec):
        b, a = objects
    else:
        return CheckResult(False, f"expected a {a_spec.color} {a_spec.shape} and a {b_spec.color} {b_spec.shape}, "
                                  f"found {found}", objects)
    if spec.task == "position" and not relation_holds(a, b, spec.relation, MIN_OFFSET - OFFSET_TOLERANCE):
        return CheckResult(False, f"{_describe(a)} is not {spec.relation} {_describe(b)}", objects, objects_ok=True)
    return CheckResult(True, f"found {found}", objects, objects_ok=True)


def check(image: Image.Image, caption_or_spec: str | PromptSpec) -> CheckResult:
    """Whether an image holds exactly what a shapes caption asks for. Raises ValueError for a caption
    outside the shapes grammar."""
    spec = parse_caption(caption_or_spec) if isinstance(caption_or_spec, str) else caption_or_spec
    return check_objects(detect_objects(image), spec)
