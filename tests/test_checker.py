import dataclasses
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from brushwork.data.captions import COLOR_NAMES, RELATIONS, SHAPES, SIZES, parse_caption
from brushwork.data.shapes import COLORS, Scene, ShapeObject, ShapesDataset, render, shape_mask
from brushwork.eval.checker import check, check_objects, detect_objects

N = 400


def blur(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(0.7))


def add_noise(image: Image.Image, rng: np.random.Generator, sigma: float = 8.0) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, sigma, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    ds = ShapesDataset(n=N, seed=2024)
    return [ds[i] for i in range(N)]


@pytest.mark.parametrize("condition", ["clean", "blur", "noise", "blur+noise"])
def test_accepts_the_data_sets_own_images(samples, condition):
    rng = np.random.default_rng(0)
    distort = {
        "clean": lambda im: im,
        "blur": blur,
        "noise": lambda im: add_noise(im, rng),
        "blur+noise": lambda im: add_noise(blur(im), rng),
    }[condition]
    results = [check(distort(s["image"]), s["text"]) for s in samples]
    accuracy = sum(r.ok for r in results) / len(results)
    print(f"\nchecker accuracy on {len(results)} {condition} images: {accuracy:.4f}")
    assert accuracy >= 0.99, [(s["text"], r.reason) for s, r in zip(samples, results) if not r.ok][:5]


def wrong_specs(scene: Scene, other_caption: str, rng: random.Random) -> list:
    """Prompts that differ from the scene's: another sample's caption and mutations of its own."""
    spec = parse_caption(scene.caption)
    first = spec.objects[0]
    specs = [parse_caption(other_caption)]
    other_color = rng.choice([c for c in COLOR_NAMES if c not in {o.color for o in spec.objects}])
    other_shape = rng.choice([s for s in SHAPES if s != first.shape])
    specs.append(dataclasses.replace(spec, objects=(dataclasses.replace(first, color=other_color),) + spec.objects[1:]))
    specs.append(dataclasses.replace(spec, objects=(dataclasses.replace(first, shape=other_shape),) + spec.objects[1:]))
    if spec.task == "counting":
        specs.append(dataclasses.replace(spec, count=rng.choice([n for n in (2, 3, 4) if n != spec.count])))
    if spec.task == "position":
        specs.append(dataclasses.replace(spec, relation=rng.choice([r for r in RELATIONS if r != spec.relation])))
    if spec.task == "single" and first.size is not None:
        other_size = next(s for s in SIZES if s != first.size)
        specs.append(dataclasses.replace(spec, objects=(dataclasses.replace(first, size=other_size),)))
    # Keep only prompts the ground truth really contradicts (another sample's caption can be true too).
    return [s for s in specs if not check_objects(scene.objects, s).ok]


def test_rejects_wrong_prompts(samples):
    rng = random.Random(0)
    nprng = np.random.default_rng(1)
    accepted = total = 0
    by_kind: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        other = samples[(i + 1 + rng.randrange(N - 1)) % N]["text"]
        image = add_noise(blur(sample["image"]), nprng)
        for spec in wrong_specs(sample["scene"], other, rng):
            ok = check(image, spec).ok
            accepted += ok
            total += 1
            by_kind.setdefault(spec.task, []).append(ok)
    rate = accepted / total
    print(f"\nwrong prompts accepted: {accepted}/{total} = {rate:.4f}; by task: "
          + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in by_kind.items()))
    assert total >= 3 * N
    assert rate <= 0.05


