"""The shapes data set: flat coloured circles, squares and triangles on white, with exact ground truth.

The contract (64x64 canvas by default):
- White background; each object is filled flat with one palette colour, no outline, no antialiasing.
- An object has an integer centre (cx, cy) and an integer size r. Its pixels fill exactly the box
  [cx - r, cx + r] x [cy - r, cy + r]: the bounding box side is 2r + 1.
  circle: dx^2 + dy^2 <= r^2 + r; square: the whole box; triangle: isosceles, apex up (one pixel at
  the top row), base the full bottom row, row t from the top (0..2r) is 2*floor(t/2) + 1 wide.
- r ranges (inclusive): "small" 5..7, "large" 10..13, no size in the caption 5..11.
- Objects lie wholly inside the canvas with a 1 px margin, and their boxes are at least 2 blank
  pixels apart, so pixels of two objects never touch.
- "A left of B": B.cx - A.cx >= 8 and |dx| > |dy|; likewise right of, above (A.cy smaller), below.

Scenes are sampled from a random.Random; ShapesDataset item i depends only on (seed, i).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from brushwork.data.captions import (
    COLOR_NAMES,
    COUNT_WORDS,
    RELATIONS,
    SHAPES,
    SIZES,
    TASKS,
    ObjectSpec,
    PromptSpec,
    format_caption,
)
from brushwork.data.holdout import HoldOut
from brushwork.errors import BrushworkError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
SIZE_RANGES: dict[str | None, tuple[int, int]] = {"small": (5, 7), "large": (10, 13), None: (5, 11)}
MIN_GAP = 2  # blank pixels between the boxes of two objects
MARGIN = 1  # blank pixels between an object's box and the canvas edge
MIN_OFFSET = 8  # pixels between centres along the axis of a position relation
MIN_CANVAS = 48  # smaller canvases cannot reliably hold four objects of the contract's sizes
BACKGROUND = (255, 255, 255)

__all__ = [
    "COLORS", "SHAPES", "TASKS", "SIZE_RANGES", "ShapeObject", "Scene", "sample_scene", "render",
    "generate_scenes", "ShapesDataset", "relation_holds", "separated",
]


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    cx: float  # sampled scenes use integers; render rounds
    cy: float
    r: float


@dataclass(frozen=True)
class Scene:
    """A sample: its objects (for two-object tasks in caption order, A then B), caption and task."""

    objects: tuple[ShapeObject, ...]
    caption: str
    task: str

    def to_dict(self) -> dict:
        return {"task": self.task, "caption": self.caption, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(objects=tuple(ShapeObject(**o) for o in d["objects"]), caption=d["caption"], task=d["task"])


class _Placed(Protocol):
    cx: float
    cy: float
    r: float


def separated(a: _Placed, b: _Placed, gap: int = MIN_GAP) -> bool:
    """True when the boxes of a and b have at least `gap` blank pixels between them along x or y."""
    return (abs(a.cx - b.cx) - a.r - b.r - 1 >= gap) or (abs(a.cy - b.cy) - a.r - b.r - 1 >= gap)


def relation_holds(a: _Placed, b: _Placed, relation: str, min_offset: float = MIN_OFFSET) -> bool:
    """True when "a {relation} b" holds: offset of at least min_offset along the relation's axis,
    and that axis dominates (image y grows downwards)."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if relation == "left of":
        return dx >= min_offset and abs(dx) > abs(dy)
    if relation == "right of":
        return -dx >= min_offset and abs(dx) > abs(dy)
    if relation == "above":
        return dy >= min_offset and abs(dy) > abs(dx)
    if relation == "below":
        return -dy >= min_offset and abs(dy) > abs(dx)
    raise ValueError(f"unknown relation {relation!r}; expected one of: {', '.join(RELATIONS)}")


# The draw `brushwork train --data shapes` trains on: position scenes twice as often as each other task, since the
# relation word is what the UNet learns last (docs/experiments.md: the UNets that read it trained on this mix).
TRAIN_TASK_WEIGHTS: dict[str, float] = {"single": 1.0, "two_objects": 1.0, "counting": 1.0, "position": 2.0}


def _task_weights(task_weights: dict[str, float] | None) -> list[float]:
    if task_weights is None:
        return [1.0] * len(TASKS)
    unknown = sorted(set(task_weights) - set(TASKS))
    if unknown:
        raise BrushworkError(f"unknown shapes task(s) {', '.join(unknown)} in task weights; "
                             f"known tasks: {', '.join(TASKS)}")
    weights = [float(task_weights.get(t, 0.0)) for t in TASKS]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise BrushworkError(f"shapes task weights must be >= 0 and not all zero, got {task_weights}")
    return weights


def _sample_spec(rng: random.Random, task: str) -> PromptSpec:
    if task == "single":
        size = rng.choice((None, *SIZES))
        return PromptSpec("single", (ObjectSpec(rng.choice(COLOR_NAMES), rng.choice(SHAPES), size),))
    if task == "counting":
        count = rng.choice(tuple(COUNT_WORDS.values()))
        return PromptSpec("counting", (ObjectSpec(rng.choice(COLOR_NAMES), rng.choice(SHAPES)),), count=count)
    color_a, color_b = rng.sample(COLOR_NAMES, 2)
    objects = (ObjectSpec(color_a, rng.choice(SHAPES)), ObjectSpec(color_b, rng.choice(SHAPES)))
    if task == "two_objects":
        return PromptSpec("two_objects", objects)
    return PromptSpec("position", objects, relation=rng.choice(RELATIONS))


