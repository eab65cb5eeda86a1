"""The invisible watermark: survives a PNG round trip on small images, changes pixels little, is not
found in unmarked images; `brushwork watermark check`."""

import io
import random

import numpy as np
import PIL.Image
import pytest
import typer
from typer.testing import CliRunner

from brushwork.commands.serve import watermark_app
from brushwork.data.shapes import render, sample_scene
from brushwork.watermark import STEP, detect, embed


def images(size: int) -> list[PIL.Image.Image]:
    rng = random.Random(size)
    shapes = [render(sample_scene(rng)).resize((size, size)) for _ in range(8)]
    noise = [PIL.Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8))
             for i in range(3)]
    flat = [PIL.Image.new("RGB", (size, size), colour) for colour in ((255, 255, 255), (0, 0, 0), (200, 30, 40))]
    return shapes + noise + flat


def png_round_trip(image: PIL.Image.Image) -> PIL.Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return PIL.Image.open(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("size", [32, 64, 256])
def test_watermark_survives_png_and_changes_little(size):
    for image in images(size):
        marked = png_round_trip(embed(image))
        reading = detect(marked)
        assert reading.found and reading.agreement > 0.95, reading
        assert not detect(image).found
        change = np.abs(np.asarray(marked).astype(int) - np.asarray(image).astype(int))
        assert change.max() <= STEP  # measured: at most 6 of 255, where white or black clips
        assert change.mean() < 1.5


def test_non_square_rgba_and_tiny_images():
    rgba = PIL.Image.new("RGBA", (48, 24), (10, 120, 200, 128))
    marked = embed(rgba)
    assert marked.mode == "RGBA" and np.array_equal(np.asarray(marked)[..., 3], np.asarray(rgba)[..., 3])
    assert detect(png_round_trip(marked)).found
    assert detect(PIL.Image.new("RGB", (4, 4))).total == 0  # smaller than one block: nothing to carry it


def test_watermark_check_command(tmp_path):
    app = typer.Typer()
    app.add_typer(watermark_app, name="watermark")
    image = images(64)[0]
    embed(image).save(tmp_path / "marked.png")
    image.save(tmp_path / "plain.png")
    runner = CliRunner()
    found = runner.invoke(app, ["watermark", "check", str(tmp_path / "marked.png")])
    assert found.exit_code == 0 and "watermark found" in found.output
    missing = runner.invoke(app, ["watermark", "check", str(tmp_path / "plain.png")])
    assert missing.exit_code == 1 and "no brushwork watermark" in missing.output
    (tmp_path / "broken.png").write_bytes(b"not a png")
    broken = runner.invoke(app, ["watermark", "check", str(tmp_path / "broken.png")])
    assert broken.exit_code != 0 and "not a readable image" in str(broken.exception or broken.output)