@pytest.mark.parametrize("color", COLOR_NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_detects_exact_geometry(color, shape):
    for r in (5, 7, 10, 13):
        obj = ShapeObject(color, shape, 30, 33, r)
        detected = detect_objects(render(Scene((obj,), "", "single")))
        assert len(detected) == 1
        d = detected[0]
        assert (d.color, d.shape, d.cx, d.cy, d.r) == (color, shape, 30, 33, r)
        assert d.area == shape_mask(shape, r).sum()


def test_check_reports_what_is_wrong():
    scene = Scene((ShapeObject("red", "circle", 20, 30, 6), ShapeObject("blue", "square", 45, 30, 8)),
                  "a red circle left of a blue square", "position")
    image = render(scene)
    assert check(image, scene.caption).ok
    assert check(image, "a blue square and a red circle").ok
    result = check(image, "a red circle right of a blue square")
    assert not result.ok and "not right of" in result.reason
    assert result.objects_ok                                  # the right objects, placed wrong
    assert not check(image, "a red circle above a blue square").ok
    assert not check(image, "a green circle left of a blue square").objects_ok
    result = check(image, "a red circle")
    assert not result.ok and "expected 1 object(s), found 2" in result.reason and not result.objects_ok
    assert not check(image, "two red circles").ok
    assert not check(image, "a red circle and a green square").ok
    assert len(result.objects) == 2
    with pytest.raises(ValueError):
        check(image, "a red hexagon")


def test_relation_needs_eight_pixels():
    def scene_at(dx: int) -> Image.Image:
        a, b = ShapeObject("red", "square", 20, 20, 5), ShapeObject("blue", "square", 20 + dx, 40, 5)
        return render(Scene((a, b), "", "position"))

    assert check(scene_at(0), "a red square above a blue square").ok
    assert not check(scene_at(0), "a red square left of a blue square").ok
    assert not check(scene_at(25), "a red square above a blue square").ok  # x offset dominates
    assert check(scene_at(25), "a red square left of a blue square").ok


def test_size_classes():
    def single(r: int) -> Image.Image:
        return render(Scene((ShapeObject("green", "triangle", 32, 32, r),), "", "single"))

    assert check(single(6), "a small green triangle").ok
    assert not check(single(6), "a large green triangle").ok
    assert check(single(12), "a large green triangle").ok
    assert not check(single(12), "a small green triangle").ok
    assert check(single(8), "a small green triangle").ok  # 1 px tolerance
    assert not check(single(9), "a small green triangle").ok
    assert check(single(12), "a green triangle").ok


def test_ignores_specks_and_faint_marks():
    pixels = np.asarray(render(Scene((ShapeObject("purple", "square", 30, 30, 8),), "", "single"))).copy()
    pixels[2:5, 2:5] = COLORS["red"]  # a 9-pixel speck
    pixels[50:60, 40:60] = (225, 225, 235)  # a faint smudge
    pixels[55, 5] = (0, 0, 0)
    assert check(Image.fromarray(pixels), "a purple square").ok


def test_grey_objects_have_no_palette_colour():
    pixels = np.asarray(render(Scene((ShapeObject("red", "circle", 30, 30, 8),), "", "single"))).copy()
    pixels[(pixels != 255).any(axis=2)] = (90, 90, 90)
    detected = detect_objects(Image.fromarray(pixels))
    assert [d.color for d in detected] == ["unknown"]
    assert not check(Image.fromarray(pixels), "a red circle").ok


def test_off_palette_colours_and_other_resolutions():
    ds = ShapesDataset(n=60, seed=5)
    rng = np.random.default_rng(3)
    for i in range(len(ds)):
        item = ds[i]
        pixels = np.asarray(item["image"], dtype=np.float32)
        foreground = (pixels != 255).any(axis=2)
        pixels[foreground] += rng.uniform(-15, 15, 3)  # each image's colours a little off the palette
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        assert check(image, item["text"]).ok, item["text"]
        assert check(image.resize((128, 128), Image.Resampling.NEAREST), item["text"]).ok


def test_merged_objects_fail_counting():
    a, b = ShapeObject("orange", "square", 20, 30, 6), ShapeObject("orange", "square", 33, 30, 6)  # touching
    result = check(render(Scene((a, b), "", "counting")), "two orange squares")
    assert not result.ok and "found 1" in result.reason