def _layout(spec: PromptSpec, rng: random.Random, size: int) -> tuple[ShapeObject, ...]:
    """Places the spec's objects by rejection sampling; restarts the whole scene when stuck."""
    wanted = list(spec.objects) * spec.count
    for _ in range(1000):
        placed: list[ShapeObject] = []
        for obj in wanted:
            r = rng.randint(*SIZE_RANGES[obj.size])
            lo, hi = MARGIN + r, size - 1 - MARGIN - r
            for _ in range(100):
                cand = ShapeObject(obj.color, obj.shape, rng.randint(lo, hi), rng.randint(lo, hi), r)
                if not all(separated(cand, p) for p in placed):
                    continue
                if spec.relation is not None and placed and not relation_holds(placed[0], cand, spec.relation):
                    continue
                placed.append(cand)
                break
            else:
                break
        if len(placed) == len(wanted):
            return tuple(placed)
    raise RuntimeError(f"could not lay out {spec} on a {size}x{size} canvas")


def sample_scene(rng: random.Random, task_weights: dict[str, float] | None = None, size: int = 64,
                 hold_out: HoldOut | None = None) -> Scene:
    """Samples one scene: a task (by task_weights; default equal), a prompt of that task that `hold_out` does not
    cover (drawn again until so), and a layout on a size x size canvas (object sizes are the contract's pixel
    sizes whatever the canvas)."""
    if size < MIN_CANVAS:
        raise BrushworkError(f"shapes canvas size {size} is too small; use at least {MIN_CANVAS} px "
                             "(render at 64 and resize for smaller images)")
    task = rng.choices(TASKS, weights=_task_weights(task_weights))[0]
    spec = _sample_spec(rng, task)
    while hold_out is not None and hold_out.covers_spec(spec):   # HoldOut leaves every task some caption
        spec = _sample_spec(rng, task)
    return Scene(objects=_layout(spec, rng, size), caption=format_caption(spec), task=task)


@lru_cache(maxsize=None)
def shape_mask(shape: str, r: int) -> np.ndarray:
    """Boolean (2r+1, 2r+1) mask of a shape of size r, centred in its box."""
    d = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    if shape == "circle":
        mask = dx * dx + dy * dy <= r * r + r
    elif shape == "square":
        mask = np.ones_like(dx, dtype=bool)
    elif shape == "triangle":
        mask = 2 * np.abs(dx) <= dy + r
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of: {', '.join(SHAPES)}")
    mask.setflags(write=False)
    return mask


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draws a scene on a white size x size RGB canvas, exactly (centres and r are rounded to integers)."""
    canvas = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    for obj in scene.objects:
        cx, cy, r = round(obj.cx), round(obj.cy), round(obj.r)
        if obj.color not in COLORS:
            raise ValueError(f"unknown colour {obj.color!r}; expected one of: {', '.join(COLOR_NAMES)}")
        if cx - r < 0 or cy - r < 0 or cx + r >= size or cy + r >= size:
            raise ValueError(f"object {obj} does not lie inside the {size}x{size} canvas")
        box = canvas[cy - r : cy + r + 1, cx - r : cx + r + 1]
        box[shape_mask(obj.shape, r)] = COLORS[obj.color]
    return Image.fromarray(canvas)


class ShapesDataset(torch.utils.data.Dataset):
    """n shapes samples made on the fly: item i depends only on (seed, i) (and the hold-out); nothing is stored."""

    def __init__(self, n: int = 100_000, seed: int = 0, task_weights: dict[str, float] | None = None,
                 size: int = 64, hold_out: HoldOut | None = None):
        if n < 1:
            raise BrushworkError(f"the shapes data set needs n >= 1 samples, got {n}")
        if size < MIN_CANVAS:
            raise BrushworkError(f"shapes canvas size {size} is too small; use at least {MIN_CANVAS} px")
        _task_weights(task_weights)
        self.n, self.seed, self.task_weights, self.size, self.hold_out = n, seed, task_weights, size, hold_out

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> Scene:
        if not 0 <= i < self.n:
            raise IndexError(f"shapes index {i} out of range for {self.n} samples")
        # A string seed is hashed with SHA-512 by random.Random: stable across runs and platforms.
        return sample_scene(random.Random(f"brushwork-shapes:{self.seed}:{i}"), self.task_weights, self.size,
                            self.hold_out)

    def __getitem__(self, i: int) -> dict:
        scene = self.scene(i)
        return {"image": render(scene, self.size), "text": scene.caption, "scene": scene,
                "regions": object_regions(scene, self.size)}


def object_regions(scene: Scene, size: int = 64) -> list[dict]:
    """Each object's caption words ("red circle") and its box as fractions of the canvas (x0, y0, x1, y1):
    what the UNet's attention loss asks those words to attend to."""
    return [{"phrase": f"{o.color} {o.shape}",
             "box": [(o.cx - o.r) / size, (o.cy - o.r) / size, (o.cx + o.r + 1) / size, (o.cy + o.r + 1) / size]}
            for o in scene.objects]


def generate_scenes(n: int, seed: int = 0, task_weights: dict[str, float] | None = None) -> Iterator[Scene]:
    """The scenes of ShapesDataset(n, seed, task_weights), one at a time."""
    dataset = ShapesDataset(n, seed, task_weights)
    for i in range(n):
        yield dataset.scene(i)
