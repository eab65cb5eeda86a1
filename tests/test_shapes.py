import json
import random
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from brushwork.data.captions import COLOR_NAMES, parse_caption
from brushwork.data.shapes import (
    COLORS,
    SHAPES,
    SIZE_RANGES,
    TASKS,
    Scene,
    ShapeObject,
    ShapesDataset,
    generate_scenes,
    render,
    sample_scene,
    shape_mask,
)
from brushwork.errors import BrushworkError

WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return list(generate_scenes(2000, seed=11))


def test_palette_is_the_contract():
    assert COLORS == {
        "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
        "yellow": (240, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 30),
    }
    assert tuple(COLORS) == COLOR_NAMES
    assert SHAPES == ("circle", "square", "triangle")
    assert TASKS == ("single", "two_objects", "counting", "position")
    assert SIZE_RANGES == {"small": (5, 7), "large": (10, 13), None: (5, 11)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", range(5, 14))
def test_rendered_extent_is_exactly_2r_plus_1(shape, r):
    scene = Scene((ShapeObject("blue", shape, 32, 32, r),), f"a blue {shape}", "single")
    pixels = np.asarray(render(scene))
    ys, xs = np.nonzero((pixels != WHITE).any(axis=2))
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (32 - r, 32 + r, 32 - r, 32 + r)
    assert (pixels[ys, xs] == COLORS["blue"]).all()  # flat fill, no antialiasing
    mask = shape_mask(shape, r)
    widths = mask.sum(axis=1)
    if shape == "triangle":
        assert widths[0] == 1 and mask[0, r] and widths[-1] == 2 * r + 1  # apex up, full base at the bottom
        assert (np.diff(widths) >= 0).all()
        assert (mask == mask[:, ::-1]).all()
    if shape == "circle":
        assert (mask == mask.T).all() and (mask == mask[::-1]).all()
        assert abs(mask.mean() - np.pi / 4) < 0.03
    if shape == "square":
        assert mask.all()


def test_captions_parse_back_to_the_scene(scenes):
    for scene in scenes:
        spec = parse_caption(scene.caption)
        assert spec.task == scene.task
        objects = scene.objects
        if spec.task == "counting":
            assert len(objects) == spec.count
            assert {(o.color, o.shape) for o in objects} == {(spec.objects[0].color, spec.objects[0].shape)}
        else:
            assert len(objects) == len(spec.objects)
            assert [(o.color, o.shape) for o in objects] == [(s.color, s.shape) for s in spec.objects]
        for o, s in zip(objects, spec.objects * spec.count):
            lo, hi = SIZE_RANGES[s.size]
            assert lo <= o.r <= hi
        if spec.task in ("two_objects", "position"):
            assert objects[0].color != objects[1].color
        if spec.task == "position":
            a, b = objects
            dx, dy = b.cx - a.cx, b.cy - a.cy  # y grows downwards
            holds = {"left of": dx >= 8 and abs(dx) > abs(dy), "right of": -dx >= 8 and abs(dx) > abs(dy),
                     "above": dy >= 8 and abs(dy) > abs(dx), "below": -dy >= 8 and abs(dy) > abs(dx)}
            assert holds[spec.relation], scene


def test_all_parts_of_the_grammar_occur(scenes):
    specs = [parse_caption(s.caption) for s in scenes]
    assert {s.objects[0].size for s in specs if s.task == "single"} == {None, "small", "large"}
    assert {s.count for s in specs if s.task == "counting"} == {2, 3, 4}
    assert {s.relation for s in specs if s.task == "position"} == {"left of", "right of", "above", "below"}
    assert {o.color for s in scenes for o in s.objects} == set(COLORS)
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    radii = Counter(o.r for s in scenes for o in s.objects)
    assert set(radii) == set(range(5, 14))


def test_objects_inside_and_apart_by_geometry(scenes):
    for scene in scenes:
        for o in scene.objects:
            assert all(isinstance(v, int) for v in (o.cx, o.cy, o.r))
            assert o.cx - o.r >= 0 and o.cy - o.r >= 0 and o.cx + o.r <= 63 and o.cy + o.r <= 63
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                gap_x = abs(a.cx - b.cx) - a.r - b.r - 1
                gap_y = abs(a.cy - b.cy) - a.r - b.r - 1
                assert max(gap_x, gap_y) >= 2, scene


def test_rendered_pixels(scenes):
    near = np.ones((5, 5), dtype=bool)  # dilating by this reaches every pixel within 2 px (Chebyshev)
    for scene in scenes[:400]:
        image = render(scene)
        assert image.mode == "RGB" and image.size == (64, 64)
        pixels = np.asarray(image)
        colors = {tuple(c) for c in pixels.reshape(-1, 3)}
        assert colors <= set(COLORS.values()) | {WHITE}
        masks = [(np.asarray(render(Scene((o,), "", scene.task))) != WHITE).any(axis=2) for o in scene.objects]
        for o, mask in zip(scene.objects, masks):
            assert tuple(pixels[o.cy, o.cx]) == COLORS[o.color]
            assert (pixels[mask] == COLORS[o.color]).all()  # nothing drawn over it
        for i, mask in enumerate(masks):
            for j, other in enumerate(masks):
                if i != j:
                    assert not (ndimage.binary_dilation(mask, near) & other).any(), scene
        foreground = (pixels != WHITE).any(axis=2)
        assert (foreground == np.logical_or.reduce(masks)).all()
        _, n_components = ndimage.label(foreground, structure=np.ones((3, 3)))
        assert n_components == len(scene.objects)


def test_deterministic_and_independent_items():
    a = ShapesDataset(n=500, seed=3)
    b = ShapesDataset(n=20, seed=3)
    first = [a.scene(i) for i in range(20)]
    assert [b.scene(i) for i in range(20)] == first
    assert [b.scene(i) for i in reversed(range(20))] == first[::-1]  # item i does not depend on access order
    assert list(generate_scenes(20, seed=3)) == first
    assert a[7]["image"].tobytes() == b[7]["image"].tobytes()
    other = [ShapesDataset(n=20, seed=4).scene(i) for i in range(20)]
    assert sum(x != y for x, y in zip(first, other)) >= 18
    assert len({s.caption for s in first}) >= 15


def test_dataset_items():
    ds = ShapesDataset(n=10, seed=0)
    assert len(ds) == 10
    item = ds[4]
    assert item["text"] == item["scene"].caption == ds.scene(4).caption
    assert item["image"].tobytes() == render(ds.scene(4)).tobytes()
    with pytest.raises(IndexError):
        ds.scene(10)


def test_task_weights():
    n = 2000
    default = Counter(s.task for s in generate_scenes(n, seed=1))
    for task in TASKS:
        assert abs(default[task] / n - 0.25) < 0.04
    weighted = Counter(s.task for s in generate_scenes(n, seed=1, task_weights={"single": 3, "position": 1}))
    assert set(weighted) == {"single", "position"}
    assert abs(weighted["single"] / n - 0.75) < 0.04
    only = {s.task for s in generate_scenes(50, seed=1, task_weights={"counting": 1.0})}
    assert only == {"counting"}


@pytest.mark.parametrize("weights, words", [
    ({"drawing": 1.0}, "unknown shapes task"),
    ({"single": 0.0}, "not all zero"),
    ({"single": -1.0, "counting": 2.0}, ">= 0"),
])
def test_bad_task_weights(weights, words):
    with pytest.raises(BrushworkError, match=words):
        ShapesDataset(n=10, task_weights=weights)
    with pytest.raises(BrushworkError, match=words):
        sample_scene(random.Random(0), weights)


def test_canvas_sizes():
    with pytest.raises(BrushworkError, match="too small"):
        ShapesDataset(n=10, size=32)
    big = ShapesDataset(n=50, seed=0, size=96)
    for i in range(50):
        scene = big.scene(i)
        assert all(o.cx + o.r <= 95 and o.cy + o.r <= 95 for o in scene.objects)
        assert big[i]["image"].size == (96, 96)


def test_scene_dict_round_trip(scenes):
    for scene in scenes[:100]:
        d = json.loads(json.dumps(scene.to_dict()))
        assert Scene.from_dict(d) == scene


def test_render_rejects_objects_outside_the_canvas():
    with pytest.raises(ValueError, match="inside"):
        render(Scene((ShapeObject("red", "circle", 3, 30, 5),), "a red circle", "single"))
